"""Tables and a plot of the retrieval records (``python -m a2sf.eval retrieval --report``).

Per (task, length): every variant's accuracy at each budget and mode (RULER's
score, mean over samples, +- its standard error, samples in brackets), the same
on the samples whose fact lies before the last ``ratio`` of the context (outside
any recent window the budget could keep), and each variant's paired difference
to StreamingLLM and to the same policy per token on the same samples. The
tables replace the part of ``docs/RETRIEVAL.md`` between its markers.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .store import ResultStore

__all__ = ["summarise", "render_tables", "write_report", "paired", "BEGIN", "END"]

BEGIN, END = "<!-- retrieval:begin -->", "<!-- retrieval:end -->"
MODE_ORDER = ("aware", "agnostic", "continuous")

Cell = Tuple[str, str, Optional[float], str]  # (task/length, variant, ratio, mode)


def _records(out: Path) -> List[dict]:
    p = Path(out) / "retrieval.jsonl"
    return [r for r in ResultStore(p).records if r.get("task") == "retrieval"] if p.exists() else []


def _outside(rec: dict) -> bool:
    """The fact the first question asks about starts before the last ``ratio`` of the context."""
    d = rec.get("depths") or [[]]
    r = rec.get("ratio")
    return bool(d[0]) and r is not None and min(d[0]) < 1.0 - r


def summarise(records: Sequence[dict]) -> Dict[Cell, Dict[int, dict]]:
    """(task/length, variant, ratio, mode) -> sample -> record (the newest of duplicates)."""
    out: Dict[Cell, Dict[int, dict]] = defaultdict(dict)
    for r in records:
        out[(f"{r['rtask']}/{r['length']}", r["variant"], r["ratio"], r["mode"])][r["sample"]] = r
    return out


def _mean_se(xs: Sequence[float]) -> Tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def _fmt(xs: Sequence[float]) -> str:
    if not xs:
        return "–"
    m, se = _mean_se(xs)
    s = "" if se != se else f" ± {100 * se:.0f}"
    return f"{100 * m:.0f}{s} ({len(xs)})"


def _turn_scores(rec: dict, turns: str) -> float:
    sc = rec["metrics"]["scores"]
    if turns == "first":
        return sc[0]
    if turns == "later":
        return sum(sc[1:]) / max(1, len(sc) - 1)
    return rec["metrics"]["score"]


def paired(a: Dict[int, dict], b: Dict[int, dict], turns: str = "all",
           subset=None) -> Optional[Tuple[int, float, float]]:
    """(samples, mean of a - b, its s.e.) over the samples both have (and ``subset`` keeps)."""
    keys = sorted(k for k in set(a) & set(b) if subset is None or subset(a[k]))
    if not keys:
        return None
    d = [_turn_scores(a[k], turns) - _turn_scores(b[k], turns) for k in keys]
    m, se = _mean_se(d)
    return len(keys), m, se


def _variants_in(cells, tl) -> List[str]:
    seen = []
    for (t, v, _, _) in cells:
        if t == tl and v not in seen:
            seen.append(v)
    return sorted(seen, key=lambda v: (v != "full", v != "streaming", v))


def _table(cells, tl: str, turns: str, subset=None, title: str = "") -> List[str]:
    ratios = sorted({r for (t, _, r, _) in cells if t == tl and r is not None})
    modes = [m for m in MODE_ORDER if any(k[0] == tl and k[3] == m for k in cells)]
    cols = [(r, m) for r in ratios for m in modes]
    lines = [title, "", "| variant | " + " | ".join(f"{r:g} {m}" for r, m in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for v in _variants_in(cells, tl):
        row = []
        for r, m in cols:
            recs = cells.get((tl, v, None, "full")) if v == "full" else cells.get((tl, v, r, m))
            if recs and subset is not None:
                # the full cache's samples that the budget's subset keeps
                recs = {k: x for k, x in recs.items() if subset(dict(x, ratio=r))}
            row.append(_fmt([_turn_scores(x, turns) for x in (recs or {}).values()]))
        lines.append(f"| {v} | " + " | ".join(row) + " |")
    return lines + [""]


def _paired_table(cells, tl: str, turns: str) -> List[str]:
    lines = ["Paired differences on the same samples, percentage points (mean ± s.e.; "
             "**bold**: more than 2 s.e. from zero):", "",
             "| variant | budget | mode | vs streaming | vs the same policy per token |", "|---|---:|---|---:|---:|"]
    for (t, v, r, m), recs in sorted(cells.items(), key=lambda kv: (str(kv[0][2]), kv[0][3], kv[0][1])):
        if t != tl or r is None or v == "streaming":
            continue
        base_tok = v.split("/")[0] + "/token" + (":" + v.split(":", 1)[1] if ":" in v else "")
        cols = []
        for other in ("streaming", base_tok):
            o = cells.get((tl, other, r, m)) if other != v else None
            p = paired(recs, o, turns) if o else None
            if p is None:
                cols.append("–")
                continue
            n, d, se = p
            z = d / se if se and se == se else 0.0
            txt = f"{100 * d:+.0f} ± {100 * se:.0f} ({n})"
            cols.append(f"**{txt}**" if abs(z) > 2 else txt)
        lines.append(f"| {v} | {r:g} | {m} | " + " | ".join(cols) + " |")
    return lines + [""]


def render_tables(records: Sequence[dict]) -> str:
    cells = summarise(records)
    out = []
    for tl in sorted({k[0] for k in cells}):
        task = tl.split("/")[0]
        turn_sets = (("first", "turn 1"), ("later", "turns 2-3")) if task == "multiturn" else (("all", ""),)
        for turns, what in turn_sets:
            head = f"### {tl}{' — ' + what if what else ''}"
            out += _table(cells, tl, turns, title=head + "\n\nAccuracy, % (samples):")
            if task != "cwe" and turns != "later":
                out += _table(cells, tl, turns, subset=_outside,
                              title="The samples whose fact lies before the last `ratio` of the context "
                                    "(no recent window of that budget holds it):")
            out += _paired_table(cells, tl, turns)
    return "\n".join(out).rstrip() + "\n"


def plot(records: Sequence[dict], path: Path, task_length: Optional[str] = None) -> Optional[Path]:
    """Accuracy vs cells kept (share of the prompt), one panel per mode, a line per variant."""
    cells = summarise(records)
    tls = sorted({k[0] for k in cells})
    if not tls:
        return None
    tl = task_length if task_length in tls else tls[0]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODE_ORDER if any(k[0] == tl and k[3] == m for k in cells)]
    fig, axes = plt.subplots(1, max(1, len(modes)), figsize=(4.2 * max(1, len(modes)), 3.6), sharey=True,
                             squeeze=False)
    for ax, mode in zip(axes[0], modes):
        full = cells.get((tl, "full", None, "full"))
        for v in _variants_in(cells, tl):
            if v == "full":
                continue
            pts = sorted((r, _mean_se([x["metrics"]["score"] for x in recs.values()]))
                         for (t, vv, r, m), recs in cells.items() if t == tl and vv == v and m == mode)
            if pts:
                ax.errorbar([p[0] for p in pts], [100 * p[1][0] for p in pts],
                            yerr=[100 * (p[1][1] if p[1][1] == p[1][1] else 0) for p in pts],
                            marker="o", capsize=2, label=v)
        if full:
            ax.axhline(100 * _mean_se([x["metrics"]["score"] for x in full.values()])[0], color="k",
                       ls="--", lw=1, label="full cache")
        ax.set_title(f"{tl}: {mode}")
        ax.set_xlabel("cells kept / prompt")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy, %")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path, doc: Path) -> List[Path]:
    """Rewrite ``doc`` between its markers (created if missing) and the plot beside the records."""
    records = _records(out)
    body = render_tables(records) if records else "(no retrieval records yet)\n"
    doc = Path(doc)
    text = doc.read_text() if doc.exists() else f"# Retrieval under a bounded cache\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(head + BEGIN + "\n" + body + END + tail)
    made = [doc]
    for tl in sorted({f"{r['rtask']}/{r['length']}" for r in records}):
        p = plot(records, Path(out) / f"retrieval_{tl.replace('/', '_')}.png", tl)
        if p:
            made.append(p)
    return made
