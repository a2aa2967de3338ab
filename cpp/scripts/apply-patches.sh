#!/usr/bin/env bash
# Apply the a2sf patch series (cpp/patches/*.patch, in file-name order) to a
# llama.cpp tree.  Stops at the first patch that does not apply, naming it and
# printing the steps to resolve it.
#
#   cpp/scripts/apply-patches.sh <llama.cpp dir> [patch dir]
#
# The tree must be pristine (as extracted). A plain tree (the build's case: the
# sdist's vendor/llama.cpp is no git repository) is patched with `git apply`
# (`patch -p1` when git is missing); a git checkout gets one commit per patch
# with `git am -3`, so a patch that no longer applies cleanly is merged
# three-way and left for `git am --continue`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tree="${1:?usage: apply-patches.sh <llama.cpp dir> [patch dir]}"
patches="${2:-$here/../patches}"

tree="$(cd "$tree" && pwd)"
patches="$(cd "$patches" && pwd)"
scripts="$(cd "$here" && pwd)"
cd "$tree"

shopt -s nullglob
series=("$patches"/*.patch)

# A git checkout of its own (not just a tree inside some other repository).
if [ -e "$tree/.git" ] && command -v git >/dev/null 2>&1 && \
   [ "$(git -C "$tree" rev-parse --show-toplevel 2>/dev/null)" = "$tree" ]; then
    if [ ${#series[@]} -eq 0 ] || git -C "$tree" -c user.name=a2sf -c user.email=a2sf@localhost \
            am -3 -q --keep-cr --whitespace=nowarn "${series[@]}"; then
        echo "a2sf: applied ${#series[@]} patch(es) from $patches (git am -3, one commit each)"
        exit 0
    fi
    failed="$(git -C "$tree" am --show-current-patch=raw 2>/dev/null | sed -n 's/^Subject: \(\[PATCH[^]]*\] \)\{0,1\}//p' | head -1)"
    cat >&2 <<MSG
a2sf: a patch did not apply to $tree${failed:+: $failed}
git am stopped there with the three-way merge's conflicts in the files
(the patches before it are committed). To go on:
  1. resolve:    cd $tree && git status        # fix the conflicted files
                 git add <files>
  2. continue:   git am --continue              # commits it, applies the rest
                 (git am --skip drops the patch, git am --abort undoes the run)
  3. regenerate: $scripts/regen-patches.sh $tree $patches
                 # needs the pristine tree as the checkout's first commit,
                 # as make-checkout.sh makes it
MSG
    exit 1
fi

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

n=0
for p in "${series[@]}"; do
    if ! out="$(apply_one "$p" 2>&1)"; then
        echo "a2sf: patch $(basename "$p") does not apply to $tree:" >&2
        echo "$out" >&2
        cat >&2 <<MSG
$tree is no git checkout, so it cannot be merged in place (the patches before
this one are applied to it now: start again from a pristine copy). To fix the series:
  1. checkout:   $scripts/make-checkout.sh /tmp/llama-edit --src <pristine copy of this tree>
                 # commit 1 = the tree, then git am -3 of each patch; it stops at
                 # the same patch with its conflicts in the files
  2. resolve:    cd /tmp/llama-edit && git status   # fix the conflicted files
                 git add <files>
  3. continue:   git am --continue                  # applies the rest
  4. regenerate: $scripts/regen-patches.sh /tmp/llama-edit $patches
  then rebuild (bash scripts/setup.sh).
MSG
        exit 1
    fi
    n=$((n + 1))
done
echo "a2sf: applied $n patch(es) from $patches"
