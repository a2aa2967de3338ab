"""The engine on iSWA memory (Gemma 2/3): scores and eviction in the global cache.

A tiny random Gemma 3 (a2sf.testing.tiny_gemma3: 4 layers, sliding window 8,
layers 0..2 sliding-window, layer 3 global) gets a llama_kv_cache_iswa from
llama.cpp. Its logits and the scores of its one global layer must equal the
numpy reference (a2sf.testing.reference_gemma3) with F32 K/V; eviction runs in
the base cache, state round-trips, compaction keeps both caches consistent.
"""
from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

from a2sf import Llama
from a2sf.policies import POLICY_NAMES, make_policy
from a2sf.testing.reference import accumulate_scores, ubatch_sizes
from a2sf.testing.reference_gemma3 import ReferenceGemma3
from a2sf.testing.tiny_gemma3 import write_tiny_gemma3

from conftest import kv_scores_after_decode

GGML_TYPE_F32 = 0
TEXT = b"The quick brown fox jumps over the lazy dog. It is a test of the tiny model, and of its cache."
LONG = b"the cat sat on the mat and it is a test of a sliding window in the cache. " * 40
N_BATCH, N_UBATCH = 16, 8
TOL = dict(rtol=1e-4, atol=1e-4)
SCORED = [p for p in POLICY_NAMES if p != "none"]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return str(write_tiny_gemma3(tmp_path_factory.mktemp("tiny") / "tiny-gemma3.gguf", seed=0))


@pytest.fixture(scope="module")
def ref(gemma):
    return ReferenceGemma3(gemma)


def _llm(path, policy=None, **kw):
    # these tests follow one token per cell through the window and the compaction
    # (granularity token; the per-head tests at the end of this file pass their own)
    if isinstance(policy, str) and policy not in ("streaming", "random", "none"):
        kw.setdefault("granularity", "token")
    elif policy is not None and not isinstance(policy, str) and policy.granularity is None:
        policy = policy.replace(granularity="token")
    kw.setdefault("n_batch", N_BATCH)
    kw.setdefault("n_ubatch", N_UBATCH)
    return Llama(path, n_ctx=256, n_threads=1, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
                 kv_policy=policy, verbose=False, seed=1, **kw)


def _ubatches(n_prompt, n_decode):
    sizes = []
    for i in range(0, n_prompt, N_BATCH):
        sizes += ubatch_sizes(min(N_BATCH, n_prompt - i), N_UBATCH)
    return sizes + [1] * n_decode


def test_tiny_gemma3_is_iswa_and_only_global_layers_are_scored(core, gemma, ref):
    assert ref.is_swa == [True, True, True, False]
    llm = _llm(gemma, "h2o")
    mem = llama_cpp.llama_get_memory(llm._ctx.ctx)
    assert mem  # an iSWA memory, which the engine used to refuse (ERR_MEMORY)
    assert core.n_layers(llm._a2sf_ctx()) == 1
    llm.eval(llm.tokenize(TEXT))
    s = llm.kv_scores()
    assert s.scored_layers.tolist() == ref.global_layers == [3]
    assert s.scores.shape == (1, len(s))
    assert s["scored_layers"].tolist() == [3]


def test_logits_match_reference(core, gemma, ref):
    llm = _llm(gemma, "a2sf", logits_all=True)
    toks = llm.tokenize(TEXT)
    llm.eval(toks)
    fr = ref.forward(toks)
    np.testing.assert_allclose(np.asarray(llm.scores[: len(toks)]), fr.logits, **TOL)


@pytest.mark.parametrize("value_aware", [False, True], ids=["attn", "value"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_scores_match_reference(core, gemma, ref, alpha, value_aware):
    llm = _llm(gemma, make_policy("a2sf", forgetting_factor=alpha, value_aware=value_aware))
    prompt = llm.tokenize(TEXT)
    decode = [17, 42, 260, 99]
    s = kv_scores_after_decode(llm, prompt, decode)
    fr = ref.forward(prompt + decode)
    g = ref.global_layers
    expect = accumulate_scores(fr.probs[g], fr.v_l1[g], _ubatches(len(prompt), len(decode)), alpha, value_aware)
    np.testing.assert_allclose(s.scores.astype(np.float64), expect, **TOL)


@pytest.mark.parametrize("policy", SCORED)
def test_eviction_in_base_cache_keeps_cells_within_n_ctx(core, gemma, policy):
    llm = _llm(gemma, policy, n_batch=64, n_ubatch=64, logits_all=True)
    toks = llm.tokenize(LONG)[:600]
    assert len(toks) == 600
    llm.eval(toks)
    st = llm.kv_stats()
    assert st["evictions"] > 0
    assert st["cells_used"] <= 256 and llm.kv_n_cells() <= 256
    assert st["cells_evicted"] == len(toks) - llm.kv_n_cells()
    assert np.isfinite(np.asarray(llm.scores[: len(toks)])).all()
    s = llm.kv_scores()
    assert s.token_index[-1] == len(toks) - 1  # the newest token is kept
    # text keeps coming after the cache filled
    out = llm.create_completion("the cat", max_tokens=16, temperature=0.0)
    assert out["usage"]["completion_tokens"] > 0


def test_batch_that_cannot_fit_leaves_both_caches_untouched(core, gemma):
    llm = _llm(gemma, "h2o", n_batch=64, n_ubatch=64)
    toks = llm.tokenize(LONG)
    llm.eval(toks[:250])  # fits in the 256 cells: no eviction yet
    ctx = llm._a2sf_ctx()
    # protect every cell (a.k.a. what the Python guards refuse up front): 32 more tokens
    # cannot be placed however the base cache evicts
    pol = core.get_policy(ctx)
    core.set_policy(ctx, kind=pol["kind"], forgetting_factor=pol["forgetting_factor"], n_sink=4, n_recent=250)
    mem = llama_cpp.llama_get_memory(llm._ctx.ctx)

    def snapshot():
        s = llm.kv_scores()
        return (s.positions.tolist(), s.scores.tolist(), llama_cpp.llama_memory_seq_pos_min(mem, 0),
                llama_cpp.llama_memory_seq_pos_max(mem, 0))

    before = snapshot()
    batch = llama_cpp.llama_batch_init(32, 0, 1)
    try:
        batch.n_tokens = 32
        for i in range(32):
            batch.token[i] = toks[250 + i]
            batch.pos[i] = 250 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == 31
        assert llama_cpp.llama_decode(llm._ctx.ctx, batch) == 1  # "no memory slot"
    finally:
        llama_cpp.llama_batch_free(batch)
    assert snapshot() == before
    assert llm.kv_stats()["evictions"] == 0


def test_state_round_trip(core, gemma):
    llm = _llm(gemma, "a2sf", n_batch=64, n_ubatch=64)
    toks = llm.tokenize(LONG)
    llm.eval(toks[:400])
    assert llm.kv_stats()["evictions"] > 0
    state = llm.save_state()
    s0 = llm.kv_scores()
    llm.eval(toks[400:420])
    cont = llm.kv_scores()
    llm.load_state(state)
    s1 = llm.kv_scores()
    np.testing.assert_array_equal(s1.positions, s0.positions)
    np.testing.assert_array_equal(s1.scores, s0.scores)
    llm.eval(toks[400:420])
    again = llm.kv_scores()
    np.testing.assert_array_equal(again.positions, cont.positions)
    np.testing.assert_allclose(again.scores, cont.scores, rtol=1e-6, atol=1e-6)


def test_compaction_renumbers_both_caches(core, gemma):
    """positions='cache' (the default): after evictions both caches are renumbered; the
    sliding-window cache's newest cell sits on the global cache's newest position, so the
    next batch's positions are consecutive for llama.cpp's check on either cache."""
    llm = _llm(gemma, "h2o", n_batch=64, n_ubatch=64)
    assert llm.positions == "cache"
    toks = llm.tokenize(LONG)[:600]
    llm.eval(toks)
    assert llm.kv_stats()["compactions"] > 0
    mem = llama_cpp.llama_get_memory(llm._ctx.ctx)
    # llama_memory_seq_pos_max of iSWA memory reads the sliding-window cache
    assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == llm.kv_scores().positions.max() < len(toks)
    out = llm.create_completion("the cat", max_tokens=8, temperature=0.0)
    assert out["usage"]["completion_tokens"] > 0

    # one more compaction by hand: the global cache becomes 0..n-1 (the window of 8 is
    # narrower than the cache), the sliding-window cache ends at n-1 too
    llm2 = _llm(gemma, "h2o", n_batch=64, n_ubatch=64, positions="absolute")
    llm2.eval(toks)
    ctx = llm2._a2sf_ctx()
    held = llm2.kv_scores().positions
    assert held.max() == len(toks) - 1 and len(held) < len(toks)
    n = core.compact(ctx, 0)
    assert n == len(held)
    assert llm2.kv_scores().positions.tolist() == list(range(n))
    mem2 = llama_cpp.llama_get_memory(llm2._ctx.ctx)
    assert llama_cpp.llama_memory_seq_pos_max(mem2, 0) == n - 1
    assert n - 1 - llama_cpp.llama_memory_seq_pos_min(mem2, 0) >= 8 - 1  # the window is still whole


@pytest.mark.parametrize("positions", ["cache", "absolute"])
def test_window_wider_than_the_cache(core, tmp_path, positions):
    """Window 300 > 256 cells: the SWA cache fills too and gives up its oldest tokens;
    compaction then starts the global cache's positions above 0 so that no cell of the
    window needs a negative position (the offset the Python side carries)."""
    path = str(write_tiny_gemma3(tmp_path / "wide.gguf", sliding_window=300))
    llm = _llm(path, "h2o", n_batch=32, n_ubatch=32, positions=positions, logits_all=True)
    toks = llm.tokenize(LONG)[:600]
    llm.eval(toks)
    mem = llama_cpp.llama_get_memory(llm._ctx.ctx)
    lo, hi = llama_cpp.llama_memory_seq_pos_min(mem, 0), llama_cpp.llama_memory_seq_pos_max(mem, 0)
    assert hi - lo + 1 <= 256  # the SWA cache evicted (its window alone would be 300)
    s = llm.kv_scores()
    assert len(s) <= 256 and hi == s.positions.max()
    assert s.token_index[-1] == len(toks) - 1 and (np.diff(s.token_index) > 0).all()
    assert np.isfinite(np.asarray(llm.scores[: len(toks)])).all()
    if positions == "cache":
        assert llm.kv_stats()["compactions"] > 0 and hi < len(toks) - 1
    out = llm.create_completion("the cat", max_tokens=8, temperature=0.0)
    assert out["usage"]["completion_tokens"] > 0


def test_compaction_offset_when_the_window_holds_more_than_the_global_cache(core, tmp_path):
    path = str(write_tiny_gemma3(tmp_path / "wide.gguf", sliding_window=300))
    llm = _llm(path, "h2o", n_batch=64, n_ubatch=64, positions="absolute")
    toks = llm.tokenize(LONG)[:250]
    llm.eval(toks)
    assert llm.kv_evict(100) == 100  # the global cache keeps 150, the window all 250
    ctx = llm._a2sf_ctx()
    kept = llm.kv_scores().positions
    nxt = core.compact(ctx, 0)
    assert nxt == 250  # the window's 250 tokens keep their distances: positions 0..249
    assert llm.kv_scores().positions.tolist() == list(range(250 - len(kept), 250))
    mem = llama_cpp.llama_get_memory(llm._ctx.ctx)
    assert llama_cpp.llama_memory_seq_pos_min(mem, 0) == 0
    assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == 249
    # a no-op now: nothing moves
    assert core.compact(ctx, 0) == 250 and llm.kv_stats()["compactions"] == 1


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_logits_through_per_head_compactions_beside_the_window_equal_the_reference(core, tmp_path, granularity):
    """Per-head cells beside a sliding window, positions="cache": each compaction numbers the
    positions any global (layer, KV head) holds together with the window's, so the window
    shifts by one delta and keeps its distances. After every chunk the logits equal a numpy
    cache that drops what each global head dropped, masks the window layers' keys by
    distance, and re-rotates both at each compaction (each by its own RoPE base)."""
    from a2sf.testing.reference_cache import UnitCachedReference

    # layers 1 and 3 global; a window of 48 > n_recent, so it holds tokens every global head evicted
    path = str(write_tiny_gemma3(tmp_path / "g.gguf", swa_pattern=2, sliding_window=48))
    reference = ReferenceGemma3(path)
    glob = reference.global_layers
    assert glob == [1, 3]
    llm = _llm(path, "a2sf", granularity=granularity, positions="cache", n_sink=2, n_recent=8, evict_chunk=0,
               n_batch=8, n_ubatch=8, logits_all=True)
    assert llm.positions == "cache"
    c = UnitCachedReference(reference)
    toks = [int(t) for t in np.random.default_rng(0).integers(3, llm.n_vocab(), 1100)]
    for i in range(0, len(toks), 8):
        chunk = toks[i:i + 8]
        n_comp = llm.kv_stats()["compactions"]
        llm.eval(chunk)  # compacts first if due, evicts inside the decode if full
        if llm.kv_stats()["compactions"] > n_comp:
            c.compact()
        c.keep_held(llm.kv_head_scores()[0], glob)  # each global head keeps what the engine's kept
        p0 = llm._a2sf_positions.position_of(i)
        want = c.step(chunk, np.arange(p0, p0 + len(chunk)))
        got = np.array(llm.scores[i:i + len(chunk)], dtype=np.float64)
        # F32 noise reaches 2.5e-4 before any compaction; a window numbered apart from the
        # global heads' positions (shifted so that only its newest cell matches) reads 1.0-1.3
        assert np.abs(got - want).max() <= 5e-4 * np.abs(want).max(), i
    st = llm.kv_stats()
    assert st["compactions"] >= 3 and st["evictions"] >= 30 and st["move_events"] > 0
    pos, _ = llm.kv_head_scores()
    if granularity == "head":  # the heads of a layer hold different tokens
        assert (pos[:, 0] != pos[:, 1]).any()
    assert pos.max() < len(toks) - 256  # compaction lowered the positions by more than a cache
    # both caches end on the same newest position, the one the next token continues from
    mem = llama_cpp.llama_get_memory(llm._ctx.ctx)
    assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == pos.max() == llm._a2sf_positions.position_of(len(toks)) - 1
    out = llm.create_completion("the cat", max_tokens=4, temperature=0.0)
    assert out["usage"]["completion_tokens"] > 0


def test_per_head_state_after_a_compaction_beside_the_window_loads_into_a_new_context(core, tmp_path):
    """A state saved after per-head compactions beside the window (both caches renumbered, each
    global head holding its own tokens) loads into a fresh context, which then holds the same
    tokens per head and continues with the same logits."""
    path = str(write_tiny_gemma3(tmp_path / "g.gguf", swa_pattern=2, sliding_window=48))
    kw = dict(granularity="head", positions="cache", n_sink=2, n_recent=8, n_batch=8, n_ubatch=8, logits_all=True)
    llm = _llm(path, "a2sf", **kw)
    toks = [int(t) for t in np.random.default_rng(1).integers(3, llm.n_vocab(), 820)]
    llm.eval(toks[:800])
    assert llm.kv_stats()["compactions"] >= 1
    state = llm.save_state()
    pos0, sc0 = llm.kv_head_scores()
    llm.eval(toks[800:])
    want = np.array(llm.scores[800:820])

    other = _llm(path, "a2sf", **kw)
    other.load_state(state)
    pos1, sc1 = other.kv_head_scores()
    np.testing.assert_array_equal(pos1, pos0)
    np.testing.assert_array_equal(sc1, sc0)
    other.eval(toks[800:])
    # the loaded cells sum attention in another order: F32 noise (1.5e-5 seen on an AVX2-only CPU)
    np.testing.assert_allclose(np.array(other.scores[800:820]), want, rtol=1e-4, atol=1e-4)
