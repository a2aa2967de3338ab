"""Which policy should I use: every (policy, granularity, mode) against StreamingLLM.

    python -m a2sf.eval variants [--out results/eval] [--table results/variants.md]

Reads the perplexity records (``python -m a2sf.eval ppl --granularities token head
--modes continuous compress``) and prints, per dataset and budget, each variant's
perplexity / full cache and its paired difference to streaming on the same windows,
``mean log(ppl / ppl_streaming)`` with its standard error, marked where it is more
than two standard errors below zero (scores beat recency) or above (they lose).
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import List, Optional

from .store import emit_table
from .summary import load, paired_ppl, ppl_summary

__all__ = ["variants_table", "main"]


def variants_table(records, command: str) -> str:
    # records of other settings (context, scored tokens, threads) are other windows: one
    # table per dataset and settings, never pooled
    by_ds = defaultdict(list)
    for r in records:
        by_ds[(r["dataset"], r["settings_hash"])].append(r)
    lines = [f"Perplexity / full cache and the paired difference to StreamingLLM on the same windows "
             f"(mean log ppl ratio +- s.e.; negative = better than streaming). Command: `{command}`", ""]
    for (ds, _), recs in sorted(by_ds.items()):
        st = recs[0]["settings"]
        s = ppl_summary(recs)
        ratios = sorted({k[1] for k in s if k[1] is not None})
        for ratio in ratios:
            base = ("streaming", ratio, None, None)
            rows = sorted((k for k in s if k[1] == ratio), key=lambda k: s[k]["ratio_to_full"])
            n_win = max((s[k]["windows"] for k in rows), default=0)
            lines += [f"**{ds}, budget {ratio:g} of the context ({st['context']} tokens, then "
                      f"{st['continuation']} scored), {n_win} windows**", "",
                      "| variant | alpha | ppl / full | vs streaming | verdict |", "|---|---:|---:|---:|---|"]
            for k in rows:
                d = paired_ppl(s, k, base) if k != base else None
                if d is None:
                    vs, verdict = "", "(baseline)" if k == base else ""
                else:
                    vs = f"{d['mean_log_ratio']:+.4f} +- {d['se']:.4f}"
                    z = d["mean_log_ratio"] / d["se"] if d["se"] and d["se"] == d["se"] else 0.0
                    verdict = "beats streaming" if z < -2 else "loses to streaming" if z > 2 else "within 2 s.e."
                a = f"{k[3]:g}" if k[3] is not None else ""
                lines.append(f"| {k[0]} | {a} | {s[k]['ratio_to_full']:.3f} | {vs} | {verdict} |")
            lines.append("")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None, prog: str = "python -m a2sf.eval variants") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results") / "eval")
    ap.add_argument("--table", type=Path, default=None, help="also write the Markdown here")
    args = ap.parse_args(argv)
    recs = load(args.out, "ppl")
    if not recs:
        raise SystemExit(f"{prog}: no records in {args.out / 'ppl.jsonl'}")
    emit_table(variants_table(recs, f"{prog} " + " ".join(argv if argv is not None else sys.argv[1:])), args.table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
