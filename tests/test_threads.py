"""Two Llama objects generating in parallel threads give the same tokens (and
keep the same cells) as when each runs alone.

llama-cpp-python's ctypes calls release the GIL, so the two decodes really run
at the same time; the eviction engine keeps all of its state in the
llama_context (no globals), which is what this checks.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from a2sf import Llama

COMMON = dict(n_threads=1, verbose=False, seed=1)


def generate(llm, prompt, n):
    """Greedy tokens, then the kept positions and the scores of the cache."""
    out = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1):
        out.append(int(tok))
        if len(out) == n:
            break
    if llm.kv_policy is None:
        return out, None, None
    s = llm.kv_scores()
    return out, s.positions.tolist(), s.scores.copy()


def run_alone_and_together(make_a, make_b, job_a, job_b, rounds=1):
    alone = [job_a(make_a()), job_b(make_b())]
    for _ in range(rounds):
        llms = [make_a(), make_b()]
        jobs = [job_a, job_b]
        results = [None, None]
        errors = []
        barrier = threading.Barrier(2)

        def work(i):
            try:
                barrier.wait()
                results[i] = jobs[i](llms[i])
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not errors, errors
        for i in range(2):
            tok_alone, pos_alone, sc_alone = alone[i]
            tok_par, pos_par, sc_par = results[i]
            assert tok_par == tok_alone, f"object {i}: tokens differ when run in parallel"
            assert pos_par == pos_alone, f"object {i}: kept cells differ when run in parallel"
            if sc_alone is not None:
                np.testing.assert_array_equal(sc_par, sc_alone)
        for llm in llms:
            llm.close()
    return alone


def test_two_tiny_models_in_parallel(core, tiny_f32, tiny_q8):
    rng = np.random.default_rng(3)
    prompt_a = [1] + rng.integers(3, 300, size=200).tolist()
    prompt_b = [1] + rng.integers(3, 300, size=150).tolist()
    alone = run_alone_and_together(
        lambda: Llama(tiny_f32, n_ctx=256, kv_policy="a2sf", **COMMON),
        lambda: Llama(tiny_q8, n_ctx=256, kv_policy="vatp", n_recent=16, **COMMON),
        lambda llm: generate(llm, prompt_a, 250),
        lambda llm: generate(llm, prompt_b, 250),
        rounds=2,
    )
    # both ran far past the cache: the comparison covers eviction
    assert len(alone[0][1]) < 200 + 250 and len(alone[1][1]) < 150 + 250


def test_policy_and_plain_object_in_parallel(core, tiny_f32):
    prompt = [1] + list(range(3, 120))
    run_alone_and_together(
        lambda: Llama(tiny_f32, n_ctx=256, kv_policy="h2o", **COMMON),
        lambda: Llama(tiny_f32, n_ctx=256, **COMMON),
        lambda llm: generate(llm, prompt, 300),
        lambda llm: generate(llm, prompt, 100),
        rounds=2,
    )


@pytest.mark.slow
def test_two_smollm2_in_parallel(core, smollm2):
    text = ("The old lighthouse keeper climbed the stairs every evening, counting the steps "
            "and listening to the sea. ") * 8

    def job(llm):
        return generate(llm, llm.tokenize(text.encode()), 200)  # past the 256 cells

    alone = run_alone_and_together(
        lambda: Llama(smollm2, n_ctx=256, kv_policy="a2sf", n_batch=64, **COMMON),
        lambda: Llama(smollm2, n_ctx=256, kv_policy="tova", n_batch=64, **COMMON),
        job, job,
    )
    assert alone[0][0] != [] and alone[1][0] != []
