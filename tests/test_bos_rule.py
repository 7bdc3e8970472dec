"""The BOS rule for plain strings: a BOS exactly when the model's own tokenizer adds one.

Every tokenizer kind of the suite, on both backends: the word-level tokenizer that prepends
``<bos>`` (GPT-2 ... Gemma checkpoints), the byte-level BPE that prepends it (Qwen2), the ChatML
byte-level BPE whose BOS ``<|im_start|>`` is a chat token and which adds nothing (``llama_chatml``,
shaped like SmolLM2-135M-Instruct), and the demo pair's word-level tokenizer that adds nothing
(but whose model was pre-trained on ``<bos> page``, so ``demo.load_pair`` asks for a BOS). The
expected tokens come from the Hugging Face tokenizer loaded from the checkpoint directory, never
from tuco_lens or TransformerLens.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

import tuco_lens
from tuco_lens import demo
from tuco_lens.backends import HAS_HOOKED_TRANSFORMER
from tuco_lens.loading import tokenizer_adds_bos

TEXT = "the cat sat on the mat"

#: Architecture of the checkpoint -> does its own tokenizer add BOS?
KINDS = {"llama": True, "gpt2": True, "qwen2": True, "llama_chatml": False}


def _ids(encoded) -> list[int]:
    return list(encoded if isinstance(encoded, list) else encoded["input_ids"])


@pytest.fixture(scope="module", params=sorted(KINDS))
def loaded(request, checkpoint_pair, backend):
    pt_dir, ft_dir = checkpoint_pair(request.param)
    return request.param, tuco_lens.load_pair(str(pt_dir), str(ft_dir), backend=backend), AutoTokenizer.from_pretrained(ft_dir)


def test_tokenizer_adds_bos_names_each_kind(loaded):
    arch, _, stock = loaded
    assert tokenizer_adds_bos(stock) is KINDS[arch]
    assert (stock(TEXT).input_ids[0] == stock.bos_token_id) is KINDS[arch]  # the rule, by hand


def test_plain_strings_follow_the_tokenizer(loaded):
    arch, pair, stock = loaded
    assert pair.ft.cfg.default_prepend_bos is KINDS[arch]
    assert pair.tokenize(TEXT).tokens[0].tolist() == stock(TEXT).input_ids
    assert pair.ft.to_tokens(TEXT)[0].tolist() == stock(TEXT).input_ids  # TransformerLens agrees
    batch = pair.tokenize([TEXT, "hello"])  # padded rows keep their own tokens
    assert batch.tokens[1][batch.attention_mask[1].bool()].tolist() == stock("hello").input_ids


def test_prepend_bos_overrides_the_rule(loaded):
    _, pair, stock = loaded
    text_only = stock(TEXT, add_special_tokens=False).input_ids
    assert pair.tokenize(TEXT, prepend_bos=True).tokens[0].tolist() == [stock.bos_token_id] + text_only
    assert pair.tokenize(TEXT, prepend_bos=False).tokens[0].tolist() == text_only


def test_chat_template_tokens_are_the_tokenizers_own(loaded):
    _, pair, stock = loaded
    messages = [{"role": "user", "content": TEXT}]
    expected = _ids(stock.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    assert pair.tokenize(TEXT, chat_template=True).tokens[0].tolist() == expected
    assert expected[0] == stock.bos_token_id and expected[1] != stock.bos_token_id  # no doubled BOS
    # the same text formatted by hand is not given a second BOS, whatever the rule
    text = stock.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert pair.tokenize(text).tokens[0].tolist() == expected


def test_scores_use_the_tokens_the_rule_gives(loaded):
    """TuCo of a string is TuCo of the tokenizer's own ids (no hidden BOS)."""
    _, pair, stock = loaded
    ids = torch.tensor([stock(TEXT).input_ids])
    torch.testing.assert_close(pair.tuco(TEXT), pair.tuco(ids), atol=0, rtol=0)


def test_explicit_default_prepend_bos_wins_over_the_tokenizer(checkpoint_pair, backend):
    pt_dir, ft_dir = checkpoint_pair("llama_chatml")
    stock = AutoTokenizer.from_pretrained(ft_dir)
    pair = tuco_lens.load_pair(str(pt_dir), str(ft_dir), backend=backend, default_prepend_bos=True)
    assert pair.tokenize(TEXT).tokens[0].tolist() == [stock.bos_token_id] + stock(TEXT).input_ids


def test_demo_pair_keeps_its_pre_training_bos(backend):
    """The demo tokenizer adds no BOS, its pre-training did: demo.load_pair keeps the BOS."""
    stock = AutoTokenizer.from_pretrained(demo.FT_DIR)
    assert not tokenizer_adds_bos(stock)
    web = demo.prompt_sets()["web"][0]
    text_only = stock(web, add_special_tokens=False).input_ids
    pair = demo.load_pair(backend=backend)
    assert pair.tokenize(web).tokens[0].tolist() == [stock.bos_token_id] + text_only
    chat = demo.prompt_sets()["harmful"][0]  # starts with "<bos>" from the template: no second BOS
    assert pair.tokenize(chat).tokens[0].tolist() == stock(chat, add_special_tokens=False).input_ids
    own_rule = demo.load_pair(backend=backend, default_prepend_bos=False)
    assert own_rule.tokenize(web).tokens[0].tolist() == text_only


@pytest.mark.skipif(not HAS_HOOKED_TRANSFORMER, reason="needs HookedTransformer (transformer-lens 3.x)")
def test_official_names_follow_their_original_tokenizer(monkeypatch, checkpoint_pair):
    """TransformerLens loads a BOS-adding copy of an official model's tokenizer; the rule comes
    from the original, reloaded from the same place."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    _, ft_dir = checkpoint_pair("llama_chatml")
    stock = AutoTokenizer.from_pretrained(ft_dir)

    def official(name, **kwargs):
        cfg = HookedTransformerConfig(
            n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=64, d_vocab=len(stock),
            act_fn="gelu", tokenizer_name=str(ft_dir), device="cpu",
            default_prepend_bos=kwargs.get("default_prepend_bos", True),  # TransformerLens's default
        )
        return HookedTransformer(cfg)

    monkeypatch.setattr(HookedTransformer, "from_pretrained_no_processing", official)
    model = tuco_lens.load_model("gpt2")
    assert model.cfg.default_prepend_bos is False
    assert model.to_tokens(TEXT)[0].tolist() == stock(TEXT).input_ids
    assert tuco_lens.load_model("gpt2", default_prepend_bos=True).cfg.default_prepend_bos is True

    class Unreadable:  # the original tokenizer cannot be reloaded (TransformerLens's own loads still work)
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise OSError("no such cache")

    monkeypatch.setattr(tuco_lens.loading, "AutoTokenizer", Unreadable)
    with pytest.warns(UserWarning, match="default_prepend_bos=True; pass default_prepend_bos"):
        model = tuco_lens.load_model("gpt2")
    assert model.cfg.default_prepend_bos is True  # TransformerLens's rule, said so
