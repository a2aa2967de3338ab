#!/usr/bin/env python3
"""Make the patched llama.cpp tree that CMake builds.

    prepare_llama_cpp.py --src <pristine tree> --dest <build>/llama.cpp \
                         [--patches cpp/patches] [--info <file.cmake>]

Copies <src> (without .git) to a staging directory, applies the patch series
with apply-patches.sh, then syncs the staging tree into <dest>: only files whose
content changed are rewritten, so the build recompiles only what a change in
the series really touches.  A stamp in <dest> records the hash of the inputs
(source file list with sizes and mtimes, patch contents, these scripts); when
it matches, nothing is done at all.

--info writes a CMake file setting A2SF_LLAMA_CPP_COMMIT (upstream commit of
<src>) and A2SF_PATCH_SERIES (patch file names).
"""
from __future__ import annotations

import argparse
import filecmp
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fetch_llama_cpp import llama_cpp_commit  # noqa: E402

STAMP = ".a2sf-stamp"
SKIP = {".git"}


def walk_files(root: Path):
    """Relative paths of all files under root (symlinks included), skipping SKIP."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP or dirpath != str(root))
        for name in sorted(filenames):
            if dirpath == str(root) and name in (STAMP,) + tuple(SKIP):
                continue
            yield Path(dirpath, name).relative_to(root)


def inputs_hash(src: Path, patches: list[Path]) -> str:
    h = hashlib.sha256()
    h.update(b"a2sf-prepare-v1\0")
    h.update(str(src).encode() + b"\0")
    for rel in walk_files(src):
        st = os.lstat(src / rel)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    for p in patches:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    for script in ("apply-patches.sh", "prepare_llama_cpp.py"):
        h.update((HERE / script).read_bytes())
    return h.hexdigest()


def sync(staging: Path, dest: Path) -> tuple[int, int]:
    """Make dest identical to staging, touching only files that differ."""
    wanted = set(walk_files(staging))
    changed = removed = 0
    if dest.exists():
        for rel in list(walk_files(dest)):
            if rel not in wanted:
                (dest / rel).unlink()
                removed += 1
    for rel in sorted(wanted):
        s, d = staging / rel, dest / rel
        if d.is_symlink() or s.is_symlink():
            if d.is_symlink() and s.is_symlink() and os.readlink(d) == os.readlink(s):
                continue
        elif d.is_file() and filecmp.cmp(s, d, shallow=False):
            continue
        d.parent.mkdir(parents=True, exist_ok=True)
        if d.exists() or d.is_symlink():
            d.unlink()
        os.replace(s, d)  # same file system: a move keeps the new content's mtime
        changed += 1
    return changed, removed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, type=Path)
    ap.add_argument("--dest", required=True, type=Path)
    ap.add_argument("--patches", type=Path, default=HERE.parent / "patches")
    ap.add_argument("--info", type=Path)
    args = ap.parse_args()

    src = args.src.resolve()
    dest = args.dest.resolve()
    if not (src / "CMakeLists.txt").is_file() or not (src / "include" / "llama.h").is_file():
        print(f"a2sf: {src} is not a llama.cpp tree", file=sys.stderr)
        return 1
    patches = sorted(args.patches.resolve().glob("*.patch"))
    commit = llama_cpp_commit(src)

    if args.info:
        args.info.parent.mkdir(parents=True, exist_ok=True)
        names = ";".join(p.name for p in patches)
        text = f'set(A2SF_LLAMA_CPP_COMMIT "{commit}")\nset(A2SF_PATCH_SERIES "{names}")\n'
        if not args.info.exists() or args.info.read_text() != text:
            args.info.write_text(text)

    digest = inputs_hash(src, patches)
    stamp = dest / STAMP
    if stamp.is_file() and stamp.read_text().strip() == digest:
        print(f"a2sf: {dest} is up to date ({len(patches)} patch(es))")
        return 0

    staging = dest.with_name(dest.name + ".staging")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(src, staging, symlinks=True, ignore=lambda d, names: [n for n in names if n in SKIP and Path(d) == src])
    r = subprocess.run(["bash", str(HERE / "apply-patches.sh"), str(staging), str(args.patches.resolve())])
    if r.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        if stamp.exists():
            stamp.unlink()
        return r.returncode
    # Fresh copies carry the source mtimes; give every staged file "now" so a
    # file that reverts to pristine content still looks newer than its objects.
    for rel in walk_files(staging):
        if not (staging / rel).is_symlink():
            os.utime(staging / rel)
    changed, removed = sync(staging, dest)
    shutil.rmtree(staging)
    stamp.write_text(digest + "\n")
    print(f"a2sf: prepared {dest} from {src} (commit {commit[:12]}, {len(patches)} patch(es), "
          f"{changed} file(s) written, {removed} removed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
