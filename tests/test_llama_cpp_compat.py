"""llama-cpp-python compatibility: its own offline tests, and the API users rely on, against a2sf.

llama-cpp-python 0.3.36's tests/ and the vocab-only GGUFs under
vendor/llama.cpp/models/ come from the sdist the build already extracted into
the a2sf cache (cpp/scripts/fetch_llama_cpp.py); they are run from there, in a
subprocess, with ``llama_cpp.Llama`` set to :class:`a2sf.Llama` on a2sf's
libllama (tests/llama_cpp_compat_plugin.py).

Their tests that download a model from the Hugging Face hub are skipped (a2sf
never goes to a model hub): test_real_model, test_real_llama,
test_real_llama_repeated_prompt_cache, test_recurrent_model_prompt_cache_reset,
test_hybrid_model_prompt_cache_reset, the 12 prompt-cache reuse cases
(stories15M / mamba-130m / Falcon-H1 models) and test_real_llama_embeddings.
"""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

import llama_cpp
from conftest import missing_dependency
from a2sf import Llama

LLAMA_CPP_PYTHON = "llama_cpp_python-0.3.36"
# the offline tests of theirs, all of which must pass against a2sf
EXPECTED_PASS = {
    "test_llama.py::test_llama_cpp_version",
    "test_llama.py::test_llama_cpp_tokenization",
    "test_llama_grammar.py::test_grammar_from_string",
    "test_llama_grammar.py::test_composed_pydantic_grammar",
    "test_llama_grammar.py::test_grammar_anyof",
    "test_llama_chat_format.py::test_mistral_instruct",
    "test_llama_chat_format.py::test_hf_tokenizer_config_str_to_chat_formatter",
    "test_llama_speculative.py::test_find_candidate_pred_tokens",
}


def _sdist_tree() -> Path:
    """Where cpp/scripts/fetch_llama_cpp.py extracted llama-cpp-python's sdist."""
    cache = os.environ.get("A2SF_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "a2sf"
    )
    return Path(cache) / LLAMA_CPP_PYTHON


@pytest.fixture(scope="module")
def their_results(tmp_path_factory):
    tree = _sdist_tree()
    if not (tree / "tests").is_dir():
        missing_dependency(f"llama-cpp-python's sdist tree is not in the a2sf cache ({tree}); build a2sf first")
    out = tmp_path_factory.mktemp("llama_cpp_tests")
    junit = out / "junit.xml"
    # HF_HUB_OFFLINE: a hub call that slips past the plugin fails at once instead of retrying
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "llama_cpp_compat_plugin", "-p", "no:cacheprovider",
         "-c", os.devnull, "--rootdir", str(out), f"--junitxml={junit}", "-q", "-rs", "tests"],
        cwd=tree, env=env, capture_output=True, text=True, timeout=600,
    )
    results = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{Path(case.get('file') or case.get('classname').replace('.', '/')).stem}.py::{case.get('name')}"
        name = name.replace("tests/", "")
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "skipped: " + (child.get("message") or "")
        results[name] = outcome
    return results, r.stdout + r.stderr


def test_their_offline_tests_pass(their_results):
    results, log = their_results
    failed = {k: v for k, v in results.items() if v == "failed"}
    assert not failed, log
    passed = {k for k, v in results.items() if v == "passed"}
    assert EXPECTED_PASS <= passed, (sorted(EXPECTED_PASS - passed), log)


def test_only_network_tests_are_skipped(their_results):
    results, _ = their_results
    skipped = {k: v for k, v in results.items() if v.startswith("skipped")}
    assert all("Hugging Face hub (network)" in v for v in skipped.values()), skipped
    assert len(skipped) == len(results) - len(EXPECTED_PASS)


# -- the API around a2sf.Llama ----------------------------------------------------
@pytest.fixture(scope="module")
def vanilla(smollm2):
    llm = Llama(smollm2, n_ctx=256, n_threads=2, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def evicting(smollm2):
    llm = Llama(smollm2, n_ctx=256, n_threads=2, kv_policy="a2sf", verbose=False)
    yield llm
    llm.close()


def test_is_a_llama_cpp_llama(vanilla, evicting):
    assert isinstance(vanilla, llama_cpp.Llama) and isinstance(evicting, llama_cpp.Llama)
    assert vanilla.kv_policy is None and type(evicting.kv_policy).__name__ == "A2SF"


def test_chat_template_from_gguf(vanilla, evicting):
    """The GGUF's own chat template is used; a policy changes nothing before the cache is full."""
    assert vanilla.chat_format == evicting.chat_format == "chat_template.default"
    assert "<|im_start|>" in vanilla.metadata["tokenizer.chat_template"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    a = vanilla.create_chat_completion(messages=messages, max_tokens=12, temperature=0)
    b = evicting.create_chat_completion(messages=messages, max_tokens=12, temperature=0)
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"]
    assert evicting.kv_stats()["evictions"] == 0


def test_explicit_chat_format(smollm2):
    llm = Llama(smollm2, n_ctx=256, n_threads=2, chat_format="chatml", kv_policy="h2o", verbose=False)
    try:
        r = llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
        assert r["choices"][0]["message"]["role"] == "assistant" and r["usage"]["completion_tokens"] <= 4
    finally:
        llm.close()


def test_embeddings_off_is_a_clear_error(vanilla, evicting):
    for llm in (vanilla, evicting):
        with pytest.raises(RuntimeError, match="embedding=True"):
            llm.create_embedding("hello")


@pytest.fixture(scope="module")
def tiny_evicting(tiny_f32):
    """The tiny random model (cheap tokens) with A2SF eviction in a 256-cell cache."""
    llm = Llama(tiny_f32, n_ctx=256, kv_policy="a2sf", verbose=False)
    yield llm
    llm.close()


def test_seeds(tiny_evicting):
    """Same seed, same sample; another seed, another sample -- also across evictions."""
    llm = tiny_evicting

    def sample(seed):
        return llm.create_completion("the cat", max_tokens=300, temperature=1.0, seed=seed)["choices"][0]["text"]

    llm.kv_reset_stats()
    a, b, c = sample(7), sample(7), sample(8)
    assert a == b and a != c
    assert llm.n_tokens > 256 and llm.kv_stats()["evictions"] > 0


def test_stop_strings_and_stopping_criteria(evicting, tiny_evicting):
    r = evicting.create_completion("1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 6"])
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["text"] == " 5,"

    seen = []

    def stop_past(input_ids, logits):
        seen.append(len(input_ids))
        return len(input_ids) >= 300  # past n_ctx = 256 cells

    r = tiny_evicting.create_completion(
        "the cat", max_tokens=400, temperature=0, stopping_criteria=llama_cpp.StoppingCriteriaList([stop_past]),
    )
    assert r["choices"][0]["finish_reason"] == "stop"
    assert max(seen) == 300 and r["usage"]["total_tokens"] in (299, 300)


def test_logits_all_and_logprobs(tiny_f32):
    llm = Llama(tiny_f32, n_ctx=256, kv_policy="tova", logits_all=True, verbose=False)
    try:
        r = llm.create_completion("the cat", max_tokens=300, temperature=0, logprobs=2)
        lp = r["choices"][0]["logprobs"]
        n_prompt = r["usage"]["prompt_tokens"]
        # llama_cpp counts these by re-tokenizing the text, so byte tokens of the
        # random model may merge: vanilla llama_cpp.Llama is off by a few too
        assert abs(len(lp["tokens"]) - 300) <= 5
        # top-2 by token text (tokens with equal text merge) plus the sampled token
        assert all(1 <= len(top) <= 3 for top in lp["top_logprobs"])
        assert sum(len(top) == 2 for top in lp["top_logprobs"]) > 250
        assert all(v <= 0 for v in lp["token_logprobs"])
        assert llm.scores.shape[0] >= llm.n_tokens > 256  # one row of logits per position, past n_ctx
        # the rows are the logits greedy decoding picked from
        ids = llm.input_ids[: llm.n_tokens]
        assert np.array_equal(np.argmax(llm.scores[n_prompt - 1 : llm.n_tokens - 1], axis=1), ids[n_prompt:])
    finally:
        llm.close()
    llm = Llama(tiny_f32, n_ctx=256, kv_policy="tova", verbose=False)
    try:
        with pytest.raises(ValueError, match="logits_all"):
            llm.create_completion("the cat", max_tokens=2, logprobs=2)
    finally:
        llm.close()


def test_from_pretrained_is_a_clear_offline_error():
    with pytest.raises(RuntimeError, match="never downloads models"):
        Llama.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", "*.gguf", kv_policy="a2sf")
