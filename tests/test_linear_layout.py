"""``tuco_lens.backends.linear_layout``: HookedTransformer weights stored as its forward pass reads them.

TransformerLens 3.9 copies weights into ``F.linear``'s layout on every call (``W.T.contiguous()``
in gated MLPs and the unembedding, a rearrange of the attention weights), which made generation
an order of magnitude slower than Hugging Face's. Inside ``linear_layout`` those copies are
no-ops; the numbers must be bit for bit the same, and every weight must be as before afterwards.
The speed-up itself is measured by benchmarks/bench_generation.py, not here. HookedTransformer
only (transformer-lens 3.x: the ``hooked`` marker).
"""

from __future__ import annotations

import pytest
import torch

import tuco_lens
from tiny_models import KINDS, make_pair, random_tokens
from tuco_lens.backends import linear_layout
from tuco_lens.backends.hooked import _layout_plan
from tuco_lens.generation import generate_tokens
from tuco_lens.inputs import TokenBatch

pytestmark = pytest.mark.hooked  # tiny HookedTransformers: transformer-lens 3.x only (skipped on 4.x)


def _state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind", KINDS)
def test_numbers_are_bit_for_bit_the_same(kind, monkeypatch):
    pt, ft = make_pair(kind)
    tokens = random_tokens(3, 9)
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0
    pair = tuco_lens.TuCoPair(pt, ft)
    batch = TokenBatch(tokens, mask)
    gen = dict(max_new_tokens=5, stop_at_eos=False)

    def run():
        with torch.no_grad(), linear_layout(ft):
            logits = ft(tokens, attention_mask=mask)
        return (
            logits,
            generate_tokens(ft, batch, **gen),
            pair.generate(tokens, attention_mask=mask, alpha=0.5, return_type="tokens", **gen),
        )

    fast = run()
    monkeypatch.setattr(tuco_lens.backends.hooked, "_layout_plan", lambda model: [])  # TransformerLens's own copies
    plain = run()
    assert all(torch.equal(a, b) for a, b in zip(fast, plain))


def test_inside_the_copies_are_no_ops_and_afterwards_weights_are_as_before():
    _, ft = make_pair("llama")  # gated MLP, grouped-query attention
    state = _state(ft)
    params = dict(ft.named_parameters())
    plan = _layout_plan(ft)
    names = {n for n, p in params.items() for w, _ in plan if p is w}
    assert {"blocks.0.mlp.W_gate", "blocks.0.mlp.W_out", "blocks.0.attn.W_Q", "blocks.0.attn._W_K", "blocks.0.attn.W_O", "unembed.W_U"} <= names
    with linear_layout(ft):
        for weight, order in plan:
            assert weight.permute(order).is_contiguous()  # what TransformerLens copies into, already
        mlp = ft.blocks[0].mlp
        assert mlp.W_gate.T.contiguous().data_ptr() == mlp.W_gate.data_ptr()  # no copy
        assert dict(ft.named_parameters())["blocks.0.mlp.W_gate"] is params["blocks.0.mlp.W_gate"]
    assert all(p.is_contiguous() for p in ft.parameters())
    assert all(torch.equal(p, state[n]) for n, p in ft.named_parameters())


def test_reentrant_exception_safe_and_inference_mode_safe():
    pt, ft = make_pair("llama")
    with pytest.raises(RuntimeError, match="boom"):
        with linear_layout(pt, ft):
            with linear_layout(ft):  # nested: nothing more to do, nothing undone early
                pass
            assert not ft.blocks[0].mlp.W_gate.is_contiguous()
            raise RuntimeError("boom")
    assert all(p.is_contiguous() for p in (*pt.parameters(), *ft.parameters()))
    pair = tuco_lens.TuCoPair(pt, ft)
    with torch.inference_mode():
        pair.generate(random_tokens(1, 4), alpha=0.5, max_new_tokens=2, return_type="tokens")
    assert not any(p.is_inference() for p in (*pt.parameters(), *ft.parameters()))
    loss = ft(random_tokens(1, 4), return_type="loss")  # weights still usable for training
    loss.backward()
    assert ft.blocks[0].mlp.W_gate.grad is not None


def test_bridges_are_left_as_they_are(checkpoint_pair):
    pt_dir, _ = checkpoint_pair("llama")
    bridge = tuco_lens.load_model(str(pt_dir), backend="bridge")
    pointers = [p.data_ptr() for p in bridge.parameters()]
    with linear_layout(bridge):
        assert [p.data_ptr() for p in bridge.parameters()] == pointers
