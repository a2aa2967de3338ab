"""Gemma 3 270M (iSWA memory: 15 sliding-window layers, 3 global) streams far past n_ctx.

Fast suite: 600 tokens per policy at n_ctx=256; ``-m slow``: 4000. The engine
scores and evicts in the global (base) cache: its cells never exceed n_ctx, the
newest token stays, text keeps coming and no logit is NaN.
"""
from __future__ import annotations

import numpy as np
import pytest

from a2sf import Llama
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
