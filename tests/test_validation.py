"""The value checks of tuco_lens.validation and the identity maps where tuco_lens keeps its state."""

from __future__ import annotations

import gc
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from tuco_lens.backends import ObjectMap
from tuco_lens.errors import InputError, InputTypeError
from tuco_lens.generation import seeded_rng
from tuco_lens.inputs import tokenizer_of
from tuco_lens.validation import check_float, check_int, check_options, check_size


@dataclass
class _Entry:  # like TransformerLens's KV cache entries: a dataclass, hence unhashable
    n: int


def test_object_map_is_keyed_by_identity_and_forgets_dead_keys():
    notes = ObjectMap()
    a, b = _Entry(1), _Entry(1)  # equal, not the same object
    notes.setdefault(a, dict)["x"] = 1
    assert notes.get(a) == {"x": 1} and notes.get(b) is None
    notes.set(b, 2)
    assert notes.get(b) == 2 and notes.pop(b) == 2 and notes.get(b) is None
    assert len(notes._entries) == 1
    del a
    gc.collect()
    assert len(notes._entries) == 0  # the entry went with its key


def test_size_and_number_checks_return_plain_values_and_name_the_argument():
    assert check_size(np.int64(4), "batch_size") == 4 and check_size(None, "batch_size") is None
    for bad in (0, -1, True, 2.0, "3"):
        with pytest.raises(InputError, match=r"batch_size must be a positive integer or None"):
            check_size(bad, "batch_size")
    with pytest.raises(InputError, match=r"row_group_size must be a positive integer, got None"):
        check_size(None, "row_group_size", optional=False)
    assert check_int(np.int32(3), "n_samples", 1) == 3 and type(check_int(np.int32(3), "n")) is int
    with pytest.raises(InputError, match="n_samples must be >= 1, got 0"):
        check_int(0, "n_samples", 1)
    with pytest.raises(InputTypeError, match="n must be an int"):
        check_int(1.5, "n")
    assert check_float(np.float32(0.5), "t", positive=True) == 0.5
    with pytest.raises(InputError, match="t must be a finite positive number"):
        check_float(float("inf"), "t", positive=True)


def test_option_names_are_checked():
    check_options({"chat_template": True}, ("attention_mask", "chat_template"), "TuCoPair.tuco")
    with pytest.raises(InputTypeError, match=r"TuCoPair\.tuco\(\) got an unexpected keyword argument 'chat'"):
        check_options({"chat": True}, ("attention_mask", "chat_template"), "TuCoPair.tuco")


def test_a_model_without_tokenizer_is_refused_by_name():
    class NoTokenizer:
        tokenizer = None

    with pytest.raises(InputError, match="has no tokenizer, so strings cannot be tokenized"):
        tokenizer_of(NoTokenizer())


def test_seeded_rng_repeats_draws_and_restores_the_callers_state():
    class CPUModel:
        class cfg:
            device = "cpu"

    torch.manual_seed(123)
    state = torch.get_rng_state()
    with seeded_rng(CPUModel(), 7):
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), state)
    with seeded_rng(CPUModel(), 7):
        assert torch.equal(torch.rand(3), first)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(3), first)  # the seed is torch.manual_seed's
    torch.set_rng_state(state)
    with seeded_rng(CPUModel(), None):
        unseeded = torch.rand(3)
    torch.set_rng_state(state)
    assert torch.equal(torch.rand(3), unseeded)  # seed=None draws from the RNG as it is
