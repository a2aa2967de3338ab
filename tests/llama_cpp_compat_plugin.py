"""pytest plugin for running llama-cpp-python 0.3.36's own tests against a2sf.

Loaded by tests/test_llama_cpp_compat.py in a subprocess
(``pytest -p llama_cpp_compat_plugin <sdist>/tests``); never collected itself.

* ``import a2sf`` first: llama_cpp's ctypes bindings load a2sf's patched libllama;
* ``llama_cpp.Llama`` is :class:`a2sf.Llama` (``kv_policy=None``), so their tests
  construct our subclass;
* their test dependencies that are absent here are replaced by stand-ins:
  ``huggingface_hub.hf_hub_download`` skips the test, installed or not (it needs the network;
  a2sf never downloads models) and ``scipy.special.log_softmax`` is numpy's.
"""
from __future__ import annotations

import importlib.util
import sys
import types

import a2sf  # noqa: F401  (before llama_cpp)
import llama_cpp

llama_cpp.Llama = a2sf.Llama


def _stand_in(name: str, replace: bool = False, **attrs) -> None:
    """Provide ``attrs`` in module ``name``: a stand-in module when it is not
    installed; when it is, only with ``replace`` (then its attributes are set)."""
    if importlib.util.find_spec(name.split(".")[0]) is not None:
        if replace:
            mod = importlib.import_module(name)
            for k, v in attrs.items():
                setattr(mod, k, v)
        return
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        mod_name = ".".join(parts[:i])
        if mod_name not in sys.modules:
            sys.modules[mod_name] = types.ModuleType(mod_name)
        if i > 1:
            setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], sys.modules[mod_name])
    for k, v in attrs.items():
        setattr(sys.modules[name], k, v)


def _hf_hub_download(repo_id, filename, *args, **kwargs):
    import pytest

    pytest.skip(f"needs the Hugging Face hub (network): {repo_id}/{filename}")


def _log_softmax(x, axis=None):
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


# installed or not (transformers brings it): never reach for the network
_stand_in("huggingface_hub", replace=True, hf_hub_download=_hf_hub_download)
_stand_in("scipy.special", log_softmax=_log_softmax)


def pytest_report_header(config):
    return f"a2sf {a2sf.__version__}: llama_cpp.Llama is a2sf.Llama, libllama from {a2sf.LIB_DIR}"
