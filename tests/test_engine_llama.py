"""a2sf.Llama: validation, parent equivalence, batch fitting, eviction through
the high-level API on the tiny random model (fast)."""
from __future__ import annotations

import math
import pickle

import llama_cpp
import numpy as np
import pytest

from a2sf import Llama
from a2sf._llama.batch import fit_batch
from a2sf.gguf_header import context_length
from a2sf.policies import H2O, A2SF, NoEviction, StreamingLLM, TOVA, make_policy

COMMON = dict(n_threads=2, verbose=False)


# -- validation: everything raises before a model is loaded -------------------
@pytest.mark.parametrize("kw,exc,match", [
    (dict(kv_policy="snapkv"), ValueError, "unknown KV policy"),
    (dict(kv_policy=3), TypeError, "kv_policy must be"),
    (dict(kv_policy="a2sf", forgetting_factor=1.5), ValueError, "forgetting_factor"),
    (dict(kv_policy="a2sf", forgetting_factor=-0.1), ValueError, "forgetting_factor"),
    (dict(kv_policy="a2sf", forgetting_factor=math.nan), ValueError, "forgetting_factor"),
    (dict(kv_policy="a2sf", forgetting_factor=True), TypeError, "forgetting_factor"),
    (dict(kv_policy="a2sf", forgetting_factor="0.5"), TypeError, "forgetting_factor"),
    (dict(kv_policy="h2o", forgetting_factor=0.5), TypeError, "fixes forgetting_factor"),
    (dict(kv_policy="h2o", n_sink=-1), ValueError, "n_sink"),
    (dict(kv_policy="h2o", n_recent=2.5), TypeError, "n_recent"),
    (dict(kv_policy="h2o", evict_chunk=-4), ValueError, "evict_chunk"),
    (dict(kv_policy="random", kv_seed=-1), ValueError, "seed"),
    (dict(kv_policy="a2sf", value_aware="yes"), TypeError, "value_aware"),
    (dict(n_sink=4), ValueError, "without a policy"),
    (dict(forgetting_factor=0.5), ValueError, "without a policy"),
    (dict(max_positions=4096), ValueError, "max_positions needs a kv_policy"),
    (dict(kv_policy="h2o", n_ctx=256, n_batch=253), ValueError, "n_batch=253 does not fit"),
    (dict(kv_policy="h2o", n_ctx=256, n_recent=32, n_ubatch=230), ValueError, "n_ubatch=230 does not fit"),
    (dict(kv_policy="h2o", n_ctx=256, n_sink=200, n_recent=60), ValueError, "leaves no room"),
    (dict(kv_policy="streaming", n_ctx=64, n_recent=60), ValueError, "leaves no room"),
    (dict(kv_policy="h2o", n_ctx=-1), ValueError, "n_ctx"),
    (dict(kv_policy="h2o", n_ctx=256, max_positions=100), ValueError, "max_positions"),
    (dict(kv_policy="h2o", n_ctx=256, max_positions=1000.0), TypeError, "max_positions"),
])
def test_bad_settings_raise(tiny_f32, kw, exc, match):
    with pytest.raises(exc, match=match):
        Llama(tiny_f32, **COMMON, **kw)


def test_n_ctx_zero_unresolvable_is_rejected(tmp_path):
    bad = tmp_path / "not-a-gguf.bin"
    bad.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="n_ctx=0"):
        Llama(str(bad), n_ctx=0, kv_policy="h2o", **COMMON)


def test_process_survives_bad_settings(tiny_f32):
    for kw in (dict(kv_policy="nope"), dict(kv_policy="a2sf", forgetting_factor=2.0),
               dict(kv_policy="h2o", n_ctx=128, n_batch=128)):
        with pytest.raises((ValueError, TypeError)):
            Llama(tiny_f32, **COMMON, **kw)
    llm = Llama(tiny_f32, n_ctx=256, **COMMON)
    assert llm("hello", max_tokens=4, temperature=0.0)["object"] == "text_completion"


# -- batch fitting (pure Python, no model loaded) --------------------------------
def fit(path, policy="h2o", **kw):
    return fit_batch(path, make_policy(policy), kw)


def test_fit_checks_user_values_only(tiny_f32):
    # the parent's defaults (n_batch=512) are not the user's choice: never an error
    assert fit(tiny_f32, n_ctx=128)["n_batch"] == 32


def test_batch_is_chosen_to_fit(tiny_f32):
    assert fit(tiny_f32) == dict(n_ctx=512, n_batch=128, n_ubatch=128)  # parent default n_ctx=512
    assert fit(tiny_f32, n_ctx=256) == dict(n_ctx=256, n_batch=64, n_ubatch=64)
    assert fit(tiny_f32, n_ctx=8192)["n_batch"] == 512
    assert fit(tiny_f32, n_ctx=40) == dict(n_ctx=40, n_batch=10, n_ubatch=10)  # a quarter of the cache
    assert fit_batch(tiny_f32, make_policy("h2o", n_recent=32), dict(n_ctx=40)) == dict(
        n_ctx=40, n_batch=3, n_ubatch=3)  # 36 protected
    assert fit(tiny_f32, n_ctx=256, n_ubatch=32) == dict(n_ctx=256, n_batch=32, n_ubatch=32)
    assert fit(tiny_f32, n_ctx=256, n_batch=100, n_ubatch=200) == dict(n_ctx=256, n_batch=100, n_ubatch=100)
    assert fit(tiny_f32, n_ctx=256, n_batch=251)["n_batch"] == 251  # 4 sinks + 251 = 255 < 256
    with pytest.raises(ValueError):
        fit(tiny_f32, n_ctx=256, n_batch=252)
    # n_ctx=0: the model's training context, read from the GGUF header
    assert fit(tiny_f32, n_ctx=0)["n_ctx"] == 512
    # protected cells are what count, whatever the policy
    assert fit(tiny_f32, StreamingLLM(n_recent=200), n_ctx=256)["n_batch"] == 51


def test_gguf_context_length(tiny_f32, tmp_path):
    assert context_length(tiny_f32) == 512
    assert context_length(str(tmp_path / "missing.gguf")) is None


# -- kv_policy=None is llama_cpp.Llama -------------------------------------------
def _complete(cls, path, **kw):
    llm = cls(path, n_ctx=256, seed=1234, **COMMON, **kw)
    out = llm("The cat sat on the", max_tokens=40, temperature=0.8, seed=7)
    toks = llm.input_ids[: llm.n_tokens].tolist()
    chat = llm.create_chat_completion(
        messages=[{"role": "user", "content": "hi there"}], max_tokens=16, seed=3)
    return out["choices"][0]["text"], toks, chat["choices"][0]["message"]["content"]


@pytest.mark.parametrize("policy", [None, "none", NoEviction()])
def test_no_policy_is_the_parent(tiny_f32, policy):
    ours = _complete(Llama, tiny_f32, kv_policy=policy)
    theirs = _complete(llama_cpp.Llama, tiny_f32)
    assert ours == theirs


def test_no_policy_keeps_the_parent_limits(tiny_f32):
    llm = Llama(tiny_f32, n_ctx=256, **COMMON)
    assert llm.kv_policy is None and llm.context_window == llm._n_ctx == llm.n_ctx() == 256
    assert llm.input_ids.shape == (256,)
    with pytest.raises(ValueError, match="exceed context window"):
        llm.create_completion(list(range(3, 300)), max_tokens=1)


def test_no_policy_smollm2_is_the_parent(smollm2):
    ours = _complete(Llama, smollm2)
    theirs = _complete(llama_cpp.Llama, smollm2)
    assert ours == theirs


# -- with a policy (needs the engine) -------------------------------------------
def tiny(path, policy="h2o", n_ctx=256, **kw):
    kw.setdefault("max_positions", 4096)
    return Llama(path, n_ctx=n_ctx, kv_policy=policy, seed=1, **COMMON, **kw)


def test_policy_is_installed(core, tiny_f32):
    llm = tiny(tiny_f32, A2SF(forgetting_factor=0.5, n_recent=16), evict_chunk=8)
    # granularity left unset: the policy in force carries what the engine chose
    assert llm.kv_policy == A2SF(forgetting_factor=0.5, n_recent=16, evict_chunk=8, granularity="head")
    assert core.get_policy(llm._ctx.ctx) == pytest.approx(llm.kv_policy.to_native())
    assert llm.n_batch == 64 and llm.context_params.n_ubatch == 64
    assert llm.context_window == 4096  # the completion API's limit is max_positions
    assert llm._n_ctx == llm.n_ctx() == 256  # the parent's own n_ctx keeps its meaning
    assert llm.__getstate__()["max_positions"] == 4096
    assert llm.__getstate__()["kv_policy"] == llm.kv_policy
    assert pickle.loads(pickle.dumps(llm.kv_policy)) == llm.kv_policy


def test_n_ctx_zero_resolves_to_training_context(core, tiny_f32):
    llm = Llama(tiny_f32, n_ctx=0, kv_policy="tova", **COMMON)
    assert llm.n_ctx() == 512 and llm.n_batch == 128
    assert llm.context_window > 10**9  # positions are compacted (the default): no window limit
    llm = Llama(tiny_f32, n_ctx=0, kv_policy="tova", positions="absolute", **COMMON)
    assert llm.context_window == 512  # without compaction max_positions defaults to the training context


def _check_invariants(llm, n_ctx=256):
    s = llm.kv_scores()
    pol = llm.kv_policy
    n = llm.n_tokens
    pos = s.token_index.tolist()  # the tokens kept (compaction renumbers positions)
    assert len(pos) <= n_ctx
    assert pos == sorted(set(pos)) and (not pos or pos[-1] == n - 1)
    assert set(range(min(pol.n_sink, n))) <= set(pos), "a sink was evicted"
    assert set(range(max(0, n - pol.recent_window(len(pos))), n)) <= set(pos), "a recent cell was evicted"
    assert llm.kv_stats()["cells_used"] == len(pos)
    return pos


@pytest.mark.parametrize("policy", ["streaming", "h2o", "tova", "a2sf", "vatp", "random"])
def test_eval_far_past_n_ctx(core, tiny_f32, policy):
    llm = tiny(tiny_f32, policy)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 300, size=900).tolist()
    llm.eval(tokens[:300])  # a prompt longer than the cache, in chunks of n_batch
    _check_invariants(llm)
    for t in tokens[300:400]:
        llm.eval([t])
        _check_invariants(llm)
    llm.eval(tokens[400:])
    pos = _check_invariants(llm)
    assert llm.n_tokens == 900 and llm.input_ids[:900].tolist() == tokens
    st = llm.kv_stats()
    assert st["evictions"] > 0 and st["cells_evicted"] == 900 - len(pos)
    assert st["evict_seconds"] >= 0.0
    if policy == "streaming":
        k = len(pos) - 4
        assert pos == list(range(4)) + list(range(900 - k, 900))


def _kept_after(path, policy, tokens):
    llm = tiny(path, policy)
    llm.eval(tokens)
    return set(llm.kv_scores().token_index.tolist())


def test_random_differs_from_h2o_and_is_seeded(core, tiny_f32):
    tokens = np.random.default_rng(1).integers(3, 300, size=500).tolist()
    h2o = _kept_after(tiny_f32, "h2o", tokens)
    r0 = _kept_after(tiny_f32, make_policy("random", seed=0), tokens)
    r0b = _kept_after(tiny_f32, make_policy("random", seed=0), tokens)
    r1 = _kept_after(tiny_f32, make_policy("random", seed=1), tokens)
    tova = _kept_after(tiny_f32, "tova", tokens)
    assert r0 == r0b
    assert r0 != r1
    assert r0 != h2o
    assert tova != h2o


@pytest.mark.parametrize("policy", ["h2o", "tova", "a2sf", "vatp"])
def test_manual_eviction_drops_the_lowest_scores(core, tiny_f32, policy):
    # one ranking for all layers and heads, by the scores alone (pooling: tests/test_granularity.py)
    llm = tiny(tiny_f32, policy, granularity="token", pool_kernel=1)
    llm.eval(np.random.default_rng(2).integers(3, 300, size=100).tolist())
    before = llm.kv_scores()
    pol = llm.kv_policy
    unprotected = [i for i, p in enumerate(before.token_index) if pol.n_sink <= p < 100 - pol.recent_window(100 - 10)]
    order = sorted(unprotected, key=lambda i: before.total[i])
    expect = set(before.token_index.tolist()) - {int(before.token_index[i]) for i in order[:10]}
    assert llm.kv_evict(10) == 10
    after = llm.kv_scores()
    assert set(after.token_index.tolist()) == expect
    # the survivors keep their scores
    keep = np.isin(before.token_index, after.token_index)
    np.testing.assert_allclose(after.scores, before.scores[:, keep], rtol=1e-6)
    assert llm.kv_stats()["evictions"] == 1
    # decoding goes on from the holes
    llm.eval([5, 6, 7])
    assert llm.kv_scores().token_index[-1] == 102


def test_manual_eviction_streaming_and_random(core, tiny_f32):
    toks = list(range(3, 103))
    llm = tiny(tiny_f32, "streaming", n_recent=32)
    llm.eval(toks)
    assert llm.kv_evict(10) == 10
    assert llm.kv_scores().token_index.tolist() == list(range(4)) + list(range(14, 100))
    llm = tiny(tiny_f32, "random", n_recent=32)
    llm.eval(toks)
    assert llm.kv_evict(10) == 10
    pos = set(llm.kv_scores().token_index.tolist())
    assert len(pos) == 90 and set(range(4)) | set(range(68, 100)) <= pos
    # more than the unprotected cells: only those can go
    freed = llm.kv_evict(1000)
    assert 0 <= freed <= 54
    assert set(range(4)) | set(range(68, 100)) <= set(llm.kv_scores().token_index.tolist())
    with pytest.raises(ValueError):
        llm.kv_evict(-1)
    with pytest.raises(ValueError):
        llm.kv_scores(seq_id=10_000)


def test_completion_past_n_ctx_stream_and_chat(core, tiny_f32):
    llm = tiny(tiny_f32, "a2sf")
    long_prompt = list(range(3, 300)) * 2  # 594 tokens > n_ctx
    out = llm.create_completion(long_prompt, max_tokens=8, temperature=0.0)
    assert out["usage"]["prompt_tokens"] == 594
    assert llm.n_tokens >= 594 and llm.kv_n_cells() <= 256
    chunks = list(llm.create_completion("once upon a time", max_tokens=400, stream=True, seed=3))
    assert chunks and all("choices" in c for c in chunks)
    chat = llm.create_chat_completion(
        messages=[{"role": "system", "content": "be brief " * 150},
                  {"role": "user", "content": "hello"}], max_tokens=16, seed=5)
    assert chat["choices"][0]["message"]["role"] == "assistant"
    stream = list(llm.create_chat_completion(
        messages=[{"role": "user", "content": "the cat " * 200}], max_tokens=8, stream=True))
    assert stream and stream[0]["object"] == "chat.completion.chunk"
    # the parent refuses the same prompt
    plain = Llama(tiny_f32, n_ctx=256, **COMMON)
    with pytest.raises(ValueError):
        plain.create_completion(long_prompt, max_tokens=8)


def test_new_prompt_after_eviction_starts_clean(core, tiny_f32):
    """Prefix reuse never treats evicted cells as present."""
    llm = tiny(tiny_f32, "h2o")
    first = list(range(3, 300)) * 2
    llm.create_completion(first, max_tokens=4, temperature=0.0)
    assert llm.kv_stats()["cells_evicted"] > 0
    # shares 100 tokens with the evaluated sequence, then differs
    second = first[:100] + [7] * 20
    got = llm.create_completion(second, max_tokens=12, temperature=0.0)
    fresh = tiny(tiny_f32, "h2o").create_completion(second, max_tokens=12, temperature=0.0)
    assert got["choices"][0]["text"] == fresh["choices"][0]["text"]
    assert llm.kv_scores().token_index.tolist() == list(range(llm.n_tokens))


def test_pure_continuation_keeps_the_cache(core, tiny_f32, monkeypatch):
    llm = tiny(tiny_f32, "h2o")
    llm.eval(list(range(3, 300)) * 2)
    evicted = llm.kv_stats()["cells_evicted"]
    assert evicted > 0
    resets = []
    monkeypatch.setattr(llm, "reset", lambda: resets.append(1))
    history = llm.input_ids[: llm.n_tokens].tolist()
    gen = llm.generate(history + [9, 10, 11], temp=0.0)
    next(gen)
    gen.close()
    assert resets == [] and llm.n_tokens == len(history) + 3


def test_prefix_reuse_without_eviction_is_the_parent_s(core, tiny_f32, monkeypatch):
    llm = tiny(tiny_f32, "h2o")
    llm.eval(list(range(3, 103)))
    resets = []
    monkeypatch.setattr(llm, "reset", lambda: resets.append(1))
    gen = llm.generate(list(range(3, 53)) + [7, 7], temp=0.0)
    next(gen)
    gen.close()
    assert resets == [] and llm.n_tokens == 52


def test_logits_all_grows_with_the_sequence(core, tiny_f32):
    llm = tiny(tiny_f32, "tova", logits_all=True)
    out = llm.create_completion(list(range(3, 300)) * 2, max_tokens=5, temperature=0.0, logprobs=3)
    assert llm.scores.shape[0] >= llm.n_tokens >= 598
    lp = out["choices"][0]["logprobs"]
    assert lp["tokens"] and all(math.isfinite(x) for x in lp["token_logprobs"])


def test_set_kv_policy(core, tiny_f32):
    llm = tiny(tiny_f32, "h2o")
    llm.set_kv_policy("tova", n_recent=8)
    assert llm.kv_policy == TOVA(n_recent=8, granularity="head")  # what the engine chose
    assert core.get_policy(llm._ctx.ctx)["forgetting_factor"] == 0.0
    with pytest.raises(ValueError):
        llm.set_kv_policy("h2o", n_recent=250)
    assert llm.kv_policy == TOVA(n_recent=8, granularity="head")  # unchanged
    llm.eval(list(range(3, 300)) * 2)
    assert llm.kv_stats()["cells_evicted"] > 0
    llm.set_kv_policy(None)
    assert llm.kv_policy is None and llm.n_tokens == 0 and llm.context_window == 256
    assert core.get_policy(llm._ctx.ctx)["kind"] == 0
    llm.set_kv_policy(StreamingLLM())
    assert isinstance(llm.kv_policy, StreamingLLM) and llm.context_window == 4096
    assert H2O() != TOVA()


def test_the_context_window_is_lifted_only_inside_the_completion_api(core, tiny_f32):
    llm = tiny(tiny_f32, "h2o", max_positions=1024)
    stream = llm.create_completion(list(range(3, 290)) * 2, max_tokens=4, stream=True, temperature=0.0)
    next(stream)
    assert llm._n_ctx == llm.context_window == 1024  # what the parent's completion code checks against
    list(stream)
    assert llm._n_ctx == llm.n_ctx() == 256  # and outside it, the parent's own meaning
    assert len(llm.eval_tokens) == llm.n_tokens > 256  # not cut to n_ctx


@pytest.mark.parametrize("granularity", ["token", "head"])
def test_default_recent_window_is_half_of_what_an_eviction_keeps(core, tiny_f32, granularity):
    """n_recent=None: an eviction of 30 of 100 cells keeps 70, so the newest (70 - 4) // 2 = 33
    positions are protected: the same cells as an explicit n_recent=33."""
    toks = np.random.default_rng(4).integers(3, 300, size=100).tolist()
    kept = {}
    for n_recent in (None, 33):
        llm = tiny(tiny_f32, "h2o", granularity=granularity, **({} if n_recent is None else {"n_recent": n_recent}))
        llm.eval(toks)
        assert llm.kv_evict(30) == 30
        kept[n_recent] = llm.kv_head_scores()[0].copy()
        tokens = set(llm.kv_scores().token_index.tolist())
        assert set(range(100 - 33, 100)) <= tokens and set(range(4)) <= tokens
        assert llm.kv_policy.recent_window(70) == 33
        llm.close()
    np.testing.assert_array_equal(kept[None], kept[33])
