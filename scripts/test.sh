#!/usr/bin/env bash
# Set up (idempotent), then run the fast test suite.
#   bash scripts/test.sh [extra pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
# A crash of the native library (e.g. SIGILL in ggml's AMX kernels on some VMs)
# would kill pytest in the middle of the run: try a plain model run in a
# subprocess first and stop with one line if it dies.
if ! .venv/bin/python -c 'import sys; from a2sf.testing.smoke import check; m = check(); m and print("scripts/test.sh: " + m, file=sys.stderr); sys.exit(3 if m else 0)'; then
    exit 3
fi
exec .venv/bin/python -m pytest tests -m "not slow" "$@"
