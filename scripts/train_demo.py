"""Train the demo pre-trained / fine-tuned pair from the synthetic world.

Run ``python scripts/train_demo.py --out tuco_lens/demo/checkpoints`` from the repository root
(with tuco_lens installed, e.g. ``pip install -e .``). This is the script that built the
checkpoints shipped in ``tuco_lens/demo/checkpoints``; it is a research script, not part of the
installed package (the checkpoints' ``training_log.json`` records the command under its earlier
name, ``python -m tuco_lens.demo.train``).

It writes ``<out>/pt/`` and ``<out>/ft/`` (Hugging Face checkpoint directories: ``config.json``,
``generation_config.json``, ``model.safetensors`` and the tokenizer files with the chat template)
and ``<out>/training_log.json`` (losses, seconds, seeds, corpus sizes, refusal rates).

Recipe (all deterministic: fixed seeds, ``torch.use_deterministic_algorithms(True)``, one CPU
thread by default -- on a shared 2-core machine two threads were ~10x slower per step):

1. **Pre-training** of a tiny ``LlamaForCausalLM`` from scratch on :func:`world.sample_web_corpus`
   pages (whole pages greedily packed into rows of 256 tokens, ``<bos> page <eos>`` each, padding
   masked), next-token loss on every token.
2. **Fine-tuning** from the pre-trained weights on :func:`world.sample_chat_corpus` conversations
   rendered with the chat template; the loss is on the assistant tokens only (answer words and
   the ``<eos>`` closing each assistant turn). Each batch also replays a few pre-training pages
   (fresh draws of the same web-text sampler, loss on every token; a pre-training mix as in
   InstructGPT): without it the blocks drift on web text, which the chat data never constrains,
   and web text ends up with a *higher* TuCo than chat -- the opposite of real chat models.
   The token embedding, the final norm and the unembedding are **frozen**, so the pair shares
   them and FTC_alpha-scaling at alpha = 0 is exactly the pre-trained model; every decoder block
   is trained.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tuco_lens.demo import world

__all__ = [
    "PRETRAIN_DEFAULTS",
    "FINETUNE_DEFAULTS",
    "MODEL_DEFAULTS",
    "build_tokenizer",
    "build_model",
    "pack_documents",
    "encode_dialogue",
    "pretrain",
    "finetune",
    "greedy_replies",
    "refusal_rate",
    "main",
]

MODEL_DEFAULTS: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=224,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
PRETRAIN_DEFAULTS: dict[str, Any] = dict(
    n_docs=24000, steps=500, batch_size=8, seq_len=256, lr=3e-3, warmup=40, weight_decay=0.01,
    seed=0,
)
FINETUNE_DEFAULTS: dict[str, Any] = dict(
    n_dialogues=8000, steps=120, batch_size=32, lr=1e-3, warmup=20, weight_decay=0.01, seed=1,
    forbidden_share=0.25, replay_docs=8000, replay_batch_size=16, replay_seed=2,
)


# --------------------------------------------------------------------------------------------
# Tokenizer and model
# --------------------------------------------------------------------------------------------


def build_tokenizer():
    """The demo tokenizer: word level over :func:`world.vocabulary`, with the chat template.

    It does **not** add BOS/EOS by itself (``tok("the fox")`` gives just the two words); chat
    strings carry ``<bos>`` from the template, and TransformerLens prepends BOS to plain text.
    """
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(world.vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=world.UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in world.SPECIAL_TOKENS]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=world.BOS,
        eos_token=world.EOS,
        pad_token=world.PAD,
        unk_token=world.UNK,
        additional_special_tokens=[world.USER, world.ASSISTANT],
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_DEFAULTS["max_position_embeddings"],
        padding_side="right",
    )
    tok.chat_template = world.CHAT_TEMPLATE
    return tok


def build_model(tok, seed: int):
    """A freshly initialised tiny Llama-style model (``torch.manual_seed(seed)`` first)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok),
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        attention_dropout=0.0,
        attn_implementation="sdpa",  # pyright: ignore[reportCallIssue]  # taken by **kwargs, which transformers' dataclass signature hides
        **MODEL_DEFAULTS,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    )
    return model


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def pack_documents(docs: Sequence[str], tok, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedily pack ``<bos> doc <eos>`` sequences (whole) into rows of ``seq_len`` tokens.

    Returns:
        ``(input_ids, attention_mask)``, both ``[rows, seq_len]``; padding is ``<pad>`` / 0.
    """
    rows: list[list[int]] = []
    cur: list[int] = []
    for d in docs:
        ids = [tok.bos_token_id] + tok(d, add_special_tokens=False).input_ids + [tok.eos_token_id]
        if len(ids) > seq_len:
            ids = ids[:seq_len]
        if len(cur) + len(ids) > seq_len:
            rows.append(cur)
            cur = []
        cur = cur + ids
    if cur:
        rows.append(cur)
    x = torch.full((len(rows), seq_len), tok.pad_token_id, dtype=torch.long)
    m = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r)
        m[i, : len(r)] = 1
    return x, m


def encode_dialogue(messages: Sequence[dict[str, str]], tok) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation and its labels (assistant tokens only, else -100).

    The targets are every token after an ``<assistant>`` marker up to and including the ``<eos>``
    that closes the assistant turn.
    """
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    ids = tok(text, add_special_tokens=False).input_ids
    asst = tok.convert_tokens_to_ids(world.ASSISTANT)
    labels = [-100] * len(ids)
    inside = False
    for i, t in enumerate(ids):
        if inside:
            labels[i] = t
            if t == tok.eos_token_id:
                inside = False
        elif t == asst:
            inside = True
    return ids, labels


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _log_every(steps: int) -> int:
    return max(1, steps // 20)


# --------------------------------------------------------------------------------------------
# Training loops
# --------------------------------------------------------------------------------------------


def pretrain(model, tok, docs: Sequence[str], *, steps: int, batch_size: int, seq_len: int,
             lr: float, warmup: int, weight_decay: float, seed: int,
             verbose: bool = True) -> dict[str, Any]:
    """Next-token pre-training on packed web pages; returns a log dict (losses, seconds...)."""
    x, m = pack_documents(docs, tok, seq_len)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    model.train()
    losses: list[float] = []
    t0 = time.time()
    order = torch.randperm(len(x), generator=g)
    pos = 0
    for step in range(steps):
        if pos + batch_size > len(order):
            order = torch.randperm(len(x), generator=g)
            pos = 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        ids, mask = x[idx], m[idx]
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        _update(opt, list(model.parameters()), loss, _lr_at(step, steps, lr, warmup))
        losses.append(round(loss.item(), 5))
        if verbose and (step % _log_every(steps) == 0 or step == steps - 1):
            print(f"[pt] step {step:4d}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)",
                  flush=True)
    model.eval()
    n_tokens = int(m.sum())
    return {
        "losses": losses,
        "final_loss_avg20": _avg20(losses),
        "seconds": round(time.time() - t0, 1),
        "rows": len(x),
        "tokens": n_tokens,
        "epochs": round(steps * batch_size / len(x), 3),
    }


def _frozen_parameter_names() -> tuple[str, ...]:
    return ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def _encode_document(doc: str, tok) -> tuple[list[int], list[int]]:
    ids = [tok.bos_token_id] + tok(doc, add_special_tokens=False).input_ids + [tok.eos_token_id]
    return ids, list(ids)


def _sample(order: torch.Tensor, pos: int, n: int, size: int, g: torch.Generator):
    if pos + n > len(order):
        order, pos = torch.randperm(size, generator=g), 0
    return order, pos + n, [int(i) for i in order[pos : pos + n]]


def _trainable_blocks(model) -> list:
    """Freeze the embedding, final norm and unembedding; the parameters left to train."""
    frozen = set(_frozen_parameter_names())
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    return [p for p in model.parameters() if p.requires_grad]


def _padded(batch: Sequence[tuple[list[int], list[int]]], pad_token_id: int):
    """``(ids, labels, mask)`` of a batch of ``(ids, labels)`` rows, right-padded to the longest."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (a, b) in enumerate(batch):
        ids[i, : len(a)] = torch.tensor(a)
        labels[i, : len(b)] = torch.tensor(b)
        mask[i, : len(a)] = 1
    return ids, labels, mask


def _token_losses(model, ids, labels, mask):
    """Next-token cross-entropy of every position ``[batch, pos - 1]``, and which ones are targets."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    tok_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
        reduction="none",
    ).view(target.shape)
    return tok_loss, target != -100


def _update(opt, params, loss, lr: float) -> None:
    """One optimizer step on ``loss`` at learning rate ``lr``, gradients clipped to norm 1."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _avg20(xs: list[float]) -> float | None:
    """Mean of the last 20 values (rounded as the logs are), ``None`` for none."""
    return round(sum(xs[-20:]) / len(xs[-20:]), 5) if xs else None


def finetune(model, tok, dialogues: Sequence[Sequence[dict[str, str]]], *, steps: int,
             batch_size: int, lr: float, warmup: int, weight_decay: float, seed: int,
             replay_docs: Sequence[str] = (), replay_batch_size: int = 0,
             verbose: bool = True) -> dict[str, Any]:
    """Chat fine-tuning of the decoder blocks (embedding, final norm and unembedding frozen).

    Each step takes ``batch_size`` conversations (loss on assistant tokens) and, if
    ``replay_docs`` is given, ``replay_batch_size`` pre-training pages (loss on every token) --
    a pre-training mix as in InstructGPT's "PPO-ptx", which keeps the blocks' behaviour on web
    text close to the pre-trained one. The step loss is the mean over all target tokens; the
    log has the chat and replay parts separately.
    """
    enc = [encode_dialogue(d, tok) for d in dialogues]
    rep = [_encode_document(d, tok) for d in replay_docs] if replay_batch_size else []
    params = _trainable_blocks(model)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses: list[float] = []
    chat_losses: list[float] = []
    replay_losses: list[float] = []
    t0 = time.time()
    order, pos = torch.randperm(len(enc), generator=g), 0
    r_order, r_pos = (torch.randperm(len(rep), generator=g), 0) if rep else (torch.empty(0), 0)
    for step in range(steps):
        order, pos, idx = _sample(order, pos, batch_size, len(enc), g)
        batch = [enc[i] for i in idx]
        if rep:
            r_order, r_pos, r_idx = _sample(r_order, r_pos, replay_batch_size, len(rep), g)
            batch += [rep[i] for i in r_idx]
        tok_loss, valid = _token_losses(model, *_padded(batch, tok.pad_token_id))
        loss = tok_loss.sum() / valid.sum()
        _update(opt, params, loss, _lr_at(step, steps, lr, warmup))
        with torch.no_grad():
            chat_losses.append(round((tok_loss[:batch_size].sum() / valid[:batch_size].sum()).item(), 5))
            if rep:
                replay_losses.append(round((tok_loss[batch_size:].sum() / valid[batch_size:].sum()).item(), 5))
        losses.append(round(loss.item(), 5))
        if verbose and (step % _log_every(steps) == 0 or step == steps - 1):
            extra = f" (chat {chat_losses[-1]:.4f}, replay {replay_losses[-1]:.4f})" if rep else ""
            print(f"[ft] step {step:4d}/{steps} loss {loss.item():.4f}{extra} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return {
        "losses": losses,
        "chat_losses": chat_losses,
        "replay_losses": replay_losses,
        "final_loss_avg20": _avg20(losses),
        "final_chat_loss_avg20": _avg20(chat_losses),
        "final_replay_loss_avg20": _avg20(replay_losses),
        "seconds": round(time.time() - t0, 1),
        "assistant_tokens": sum(sum(1 for t in b if t != -100) for _, b in enc),
        "tokens": sum(len(a) for a, _ in enc),
        "replay_docs": len(rep),
        "frozen": list(_frozen_parameter_names()),
    }


# --------------------------------------------------------------------------------------------
# Evaluation with plain transformers
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_replies(model, tok, prompts: Sequence[str], max_new_tokens: int = 24,
                   batch_size: int = 64) -> list[str]:
    """Greedy completions (decoded, special tokens dropped) of chat-formatted prompts.

    Uses ``model.generate(do_sample=False)``; prompts are tokenized with
    ``add_special_tokens=False`` (the template holds the BOS) and batched by token length, so no
    padding is involved.
    """
    enc = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    out: list[str | None] = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(enc):
        by_len.setdefault(len(ids), []).append(i)
    for _, idxs in sorted(by_len.items()):
        for s in range(0, len(idxs), batch_size):
            chunk = idxs[s : s + batch_size]
            x = torch.tensor([enc[i] for i in chunk])
            y = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            for i, row in zip(chunk, y[:, x.shape[1] :]):
                out[i] = tok.decode(row, skip_special_tokens=True)
    return [o if o is not None else "" for o in out]


def refusal_rate(replies: Sequence[str]) -> float:
    """Share of replies that start with :data:`world.REFUSAL`."""
    return sum(world.is_refusal(r) for r in replies) / max(1, len(replies))


def _evaluate(pt, ft, tok) -> dict[str, Any]:
    sets = world.prompt_sets()
    res: dict[str, Any] = {}
    for name in ("harmful", "chat", "harmful_lang2"):
        for tag, model in (("pt", pt), ("ft", ft)):
            rate = refusal_rate(greedy_replies(model, tok, sets[name]))
            res[f"refusal_{tag}_{name}"] = round(rate, 4)
    # exact fact-based answers on held-out benign requests (FT)
    held = [r for r in world.requests("heldout") if not r.forbidden]
    replies = greedy_replies(ft, tok, [world.render_chat(r.messages()) for r in held])
    res["ft_chat_exact_answer"] = round(
        sum(" ".join(a.split()) == r.answer for a, r in zip(replies, held)) / len(held), 4
    )
    for k in (0, 2, 4, 8):
        prompts = [world.many_shot_prompt(r.text, k, seed=i)
                   for i, r in enumerate(world.requests("heldout", [world.FORBIDDEN_TOPIC]))]
        res[f"refusal_ft_many_shot_k{k}"] = round(refusal_rate(greedy_replies(ft, tok, prompts)), 4)
    return res


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _setup(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train and save the pair; returns the training log (also written to ``training_log.json``)."""
    ap = argparse.ArgumentParser(prog="python scripts/train_demo.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True,
                    help="output directory (gets pt/, ft/, training_log.json)")
    ap.add_argument("--pt-steps", type=int, default=PRETRAIN_DEFAULTS["steps"])
    ap.add_argument("--ft-steps", type=int, default=FINETUNE_DEFAULTS["steps"])
    ap.add_argument("--pt-docs", type=int, default=PRETRAIN_DEFAULTS["n_docs"])
    ap.add_argument("--ft-dialogues", type=int, default=FINETUNE_DEFAULTS["n_dialogues"])
    ap.add_argument("--replay-docs", type=int, default=FINETUNE_DEFAULTS["replay_docs"],
                    help="pre-training pages replayed during fine-tuning (0 disables the mix)")
    ap.add_argument("--model-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--no-eval", action="store_true", help="skip the refusal-rate evaluation")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    previous = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    _setup(args.threads)
    try:
        return _run(args, argv)
    finally:  # leave the caller's torch settings as they were (e.g. when called from a test)
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    out = Path(args.out)
    t_start = time.time()

    tok = build_tokenizer()
    pt_cfg = {**PRETRAIN_DEFAULTS, "steps": args.pt_steps, "n_docs": args.pt_docs}
    ft_cfg = {**FINETUNE_DEFAULTS, "steps": args.ft_steps, "n_dialogues": args.ft_dialogues,
              "replay_docs": args.replay_docs}

    docs = world.sample_web_corpus(pt_cfg["n_docs"], seed=pt_cfg["seed"])
    model = build_model(tok, seed=args.model_seed)
    pt_log = pretrain(model, tok, docs, steps=pt_cfg["steps"], batch_size=pt_cfg["batch_size"],
                      seq_len=pt_cfg["seq_len"], lr=pt_cfg["lr"], warmup=pt_cfg["warmup"],
                      weight_decay=pt_cfg["weight_decay"], seed=pt_cfg["seed"],
                      verbose=not args.quiet)
    pt_dir, ft_dir = out / "pt", out / "ft"
    pt_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(pt_dir)
    tok.save_pretrained(pt_dir)

    dialogues = world.sample_chat_corpus(ft_cfg["n_dialogues"], seed=ft_cfg["seed"],
                                         forbidden_share=ft_cfg["forbidden_share"])
    replay = world.sample_web_corpus(ft_cfg["replay_docs"], seed=ft_cfg["replay_seed"])
    ft_log = finetune(model, tok, dialogues, steps=ft_cfg["steps"], batch_size=ft_cfg["batch_size"],
                      lr=ft_cfg["lr"], warmup=ft_cfg["warmup"],
                      weight_decay=ft_cfg["weight_decay"], seed=ft_cfg["seed"],
                      replay_docs=replay,
                      replay_batch_size=ft_cfg["replay_batch_size"] if replay else 0,
                      verbose=not args.quiet)
    ft_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(ft_dir)
    tok.save_pretrained(ft_dir)

    log: dict[str, Any] = {
        "command": "python scripts/train_demo.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "seeds": {"world": world.WORLD_SEED, "model_init": args.model_seed,
                  "pretrain_data": pt_cfg["seed"], "finetune_data": ft_cfg["seed"],
                  "finetune_replay_data": ft_cfg["replay_seed"]},
        "torch_threads": args.threads,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "versions": {"torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "model": {**MODEL_DEFAULTS, "vocab_size": len(tok),
                  "n_params": sum(p.numel() for p in model.parameters())},
        "pretrain": {"config": pt_cfg, "corpus_docs": len(docs), **pt_log},
        "finetune": {"config": ft_cfg, "corpus_dialogues": len(dialogues), **ft_log},
        "train_seconds": round(pt_log["seconds"] + ft_log["seconds"], 1),
    }
    if not args.no_eval:
        from transformers import AutoModelForCausalLM

        t0 = time.time()
        pt = AutoModelForCausalLM.from_pretrained(pt_dir).eval()
        ft = AutoModelForCausalLM.from_pretrained(ft_dir).eval()
        log["eval"] = _evaluate(pt, ft, tok)
        log["eval"]["seconds"] = round(time.time() - t0, 1)
        if not args.quiet:
            print(json.dumps(log["eval"], indent=1))
    log["total_seconds"] = round(time.time() - t_start, 1)
    log["sizes_bytes"] = {
        f"{d}/{f.name}": f.stat().st_size for d in ("pt", "ft") for f in sorted((out / d).iterdir())
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    if not args.quiet:
        print(f"wrote {pt_dir}, {ft_dir}, {out / 'training_log.json'} "
              f"(train {log['train_seconds']}s, total {log['total_seconds']}s)")
    return log


if __name__ == "__main__":
    main()
