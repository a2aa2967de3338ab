"""Endless streams on SmolLM2: a 256-cell cache keeps reading like a fresh context
far into a stream, positions stay far below the training context, the accounting is exact
(eval.stream, the "Endless streams" tables of docs/RESULTS.md; the 50k run is slow)."""
from __future__ import annotations

import numpy as np
import pytest

from a2sf import Llama
from a2sf.eval.stream import run_stream

from conftest import emma_tokens, last_logits


def _emma_tokens(model, n):
    tok = Llama(model, n_ctx=64, vocab_only=True, verbose=False)
    toks = emma_tokens(tok, n)
    bos = tok.token_bos()
    tok.close()
    return toks, bos


def _check(recs, n_ctx, chunk, limit):
    for r in recs:
        assert r["ratio"] <= limit, r  # reads like a context that saw only the recent history
        # positions="cache": below twice the cache per token; per head one numbering for every
        # head, so the positions any head holds (about 4 caches on SmolLM2), plus a cache
        assert r["max_position"] < 8 * n_ctx
        assert r["cells"] <= n_ctx
    assert recs[-1]["compactions"] > 0 and recs[-1]["evictions"] > 0


def test_stream_5k_reads_like_a_fresh_context(smollm2):
    toks, bos = _emma_tokens(smollm2, 5000)
    recs = run_stream(smollm2, toks, "a2sf", "cache", 256, [1280, 4800], 128, 1024, 2, 64, bos)
    _check(recs, 256, 64, 1.10)


def test_stream_accounting_is_exact_through_compactions(smollm2):
    llm = Llama(smollm2, n_ctx=256, kv_policy="a2sf", positions="cache", n_threads=2, verbose=False)
    toks, _ = _emma_tokens(smollm2, 3000)
    for i in range(0, len(toks), 64):
        llm.eval(toks[i:i + 64])
    st, kv = llm.kv_stats(), llm.kv_scores()
    assert st["cells_evicted"] + st["cells_used"] == llm.n_tokens == len(toks)
    assert st["compactions"] > 0 and kv.positions.max() < 8 * 256
    assert sorted(kv.token_index.tolist())[:4] == [0, 1, 2, 3]  # the sinks
    assert kv.token_index.max() == len(toks) - 1
    assert np.isfinite(kv.scores).all()
    llm.close()


def test_positions_default_to_cache_per_token_and_training_per_head(smollm2):
    """The measured defaults (docs/RESULTS.md, "Endless streams"): one token per cell renumbers at twice the
    cache; per (layer, KV head) only before the training context (fewer re-rotations read better)."""
    for granularity, expected in ((None, "training"), ("head", "training"), ("layer", "training"),
                                  ("token", "cache")):
        kw = {} if granularity is None else {"granularity": granularity}
        llm = Llama(smollm2, n_ctx=256, kv_policy="a2sf", n_threads=1, verbose=False, **kw)
        assert llm.positions == expected, granularity
        llm.close()
    llm = Llama(smollm2, n_ctx=256, kv_policy="streaming", n_threads=1, verbose=False)
    assert llm.positions == "cache"
    llm.close()


@pytest.mark.slow
def test_stream_50k_past_six_training_contexts(smollm2):
    toks, bos = _emma_tokens(smollm2, 50_000)
    recs = run_stream(smollm2, toks, "a2sf", "cache", 256, [1280, 16384, 32768, 49000], 256, 1024, 2, 64, bos)
    _check(recs, 256, 64, 1.10)


@pytest.mark.parametrize("policy, granularity", [("streaming", "token"), ("mean", "head")])
def test_removing_tokens_by_count_after_compaction_removes_those_tokens(smollm2, policy, granularity):
    """llama_cpp.Llama.generate drops a draft model's rejected tokens with seq_rm(-1, n_tokens, -1),
    counting tokens. After a compaction that count is far above the cache positions: the rejected
    tokens must go all the same, and the next token reads as if they had never been evaluated (the
    extra tokens fit without an eviction, so both caches hold the same tokens)."""
    toks, _ = _emma_tokens(smollm2, 760)
    runs = []
    for extra in (toks[700:703], []):
        kw = {} if policy == "streaming" else {"granularity": granularity}  # streaming: token only
        llm = Llama(smollm2, n_ctx=256, kv_policy=policy, positions="cache", n_threads=1, verbose=False, **kw)
        for i in range(0, 700, 64):
            llm.eval(toks[i:min(i + 64, 700)])
        assert llm.kv_stats()["compactions"] > 0 and llm.kv_scores().positions.max() < 699  # token 699 sits lower
        evictions = llm.kv_stats()["evictions"]
        if extra:
            llm.eval(extra)  # three "draft" tokens, then rejected as generate() does
            llm.n_tokens = 700
            llm._ctx.kv_cache_seq_rm(-1, 700, -1)
            kv = llm.kv_scores()
            assert kv.token_index.max() == 699 and len(kv.token_index) == llm.kv_n_cells()
        llm.eval([toks[750]])
        kv = llm.kv_scores()
        runs.append((last_logits(llm), kv.positions.copy(), kv.token_index.copy(),
                     llm.kv_stats()["evictions"] - evictions, llm.kv_head_scores()[0].copy()))
        llm.close()
    (la, pa, ta, ea, ha), (lb, pb, tb, eb, hb) = runs
    assert ea == eb == 0  # neither the drafts nor the next token evicted
    assert (pa == pb).all() and (ta == tb).all() and (ha == hb).all()  # the same tokens in every head
    np.testing.assert_allclose(la, lb, rtol=0, atol=1e-4)


def test_generation_with_a_draft_model_runs_through_compactions(smollm2):
    """llama-cpp-python's prompt-lookup speculative decoding on a 256-cell a2sf cache past a
    compaction: no decode error, no rejected draft left in the cache, and until the cache first
    fills the text is plain greedy decoding's."""
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    prompt = "List the days of the week, one per line, again and again:\nMonday\nTuesday\nWednesday\n"
    out = []
    for draft in (None, LlamaPromptLookupDecoding(num_pred_tokens=4)):
        llm = Llama(smollm2, n_ctx=256, kv_policy="a2sf", positions="cache", n_threads=1, verbose=False,
                    logits_all=draft is not None, draft_model=draft)
        text = llm(prompt, max_tokens=700, temperature=0)["choices"][0]["text"]
        st, kv = llm.kv_stats(), llm.kv_scores()
        assert st["compactions"] >= 1 and st["evictions"] >= 3, st
        assert st["cells_evicted"] + st["cells_used"] == llm.n_tokens  # every cell a kept token
        assert kv.token_index.max() == llm.n_tokens - 1
        assert len(set(kv.token_index.tolist())) == len(kv.token_index)
        n_prompt = len(llm.tokenize(prompt.encode()))
        # generated tokens before the cache first fills (a draft batch fills it up to 4 sooner)
        same = llm.detokenize(llm.tokenize(text.encode(), add_bos=False)[:256 - n_prompt - 8]).decode()
        out.append((text, same))
        llm.close()
    (plain, plain_head), (drafted, _) = out
    assert len(plain_head) > 100 and drafted.startswith(plain_head)
