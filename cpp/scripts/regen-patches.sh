#!/usr/bin/env bash
# Write the commits of an edited checkout (see make-checkout.sh) back as the
# patch series: one numbered file per commit after the first (pristine) one.
#
#   cpp/scripts/regen-patches.sh <checkout> [patch dir (default cpp/patches)]
#
# Replaces every *.patch in the patch dir. The output is stable across runs
# (no commit hashes, version signature or [PATCH n/m] numbering).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
checkout="${1:?usage: regen-patches.sh <checkout> [patch dir]}"
out="${2:-$here/../patches}"

checkout="$(cd "$checkout" && pwd)"
git -C "$checkout" rev-parse --git-dir >/dev/null
if [ -n "$(git -C "$checkout" status --porcelain --untracked-files=no)" ]; then
    echo "regen-patches.sh: $checkout has uncommitted changes; commit them first" >&2
    exit 1
fi
base="$(git -C "$checkout" rev-list --max-parents=0 HEAD | tail -n 1)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

rm -f "$out"/*.patch
git -C "$checkout" -c core.abbrev=12 format-patch -q \
    --zero-commit --no-signature --no-numbered --full-index \
    -o "$out" "$base"..HEAD
echo "regen-patches.sh: wrote $(ls "$out"/*.patch 2>/dev/null | wc -l) patch(es) to $out"
ls "$out"/*.patch 2>/dev/null | xargs -r -n1 basename
