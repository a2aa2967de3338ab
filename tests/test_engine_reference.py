"""Engine scores against the numpy reference, on the tiny random F32 LLaMA.

The reference's conventions (RoPE, GQA, scale) are first checked against
llama.cpp's own logits; then the scores the engine accumulates must equal the
reference's to 1e-4 for several forgetting factors, with and without value
weighting, over a prefill split in several ubatches followed by decode steps,
with flash attention off and on, and for a Q8_0 model.
"""
from __future__ import annotations

import numpy as np
import pytest

from a2sf import Llama
from a2sf.policies import make_policy
from a2sf.testing.reference import ReferenceLlama, accumulate_scores, ubatch_sizes

from conftest import kv_scores_after_decode

GGML_TYPE_F32 = 0
TEXT = b"The quick brown fox jumps over the lazy dog. It is a test of the tiny model, and of its cache."
N_BATCH, N_UBATCH, N_DECODE = 16, 8, 6
TOL = dict(rtol=1e-4, atol=1e-4)


def _llm(path, policy=None, flash_attn=False, logits_all=False, **kw):
    return Llama(path, n_ctx=256, n_batch=N_BATCH, n_ubatch=N_UBATCH, n_threads=2,
                 type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=flash_attn,
                 logits_all=logits_all, kv_policy=policy, verbose=False, seed=1, **kw)


@pytest.fixture(scope="module")
def tokens(tiny_f32):
    llm = _llm(tiny_f32)
    prompt = llm.tokenize(TEXT)
    # decode tokens: arbitrary but fixed ids
    return prompt, [17, 42, 260, 99, 280, 5][:N_DECODE]


@pytest.fixture(scope="module")
def reference(tiny_f32, tokens):
    prompt, decode = tokens
    return ReferenceLlama(tiny_f32).forward(prompt + decode)


def _ubatches(n_prompt):
    sizes = []
    for i in range(0, n_prompt, N_BATCH):  # Llama.eval chunks by n_batch,
        sizes += ubatch_sizes(min(N_BATCH, n_prompt - i), N_UBATCH)  # decode splits by n_ubatch
    return sizes + [1] * N_DECODE


def test_reference_logits_match_llama_cpp(tiny_f32, tokens, reference):
    prompt, decode = tokens
    llm = _llm(tiny_f32, logits_all=True)
    llm.eval(prompt + decode)
    got = llm.scores[: len(prompt) + len(decode)]
    np.testing.assert_allclose(got, reference.logits, rtol=1e-4, atol=1e-4)


def test_reference_is_consistent():
    rng = np.random.default_rng(0)
    L, H, Hkv, T = 2, 4, 2, 12
    logits = rng.standard_normal((L, H, T, T))
    logits[..., np.triu(np.ones((T, T), bool), 1)] = -np.inf
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    v = rng.random((L, Hkv, T)) + 0.5
    # alpha = 1: plain column sums (H2O); alpha = 0: last query only (TOVA)
    np.testing.assert_allclose(accumulate_scores(probs, v, [5, 4, 1, 1, 1], 1.0), probs.sum(axis=(1, 2)))
    np.testing.assert_allclose(accumulate_scores(probs, v, [5, 4, 1, 1, 1], 0.0), probs[:, :, -1].sum(1))
    # one query at a time equals any ubatch split (fresh cells start at 0)
    a = 0.7
    np.testing.assert_allclose(accumulate_scores(probs, v, [1] * T, a), accumulate_scores(probs, v, [7, 5], a))
    # value weighting: head h reads kv head h // 2
    w = accumulate_scores(probs, v, [T], 1.0, value_aware=True)
    expect = sum(probs[:, h].sum(1) * v[:, h // 2] for h in range(H))
    np.testing.assert_allclose(w, expect)


def _engine_scores(llm, n_tokens):
    s = llm.kv_scores()
    assert s.positions.tolist() == list(range(n_tokens))
    assert s.scores.shape == (2, n_tokens) and s.scores.dtype == np.float32
    assert s.cells.dtype == np.int32 and len(set(s.cells.tolist())) == n_tokens
    return s.scores.astype(np.float64)


def _run(tiny_f32, tokens, policy, flash_attn=False):
    prompt, decode = tokens
    llm = _llm(tiny_f32, policy, flash_attn=flash_attn)
    llm.eval(prompt)  # prefill: ubatches of N_UBATCH inside batches of N_BATCH
    after_prefill = _engine_scores(llm, len(prompt))
    for t in decode:
        llm.eval([t])
    return after_prefill, _engine_scores(llm, len(prompt) + len(decode)), llm


@pytest.mark.parametrize("value_aware", [False, True], ids=["attn", "value"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.95, 1.0])
def test_scores_match_reference(core, tiny_f32, tokens, reference, alpha, value_aware):
    prompt, decode = tokens
    policy = make_policy("a2sf", forgetting_factor=alpha, value_aware=value_aware)
    pre, post, llm = _run(tiny_f32, tokens, policy)
    ub = _ubatches(len(prompt))
    n_prefill_ub = len(ub) - N_DECODE
    assert n_prefill_ub >= 4  # the prefill really is several ubatches
    fr = reference
    probs_p = fr.probs[:, :, : len(prompt), : len(prompt)]
    ref_pre = accumulate_scores(probs_p, fr.v_l1[:, :, : len(prompt)], ub[:n_prefill_ub], alpha, value_aware)
    ref_post = accumulate_scores(fr.probs, fr.v_l1, ub, alpha, value_aware)
    np.testing.assert_allclose(pre, ref_pre, **TOL)
    np.testing.assert_allclose(post, ref_post, **TOL)
    assert llm.kv_stats()["evictions"] == 0


@pytest.mark.parametrize("policy", ["h2o", "vatp", "a2sf", "tova"])
def test_flash_attention_scores_match_reference(core, tiny_f32, tokens, reference, policy):
    """With flash attention on, the scoring ops see the reference's probabilities.

    Layer 0 reads the same inputs as the reference, so its scores agree to float
    precision. Deeper layers read hidden states that llama.cpp's flash-attention
    kernel computed with Q/K/V rounded to F16, so they agree only to ~1e-3; the
    ranking that eviction uses must still be the reference's.
    """
    prompt, _ = tokens
    pol = make_policy(policy)
    pre, post, llm = _run(tiny_f32, tokens, pol, flash_attn=True)
    assert llm.kv_stats()["evictions"] == 0
    ub = _ubatches(len(prompt))
    n_prefill_ub = len(ub) - N_DECODE
    fr, n = reference, len(prompt)
    ref_pre = accumulate_scores(fr.probs[:, :, :n, :n], fr.v_l1[:, :, :n], ub[:n_prefill_ub],
                                pol.forgetting_factor, pol.value_aware)
    ref_post = accumulate_scores(fr.probs, fr.v_l1, ub, pol.forgetting_factor, pol.value_aware)
    for got, ref in ((pre, ref_pre), (post, ref_post)):
        np.testing.assert_allclose(got[0], ref[0], **TOL)
        np.testing.assert_allclose(got, ref, rtol=2e-2, atol=5e-3)
        np.testing.assert_array_equal(np.argsort(-got.sum(0))[:5], np.argsort(-ref.sum(0))[:5])


def test_scores_reset_when_a_cell_is_rewritten(core, tiny_f32, tokens, reference):
    """Re-evaluating after a truncation rewrites cells; their scores restart at 0."""
    prompt, decode = tokens
    alpha = 0.5
    llm = _llm(tiny_f32, make_policy("a2sf", forgetting_factor=alpha))
    llm.eval(prompt + decode)
    llm.reset()  # n_tokens = 0: the next eval clears the cache and rewrites the cells
    llm.eval(prompt)
    ub = _ubatches(len(prompt))[:-N_DECODE]
    n = len(prompt)
    ref = accumulate_scores(reference.probs[:, :, :n, :n], reference.v_l1[:, :, :n], ub, alpha)
    np.testing.assert_allclose(_engine_scores(llm, n), ref, **TOL)


def test_streaming_and_random_keep_no_scores_but_list_cells(core, tiny_f32, tokens):
    prompt, decode = tokens
    for name in ("streaming", "random"):
        llm = _llm(tiny_f32, name)
        s = kv_scores_after_decode(llm, prompt, decode)
        n = len(prompt) + len(decode)
        assert s.scores.shape == (2, n)
        np.testing.assert_array_equal(s.scores, np.zeros((2, n), np.float32), err_msg=name)


@pytest.mark.parametrize("policy", ["a2sf", "vatp"])
def test_q8_0_model_matches_reference(core, tiny_q8, policy):
    """Q8_0 weights: logits and scores equal the reference that dequantizes them
    (gguf.quants) and rounds each product's activations to Q8_0 as ggml's CPU
    Q8_0 dot product does; without that rounding they differ by ~0.5 logits."""
    pol = make_policy(policy, forgetting_factor=0.9)
    llm = _llm(tiny_q8, pol, logits_all=True)
    prompt = llm.tokenize(TEXT)
    decode = [17, 42, 260, 99, 280, 5]
    kv_scores_after_decode(llm, prompt, decode)
    T = len(prompt) + len(decode)
    ref = ReferenceLlama(tiny_q8).forward(prompt + decode)
    np.testing.assert_allclose(llm.scores[:T], ref.logits, rtol=1e-4, atol=1e-4)
    exp = accumulate_scores(ref.probs, ref.v_l1, _ubatches(len(prompt)), pol.forgetting_factor, pol.value_aware)
    np.testing.assert_allclose(_engine_scores(llm, T), exp, **TOL)
    # the rounding is what the engine does: without it the reference is visibly off
    plain = ReferenceLlama(tiny_q8, quantize_activations=False).forward(prompt + decode)
    assert np.abs(plain.logits - ref.logits).max() > 1e-2
    llm.close()


@pytest.mark.parametrize("policy", ["a2sf", "vatp", "streaming"])
def test_after_eviction_the_evicted_cells_are_gone_from_attention(core, tiny_f32, tokens, policy):
    """Logits and scores after a manual eviction equal the reference with those
    keys masked for every later query (the freed cells are reused by new tokens)."""
    prompt, decode = tokens
    # one token per cell: the reference masks each evicted token for every layer and head
    pol = make_policy(policy, n_sink=2, n_recent=8, **({} if policy == "streaming" else {"granularity": "token"}))
    # absolute positions: the reference keeps every token at its index (compaction, the
    # default for RoPE models, is checked against a rotated cache in test_compaction.py)
    llm = _llm(tiny_f32, pol, logits_all=True, positions="absolute")
    llm.eval(prompt)
    n = len(prompt)
    assert llm.kv_evict(10) == 10
    kept = set(llm.kv_scores().positions.tolist())
    evicted = sorted(set(range(n)) - kept)
    assert len(evicted) == 10 and all(pol.n_sink <= p < n - pol.n_recent for p in evicted)
    for t in decode:
        llm.eval([t])
    T = n + len(decode)
    visible = np.ones((T, T), dtype=bool)
    visible[np.ix_(range(n, T), evicted)] = False
    ref = ReferenceLlama(tiny_f32).forward(prompt + decode, visible=visible)
    np.testing.assert_allclose(llm.scores[:T], ref.logits, rtol=1e-4, atol=1e-4)
    s = llm.kv_scores()
    assert s.positions.tolist() == sorted(kept | set(range(n, T)))
    if pol.kind == 2:  # scored policies
        exp = accumulate_scores(ref.probs, ref.v_l1, _ubatches(n), pol.forgetting_factor, pol.value_aware)
        np.testing.assert_allclose(s.scores, exp[:, s.positions], **TOL)
