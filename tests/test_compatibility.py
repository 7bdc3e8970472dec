"""Tests of tuco_lens.compatibility on tiny HookedTransformers built from configs."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from checkpoints import build_tokenizer
from transformers import AutoTokenizer

from tuco_lens.backends import record_processing
from tuco_lens.compatibility import check_compatible, describe_differences, processing_of
from tuco_lens.errors import IncompatiblePairError, InputTypeError

pytestmark = pytest.mark.hooked  # tiny HookedTransformers: transformer-lens 3.x only (skipped on 4.x)

NO_PROCESSING = {
    "fold_ln": False,
    "center_writing_weights": False,
    "center_unembed": False,
    "fold_value_biases": False,
}


def test_identical_models_are_compatible(tiny_hooked):
    pt = tiny_hooked()
    ft = copy.deepcopy(pt)
    assert describe_differences(pt, ft) == []
    check_compatible(pt, ft)
    check_compatible(pt, pt)  # the same object is fine too (TuCo = 0)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"n_layers": 3}, "n_layers"),
        ({"d_model": 32}, "d_model"),
        ({"n_heads": 2}, "n_heads"),
        ({"n_key_value_heads": 2}, "n_key_value_heads"),
        ({"d_head": 8}, "d_head"),
        ({"d_mlp": 64}, "d_mlp"),
        ({"d_vocab": 100}, "d_vocab"),
        ({"positional_embedding_type": "rotary", "rotary_dim": 4}, "positional_embedding_type"),
        ({"normalization_type": "RMS"}, "normalization_type"),
        ({"act_fn": "relu"}, "act_fn"),
        ({"parallel_attn_mlp": True}, "parallel_attn_mlp"),
        ({"n_ctx": 64}, "n_ctx"),
    ],
)
def test_architecture_difference_is_refused(tiny_hooked, overrides, field):
    pt, ft = tiny_hooked(), tiny_hooked(**overrides)
    value_pt = getattr(pt.cfg, field)
    value_ft = getattr(ft.cfg, field)
    if field == "n_key_value_heads":
        value_pt = pt.cfg.n_heads  # None means "one KV head per query head"
    with pytest.raises(IncompatiblePairError, match=f"cfg.{field} differs") as info:
        check_compatible(pt, ft)
    message = str(info.value)
    assert f"pre-trained has {value_pt!r}, fine-tuned has {value_ft!r}" in message
    assert isinstance(info.value, ValueError)


def test_rotary_n_ctx_difference_is_allowed(tiny_hooked):
    rotary = {"positional_embedding_type": "rotary", "rotary_dim": 4}
    assert describe_differences(tiny_hooked(**rotary), tiny_hooked(**rotary, n_ctx=64)) == []


def test_all_differences_are_listed_in_one_error(tiny_hooked):
    pt, ft = tiny_hooked(), tiny_hooked(n_layers=3, d_mlp=64, act_fn="relu")
    ft.to(torch.float64, print_details=False)
    differences = describe_differences(pt, ft)
    assert len(differences) == 4
    with pytest.raises(IncompatiblePairError) as info:
        check_compatible(pt, ft)
    message = str(info.value)
    assert "4 difference(s)" in message
    for needle in ("n_layers", "d_mlp", "act_fn", "dtype"):
        assert needle in message
    assert message.count("\n  - ") == 4


def test_dtype_difference_is_refused(tiny_hooked):
    pt, ft = tiny_hooked(), tiny_hooked()
    ft.to(torch.bfloat16, print_details=False)
    with pytest.raises(IncompatiblePairError, match=r"dtype differs.*float32.*bfloat16"):
        check_compatible(pt, ft)


def test_device_difference_is_refused(tiny_hooked):
    pt, ft = tiny_hooked(), tiny_hooked()
    ft.to("meta", print_details=False)
    with pytest.raises(IncompatiblePairError, match=r"device differs.*cpu.*meta"):
        check_compatible(pt, ft)


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    build_tokenizer(root / "a")
    build_tokenizer(root / "b")
    extended = build_tokenizer(root / "c")
    extended.add_tokens(["zebra"])
    extended.save_pretrained(root / "c")
    return root / "a", root / "b", root / "c"


def test_same_vocabulary_is_compatible(tiny_hooked, tokenizer_dirs):
    pt, ft = tiny_hooked(), tiny_hooked()
    pt.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dirs[0])
    ft.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dirs[1])
    check_compatible(pt, ft)


def test_different_vocabulary_is_refused(tiny_hooked, tokenizer_dirs):
    pt, ft = tiny_hooked(), tiny_hooked()
    pt.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dirs[0])
    ft.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dirs[2])
    with pytest.raises(IncompatiblePairError, match="tokenizer vocabulary differs") as info:
        check_compatible(pt, ft)
    assert "only in the fine-tuned tokenizer ('zebra')" in str(info.value)


def test_one_missing_tokenizer_is_allowed_with_a_warning(tiny_hooked, tokenizer_dirs):
    pt, ft = tiny_hooked(), tiny_hooked()
    pt.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dirs[0])
    assert ft.tokenizer is None
    with pytest.warns(UserWarning, match="fine-tuned model has no tokenizer"):
        check_compatible(pt, ft)


def test_no_tokenizers_no_warning(tiny_hooked):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        check_compatible(tiny_hooked(), tiny_hooked())


def _processed_twin(model, **flags):
    twin = copy.deepcopy(model)
    options = {**NO_PROCESSING, **flags}
    twin.load_and_process_state_dict(copy.deepcopy(model.state_dict()), **options)
    return twin


def test_processing_is_inferred_for_unrecorded_models(tiny_hooked):
    pt = tiny_hooked()
    assert processing_of(pt) == NO_PROCESSING
    folded = _processed_twin(pt, fold_ln=True)
    assert folded.cfg.normalization_type == "LNPre"
    assert processing_of(folded)["fold_ln"] is True
    assert processing_of(_processed_twin(pt, center_writing_weights=True))["center_writing_weights"]
    assert processing_of(_processed_twin(pt, center_unembed=True))["center_unembed"]


def test_centering_is_not_applicable_to_rms_models(tiny_hooked):
    pt = tiny_hooked(normalization_type="RMS")
    assert processing_of(pt)["center_writing_weights"] is False


@pytest.mark.parametrize("flag", ["fold_ln", "center_writing_weights", "center_unembed"])
def test_inferred_processing_difference_is_refused(tiny_hooked, flag):
    pt = tiny_hooked()
    ft = _processed_twin(pt, **{flag: True})
    expected = f"weight processing differs: {flag} is False"
    with pytest.raises(IncompatiblePairError, match=expected) as info:
        check_compatible(pt, ft)
    assert "from_pretrained_no_processing" in str(info.value)
    assert "normalization_type" not in str(info.value)  # LN vs LNPre is reported as fold_ln


def test_recorded_processing_is_compared(tiny_hooked):
    pt, ft = tiny_hooked(), tiny_hooked()
    record_processing(pt, dict(NO_PROCESSING))
    record_processing(ft, {**NO_PROCESSING, "fold_value_biases": True})
    with pytest.raises(IncompatiblePairError, match="fold_value_biases is False .* and True"):
        check_compatible(pt, ft)


def test_unknown_processing_is_not_compared(tiny_hooked):
    pt, ft = tiny_hooked(), tiny_hooked()
    record_processing(pt, {**NO_PROCESSING, "fold_value_biases": None})
    record_processing(ft, {**NO_PROCESSING, "fold_value_biases": True})
    check_compatible(pt, ft)


def test_non_model_is_a_type_error(tiny_hooked):
    with pytest.raises(InputTypeError, match="HookedTransformer"):
        check_compatible(tiny_hooked(), "gpt2")
