"""TransformerBridge fast paths: Hugging Face's own attention and norms, and the last-token path.

``tuco_lens.backends.native_modules`` runs each attention and norm bridge's wrapped Hugging Face
module (attention with SDPA for models loaded by tuco_lens) instead of the bridge's own
recomputation, unless a hook needs the bridge's path; ``BridgeBackend.call_pt_block_at_last_token``
runs a pre-trained layer at the last position only (keys and values at every position). Both are
checked here against the plain computation on every architecture; ``test_reference.py`` checks
the verbs that use them against the independent Hugging Face reference, with and without the
native attention.

Tolerances (float32 models): 1e-5 absolute on logits and block outputs at real tokens (SDPA and
the eager softmax sum in a different order: about 2e-6 seen on these models), 1e-6 on TuCo.
Padding positions attend to nothing; their values differ between the two attention paths and are
never compared.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tuco_lens
from hf_reference import reference_decomposition
from tuco_lens.backends import BlockCall, BridgeBackend, native_modules

pytestmark = pytest.mark.reference  # test tier (tests/conftest.py, TIERS)

PROMPTS = ["the cat sat on the mat", "hello", "a dog and a bird went to the river today"]
TOL = dict(atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def bridge(arch_pair):
    arch, pt_dir, ft_dir = arch_pair
    return arch, tuco_lens.load_pair(str(pt_dir), str(ft_dir), backend="bridge")


@contextlib.contextmanager
def hugging_face_attention_calls(*models) -> Iterator[list[int]]:
    """Thread ids of every call of a wrapped Hugging Face attention module (the fast path only)."""
    calls: list[int] = []
    handles = [
        block.attn.original_component.register_forward_hook(lambda *a: calls.append(threading.get_ident()))
        for model in models for block in model.blocks
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _no_full_blocks(monkeypatch) -> None:
    """Make the ordinary pre-trained block call fail: whatever passes ran the last-token path."""

    def refuse(*args, **kwargs):
        raise AssertionError("a pre-trained block ran at every position")

    monkeypatch.setattr(BridgeBackend, "call_pt_block", refuse)


def test_fast_forward_equals_the_bridge_attention(bridge):
    arch, pair = bridge
    batch = pair.tokenize(PROMPTS)
    real = batch.attention_mask.bool()
    with torch.no_grad(), hugging_face_attention_calls(pair.ft) as calls:
        eager = pair.ft(batch.tokens, attention_mask=batch.attention_mask)
        assert calls == []
        with native_modules(pair.ft):
            fast = pair.ft(batch.tokens, attention_mask=batch.attention_mask)
        assert len(calls) == pair.n_layers
    torch.testing.assert_close(fast[real], eager[real], **TOL)
    assert "forward" not in pair.ft.blocks[0].attn.__dict__  # the override is gone on exit


def test_a_pattern_hook_gets_the_eager_pattern(bridge):
    arch, pair = bridge
    batch = pair.tokenize(PROMPTS)
    real = batch.attention_mask.bool()
    seen = []

    def keep(pattern, hook):
        seen.append(pattern)

    with torch.no_grad():
        eager = pair.ft(batch.tokens, attention_mask=batch.attention_mask)
        with native_modules(pair.ft), hugging_face_attention_calls(pair.ft) as calls:
            got = pair.ft.run_with_hooks(
                batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=[("blocks.0.attn.hook_pattern", keep)]
            )
            _, cache = pair.ft.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    assert len(calls) == pair.n_layers - 1  # layer 0 ran eagerly for its hook; run_with_cache: all eager
    b, p = batch.tokens.shape
    assert tuple(seen[0].shape) == (b, pair.ft.cfg.n_heads, p, p)
    torch.testing.assert_close(seen[0].sum(-1)[real[:, None, :].expand(-1, pair.ft.cfg.n_heads, -1)],
                               torch.ones(()).expand(int(real.sum()) * pair.ft.cfg.n_heads), **TOL)
    assert all(f"blocks.{l}.attn.hook_pattern" in cache.cache_dict for l in range(pair.n_layers))
    torch.testing.assert_close(got[real], eager[real], **TOL)


def test_norms_run_natively_unless_their_hooks_are_used(bridge, monkeypatch):
    arch, pair = bridge
    batch = pair.tokenize(PROMPTS)
    real = batch.attention_mask.bool()
    norm_class = type(pair.ft.blocks[0].ln1)
    bridge_calls, scales = [], []
    bridge_forward = norm_class.forward

    def counting(self, *args, **kwargs):
        bridge_calls.append(self)
        return bridge_forward(self, *args, **kwargs)

    monkeypatch.setattr(norm_class, "forward", counting)
    with torch.no_grad():
        plain = pair.ft(batch.tokens, attention_mask=batch.attention_mask)
        assert len(bridge_calls) >= pair.n_layers + 1
        bridge_calls.clear()
        with native_modules(pair.ft):
            native = pair.ft(batch.tokens, attention_mask=batch.attention_mask)
            assert bridge_calls == []  # every norm ran Hugging Face's own forward
            hooked = pair.ft.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask,
                                            fwd_hooks=[("blocks.0.ln1.hook_scale", lambda t, hook: scales.append(t))])
    assert bridge_calls == [pair.ft.blocks[0].ln1]  # only the hooked norm took the bridge's path
    assert len(scales) == 1 and tuple(scales[0].shape) == (*batch.tokens.shape, 1)
    torch.testing.assert_close(native[real], plain[real], **TOL)
    torch.testing.assert_close(hooked[real], plain[real], **TOL)


def test_other_threads_keep_the_bridge_attention(bridge):
    arch, pair = bridge
    tokens = pair.tokenize(PROMPTS[:1]).tokens
    inside, done = threading.Event(), threading.Event()

    def hold():
        with native_modules(pair.ft):
            inside.set()
            done.wait(30)

    holder = threading.Thread(target=hold)
    with torch.no_grad(), hugging_face_attention_calls(pair.ft) as calls:
        holder.start()
        inside.wait(30)
        pair.ft(tokens)  # this thread is not inside the context
        done.set()
        holder.join()
    assert calls == []


def test_the_verbs_run_hugging_face_attention(bridge):
    arch, pair = bridge
    with hugging_face_attention_calls(pair.pt, pair.ft) as calls:
        pair.decompose(PROMPTS)
        assert len(calls) == 2 * pair.n_layers
        pair.run_with_alpha(PROMPTS, 0.5)
        assert len(calls) == 4 * pair.n_layers
        pair.generate(PROMPTS, alpha=0.5, max_new_tokens=2, stop_at_eos=False)
        assert len(calls) == 8 * pair.n_layers
    assert calls and set(calls) == {threading.get_ident()}


def test_a_permanent_pattern_hook_keeps_its_layer_eager(bridge):
    arch, pair = bridge
    fast = pair.tuco(PROMPTS)
    patterns = []
    point = pair.ft.blocks[0].attn.hook_pattern
    point.add_hook(lambda pattern, hook: patterns.append(pattern.shape), is_permanent=True)
    try:
        with hugging_face_attention_calls(pair.ft) as calls:
            got = pair.tuco(PROMPTS)
    finally:
        point.remove_hooks(including_permanent=True)
    assert len(patterns) == 1 and len(calls) == pair.n_layers - 1
    torch.testing.assert_close(got, fast, atol=1e-6, rtol=0)


def test_float64_bridges_keep_the_exact_eager_attention(checkpoint_pair):
    pt_dir, ft_dir = checkpoint_pair("llama")
    pair = tuco_lens.load_pair(str(pt_dir), str(ft_dir), backend="bridge", dtype="float64")
    with hugging_face_attention_calls(pair.pt, pair.ft) as calls:
        scores = pair.tuco(PROMPTS)
    assert calls == [] and bool(torch.isfinite(scores).all())


def _first_block_call(pair, batch) -> tuple[BlockCall, torch.Tensor]:
    recorded = {}

    def record(module, args, kwargs):
        recorded["call"] = BlockCall(args, dict(kwargs))
        recorded["x"] = args[0] if args else kwargs["hidden_states"]

    handle = pair.ft.blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        pair.backend.forward(batch.tokens, batch.attention_mask, logits=False)
    finally:
        handle.remove()
    return recorded["call"], recorded["x"]


@pytest.mark.parametrize("attention", ["fast", "eager"])
def test_last_token_block_equals_the_full_block(bridge, attention):
    arch, pair = bridge
    batch = pair.tokenize(PROMPTS)  # left padded: the last position is every row's last real token
    context = native_modules(pair.pt, pair.ft) if attention == "fast" else contextlib.nullcontext()
    with torch.no_grad(), context:
        call, x = _first_block_call(pair, batch)
        block = pair.pt.blocks[0]
        full = pair.backend.call_pt_block(block, 0, call, x, 0)
        last = pair.backend.call_pt_block_at_last_token(block, call, x)
    assert tuple(last.shape) == (x.shape[0], 1, x.shape[2])
    torch.testing.assert_close(last, full[:, -1:], **TOL)


def test_tuco_runs_the_last_token_path(bridge, monkeypatch):
    arch, pair = bridge
    full = pair.decompose(PROMPTS)
    assert pair.backend.supports_last_token_path()
    _no_full_blocks(monkeypatch)
    torch.testing.assert_close(pair.tuco(PROMPTS), full.tuco, atol=1e-6, rtol=0)


def test_component_attribution_runs_the_last_token_path(bridge, monkeypatch):
    arch, pair = bridge
    with monkeypatch.context() as m:
        m.setattr(BridgeBackend, "supports_last_token_path", lambda self: False)
        full = pair.logit_attribution(PROMPTS, components=True)
    _no_full_blocks(monkeypatch)
    last = pair.logit_attribution(PROMPTS, components=True)
    assert set(last.direct) == set(full.direct) >= {"ftc_attn", "ftc_mlp", "ftc_mlp_via_attn", "ftc_head_bias"}
    for part, value in full.direct.items():
        torch.testing.assert_close(last.direct[part], value, **TOL)
    torch.testing.assert_close(last.head_normed, full.head_normed, **TOL)


def test_an_unknown_layer_argument_runs_the_full_block(checkpoint_pair):
    pt_dir, ft_dir = checkpoint_pair("llama")
    pair = tuco_lens.load_pair(str(pt_dir), str(ft_dir), backend="bridge")
    batch = pair.tokenize(PROMPTS)
    with torch.no_grad():
        call, x = _first_block_call(pair, batch)
        extra = BlockCall(call.args, {**call.kwargs, "unknown_positions": torch.zeros(x.shape[:2])})
        out = pair.backend.call_pt_block_at_last_token(pair.pt.blocks[0], extra, x)
        full = pair.backend.call_pt_block(pair.pt.blocks[0], 0, call, x, 0)
    assert out.shape == full.shape
    torch.testing.assert_close(out, full, **TOL)


@pytest.fixture(scope="module")
def sliding_window_dirs(checkpoint_pair, tmp_path_factory) -> tuple[Path, Path]:
    """The Mistral checkpoints with a 3-token sliding window (every later query sees 3 keys)."""
    root = tmp_path_factory.mktemp("sliding")
    out = []
    for d in checkpoint_pair("mistral"):
        model = AutoModelForCausalLM.from_pretrained(d)
        model.config.sliding_window = 3
        model.save_pretrained(root / d.name)
        AutoTokenizer.from_pretrained(d).save_pretrained(root / d.name)
        out.append(root / d.name)
    return out[0], out[1]


def test_sliding_window_matches_reference_on_both_fast_paths(sliding_window_dirs, monkeypatch):
    pt_dir, ft_dir = sliding_window_dirs
    pair = tuco_lens.load_pair(str(pt_dir), str(ft_dir), backend="bridge")
    assert pair.ft.original_model.config.sliding_window == 3
    hf = [AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval() for d in (pt_dir, ft_dir)]
    batch = pair.tokenize(PROMPTS)
    ref = reference_decomposition(hf[0], hf[1], batch.tokens, batch.attention_mask)
    dec = pair.decompose(PROMPTS)
    torch.testing.assert_close(dec.tuco.double(), ref["tuco"], atol=1e-4, rtol=1e-4)
    _no_full_blocks(monkeypatch)
    torch.testing.assert_close(pair.tuco(PROMPTS).double(), ref["tuco"], atol=1e-4, rtol=1e-4)
    wide = [AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", sliding_window=None).eval()
            for d in (pt_dir, ft_dir)]
    assert float((reference_decomposition(wide[0], wide[1], batch.tokens, batch.attention_mask)["tuco"]
                  - ref["tuco"]).abs().max()) > 1e-3  # the window matters for these prompts
