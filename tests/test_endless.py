"""Endless streams on SmolLM2: a 256-cell cache keeps reading like a fresh context
far into a stream, positions stay far below the training context, the accounting is exact
(eval.stream, the README's "Endless streams" table; the 50k run is slow)."""
from __future__ import annotations

import numpy as np
import pytest

from a2sf import Llama
from a2sf.eval.data import load_texts
from a2sf.eval.stream import run_stream


def _emma_tokens(model, n):
    tok = Llama(model, n_ctx=64, vocab_only=True, verbose=False)
    toks = tok.tokenize(load_texts("austen")["emma"].encode("utf-8"), add_bos=True)[:n]
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
    llm = Llama(smollm2, n_ctx=256, kv_policy="a2sf", n_threads=2, verbose=False)
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


@pytest.mark.slow
def test_stream_50k_past_six_training_contexts(smollm2):
    toks, bos = _emma_tokens(smollm2, 50_000)
    recs = run_stream(smollm2, toks, "a2sf", "cache", 256, [1280, 16384, 32768, 49000], 256, 1024, 2, 64, bos)
    _check(recs, 256, 64, 1.10)
