"""Eviction per layer and per (layer, KV head): each unit keeps its own tokens,
whole cells are still freed, and what every head holds, its scores and the logits
equal the numpy reference (a forward pass that masks exactly those tokens per head)."""
from __future__ import annotations

import numpy as np
import pytest
from llama_cpp import GGML_TYPE_F32

from a2sf import Llama
from a2sf.policies import make_policy
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


def _run(tiny_f32, ref, policy, granularity, flash_attn, seed=0, pool_kernel=1, pool_weight=1.0):
    """The same history through the engine and the reference: prefill, evict, more
    ubatches, evict, decode steps."""
    alpha, value_aware, mean = POLICIES[policy]
    llm = Llama(tiny_f32, n_ctx=128, n_batch=UB, n_ubatch=UB, n_threads=1, logits_all=True,
                kv_policy=policy, granularity=granularity, flash_attn=flash_attn, verbose=False,
                positions="absolute",  # the reference replays token positions; compaction is tested apart
                pool_kernel=pool_kernel, pool_weight=pool_weight,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, **SETTINGS)  # F32 cache: exact moves
    r = UnitReference(ref, granularity, alpha, SETTINGS["n_sink"], SETTINGS["n_recent"],
                      value_aware=value_aware, mean_attention=mean, pool_kernel=pool_kernel,
                      pool_weight=pool_weight)
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


def test_state_round_trip_keeps_what_each_head_holds(tiny_f32, ref):
    llm, _ = _run(tiny_f32, ref, "a2sf", "head", flash_attn=False)
    pos, scores = llm.kv_head_scores()
    state = llm.save_state()
    other = Llama(tiny_f32, n_ctx=128, n_batch=UB, n_ubatch=UB, n_threads=1, logits_all=True,
                  kv_policy="a2sf", granularity="head", positions="absolute", verbose=False, type_k=GGML_TYPE_F32,
                  type_v=GGML_TYPE_F32, **SETTINGS)
    other.load_state(state)
    pos2, scores2 = other.kv_head_scores()
    assert (pos2 == pos).all(), np.argwhere(pos2 != pos)[:8]
    np.testing.assert_array_equal(scores2, scores)
    # and it continues exactly like the original
    llm.eval([7])
    other.eval([7])
    np.testing.assert_allclose(other.scores[other.n_tokens - 1], llm.scores[llm.n_tokens - 1], rtol=1e-5, atol=1e-5)
    llm.close()
    other.close()


def test_prompt_compression_keeps_the_budget_per_head_and_moves_cells_to_the_front(tiny_f32, ref):
    llm = Llama(tiny_f32, n_ctx=256, n_batch=UB, n_ubatch=UB, n_threads=1, kv_policy="a2sf",
                granularity="head", kv_budget=24, pool_kernel=1, verbose=False, type_k=GGML_TYPE_F32,
                type_v=GGML_TYPE_F32, **SETTINGS)  # pooled compression: test_span_pooling_with_prompt_compression
    r = UnitReference(ref, "head", 0.95, SETTINGS["n_sink"], SETTINGS["n_recent"], pool_kernel=1)
    toks = _tokens(64, 3)
    llm.eval(toks)  # a prompt: compressed to 24 cells after it was read
    r.feed(toks, UB)
    r.evict(64 - 24)
    kv = llm.kv_scores()
    assert len(kv) == 24 and sorted(kv.cells.tolist()) == list(range(24))  # the front of the cache
    pos, _ = llm.kv_head_scores()
    want = r.held()
    for l in range(pos.shape[0]):
        for h in range(pos.shape[1]):
            assert sorted(pos[l, h].tolist()) == want[l][h].tolist(), (l, h)
    llm.eval([5])  # decoding goes on after the compressed prompt
    assert llm.kv_n_cells() == 25
    llm.close()


def test_cells_shared_with_another_sequence_never_move(tiny_f32):
    from a2sf import _core
    from test_multi_sequence import Ctx

    c = Ctx(tiny_f32, n_seq_max=2, n_batch=8)
    pol = make_policy("h2o", granularity="head", n_sink=1, n_recent=2, evict_chunk=0)
    _core.set_policy(c.addr, **pol.to_native())
    toks = _tokens(40, 4)
    for i in range(0, 40, 8):
        c.decode([(t, i + j, 0) for j, t in enumerate(toks[i:i + 8])])
    # seq 1 shares the first 10 positions with seq 0 (a shared prefix)
    import llama_cpp
    llama_cpp.llama_memory_seq_cp(llama_cpp.llama_get_memory(c.ctx), 0, 1, 0, 10)
    pos1, cells1, _ = _core.scores(c.addr, 1)
    before = dict(zip(cells1.tolist(), pos1.tolist()))
    assert _core.evict(c.addr, 0, 20) == 20
    pos1, cells1, _ = _core.scores(c.addr, 1)
    assert dict(zip(cells1.tolist(), pos1.tolist())) == before  # seq 1 untouched
    hpos, _ = _core.head_scores(c.addr, 0)
    _, cells0, _ = _core.scores(c.addr, 0)
    for i, cell in enumerate(cells0.tolist()):
        if cell in before:  # every head of seq 0 still holds the shared token there
            assert (hpos[:, :, i] == before[cell]).all()
    assert _core.stats(c.addr)["n_move_events"] >= 1  # the unshared cells did move
    c.close()


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_per_head_compaction_renumbers_each_head_and_the_logits_follow(tiny_f32, ref, granularity, flash_attn):
    """After per-head eviction, compaction renumbers the positions any (layer, head) holds
    0..m-1 and re-rotates each K row by its own delta; the next tokens' logits equal a numpy
    cache in which each head's kept keys (as computed when read) are rotated so."""
    from a2sf import _core
    from a2sf.testing.reference_cache import UnitCachedReference

    llm, r = _run(tiny_f32, ref, "a2sf", granularity, flash_attn=flash_attn)
    # the same history in an incremental numpy cache, each unit dropping what the engine dropped
    c = UnitCachedReference(ref)

    def drop_evicted_by(t):  # what each unit had evicted once t tokens were read
        for l in range(ref.n_layer):
            for h in range(ref.n_head_kv):
                c.keep(l, h, np.flatnonzero(r.evicted_at[l, h, :t] > t))

    for start, stop, ub in ((0, 40, UB), (40, 56, UB), (56, 60, 1)):  # _run's history
        drop_evicted_by(start)
        for i in range(start, stop, ub):
            c.step(r.tokens[i:i + ub], np.arange(i, i + ub))
    drop_evicted_by(60)
    pos0, _ = llm.kv_head_scores()
    cells0 = llm.kv_scores().cells.tolist()
    n = _core.compact(llm.ctx, 0)
    c.compact()
    pos1, _ = llm.kv_head_scores()
    cells1 = llm.kv_scores().cells.tolist()
    # one numbering for every unit: the positions any unit held become 0..n-1, so a token
    # keeps one position in every head that holds it
    held = np.unique(pos0)
    assert n == len(held) > pos1.shape[2] and llm.kv_stats()["compactions"] == 1
    for l in range(pos1.shape[0]):
        for h in range(pos1.shape[1]):
            old, now = dict(zip(cells0, pos0[l, h].tolist())), dict(zip(cells1, pos1[l, h].tolist()))
            assert {c: int(np.searchsorted(held, p)) for c, p in old.items()} == now
    assert llm.kv_scores().positions.max() == n - 1  # the newest token, in every unit
    # the next tokens: cache positions n, n+1, ...; eval() would give them 60.. (positions
    # are 'absolute' here), so decode them through the batch at the compacted positions
    new = _tokens(3, 9)
    want = c.step(new, np.arange(n, n + 3))
    llm._batch.set_batch(new, n_past=n, logits_all=True)
    llm._ctx.decode(llm._batch)
    got = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(3, want.shape[1])).astype(np.float64)
    tol = 5e-3 if flash_attn else 1e-4  # CPU flash attention rounds K/V through F16
    assert np.abs(got - want).max() <= tol * np.abs(want).max()
    llm.close()


@pytest.mark.parametrize("cache", ["f16", "f16-flash", "q8_0-flash"])
def test_host_copies_move_the_same_bytes_as_the_move_graph(tiny_f32, tmp_path, monkeypatch, cache):
    """A host-resident cache moves per-head rows with plain copies; A2SF_MOVES_ON_GRAPH=1
    forces the get_rows/set_rows graph a device cache uses. Per-head eviction and a
    compression (transposed V without flash attention, rows with it) leave the same
    tokens, scores and next logits either way; F16 moves bit for bit."""
    from llama_cpp import GGML_TYPE_F16, GGML_TYPE_Q8_0

    from a2sf.testing.tiny_gguf import write_tiny_llama

    type_k = GGML_TYPE_Q8_0 if cache.startswith("q8_0") else GGML_TYPE_F16
    model = tiny_f32
    if type_k == GGML_TYPE_Q8_0:  # a head of K must hold whole Q8_0 blocks (32)
        model = str(write_tiny_llama(tmp_path / "hd32.gguf", n_embd=128))
    out = {}
    for mode in ("host", "graph"):
        if mode == "graph":
            monkeypatch.setenv("A2SF_MOVES_ON_GRAPH", "1")
        else:
            monkeypatch.delenv("A2SF_MOVES_ON_GRAPH", raising=False)
        llm = Llama(model, n_ctx=128, n_batch=UB, n_ubatch=UB, n_threads=1, kv_policy="a2sf", logits_all=True,
                    granularity="head", flash_attn=cache.endswith("flash"), positions="absolute",
                    type_k=type_k, type_v=GGML_TYPE_F16, verbose=False, **SETTINGS)
        toks = _tokens(70, 3)
        llm.eval(toks[:50])
        assert llm.kv_evict(12) == 12
        llm.eval(toks[50:66])
        assert llm.kv_compress(30) == 30
        st = llm.kv_stats()
        moved = st["bytes_moved"]
        # eviction's per-head moves, compression's own, and its moves of the kept cells to the front
        assert st["move_events"] == 3 and st["host_moves"] == (3 if mode == "host" else 0)
        llm.eval(toks[66:70])
        kv = llm.kv_scores()
        out[mode] = (kv.positions, kv.scores, np.array(llm.scores[llm.n_tokens - 1]), moved)
        llm.close()
    (pos_h, sc_h, lg_h, mv_h), (pos_g, sc_g, lg_g, mv_g) = out["host"], out["graph"]
    assert mv_h == mv_g > 0
    np.testing.assert_array_equal(pos_h, pos_g)  # every head holds the same tokens
    np.testing.assert_array_equal(sc_h, sc_g)
    if cache.startswith("f16"):
        np.testing.assert_array_equal(lg_h, lg_g)
    else:  # the graph requantizes the K rows it moves; the copies keep them as they were
        assert np.abs(lg_h - lg_g).max() <= 1e-2 * np.abs(lg_g).max()


@pytest.mark.parametrize("n_ctx_train", [4096, 512])
def test_logits_through_many_per_head_compactions_equal_the_reference(tmp_path, n_ctx_train):
    """positions="cache" with per-head cells over a long stream: the engine evicts and
    compacts by itself (one numbering for every head; per head 0..n-1 when that would not
    leave a cache of positions below the training context, as with 512), and after every
    chunk the logits equal a numpy cache that drops what each head dropped and re-rotates
    its keys at each compaction."""
    from a2sf.testing.reference_cache import UnitCachedReference
    from a2sf.testing.tiny_gguf import write_tiny_llama

    path = str(write_tiny_llama(tmp_path / "t.gguf", n_ctx_train=n_ctx_train))
    reference = ReferenceLlama(path)
    llm = Llama(path, n_ctx=256, n_batch=UB, n_ubatch=UB, n_threads=1, logits_all=True, kv_policy="a2sf",
                granularity="head", positions="cache", n_sink=2, n_recent=8,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)
    c = UnitCachedReference(reference)
    toks = _tokens(1600, 0)
    n_per_unit = 0
    for i in range(0, len(toks), UB):
        chunk = toks[i:i + UB]
        n_comp = llm.kv_stats()["compactions"]
        llm.eval(chunk)  # compacts first if due, evicts inside the decode if full
        if llm.kv_stats()["compactions"] > n_comp:
            held = np.unique(np.concatenate([p for row in c.unit_pos for p in row]))
            per_unit = len(held) + 256 > n_ctx_train
            n_per_unit += per_unit
            c.compact(per_unit=per_unit)
        c.keep_held(llm.kv_head_scores()[0])  # each head keeps what the engine's head kept
        p0 = llm._a2sf_positions.position_of(i)
        want = c.step(chunk, np.arange(p0, p0 + len(chunk)))
        got = np.array(llm.scores[i:i + len(chunk)], dtype=np.float64)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), i
    st = llm.kv_stats()
    assert st["compactions"] >= 3 and st["evictions"] >= 30
    assert (n_per_unit == st["compactions"]) if n_ctx_train == 512 else n_per_unit == 0
    # a token has one position in every head that holds it
    tok_pos = {}
    for l in range(reference.n_layer):
        for h in range(reference.n_head_kv):
            for t, p in zip(c.tok[l][h].tolist(), c.unit_pos[l][h].tolist()):
                assert tok_pos.setdefault(t, p) == p or n_ctx_train == 512
    llm.close()


@pytest.mark.parametrize("then", ["a2sf/token", "streaming"])
def test_a_per_head_map_stays_true_after_a_switch_to_a_policy_that_does_not_track_heads(tiny_f32, ref, then):
    # per-head evictions move tokens between cells; a policy that ranks whole cells keeps
    # those rows where they are, so what each head holds must still follow every write
    llm, _ = _run(tiny_f32, ref, "a2sf", "head", flash_attn=False)
    name, _, gran = then.partition("/")
    llm.set_kv_policy(name, **({"granularity": gran} if gran else {}), **SETTINGS)
    n0 = llm.n_tokens
    llm.eval(_tokens(6, seed=9))
    pos, _ = llm.kv_head_scores()
    cells = llm.kv_scores()
    new = [i for i, p in enumerate(cells.positions) if p >= n0]
    assert len(new) == 6
    assert (pos[:, :, new] == cells.positions[new][None, None, :]).all()  # every head holds the new tokens
    for layer in pos:
        for head in layer:
            assert len(set(head.tolist())) == len(head)  # and no head holds a position twice
    llm.close()


# -- span pooling (pool_kernel) --------------------------------------------------------


def _held_by_unit(llm):
    pos, _ = llm.kv_head_scores()
    return [[sorted(pos[l, h].tolist()) for h in range(pos.shape[1])] for l in range(pos.shape[0])]


@pytest.mark.parametrize("weight", [1.0, 0.5])
@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("granularity", ["token", "layer", "head"])
def test_span_pooling_keeps_the_reference_tokens_in_every_unit(tiny_f32, ref, granularity, flash_attn, weight):
    llm, r = _run(tiny_f32, ref, "a2sf", granularity, flash_attn=flash_attn, pool_kernel=6, pool_weight=weight)
    want = [[w.tolist() for w in unit] for unit in r.held()]
    assert _held_by_unit(llm) == want
    # and pooling decided something: unpooled ranking keeps other tokens
    _, unpooled = _run(tiny_f32, ref, "a2sf", granularity, flash_attn=False, pool_kernel=1)
    assert [[w.tolist() for w in unit] for unit in unpooled.held()] != want
    llm.close()


@pytest.mark.parametrize("policy", ["a2sf", "h2o", "mean"])
def test_span_pooling_with_prompt_compression_keeps_the_reference_tokens_per_head(tiny_f32, ref, policy):
    alpha, _, mean = POLICIES[policy]
    llm = Llama(tiny_f32, n_ctx=256, n_batch=UB, n_ubatch=UB, n_threads=1, kv_policy=policy,
                granularity="head", kv_budget=24, pool_kernel=6, pool_weight=0.5, verbose=False,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, **SETTINGS)
    r = UnitReference(ref, "head", alpha, SETTINGS["n_sink"], SETTINGS["n_recent"], mean_attention=mean,
                      pool_kernel=6, pool_weight=0.5)
    toks = _tokens(64, 5)
    llm.eval(toks)
    r.feed(toks, UB)
    r.evict(64 - 24)
    assert _held_by_unit(llm) == [[w.tolist() for w in unit] for unit in r.held()]
    llm.close()


def test_pool_before_carries_an_attended_tokens_rank_to_the_tokens_after_it():
    from a2sf.testing.reference_units import pool_before

    pos = np.array([10, 11, 12, 13, 14, 16, 17])  # 15 was evicted before
    rank = np.array([0.0, 5.0, 0.1, 0.2, 0.0, 0.3, 0.0])
    np.testing.assert_array_equal(pool_before(pos, rank, 3), [0.0, 5.0, 5.0, 5.0, 0.2, 0.3, 0.3])
    np.testing.assert_array_equal(pool_before(pos, rank, 1), rank)
    np.testing.assert_array_equal(pool_before(pos, rank, 3, 0.5), [0.0, 5.0, 2.5, 2.5, 0.1, 0.3, 0.15])


@pytest.mark.parametrize("bad", [0, 257])
def test_pool_kernel_out_of_range_is_a_value_error(tiny_f32, bad):
    from a2sf import _core

    with pytest.raises(ValueError, match="pool_kernel"):
        Llama(tiny_f32, n_ctx=64, n_threads=1, kv_policy="a2sf", pool_kernel=bad, verbose=False)
    llm = Llama(tiny_f32, n_ctx=64, n_threads=1, verbose=False)
    with pytest.raises(ValueError, match="pool_kernel"):
        _core.set_policy(llm._a2sf_ctx(), kind=_core.KIND_SCORE, pool_kernel=bad)
    llm.close()
