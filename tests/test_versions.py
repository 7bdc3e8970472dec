"""Dependency versions: cached generation is exact or refused, never silently wrong.

transformers 5.24 renamed the keyword under which decoder layers hand the KV cache to their
attention modules (``past_key_values`` -> ``cache``); TransformerLens's attention bridges read
only the old name, so cached bridge generation attended to the newest token alone.
``tuco_lens.backends.repair_cache_keyword`` fixes that, and every cached step checks that the
caches grew. These tests run in every CI environment (the newest included, where they gate).
"""

from __future__ import annotations

import re
import warnings
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

import tuco_lens
from tuco_lens import demo, versions
from tuco_lens.backends.bridge import AttentionBridge
from tuco_lens.errors import UnsupportedVersionsError

pytestmark = pytest.mark.integration  # test tier (tests/conftest.py, TIERS)

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["the cat sat on the mat", "hello", "a dog and a bird went to the river"]


@pytest.fixture(scope="module", params=["llama", "gpt2", "gpt_neox"])
def bridge_pair(request, checkpoint_pair):
    pt_dir, ft_dir = checkpoint_pair(request.param)
    return tuco_lens.load_pair(str(pt_dir), str(ft_dir), backend="bridge")


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_cached_bridge_generation_equals_uncached(bridge_pair, alpha):
    kwargs = dict(alpha=alpha, max_new_tokens=6, stop_at_eos=False, return_type="tokens")
    cached = bridge_pair.generate(PROMPTS, use_past_kv_cache=True, **kwargs)
    uncached = bridge_pair.generate(PROMPTS, use_past_kv_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] == bridge_pair.tokenize(PROMPTS).tokens.shape[1] + 6


def test_cached_generation_is_exact_or_refused(bridge_pair):
    """The promise for any versions (CI's newest environment gates on this test alone).

    Elsewhere the suite demands exactness on the tested versions; here a refusal with
    UnsupportedVersionsError is also acceptable, a silently different generation is not.
    """
    kwargs = dict(alpha=0.5, max_new_tokens=6, stop_at_eos=False, return_type="tokens")
    uncached = bridge_pair.generate(PROMPTS, use_past_kv_cache=False, **kwargs)
    try:
        cached = bridge_pair.generate(PROMPTS, use_past_kv_cache=True, **kwargs)
    except UnsupportedVersionsError as error:
        pytest.skip(f"refused, as promised: {error}")
    assert torch.equal(cached, uncached)


def test_the_bridges_own_cached_generate_equals_uncached(bridge_pair):
    """TransformerBridge.generate itself (outside tuco_lens) is repaired on transformers >= 5.24."""
    tokens = bridge_pair.ft.to_tokens(PROMPTS[0])
    kwargs = dict(max_new_tokens=6, do_sample=False, verbose=False)
    cached = bridge_pair.ft.generate(tokens, use_past_kv_cache=True, **kwargs)
    uncached = bridge_pair.ft.generate(tokens, use_past_kv_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_demo_pair_refuses_through_the_cached_bridge():
    """The issue's reproduction: on the bridge, the fine-tuned demo model refuses with the cache."""
    pair = demo.load_pair(backend="bridge")
    harmful = demo.prompt_sets()["harmful"][:6]
    cached = pair.generate(harmful, alpha=1.0, max_new_tokens=8)
    assert cached == pair.generate(harmful, alpha=1.0, max_new_tokens=8, use_past_kv_cache=False)
    assert all(text.startswith(demo.REFUSAL[:20]) for text in cached), cached


def _ignore_the_cache(module, args, kwargs):
    """An attention module that never sees its cache: the failure of transformers 5.24."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "layer_past")}
    return args, kwargs


def test_a_cache_the_attention_ignores_is_refused(checkpoint_pair):
    pt_dir, ft_dir = checkpoint_pair("llama")
    pair = tuco_lens.load_pair(str(pt_dir), str(ft_dir), backend="bridge")
    handles = [
        module.register_forward_pre_hook(_ignore_the_cache, with_kwargs=True)
        for model in (pair.pt, pair.ft)
        for module in model.modules()
        if isinstance(module, AttentionBridge)
    ]
    try:
        with pytest.raises(UnsupportedVersionsError, match=r"did not record this step.*Installed: torch"):
            pair.generate(PROMPTS, max_new_tokens=3)
        with pytest.raises(UnsupportedVersionsError, match="use_past_kv_cache=False"):
            with pair.scaled(0.5):
                pair.ft.generate(pair.ft.to_tokens(PROMPTS[0]), max_new_tokens=3, verbose=False)
        # the uncached path never needed the cache
        assert pair.generate(PROMPTS, max_new_tokens=3, use_past_kv_cache=False)
    finally:
        for handle in handles:
            handle.remove()


def test_known_broken_versions_are_refused(checkpoint_pair, monkeypatch):
    pt_dir, ft_dir = checkpoint_pair("llama")
    pt = tuco_lens.load_model(str(pt_dir), backend="bridge")
    ft = tuco_lens.load_model(str(ft_dir), backend="bridge")
    installed = version("transformers")
    broken = versions.KnownBroken(
        "transformers", f"=={installed}", "TransformerBridge", "a test break.", "pip install transformers==5.23.0"
    )
    monkeypatch.setattr(versions, "KNOWN_BROKEN", (broken,))
    with pytest.raises(UnsupportedVersionsError, match=rf"transformers {re.escape(installed)}.*a test break.*Fix: pip install"):
        tuco_lens.TuCoPair(pt, ft)
    # a break of the other backend does not refuse this one
    monkeypatch.setattr(versions, "KNOWN_BROKEN", (versions.KnownBroken("transformers", f"=={installed}", "HookedTransformer", "x", "y"),))
    tuco_lens.TuCoPair(pt, ft)


def test_untested_versions_warn_once(monkeypatch):
    monkeypatch.setattr(versions, "TESTED", {"transformers": ("0.1", "0.2")})
    monkeypatch.setattr(versions, "_warned", set())
    with pytest.warns(versions.UntestedVersionsWarning, match=r"transformers .* \(tested: 0.1 to 0.2\)"):
        versions.check_versions("TransformerBridge")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        versions.check_versions("TransformerBridge")  # once per combination


def _locked(path: Path) -> dict[str, Version]:
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if match:
            pins[match.group(1).lower()] = Version(match.group(2))
    return pins


def test_tested_ranges_are_the_constraint_files():
    """versions.TESTED names exactly the ends CI installs (constraints/*.txt)."""
    locks = [_locked(ROOT / "constraints" / name) for name in ("oldest.txt", "pinned.txt", "pinned-tl4.txt")]
    for name, (oldest, newest) in versions.TESTED.items():
        found = [lock[name] for lock in locks]
        assert (str(min(found)), str(max(found))) == (oldest, newest), name


def test_declared_lower_bounds_are_installed_by_the_oldest_environment():
    """Every runtime dependency's lower bound in pyproject.toml is what constraints/oldest.txt installs."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    oldest = _locked(ROOT / "constraints" / "oldest.txt")
    for spec in project["dependencies"] + project["optional-dependencies"]["adapters"]:
        requirement = Requirement(spec)
        lower = [s.version for s in requirement.specifier if s.operator == ">="]
        assert lower, f"{spec} has no lower bound"
        assert oldest[requirement.name.lower()] == Version(lower[0]), spec
        if requirement.name in versions.TESTED:  # the libraries whose internals tuco_lens uses
            assert any(s.operator == "<" for s in requirement.specifier), f"{spec} needs an upper bound"
