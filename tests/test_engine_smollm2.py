"""Each policy generates far past n_ctx with a real model (SmolLM2-135M, n_ctx=256).

Fast suite: ~600 tokens per policy. ``-m slow``: 4000 tokens per policy.
Invariants checked along the way: cells used never exceed n_ctx, the sinks and
the newest n_recent positions are always present, positions are unique and end
at the newest token, text keeps coming; StreamingLLM keeps exactly sinks + newest.
"""
from __future__ import annotations

import pytest

from a2sf import Llama
from a2sf.policies import make_policy

from conftest import generate_past_n_ctx

N_CTX = 256
POLICIES = ["streaming", "h2o", "tova", "a2sf", "vatp", "random"]


def _generate(smollm2, policy, n_new, check_every=25):
    llm = Llama(smollm2, n_ctx=N_CTX, kv_policy=policy, n_threads=2, seed=42,
                max_positions=8192, verbose=False)
    pol = llm.kv_policy

    def check():
        s = llm.kv_scores()
        pos = s.token_index.tolist()
        n = llm.n_tokens
        assert len(pos) <= N_CTX
        assert llm.kv_stats()["cells_used"] <= N_CTX
        assert pos == sorted(set(pos)) and pos[-1] == n - 1
        assert set(range(pol.n_sink)) <= set(pos), f"{policy}: sink evicted at n={n}"
        assert set(range(max(0, n - pol.recent_window(len(pos))), n)) <= set(pos), f"{policy}: recent evicted at n={n}"
        if n > N_CTX:
            assert len(pos) >= N_CTX - llm.n_batch - pol.evict_chunk - 1
        if policy == "streaming":
            k = len(pos) - pol.n_sink
            assert pos == list(range(pol.n_sink)) + list(range(n - k, n))

    return llm, generate_past_n_ctx(llm, policy, n_new, check_every, check)


@pytest.mark.parametrize("policy", POLICIES)
def test_generates_far_past_n_ctx(core, smollm2, policy):
    _generate(smollm2, policy, 600)


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
def test_generates_4000_tokens(core, smollm2, policy):
    _generate(smollm2, policy, 4000, check_every=100)


def test_random_and_h2o_keep_different_cells(core, smollm2):
    text = ("The history of lighthouses begins with fires lit on hilltops. " * 60).encode()

    def kept(policy):
        llm = Llama(smollm2, n_ctx=N_CTX, kv_policy=policy, n_threads=2, verbose=False)
        llm.eval(llm.tokenize(text)[:700])
        return llm.kv_scores().token_index.tolist()

    h2o, rnd, stream = kept("h2o"), kept("random"), kept("streaming")
    assert h2o != rnd and h2o != stream
    assert kept(make_policy("random", seed=0)) == rnd


def test_chat_with_a_policy_past_n_ctx(core, smollm2):
    llm = Llama(smollm2, n_ctx=N_CTX, kv_policy="a2sf", n_threads=2, verbose=False)
    system = "You are a helpful assistant who knows about lighthouses. " * 40  # ~450 tokens
    msgs = [{"role": "system", "content": system},
            {"role": "user", "content": "What is a lighthouse for?"}]
    r = llm.create_chat_completion(messages=msgs, max_tokens=32, temperature=0.0)
    assert r["choices"][0]["message"]["content"].strip()
    assert r["usage"]["prompt_tokens"] > N_CTX
    parts = [c["choices"][0]["delta"].get("content", "")
             for c in llm.create_chat_completion(messages=msgs, max_tokens=32, temperature=0.0,
                                                 stream=True)]
    assert "".join(parts).strip()
