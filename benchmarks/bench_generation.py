#!/usr/bin/env python
"""Greedy generation on a SmolLM2-135M-shaped pair: Hugging Face vs TransformerLens vs tuco_lens.

Builds, from a config (no download), a Llama-architecture model shaped like SmolLM2-135M-Instruct
(30 layers, d_model 576, 9 query / 3 key-value heads, gated MLP 1536, vocabulary 49152, tied
embeddings; 135M parameters) with random weights, and its "fine-tune" (Gaussian noise on the
blocks). Then, in one run and interleaved (every repeat runs every operation once, round-robin,
starting one operation later each repeat; one warm-up repeat first), it times the generation of
``--new-tokens`` tokens (greedy, KV cache, no early stop) for ``--batch`` prompts:

* ``hf``              Hugging Face ``ft.generate`` (its default attention): the unit of the ratios;
* ``tl``              TransformerLens's own ``HookedTransformer.generate`` of the fine-tuned model;
* ``tl_loop``         tuco_lens's generation loop on the fine-tuned model alone
                      (``tuco_lens.generation.generate_tokens``, no α hooks);
* ``pair``            ``pair.generate(..., alpha=0.5)``;
* ``pair_no_cache``   the same with ``use_past_kv_cache=False`` (only with ``--no-cache-too``);

each **before** (TransformerLens copying its weights into ``F.linear``'s layout on every call, as
in transformer-lens 3.9) and **after** the fix (``tuco_lens.backends.linear_layout``: the weights
stored in that layout for the duration of the call). "Before" disables the fix in this process
(``tuco_lens.backends.hooked._layout_plan`` returns no weight), so both run on the same models seconds
apart. The outputs of before and after must be identical token for token (asserted).

    OMP_NUM_THREADS=2 python benchmarks/bench_generation.py [--repeats 3] [--batch 1] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import tuco_lens
import tuco_lens.backends.hooked
from tuco_lens.backends import linear_layout
from tuco_lens.generation import generate_tokens

SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
    max_position_embeddings=2048, rope_theta=100000.0, rms_norm_eps=1e-5,
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)

SENTENCES = ["The history of Rome began on seven hills", "Tell me a story about a cat",
             "How do I bake bread at home?", "What is the capital of France?"]


def build_pair_dirs(root: Path, config: dict = SMOLLM2_135M, noise: float = 0.1) -> tuple[Path, Path]:
    """Write a random Llama-architecture pre-trained model (``config``: ``LlamaConfig`` fields), its
    twin with ``noise · std · N(0, 1)`` added to every block parameter and a byte-level tokenizer
    to ``root/pt`` and ``root/ft``."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(SENTENCES * 8, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>",
    )
    torch.manual_seed(0)
    pt = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    dirs = root / "pt", root / "ft"
    pt.save_pretrained(dirs[0])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in pt.model.layers.parameters():
            param.add_(noise * param.std() * torch.randn(param.shape, generator=generator))
    pt.save_pretrained(dirs[1])
    for d in dirs:
        tokenizer.save_pretrained(d)
    return dirs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-cache-too", action="store_true", help="also time pair.generate without the KV cache")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        pt_dir, ft_dir = build_pair_dirs(Path(tmp))
        hf = transformers.AutoModelForCausalLM.from_pretrained(ft_dir).eval()
        pair = tuco_lens.load_pair(str(pt_dir), str(ft_dir), backend="hooked", device="cpu")
    batch = pair.tokenize([SENTENCES[i % len(SENTENCES)] for i in range(args.batch)])
    n = args.new_tokens
    hf.generation_config.eos_token_id = None  # no early stop, as with stop_at_eos=False
    hf_kwargs = dict(max_new_tokens=n, do_sample=False, pad_token_id=SMOLLM2_135M["pad_token_id"])
    tl_tokens = batch.tokens[:1]  # TransformerLens's generate rebuilds masks from pad ids: one unpadded row

    ops = {
        "hf": lambda: hf.generate(batch.tokens, attention_mask=batch.attention_mask, **hf_kwargs),
        "tl": lambda: pair.ft.generate(tl_tokens, max_new_tokens=n, do_sample=False, stop_at_eos=False, verbose=False),
        "tl_loop": lambda: generate_tokens(pair.ft, batch, max_new_tokens=n, stop_at_eos=False),
        "pair": lambda: pair.generate(batch.tokens, attention_mask=batch.attention_mask, alpha=0.5,
                                      max_new_tokens=n, stop_at_eos=False, return_type="tokens"),
    }
    if args.no_cache_too:
        ops["pair_no_cache"] = lambda: pair.generate(
            batch.tokens, attention_mask=batch.attention_mask, alpha=0.5, max_new_tokens=n,
            stop_at_eos=False, return_type="tokens", use_past_kv_cache=False)

    def variant(name: str, fixed: bool):
        def run():
            if name == "hf":
                return ops[name]()
            off = contextlib.nullcontext() if fixed else mock.patch.object(tuco_lens.backends.hooked, "_layout_plan", lambda model: [])
            # TransformerLens's own generate knows nothing of tuco_lens: the fix is applied around it
            around = linear_layout(pair.ft) if name == "tl" else contextlib.nullcontext()
            with off, around:
                return ops[name]()
        return run

    timed = {"hf": variant("hf", True)}
    for name in ops:
        if name != "hf":
            timed[f"{name} before"] = variant(name, False)
            timed[f"{name} after"] = variant(name, True)
    names = list(timed)
    times: dict[str, list[float]] = {k: [] for k in names}
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for repeat in range(args.repeats + 1):
            start = repeat % len(names)
            for k in names[start:] + names[:start]:
                t0 = time.perf_counter()
                out = timed[k]()
                elapsed = time.perf_counter() - t0
                if repeat == 0:
                    outputs[k] = out
                else:
                    times[k].append(elapsed)
    for name in ops:
        if name != "hf":
            assert torch.equal(outputs[f"{name} before"], outputs[f"{name} after"]), name
    same_as_hf = torch.equal(outputs["tl_loop after"], outputs["hf"])

    n_params = sum(p.numel() for p in hf.parameters())
    print(f"SmolLM2-135M-shaped pair ({n_params / 1e6:.0f}M parameters per model, float32, CPU, "
          f"torch threads {torch.get_num_threads()}): {args.batch} prompt(s) of {batch.tokens.shape[1]} tokens, "
          f"{n} new tokens, greedy, KV cache; {args.repeats} interleaved repeats (medians)")
    hf_time = statistics.median(times["hf"])
    print(f"{'operation':<16} {'before s':>9} {'after s':>8} {'speed-up':>9} {'before ÷ HF':>12} {'after ÷ HF':>11}")
    print(f"{'hf':<16} {'':>9} {hf_time:>8.2f} {'':>9} {'':>12} {1.0:>10.2f}x")
    for name in ops:
        if name == "hf":
            continue
        before, after = (statistics.median(times[f"{name} {v}"]) for v in ("before", "after"))
        print(f"{name:<16} {before:>9.2f} {after:>8.2f} {before / after:>8.2f}x {before / hf_time:>11.2f}x {after / hf_time:>10.2f}x")
    print(f"before == after token for token: yes (asserted); tuco_lens loop == Hugging Face generate: {'yes' if same_as_hf else 'no'}")


if __name__ == "__main__":
    main()
