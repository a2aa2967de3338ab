"""Aggregates of the JSONL results, shared by the plots and the README report."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .store import ResultStore

__all__ = ["load", "ppl_summary", "mc_summary", "needle_summary", "kvpress_summary", "paired_ppl",
           "paired_mc", "POLICY_ORDER"]

POLICY_ORDER = ["none", "streaming", "random", "tova", "h2o", "a2sf", "vatp", "mean"]


def load(out: Path, name: str) -> List[Dict[str, Any]]:
    p = Path(out) / f"{name}.jsonl"
    return ResultStore(p).records if p.exists() else []


def _cfg(r) -> Tuple:
    return (r["policy"], r["ratio"], r.get("cells"), r["alpha"])


def ppl_summary(records) -> Dict[Tuple, Dict[str, Any]]:
    """Per config: perplexity pooled over the windows that the full cache also ran."""
    full = {r["window"]: r for r in records if r["policy"] == "none"}
    by = defaultdict(list)
    for r in records:
        if r["window"] in full:
            by[_cfg(r)].append(r)
    out = {}
    for cfg, rs in by.items():
        nll = sum(r["metrics"]["nll_sum"] for r in rs)
        n = sum(r["metrics"]["n_scored"] for r in rs)
        f_nll = sum(full[r["window"]]["metrics"]["nll_sum"] for r in rs)
        ppl, ppl_full = math.exp(nll / n), math.exp(f_nll / n)
        out[cfg] = {"ppl": ppl, "ratio_to_full": ppl / ppl_full, "windows": len(rs), "tokens": n,
                    "nll": {r["window"]: r["metrics"]["nll_sum"] / r["metrics"]["n_scored"] for r in rs}}
    return out


def paired_ppl(summary, a: Tuple, b: Tuple) -> Optional[Dict[str, float]]:
    """Mean over shared windows of log(ppl_a / ppl_b), with its standard error."""
    if a not in summary or b not in summary:
        return None
    w = sorted(set(summary[a]["nll"]) & set(summary[b]["nll"]))
    if not w:
        return None
    d = np.array([summary[a]["nll"][i] - summary[b]["nll"][i] for i in w])
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean_log_ratio": float(d.mean()), "se": se, "n": len(d)}


def mc_summary(records) -> Dict[Tuple, Dict[str, Any]]:
    """Per (task, shots, config): accuracy, acc_norm, binomial standard error."""
    by = defaultdict(list)
    for r in records:
        by[(r["dataset"], r["shots"]) + _cfg(r)].append(r)
    out = {}
    for key, rs in by.items():
        qs = {q["id"]: q for r in rs for q in r["questions"]}
        n = len(qs)
        c = sum(int(q["pred"] == q["gold"]) for q in qs.values())
        cn = sum(int(q["pred_norm"] == q["gold"]) for q in qs.values())
        acc = c / n
        out[key] = {"n": n, "acc": acc, "acc_norm": cn / n,
                    "se": math.sqrt(acc * (1 - acc) / n) if n else float("nan"),
                    "budgets": [q["budget"] for q in qs.values()],
                    "correct": {i: int(q["pred"] == q["gold"]) for i, q in qs.items()},
                    "correct_norm": {i: int(q["pred_norm"] == q["gold"]) for i, q in qs.items()}}
    return out


def paired_mc(summary, keys_a: List[Tuple], keys_b: List[Tuple], field: str = "correct") -> Optional[Dict[str, float]]:
    """Accuracy difference a - b over the questions both answered, with its paired SE."""
    d = []
    for ka, kb in zip(keys_a, keys_b):
        if ka in summary and kb in summary:
            A, B = summary[ka][field], summary[kb][field]
            d += [A[i] - B[i] for i in set(A) & set(B)]
    if not d:
        return None
    d = np.array(d, dtype=float)
    return {"diff": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan"),
            "n": len(d), "a_only": int((d > 0).sum()), "b_only": int((d < 0).sum())}


def needle_summary(records) -> Dict[Tuple, Dict[str, Any]]:
    """Per (config, length): pass keys found / trials."""
    by = defaultdict(list)
    for r in records:
        by[_cfg(r) + (r["case"]["length"],)].append(r["metrics"]["found"])
    return {k: {"found": sum(v), "n": len(v)} for k, v in by.items()}


def kvpress_summary(records) -> Dict[Tuple, Dict[str, Any]]:
    """Per (engine, method, ratio): pooled ppl, ratio to the engine's own full cache, tokens/s."""
    full = {(r["engine"].split("-")[0], r["window"]): r for r in records if r["method"] == "none"}
    by = defaultdict(list)
    for r in records:
        by[(r["engine"], r["method"], r["ratio"])].append(r)
    out = {}
    for key, rs in by.items():
        rs = [r for r in rs if (r["engine"].split("-")[0], r["window"]) in full]
        if not rs:
            continue
        n = sum(r["metrics"]["n_scored"] for r in rs)
        nll = sum(r["metrics"]["nll_sum"] for r in rs)
        f = sum(full[(r["engine"].split("-")[0], r["window"])]["metrics"]["nll_sum"] for r in rs)
        secs = sum(r["metrics"]["seconds"] for r in rs)
        toks = sum(r["metrics"]["tokens_per_s"] * r["metrics"]["seconds"] for r in rs)
        out[key] = {"ppl": math.exp(nll / n), "ratio_to_full": math.exp((nll - f) / n),
                    "tokens_per_s": toks / secs, "windows": len(rs),
                    "kept": sorted({r["metrics"]["kept_cells"] for r in rs})}
    return out
