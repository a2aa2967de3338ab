#!/usr/bin/env python3
"""Obtain the pristine llama.cpp tree that a2sf builds on.

The tree is the `vendor/llama.cpp` directory of the PyPI sdist of
llama-cpp-python (pinned version and sha256 below).  The sdist is fetched once
with pip into a cache directory, checked, extracted once and reused:

    ${A2SF_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/a2sf}/
        llama_cpp_python-<ver>.tar.gz
        llama_cpp_python-<ver>/vendor/llama.cpp/      <- printed by this script

Offline: set A2SF_LLAMA_CPP_SDIST=/path/to/llama_cpp_python-<ver>.tar.gz.

Usage:  fetch_llama_cpp.py            print the llama.cpp directory
        fetch_llama_cpp.py --commit   print the pinned upstream commit too
                                      (second line)
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{SDIST_VERSION}"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
EXTRACTED_STAMP = ".a2sf-extracted"


def cache_dir() -> Path:
    env = os.environ.get("A2SF_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "a2sf"


def log(msg: str) -> None:
    print(f"[a2sf] {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path):
    """Serialise concurrent builds that share the cache (POSIX only; no-op elsewhere)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pip_commands() -> list[list[str]]:
    """pip invocations to try: this interpreter's pip, then a pip on PATH
    (pip is usually not importable inside an isolated PEP 517 build env)."""
    cmds = [[sys.executable, "-m", "pip"]]
    for name in ("pip3", "pip"):
        exe = shutil.which(name)
        if exe:
            cmds.append([exe])
    return cmds


def _pip_download(dest: Path) -> Path:
    spec = f"llama-cpp-python=={SDIST_VERSION}"
    base_args = ["download", "--no-deps", "--no-binary", "llama-cpp-python", spec, "-d", str(dest)]
    errors = []
    for pip in _pip_commands():
        # --no-build-isolation avoids pip creating a build env just to read the
        # sdist's metadata; it needs scikit-build-core in that interpreter, so
        # retry with isolation if it fails.
        for extra in (["--no-build-isolation"], []):
            cmd = pip + base_args + extra
            log("running: " + " ".join(cmd))
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            found = sorted(dest.glob(f"{SDIST_NAME}.tar.gz"))
            if r.returncode == 0 and found:
                return found[0]
            errors.append(f"$ {' '.join(cmd)}\n{r.stdout[-2000:]}")
    raise SystemExit(
        "a2sf: could not download the llama-cpp-python sdist with pip.\n"
        "Set A2SF_LLAMA_CPP_SDIST to a local copy of "
        f"{SDIST_NAME}.tar.gz, or pass -DA2SF_LLAMA_CPP_DIR=<llama.cpp tree>.\n\n"
        + "\n\n".join(errors)
    )


def obtain_sdist(root: Path) -> Path:
    tarball = root / f"{SDIST_NAME}.tar.gz"
    if tarball.exists() and sha256_file(tarball) == SDIST_SHA256:
        return tarball
    local = os.environ.get("A2SF_LLAMA_CPP_SDIST")
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        src = Path(local).expanduser() if local else _pip_download(Path(tmp))
        digest = sha256_file(src)
        if digest != SDIST_SHA256:
            raise SystemExit(
                f"a2sf: sha256 mismatch for {src}: got {digest}, expected {SDIST_SHA256}"
            )
        part = root / (tarball.name + ".part")
        shutil.copyfile(src, part)
        os.replace(part, tarball)
    return tarball


def extract(tarball: Path, root: Path) -> Path:
    out = root / SDIST_NAME
    if (out / EXTRACTED_STAMP).exists():
        return out
    log(f"extracting {tarball.name} into {root}")
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        with tarfile.open(tarball) as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tf.extractall(tmp)
        extracted = Path(tmp) / SDIST_NAME
        if not (extracted / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
            raise SystemExit(f"a2sf: {tarball} has no vendor/llama.cpp tree")
        (extracted / EXTRACTED_STAMP).write_text(SDIST_SHA256 + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(extracted, out)
    return out


def pristine_llama_cpp() -> Path:
    """Return the cached pristine llama.cpp directory, fetching it if needed."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    done = root / SDIST_NAME / EXTRACTED_STAMP
    if not done.exists():
        with file_lock(root / ".lock"):
            if not done.exists():
                extract(obtain_sdist(root), root)
    return root / SDIST_NAME / "vendor" / "llama.cpp"


def _read_git_head(gitdir: Path) -> str | None:
    head = gitdir / "HEAD"
    if not head.is_file():
        return None
    value = head.read_text().strip()
    if not value.startswith("ref:"):
        return value or None
    ref = value[4:].strip()
    if (gitdir / ref).is_file():
        return (gitdir / ref).read_text().strip() or None
    packed = gitdir / "packed-refs"
    if packed.is_file():
        for line in packed.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == ref:
                return parts[0]
    return None


def llama_cpp_commit(tree: Path) -> str:
    """Upstream commit of a llama.cpp tree, read from its .git (a directory, or
    a `gitdir:` file as in the llama-cpp-python sdist's submodule); "unknown"."""
    dotgit = Path(tree) / ".git"
    gitdir = None
    if dotgit.is_dir():
        gitdir = dotgit
    elif dotgit.is_file():
        text = dotgit.read_text().strip()
        if text.startswith("gitdir:"):
            gitdir = (dotgit.parent / text[len("gitdir:"):].strip()).resolve()
    if gitdir is not None:
        commit = _read_git_head(gitdir)
        if commit:
            return commit
    return "unknown"


def main(argv: list[str]) -> int:
    tree = pristine_llama_cpp()
    print(tree)
    if "--commit" in argv:
        print(llama_cpp_commit(tree))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
