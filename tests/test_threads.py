"""One pair shared by several threads: every call gets the numbers it gets alone (issue 11, item 11).

While a thread is inside ``pair.scaled`` / ``decompose`` / ``tuco``, tuco_lens's hooks act only
on that thread's forward passes; another thread's forward of the same model runs the plain
model, and contexts of different threads do not see each other.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

import tuco_lens
from tuco_lens.errors import TuCoError

pytestmark = pytest.mark.integration  # test tier (tests/conftest.py, TIERS)

PROMPTS = ["the cat sat on the mat", "a dog and a bird", "hello , how are you ?"]
ROUNDS = 25


@pytest.fixture(scope="module")
def pair(checkpoint_pair, backend):
    pt_dir, ft_dir = checkpoint_pair("llama")
    return tuco_lens.load_pair(str(pt_dir), str(ft_dir), backend=backend)


def _run_together(*jobs):
    """Run each job ROUNDS times, all jobs at once in their own thread; return their results."""
    results: list[list] = [[] for _ in jobs]
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def work(i, job):
        try:
            start.wait()
            for _ in range(ROUNDS):
                results[i].append(job())
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    return results


def test_plain_forward_beside_run_with_alpha(pair):
    batch = pair.tokenize(PROMPTS)
    with torch.no_grad():
        plain = pair.backend.forward(batch.tokens, batch.attention_mask)
        scaled = pair.run_with_alpha(batch.tokens, 0.0, attention_mask=batch.attention_mask)
    assert not torch.allclose(plain, scaled)

    def plain_job():
        with torch.no_grad():
            return pair.backend.forward(batch.tokens, batch.attention_mask)

    def scaled_job():
        return pair.run_with_alpha(batch.tokens, 0.0, attention_mask=batch.attention_mask)

    plains, scaleds = _run_together(plain_job, scaled_job)
    assert sum(not torch.equal(p, plain) for p in plains) == 0
    assert sum(not torch.equal(s, scaled) for s in scaleds) == 0


def test_different_alphas_tuco_and_decompose_in_threads(pair):
    batch = pair.tokenize(PROMPTS)
    alone = {
        "a0": pair.run_with_alpha(batch.tokens, 0.0, attention_mask=batch.attention_mask),
        "a1.5": pair.run_with_alpha(batch.tokens, 1.5, attention_mask=batch.attention_mask),
        "tuco": pair.tuco(PROMPTS),
        "beta": pair.decompose(PROMPTS).beta,
    }
    jobs = {
        "a0": lambda: pair.run_with_alpha(batch.tokens, 0.0, attention_mask=batch.attention_mask),
        "a1.5": lambda: pair.run_with_alpha(batch.tokens, 1.5, attention_mask=batch.attention_mask),
        "tuco": lambda: pair.tuco(PROMPTS),
        "beta": lambda: pair.decompose(PROMPTS).beta,
    }
    for name, results in zip(jobs, _run_together(*jobs.values())):
        wrong = sum(not torch.allclose(r, alone[name], atol=1e-6, rtol=0, equal_nan=True) for r in results)
        assert wrong == 0, f"{name}: {wrong} of {ROUNDS} calls differ"


def test_component_alpha_and_split_beside_a_plain_forward(pair):
    batch = pair.tokenize(PROMPTS)
    alpha = {"attn": 0.0, "mlp": 1.5}
    with torch.no_grad():
        plain = pair.backend.forward(batch.tokens, batch.attention_mask)
    alone = {
        "plain": plain,
        "components": pair.run_with_alpha(batch.tokens, alpha, attention_mask=batch.attention_mask),
        "split": pair.decompose(PROMPTS, components=True).ftc_attn_sum,
    }

    def plain_job():
        with torch.no_grad():
            return pair.backend.forward(batch.tokens, batch.attention_mask)

    jobs = {
        "plain": plain_job,
        "components": lambda: pair.run_with_alpha(batch.tokens, alpha, attention_mask=batch.attention_mask),
        "split": lambda: pair.decompose(PROMPTS, components=True).ftc_attn_sum,
    }
    for name, results in zip(jobs, _run_together(*jobs.values())):
        wrong = sum(not torch.allclose(r, alone[name], atol=1e-6, rtol=0) for r in results)
        assert wrong == 0, f"{name}: {wrong} of {ROUNDS} calls differ"


def test_generation_in_two_threads(pair):
    alone = {a: pair.generate(PROMPTS[:2], alpha=a, max_new_tokens=4, return_type="tokens") for a in (0.0, 1.0)}
    jobs = [lambda a=a: pair.generate(PROMPTS[:2], alpha=a, max_new_tokens=4, return_type="tokens") for a in alone]
    for alpha, results in zip(alone, _run_together(*jobs)):
        assert all(torch.equal(r, alone[alpha]) for r in results)


def test_nesting_in_one_thread_is_still_refused_with_an_accurate_message(pair):
    with pair.scaled(0.5):
        with pytest.raises(TuCoError, match="already scaling or decomposing this fine-tuned model in this thread"):
            pair.tuco(PROMPTS[0])
        other: list = []
        thread = threading.Thread(target=lambda: other.append(pair.tuco(PROMPTS[0])))
        thread.start()
        thread.join()
    torch.testing.assert_close(other[0], pair.tuco(PROMPTS[0]), rtol=0, atol=0)


def test_offloaded_pairs_run_one_pretrained_block_at_a_time(checkpoint_pair, monkeypatch):
    from tuco_lens import hooks

    pt_dir, ft_dir = checkpoint_pair("llama")
    pt, ft = (tuco_lens.load_model(str(d)) for d in (pt_dir, ft_dir))
    pair = tuco_lens.TuCoPair(pt, ft, offload_pt=True)
    alone = pair.tuco(PROMPTS)
    inside, most, real = [0], [0], hooks.placed

    @contextlib.contextmanager
    def counting(block, device, move):  # a block moved in by one thread must not be moved out by another
        with real(block, device, move) as placed:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            time.sleep(0.002)
            try:
                yield placed
            finally:
                inside[0] -= 1

    monkeypatch.setattr(hooks, "placed", counting)
    for results in _run_together(lambda: pair.tuco(PROMPTS), lambda: pair.tuco(PROMPTS)):
        assert all(torch.equal(r, alone) for r in results)
    assert most[0] == 1
