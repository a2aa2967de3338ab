#!/usr/bin/env bash
# Create a git checkout of llama.cpp for editing the patch series:
#   commit 1   = the pristine tree (from the cached llama-cpp-python sdist, or
#                the tree given with --src)
#   commit 2.. = one commit per cpp/patches/*.patch, in order (git am -3)
#
#   cpp/scripts/make-checkout.sh <new dir> [--src <pristine llama.cpp tree>] [--patches <dir>]
#
# Edit there, commit (one commit per patch; amend or rebase -i to change one),
# then write the series back with cpp/scripts/regen-patches.sh <dir>.
# A patch that does not apply is merged three-way and left for you to
# resolve and `git am --continue`; the script prints the steps.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="${1:?usage: make-checkout.sh <new dir> [--src <llama.cpp tree>] [--patches <dir>]}"
shift
src=""
patches="$here/../patches"
while [ $# -gt 0 ]; do
    case "$1" in
        --src) src="$2"; shift 2 ;;
        --patches) patches="$2"; shift 2 ;;
        *) echo "make-checkout.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
if [ -e "$dest" ] && [ -n "$(ls -A "$dest" 2>/dev/null)" ]; then
    echo "make-checkout.sh: $dest exists and is not empty" >&2
    exit 1
fi
if [ -z "$src" ]; then
    src="$(python3 "$here/fetch_llama_cpp.py")"
fi
commit="$(python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); from fetch_llama_cpp import llama_cpp_commit; print(llama_cpp_commit(sys.argv[2]))' "$here" "$src")"
patches="$(cd "$patches" && pwd)"

mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"
# Copy everything but .git (the sdist's .git is a dangling submodule pointer).
(cd "$src" && tar --exclude=./.git -cf - .) | (cd "$dest" && tar -xf -)

g() { git -C "$dest" -c user.name="a2sf" -c user.email="a2sf@localhost" -c core.autocrlf=false "$@"; }
g init -q
# Commits made here later (an edited patch, a new one) carry the project's identity,
# not whoever edits: regen-patches.sh writes each commit's author into its patch.
g config user.name a2sf
g config user.email a2sf@localhost
g add -A -f .
g commit -q -m "llama.cpp ${commit} (pristine)"
g tag a2sf-base

shopt -s nullglob
series=("$patches"/*.patch)
n=${#series[@]}
if [ "$n" -gt 0 ] && ! g am -3 -q --keep-cr --whitespace=nowarn "${series[@]}"; then
    failed="$(g am --show-current-patch=raw 2>/dev/null | sed -n 's/^Subject: \(\[PATCH[^]]*\] \)\{0,1\}//p' | head -1)"
    cat >&2 <<MSG
make-checkout.sh: a patch did not apply${failed:+: $failed}
$dest = llama.cpp ${commit:0:12} (tagged a2sf-base) + the patches before it;
git am stopped with the three-way merge's conflicts in the files. To go on:
  1. resolve:    cd $dest && git status        # fix the conflicted files
                 git add <files>
  2. continue:   git am --continue             # commits it, applies the rest
                 (git am --skip drops the patch, git am --abort stops)
  3. regenerate: $here/regen-patches.sh $dest $patches
MSG
    exit 1
fi
echo "make-checkout.sh: $dest = llama.cpp ${commit:0:12} + $n patch(es) (base tagged a2sf-base)"
