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
from typing import Dict, List, Optional, Tuple

from .store import emit_table
from .summary import load, paired_ppl, ppl_summary

__all__ = ["variants_table", "main"]


def _kvpress_losses(kv_records, ds: str, st: dict) -> Dict[Tuple[str, Optional[float]], Dict[int, float]]:
    """(method, ratio) -> window -> kvpress's mean log loss of the continuation on the windows
    of these settings; ``("none", None)`` is kvpress's own full cache."""
    lp: Dict[Tuple[str, Optional[float]], Dict[int, float]] = defaultdict(dict)
    for r in kv_records:
        if (r["engine"] == "kvpress" and r["dataset"] == ds and r["settings"]["context"] == st["context"]
                and r["settings"]["continuation"] == st["continuation"]):
            lp[(r["method"], r["ratio"])][r["window"]] = r["metrics"]["nll_sum"] / r["metrics"]["n_scored"]
    return lp


def _paired_to_full(a: Dict[int, float], a_full: Dict[int, float], b: Dict[int, float],
                    b_full: Dict[int, float]) -> Optional[Tuple[int, float, float, float]]:
    """Windows, ppl_a / a's full cache, and the paired mean (+- s.e.) of
    log(ppl_a / a_full) - log(ppl_b / b_full): each side's loss taken to its own engine's full cache."""
    w = sorted(set(a) & set(a_full) & set(b) & set(b_full))
    if not w:
        return None
    rel = {"a": {"nll": {i: a[i] - a_full[i] for i in w}}, "b": {"nll": {i: b[i] - b_full[i] for i in w}}}
    d = paired_ppl(rel, "a", "b")
    return d["n"], math.exp(sum(rel["a"]["nll"].values()) / len(w)), d["mean_log_ratio"], d["se"]


def _kvpress_rows(kv: dict, ratio: float, s: dict, base, ours_full: Dict[int, float]) -> List[tuple]:
    """kvpress presses on the same windows: (label, windows, ppl / kvpress's own full cache,
    paired difference to our streaming of each window's loss to its engine's full cache)."""
    ours_base = s.get(base, {}).get("nll", {})
    rows = []
    for (method, r), win in sorted(kv.items(), key=str):
        if method == "none" or r != ratio:
            continue
        p = _paired_to_full(win, kv.get(("none", None), {}), ours_base, ours_full)
        if p is not None:
            rows.append((f"kvpress:{method}", *p))
    return rows


def _verdict(mean: float, se: float, than: str = "streaming") -> str:
    z = mean / se if se and se == se else 0.0
    return f"beats {than}" if z < -2 else f"loses to {than}" if z > 2 else "within 2 s.e."


#: the issue's yardstick: our after-prefill per-head compression against kvpress's
#: ObservedAttentionPress (mean attention per KV head after the prefill) on the same windows
KVPRESS_YARDSTICK = "observed_attention"
AGAINST_KVPRESS = ("a2sf/head+compress", "mean/head+compress", "a2sf/head", "mean/head")


def _against_kvpress_rows(ds: str, ratio: float, s: dict, kv: dict, ours_full: Dict[int, float]) -> List[str]:
    press = kv.get((KVPRESS_YARDSTICK, ratio))
    if not press:
        return []
    rows = []
    for policy in AGAINST_KVPRESS:
        for k in sorted((k for k in s if k[0] == policy and k[1] == ratio), key=str):
            p = _paired_to_full(s[k]["nll"], ours_full, press, kv.get(("none", None), {}))
            if p is None:
                continue
            n, rel, mean, se = p
            a = f"{k[3]:g}" if k[3] is not None else ""
            rows.append(f"| {ds} | {ratio:g} | {policy} | {a} | {n} | {rel:.3f} | {mean:+.4f} +- {se:.4f} "
                        f"| {_verdict(mean, se, 'kvpress')} |")
    return rows


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
    against: List[str] = []
    for (ds, _), recs in sorted(by_ds.items()):
        st = recs[0]["settings"]
        s = ppl_summary(recs)
        ratios = sorted({k[1] for k in s if k[1] is not None})
        kv = _kvpress_losses(kvpress_records, ds, st)
        ours_full = s.get(("none", None, None, None), {}).get("nll", {})  # window -> our full cache's loss
        for ratio in ratios:
            against += _against_kvpress_rows(ds, ratio, s, kv, ours_full)
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
            for label, n, rel, mean, se in _kvpress_rows(kv, ratio, s, base, ours_full):
                out.append((rel, f"| {label} |  | {n} | {rel:.3f} | {mean:+.4f} +- {se:.4f} | {_verdict(mean, se)} |"))
            lines += [row for _, row in sorted(out, key=lambda x: x[0])]
            lines.append("")
    if against:
        lines += [f"**Per head against kvpress's {KVPRESS_YARDSTICK} press on the same windows** (mean of "
                  f"log(ppl / our full cache) - log(ppl_kvpress / kvpress's full cache) +- s.e.; negative = "
                  f"better than kvpress)", "",
                  "| text | budget | variant | alpha | windows | ppl / full | vs kvpress | verdict |",
                  "|---|---:|---|---:|---:|---:|---:|---|", *against, ""]
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
