"""Tiny random Hugging Face checkpoints for offline tests.

Every architecture tuco_lens supports gets a 2-layer, 32-wide causal LM (4 heads, 2 KV heads
where the architecture has grouped-query attention, 128 embedding rows, 128 positions, float32)
with a 118-token word-level tokenizer (special tokens and a chat template included), saved with
``save_pretrained`` so that ``AutoModelForCausalLM.from_pretrained(dir)`` and
``AutoTokenizer.from_pretrained(dir)`` load it without network access. Weights are drawn with
std 0.2 and norm weights / biases are randomized too, so conversion mistakes show up.

``"llama_chatml"`` is shaped like a real small instruct checkpoint (SmolLM2-135M-Instruct: 30
layers, d_model 576, 9 query / 3 KV heads, tied embeddings, ChatML): 16 layers, 48 wide, 6 query /
2 KV heads, tied embeddings, and a byte-level BPE tokenizer whose BOS is the chat token
``<|im_start|>`` and which adds no BOS by itself (``tokenizer(text)`` is just the text's tokens).

A "fine-tuned" twin is made from a base checkpoint by adding Gaussian noise to the decoder
blocks only (``perturb="blocks"``: embeddings, final norm and unembedding stay identical) or
to every parameter (``perturb="all"``).

Example:
    >>> base = build_checkpoint("llama", tmp / "base")
    >>> ft = build_checkpoint("llama", tmp / "ft", base_dir=base, noise=0.1, seed=1)
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

__all__ = [
    "ARCHITECTURES",
    "CHAT_TEMPLATE",
    "INIT_STD",
    "MODEL_VOCAB_SIZE",
    "build_checkpoint",
    "build_chatml_tokenizer",
    "build_tokenizer",
    "hf_config_for",
    "plant_massive_activation",
]

ARCHITECTURES = ("gpt2", "llama", "llama3", "mistral", "qwen2", "gpt_neox", "gemma", "llama_chatml")

SPECIAL_TOKENS = (
    "<pad>", "<bos>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
)
_WORDS = (
    "the a an and or but if then so of to in on at by for with from as is are was be "
    "i you he she it we they me my your his her its our their this that what who how why "
    "when where yes no not all some one two three many more good bad new old big small "
    "hello thanks please sorry cat dog bird fish tree house car city sea sun moon day night "
    "water food time say tell ask help make go come see know think want give take find "
    ". , ? ! : ' \" ( ) - 0 1 2 3"
).split()

#: Wraps turns in role markers; ``add_generation_prompt`` opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|> {{ message['content'] }} <|end|> "
    "{% elif message['role'] == 'user' %}<|user|> {{ message['content'] }} <|end|> "
    "{% elif message['role'] == 'assistant' %}<|assistant|> {{ message['content'] }} <|end|> "
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

#: Embedding rows of every tiny model (the tokenizer has fewer tokens, as real models often do).
MODEL_VOCAB_SIZE = 128

#: Tokens of the byte-level BPE tokenizer (256 byte symbols + specials + merges), and the
#: embedding rows of the models that use it.
BYTE_LEVEL_VOCAB_SIZE = 300
BYTE_LEVEL_MODEL_VOCAB_SIZE = 320

#: Architectures whose tokenizer transformers 5 rebuilds as a byte-level BPE.
_BYTE_LEVEL_ARCHS = ("qwen2",)

#: ChatML special tokens (SmolLM / Qwen style): BOS opens a turn, EOS closes it and pads.
CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_VOCAB_SIZE = 400
CHATML_MODEL_VOCAB_SIZE = 416

#: Weight init scale: larger than Hugging Face's 0.02 so activations leave the near-linear
#: regime and conversion mistakes (activation, norm offsets...) show in the logits.
INIT_STD = 0.2

_BLOCK_PARAM = re.compile(r"\.(layers|h)\.\d+\.")


def _byte_level_bpe(vocab_size: int, special_tokens: tuple[str, ...], corpus: list[str]) -> Tokenizer:
    """A byte-level BPE (GPT-2 style: 256 byte symbols, then merges) trained on ``corpus``."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    return backend


def build_tokenizer(
    directory: str | Path, *, prepend_bos: bool = True, byte_level: bool = False
) -> PreTrainedTokenizerFast:
    """Build a tiny word-level (or byte-level BPE) tokenizer and save it to ``directory``.

    Word level: text is lower-cased and split on whitespace and punctuation; unknown words map
    to ``<unk>``. Byte level: a BPE of :data:`BYTE_LEVEL_VOCAB_SIZE` tokens trained on the word
    list, for architectures whose tokenizer class transformers 5 imposes (Qwen2 rebuilds a
    byte-level BPE from ``vocab``/``merges`` whatever ``tokenizer_class`` says). With
    ``prepend_bos`` the tokenizer prepends ``<bos>`` (Llama style).

    Args:
        directory: Where to save the tokenizer files (created if missing).
        prepend_bos: Whether encoding adds ``<bos>`` in front.
        byte_level: Build a byte-level BPE instead of a word-level tokenizer.

    Returns:
        The tokenizer, reloaded from ``directory`` so its ``name_or_path`` points there.

    Example:
        >>> tok = build_tokenizer(tmp / "tok")
        >>> tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
        ...                         add_generation_prompt=True)
        '<bos><|user|> hello <|end|> <|assistant|> '
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if byte_level:
        backend = _byte_level_bpe(BYTE_LEVEL_VOCAB_SIZE, SPECIAL_TOKENS, [" ".join(_WORDS)] * 4)
        vocab = backend.get_vocab()
    else:
        vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(dict.fromkeys(_WORDS)))}
        backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        backend.normalizer = normalizers.Lowercase()
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if prepend_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=list(SPECIAL_TOKENS[4:]),
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def build_chatml_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML turns that adds no BOS (its BOS is a chat token).

    Like SmolLM2's: BOS ``<|im_start|>`` (the token that opens a chat turn), EOS and padding
    ``<|im_end|>``, unknown ``<|endoftext|>``, no post-processor (``tokenizer(text)`` adds no
    special token), and a ChatML chat template. :data:`CHATML_VOCAB_SIZE` tokens: the 256 byte
    symbols, the specials and merges trained on sentences and chat turns.

    Example:
        >>> tok = build_chatml_tokenizer(tmp / "tok")
        >>> tok("the cat").input_ids == tok("the cat", add_special_tokens=False).input_ids
        True
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    words = " ".join(_WORDS)
    corpus = [words, words.capitalize(), f"user\n{words}\nassistant\n{words}\n"] * 4
    backend = _byte_level_bpe(CHATML_VOCAB_SIZE, CHATML_SPECIAL_TOKENS, corpus)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )
    tokenizer.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def hf_config_for(
    arch: str, vocab_size: int, tokenizer: PreTrainedTokenizerFast
) -> transformers.PretrainedConfig:
    """The tiny Hugging Face config used for ``arch`` (see :data:`ARCHITECTURES`)."""
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    rms = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        "initializer_range": INIT_STD,
        **ids,
    }
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=INIT_STD, **ids,
        )
    if arch == "llama":
        return transformers.LlamaConfig(**rms, rope_theta=10000.0)
    if arch == "llama3":
        scaling = {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        return transformers.LlamaConfig(**rms, rope_theta=500000.0, rope_scaling=scaling)
    if arch == "mistral":
        return transformers.MistralConfig(**rms, sliding_window=None)
    if arch == "qwen2":
        return transformers.Qwen2Config(**{**rms, "tie_word_embeddings": True})
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.5,
            use_parallel_residual=True, hidden_dropout=0.0, attention_dropout=0.0,
            initializer_range=INIT_STD, **ids,
        )
    if arch == "gemma":
        return transformers.GemmaConfig(**{**rms, "tie_word_embeddings": True}, head_dim=8)
    if arch == "llama_chatml":
        # Half the init scale of the 2-layer models: 16 layers at std 0.2 grow the stream to |x| ~ 40
        # and float32 rounding to 1e-4; at 0.1 TransformerLens matches Hugging Face to 1e-5.
        deep = dict(hidden_size=48, intermediate_size=128, num_hidden_layers=16, num_attention_heads=6,
                    num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5,
                    initializer_range=INIT_STD / 2)
        return transformers.LlamaConfig(**{**rms, **deep}, rope_theta=100000.0)
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")


def _randomize_norms_and_biases(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Move norm weights away from 1 and biases away from 0 so mistakes show up in tests."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm = "norm" in name or re.search(r"\bln_", name) is not None
            if name.endswith("bias"):
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
            elif is_norm and param.dim() == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def _add_noise(
    model: torch.nn.Module, noise: float, perturb: str, generator: torch.Generator
) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if perturb == "blocks" and not _BLOCK_PARAM.search(f".{name}"):
                continue
            scale = param.std().item() if param.numel() > 1 else 0.0
            scale = scale if scale > 0 else 1.0
            param.add_(noise * scale * torch.randn(param.shape, generator=generator))


def build_checkpoint(
    arch: str,
    directory: str | Path,
    *,
    seed: int = 0,
    base_dir: str | Path | None = None,
    noise: float = 0.0,
    perturb: str = "blocks",
) -> Path:
    """Write a tiny random causal LM plus tokenizer to ``directory``.

    Args:
        arch: One of :data:`ARCHITECTURES`.
        directory: Output directory (any name; created if missing).
        seed: Seed of the random weights (or of the noise, with ``base_dir``).
        base_dir: If given, load this checkpoint and perturb it instead of building anew
            (``arch`` is then ignored: the architecture is the base checkpoint's).
        noise: Noise scale relative to each parameter's standard deviation.
        perturb: ``"blocks"`` (decoder layers only) or ``"all"`` (every parameter).

    Returns:
        ``directory`` as a :class:`~pathlib.Path`.

    Example:
        >>> pt = build_checkpoint("gemma", tmp / "gemma-base")
        >>> ft = build_checkpoint("gemma", tmp / "gemma-ft", base_dir=pt, noise=0.2, seed=1)
    """
    if perturb not in ("blocks", "all"):
        raise ValueError(f"perturb must be 'blocks' or 'all', got {perturb!r}")
    directory = Path(directory)
    generator = torch.Generator().manual_seed(seed)
    if base_dir is not None:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        _add_noise(model, noise, perturb, generator)
    else:
        byte_level = arch in _BYTE_LEVEL_ARCHS
        if arch == "llama_chatml":
            tokenizer, vocab_size = build_chatml_tokenizer(directory), CHATML_MODEL_VOCAB_SIZE
        else:
            tokenizer = build_tokenizer(directory, byte_level=byte_level)
            vocab_size = BYTE_LEVEL_MODEL_VOCAB_SIZE if byte_level else MODEL_VOCAB_SIZE
        config = hf_config_for(arch, vocab_size, tokenizer)
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _randomize_norms_and_biases(model, generator)
    model.eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def plant_massive_activation(
    source: str | Path,
    directory: str | Path,
    *,
    token_ids: tuple[int, ...],
    value: float = 28000.0,
    layer: int = 2,
    channel: int = 0,
) -> Path:
    """Copy a Llama-architecture checkpoint, adding a massive activation (|x| ≈ ``value``).

    Real models write a few huge values (≈ 28,000 in a 135M instruct model) into one channel of
    the residual stream at the first token and at some delimiters, from an early MLP on. Here:
    the embedding of ``token_ids`` gets a marker in ``channel`` (every other token 0 there), the
    blocks before ``layer`` write nothing into ``channel``, and MLP neuron 0 of ``layer`` reads the
    marker and writes about ``value`` into ``channel`` (scaled on this checkpoint's own float32
    computation at the first marked token). Apply it with the same arguments to a pre-trained and a fine-tuned checkpoint:
    both then carry the activation, as real fine-tunes do.

    Example:
        >>> plant_massive_activation(pt_dir, tmp / "pt-massive", token_ids=(tok.bos_token_id,))
    """
    directory = Path(directory)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    layers = model.model.layers
    with torch.no_grad():
        embed = model.model.embed_tokens.weight  # (tied embeddings: the logits of channel 0 change too)
        embed[:, channel] = 0.0
        embed[list(token_ids), channel] = 3.0
        for block in layers[: layer + 1]:  # nothing else reaches the channel before the neuron
            block.self_attn.o_proj.weight[channel] = 0.0
        for block in layers[:layer]:
            block.mlp.down_proj.weight[channel] = 0.0
        mlp = layers[layer].mlp
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[0] = 0.0
            proj.weight[0, channel] = 4.0
        mlp.down_proj.weight[:, 0] = 0.0
        mlp.down_proj.weight[channel, 0] = 1.0
        seen: dict[str, Tensor] = {}
        handle = mlp.down_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("act", i[0]))
        model(torch.tensor([list(token_ids)]))
        handle.remove()
        mlp.down_proj.weight[channel, 0] = value / float(seen["act"][0, 0, 0])
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
