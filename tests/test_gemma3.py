"""Gemma 3 270M (iSWA memory: 15 sliding-window layers, 3 global) streams far past n_ctx.

Fast suite: 600 tokens per policy at n_ctx=256; ``-m slow``: 4000. The engine
scores and evicts in the global (base) cache: its cells never exceed n_ctx, the
newest token stays, text keeps coming and no logit is NaN.
"""
from __future__ import annotations

import numpy as np
import pytest

from a2sf import Llama
from a2sf.eval.engine import log_softmax_rows
from a2sf.policies import POLICY_NAMES

from conftest import generate_past_n_ctx, missing_dependency

N_CTX = 256
POLICIES = [p for p in POLICY_NAMES if p != "none"]


@pytest.fixture(scope="module")
def gemma3_270m():
    try:
        from a2sf.models import gemma3_270m_path

        return str(gemma3_270m_path())
    except Exception as e:  # package not installable here
        missing_dependency(f"Gemma 3 270M not available: {e}")


def _generate(path, policy, n_new, check_every):
    llm = Llama(path, n_ctx=N_CTX, kv_policy=policy, n_threads=1, seed=42, verbose=False)
    assert llm.kv_scores().scored_layers.tolist() == [5, 11, 17]  # the global layers

    def check():
        s = llm.kv_scores()
        assert len(s) <= N_CTX and llm.kv_stats()["cells_used"] <= N_CTX
        assert s.token_index[-1] == llm.n_tokens - 1
        assert np.isfinite(np.asarray(llm._scores[-1])).all()

    generate_past_n_ctx(llm, policy, n_new, check_every, check)


@pytest.mark.parametrize("policy", POLICIES)
def test_gemma3_generates_far_past_n_ctx(core, gemma3_270m, policy):
    _generate(gemma3_270m, policy, 600, check_every=50)


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
def test_gemma3_generates_4000_tokens(core, gemma3_270m, policy):
    _generate(gemma3_270m, policy, 4000, check_every=200)


def test_gemma3_per_head_stream_compacts_beside_its_512_window(core, gemma3_270m):
    """Per-head cells beside Gemma 3's real window (512 tokens, wider than the 256-cell global
    cache), positions="cache": 1500 tokens of Emma compact several times and keep the positions
    near the cache, and the perplexity stays within 3% of the same stream at absolute
    positions (measured: 2000 tokens, last 1000: 27.6 vs 27.3)."""
    from conftest import emma_tokens

    out = {}
    for positions in ("cache", "absolute"):
        llm = Llama(gemma3_270m, n_ctx=N_CTX, kv_policy="a2sf", granularity="head", positions=positions,
                    n_threads=1, n_batch=64, n_ubatch=64, logits_all=True, verbose=False)
        toks = emma_tokens(llm, 1500)
        llm.eval(toks)
        lg = np.array(llm.scores[:len(toks) - 1], dtype=np.float64)
        assert np.isfinite(lg).all()
        nll = -log_softmax_rows(lg)[np.arange(len(toks) - 1), toks[1:]]
        pos, _ = llm.kv_head_scores()
        out[positions] = (float(np.exp(nll[-700:].mean())), llm.kv_stats()["compactions"], int(pos.max()))
        llm.close()
    (ppl_c, n_c, max_c), (ppl_a, n_a, max_a) = out["cache"], out["absolute"]
    assert n_c >= 3 and n_a == 0
    assert max_a == 1499 and max_c < 1024  # the window's 512 positions + the cache's 256, and growth
    assert abs(np.log(ppl_c / ppl_a)) < np.log(1.03), out
