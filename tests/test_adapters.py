"""PEFT adapters as fine-tuned models (tuco_lens.adapters, the adapter route of load_pair).

Adapters are made offline with peft on top of the tiny checkpoints of ``checkpoints.py``, with
non-trivial weights (LoRA's B starts at zero, IA3's vectors at one: both are randomized). The
reference is independent of the merge: ``hf_reference.reference_decomposition`` on the base
model vs the **unmerged** ``PeftModel`` (the adapter runs as extra modules in the forward pass),
and, for LoRA, merged weights are checked against ``W + (alpha / r) B A`` computed by hand from
the saved adapter file.
"""

from __future__ import annotations

import json
import shutil
import sys

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import tuco_lens
from hf_reference import decoder_layers, reference_decomposition
from tuco_lens import adapters
from tuco_lens.errors import InputError, ModelLoadError
from tuco_lens.loading import load_model

pytestmark = pytest.mark.reference  # test tier (tests/conftest.py, TIERS)

PROMPTS = ["the cat sat on the mat", "hello", "a dog and a bird went to the river today"]
TOL = dict(atol=1e-4, rtol=1e-4)  # as tests/test_reference.py
RANK, LORA_ALPHA = 4, 8
SCALE = LORA_ALPHA / RANK

LAYERS = {"llama": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}
LINEAR_CASES = [  # (arch, adapted map, is FTC_l = s B A z_l?)
    ("llama", "mlp.down_proj", True),       # the block's last linear map
    ("gpt2", "mlp.c_proj", True),           # the same with GPT-2's Conv1D
    ("gpt_neox", "attention.dense", True),  # parallel block: no MLP reads the attention output
    ("llama", "self_attn.o_proj", False),   # sequential block: the MLP reads the changed stream
]
LORA_TARGETS = {  # attention and MLP projections of each architecture
    "llama": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
}


def _hf(directory, **kwargs):
    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", **kwargs).eval()


def _randomize_adapter(model, seed: int, scale: float) -> None:
    """Add noise to every trainable (adapter) parameter so the fine-tune is far from the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))


def _save_adapter(base_dir, config, directory, *, seed: int = 0, noise: float = 0.0):
    model = peft.get_peft_model(_hf(base_dir), config)
    if noise:
        _randomize_adapter(model, seed, noise)
    model.save_pretrained(directory)
    return directory


def _lora(arch, **kwargs):
    if "target_modules" not in kwargs:
        kwargs["target_modules"] = LORA_TARGETS[arch]
    kwargs.setdefault("fan_in_fan_out", arch == "gpt2")  # GPT-2's Conv1D stores [in, out]
    return peft.LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, init_lora_weights=False, **kwargs)


@pytest.fixture(scope="module")
def bases(checkpoint_pair):
    return {arch: checkpoint_pair(arch)[0] for arch in ("llama", "gpt2")}


@pytest.fixture(scope="module")
def adapter_dirs(bases, tmp_path_factory):
    """``{name: (arch, base_dir, adapter_dir)}`` for every adapter the tests use."""
    root = tmp_path_factory.mktemp("adapters")
    llama, gpt2 = bases["llama"], bases["gpt2"]
    specs = {
        "lora-llama": ("llama", _lora("llama"), 0.0),
        "lora-gpt2": ("gpt2", _lora("gpt2"), 0.0),
        "ia3-gpt2": (
            "gpt2",
            peft.IA3Config(
                target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True
            ),
            0.3,  # IA3 starts as the identity (scales of one)
        ),
        "loha-llama": (
            "llama",
            peft.LoHaConfig(
                r=RANK, alpha=LORA_ALPHA, target_modules=["q_proj", "v_proj", "up_proj"], init_weights=False
            ),
            0.0,
        ),
        "lokr-llama": (
            "llama",
            peft.LoKrConfig(r=RANK, alpha=LORA_ALPHA, target_modules=["k_proj", "gate_proj"], init_weights=False),
            0.0,
        ),
        "dora-llama": ("llama", _lora("llama", target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True), 0.0),
        "lora-layer1-llama": ("llama", _lora("llama", layers_to_transform=[1]), 0.0),
    }
    out = {}
    for name, (arch, config, noise) in specs.items():
        base = llama if arch == "llama" else gpt2
        out[name] = (arch, base, _save_adapter(base, config, root / name, seed=len(out), noise=noise))
    return out


def _reference(base_dir, adapter_dir, batch, **kwargs):
    """TuCo on the base model vs the unmerged PeftModel (independent of tuco_lens and of merging)."""
    unmerged = peft.PeftModel.from_pretrained(_hf(base_dir), str(adapter_dir)).eval()
    ft = unmerged.base_model.model  # the HF model with the adapter modules inside, unmerged
    return reference_decomposition(_hf(base_dir), ft, batch.tokens, batch.attention_mask, **kwargs)


def _assert_matches(dec, ref):
    torch.testing.assert_close(dec.tuco.double(), ref["tuco"], **TOL)
    torch.testing.assert_close(dec.tuco_per_token.double(), ref["tuco_per_token"], equal_nan=True, **TOL)
    torch.testing.assert_close(dec.beta.double(), ref["beta"], equal_nan=True, **TOL)
    scale = float(ref["ptc_norm"].nan_to_num().abs().max())
    torch.testing.assert_close(dec.ptc_norm.double() / scale, ref["ptc_norm"] / scale, equal_nan=True, **TOL)
    torch.testing.assert_close(dec.ftc_norm.double() / scale, ref["ftc_norm"] / scale, equal_nan=True, **TOL)
    torch.testing.assert_close(dec.ftc_sum.double() / scale, ref["ftc_sum"] / scale, **TOL)
    assert float(ref["tuco"].min()) > 1e-2  # the adapter is visible: a non-trivial comparison


# ------------------------------------------------------------------------------------------- TuCo
@pytest.mark.parametrize(
    "name", ["lora-llama", "lora-gpt2", "ia3-gpt2", "loha-llama", "lokr-llama", "dora-llama", "lora-layer1-llama"]
)
def test_adapter_dir_matches_reference(adapter_dirs, name):
    arch, base_dir, adapter_dir = adapter_dirs[name]
    pair = tuco_lens.load_pair(str(base_dir), str(adapter_dir))
    batch = pair.tokenize(PROMPTS)
    ref = _reference(base_dir, adapter_dir, batch)
    _assert_matches(pair.decompose(PROMPTS), ref)
    torch.testing.assert_close(pair.tuco(PROMPTS).double(), ref["tuco"], **TOL)
    # the pre-trained model is the base, untouched: alpha = 0 gives the base model's logits (the
    # adapters change decoder blocks only, so embeddings and unembedding are shared)
    with torch.no_grad():
        base_logits = _hf(base_dir)(batch.tokens[:1]).logits
    every_token = torch.ones_like(batch.tokens[:1])  # the padding is text on both sides here
    torch.testing.assert_close(pair.run_with_alpha(batch.tokens[:1], 0.0, attention_mask=every_token), base_logits, **TOL)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_lora_weights_are_w_plus_scaled_ba(adapter_dirs, arch):
    """merge_adapter_dir gives W + (alpha/r) B A exactly where LoRA applies, W elsewhere."""
    _, base_dir, adapter_dir = adapter_dirs[f"lora-{arch}"]
    base = _hf(base_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = adapters.merge_adapter_dir(base, adapter_dir).state_dict()
    for key, value in base.state_dict().items():  # the base is not modified
        assert torch.equal(value, before[key]), key
    lora = load_file(str(adapter_dir / "adapter_model.safetensors"))
    updated = set()
    for key in lora:
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        delta = SCALE * lora[key.replace("lora_A", "lora_B")] @ lora[key]  # [out, in]
        weight = f"{module}.weight"
        if arch == "gpt2":  # Conv1D stores [in, out]
            delta = delta.T
        torch.testing.assert_close(merged[weight], before[weight] + delta, atol=1e-6, rtol=0)
        assert delta.abs().max() > 1e-2
        updated.add(weight)
    assert len(updated) == 2 * len(LORA_TARGETS[arch])  # every target in both layers
    for key in merged.keys() - updated:
        assert torch.equal(merged[key], before[key]), key


def test_layers_without_adapter_have_ftc_exactly_zero(adapter_dirs):
    """A LoRA on layer 1 only: block 0 of the fine-tuned model *is* the pre-trained block 0, so
    FTC_0 = f_ft(x_0) - f_pt(x_0) = 0 exactly, at every real position."""
    _, base_dir, adapter_dir = adapter_dirs["lora-layer1-llama"]
    pair = tuco_lens.load_pair(base_dir, adapter_dir)
    batch = pair.tokenize(PROMPTS)
    dec = pair.decompose(PROMPTS)
    real = batch.attention_mask.bool()
    assert torch.equal(dec.ftc_norm[:, 0][real], torch.zeros(int(real.sum())))
    assert torch.equal(dec.beta[:, 0][real], torch.zeros(int(real.sum())))
    assert (dec.ftc_norm[:, 1][real] > 1e-2).all()
    ref = _reference(base_dir, adapter_dir, batch)
    assert (ref["ftc"][:, 0] == 0).all()


@pytest.mark.parametrize(("arch", "target", "linear"), LINEAR_CASES)
def test_lora_on_a_block_output_projection_is_linear(checkpoint_pair, tmp_path, arch, target, linear):
    """docs/lora.md: FTC_l = (alpha/r) B_l A_l z_l, with z_l the input of the adapted projection in
    the pre-trained block on the fine-tuned stream, when nothing downstream in the block reads the
    projection's output; not otherwise."""
    base_dir = checkpoint_pair(arch)[0]
    adapter_dir = _save_adapter(base_dir, _lora(arch, target_modules=[target]), tmp_path / "lora")
    pair = tuco_lens.load_pair(base_dir, adapter_dir)
    batch = pair.tokenize(PROMPTS)
    dec = pair.decompose(PROMPTS)

    pt = _hf(base_dir)
    inputs: dict[int, torch.Tensor] = {}
    for l, layer in enumerate(decoder_layers(pt)):
        projection = layer.get_submodule(target)
        projection.register_forward_pre_hook(lambda m, args, l=l: inputs.__setitem__(l, args[0].double()))
    unmerged = peft.PeftModel.from_pretrained(_hf(base_dir), str(adapter_dir)).eval()
    ref = reference_decomposition(pt, unmerged.base_model.model, batch.tokens, batch.attention_mask)

    lora = load_file(str(adapter_dir / "adapter_model.safetensors"))
    prefix = f"base_model.model.{LAYERS[arch]}"
    linear_ftc = torch.stack(
        [
            SCALE * inputs[l] @ lora[f"{prefix}.{l}.{target}.lora_A.weight"].double().T
            @ lora[f"{prefix}.{l}.{target}.lora_B.weight"].double().T
            for l in range(pair.n_layers)
        ],
        dim=1,
    )  # [batch, layer, pos, d_model]
    real = batch.attention_mask.bool()
    gap = (ref["ftc"] - linear_ftc).abs().amax(dim=(1, 3))[real].max()
    if not linear:
        assert gap > 1e-2
        return
    assert gap < 1e-5
    rows = torch.arange(len(PROMPTS))
    scale = float(ref["ptc_norm"].nan_to_num().abs().max())
    expected_sum = linear_ftc.sum(1)[rows, ref["last_index"]]
    torch.testing.assert_close(dec.ftc_sum.double() / scale, expected_sum / scale, **TOL)
    expected_norm = linear_ftc.abs().sum(-1).masked_fill(~real[:, None], float("nan"))
    torch.testing.assert_close(dec.ftc_norm.double() / scale, expected_norm / scale, equal_nan=True, **TOL)


@pytest.mark.parametrize(("arch", "target", "linear"), LINEAR_CASES)
def test_alpha_scaling_a_linear_lora_is_scaling_the_lora(checkpoint_pair, tmp_path, arch, target, linear):
    """docs/lora.md: where FTC_l = s B A z_l, PTC + alpha FTC is the block with the LoRA scaled by
    alpha, so run_with_alpha equals the base with W + alpha s B A merged by hand (not otherwise)."""
    base_dir = checkpoint_pair(arch)[0]
    adapter_dir = _save_adapter(base_dir, _lora(arch, target_modules=[target]), tmp_path / "lora")
    pair = tuco_lens.load_pair(base_dir, adapter_dir)
    tokens = pair.tokenize(PROMPTS[2:]).tokens  # one prompt: no padding
    lora = load_file(str(adapter_dir / "adapter_model.safetensors"))
    layers = LAYERS[arch]
    alpha = 0.4
    scaled = _hf(base_dir)
    with torch.no_grad():
        for l in range(pair.n_layers):
            key = f"base_model.model.{layers}.{l}.{target}"
            delta = lora[f"{key}.lora_B.weight"] @ lora[f"{key}.lora_A.weight"]  # [out, in]
            delta = delta.T if arch == "gpt2" else delta  # Conv1D stores [in, out]
            scaled.get_parameter(f"{layers}.{l}.{target}.weight").add_(alpha * SCALE * delta)
        expected = scaled(tokens).logits
    got = pair.run_with_alpha(tokens, alpha)
    if linear:
        torch.testing.assert_close(got, expected, **TOL)
    else:
        assert (got - expected).abs().max() > 1e-3


# ------------------------------------------------------------------------------ PeftModel objects
def test_peft_model_object_is_merged_into_a_copy(adapter_dirs):
    _, base_dir, adapter_dir = adapter_dirs["lora-llama"]
    user_model = peft.PeftModel.from_pretrained(_hf(base_dir), str(adapter_dir)).eval()
    before = {k: v.clone() for k, v in user_model.state_dict().items()}
    tokens = AutoTokenizer.from_pretrained(base_dir)(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        logits_before = user_model(tokens).logits

    pair = tuco_lens.load_pair(str(base_dir), user_model)

    after = user_model.state_dict()
    assert after.keys() == before.keys()
    assert any("lora_A" in k for k in after)  # still an unmerged PeftModel
    for key in before:
        assert torch.equal(after[key], before[key]), key
    layers = [m for m in user_model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert layers and not any(m.merged for m in layers)
    with torch.no_grad():
        assert torch.equal(user_model(tokens).logits, logits_before)
    batch = pair.tokenize(PROMPTS)
    _assert_matches(pair.decompose(PROMPTS), _reference(base_dir, adapter_dir, batch))
    assert pair.ft.tokenizer is not None  # found through the base's name_or_path


def test_transformers_base_object_is_not_modified(adapter_dirs):
    _, base_dir, adapter_dir = adapter_dirs["lora-gpt2"]
    base = _hf(base_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    pair = tuco_lens.load_pair(base, str(adapter_dir))
    assert base.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert not hasattr(base, "peft_config")
    _assert_matches(pair.decompose(PROMPTS), _reference(base_dir, adapter_dir, pair.tokenize(PROMPTS)))


# ------------------------------------------------------------------------ bases and tokenizers
def test_load_model_merges_into_the_recorded_base(adapter_dirs):
    _, base_dir, adapter_dir = adapter_dirs["lora-llama"]
    recorded = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(base_dir)
    model = load_model(adapter_dir)
    pair = tuco_lens.load_pair(base_dir, adapter_dir)
    tokens = pair.tokenize(PROMPTS[:1]).tokens
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), pair.ft(tokens), atol=0, rtol=0)


def test_other_base_than_recorded_is_used_with_a_note(adapter_dirs, tmp_path):
    _, base_dir, adapter_dir = adapter_dirs["lora-llama"]
    other = shutil.copytree(base_dir, tmp_path / "another-base")
    with torch.no_grad():  # a different base: the merged weights must come from it
        model = AutoModelForCausalLM.from_pretrained(other)
        for p in decoder_layers(model).parameters():
            p.mul_(0.9)
        model.save_pretrained(other)
    with pytest.warns(UserWarning, match="records the base model"):
        pair = tuco_lens.load_pair(other, adapter_dir)
    batch = pair.tokenize(PROMPTS)
    _assert_matches(pair.decompose(PROMPTS), _reference(other, adapter_dir, batch))


def test_ready_pt_model_falls_back_to_the_recorded_base(adapter_dirs):
    """A ready HookedTransformer / TransformerBridge as pt has no checkpoint to merge into."""
    _, base_dir, adapter_dir = adapter_dirs["lora-llama"]
    with pytest.warns(UserWarning, match=r"ready (HookedTransformer|TransformerBridge), not a checkpoint.*recorded"):
        pair = tuco_lens.load_pair(load_model(base_dir), adapter_dir)
    _assert_matches(pair.decompose(PROMPTS), _reference(base_dir, adapter_dir, pair.tokenize(PROMPTS)))


def test_adapter_without_recorded_base_needs_one(adapter_dirs, tmp_path):
    _, base_dir, adapter_dir = adapter_dirs["lora-gpt2"]
    bare = shutil.copytree(adapter_dir, tmp_path / "bare")
    config = json.loads((bare / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (bare / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="records no base model.*load_pair"):
        load_model(bare)
    tuco_lens.load_pair(base_dir, bare)  # with pt it works
    with pytest.raises(InputError, match="adapter_base"):
        load_model(base_dir, adapter_base=base_dir)


def test_adapter_tokenizer_wins_over_the_base_tokenizer(adapter_dirs, tmp_path):
    _, base_dir, adapter_dir = adapter_dirs["lora-llama"]
    with_tokenizer = shutil.copytree(adapter_dir, tmp_path / "with-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(with_tokenizer)
    pair = tuco_lens.load_pair(base_dir, with_tokenizer)
    assert pair.ft.tokenizer.chat_template == tokenizer.chat_template
    assert pair.pt.tokenizer.chat_template != tokenizer.chat_template


# --------------------------------------------------------------------------------------- errors
def test_prompt_tuning_is_refused_with_the_reason(bases, tmp_path):
    base_dir = bases["llama"]
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    adapter_dir = _save_adapter(base_dir, config, tmp_path / "soft-prompt")
    expected = r"PROMPT_TUNING adapter.*needs the fine-tuned model's weights.*LoRA"
    with pytest.raises(ModelLoadError, match=expected):
        tuco_lens.load_pair(base_dir, adapter_dir)
    with pytest.raises(ModelLoadError, match=expected):
        load_model(adapter_dir)
    prefix = peft.get_peft_model(_hf(base_dir), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ModelLoadError, match=r"PREFIX_TUNING adapter.*soft prompt.*not a weight change"):
        tuco_lens.load_pair(base_dir, prefix)


def test_invalid_adapter_config(tmp_path):
    (tmp_path / "lora-sft").mkdir()
    (tmp_path / "lora-sft" / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="names no 'peft_type'"):
        load_model(tmp_path / "lora-sft")
    (tmp_path / "lora-sft" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read the PEFT adapter config"):
        load_model(tmp_path / "lora-sft")


def test_adapter_weights_that_do_not_fit_the_base(adapter_dirs):
    _, _, adapter_dir = adapter_dirs["lora-llama"]
    gpt2_base = adapter_dirs["lora-gpt2"][1]
    with pytest.raises(ModelLoadError, match="could not apply the adapter"), pytest.warns(UserWarning, match="records"):
        tuco_lens.load_pair(gpt2_base, adapter_dir)


def test_missing_peft_gives_an_install_hint(adapter_dirs, monkeypatch):
    _, base_dir, adapter_dir = adapter_dirs["lora-llama"]
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    assert not adapters.is_peft_model(object())
    with pytest.raises(ModelLoadError, match=r"optional dependency peft: pip install peft"):
        tuco_lens.load_pair(base_dir, adapter_dir)


def test_detection():
    assert not adapters.is_adapter_dir(3) and not adapters.is_adapter_dir("no/such/dir")
    assert not adapters.is_peft_model(torch.nn.Linear(2, 2))
    with pytest.raises(ModelLoadError, match="expected a peft.PeftModel"):
        adapters.merge_peft_model(torch.nn.Linear(2, 2))
