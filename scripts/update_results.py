"""Regenerate the README's speed results from a real benchmark run.

    .venv/bin/python scripts/update_results.py                 # runs python -m a2sf.bench (all sections)
    .venv/bin/python scripts/update_results.py -- --sections overhead --reps 5
    .venv/bin/python scripts/update_results.py --from F [F ...]  # saved outputs of python -m a2sf.bench

The bench prints Markdown (a heading, a caption, tables per section); that text
goes between the README's ``<!-- results:begin -->`` and ``<!-- results:end -->``
markers, and each output is also kept under results/.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--from", dest="src", nargs="+", help="files holding outputs of python -m a2sf.bench")
    ap.add_argument("bench_args", nargs="*", help="arguments passed to python -m a2sf.bench (after --)")
    a = ap.parse_args()
    if a.src:
        outputs = [Path(p).read_text() for p in a.src]
    else:
        out = subprocess.run([sys.executable, "-m", "a2sf.bench", *a.bench_args], check=True,
                             stdout=subprocess.PIPE, text=True).stdout
        (ROOT / "results" / "bench_latest.md").write_text(out)
        outputs = [out]
    body = "\n\n".join(o.strip() for o in outputs)
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + BEGIN + "\n" + body + "\n" + END + tail)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
