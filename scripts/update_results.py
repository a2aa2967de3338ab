"""Regenerate the speed results of docs/RESULTS.md from a real benchmark run.

    .venv/bin/python scripts/update_results.py                 # runs python -m a2sf.bench (all sections)
    .venv/bin/python scripts/update_results.py -- --sections overhead --reps 5
    .venv/bin/python scripts/update_results.py --from F [F ...]  # saved outputs of python -m a2sf.bench
    .venv/bin/python scripts/update_results.py --saved           # the saved outputs in results/bench/ (SAVED)

The bench prints Markdown (a heading, a caption, tables per section); that text
goes between docs/RESULTS.md's ``<!-- results:begin -->`` and ``<!-- results:end -->``
markers, and each output is also kept under results/.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "RESULTS.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
#: the saved outputs behind docs/RESULTS.md's speed section, in its order
SAVED = ["results/bench/overhead.md", "results/bench/overhead_fa_on.md", "results/bench/compress.md",
         "results/bench/kvpress.md", "results/bench/long.md"]


def splice(text: str, outputs) -> str:
    """``text`` with the bench ``outputs`` (Markdown) between the results markers."""
    body = "\n\n".join(o.strip() for o in outputs)
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + BEGIN + "\n" + body + "\n" + END + tail


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--from", dest="src", nargs="+", help="files holding outputs of python -m a2sf.bench")
    ap.add_argument("bench_args", nargs="*", help="arguments passed to python -m a2sf.bench (after --)")
    ap.add_argument("--saved", action="store_true", help="the saved outputs the page quotes (SAVED)")
    a = ap.parse_args()
    if a.saved:
        a.src = [str(ROOT / f) for f in SAVED]
    if a.src:
        outputs = [Path(p).read_text() for p in a.src]
    else:
        out = subprocess.run([sys.executable, "-m", "a2sf.bench", *a.bench_args], check=True,
                             stdout=subprocess.PIPE, text=True).stdout
        (ROOT / "results" / "bench_latest.md").write_text(out)
        outputs = [out]
    RESULTS.write_text(splice(RESULTS.read_text(), outputs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
