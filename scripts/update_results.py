"""Regenerate the README's results section from a real benchmark run.

    .venv/bin/python scripts/update_results.py            # runs python -m a2sf.bench
    .venv/bin/python scripts/update_results.py --from F   # uses a saved bench output
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
    ap.add_argument("--from", dest="src", help="a file holding the output of python -m a2sf.bench")
    ap.add_argument("bench_args", nargs="*", help="arguments passed to python -m a2sf.bench")
    a = ap.parse_args()
    if a.src:
        out = Path(a.src).read_text()
    else:
        out = subprocess.run([sys.executable, "-m", "a2sf.bench", *a.bench_args], check=True,
                             capture_output=True, text=True).stdout
    lines = [l for l in out.splitlines() if l.startswith("|") or l.startswith("model ")]
    body = ["Speed of score tracking (`python -m a2sf.bench`; regenerate with `scripts/update_results.py`):", ""]
    body += [f"_{lines[0]}_", ""] + lines[1:] if lines and lines[0].startswith("model ") else lines
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + BEGIN + "\n" + "\n".join(body) + "\n" + END + tail)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
