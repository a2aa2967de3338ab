"""Optional dependencies: import one, or say which extra brings it."""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``, or an ImportError naming the pip extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise ImportError(
            f"{purpose} needs {top}, which is not installed: pip install 'a2sf[{extra}]' "
            f"(or pip install {top}) ({e})"
        ) from e
