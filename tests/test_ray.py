"""The Ray Data adapter on a local Ray cluster on the CPU (extra ``[ray]``; run by ``.ci/ray``).

Skipped where Ray is not installed, unless ``TUCO_RAY_REQUIRED=1`` (as in ``.ci/ray``), where a
missing Ray fails.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.integration  # test tier (tests/conftest.py, TIERS)

if os.environ.get("TUCO_RAY_REQUIRED") != "1":
    pytest.importorskip("ray", reason="Ray is the optional extra [ray]: pip install 'tuco_lens[ray]'")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tuco_lens import demo  # noqa: E402
from tuco_lens.errors import InputError  # noqa: E402
from tuco_lens.ray_data import TuCoScorer  # noqa: E402


@pytest.fixture(scope="module")
def prompts():
    sets = demo.prompt_sets()
    return sets["web"][:5] + sets["chat"][:7] + sets["harmful"][:6]


@pytest.fixture(scope="module")
def pair():
    return demo.load_pair()


def test_the_scorer_adds_columns_in_row_order(prompts, pair):
    scorer = TuCoScorer(demo=True, batch_size=3, per_token=True)
    batch = {"prompt": np.array(prompts[:6]), "id": np.arange(6)}
    out = scorer(batch)
    assert out["id"].tolist() == list(range(6))
    assert out["tuco"].tolist() == pytest.approx([float(pair.tuco(p)[0]) for p in prompts[:6]], abs=1e-6)
    assert [len(t) for t in out["tokens"]] == out["n_tokens"].tolist()
    frame = scorer(pd.DataFrame(batch))
    assert frame["tuco"].tolist() == pytest.approx(out["tuco"].tolist(), abs=1e-7)
    with pytest.raises(InputError, match="no column 'text'"):
        TuCoScorer(demo=True, field="text")(batch)
    with pytest.raises(InputError, match="pt=... and ft=..., or demo=True"):
        TuCoScorer(pt="x")


def test_map_batches_on_a_local_ray_cluster(prompts, pair):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}})
    try:
        ds = ray.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(prompts)])
        scored = ds.map_batches(TuCoScorer, fn_constructor_kwargs={"demo": True, "batch_size": 4},
                                batch_size=5, concurrency=2, num_cpus=1).take_all()
    finally:
        ray.shutdown()
    assert sorted(row["id"] for row in scored) == list(range(len(prompts)))  # every row once
    by_id = {row["id"]: row for row in scored}
    for i, prompt in enumerate(prompts):
        assert by_id[i]["prompt"] == prompt
        assert by_id[i]["tuco"] == pytest.approx(float(pair.tuco(prompt)[0]), abs=1e-6)
