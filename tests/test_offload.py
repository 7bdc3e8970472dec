"""Offloading the pre-trained model (``offload_pt=True``) and per-block device placement checks.

These machines have no accelerator, so moving blocks is checked with a recording stand-in and
the numbers with both models on the CPU (where offloading must change nothing).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tuco_lens import IncompatiblePairError, TuCoPair, compatibility
from tuco_lens.hooks import placed
from tiny_models import make_pair, random_tokens

pytestmark = pytest.mark.hooked  # tiny HookedTransformers: transformer-lens 3.x only (skipped on 4.x)


@pytest.fixture(scope="module")
def models():
    return make_pair("llama", noise=0.3)


def test_offloaded_pair_gives_the_same_numbers(models):
    plain, offloaded = TuCoPair(*models), TuCoPair(*models, offload_pt=True)
    tokens = random_tokens(3, 8, seed=1)
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    assert torch.equal(offloaded.tuco(tokens, attention_mask=mask), plain.tuco(tokens, attention_mask=mask))
    a, b = offloaded.decompose(tokens, attention_mask=mask), plain.decompose(tokens, attention_mask=mask)
    assert torch.equal(a.beta.nan_to_num(), b.beta.nan_to_num())
    assert torch.equal(offloaded.run_with_alpha(tokens, 0.5, attention_mask=mask), plain.run_with_alpha(tokens, 0.5, attention_mask=mask))
    assert torch.equal(
        offloaded.generate(tokens, attention_mask=mask, alpha=0.5, max_new_tokens=5, return_type="tokens"),
        plain.generate(tokens, attention_mask=mask, alpha=0.5, max_new_tokens=5, return_type="tokens"),
    )
    _, cache = offloaded.ft.run_with_cache(tokens, attention_mask=mask, names_filter=offloaded.resid_names)
    assert torch.equal(offloaded.decompose(cache, tokens=tokens, attention_mask=mask).tuco, plain.decompose(cache, tokens=tokens, attention_mask=mask).tuco)
    hooks = offloaded.ft.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=offloaded.alpha_hooks(0.5, attention_mask=mask))
    torch.testing.assert_close(hooks, plain.run_with_alpha(tokens, 0.5, attention_mask=mask))


class RecordingBlock(torch.nn.Module):
    """Reports its parameters on ``home`` and records every ``.to(device)``."""

    def __init__(self, home: str) -> None:
        super().__init__()
        self.device = torch.device(home)
        self.moves: list[str] = []

    def parameters(self, recurse: bool = True):
        return iter([SimpleNamespace(device=self.device)])

    def to(self, device):
        self.moves.append(str(device))
        self.device = torch.device(device)
        return self


def test_placed_moves_one_block_there_and_back_even_after_an_error():
    block = RecordingBlock("cpu")
    with placed(block, torch.device("cuda:1"), move=True) as (same, device):
        assert same is block and str(device) == "cuda:1" and block.moves == ["cuda:1"]
    assert block.moves == ["cuda:1", "cpu"]
    with pytest.raises(RuntimeError, match="inside"):
        with placed(block, torch.device("cuda:0"), move=True):
            raise RuntimeError("inside")
    assert block.moves[-2:] == ["cuda:0", "cpu"]
    with placed(block, torch.device("cuda:0"), move=False) as (_, device):
        assert str(device) == "cpu"  # without offloading the block runs where it lives
    assert len(block.moves) == 4


def test_device_placement_is_compared_block_by_block(models, monkeypatch):
    pt, ft = models
    devices = {id(pt): [{torch.device("cuda", 0)}] * 2 + [{torch.device("cuda", 1)}],
               id(ft): [{torch.device("cuda", 0)}] + [{torch.device("cuda", 1)}] * 2}
    monkeypatch.setattr(compatibility, "_block_devices", lambda model: devices[id(model)])
    with pytest.raises(IncompatiblePairError, match=r"pre-trained block 1 is on \['cuda:0'\].*1 block\(s\) differ.*same n_devices"):
        TuCoPair(pt, ft)


def test_offloading_skips_the_device_comparison(models, monkeypatch):
    pt, ft = models
    sets = {id(pt): {torch.device("cpu")}, id(ft): {torch.device("cuda", 0)}}
    original = compatibility._parameter_set
    monkeypatch.setattr(
        compatibility, "_parameter_set",
        lambda model, attribute: sets[id(model)] if attribute == "device" else original(model, attribute),
    )
    with pytest.raises(IncompatiblePairError, match="offload_pt=True"):
        TuCoPair(pt, ft)
    TuCoPair(pt, ft, offload_pt=True)  # accepted
