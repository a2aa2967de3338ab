"""a2sf._core: the pybind11 bindings of the engine's C API, called directly."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from a2sf import Llama
from a2sf.policies import A2SF, SETTINGS, KVPolicy, PolicyKind

KEYS = {"kind", "forgetting_factor", "value_aware", "n_sink", "n_recent", "evict_chunk", "seed",
        "granularity", "mean_attention", "decode_scoring", "pool_kernel"}


@pytest.fixture(scope="module")
def llm(tiny_f32):
    # a policy-free context: the bindings must work on any context
    return Llama(tiny_f32, n_ctx=256, n_batch=32, n_threads=2, verbose=False)


def addr(llm):
    return llm._ctx.ctx.value if hasattr(llm._ctx.ctx, "value") else llm._ctx.ctx


def test_constants_mirror_the_header(core):
    assert (core.KIND_NONE, core.KIND_STREAMING, core.KIND_SCORE, core.KIND_RANDOM) == tuple(PolicyKind)
    assert (core.ERR_ARG, core.ERR_MEMORY, core.ERR_SEQ, core.ERR_CAPACITY) == (-1, -2, -3, -4)


def test_default_params(core):
    d = core.default_params()
    assert set(d) == KEYS
    assert d["kind"] == core.KIND_NONE
    assert 0.0 <= d["forgetting_factor"] <= 1.0


def test_default_params_are_the_python_tables(core):
    """Defaults live once on each side: the C engine's and a2sf.policies.SETTINGS agree."""
    d = core.default_params()
    want = {s.native: s.to_native(s.default) for s in SETTINGS if s.native is not None}
    assert set(d) == {"kind"} | set(want)
    assert {k: d[k] for k in want} == want
    assert {k: v for k, v in KVPolicy().to_native().items() if k != "kind"} == want


@pytest.mark.parametrize("null", [0, None, ctypes.c_void_p()])
def test_null_context_is_a_value_error(core, null):
    for call in (lambda: core.get_policy(null), lambda: core.n_layers(null),
                 lambda: core.n_cells(null, 0), lambda: core.scores(null, 0),
                 lambda: core.stats(null), lambda: core.reset_stats(null),
                 lambda: core.evict(null, 0, 1), lambda: core.set_policy(null, core.KIND_SCORE)):
        with pytest.raises(ValueError, match="NULL"):
            call()


def test_wrong_context_types(core):
    for bad in ("0x1234", 1.5, True, object()):
        with pytest.raises(TypeError):
            core.n_layers(bad)


def test_set_get_roundtrip(core, llm):
    ctx = addr(llm)
    native = A2SF(forgetting_factor=0.5, n_sink=2, n_recent=8, evict_chunk=3, seed=11).to_native()
    core.set_policy(ctx, **native)
    got = core.get_policy(ctx)
    # granularity left unset: the engine chose head (F16 K, RoPE)
    assert native["granularity"] == -1 and got == pytest.approx(dict(native, granularity=core.GRANULARITY_HEAD))
    # a c_void_p is accepted as well as its int value
    assert core.get_policy(llm._ctx.ctx) == got
    core.set_policy(ctx, core.KIND_NONE)
    assert core.get_policy(ctx)["kind"] == core.KIND_NONE


@pytest.mark.parametrize("kw,match", [
    (dict(kind=7), "kind"), (dict(kind=-1), "kind"),
    (dict(kind=2, forgetting_factor=1.5), "forgetting_factor"),
    (dict(kind=2, forgetting_factor=float("nan")), "forgetting_factor"),
    (dict(kind=2, n_sink=-1), "n_sink"), (dict(kind=2, n_recent=-3), "n_recent"),
    (dict(kind=2, evict_chunk=-1), "evict_chunk"), (dict(kind=3, seed=-1), "seed"),
    (dict(kind=3, seed=2**32), "seed"),
])
def test_set_policy_rejects_bad_values(core, llm, kw, match):
    ctx = addr(llm)
    before = core.get_policy(ctx)
    with pytest.raises(ValueError, match=match):
        core.set_policy(ctx, **kw)
    assert core.get_policy(ctx) == before  # nothing changed


def test_layers_cells_scores_stats(core, llm):
    ctx = addr(llm)
    core.set_policy(ctx, **A2SF(n_sink=1, n_recent=2).to_native())
    llm.reset()
    llm.eval(llm.tokenize(b"a small test of the bindings"))
    n = llm.n_tokens
    assert core.n_layers(ctx) == 2
    assert core.n_cells(ctx, 0) == n
    pos, cells, scores = core.scores(ctx, 0)
    assert pos.dtype == np.int32 and cells.dtype == np.int32 and scores.dtype == np.float32
    assert pos.tolist() == list(range(n)) and scores.shape == (2, n)
    assert (scores >= 0).all() and scores.sum() > 0
    s = core.stats(ctx)
    assert set(s) == {"n_evictions", "n_cells_evicted", "n_cells_used", "t_evict_us", "n_compactions",
                      "t_compact_us", "n_move_events", "n_bytes_moved", "t_move_us",
                      "n_lazy_flushes", "n_lazy_queries", "t_lazy_us", "n_host_moves"}
    assert s["n_cells_used"] == n
    freed = core.evict(ctx, 0, 2)
    assert freed == 2 and core.n_cells(ctx, 0) == n - 2
    s = core.stats(ctx)
    assert s["n_evictions"] == 1 and s["n_cells_evicted"] == 2
    core.reset_stats(ctx)
    assert core.stats(ctx)["n_evictions"] == 0
    core.set_policy(ctx, core.KIND_NONE)
    llm.reset()


def test_bad_sequence_ids(core, llm):
    ctx = addr(llm)
    for seq in (-1, 10_000):
        with pytest.raises(ValueError, match="sequence"):
            core.n_cells(ctx, seq)
        with pytest.raises(ValueError, match="sequence"):
            core.scores(ctx, seq)
    with pytest.raises(ValueError, match="n_free"):
        core.evict(ctx, 0, -1)


def test_closed_model(core, tiny_f32):
    m = Llama(tiny_f32, n_ctx=256, n_threads=2, kv_policy="h2o", verbose=False)
    m.close()
    with pytest.raises(ValueError):
        m.kv_scores()
    with pytest.raises(ValueError):
        m.kv_stats()
