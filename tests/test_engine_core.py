"""a2sf._core: the pybind11 bindings of the engine's C API, called directly."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from a2sf import Llama
from a2sf.policies import A2SF, SETTINGS, KVPolicy, PolicyKind

KEYS = {"kind", "forgetting_factor", "value_aware", "n_sink", "n_recent", "evict_chunk", "seed",
        "granularity", "mean_attention", "decode_scoring", "pool_kernel", "pool_weight"}


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


def test_settings_rows_are_the_engine_table(core):
    """Each setting is written once in C (cpp/include/llama-kv-policy-settings.def): every
    row of a2sf.policies.SETTINGS that maps to the C struct says what that table says
    (name, type, range, default, the automatic value Python writes None, help), a str row's
    choices are the C enum's names in the order of their numbers, and every C row has a
    Python row."""
    table = {r["name"]: r for r in core.settings()}
    native = {s.native: s for s in SETTINGS if s.native is not None}
    assert list(table) == [k for k in core.default_params() if k != "kind"]  # the struct's fields, in order
    assert set(native) == set(table), "a C row without a Python row in a2sf.policies.SETTINGS, or the reverse"
    types = {int: "int", float: "float", bool: "bool", str: "enum"}
    for name, s in native.items():
        c = table[name]
        assert types[s.type] == c["type"], name
        assert s.help == c["help"], name
        assert s.to_native(s.default) == c["default"], name
        if s.default is None:  # None: the engine chooses
            assert c["auto"] is not None and s.native_none == c["auto"], name
        if c["auto"] is not None:
            assert s.native_none == c["auto"] and s.check(None) is None, name
        if s.type is str:
            assert s.choices == c["choices"], name
            for number, choice in enumerate(s.choices, start=c["range"][0]):
                assert s.to_native(choice) == number, (name, choice)
        elif s.type is not bool:
            assert s.range == c["range"] and s.choices is None and c["choices"] == (), name
    assert [k.name.lower() for k in PolicyKind] == ["none", "streaming", "score", "random"]


def test_positions_modes_are_the_engines_enum(core):
    from a2sf.compaction import POSITION_MODES
    from a2sf.policies import SETTINGS_BY_NAME

    assert (core.POSITIONS_CACHE, core.POSITIONS_TRAINING, core.POSITIONS_ABSOLUTE) == (0, 1, 2)
    assert POSITION_MODES == ("cache", "training", "absolute") == SETTINGS_BY_NAME["positions"].choices


@pytest.mark.parametrize("kw,message", [
    (dict(kind=9), "unknown policy kind 9: must be 0 (none), 1 (streaming), 2 (score) or 3 (random)"),
    (dict(kind=2, pool_kernel=0), "pool_kernel must be in [1, 256], got 0"),
    (dict(kind=2, n_recent=-3), "n_recent must be in [0, 2^31-1] or -1 (auto), got -3"),
    (dict(kind=2, n_sink=2**40), "n_sink must be in [0, 2^31-1], got 1099511627776"),
    (dict(kind=3, seed=2**32), "seed must be in [0, 2^32-1], got 4294967296"),
    (dict(kind=2, forgetting_factor=float("inf")), "forgetting_factor must be in [0, 1], got inf"),
    (dict(kind=2, granularity=3), "granularity must be one of 0 (token), 1 (layer), 2 (head), or -1 (auto), got 3"),
    (dict(kind=2, decode_scoring=-1), "decode_scoring must be one of 0 (eager), 1 (lazy), 2 (auto), got -1"),
])
def test_set_policy_messages_are_the_engines(core, llm, kw, message):
    """set_policy checks nothing itself: the message is llama_kv_policy_set_value's / _check's."""
    with pytest.raises(ValueError) as e:
        core.set_policy(addr(llm), **kw)
    assert str(e.value) == message


@pytest.mark.parametrize("kw,match", [
    (dict(n_sink=1.5), "n_sink must be an int, got float"), (dict(n_recent="8"), "n_recent must be an int"),
    (dict(forgetting_factor="x"), "forgetting_factor must be a real number"),
    (dict(granularity=None), "granularity must be an int, got NoneType"),
])
def test_set_policy_wrong_types(core, llm, kw, match):
    with pytest.raises(TypeError, match=match):
        core.set_policy(addr(llm), kind=2, **kw)


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
