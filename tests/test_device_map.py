"""``load_pair(..., device_map=...)`` on the TransformerBridge: one map for both models, a mismatch refused.

On these CPU-only machines every map places everything on the CPU (Hugging Face then records no
``hf_device_map``), so the tests check what does not need GPUs: the numbers equal the unmapped
pair's, the fine-tuned model is loaded with the map the pre-trained one got, maps are compared
by where they put each parameter, and bad combinations are refused with a clear error.
"""

from __future__ import annotations

import pytest

import tuco_lens
from tuco_lens import loading
from tuco_lens.errors import IncompatiblePairError, InputError

pytestmark = pytest.mark.integration  # test tier (tests/conftest.py, TIERS)

PROMPTS = ["the cat sat on the mat", "a dog", "water and food for the city"]


@pytest.fixture(scope="module")
def dirs(checkpoint_pair):
    return tuple(str(d) for d in checkpoint_pair("llama"))


@pytest.fixture(scope="module")
def reference(dirs):
    return tuco_lens.load_pair(*dirs, backend="bridge").tuco(PROMPTS)


@pytest.mark.parametrize("device_map", ["auto", {"": "cpu"}, {"model.embed_tokens": "cpu", "model.layers": "cpu",
                                                              "model.norm": "cpu", "lm_head": "cpu", "model.rotary_emb": "cpu"}])
def test_a_device_map_gives_the_unmapped_numbers(dirs, reference, device_map):
    pair = tuco_lens.load_pair(*dirs, device_map=device_map)
    assert type(pair.ft).__name__ == "TransformerBridge"  # backend="auto" picks the bridge for a map
    assert pair.tuco(PROMPTS).tolist() == pytest.approx(reference.tolist(), abs=1e-6)


def test_the_fine_tuned_model_gets_the_map_the_pre_trained_one_got(dirs, monkeypatch):
    """As on several GPUs: "auto" is resolved once (for pt) and that dict is given to ft."""
    resolved = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
                "lm_head": "cpu", "model.rotary_emb": "cpu"}
    calls, original = [], loading.load_model

    def load_model(source, **kwargs):
        calls.append(kwargs["hf_model_kwargs"]["device_map"])
        model = original(source, **kwargs)
        # what transformers records when a map really splits a model over devices
        model.original_model.hf_device_map = dict(resolved) if calls[-1] == "auto" else dict(calls[-1])
        return model

    monkeypatch.setattr(loading, "load_model", load_model)
    pair = tuco_lens.load_pair(*dirs, device_map="auto")
    assert calls == ["auto", resolved]
    assert pair.ft.original_model.hf_device_map == pair.pt.original_model.hf_device_map == resolved


def test_different_maps_are_refused_and_equal_placements_accepted(dirs):
    pt = tuco_lens.load_model(dirs[0], backend="bridge")
    ft = tuco_lens.load_model(dirs[1], backend="bridge")
    two_gpus = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1, "lm_head": 1}
    pt.original_model.hf_device_map = dict(two_gpus)
    ft.original_model.hf_device_map = {**two_gpus, "model.layers.1": 0}
    with pytest.raises(IncompatiblePairError, match=r"device map differs: the pre-trained model puts "
                                                    r"'model\.layers\.1\.\S+' on 1, the fine-tuned on 0.*device_map=\.\.\."):
        tuco_lens.TuCoPair(pt, ft)
    del ft.original_model.hf_device_map
    with pytest.raises(IncompatiblePairError, match="only the pre-trained model was loaded with a device_map"):
        tuco_lens.TuCoPair(pt, ft)
    # the same placement written another way is the same map
    pt.original_model.hf_device_map = {"": "cpu"}
    ft.original_model.hf_device_map = {"model": "cpu", "lm_head": "cpu"}
    tuco_lens.TuCoPair(pt, ft)


def test_device_map_errors(dirs):
    cases = [
        (dict(device="cpu"), "either device=... or device_map=..."),
        (dict(backend="hooked"), "device_map is a TransformerBridge option"),
        (dict(hf_model_kwargs={"device_map": "balanced"}), "give the map once"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            tuco_lens.load_pair(*dirs, device_map="auto", **kwargs)
    ready = tuco_lens.load_model(dirs[0], backend="bridge")
    with pytest.raises(InputError, match="ready models and adapters keep their own placement"):
        tuco_lens.load_pair(ready, dirs[1], device_map="auto")
