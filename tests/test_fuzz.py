"""Property-based fuzzing (hypothesis) of the configuration and the scores API.

Properties: any configuration either raises TypeError/ValueError before
llama.cpp sees it, or yields a policy whose native parameters the engine
accepts; any sequence of scores-API calls on a live context either raises one
of those (for bad arguments) or leaves a consistent cache (finite, non-negative
scores; positions unique; sinks and recent window kept; cell count = cells used).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import require_module  # noqa: E402

hypothesis = require_module("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from a2sf import Llama  # noqa: E402
from a2sf.policies import POLICIES, KVPolicy, PolicyKind, make_policy  # noqa: E402

COMMON = dict(n_threads=1, verbose=False, seed=1)
FIELDS = ("n_sink", "n_recent", "evict_chunk", "forgetting_factor", "value_aware", "seed")

# anything a caller might pass: good and bad values of every type
any_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.integers(min_value=-2, max_value=300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0.0, max_value=1.0),
    st.text(max_size=5),
    st.binary(max_size=3),
    st.lists(st.integers(), max_size=2),
)
policy_spec = st.one_of(
    st.sampled_from(sorted(POLICIES) + ["StreamingLLM", "H2O", " a2sf ", "sink", "no"]),
    st.sampled_from(list(POLICIES.values())),
    st.text(max_size=8),
    st.none(),
    st.integers(),
)
# A2SF_FUZZ_SCALE=10 runs ten times the examples with fresh random draws; the
# default (1) is derandomized so that the fast suite is repeatable.
FUZZ_SCALE = float(os.environ.get("A2SF_FUZZ_SCALE", "1"))


def fuzz_settings(n):
    return settings(max_examples=max(1, int(n * FUZZ_SCALE)), deadline=None, database=None,
                    derandomize=FUZZ_SCALE == 1,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


SETTINGS = fuzz_settings(150)


@SETTINGS
@given(spec=policy_spec, overrides=st.dictionaries(st.sampled_from(FIELDS + ("alpha",)), any_value, max_size=4))
def test_make_policy_validates_or_raises(spec, overrides):
    try:
        p = make_policy(spec, **overrides)
    except (TypeError, ValueError) as e:
        assert str(e), "an error without a message"
        return
    if p is None:
        assert spec is None
        return
    assert isinstance(p, KVPolicy)
    native = p.to_native()
    assert 0 <= native["n_sink"] < 2**31 and -1 <= native["n_recent"] < 2**31  # -1: half of what is kept
    assert 0 <= native["evict_chunk"] < 2**31 and 0 <= native["seed"] < 2**32
    assert 0.0 <= native["forgetting_factor"] <= 1.0
    assert isinstance(native["value_aware"], bool)
    assert native["kind"] in {int(k) for k in PolicyKind}
    # the overrides that were not None ended up in the policy
    for k, v in overrides.items():
        if v is not None:
            assert getattr(p, k) == v


@pytest.fixture(scope="module")
def live(tiny_f32):
    llm = Llama(tiny_f32, n_ctx=256, kv_policy="a2sf", **COMMON)
    yield llm
    llm.close()


@fuzz_settings(80)
@given(kind=st.integers(-3, 6), alpha=st.one_of(st.floats(allow_nan=True), st.floats(0, 1)),
       value_aware=st.booleans(), n_sink=st.integers(-5, 2**33), n_recent=st.integers(-5, 2**33),
       evict_chunk=st.integers(-5, 2**33), seed=st.integers(-5, 2**33))
def test_core_set_policy_accepts_or_raises(core, live, kind, alpha, value_aware, n_sink, n_recent,
                                           evict_chunk, seed):
    ctx = live._ctx.ctx
    before = core.get_policy(ctx)
    try:
        core.set_policy(ctx, kind=kind, forgetting_factor=alpha, value_aware=value_aware,
                        n_sink=n_sink, n_recent=n_recent, evict_chunk=evict_chunk, seed=seed)
    except (TypeError, ValueError) as e:
        assert core.get_policy(ctx) == before, "a refused set_policy changed the policy"
        assert any(w in str(e) for w in ("kind", "forgetting_factor", "n_sink", "n_recent",
                                         "evict_chunk", "seed", "incompatible"))
        return
    got = core.get_policy(ctx)
    assert got["kind"] == kind and got["n_sink"] == n_sink and got["seed"] == seed
    assert 0 <= kind <= 3 and 0.0 <= alpha <= 1.0
    core.set_policy(ctx, **live.kv_policy.to_native())  # back to the object's policy


def _check_cache(llm, policies=()):
    """``policies``: every policy the cache evicted under since it was filled; a sink or a
    recent cell is one under each of them (a later policy cannot protect what an earlier
    one evicted)."""
    s = llm.kv_scores()
    pos = s.token_index.tolist()  # the tokens kept (compaction renumbers positions)
    assert pos == sorted(set(pos))
    assert np.isfinite(s.scores).all() and (s.scores >= 0).all()
    assert llm.kv_stats()["cells_used"] == len(pos) == llm.kv_n_cells()
    assert len(pos) <= llm.n_ctx()
    pols = [p for p in (*policies, llm.kv_policy) if p is not None]
    n = llm.n_tokens
    if pols and pos:
        n_sink = min(p.n_sink for p in pols)
        n_recent = min(p.recent_window(len(pos)) for p in pols)
        assert set(range(min(n_sink, n))) <= set(pos), "a sink was evicted"
        assert set(range(max(0, n - n_recent), n)) <= set(pos), "a recent cell was evicted"


op = st.one_of(
    st.tuples(st.just("eval"), st.integers(1, 120)),
    st.tuples(st.just("evict"), st.one_of(st.integers(-3, 300), st.floats(), st.booleans())),
    st.tuples(st.just("evict_seq"), st.integers(-3, 5)),
    st.tuples(st.just("scores"), st.one_of(st.integers(-3, 5), st.text(max_size=2), st.none())),
    st.tuples(st.just("policy"), st.sampled_from(["streaming", "h2o", "tova", "a2sf", "vatp", "random"]),
              st.integers(0, 40), st.integers(0, 80)),
    st.tuples(st.just("state")),
    st.tuples(st.just("reset")),
)


@fuzz_settings(15)
@given(ops=st.lists(op, min_size=1, max_size=12), seed=st.integers(0, 2**16))
def test_scores_api_sequences(core, tiny_f32, ops, seed):
    rng = np.random.default_rng(seed)
    llm = Llama(tiny_f32, n_ctx=256, kv_policy="a2sf", n_batch=32, **COMMON)
    earlier = []  # policies the cache held before the current one
    try:
        for o in ops:
            name = o[0]
            if name == "policy":
                earlier.append(llm.kv_policy)
            elif name == "reset":
                earlier = []
            try:
                if name == "eval":
                    llm.eval(rng.integers(3, 300, size=o[1]).tolist())
                elif name == "evict":
                    llm.kv_evict(o[1])
                elif name == "evict_seq":
                    llm.kv_evict(1, seq_id=o[1])
                elif name == "scores":
                    llm.kv_scores(o[1])
                elif name == "policy":
                    llm.set_kv_policy(o[1], n_sink=o[2], n_recent=o[3])
                elif name == "state":
                    llm.load_state(llm.save_state())
                elif name == "reset":
                    llm.reset()
                    llm._ctx.kv_cache_clear()
            except (TypeError, ValueError) as e:
                assert str(e)
            if llm.n_tokens == llm.kv_n_cells() or llm.kv_stats()["evictions"] or name == "evict":
                _check_cache(llm, earlier)
        # the object still works at the end
        llm.eval([5, 6])
        _check_cache(llm, earlier)
    finally:
        llm.close()


@fuzz_settings(10)
@given(n_ctx=st.integers(1, 600), n_batch=st.one_of(st.none(), st.integers(-2, 600)),
       n_sink=st.integers(0, 300), n_recent=st.integers(0, 300),
       evict_chunk=st.integers(0, 300), policy=st.sampled_from(["streaming", "h2o", "a2sf", "vatp", "random"]))
def test_constructor_configurations(core, tiny_f32, n_ctx, n_batch, n_sink, n_recent, evict_chunk, policy):
    kw = dict(n_ctx=n_ctx, kv_policy=policy, n_sink=n_sink, n_recent=n_recent,
              evict_chunk=evict_chunk, max_positions=max(n_ctx, 2048))
    if n_batch is not None:
        kw["n_batch"] = n_batch
    try:
        llm = Llama(tiny_f32, **COMMON, **kw)
    except (TypeError, ValueError) as e:
        assert any(w in str(e) for w in ("n_ctx", "n_batch", "n_sink", "n_recent", "room", "fit"))
        return
    try:
        assert n_sink + n_recent + llm.n_batch < n_ctx
        tokens = np.random.default_rng(n_ctx).integers(3, 300, size=llm.n_ctx() + 40).tolist()
        llm.eval(tokens)
        _check_cache(llm)
        assert llm.n_tokens == len(tokens)
        st_ = llm.kv_stats()
        assert st_["cells_evicted"] + st_["cells_used"] == len(tokens)
    finally:
        llm.close()


@fuzz_settings(6)
@example(alpha=0.0, value_aware=False)
@example(alpha=5e-324, value_aware=True)
@example(alpha=1e-30, value_aware=False)
@example(alpha=0.5, value_aware=True)
@example(alpha=1.0 - 1e-16, value_aware=False)
@example(alpha=1.0, value_aware=True)
@given(alpha=st.floats(0.0, 1.0), value_aware=st.booleans())
def test_fuzz_found_nothing_nan(core, tiny_f32, alpha, value_aware):
    """A forgetting factor of any float in [0, 1] keeps the engine's scores finite and
    non-negative through a prefill, decode steps and evictions (denormal and 1 - 1e-16
    included: alpha^n underflows or stays 1 over hundreds of steps)."""
    llm = Llama(tiny_f32, n_ctx=256, n_batch=32, kv_policy="a2sf", forgetting_factor=alpha,
                value_aware=value_aware, n_sink=4, n_recent=16, **COMMON)
    try:
        assert llm.kv_policy.forgetting_factor == alpha
        toks = np.random.default_rng(1).integers(3, 300, size=300).tolist()
        llm.eval(toks[:280])
        for t in toks[280:]:
            llm.eval([t])
        assert llm.kv_stats()["evictions"] > 0  # the cache of 256 cells was full
        s = llm.kv_scores()
        assert np.isfinite(s.scores).all() and (s.scores >= 0).all()
        assert s.scores.max() > 0
        _check_cache(llm)
    finally:
        llm.close()
