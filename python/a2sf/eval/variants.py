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
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import List, Optional

from .store import emit_table
from .summary import load, paired_ppl, ppl_summary

__all__ = ["variants_table", "main"]


def _kvpress_rows(kv_records, ds: str, st: dict, ratio: float, s: dict, base) -> List[tuple]:
    """kvpress presses on the same windows: (label, windows, ppl / kvpress's own full cache,
    paired difference to our streaming of each window's loss to its engine's full cache)."""
    mine = [r for r in kv_records if r["engine"] == "kvpress" and r["dataset"] == ds
            and r["settings"]["context"] == st["context"] and r["settings"]["continuation"] == st["continuation"]]
    lp = defaultdict(dict)  # method -> window -> log ppl
    for r in mine:
        if r["ratio"] in (None, ratio):
            lp[(r["method"], r["ratio"])][r["window"]] = r["metrics"]["nll_sum"] / r["metrics"]["n_scored"]
    full = lp.get(("none", None), {})
    ours_full = s.get(("none", None, None, None), {}).get("nll", {})
    ours_base = s.get(base, {}).get("nll", {})
    rows = []
    for (method, r), win in sorted(lp.items()):
        if method == "none":
            continue
        w = sorted(set(win) & set(full) & set(ours_full) & set(ours_base))
        if not w:
            continue
        # each engine's loss to its own full cache, paired by paired_ppl like the other rows
        rel = {"kvpress": {"nll": {i: win[i] - full[i] for i in w}},
               "streaming": {"nll": {i: ours_base[i] - ours_full[i] for i in w}}}
        d = paired_ppl(rel, "kvpress", "streaming")
        ratio_to_full = math.exp(sum(rel["kvpress"]["nll"].values()) / len(w))
        rows.append((f"kvpress:{method}", d["n"], ratio_to_full, d["mean_log_ratio"], d["se"]))
    return rows


def _verdict(mean: float, se: float) -> str:
    z = mean / se if se and se == se else 0.0
    return "beats streaming" if z < -2 else "loses to streaming" if z > 2 else "within 2 s.e."


def variants_table(records, command: str, kvpress_records=()) -> str:
    # records of other settings (context, scored tokens, threads) are other windows: one
    # table per dataset and settings, never pooled
    by_ds = defaultdict(list)
    for r in records:
        by_ds[(r["dataset"], r["settings_hash"])].append(r)
    lines = [f"Perplexity / full cache and the paired difference to StreamingLLM on the same windows "
             f"(mean log ppl ratio +- s.e.; negative = better than streaming; `windows`: those paired). "
             f"`kvpress:` rows are NVIDIA kvpress's presses on HF transformers (the same GGUF dequantised to "
             f"float32, the same token ids and windows), each window's loss taken to kvpress's own full cache. "
             f"Command: `{command}`", ""]
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
                      "| variant | alpha | windows | ppl / full | vs streaming | verdict |",
                      "|---|---:|---:|---:|---:|---|"]
            out = []
            for k in rows:
                d = paired_ppl(s, k, base) if k != base else None
                if d is None:
                    vs, verdict, n = "", "(baseline)" if k == base else "", s[k]["windows"]
                else:
                    vs, verdict, n = f"{d['mean_log_ratio']:+.4f} +- {d['se']:.4f}", _verdict(d["mean_log_ratio"], d["se"]), d["n"]
                a = f"{k[3]:g}" if k[3] is not None else ""
                out.append((s[k]["ratio_to_full"], f"| {k[0]} | {a} | {n} | {s[k]['ratio_to_full']:.3f} | {vs} | {verdict} |"))
            for label, n, rel, mean, se in _kvpress_rows(kvpress_records, ds, st, ratio, s, base):
                out.append((rel, f"| {label} |  | {n} | {rel:.3f} | {mean:+.4f} +- {se:.4f} | {_verdict(mean, se)} |"))
            lines += [row for _, row in sorted(out, key=lambda x: x[0])]
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
    cmd = f"{prog} " + " ".join(argv if argv is not None else sys.argv[1:])
    emit_table(variants_table(recs, cmd, load(args.out, "kvpress")), args.table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
