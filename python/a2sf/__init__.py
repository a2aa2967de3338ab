"""a2sf: attention-score KV-cache eviction inside llama.cpp.

    from a2sf import Llama
    llm = Llama(model_path, kv_policy="a2sf")

a2sf ships its own (patched) libllama in ``a2sf/lib``; llama-cpp-python's
Python code is reused and pointed at that library, so ``import a2sf`` must
come before any ``import llama_cpp``.
"""
from __future__ import annotations

__version__ = "0.1.0"

import importlib.util as _importlib_util
import os as _os
import sys as _sys
from pathlib import Path as _Path

LIB_DIR = _Path(__file__).resolve().parent / "lib"


def _load_llama_cpp() -> None:
    """Import llama_cpp with its ctypes bindings bound to our libllama."""
    loaded = _sys.modules.get("llama_cpp.llama_cpp")
    if loaded is not None:
        lib_name = getattr(getattr(loaded, "_lib", None), "_name", None)
        if lib_name is None or _Path(lib_name).resolve().parent != LIB_DIR:
            raise ImportError(
                f"llama_cpp was imported before a2sf and is bound to {lib_name!r}, "
                f"not to a2sf's patched library in {LIB_DIR}. "
                "Import a2sf before llama_cpp (or in a fresh process)."
            )
        return
    if not any(LIB_DIR.glob("*llama.*")):
        raise ImportError(
            f"a2sf's native libraries are missing from {LIB_DIR}: "
            "build and install the package (bash scripts/setup.sh, or pip install .)."
        )
    previous = _os.environ.get("LLAMA_CPP_LIB_PATH")
    _os.environ["LLAMA_CPP_LIB_PATH"] = str(LIB_DIR)
    try:
        import llama_cpp  # noqa: F401  (binds llama_cpp.llama_cpp._lib)
    finally:
        if previous is None:
            del _os.environ["LLAMA_CPP_LIB_PATH"]
        else:
            _os.environ["LLAMA_CPP_LIB_PATH"] = previous


_load_llama_cpp()


def llama_cpp_commit() -> str:
    """The upstream llama.cpp commit this build was made from (full hash)."""
    try:
        from ._build_info import LLAMA_CPP_COMMIT
    except ImportError:  # running from a source tree without a build
        return "unknown"
    return LLAMA_CPP_COMMIT


from .llama import Llama  # noqa: E402
from .sysinfo import system_info  # noqa: E402

__all__ = ["Llama", "LIB_DIR", "__version__", "llama_cpp_commit", "system_info"]

# Policy classes, once that module exists (a broken module still raises).
if _importlib_util.find_spec(__name__ + ".policies") is not None:
    from . import policies as _policies

    _names = getattr(_policies, "__all__", [n for n in dir(_policies) if not n.startswith("_")])
    globals().update({n: getattr(_policies, n) for n in _names})
    __all__ += list(_names)
