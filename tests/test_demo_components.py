"""docs/components.md's worked example: the numbers it quotes are what component_findings measures."""

from __future__ import annotations

import pytest
import torch

from tuco_lens import demo
from tuco_lens.demo.components import component_findings

DOCUMENTED = {
    "shares_harmful": {"attn": 0.201, "mlp": 0.312, "mlp_via_attn": 0.069},
    "shares_chat": {"attn": 0.099, "mlp": 0.133, "mlp_via_attn": 0.100},
    "refusal": {"fine-tuned": 1.0, "attention fine-tuning removed": 0.93, "MLP fine-tuning removed": 0.05,
                "both removed": 0.0},
    "mlp_layer_removed": {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0},
    "mlp_layer_only": {0: 0.96, 1: 0.0, 2: 0.52, 3: 0.86},
    "top_token": "i",
}


@pytest.fixture(scope="module")
def findings():
    torch.set_num_threads(1)
    return component_findings(demo.load_pair(), demo.prompt_sets())


def test_documented_component_numbers(findings):
    for name, share in DOCUMENTED["shares_harmful"].items():
        assert findings.shares["harmful"][name] == pytest.approx(share, abs=0.0015)
    for name, share in DOCUMENTED["shares_chat"].items():
        assert findings.shares["chat"][name] == pytest.approx(share, abs=0.0015)
    for label, rate in DOCUMENTED["refusal"].items():
        assert findings.refusal[label] == pytest.approx(rate, abs=0.01)
    assert findings.mlp_layer_removed == pytest.approx(DOCUMENTED["mlp_layer_removed"], abs=0.01)
    assert findings.mlp_layer_only == pytest.approx(DOCUMENTED["mlp_layer_only"], abs=0.01)
    for part in ("ftc", "ftc_mlp", "ftc_attn"):
        top = findings.top_tokens[(findings.top_tokens.part == part) & (findings.top_tokens["rank"] == 1)]
        assert top.token.iloc[0].strip() == DOCUMENTED["top_token"]


def test_findings_agree_with_the_library(findings):
    dec = findings.decomposition
    shares = dec.tuco_shares()
    assert float(sum(shares.values()).sub(dec.tuco).abs().max()) < 1e-6
    assert findings.shares["harmful"]["mlp"] == pytest.approx(float(shares["mlp"].mean()), abs=1e-4)
    # the mean direct effect ranks the tokens of the table
    mean = findings.attribution.direct["ftc_mlp"].mean(0)
    assert findings.attribution.token_strings[int(mean.argmax())] == findings.top_tokens.query(
        "part == 'ftc_mlp' and rank == 1").token.iloc[0]
    summary = findings.summary()
    assert summary["refusal_mlp_layer_only"]["0"] == findings.mlp_layer_only[0]
