#!/usr/bin/env bash
# The real evaluation run behind the "Quality: the first sweep" section of docs/RESULTS.md (SmolLM2-135M,
# CPU). Resumable: re-running skips every record already in results/eval/.
#
#   bash scripts/eval.sh            # ppl + needle, mc and kvpress (three processes)
#   bash scripts/eval.sh report     # plots + that section only
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=.venv/bin/python
mkdir -p results/eval/logs

if [ "${1:-}" != "report" ]; then
    ( nice -n 5 $PY -m a2sf.eval ppl --texts essays --windows 6 --context 512 --continuation 128 \
        && nice -n 5 $PY -m a2sf.eval needle --cells 128 --lengths 512 1024 --depths 0.1 0.5 0.9 --trials 1 \
    ) > results/eval/logs/ppl-needle.log 2>&1 &
    p1=$!
    nice -n 5 $PY -m a2sf.eval mc --tasks arc_easy piqa --limit 50 --shots 0 1 \
        > results/eval/logs/mc.log 2>&1 &
    p2=$!
    # needs requirements-eval.txt + kvpress==0.5.5 (see there); skipped when missing
    nice -n 5 $PY -m a2sf.eval kvpress --windows 2 --context 512 --continuation 128 --ratios 0.2 0.5 \
        > results/eval/logs/kvpress.log 2>&1 || echo "kvpress comparison skipped (see results/eval/logs/kvpress.log)"
    wait $p1 $p2
fi
$PY -m a2sf.eval plots
$PY -m a2sf.eval report
