"""Eviction per layer and per (layer, KV head): each unit keeps its own tokens,
whole cells are still freed, and what every head holds, its scores and the logits
equal the numpy reference (a forward pass that masks exactly those tokens per head)."""
from __future__ import annotations

import numpy as np
import pytest
from llama_cpp import GGML_TYPE_F32

from a2sf import Llama
from a2sf.testing.reference import ReferenceLlama
from a2sf.testing.reference_units import UnitReference

UB = 8  # n_batch = n_ubatch: every eval chunk is one ubatch
SETTINGS = dict(n_sink=2, n_recent=8, evict_chunk=0)
POLICIES = {  # name -> (forgetting factor, value aware, mean attention)
    "a2sf": (0.95, False, False),
    "h2o": (1.0, False, False),
    "vatp": (1.0, True, False),
    "mean": (1.0, False, True),
}


@pytest.fixture(scope="module")
def ref(tiny_f32):
    return ReferenceLlama(tiny_f32)


def _tokens(n, seed):
    return [int(t) for t in np.random.default_rng(seed).integers(3, 290, n)]


def _run(tiny_f32, ref, policy, granularity, flash_attn, seed=0):
    """The same history through the engine and the reference: prefill, evict, more
    ubatches, evict, decode steps."""
    alpha, value_aware, mean = POLICIES[policy]
    llm = Llama(tiny_f32, n_ctx=128, n_batch=UB, n_ubatch=UB, n_threads=1, logits_all=True,
                kv_policy=policy, granularity=granularity, flash_attn=flash_attn, verbose=False,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, **SETTINGS)  # F32 cache: exact moves
    r = UnitReference(ref, granularity, alpha, SETTINGS["n_sink"], SETTINGS["n_recent"],
                      value_aware=value_aware, mean_attention=mean)
    toks = _tokens(60, seed)
    steps = [("feed", toks[:40]), ("evict", 12), ("feed", toks[40:56]), ("evict", 9),
             ("feed1", toks[56:60])]
    for what, arg in steps:
        if what == "evict":
            assert llm.kv_evict(arg) == arg
            r.evict(arg)
        elif what == "feed":
            llm.eval(arg)
            r.feed(arg, UB)
        else:
            for t in arg:  # decode steps: one token per ubatch
                llm.eval([t])
                r.feed([t], 1)
    return llm, r


def _held(llm):
    pos, scores = llm.kv_head_scores()
    return pos, scores


@pytest.mark.parametrize("granularity", ["layer", "head"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_each_unit_holds_the_reference_tokens_and_scores(tiny_f32, ref, policy, granularity):
    llm, r = _run(tiny_f32, ref, policy, granularity, flash_attn=False)
    pos, scores = _held(llm)
    want = r.held()
    S = r.unit_scores(ranked=False)  # the engine stores the accumulated score
    L, Hkv, n = pos.shape
    assert n == 60 - 12 - 9 == llm.kv_n_cells()  # whole cells were freed
    for l in range(L):
        for h in range(Hkv):
            order = np.argsort(pos[l, h])
            assert pos[l, h][order].tolist() == want[l][h].tolist(), (l, h)
            np.testing.assert_allclose(scores[l, h][order], S[l, h, want[l][h]], rtol=1e-4, atol=1e-4)
    if granularity == "head":  # the point: heads disagree about what to keep
        assert any(want[l][0].tolist() != want[l][h].tolist() for l in range(L) for h in range(1, Hkv))
    llm.close()


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_logits_equal_a_forward_that_masks_each_heads_evicted_tokens(tiny_f32, ref, granularity, flash_attn):
    llm, r = _run(tiny_f32, ref, "a2sf", granularity, flash_attn=flash_attn)
    logits, _, _ = r.forward()
    got = np.asarray(llm.scores[llm.n_tokens - 4:llm.n_tokens], dtype=np.float64)
    scale = np.abs(logits[-4:]).max()
    assert np.abs(got - logits[-4:]).max() / scale < 1e-3
    llm.close()


def test_token_granularity_moves_nothing_and_matches_today(tiny_f32, ref):
    llm, r = _run(tiny_f32, ref, "a2sf", "token", flash_attn=False)
    pos, _ = _held(llm)
    kv = llm.kv_scores()
    assert (pos == np.sort(kv.positions)[None, None, :]).all()
    assert llm.kv_stats()["move_events"] == 0
    want = r.held()[0][0]
    assert np.sort(kv.positions).tolist() == want.tolist()
    llm.close()


def test_head_granularity_moves_rows_and_counts_them(tiny_f32, ref):
    llm, _ = _run(tiny_f32, ref, "h2o", "head", flash_attn=False)
    st = llm.kv_stats()
    assert st["move_events"] >= 1 and st["bytes_moved"] > 0
    llm.close()
