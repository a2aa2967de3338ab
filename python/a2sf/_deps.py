"""Optional dependencies: import one, or say which extra brings it."""
from __future__ import annotations

import contextlib
import importlib
from types import ModuleType
from typing import Iterator

__all__ = ["require", "import_hint"]


@contextlib.contextmanager
def import_hint(hint: str) -> Iterator[None]:
    """Re-raise an ImportError of the ``with`` block as one that says ``hint`` (what
    needs the module and how to get it) first, the original error after it in
    parentheses: the user reads the fix, not only the missing name."""
    try:
        yield
    except ImportError as e:
        raise ImportError(f"{hint} ({e})") from e


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``, or an ImportError naming the pip extra to install."""
    top = module.split(".")[0]
    with import_hint(f"{purpose} needs {top}, which is not installed: pip install 'a2sf[{extra}]' "
                     f"(or pip install {top})"):
        return importlib.import_module(module)
