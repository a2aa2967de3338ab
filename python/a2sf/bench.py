"""Speed of the eviction engine against vanilla llama.cpp, measured side by side in one run.

    python -m a2sf.bench                                   # every section, SmolLM2
    python -m a2sf.bench --sections overhead --flash-attn off on --sizes 256 1024 --reps 3
    python -m a2sf.bench --sections long --long-tokens 8192 --long-cells 1024

Sections (Markdown on stdout, progress on stderr):

overhead
    For every cache size the cache is filled to (size - decode - 8) cells from a
    text, then ``decode`` tokens are generated one by one without eviction, so the
    figures are the cost of score tracking alone. Repetitions interleave the
    configurations; the table shows medians and the ratio to vanilla of the same
    run, for flash attention off and/or on.
long
    Generates ``long-tokens`` tokens (prompt included) greedily: vanilla with a
    cache holding all of them against bounded caches of ``long-cells`` cells
    (eviction on). Total tokens/s, tokens/s over the last 1024 tokens, per-1024
    segment speeds (flatness), KV-cache bytes, and the eviction events: count,
    median and max time per event, share of the run's time. With
    ``--long-extend N`` the bounded caches go on to N tokens (32768: past
    SmolLM2's 8192 training context, which positions compaction allows) and a
    second table shows their speed per eighth of the stream.
compress
    Prompt compression (issue 15): a ``compress-prompt``-token prompt is read with
    a full cache and compressed to ``compress-budget`` cells (``kv_budget``), then
    ``compress-decode`` tokens are generated; against vanilla decoding over the whole
    prompt, with the compression event's time and moved bytes.
kvpress
    The same workload through NVIDIA kvpress on HF transformers (see
    a2sf/bench_kvpress.py; needs requirements-eval.txt).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from .bench_common import greedy, open_llama, text_tokens

#: a2sf+decode_scoring=lazy: decode steps deferred to one batched product (the default on a device), beside the
#: default on the CPU (auto: each step scored in its own graph, with the unfused attention where ggml runs AVX-512 on an Intel CPU)
POLICIES = [None, "streaming", "h2o", "a2sf", "a2sf+decode_scoring=lazy", "vatp", "tova", "mean"]
LONG_POLICIES = ["streaming", "a2sf"]


def kv_bytes_per_cell(llm) -> tuple:
    """(F16 K+V bytes, score + value-norm bytes) per cell.

    a2sf's libllama allocates the score rows of every cache (a policy can be set
    on a live context), so a vanilla context carries them too; upstream
    llama.cpp's cache is smaller by that share.
    """
    md = llm.metadata
    arch = md.get("general.architecture", "llama")
    n_layer = int(md[f"{arch}.block_count"])
    n_head = int(md[f"{arch}.attention.head_count"])
    n_head_kv = int(md.get(f"{arch}.attention.head_count_kv", n_head))
    n_embd = int(md[f"{arch}.embedding_length"])
    k_dim = int(md.get(f"{arch}.attention.key_length", n_embd // n_head))
    v_dim = int(md.get(f"{arch}.attention.value_length", n_embd // n_head))
    return n_layer * n_head_kv * (k_dim + v_dim) * 2, n_layer * 4 + n_layer * n_head_kv * 4


def _raw(raw: Optional[list], section: str, **fields) -> None:
    """One measurement for --json (the tables are medians of these)."""
    if raw is not None:
        raw.append({"section": section, **fields})


# -- overhead ------------------------------------------------------------------
def _gpu_name() -> str:
    """The GPU's name for a table's caption (nvidia-smi's; "GPU" where it cannot be read)."""
    import subprocess

    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=30)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else "GPU"
    except (OSError, subprocess.SubprocessError):
        return "GPU"


def measure(model: str, n_ctx: int, policy, n_decode: int, flash_attn: bool, n_threads: int,
            clock=time.perf_counter, n_gpu_layers: int = 0, text: str = "austen") -> tuple:
    """(prefill tokens/s, decode tokens/s) at depth n_ctx - n_decode - 8, no eviction."""
    llm = open_llama(model, n_ctx, policy, flash_attn, n_threads, n_batch=min(256, n_ctx // 4),
                     n_gpu_layers=n_gpu_layers)
    try:
        depth = n_ctx - n_decode - 8
        toks = text_tokens(llm, depth, text)
        t0 = clock()
        llm.eval(toks)
        if policy is not None:
            llm.kv_scores()  # lazy scoring: the prompt's deferred product is inside the prefill timing
        t_prefill = clock() - t0
        tok = greedy(llm)
        t0 = clock()
        for _ in range(n_decode):
            llm.eval([tok])
            tok = greedy(llm)
        if policy is not None:
            llm.kv_scores()  # lazy scoring: the pending decode queries are scored inside the timing
        t_decode = clock() - t0
        if policy is not None:
            assert llm.kv_stats()["evictions"] == 0, "the overhead benchmark must not evict"
        return depth / t_prefill, n_decode / t_decode
    finally:
        llm.close()


def section_overhead(model: str, sizes, fa_modes, reps: int, n_decode: int, n_threads: int,
                     cpu_clock: bool = False, policies=tuple(POLICIES), raw: Optional[list] = None,
                     n_gpu_layers: int = 0, text: str = "austen") -> List[str]:
    # With one thread ggml computes on the calling thread, so its CPU time is the
    # work done, much less disturbed by other processes than wall time.
    clock = time.thread_time if cpu_clock else time.perf_counter
    res: dict = {}
    for size in sizes:
        for rep in range(reps):
            for fa in fa_modes:
                for pol in policies:
                    pre, dec = measure(model, size, pol, n_decode, fa, n_threads, clock, n_gpu_layers, text)
                    res.setdefault((size, fa, pol), []).append((pre, dec))
                    _raw(raw, "overhead", cells=size, flash_attn=fa, policy=pol, rep=rep, prefill_tps=pre,
                         decode_tps=dec, decode_tokens=n_decode, clock="cpu" if cpu_clock else "wall")
                    print(f"  overhead {size:5d} fa={int(fa)} {pol or 'vanilla':9s} prefill {pre:7.0f} t/s"
                          f"  decode {dec:6.1f} t/s", file=sys.stderr, flush=True)
    out = [
        # the flash-attention modes in the heading: two runs that differ only there get two headings
        "### Score-tracking overhead, flash attention " + " and ".join("on" if fa else "off" for fa in fa_modes),
        "",
        f"_model {Path(model).name}, threads={n_threads}, "
        f"{f'n_gpu_layers={n_gpu_layers} ({_gpu_name()}), ' if n_gpu_layers else ''}{'CPU time of the computing thread' if cpu_clock else 'wall time'}, "
        f"medians of {reps} interleaved runs; prefill of "
        f"size-{n_decode + 8} tokens, then decode of {n_decode} tokens without eviction, each ending with a "
        f"kv_scores() read (so lazy scoring's batched products are inside the timings)_",
        "",
        "| cells | flash attn | policy | prefill t/s | ratio | decode t/s | ratio |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for size in sizes:
        for fa in fa_modes:
            base_p = statistics.median(r[0] for r in res[(size, fa, None)])
            base_d = statistics.median(r[1] for r in res[(size, fa, None)])
            for pol in policies:
                p = statistics.median(r[0] for r in res[(size, fa, pol)])
                d = statistics.median(r[1] for r in res[(size, fa, pol)])
                out.append(f"| {size} | {'on' if fa else 'off'} | {pol or 'vanilla'} | {p:.0f} | {p / base_p:.2f} "
                           f"| {d:.1f} | {d / base_d:.2f} |")
    return out


# -- prompt compression -----------------------------------------------------------
def section_compress(model: str, n_prompt: int, budget: int, n_decode: int, policies, flash_attn: bool,
                     n_threads: int, reps: int, raw: Optional[list] = None) -> List[str]:
    """Decode after compressing an n_prompt-token prompt to `budget` cells (kv_budget) vs
    vanilla decoding over the whole prompt, and what the compression event cost."""
    res: dict = {}
    for rep in range(reps):
        for pol in [None] + list(policies):
            res.setdefault(pol, []).append(_compressed_decode(model, n_prompt, budget, n_decode, pol,
                                                              flash_attn, n_threads))
            r = res[pol][-1]
            _raw(raw, "compress", policy=pol, rep=rep, prompt_tokens=n_prompt, budget=budget,
                 flash_attn=flash_attn, **r)
            print(f"  compress {pol or 'vanilla':9s} cells {r['cells']:5d}  decode {r['decode_tps']:6.1f} t/s"
                  f"  compression {1e3 * r['compress_s']:7.1f} ms", file=sys.stderr, flush=True)
    med = {p: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for p, rs in res.items()}
    base = med[None]["decode_tps"]
    out = [
        f"### Decoding after compressing a {n_prompt}-token prompt to {budget} cells",
        "",
        f"_model {Path(model).name}, threads={n_threads}, flash_attn={flash_attn}, wall time, medians of {reps} "
        f"interleaved runs; `Llama(kv_budget={budget})`: the prompt is read with a full cache, then compressed "
        f"once by the policy (per head by default) and the kept cells moved to the front; then {n_decode} tokens "
        f"are decoded greedily (vanilla: over all {n_prompt} cells). Compression = the kv_compress call (scores "
        f"read, ranking, per-head moves, moves to the front); moved = K/V bytes those moves copied_",
        "",
        "| policy | cells when decoding | decode t/s | ratio | compression ms | moved MiB | compression / decode time |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for pol, m in med.items():
        share = f"{100 * m['compress_s'] / m['decode_s']:.1f}%" if pol else "-"
        comp = f"{1e3 * m['compress_s']:.1f}" if pol else "-"
        moved = f"{m['moved'] / 2**20:.1f}" if pol else "-"
        out.append(f"| {pol or 'vanilla'} | {int(m['cells'])} | {m['decode_tps']:.1f} | {m['decode_tps'] / base:.2f} "
                   f"| {comp} | {moved} | {share} |")
    return out


def _compressed_decode(model: str, n_prompt: int, budget: int, n_decode: int, policy, flash_attn: bool,
                       n_threads: int) -> dict:
    n_ctx = n_prompt + n_decode + 8
    llm = open_llama(model, n_ctx, policy, flash_attn, n_threads, n_batch=min(256, n_ctx // 4))
    try:
        toks = text_tokens(llm, n_prompt)
        llm.eval(toks)
        t0 = time.perf_counter()
        moved0, cells = 0, len(toks)
        if policy is not None:
            moved0 = llm.kv_stats()["bytes_moved"]
            cells = llm.kv_compress(budget)
        compress_s = time.perf_counter() - t0
        moved = llm.kv_stats()["bytes_moved"] - moved0 if policy is not None else 0
        tok = greedy(llm)
        t0 = time.perf_counter()
        for _ in range(n_decode):
            llm.eval([tok])
            tok = greedy(llm)
        if policy is not None:
            llm.kv_scores()  # lazy scoring: the pending decode queries are scored inside the timing
        decode_s = time.perf_counter() - t0
        return {"cells": cells, "decode_tps": n_decode / decode_s, "decode_s": decode_s,
                "compress_s": compress_s, "moved": moved}
    finally:
        llm.close()


# -- long generation -------------------------------------------------------------
@dataclass
class LongRun:
    label: str
    n_cells: int
    kv_bytes: int
    seconds: float = 0.0
    segments: List[float] = field(default_factory=list)  # tokens/s of each 1024-token segment
    event_seconds: List[float] = field(default_factory=list)  # one entry per eviction event
    cells_evicted: int = 0
    cells_used: int = 0
    n_fed: int = 0
    score_share: float = 0.0  # part of kv_bytes that holds scores and value norms
    compact_seconds: float = 0.0  # position compaction (positions="cache"), outside evict_seconds
    # (fed, seconds, events, cells evicted, cells used, compact seconds) at the end of each segment
    marks: List[tuple] = field(default_factory=list)

    def upto(self, n: int) -> "LongRun":
        """The same run as if it had stopped after the segment ending at n tokens."""
        i = next(k for k, m in enumerate(self.marks) if m[0] >= n)
        fed, secs, n_ev, evicted, used, compact = self.marks[i]
        return LongRun(self.label, self.n_cells, self.kv_bytes, secs, self.segments[:i + 1],
                       self.event_seconds[:n_ev], evicted, used, fed, self.score_share, compact, self.marks[:i + 1])


LONG_PROMPT = "Write a very long story about a lighthouse keeper and the sea, chapter after chapter.\n\n"


def long_generation(model: str, n_tokens: int, n_cells: int, policy, flash_attn: bool, n_threads: int,
                    segment: int = 1024) -> LongRun:
    """Feed a prompt and generate greedily until n_tokens tokens went through the cache."""
    n_batch = 64
    llm = open_llama(model, n_cells, policy, flash_attn, n_threads, n_batch=n_batch)
    try:
        kv, extra = kv_bytes_per_cell(llm)
        run = LongRun(label=policy or "vanilla", n_cells=n_cells, kv_bytes=n_cells * (kv + extra),
                      score_share=extra / (kv + extra))
        prompt = llm.tokenize(LONG_PROMPT.encode(), add_bos=True)
        t_start = time.perf_counter()
        t_seg = t_start
        llm.eval(prompt)
        fed = len(prompt)
        seg_start = 0
        prev_events, prev_evict_s = 0, 0.0
        tok = greedy(llm)
        while fed < n_tokens:
            llm.eval([tok])
            fed += 1
            tok = greedy(llm)
            if policy is not None:
                st = llm.kv_stats()
                if st["evictions"] > prev_events:
                    # one eviction event per decode call of one token
                    run.event_seconds.append(st["evict_seconds"] - prev_evict_s)
                    prev_events, prev_evict_s = st["evictions"], st["evict_seconds"]
            if fed - seg_start >= segment or fed == n_tokens:
                now = time.perf_counter()
                run.segments.append((fed - seg_start) / (now - t_seg))
                t_seg, seg_start = now, fed
                if policy is not None:
                    st = llm.kv_stats()
                    run.marks.append((fed, now - t_start, len(run.event_seconds), st["cells_evicted"],
                                      st["cells_used"], st["compact_seconds"]))
                else:
                    run.marks.append((fed, now - t_start, 0, 0, fed, 0.0))
        run.seconds = time.perf_counter() - t_start
        run.n_fed = fed
        run.cells_evicted, run.cells_used, run.compact_seconds = run.marks[-1][3], run.marks[-1][4], run.marks[-1][5]
        return run
    finally:
        llm.close()


def section_long(model: str, n_tokens: int, n_cells: int, policies, flash_attn: bool, n_threads: int,
                 n_extend: int = 0, raw: Optional[list] = None) -> List[str]:
    """Vanilla and the bounded caches over n_tokens; with n_extend > n_tokens the bounded
    caches go on to n_extend tokens (one run: the first table is its first n_tokens), and
    a second table shows their tokens/s over the whole stream."""
    runs = [long_generation(model, n_tokens, n_tokens, None, flash_attn, n_threads)]
    print(f"  long vanilla {n_tokens} cells: {n_tokens / runs[0].seconds:.1f} t/s", file=sys.stderr, flush=True)
    extended = []
    for pol in policies:
        r = long_generation(model, max(n_tokens, n_extend), n_cells, pol, flash_attn, n_threads)
        extended.append(r)
        runs.append(r.upto(n_tokens))
        print(f"  long {pol} {n_cells} cells: {r.n_fed / r.seconds:.1f} t/s over {r.n_fed}", file=sys.stderr, flush=True)
    for r in [runs[0]] + extended:
        _raw(raw, "long", flash_attn=flash_attn, **dataclasses.asdict(r))
    out = _long_table(runs, n_tokens, flash_attn, n_threads, Path(model).name)
    if n_extend > n_tokens:
        out += ["", *_long_extension(extended, n_extend)]
    return out


def _long_table(runs: List[LongRun], n_tokens: int, flash_attn: bool, n_threads: int, model_name: str) -> List[str]:
    base = runs[0]
    base_tps = base.n_fed / base.seconds
    out = [
        f"### Generating {n_tokens} tokens: vanilla full cache vs a bounded cache",
        "",
        f"_model {model_name}, threads={n_threads}, flash_attn={flash_attn}, greedy, one token per decode "
        f"call after a {len(LONG_PROMPT)}-character prompt; KV bytes = F16 K+V + F32 scores and value norms "
        f"({100 * base.score_share:.1f}% of it, allocated in every a2sf cache)_",
        "",
        "| policy | cells | KV MiB | memory ratio | tokens/s | ratio | last 1024 t/s | ratio "
        "| last/first segment | evictions | cells evicted + used = fed | median / max ms per eviction "
        "| eviction share | compaction share | both |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in runs:
        tps = r.n_fed / r.seconds
        ev = r.event_seconds
        ev_ms = f"{1e3 * statistics.median(ev):.2f} / {1e3 * max(ev):.2f}" if ev else "-"
        share = f"{100 * sum(ev) / r.seconds:.2f}%" if ev else "-"
        cshare = f"{100 * r.compact_seconds / r.seconds:.2f}%" if ev else "-"
        both = f"{100 * (sum(ev) + r.compact_seconds) / r.seconds:.2f}%" if ev else "-"
        acct = (f"{r.cells_evicted} + {r.cells_used} = {r.cells_evicted + r.cells_used} ({r.n_fed})"
                if r.label != "vanilla" else "-")
        out.append(
            f"| {r.label} | {r.n_cells} | {r.kv_bytes / 2**20:.1f} | {base.kv_bytes / r.kv_bytes:.1f}x | {tps:.1f} "
            f"| {tps / base_tps:.2f} | {r.segments[-1]:.1f} | {r.segments[-1] / base.segments[-1]:.2f} "
            f"| {r.segments[-1] / r.segments[0]:.2f} | {len(ev)} | {acct} | {ev_ms} | {share} | {cshare} | {both} |"
        )
    out += ["", "Tokens/s per 1024-token segment:", "",
            "| policy | " + " | ".join(str(i + 1) for i in range(len(base.segments))) + " |",
            "|---|" + "---:|" * len(base.segments)]
    for r in runs:
        out.append(f"| {r.label} | " + " | ".join(f"{s:.0f}" for s in r.segments) + " |")
    return out


def _long_extension(runs: List[LongRun], n_extend: int) -> List[str]:
    """tokens/s of the bounded caches per part (about an eighth, whole 1024-token segments)."""
    part = max(1024, (n_extend // 8) // 1024 * 1024)
    n_parts = -(-n_extend // part)
    out = [f"Bounded caches on to {n_extend} tokens (the same runs), tokens/s per {part}-token part "
           f"(column: tokens at its end), and eviction time over the whole stream:", "",
           "| policy | " + " | ".join(f"{min((i + 1) * part, n_extend) / 1024:g}k" for i in range(n_parts))
           + " | last/first part | evictions | eviction share | compaction share |",
           "|---|" + "---:|" * n_parts + "---:|---:|---:|---:|"]
    for r in runs:
        ends = [r.upto(min((i + 1) * part, r.n_fed)) for i in range(n_parts)]
        tps, prev = [], (0, 0.0)
        for e in ends:
            tps.append((e.n_fed - prev[0]) / (e.seconds - prev[1]))
            prev = (e.n_fed, e.seconds)
        ev = r.event_seconds
        out.append(f"| {r.label} | " + " | ".join(f"{t:.0f}" for t in tps)
                   + f" | {tps[-1] / tps[0]:.2f} | {len(ev)} | {100 * sum(ev) / r.seconds:.2f}% "
                   f"| {100 * r.compact_seconds / r.seconds:.2f}% |")
    return out


def main(argv: Optional[List[str]] = None, prog: str = "python -m a2sf.bench") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF path (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--sections", nargs="+", choices=["overhead", "compress", "long", "kvpress"],
                    default=["overhead", "compress", "long", "kvpress"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096], help="overhead: cache sizes")
    ap.add_argument("--flash-attn", nargs="+", choices=["off", "on"], default=["off", "on"],
                    help="overhead: flash attention settings to measure (long uses the first)")
    ap.add_argument("--reps", type=int, default=3, help="overhead: interleaved repetitions")
    ap.add_argument("--policies", nargs="+", default=[p for p in POLICIES if p], metavar="POLICY",
                    help="overhead: policies beside vanilla (name[+setting=value], e.g. a2sf+decode_scoring=lazy)")
    ap.add_argument("--decode", type=int, default=64, help="overhead: decoded tokens per measurement")
    ap.add_argument("--compress-prompt", type=int, default=4096, help="compress: prompt tokens")
    ap.add_argument("--compress-budget", type=int, default=1024, help="compress: cells kept (kv_budget)")
    ap.add_argument("--compress-policies", nargs="+", default=["a2sf", "mean"], help="compress: policies")
    ap.add_argument("--compress-decode", type=int, default=256, help="compress: tokens decoded after compression")
    ap.add_argument("--long-tokens", type=int, default=8192, help="long: tokens through the cache")
    ap.add_argument("--long-cells", type=int, default=1024, help="long: cells of the bounded caches")
    ap.add_argument("--long-policies", nargs="+", default=LONG_POLICIES, help="long: bounded-cache policies")
    ap.add_argument("--long-extend", type=int, default=0,
                    help="long: the bounded caches go on to this many tokens (vanilla stops at --long-tokens)")
    ap.add_argument("--kvpress-context", type=int, default=1024, help="kvpress: context tokens")
    ap.add_argument("--kvpress-budget", type=int, default=256, help="kvpress: cells kept")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-gpu-layers", type=int, default=0,
                    help="overhead: layers offloaded to the GPU of a GPU build (-1: all)")
    ap.add_argument("--text", default="austen",
                    help="overhead: what the prompts are made of: austen, essays, a .txt file or a directory of them")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH",
                    help="also write every single measurement (each rep, each run) as JSON")
    ap.add_argument("--cpu-clock", action="store_true",
                    help="overhead: measure the CPU time of one computing thread (forces --threads 1) instead "
                         "of wall time; steadier on a loaded machine")
    a = ap.parse_args(argv)
    if a.cpu_clock:
        a.threads = 1

    model = a.model
    if model is None:
        from a2sf.models import smollm2_path

        model = str(smollm2_path())
    fa_modes = [m == "on" for m in a.flash_attn]

    blocks = []
    raw: list = []
    if "overhead" in a.sections:
        blocks.append(section_overhead(model, a.sizes, fa_modes, a.reps, a.decode, a.threads, a.cpu_clock,
                                       [None] + list(a.policies), raw=raw, n_gpu_layers=a.n_gpu_layers,
                                       text=a.text))
    if "compress" in a.sections:
        blocks.append(section_compress(model, a.compress_prompt, a.compress_budget, a.compress_decode, a.compress_policies,
                                       fa_modes[0], a.threads, a.reps, raw=raw))
    if "long" in a.sections:
        blocks.append(section_long(model, a.long_tokens, a.long_cells, a.long_policies, fa_modes[0], a.threads,
                                   a.long_extend, raw=raw))
    if "kvpress" in a.sections:
        from .bench_kvpress import section_kvpress

        blocks.append(section_kvpress(model, a.kvpress_context, a.kvpress_budget, a.decode, a.reps, a.threads,
                                      raw=raw))
    # every table's caption carries the exact command that produced it
    import shlex

    cmd = " ".join([prog] + [shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])])
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"command": cmd, "model": Path(model).name, "threads": a.threads,
                                      "records": raw}, indent=1) + "\n")
    for b in blocks:
        b.insert(3, f"_command: `{cmd}`_")
        b.insert(4, "")
    print("\n\n".join("\n".join(b) for b in blocks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
