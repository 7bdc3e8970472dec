"""Shared pytest fixtures: tiny offline checkpoints and tiny HookedTransformers.

Everything runs offline: ``HF_HUB_OFFLINE=1`` is set before transformers is imported.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from checkpoints import ARCHITECTURES, build_checkpoint  # noqa: E402

from tuco_lens.backends import HAS_HOOKED_TRANSFORMER  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give every test its tier (:data:`TIERS`), and skip tests marked ``hooked`` when the installed
    transformer-lens has no HookedTransformer.

    Tests (or whole modules, ``pytestmark = pytest.mark.hooked``) that build tiny HookedTransformers
    from TransformerLens configs, or test HookedTransformer-only options, carry the ``hooked`` marker:
    they run with transformer-lens 3.x and are collected and reported as skipped with 4.x, where the
    rest of the suite runs on TransformerBridge models (including the Hugging Face reference tests
    of every architecture, test_reference.py, and the bridge tests, test_bridge.py). Such modules
    take ``HookedTransformer`` and ``HookedTransformerConfig`` from ``tuco_lens.backends`` (None on
    4.x), not from transformer_lens (an ImportError on 4.x), so that they still import there.
    """
    skip = pytest.mark.skip(reason="needs HookedTransformer (transformer-lens 3.x); this transformer-lens is 4.x")
    for item in items:
        if not any(item.get_closest_marker(tier) is not None for tier in TIERS):
            item.add_marker(pytest.mark.unit)  # a module that names no tier is a unit-test module
        if not HAS_HOOKED_TRANSFORMER and item.get_closest_marker("hooked") is not None:
            item.add_marker(skip)


#: The test tiers (pyproject's markers): ``unit`` (one part of tuco_lens against its definition or
#: an identity; the default of a module that names no tier), ``reference`` (tuco_lens against the
#: independent Hugging Face reference, tests/hf_reference.py) and ``integration`` (a whole workflow:
#: the command line, the app, notebooks, the demo report, several processes, Ray). A module names
#: its tier with ``pytestmark``; ``pytest -m unit`` runs the fastest tier.
TIERS = ("unit", "reference", "integration")


# The test models are tiny: one thread is faster than two (thread start-up dominates), and it
# keeps the suite from crawling when the 2-core machine is shared with other processes.
torch.set_num_threads(1)

# Directory names that would mislead name-based loaders: the loader must ignore names.
MISLEADING_NAMES = {
    "gpt2": ("meta-llama-Llama-2-7b-hf", "gemma-2b-it-sft"),
    "llama": ("gpt2-medium", "gemma-ft"),
    "llama3": ("Meta-Llama-3-8B", "llama-3-8b-instruct-dpo"),
    "mistral": ("llama-7b-hf", "my-llama-2-chat-sft"),
    "qwen2": ("google-gemma-7b", "codellama-qwen-merge"),
    "gpt_neox": ("pythia-llama-70m", "gpt2-sft"),
    "gemma": ("gemma-base", "gemma-ft"),
    "llama_chatml": ("SmolLM2-135M", "qwen2-0.5b-instruct-lora-merged"),
}


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Every test starts from the same torch RNG state."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_figure_show(monkeypatch: pytest.MonkeyPatch) -> None:
    """No library function may call ``Figure.show()`` (figures are returned, never shown)."""
    import plotly.graph_objects as go

    def refuse(*args, **kwargs):
        raise AssertionError("Figure.show() was called by the library")

    monkeypatch.setattr(go.Figure, "show", refuse)


@pytest.fixture(scope="session")
def checkpoint_pair(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Path, Path]]:
    """Factory: ``checkpoint_pair(arch, noise=0.2, perturb="blocks") -> (pt_dir, ft_dir)``.

    ``pt_dir`` holds a tiny random base model of architecture ``arch`` (one of
    ``checkpoints.ARCHITECTURES``) and its tokenizer; ``ft_dir`` the same model with Gaussian
    noise added to the decoder blocks (or all parameters with ``perturb="all"``). Directory
    names are deliberately misleading (a Mistral model in ``my-llama-2-chat-sft``...). Built
    once per session and argument combination.
    """
    root = tmp_path_factory.mktemp("checkpoints")
    cache: dict[tuple[str, float, str], tuple[Path, Path]] = {}

    def make(arch: str, noise: float = 0.2, perturb: str = "blocks") -> tuple[Path, Path]:
        key = (arch, noise, perturb)
        if key not in cache:
            pt_name, ft_name = MISLEADING_NAMES[arch]
            pt_dir = root / f"set{ARCHITECTURES.index(arch)}" / pt_name  # names may repeat
            if not (pt_dir / "config.json").exists():
                build_checkpoint(arch, pt_dir, seed=0)
            ft_dir = pt_dir.parent / f"{ft_name}-{perturb}-{noise:g}"
            build_checkpoint(arch, ft_dir, seed=1, base_dir=pt_dir, noise=noise, perturb=perturb)
            cache[key] = (pt_dir, ft_dir)
        return cache[key]

    return make


def available_backends() -> list[str]:
    """The model classes this transformer-lens offers: both on 3.x, the bridge only on 4.x."""
    from tuco_lens.backends import HAS_HOOKED_TRANSFORMER

    return ["hooked", "bridge"] if HAS_HOOKED_TRANSFORMER else ["bridge"]


@pytest.fixture(scope="session", params=available_backends())
def backend(request: pytest.FixtureRequest) -> str:
    """``"hooked"`` (HookedTransformer) or ``"bridge"`` (TransformerBridge), parametrized."""
    return request.param


@pytest.fixture(scope="session", params=ARCHITECTURES)
def arch_pair(request: pytest.FixtureRequest, checkpoint_pair) -> tuple[str, Path, Path]:
    """``(arch, pt_dir, ft_dir)`` for every architecture (parametrized)."""
    return (request.param, *checkpoint_pair(request.param))


@pytest.fixture(scope="module")
def pair_with_hf(arch_pair, backend):
    """``(arch, pair, hf_pt, hf_ft)``: the pair of every architecture on ``backend``, and the same two
    checkpoints as eager Hugging Face models (the independent reference of ``hf_reference``).
    Loaded once per test module."""
    from transformers import AutoModelForCausalLM

    import tuco_lens

    arch, pt_dir, ft_dir = arch_pair
    pair = tuco_lens.load_pair(str(pt_dir), str(ft_dir), backend=backend)
    hf = [AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval() for d in (pt_dir, ft_dir)]
    return arch, pair, hf[0], hf[1]


@pytest.fixture
def tiny_hooked() -> Callable[..., "HookedTransformer"]:  # noqa: F821
    """Factory: ``tiny_hooked(**cfg_overrides) -> HookedTransformer`` with random weights.

    Defaults: 2 layers, d_model 16, 4 heads of 4, d_mlp 32, n_ctx 32, d_vocab 128, LayerNorm,
    GELU. Any ``HookedTransformerConfig`` field can be overridden.
    """
    from tuco_lens.backends import HookedTransformer, HookedTransformerConfig

    def make(**overrides) -> HookedTransformer:
        options = dict(
            n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=32, n_ctx=32, d_vocab=128,
            act_fn="gelu", normalization_type="LN", device="cpu",
        )
        options.update(overrides)
        return HookedTransformer(HookedTransformerConfig(**options))

    return make


@pytest.fixture(scope="session")
def demo_pair():
    """The embedded demo pair (``tuco_lens.demo.load_pair()``), loaded once per session.

    Read-only by convention: tests that change the pair (hooks left behind, ``pair.scaled``
    outside a ``with``...) load their own.
    """
    from tuco_lens import demo

    return demo.load_pair()
