"""Lazy scoring (cpp/src/llama-kv-lazy.cpp): with flash attention, decode steps (and,
for alpha < 1, prefill ubatches) store their queries and one batched product scores
them when the scores are needed.

It must give the eager path's scores (every decode step scored in its own graph) and
the numpy reference's, for every scored policy and granularity, across the events
that flush the ring: the ring filling, a score read, eviction, ``seq_rm``, a state
save and load, and a change of sequence in a stream.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import llama_cpp
from a2sf import Llama
from a2sf.policies import make_policy
from a2sf.sysinfo import cpu_vendor
from a2sf.testing.reference import ReferenceLlama, accumulate_scores
from conftest import BOUNDED_SCORING_TOL
from test_multi_sequence import SEQ0, SEQ1, Ctx, _scores

GGML_TYPE_F32 = 0
# lazy and eager compute the same probabilities in another order of float sums
SAME = dict(rtol=1e-5, atol=1e-5)
N_PROMPT, N_DECODE = 24, 70  # 70 decode steps: the 64-query ring fills once
POLICIES = [("h2o", {}), ("tova", {}), ("a2sf", {"forgetting_factor": 0.5}), ("vatp", {}), ("mean", {})]


def _llm(path, decode_scoring, n_ctx=256, flash_attn=True, **policy):
    return Llama(path, n_ctx=n_ctx, n_batch=16, n_ubatch=8, n_threads=1, n_threads_batch=1,
                 type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=flash_attn, verbose=False,
                 decode_scoring=decode_scoring, **policy)


def _tokens(n, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(3, 290, n)]


def _left_out(alpha, n_group):
    """For 0 < alpha < 1 eager scoring sums a ubatch's last rows_that_count query rows and a
    window ring the stream's last ones: what either leaves out adds at most
    BOUNDED_SCORING_TOL of the largest score a cell can carry, n_group/(1-alpha)."""
    return BOUNDED_SCORING_TOL * n_group / (1 - alpha) if 0 < alpha < 1 else 0.0


def _feed(llm, tokens, n_prompt):
    llm.eval(tokens[:n_prompt])
    for t in tokens[n_prompt:]:
        llm.eval([t])


@pytest.mark.parametrize("granularity", ["token", "head"])
@pytest.mark.parametrize("policy,kw", POLICIES, ids=[p for p, _ in POLICIES])
def test_lazy_scores_equal_eager_and_the_reference(core, tiny_f32, policy, kw, granularity):
    tokens = _tokens(N_PROMPT + N_DECODE)
    got = {}
    for mode in ("eager", "lazy"):
        llm = _llm(tiny_f32, mode, kv_policy=policy, granularity=granularity, **kw)
        _feed(llm, tokens, N_PROMPT)
        s = llm.kv_scores()
        got[mode] = (s.positions.copy(), s.scores.astype(np.float64), llm.kv_head_scores()[1].copy(), llm.kv_stats())
        llm.close()
    (pe, se, he, ste), (pl, sl, hl, stl) = got["eager"], got["lazy"]
    assert ste["lazy_queries"] == 0 and ste["lazy_flushes"] == 0
    if make_policy(policy, **kw).forgetting_factor < 1:
        # a window ring: the prompt's ubatches too, and no flush but the read's
        assert stl["lazy_queries"] == N_PROMPT + N_DECODE and stl["lazy_flushes"] == 1
    else:
        # every decode step went through the ring: one flush when it filled, one for the read
        assert stl["lazy_queries"] == N_DECODE and stl["lazy_flushes"] == 2
    pol = make_policy(policy, **kw)
    model = ReferenceLlama(tiny_f32)
    np.testing.assert_array_equal(pl, pe)
    same = dict(SAME, atol=SAME["atol"] + _left_out(pol.forgetting_factor, model.n_head // model.n_head_kv))
    np.testing.assert_allclose(sl, se, **same)
    np.testing.assert_allclose(hl, he, **same)
    # layer 0 reads the reference's own inputs (flash attention rounds deeper layers' inputs)
    fr = model.forward(tokens)
    ub = [8, 8, 8] + [1] * N_DECODE
    ref = accumulate_scores(fr.probs, fr.v_l1, ub, pol.forgetting_factor, pol.value_aware)
    np.testing.assert_allclose(sl[0], ref[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_ubatch", [8, 128])
@pytest.mark.parametrize("policy,kw", [("a2sf", {"forgetting_factor": 0.5}), ("tova", {})], ids=["a2sf", "tova"])
def test_a_long_prompt_is_scored_once_over_its_last_rows(core, tiny_f32, policy, kw, n_ubatch):
    """alpha < 1: a prompt of 200 tokens goes through a 64-query window ring (wrapping
    three times; with 128-token ubatches a ubatch is longer than the ring) and is scored
    in one product at the read, as eager scoring and the numpy reference score it."""
    n_prompt, n_decode = 200, 20
    tokens = _tokens(n_prompt + n_decode, seed=5)
    got = {}
    for mode in ("eager", "lazy"):
        llm = Llama(tiny_f32, n_ctx=256, n_batch=128, n_ubatch=n_ubatch, n_threads=1, n_threads_batch=1,
                    type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=True, verbose=False,
                    decode_scoring=mode, kv_policy=policy, **kw)
        _feed(llm, tokens, n_prompt)
        s = llm.kv_scores()
        got[mode] = (s.positions.copy(), s.scores.astype(np.float64), llm.kv_stats())
        llm.close()
    (pe, se, ste), (pl, sl, stl) = got["eager"], got["lazy"]
    assert stl["lazy_queries"] == n_prompt + n_decode and stl["lazy_flushes"] == 1
    np.testing.assert_array_equal(pl, pe)
    np.testing.assert_allclose(sl, se, **SAME)
    pol = make_policy(policy, **kw)
    fr = ReferenceLlama(tiny_f32).forward(tokens)
    ub, left = [], n_prompt
    while left:
        call = min(128, left)
        left -= call
        while call:
            ub.append(min(n_ubatch, call))
            call -= ub[-1]
    ref = accumulate_scores(fr.probs, fr.v_l1, ub + [1] * n_decode, pol.forgetting_factor, pol.value_aware)
    np.testing.assert_allclose(sl[0], ref[0], rtol=1e-4, atol=1e-4)


def test_without_flash_attention_nothing_is_deferred(core, tiny_f32):
    llm = _llm(tiny_f32, "lazy", flash_attn=False, kv_policy="a2sf")
    _feed(llm, _tokens(40), 20)
    llm.kv_scores()
    assert llm.kv_stats()["lazy_queries"] == 0


@pytest.mark.parametrize("granularity", ["token", "head"])
def test_continuous_eviction_keeps_the_same_tokens_lazy_and_eager(core, tiny_f32, granularity):
    """A 256-cell cache over 340 tokens: each eviction event flushes the ring first, so
    lazy and eager evict the same tokens and generate from the same cache."""
    tokens = _tokens(340, seed=1)
    got = {}
    for mode in ("eager", "lazy"):
        llm = _llm(tiny_f32, mode, n_ctx=256, kv_policy="a2sf", granularity=granularity, n_recent=16,
                   positions="absolute", logits_all=True)
        _feed(llm, tokens, 200)
        s = llm.kv_scores()
        got[mode] = (s.token_index.copy(), s.scores.astype(np.float64), llm.kv_head_scores()[0].copy(),
                     np.array(llm.scores[llm.n_tokens - 1]), llm.kv_stats())
        llm.close()
    (te, se, he, le, ste), (tl, sl, hl, ll, stl) = got["eager"], got["lazy"]
    assert ste["evictions"] == stl["evictions"] > 3
    assert stl["lazy_flushes"] >= ste["evictions"]
    np.testing.assert_array_equal(tl, te)
    np.testing.assert_array_equal(hl, he)
    np.testing.assert_allclose(sl, se, **SAME)
    np.testing.assert_allclose(ll, le, rtol=1e-5, atol=1e-5)


def test_seq_rm_scores_the_pending_queries_first(core, tiny_f32):
    """Removing the last positions (as llama-cpp-python does when a new prompt diverges)
    changes what the pending queries attended: they are scored before the cells go."""
    tokens = _tokens(60, seed=2)
    got = {}
    for mode in ("eager", "lazy"):
        llm = _llm(tiny_f32, mode, kv_policy="h2o")
        _feed(llm, tokens[:40], 20)
        mem = llama_cpp.llama_get_memory(llm._ctx.ctx)
        assert llama_cpp.llama_memory_seq_rm(mem, 0, 35, -1)
        llm.n_tokens = 35
        _feed(llm, tokens[:35] + tokens[40:], 35)
        s = llm.kv_scores()
        got[mode] = (s.positions.copy(), s.scores.astype(np.float64), llm.kv_stats())
        llm.close()
    np.testing.assert_array_equal(got["lazy"][0], got["eager"][0])
    np.testing.assert_allclose(got["lazy"][1], got["eager"][1], **SAME)
    assert got["lazy"][2]["lazy_flushes"] >= 2  # one at seq_rm, one at the read


def test_state_saved_with_pending_queries_carries_their_scores(core, tiny_f32):
    tokens = _tokens(50, seed=3)
    eager = _llm(tiny_f32, "eager", kv_policy="a2sf")
    _feed(eager, tokens, 20)
    ref = eager.kv_scores().scores.astype(np.float64)
    eager.close()

    lazy = _llm(tiny_f32, "lazy", kv_policy="a2sf")
    _feed(lazy, tokens[:40], 20)
    state = lazy.save_state()  # 20 decode queries pending
    lazy.close()
    restored = _llm(tiny_f32, "lazy", kv_policy="a2sf")
    restored.load_state(state)
    for t in tokens[40:]:
        restored.eval([t])
    np.testing.assert_allclose(restored.kv_scores().scores, ref, **SAME)
    restored.close()


@pytest.mark.parametrize("kv_unified", [True, False], ids=["one-stream", "two-streams"])
def test_two_sequences_decoding_lazily_match_the_reference(core, tiny_f32, kv_unified):
    """Two sequences decode one token each per ubatch: in one stream the ring holds one
    sequence, so each change of sequence flushes it; in two streams each stream's ring
    holds its own sequence. Both equal the reference run on each sequence alone."""
    pol = make_policy("a2sf", forgetting_factor=0.8)
    native = dict(pol.to_native(), decode_scoring=1)
    c = Ctx(tiny_f32, kv_unified=kv_unified, flash_attn=True)
    try:
        core.set_policy(c.addr, **native)
        c.decode([(t, i, 0) for i, t in enumerate(SEQ0)])
        c.decode([(t, i, 1) for i, t in enumerate(SEQ1)])
        dec = [[70, 71, 72, 73], [80, 81, 82, 83]]
        for i in range(4):
            if kv_unified:  # alternate: one sequence per ubatch
                c.decode([(dec[0][i], len(SEQ0) + i, 0)])
                c.decode([(dec[1][i], len(SEQ1) + i, 1)])
            else:  # one ubatch, one token per stream
                c.decode([(dec[0][i], len(SEQ0) + i, 0), (dec[1][i], len(SEQ1) + i, 1)])
        ref = ReferenceLlama(tiny_f32)
        for k, (prompt, toks) in enumerate(((SEQ0, SEQ0 + dec[0]), (SEQ1, SEQ1 + dec[1]))):
            fr = ref.forward(toks)
            exp = accumulate_scores(fr.probs, fr.v_l1, [len(prompt)] + [1] * 4, pol.forgetting_factor, False)
            pos, got = _scores(core, c, k)
            assert pos.tolist() == list(range(len(toks)))
            np.testing.assert_allclose(got[0], exp[0], rtol=1e-4, atol=1e-4, err_msg=f"sequence {k}")
            np.testing.assert_allclose(got, exp, rtol=2e-2, atol=5e-3, err_msg=f"sequence {k}")
        stats = core.stats(c.addr)
        # alpha < 1: the prompts went through the window ring as well as the decode steps
        assert stats["n_lazy_queries"] == len(SEQ0) + len(SEQ1) + 8
    finally:
        c.close()


@pytest.mark.parametrize("policy,kw", POLICIES, ids=[p for p, _ in POLICIES])
def test_auto_scores_each_decode_step_of_a_cpu_cache_in_its_own_graph(core, tiny_f32, policy, kw):
    # the default: on a host cache a decode step scores in its own graph (nothing deferred),
    # with the unfused attention where ggml runs AVX-512 kernels on an Intel CPU; alpha < 1 prompts still go
    # through the window ring
    tokens = _tokens(N_PROMPT + N_DECODE)
    llm = Llama(tiny_f32, n_ctx=256, n_batch=16, n_ubatch=8, n_threads=1, n_threads_batch=1, type_k=GGML_TYPE_F32,
                type_v=GGML_TYPE_F32, flash_attn=True, logits_all=True, verbose=False, kv_policy=policy, **kw)
    assert llm.kv_policy.decode_scoring == "auto"
    _feed(llm, tokens, N_PROMPT)
    got = llm.kv_scores().scores
    stats = llm.kv_stats()
    pol = make_policy(policy, **kw)
    fr = ReferenceLlama(tiny_f32).forward(tokens)
    want = accumulate_scores(fr.probs, fr.v_l1, [8, 8, 8] + [1] * N_DECODE, pol.forgetting_factor, pol.value_aware)
    if pol.forgetting_factor < 1:
        assert stats["lazy_queries"] == N_PROMPT  # the prompt's window; no decode step
        np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
    elif core.auto_decode_unfused():
        # no fused kernel anywhere (8-token ubatches of alpha = 1 take it too): every layer
        # and the logits read exact F32 attention
        assert stats["lazy_queries"] == 0
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        logits = np.asarray(llm.scores[:len(tokens)])
        np.testing.assert_allclose(logits, fr.logits, rtol=1e-4, atol=1e-4)
    else:
        # the fused kernel computes the attention output (its F16 rounding reaches layer 1's
        # input), the scores come from an exact K*q product
        assert stats["lazy_queries"] == 0
        np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=5e-3)
    llm.close()


def test_auto_takes_the_unfused_decode_attention_exactly_where_ggml_runs_avx512_on_an_intel_cpu(core):
    # measured: faster than the fused kernel on an Intel Xeon with AVX-512, 0.4-0.6 of it on
    # AMD EPYCs with AVX2 and with AVX-512 (cpp/src/llama-kv-score.cpp)
    info = llama_cpp.llama_print_system_info().decode()
    on_intel_avx512 = "AVX512 = 1" in info and cpu_vendor() == "GenuineIntel"
    want = {"0": False, "1": True}.get(os.environ.get("A2SF_AUTO_DECODE_UNFUSED"), on_intel_avx512)
    assert core.auto_decode_unfused() == want


def test_auto_scores_as_the_reference_on_the_other_kind_of_cpu_too(core):
    # the other path of "auto" (the fused kernel plus the product where this CPU has
    # AVX-512 on an Intel CPU, the unfused attention where it has not), forced in a fresh process: the
    # choice is made once per process
    flip = "0" if core.auto_decode_unfused() else "1"
    test = f"{__file__}::test_auto_scores_each_decode_step_of_a_cpu_cache_in_its_own_graph"
    env = {**os.environ, "A2SF_AUTO_DECODE_UNFUSED": flip}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", test],
                          cwd=os.path.dirname(__file__), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert f"{len(POLICIES)} passed" in proc.stdout


def test_decode_scoring_rejects_unknown_values(tiny_f32):
    with pytest.raises(ValueError, match="decode_scoring must be one of eager, lazy, auto, got 'later'"):
        _llm(tiny_f32, "later", kv_policy="a2sf")


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("decode_scoring", ["auto", "eager", "lazy"])
@pytest.mark.parametrize("granularity", ["token", "head"])
def test_decode_steps_reuse_llama_cpps_graph_with_a_policy(tiny_f32, flash_attn, decode_scoring, granularity):
    # llama.cpp rebuilds no graph between decode steps of the same shape; scoring must not cost
    # that either. Without an eviction only the first step after the prompt builds (plus one for
    # the prompt's ring flush in the first step, with flash attention and alpha < 1).
    n_steps = 30
    llm = Llama(tiny_f32, n_ctx=256, n_batch=64, n_threads=1, n_threads_batch=1, flash_attn=flash_attn,
                verbose=False, kv_policy="a2sf", decode_scoring=decode_scoring, granularity=granularity)
    toks = _tokens(100 + n_steps)
    llm.eval(toks[:100])
    before = llama_cpp.llama_perf_context(llm._ctx.ctx).n_reused
    for t in toks[100:]:
        llm.eval([t])
    reused = llama_cpp.llama_perf_context(llm._ctx.ctx).n_reused - before
    assert llm.kv_stats()["evictions"] == 0
    assert reused >= n_steps - 2, f"{reused} of {n_steps} decode graphs reused"
    llm.close()
