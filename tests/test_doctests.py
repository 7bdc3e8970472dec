"""Every docstring example in ``tuco_lens`` runs, and shows its real output.

One test per docstring that has ``>>>`` examples, found with :mod:`doctest` in every module
under ``tuco_lens/`` (``pkgutil.walk_packages``) and run with ``ELLIPSIS | NORMALIZE_WHITESPACE``.
The test ids are the docstrings' names (``tuco_lens.pair.TuCoPair.tuco``), so
``pytest tests/test_doctests.py -k TuCoPair.tuco`` runs one.

Each example runs in a fresh temporary working directory (files it writes stay there) and sees
its module's globals plus :data:`EXAMPLE_NAMES`, built once per session around the embedded demo
pair. Examples print rounded numbers (``round(x, 3)``) or shapes, so that their outputs agree on
both backends (HookedTransformer with transformer-lens 3.x, TransformerBridge with 4.x) and at
the oldest supported versions. Lines that cannot run offline (a model from the Hugging Face hub,
a GPU, starting the app's server) carry ``# doctest: +SKIP``; the rest of their example runs.

Docstrings that need an optional dependency are skipped, naming it, when it is not installed:
see :data:`OPTIONAL_MODULES` (the module does not import without it) and
:data:`OPTIONAL_DOCSTRINGS` and :data:`OPTIONAL_MODULE_EXAMPLES` (the module imports, the
examples need the package).
:data:`HOOKED_ONLY` examples are skipped with transformer-lens 4.x. The outputs are the same on
both backends (rounded where the last digits differ).

The examples share the session's pair: an example may run the models and hook them inside a
``with``, but must leave ``pair`` as it found it (and unregister what it registers).
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import tuco_lens
from tuco_lens.backends import HAS_HOOKED_TRANSFORMER

pytestmark = pytest.mark.integration  # test tier (tests/conftest.py, TIERS)

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

EXAMPLE_NAMES = {
    "torch": "the torch module",
    "np": "numpy",
    "tuco_lens": "the tuco_lens package",
    "demo": "tuco_lens.demo",
    "pair": "the demo pair, tuco_lens.demo.load_pair() (loaded once per session)",
    "pt_model": "pair.pt, the pre-trained model",
    "ft_model": "pair.ft, the fine-tuned model",
    "tokenizer": "pair.tokenizer (word-level, with a chat template)",
    "prompts": "two user requests for chat_template=True: one forbidden, one harmless",
    "tokens": "pair.tokenize(prompts[:1], chat_template=True).tokens, shape [1, pos]",
}
"""The names every example sees on top of its module's globals (what each holds)."""

OPTIONAL_MODULES = {
    "tuco_lens.app.layout": "gradio",
    "tuco_lens.app.server": "gradio",
}
"""Modules that import an optional dependency at import time -> that package."""

OPTIONAL_DOCSTRINGS = {
    "tuco_lens.app.require_gradio": "gradio",
    "tuco_lens.ray_data": "ray",
}
"""Docstrings of importable modules whose examples need an optional package -> that package."""

OPTIONAL_MODULE_EXAMPLES = {"tuco_lens.adapters": "peft"}
"""Modules (importable without it) every example of which needs an optional package -> that package."""

HOOKED_ONLY = {
    "tuco_lens.hooks.alpha_hooks",
    "tuco_lens.pair.TuCoPair.alpha_hooks",
}
"""Docstrings of HookedTransformer-only features (plain ``run_with_hooks`` α hooks): skipped
with transformer-lens 4.x, whose only backend is the TransformerBridge."""

PROMPTS = ["hello , describe the doomsalt .", "please , what do i need for the pancakes ?"]


def _find() -> dict[str, tuple[doctest.DocTest | None, str | None]]:
    """``{docstring name: (DocTest or None, optional package it needs or None)}``."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    found: dict[str, tuple[doctest.DocTest | None, str | None]] = {}
    names = ["tuco_lens"] + [info.name for info in pkgutil.walk_packages(tuco_lens.__path__, "tuco_lens.")]
    for name in names:
        if name.rsplit(".", 1)[-1] == "__main__":
            continue  # `python -m` entry points run on import
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            missing = OPTIONAL_MODULES.get(name)
            if missing is None or (e.name or "").split(".")[0] != missing:
                raise
            found[name] = (None, missing)
            continue
        for test in finder.find(module, name):
            if test.examples:
                assert test.name not in found, f"two docstrings named {test.name}"
                found[test.name] = (test, OPTIONAL_DOCSTRINGS.get(test.name, OPTIONAL_MODULE_EXAMPLES.get(name)))
    return found


DOCTESTS = _find()


@pytest.fixture(scope="session")
def example_globals(demo_pair) -> dict:
    """:data:`EXAMPLE_NAMES`, around the session's demo pair."""
    import numpy as np
    import torch

    from tuco_lens import demo

    names = {
        "torch": torch,
        "np": np,
        "tuco_lens": tuco_lens,
        "demo": demo,
        "pair": demo_pair,
        "pt_model": demo_pair.pt,
        "ft_model": demo_pair.ft,
        "tokenizer": demo_pair.tokenizer,
        "prompts": list(PROMPTS),
        "tokens": demo_pair.tokenize(PROMPTS[:1], chat_template=True).tokens,
    }
    assert set(names) == set(EXAMPLE_NAMES)
    return names


def test_every_module_is_searched():
    assert {"tuco_lens", "tuco_lens.pair.TuCoPair.tuco", "tuco_lens.demo.world.render_chat"} <= set(DOCTESTS)
    assert all(name.startswith("tuco_lens") for name in DOCTESTS)


@pytest.mark.parametrize("name", sorted(DOCTESTS))
def test_docstring_examples(name, example_globals, tmp_path, monkeypatch):
    test, requires = DOCTESTS[name]
    if requires is not None:
        pytest.importorskip(requires, reason=f"{name} needs the optional package {requires!r}")
    assert test is not None
    if name in HOOKED_ONLY and not HAS_HOOKED_TRANSFORMER:
        pytest.skip(f"{name} is HookedTransformer-only (transformer-lens 3.x); this is 4.x")
    monkeypatch.chdir(tmp_path)
    globs = {**test.globs, **example_globals, "prompts": list(PROMPTS)}  # fresh for every run
    test = doctest.DocTest(test.examples, globs, test.name, test.filename, test.lineno, test.docstring)
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    result = runner.run(test, out=report.append)
    if result.failed:
        pytest.fail("".join(report), pytrace=False)
