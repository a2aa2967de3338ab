"""Position compaction (positions="cache" / "training"): endless streams on a bounded cache.

The exactness claim: after renumbering, the logits equal a numpy model whose
cached K (as computed when each token was read) is rotated to the new positions
and whose next queries take the positions after them."""
from __future__ import annotations

import numpy as np
import pytest
from llama_cpp import GGML_TYPE_F32

from a2sf import Llama
from a2sf.testing.reference import ReferenceLlama
from a2sf.testing.reference_cache import CachedReference
from a2sf.testing.tiny_gguf import write_tiny_llama
from conftest import emma_tokens, last_logits, require_module

CHUNK = 8


@pytest.fixture(scope="module")
def ref(tiny_f32):
    return ReferenceLlama(tiny_f32)


def _tokens(n, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(3, 290, n)]


def _stream(llm, ref, tokens):
    """Feed tokens chunk by chunk through llm and, mirrored, through the reference;
    returns (engine logits, reference logits) of every token."""
    r = CachedReference(ref)
    got, want = [], []
    kept = np.zeros(0, dtype=np.int64)
    for i in range(0, len(tokens), CHUNK):
        chunk = tokens[i:i + CHUNK]
        n_comp = llm.kv_stats()["compactions"]
        llm.eval(chunk)
        kv = llm.kv_scores()
        if llm.kv_stats()["compactions"] > n_comp:
            r.compact()  # before this chunk's decode, as the engine did
        r.keep(np.intersect1d(kept, kv.token_index))  # evicted inside this decode
        new = np.isin(kv.token_index, np.arange(i, i + len(chunk)))
        pos = kv.positions[new][np.argsort(kv.token_index[new])]
        want.append(r.step(chunk, pos))
        got.append(np.array(llm.scores[i:i + len(chunk)], dtype=np.float64))
        kept = kv.token_index
    return np.concatenate(got), np.concatenate(want)


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("policy", ["streaming", "h2o", "tova", "a2sf", "vatp", "mean", "random"])
def test_logits_after_compaction_equal_the_rotated_reference(tiny_f32, ref, policy, flash_attn):
    llm = Llama(tiny_f32, n_ctx=256, n_batch=CHUNK, n_ubatch=CHUNK, n_threads=1, logits_all=True,
                kv_policy=policy, positions="cache", n_sink=2, n_recent=8, flash_attn=flash_attn,
                **({} if policy in ("streaming", "random") else {"granularity": "token"}),
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)
    # positions="cache" renumbers before the positions reach twice the cache (512)
    got, want = _stream(llm, ref, _tokens(1100))
    st = llm.kv_stats()
    assert st["compactions"] >= 3 and st["evictions"] >= 3
    kv = llm.kv_scores()
    assert kv.positions.max() < 2 * 256  # positions stay below twice the cache
    assert kv.token_index.max() == 1099
    # CPU flash attention rounds K/V through F16 (also without any compaction: ~2e-3)
    tol = 5e-3 if flash_attn else 1e-4
    assert np.abs(got - want).max() <= tol * np.abs(want).max()
    llm.close()


def test_scores_cells_and_tokens_survive_a_compaction(tmp_path):
    # a training context of 128: positions="cache" keeps positions below min(128, 2 * 256)
    path = write_tiny_llama(tmp_path / "short.gguf", n_ctx_train=128)
    llm = Llama(str(path), n_ctx=256, n_threads=1, kv_policy="vatp", positions="cache", granularity="token",
                verbose=False)
    llm.eval(_tokens(100))
    assert llm.kv_evict(10) == 10
    llm.eval(_tokens(28, seed=4))  # positions 100..127: still below the bound, no compaction
    assert llm.kv_stats()["compactions"] == 0
    before = llm.kv_scores()
    llm.eval(_tokens(1, seed=5))  # position 128 would reach the bound: the batch compacts first
    after = llm.kv_scores()
    assert llm.kv_stats()["compactions"] == 1
    assert after.positions[:-1].tolist() == list(range(len(before)))
    assert (after.cells[:-1] == before.cells).all()
    assert (after.token_index[:-1] == before.token_index).all() and after.token_index[-1] == 128
    np.testing.assert_array_equal(after.scores[:, :-1] > 0, before.scores > 0)
    llm.close()


def test_training_mode_compacts_only_near_the_training_context(tmp_path):
    path = write_tiny_llama(tmp_path / "short.gguf", n_ctx_train=384)
    llm = Llama(str(path), n_ctx=256, n_batch=16, n_threads=1, kv_policy="a2sf", positions="training",
                n_sink=2, n_recent=8, verbose=False)
    toks = _tokens(1200)
    max_pos = []
    for i in range(0, len(toks), 16):
        llm.eval(toks[i:i + 16])
        max_pos.append(int(llm.kv_scores().positions.max()))
    assert max(max_pos) < 384  # never past the training context
    assert max(max_pos) > 256 + 16  # but positions grew past the cache between compactions
    assert llm.kv_stats()["compactions"] >= 3
    llm.close()


def test_completion_runs_past_the_training_context_without_a_window_error(tmp_path):
    path = write_tiny_llama(tmp_path / "short.gguf", n_ctx_train=300)
    llm = Llama(str(path), n_ctx=256, n_threads=1, kv_policy="a2sf", seed=1, verbose=False)
    assert llm.positions == "training" and llm.context_window > 10**9  # per head: "training"
    out = llm.create_completion("the cat", max_tokens=700, temperature=0.0)
    # the random model never says EOS; llama-cpp-python checks max_tokens only after a token
    # that completes the UTF-8 text, so a few more can come
    assert 700 <= out["usage"]["completion_tokens"] <= 704
    assert llm.n_tokens > 700 and llm.kv_scores().positions.max() < 300  # below the training context
    llm.close()


def test_absolute_positions_keep_the_old_limit(tmp_path):
    path = write_tiny_llama(tmp_path / "short.gguf", n_ctx_train=300)
    llm = Llama(str(path), n_ctx=256, n_threads=1, kv_policy="a2sf", positions="absolute", verbose=False)
    assert llm.context_window == 300
    llm.eval(_tokens(290))
    assert llm.kv_stats()["compactions"] == 0 and llm.kv_scores().positions.max() == 289
    llm.close()


def test_save_load_state_keeps_the_token_index(tiny_f32):
    llm = Llama(tiny_f32, n_ctx=256, n_batch=8, n_threads=1, kv_policy="a2sf", positions="cache", verbose=False)
    llm.eval(_tokens(600))
    assert llm.kv_stats()["compactions"] > 0
    before = llm.kv_scores()
    state = llm.save_state()
    llm.reset()
    llm.eval(_tokens(20, seed=3))
    llm.load_state(state)
    after = llm.kv_scores()
    assert (after.token_index == before.token_index).all() and (after.positions == before.positions).all()
    llm.eval(_tokens(1, seed=4))  # continues at the position after the kept cells
    assert llm.kv_scores().token_index.max() == 600
    llm.close()


def test_prefix_reuse_after_compaction_only_continues(tiny_f32):
    llm = Llama(tiny_f32, n_ctx=256, n_batch=8, n_threads=1, kv_policy="a2sf", positions="cache", verbose=False)
    toks = _tokens(600)
    llm.eval(toks)
    assert llm._a2sf_compacted()
    llm._a2sf_drop_evicted_prefix(toks + [5, 6])  # a continuation: kept
    assert llm.n_tokens == 600
    llm._a2sf_drop_evicted_prefix(toks[:300] + [7])  # a partial prefix: start over
    assert llm.n_tokens == 0
    llm.close()


def test_learned_positions_refuse_compaction(tmp_path):
    require_module("transformers")
    from a2sf.convert import convert_opt
    from a2sf.testing.tiny_opt import write_tiny_opt

    d = write_tiny_opt(tmp_path / "opt")
    out = tmp_path / "opt.gguf"
    convert_opt(d, out)
    with pytest.raises(ValueError, match="learned absolute position"):
        Llama(str(out), n_ctx=256, kv_policy="a2sf", positions="cache", verbose=False)
    llm = Llama(str(out), n_ctx=256, kv_policy="a2sf", verbose=False)
    assert llm.positions == "absolute"
    llm.close()


@pytest.mark.parametrize("bad", ["relative", 3, ""])
def test_bad_positions_setting_is_a_python_error(tiny_f32, bad):
    with pytest.raises((ValueError, TypeError), match="positions"):
        Llama(tiny_f32, n_ctx=256, kv_policy="a2sf", positions=bad, verbose=False)


def test_position_map_finds_where_the_tokens_from_an_index_begin():
    """seq_rm(n_tokens) counts tokens: PositionMap.first_position_from gives the lowest cache position
    holding that token or a later one, inside the renumbered positions (with their unheld holes, -1)
    and past them (token - offset)."""
    from a2sf.compaction import PositionMap

    m = PositionMap(mode="cache", limit=8192, cache_cells=4)
    m.renumbered = np.array([0, 1, -1, 7, 9], dtype=np.int64)  # positions 0..4 after a compaction
    m.offset = 20 - 5  # token 20 was the next one: position 5
    assert [m.first_position_from(t) for t in (1, 2, 7, 8, 9, 10, 20, 23)] == [1, 3, 3, 4, 4, 5, 5, 8]
    # and removing from there keeps exactly the tokens below the index
    for t in (2, 8, 10):
        p = m.first_position_from(t)
        held = m.renumbered[:p][m.renumbered[:p] >= 0]
        assert (held < t).all() and (m.renumbered[p:][m.renumbered[p:] >= 0] >= t).all()


def _q8_stream(smollm2, type_k, positions, n=704):
    """SmolLM2 a2sf at 256 cells over the first n tokens of Emma: (last logits, compactions,
    granularity in force, positions in force)."""
    llm = Llama(smollm2, n_ctx=256, kv_policy="a2sf", type_k=type_k, n_threads=1, verbose=False,
                **({} if positions is None else {"positions": positions}))
    toks = emma_tokens(llm, n)
    for i in range(0, n, 64):
        llm.eval(toks[i:i + 64])
    out = (last_logits(llm),
           llm.kv_stats()["compactions"], llm.kv_policy.granularity, llm.positions)
    llm.close()
    return out


def test_quantized_k_keeps_tokens_per_head_and_compacts(smollm2):
    """A Q8_0 K cache (llama.cpp stores it Hadamard-rotated) selects per (layer, KV head) by default
    and its per-head compaction (positions="cache") re-rotates K through that rotation: right after the first compaction
    (the same kept tokens with and without it) the logits move as little as an F16 cache's do, where
    the per-head rotation equals the reference (test_logits_after_compaction_equal_the_rotated_reference)."""
    from llama_cpp import GGML_TYPE_F16, GGML_TYPE_Q8_0

    moved = {}
    for type_k in (GGML_TYPE_F16, GGML_TYPE_Q8_0):
        compacted, n_compactions, granularity, positions = _q8_stream(smollm2, type_k, "cache")
        absolute, n_none, _, _ = _q8_stream(smollm2, type_k, "absolute")
        assert granularity == "head" and positions == "cache"
        assert n_compactions == 1 and n_none == 0
        assert compacted.argmax() == absolute.argmax()
        moved[type_k] = float(np.abs(compacted - absolute).max())
    # closing the position gaps moves the logits a little (F16: ~0.6); a K rotated wrongly would
    # scramble the attention of every compacted layer
    assert moved[GGML_TYPE_Q8_0] < 1.5 * moved[GGML_TYPE_F16] + 0.1, moved


def test_quantized_k_without_llama_cpps_rotation_keeps_absolute_positions(smollm2, monkeypatch):
    """llama.cpp stores a quantized K unrotated when head_dim is not a multiple of 64 (here forced by
    LLAMA_ATTN_ROT_DISABLE), and its K-shift then dereferences the missing rotation: such a cache
    defaults to positions="absolute" and refuses "cache" with a ValueError, never a crash."""
    from llama_cpp import GGML_TYPE_Q8_0

    monkeypatch.setenv("LLAMA_ATTN_ROT_DISABLE", "1")
    logits, n_compactions, _, positions = _q8_stream(smollm2, GGML_TYPE_Q8_0, None, n=320)
    assert positions == "absolute" and n_compactions == 0 and np.isfinite(logits).all()
    with pytest.raises(ValueError, match="cannot be re-rotated"):
        Llama(smollm2, n_ctx=256, kv_policy="a2sf", type_k=GGML_TYPE_Q8_0, positions="cache", verbose=False)


def test_the_rule_is_the_engines(tiny_f32):
    """When to compact and the default mode are C API (llama_kv_policy_wants_compaction,
    llama_kv_policy_default_positions) that a2sf.Llama and llama-server both call."""
    from a2sf import _core as core

    llm = Llama(tiny_f32, n_ctx=64, n_batch=8, n_threads=1, kv_policy="a2sf", n_sink=2, n_recent=4,
                verbose=False)
    ctx = llm._a2sf_ctx()
    assert llm.positions == "training" and core.default_positions(ctx) == core.POSITIONS_TRAINING  # per head
    llm.set_kv_policy("a2sf", granularity="token", n_sink=2, n_recent=4)
    assert core.default_positions(ctx) == core.POSITIONS_CACHE
    llm.eval(_tokens(40))  # no eviction yet: positions 0..39 all held
    kw = dict(n_ctx_train=512, n_cells=64)

    def wants(mode, next_pos=40, n_new=8, **more):
        return core.wants_compaction(ctx, 0, mode, next_pos, n_new, **{**kw, **more})

    assert not wants(core.POSITIONS_ABSOLUTE, next_pos=10_000)
    assert not wants(core.POSITIONS_TRAINING) and wants(core.POSITIONS_TRAINING, n_ctx_train=47)
    # cache: past the bound (2 * cells, within the training context) only with holes to close
    assert not wants(core.POSITIONS_CACHE) and not wants(core.POSITIONS_CACHE, n_cells=16)
    core.evict(ctx, 0, 10)
    assert wants(core.POSITIONS_CACHE, n_cells=16) and not wants(core.POSITIONS_CACHE)
    assert wants(core.POSITIONS_CACHE, n_ctx_train=47)
    # the positions below next_after that held no cell count as held
    assert not wants(core.POSITIONS_CACHE, n_cells=16, n_unheld=10)
    # a gap after the newest cell (its newest tokens evicted outside a decode): any mode but absolute
    assert wants(core.POSITIONS_TRAINING, next_pos=45) and not wants(core.POSITIONS_ABSOLUTE, next_pos=45)
    with pytest.raises(ValueError):
        wants(7)
    llm.close()
