#!/usr/bin/env bash
# Apply the a2sf patch series (cpp/patches/*.patch, in file-name order) to a
# llama.cpp tree.  Stops at the first patch that does not apply, naming it.
#
#   cpp/scripts/apply-patches.sh <llama.cpp dir> [patch dir]
#
# The tree must be pristine (as extracted); it need not be a git repository.
# Uses `git apply` (falls back to `patch -p1` when git is missing).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tree="${1:?usage: apply-patches.sh <llama.cpp dir> [patch dir]}"
patches="${2:-$here/../patches}"

tree="$(cd "$tree" && pwd)"
patches="$(cd "$patches" && pwd)"
cd "$tree"

# Never let git find an enclosing repository (the build tree usually lives
# inside our own checkout): git apply would then apply paths relative to it.
if [ ! -e "$tree/.git" ]; then
    export GIT_CEILING_DIRECTORIES="$(dirname "$tree")"
fi

apply_one() {
    if command -v git >/dev/null 2>&1; then
        git apply --whitespace=nowarn "$1"
    else
        patch -p1 --batch --forward --silent < "$1"
    fi
}

shopt -s nullglob
n=0
for p in "$patches"/*.patch; do
    if ! out="$(apply_one "$p" 2>&1)"; then
        echo "a2sf: patch $(basename "$p") does not apply to $tree:" >&2
        echo "$out" >&2
        exit 1
    fi
    n=$((n + 1))
done
echo "a2sf: applied $n patch(es) from $patches"
