"""Bounded prefill scoring: for alpha < 1 only the last query rows of a ubatch are
scored (a row weighs alpha^(later queries)); the scores still equal the numpy
reference, which scores every row."""
from __future__ import annotations

import numpy as np
import pytest
from llama_cpp import GGML_TYPE_F32

from a2sf import Llama
from a2sf.testing.reference import ReferenceLlama, accumulate_scores, ubatch_sizes

from conftest import BOUNDED_SCORING_TOL, emma_tokens, last_logits


def _rows(alpha):  # what the engine keeps (llama-kv-score.cpp score_rows)
    if alpha >= 1:
        return None
    if alpha <= 0:
        return 1
    return int(np.ceil(np.log(BOUNDED_SCORING_TOL) / np.log(alpha)))


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("alpha,value_aware", [(0.0, False), (0.5, False), (0.7, True), (0.95, False), (1.0, False)])
def test_scores_with_skipped_rows_equal_the_full_reference(tiny_f32, alpha, value_aware, flash_attn):
    ub = 128
    n = 200
    rows = _rows(alpha)
    if alpha in (0.5, 0.7):
        assert rows < ub  # the case under test: rows were really skipped
    ref = ReferenceLlama(tiny_f32)
    toks = [int(t) for t in np.random.default_rng(1).integers(3, 290, n)]
    llm = Llama(tiny_f32, n_ctx=256, n_batch=ub, n_ubatch=ub, n_threads=1, kv_policy="vatp" if value_aware else "a2sf",
                forgetting_factor=alpha, flash_attn=flash_attn, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
                n_sink=1, n_recent=1, verbose=False)
    llm.eval(toks)
    got = llm.kv_scores().scores
    fr = ref.forward(toks)
    want = accumulate_scores(fr.probs, fr.v_l1, ubatch_sizes(n, ub), alpha, value_aware)
    rtol = 2e-2 if flash_attn else 1e-4  # CPU flash attention's probabilities pass through F16
    np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-4 if not flash_attn else 5e-3)
    llm.close()


def test_skipped_rows_keep_scores_within_1e5_of_the_largest_score(tiny_f32):
    # alpha = 0.95 in one 250-token ubatch: the first 25 query rows are left out (225 count).
    # Issue 17's tolerance: what they add is at most 1e-5 of the largest score a cell can
    # carry, n_group/(1-alpha); the full reference scores every row.
    alpha, n = 0.95, 250
    k = _rows(alpha)
    assert k == 225 < n
    ref = ReferenceLlama(tiny_f32)
    n_group = ref.n_head // ref.n_head_kv
    toks = [int(t) for t in np.random.default_rng(3).integers(3, 290, n)]
    llm = Llama(tiny_f32, n_ctx=256, n_batch=n, n_ubatch=n, n_threads=1, kv_policy="a2sf", forgetting_factor=alpha,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, n_sink=1, n_recent=1, verbose=False)
    llm.eval(toks)
    got = llm.kv_scores().scores
    llm.close()
    fr = ref.forward(toks)
    want = accumulate_scores(fr.probs, fr.v_l1, [n], alpha, False)
    largest = n_group / (1 - alpha)
    assert np.abs(got - want).max() <= BOUNDED_SCORING_TOL * largest
    # what the engine sums: the last k query rows, weighted alpha^(n-1-q)
    w = alpha ** (n - 1 - np.arange(n))
    w[: n - k] = 0.0
    last_rows = np.einsum("q,lhqk->lk", w, fr.probs)
    assert np.abs(want - last_rows).max() > 2e-5  # the 25 rows carry more than the tolerance below
    np.testing.assert_allclose(got, last_rows, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy,kw", [("h2o", {}), ("vatp", {}), ("mean", {}),
                                       ("a2sf", {"forgetting_factor": 0.95, "decode_scoring": "eager"})],
                         ids=["h2o", "vatp", "mean", "a2sf-eager"])
def test_flash_attention_prefill_that_scores_every_row_is_as_exact_as_without(tiny_f32, policy, kw):
    # A ubatch whose every query row counts (alpha = 1; alpha = 0.95 scored eagerly counts
    # 225 rows, more than the ubatch) takes the unfused attention with flash attention on:
    # its scores and logits carry no F16 rounding of the fused kernel, so the FA-off
    # tolerance of the test above holds in every layer (with the fused kernel, layer 1
    # already reads layer 0's F16-rounded output: errors of ~1e-3 in scores, ~1e-2 in logits)
    ub = 128
    n = 200
    ref = ReferenceLlama(tiny_f32)
    toks = [int(t) for t in np.random.default_rng(2).integers(3, 290, n)]
    llm = Llama(tiny_f32, n_ctx=256, n_batch=ub, n_ubatch=ub, n_threads=1, kv_policy=policy, flash_attn=True,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, n_sink=1, n_recent=1, logits_all=True, verbose=False, **kw)
    llm.eval(toks)
    assert llm.kv_stats()["lazy_queries"] == 0  # scored in the ubatch's own graph
    got = llm.kv_scores().scores
    fr = ref.forward(toks)
    alpha = kw.get("forgetting_factor", 1.0)
    want = accumulate_scores(fr.probs, fr.v_l1, ubatch_sizes(n, ub), alpha, policy == "vatp")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(llm.scores[:n]), fr.logits, rtol=1e-4, atol=1e-4)
    llm.close()


def _run_quantized_v(smollm2, policy, type_v, n_decode=8):
    """SmolLM2, flash attention on, a 200-token prompt then greedy decode steps: (logits after the
    prompt, greedy tokens, layer-0 scores per head or None)."""
    llm = Llama(smollm2, n_ctx=512, kv_policy=policy, type_v=type_v, flash_attn=True, n_threads=1, verbose=False)
    llm.eval(emma_tokens(llm, 200))
    logits = last_logits(llm)
    scores = llm.kv_head_scores()[1][0].copy() if policy else None
    tokens = []
    for _ in range(n_decode):
        tok = int(last_logits(llm).argmax())
        tokens.append(tok)
        llm.eval([tok])
    llm.close()
    return logits, tokens, scores


@pytest.mark.parametrize("policy", ["h2o", "a2sf", "vatp"])
def test_quantized_v_with_flash_attention_reads_as_vanilla(smollm2, policy):
    """A Q8_0 V exists only with flash attention, and llama.cpp's unfused path cannot transpose it:
    a scored layer keeps the fused kernel there (prefill and decode), so the logits and greedy
    tokens are vanilla llama.cpp's with the same cache (they were NaN when it took the unfused path)."""
    from llama_cpp import GGML_TYPE_Q8_0

    ref_logits, ref_tokens, _ = _run_quantized_v(smollm2, None, GGML_TYPE_Q8_0)
    logits, tokens, scores = _run_quantized_v(smollm2, policy, GGML_TYPE_Q8_0)
    assert np.isfinite(logits).all() and np.isfinite(scores).all()
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-3)
    assert tokens == ref_tokens


def test_vatp_norms_of_a_quantized_v_are_the_models_values(smollm2):
    """llama.cpp stores a quantized V Hadamard-rotated; VATP's L1 value norm must be the norm of the
    value the model computed, not of the rotated one: layer 0 (the same inputs and attention for both
    V types) scores as with an F16 V, which the numpy reference checks (test_engine_reference)."""
    from llama_cpp import GGML_TYPE_F16, GGML_TYPE_Q8_0

    _, _, f16 = _run_quantized_v(smollm2, "vatp", GGML_TYPE_F16, n_decode=0)
    _, _, q8 = _run_quantized_v(smollm2, "vatp", GGML_TYPE_Q8_0, n_decode=0)
    np.testing.assert_allclose(q8, f16, rtol=1e-5, atol=1e-6 * np.abs(f16).max())
