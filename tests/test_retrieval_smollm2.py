"""What a user of the default policy notices: a fact the question points at survives
prompt compression to 25% (SmolLM2, needles outside the recent window)."""
from __future__ import annotations

import pytest

from a2sf.eval.retrieval import RetrievalRunner, Variant, plan_jobs, run_sample
from a2sf.eval.ruler import make_sample, noise_tokens

LENGTH = 1024
#: needles at depth 0.05-0.35: before the last 25% of the context, so no recent window holds them
SAMPLES = range(4)


@pytest.fixture(scope="module")
def found(smollm2):
    from a2sf.eval.data import load_texts

    runner = RetrievalRunner(smollm2, n_ctx=LENGTH + 128, n_threads=2)
    tok = lambda s: runner.tokenize(s, False)  # noqa: E731
    texts = load_texts("essays")
    filler = tok("\n\n".join(texts[k] for k in sorted(texts))[:60000])  # as the harness builds it
    variants = [Variant.parse(v) for v in ("a2sf", "a2sf/head:pool_kernel=1")]
    out = {v.label: [] for v in variants}
    for i in SAMPLES:
        sample = make_sample("niah_number", LENGTH, i, tok, runner.detokenize, filler,
                             noise_tokens(tok, LENGTH + 64))
        res = run_sample(runner, sample, plan_jobs(variants, [0.25], ["aware"]))
        for v in variants:
            out[v.label].append(res[f"{v.label}|0.25|aware"]["score"])
    runner.close()
    return out


def test_the_default_policy_keeps_every_needle_the_question_points_at(found):
    assert found["a2sf"] == [1.0] * len(SAMPLES)


def test_without_span_pooling_per_head_selection_breaks_some_of_those_numbers(found):
    # why pool_kernel is on by default: each (layer, KV head) keeps a different subset of a
    # number's digits, and the copy breaks (docs/RETRIEVAL.md has the 50-sample table)
    assert sum(found["a2sf/head:pool_kernel=1"]) < len(SAMPLES)
