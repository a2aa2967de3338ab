"""Bad input fails cleanly: a Python exception whose message names the problem,
the process survives, and the next call on the same object (or a fresh one) works.

The matrix covers every policy parameter out of range or of the wrong type,
unknown policies, caches too small for the protected cells, batches larger
than the cache, bad token ids and prompts, broken model files (missing,
truncated, not GGUF, unsupported architecture), changing the policy
mid-generation, and use after close. Cases that used to abort the process
(GGML_ASSERT, an uncaught C++ exception, a segfault) were found by running
each candidate in a subprocess first; they are now caught by validation in
a2sf.Llama before anything reaches llama.cpp.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

from a2sf import Llama
from a2sf.policies import A2SF, H2O, KVPolicy, PolicyKind, make_policy

COMMON = dict(n_threads=1, verbose=False)
INT32_MAX = 2**31 - 1

# -- the matrix of constructor settings ------------------------------------------
# settable fields of each policy, as Llama keyword arguments
SETTABLE = {
    "streaming": ("n_sink", "n_recent", "evict_chunk", "kv_seed"),
    "h2o": ("n_sink", "n_recent", "evict_chunk", "value_aware", "kv_seed"),
    "tova": ("n_sink", "n_recent", "evict_chunk", "value_aware", "kv_seed"),
    "a2sf": ("n_sink", "n_recent", "evict_chunk", "forgetting_factor", "value_aware", "kv_seed"),
    "vatp": ("n_sink", "n_recent", "evict_chunk", "forgetting_factor", "kv_seed"),
    "random": ("n_sink", "n_recent", "evict_chunk", "kv_seed"),
}
PINNED = {
    "streaming": ("forgetting_factor", "value_aware"),
    "h2o": ("forgetting_factor",),
    "tova": ("forgetting_factor",),
    "vatp": ("value_aware",),
    "random": ("forgetting_factor", "value_aware"),
}
PINNED_VALUE = {"forgetting_factor": 0.5, "value_aware": True}

BAD_INT = [(-1, ValueError), (INT32_MAX + 1, ValueError), (1.5, TypeError), ("4", TypeError),
           (True, TypeError), ([4], TypeError)]
BAD_SEED = [(-1, ValueError), (2**32, ValueError), (0.5, TypeError), ("0", TypeError), (True, TypeError)]
BAD_ALPHA = [(-0.01, ValueError), (1.01, ValueError), (math.nan, ValueError), (math.inf, ValueError),
             (-math.inf, ValueError), ("0.5", TypeError), (True, TypeError), ([0.5], TypeError),
             (0.5 + 0j, TypeError)]
BAD_BOOL = [("yes", TypeError), (1, TypeError), (0, TypeError), (1.0, TypeError)]
BAD_FOR = {"n_sink": BAD_INT, "n_recent": BAD_INT, "evict_chunk": BAD_INT, "kv_seed": BAD_SEED,
           "forgetting_factor": BAD_ALPHA, "value_aware": BAD_BOOL}
FIELD_NAME = {"kv_seed": "seed"}  # what the message calls it


def _param_cases():
    cases = []
    for policy, fields in SETTABLE.items():
        for field in fields:
            for value, exc in BAD_FOR[field]:
                cases.append(pytest.param(
                    policy, {field: value}, exc, FIELD_NAME.get(field, field),
                    id=f"{policy}-{field}={value!r}"))
    for policy, fields in PINNED.items():
        for field in fields:
            cases.append(pytest.param(
                policy, {field: PINNED_VALUE[field]}, TypeError, f"fixes {field}",
                id=f"{policy}-pinned-{field}"))
    return cases


OTHER_CTOR_CASES = [
    # unknown policy / wrong type of policy
    (dict(kv_policy="snapkv"), ValueError, "unknown KV policy 'snapkv'"),
    (dict(kv_policy=""), ValueError, "unknown KV policy"),
    (dict(kv_policy="   "), ValueError, "unknown KV policy"),
    (dict(kv_policy="h2o2"), ValueError, "unknown KV policy"),
    (dict(kv_policy="a2sf-0.9"), ValueError, "unknown KV policy"),
    (dict(kv_policy=3), TypeError, "kv_policy must be"),
    (dict(kv_policy=2.0), TypeError, "kv_policy must be"),
    (dict(kv_policy=b"h2o"), TypeError, "kv_policy must be"),
    (dict(kv_policy=["h2o"]), TypeError, "kv_policy must be"),
    (dict(kv_policy={"kind": "h2o"}), TypeError, "kv_policy must be"),
    (dict(kv_policy=int), TypeError, "kv_policy must be"),
    (dict(kv_policy=object()), TypeError, "kv_policy must be"),
    (dict(kv_policy=PolicyKind.SCORE), TypeError, "kv_policy must be"),
    # settings without a policy
    (dict(n_sink=4), ValueError, "without a policy"),
    (dict(forgetting_factor=0.5), ValueError, "without a policy"),
    (dict(kv_seed=3), ValueError, "without a policy"),
    (dict(max_positions=4096), ValueError, "max_positions needs a kv_policy"),
    (dict(kv_policy="none", max_positions=4096), ValueError, "max_positions needs a kv_policy"),
    (dict(kv_policy="none", n_sink=3), TypeError, "NoEviction fixes n_sink"),
    # n_ctx of the wrong type / out of range
    (dict(kv_policy="a2sf", n_ctx=-1), ValueError, "n_ctx must be"),
    (dict(kv_policy="a2sf", n_ctx=1.5), ValueError, "n_ctx must be"),
    (dict(kv_policy="a2sf", n_ctx="256"), ValueError, "n_ctx must be"),
    (dict(kv_policy="a2sf", n_ctx=True), ValueError, "n_ctx must be"),
    (dict(kv_policy="a2sf", n_ctx=None), ValueError, "n_ctx must be"),
    (dict(kv_policy="a2sf", n_ctx=2**31), ValueError, "n_ctx must be"),
    # n_ctx smaller than the protected cells (n_sink + n_recent)
    (dict(kv_policy="a2sf", n_ctx=1), ValueError, "leaves no room"),
    (dict(kv_policy="a2sf", n_ctx=32, n_recent=32), ValueError, "leaves no room"),
    (dict(kv_policy="a2sf", n_ctx=37, n_recent=32), ValueError, "leaves no room"),
    (dict(kv_policy="h2o", n_ctx=256, n_sink=200, n_recent=56), ValueError, "leaves no room"),
    (dict(kv_policy="h2o", n_ctx=256, n_recent=255), ValueError, "leaves no room"),
    (dict(kv_policy="streaming", n_ctx=64, n_sink=63), ValueError, "leaves no room"),
    (dict(kv_policy="vatp", n_ctx=100, n_sink=50, n_recent=50), ValueError, "leaves no room"),
    (dict(kv_policy="random", n_ctx=300, n_recent=INT32_MAX), ValueError, "leaves no room"),
    # a batch larger than the cache (or than the room beside the protected cells)
    (dict(kv_policy="a2sf", n_ctx=256, n_batch=256), ValueError, "n_batch=256 does not fit"),
    (dict(kv_policy="a2sf", n_ctx=256, n_batch=220, n_recent=32), ValueError, "n_batch=220 does not fit"),
    (dict(kv_policy="a2sf", n_ctx=256, n_batch=10**6), ValueError, "does not fit"),
    (dict(kv_policy="a2sf", n_ctx=256, n_ubatch=250, n_recent=32), ValueError, "n_ubatch=250 does not fit"),
    (dict(kv_policy="a2sf", n_ctx=256, n_batch=0), ValueError, "n_batch must be a positive int"),
    (dict(kv_policy="a2sf", n_ctx=256, n_batch=-4), ValueError, "n_batch must be a positive int"),
    (dict(kv_policy="a2sf", n_ctx=256, n_batch=1.5), ValueError, "n_batch must be a positive int"),
    (dict(kv_policy="a2sf", n_ctx=256, n_batch="16"), ValueError, "n_batch must be a positive int"),
    (dict(kv_policy="a2sf", n_ctx=256, n_batch=True), ValueError, "n_batch must be a positive int"),
    (dict(kv_policy="a2sf", n_ctx=256, n_ubatch=0), ValueError, "n_ubatch must be a positive int"),
    (dict(n_ctx=256, n_batch=0), ValueError, "n_batch must be a positive int"),
    (dict(n_ctx=256, n_ubatch=0), ValueError, "n_ubatch must be a positive int"),
    (dict(n_ctx=256, n_batch=-1), ValueError, "n_batch must be a positive int"),
    # max_positions
    (dict(kv_policy="a2sf", n_ctx=256, max_positions=100), ValueError, "max_positions"),
    (dict(kv_policy="a2sf", n_ctx=256, max_positions=-1), ValueError, "max_positions"),
    (dict(kv_policy="a2sf", n_ctx=256, max_positions=1000.0), TypeError, "max_positions"),
    (dict(kv_policy="a2sf", n_ctx=256, max_positions="4096"), TypeError, "max_positions"),
    (dict(kv_policy="a2sf", n_ctx=256, max_positions=True), TypeError, "max_positions"),
]


@pytest.fixture(scope="module")
def good(tiny_f32):
    """One live Llama with a policy: after every bad call, a good call on it must work."""
    llm = Llama(tiny_f32, n_ctx=256, kv_policy="a2sf", seed=1, **COMMON)
    yield llm
    llm.close()


def assert_alive(llm):
    """The object still answers: a completion runs and the engine holds its cells."""
    out = llm.create_completion("hello", max_tokens=3, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1
    if llm.kv_policy is not None:
        assert llm.kv_n_cells() == llm.n_tokens


@pytest.mark.parametrize("policy,kw,exc,match", _param_cases())
def test_policy_parameter(tiny_f32, good, policy, kw, exc, match):
    with pytest.raises(exc, match=match):
        Llama(tiny_f32, n_ctx=256, kv_policy=policy, **COMMON, **kw)
    # the same value through set_kv_policy on a live object, then it still works
    native = {("seed" if k == "kv_seed" else k): v for k, v in kw.items()}
    with pytest.raises(exc, match=match):
        good.set_kv_policy(policy, **native)
    assert good.kv_policy == A2SF(granularity="head")  # the engine chose head (F16 K, no ALiBi)
    assert_alive(good)


@pytest.mark.parametrize("kw,exc,match", OTHER_CTOR_CASES,
                         ids=[f"{i}-{sorted(c[0].items())!r}"[:80] for i, c in enumerate(OTHER_CTOR_CASES)])
def test_constructor_settings(tiny_f32, good, kw, exc, match):
    with pytest.raises(exc, match=match):
        Llama(tiny_f32, **{**COMMON, **kw})
    assert_alive(good)


def test_policy_instances_validate_themselves():
    for cls in (A2SF, H2O):
        with pytest.raises(ValueError, match="n_recent"):
            cls(n_recent=-3)
    with pytest.raises(TypeError, match="has no field 'alpha'"):
        make_policy("a2sf", alpha=0.5)
    with pytest.raises(TypeError, match="fixes forgetting_factor"):
        H2O().replace(forgetting_factor=0.3)
    assert isinstance(make_policy(KVPolicy), KVPolicy)


# -- broken model files -------------------------------------------------------------
def _model_file(kind, tiny_path, tmp_path):
    data = open(tiny_path, "rb").read()
    p = tmp_path / f"{kind}.gguf"
    if kind == "missing":
        return str(tmp_path / "no-such-model.gguf")
    if kind == "directory":
        return str(tmp_path)
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "garbage":
        p.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "trunc-magic":
        p.write_bytes(data[:3])
    elif kind == "trunc-header":
        p.write_bytes(data[:100])
    elif kind == "trunc-half":
        p.write_bytes(data[: len(data) // 2])
    elif kind == "trunc-tail":
        p.write_bytes(data[:-7])
    elif kind == "arch":
        # same header, architecture renamed to one llama.cpp does not know
        p.write_bytes(data.replace(b"llama", b"zzzzz", 1))
    return str(p)


MODEL_CASES = [
    ("missing", ValueError, "does not exist"),
    ("directory", ValueError, "directory"),
    ("empty", ValueError, "empty"),
    ("garbage", ValueError, "not a GGUF file"),
    ("trunc-magic", ValueError, "not a GGUF file"),
    ("trunc-header", ValueError, "truncated"),
    ("trunc-half", ValueError, "truncated"),
    ("trunc-tail", ValueError, "truncated"),
    ("arch", ValueError, "architecture 'zzzzz'"),
]


@pytest.mark.parametrize("policy", [None, "a2sf"])
@pytest.mark.parametrize("kind,exc,match", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_broken_model_file(tiny_f32, good, tmp_path, kind, exc, match, policy):
    path = _model_file(kind, tiny_f32, tmp_path)
    with pytest.raises(exc, match=match):
        Llama(path, n_ctx=256, kv_policy=policy, **COMMON)
    assert_alive(good)


@pytest.mark.parametrize("path,exc", [(None, TypeError), (5, TypeError), (b"x.gguf", TypeError)])
def test_model_path_of_the_wrong_type(good, path, exc):
    with pytest.raises(exc, match="model_path must be a str"):
        Llama(path, n_ctx=256, **COMMON)
    assert_alive(good)


def test_a_fresh_object_works_after_many_failures(tiny_f32, tmp_path):
    for kind, _, _ in MODEL_CASES:
        with pytest.raises((ValueError, TypeError)):
            Llama(_model_file(kind, tiny_f32, tmp_path), n_ctx=256, kv_policy="h2o", **COMMON)
    llm = Llama(tiny_f32, n_ctx=256, kv_policy="h2o", **COMMON)
    assert_alive(llm)


# -- tokens and prompts ---------------------------------------------------------------
TOKEN_CASES = [
    ("eval", ([-1],), ValueError, "token id -1 is out of range"),
    ("eval", ([300],), ValueError, "token id 300 is out of range"),
    ("eval", ([5, 10**9],), ValueError, "token id 1000000000 is out of range"),
    ("eval", (np.array([5, -7]),), ValueError, "token id -7"),
    ("eval", ([1.5],), TypeError, "token ids"),
    ("eval", (["a"],), TypeError, "token ids"),
    ("eval", ([[1, 2]],), TypeError, "token ids"),
    ("detokenize", ([-1],), ValueError, "out of range"),
    ("detokenize", ([10**6],), ValueError, "out of range"),
    ("detokenize", ([2.5],), TypeError, "token ids"),
    ("tokenize", ("text as str",), TypeError, "tokenize expects bytes"),
    ("tokenize", (None,), TypeError, "tokenize expects bytes"),
    ("tokenize", (123,), TypeError, "tokenize expects bytes"),
    ("generate", ([],), ValueError, "token list is empty"),
    ("generate", ([-3],), ValueError, "out of range"),
    ("generate", ([1, 400],), ValueError, "out of range"),
    ("create_completion", (b"\xff\xfe\x80 bytes",), TypeError, "prompt must be a str"),
    ("create_completion", (None,), TypeError, "prompt must be a str"),
    ("create_completion", (42,), TypeError, "prompt must be a str"),
    ("create_completion", ("lone surrogate \udcff",), UnicodeEncodeError, "utf-8"),
    ("create_completion", ([1, -5],), ValueError, "out of range"),
    ("create_completion", ([1, 10**6],), ValueError, "out of range"),
]


@pytest.mark.parametrize("method,args,exc,match", TOKEN_CASES,
                         ids=[f"{m}-{a!r}"[:60] for m, a, _, _ in TOKEN_CASES])
def test_bad_tokens_and_prompts(good, method, args, exc, match):
    with pytest.raises(exc, match=match):
        out = getattr(good, method)(*args)
        if method == "generate":
            next(out)
    assert_alive(good)


def test_unusual_prompts_work(good):
    # an empty prompt and a prompt of only BOS are valid: llama.cpp sees [BOS]
    for prompt in ("", [1]):
        out = good.create_completion(prompt, max_tokens=4, temperature=0.0)
        assert out["usage"]["prompt_tokens"] == 1
        assert out["usage"]["completion_tokens"] >= 1
    # non-UTF-8 bytes tokenize (byte fallback) and come back unchanged
    raw = b"\xff\xfe\x80"
    toks = good.tokenize(raw, add_bos=False)
    assert good.detokenize(toks).lstrip(b" ") == raw  # the tokenizer adds a space prefix
    # and a completion of them decodes to text without raising
    out = good.create_completion(toks, max_tokens=3, temperature=0.0)
    assert isinstance(out["choices"][0]["text"], str)


def test_no_policy_batch_larger_than_the_cache(tiny_f32):
    llm = Llama(tiny_f32, n_ctx=256, **COMMON)
    with pytest.raises(ValueError, match="exceed the KV cache of n_ctx=256"):
        llm.eval(list(range(3, 300)))
    with pytest.raises(ValueError, match="exceed context window of 256"):
        llm.create_completion(list(range(3, 300)), max_tokens=2)
    llm.eval([5, 6])
    assert llm.n_tokens == 2
    assert_alive(llm)


def test_with_a_policy_a_batch_larger_than_the_cache_is_chunked(good):
    good.reset()
    good.eval(list(range(3, 300)) * 2)  # 594 tokens into 256 cells
    assert good.n_tokens == 594
    assert good.kv_n_cells() <= 256
    st = good.kv_stats()
    assert st["cells_evicted"] + st["cells_used"] >= 594 - 256
    assert_alive(good)


# -- the scores API -----------------------------------------------------------------
KV_CASES = [
    ("kv_scores", dict(seq_id=-1), ValueError, "seq_id must be in"),
    ("kv_scores", dict(seq_id=2**40), ValueError, "seq_id must be in"),
    ("kv_scores", dict(seq_id="0"), TypeError, "seq_id must be an int"),
    ("kv_scores", dict(seq_id=1.0), TypeError, "seq_id must be an int"),
    ("kv_scores", dict(seq_id=True), TypeError, "seq_id must be an int"),
    ("kv_scores", dict(seq_id=5), ValueError, "sequence id out of range"),
    ("kv_n_cells", dict(seq_id=-2), ValueError, "seq_id must be in"),
    ("kv_n_cells", dict(seq_id=7), ValueError, "sequence id out of range"),
    ("kv_n_cells", dict(seq_id=None), TypeError, "seq_id must be an int"),
    ("kv_evict", dict(n_free=-1), ValueError, "n_free"),
    ("kv_evict", dict(n_free=1.5), ValueError, "n_free"),
    ("kv_evict", dict(n_free=True), ValueError, "n_free"),
    ("kv_evict", dict(n_free=2**40), ValueError, "n_free"),
    ("kv_evict", dict(n_free=3, seq_id=9), ValueError, "sequence id out of range"),
    ("kv_evict", dict(n_free=3, seq_id=-9), ValueError, "seq_id must be in"),
    ("set_kv_policy", dict(kv_policy="nope"), ValueError, "unknown KV policy"),
    ("set_kv_policy", dict(kv_policy=7), TypeError, "kv_policy must be"),
    ("set_kv_policy", dict(kv_policy="a2sf", n_recent=250), ValueError, "must be < n_ctx"),
    ("set_kv_policy", dict(kv_policy="h2o", n_sink=120, n_recent=120), ValueError, "must be < n_ctx"),
    ("set_kv_policy", dict(kv_policy=None, n_sink=3), ValueError, "without a policy"),
    ("load_state", dict(state=b"not a state"), TypeError, "LlamaState"),
    ("load_state", dict(state=None), TypeError, "LlamaState"),
]


@pytest.mark.parametrize("method,kw,exc,match", KV_CASES,
                         ids=[f"{m}-{sorted(k.items())!r}"[:60] for m, k, _, _ in KV_CASES])
def test_bad_scores_api_calls(good, method, kw, exc, match):
    good.eval([5, 6, 7])
    before = good.kv_scores()
    with pytest.raises(exc, match=match):
        getattr(good, method)(**kw)
    after = good.kv_scores()
    assert after.positions.tolist() == before.positions.tolist()  # nothing changed
    assert good.kv_policy == A2SF(granularity="head")
    assert_alive(good)


# -- changing the policy mid-generation ----------------------------------------------
@pytest.mark.parametrize("new", ["h2o", None, "streaming"])
def test_policy_change_mid_generation_is_refused(good, new):
    stream = good.create_completion("once upon a time", max_tokens=8, temperature=0.0, stream=True)
    next(stream)
    with pytest.raises(RuntimeError, match="while generate"):
        good.set_kv_policy(new)
    with pytest.raises(RuntimeError, match="while generate"):
        good.kv_policy = new
    assert good.kv_policy == A2SF(granularity="head")
    rest = list(stream)  # the generation goes on undisturbed
    assert len(rest) >= 1
    # allowed once it finished; the policy in force carries the granularity the engine chose
    want = make_policy(new)
    if want is not None and want.granularity is None:
        want = want.replace(granularity="head")
    assert good.set_kv_policy(new) == want == good.kv_policy
    assert_alive(good)
    good.set_kv_policy("a2sf")


def test_policy_change_after_an_abandoned_generation(good):
    gen = good.generate(good.tokenize(b"hello"), temp=0.0)
    next(gen)
    gen.close()  # abandoned: the guard is released
    good.set_kv_policy("h2o")
    good.set_kv_policy("a2sf")
    assert_alive(good)


# -- use after close --------------------------------------------------------------------
CLOSED_CASES = [
    ("kv_scores", ()), ("kv_stats", ()), ("kv_n_cells", ()), ("kv_evict", (1,)),
    ("kv_reset_stats", ()), ("set_kv_policy", ("h2o",)), ("eval", ([5],)),
    ("generate", ([1, 5],)), ("create_completion", ("hi",)), ("tokenize", (b"hi",)),
    ("detokenize", ([5],)), ("save_state", ()), ("token_bos", ()), ("token_eos", ()),
]


@pytest.mark.parametrize("method,args", CLOSED_CASES, ids=[c[0] for c in CLOSED_CASES])
def test_use_after_close(tiny_f32, method, args):
    llm = Llama(tiny_f32, n_ctx=256, kv_policy="a2sf", **COMMON)
    llm.eval([5, 6, 7])
    state = llm.save_state()
    llm.close()
    with pytest.raises(ValueError, match="closed"):
        out = getattr(llm, method)(*args)
        if method == "generate":
            next(out)
    with pytest.raises(ValueError, match="closed"):
        llm.load_state(state)
    llm.close()  # closing twice is harmless
    fresh = Llama(tiny_f32, n_ctx=256, kv_policy="a2sf", **COMMON)
    fresh.load_state(state)  # the state outlives its model
    assert fresh.kv_n_cells() == 3
    assert_alive(fresh)


def _generated_cases(namespace) -> int:
    """Test items pytest generates from the test functions in ``namespace``:
    the product of each function's parametrize lists (1 when not parametrized)."""
    n = 0
    for name, fn in namespace.items():
        if not (name.startswith("test_") and callable(fn)) or name == "test_case_count":
            continue
        k = 1
        for mark in getattr(fn, "pytestmark", []):
            if mark.name == "parametrize":
                k *= len(mark.args[1])
        n += k
    return n


def test_case_count():
    """The issue asks for at least 150 bad-input cases: count the items this module generates."""
    n = _generated_cases(globals())
    assert _generated_cases({"test_use_after_close": test_use_after_close}) == len(CLOSED_CASES)
    assert _generated_cases({"test_broken_model_file": test_broken_model_file}) == 2 * len(MODEL_CASES)
    assert n >= 150, n


# -- the C API through a2sf._core: every bad argument is a status, never an abort ----
def test_core_bad_arguments(core, good):
    ctx = good._ctx.ctx
    cases = [
        (lambda: core.n_cells(ctx, -1), ValueError, "sequence id out of range"),
        (lambda: core.n_cells(ctx, 99), ValueError, "sequence id out of range"),
        (lambda: core.scores(ctx, 2**31 - 1), ValueError, "sequence id out of range"),
        (lambda: core.evict(ctx, 0, -1), ValueError, "n_free"),
        (lambda: core.evict(ctx, 99, 1), ValueError, "sequence id out of range"),
        (lambda: core.set_policy(ctx, kind=9), ValueError, "unknown policy kind"),
        (lambda: core.set_policy(ctx, kind=2, forgetting_factor=float("nan")), ValueError, "forgetting_factor"),
        (lambda: core.set_policy(ctx, kind=2, n_sink=-1), ValueError, "n_sink"),
        (lambda: core.set_policy(ctx, kind=2, seed=2**32), ValueError, "seed"),
        (lambda: core.get_policy(None), ValueError, "NULL"),
        (lambda: core.stats(0), ValueError, "NULL"),
        (lambda: core.scores("0x1234"), TypeError, "ctx must be"),
        (lambda: core.n_layers(True), TypeError, "ctx must be"),
        (lambda: core.evict(-5, 0, 1), ValueError, "not a valid pointer"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    assert core.get_policy(ctx) == pytest.approx(good.kv_policy.to_native())
    assert_alive(good)
