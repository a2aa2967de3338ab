#!/usr/bin/env python3
"""Soak test: generate a long stream with eviction and watch memory and scores.

    .venv/bin/python scripts/soak.py [TOKENS] [--n-ctx 256] [--policy a2sf]
                                     [--every 5000] [--warmup 10000] [--model PATH]

Generates TOKENS tokens (default 100000) with SmolLM2-135M-Instruct (or
--model) in a cache of --n-ctx cells, and every --every tokens prints the
process RSS, the cache accounting and a NaN check of the scores. At the end it
checks, and exits 1 if any fails:

* RSS after the warm-up stays within --rss-tolerance (5%) of its first sample;
* no score was ever NaN/inf;
* eviction accounting adds up: cells evicted + cells used = tokens fed;
* the kept cells always include the sinks and the recent window.

Prints one JSON line with the series last (``--json PATH`` writes it too).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

PROMPT = (
    "The lighthouse keeper kept a journal. Every evening he wrote down the weather, "
    "the ships that passed, the birds on the rocks and what the sea sounded like. "
    "Years later his granddaughter found the journal and read it aloud. "
)


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def soak(
    n_tokens: int = 100_000,
    *,
    model_path: Optional[str] = None,
    n_ctx: int = 256,
    policy: str = "a2sf",
    every: int = 5000,
    warmup: int = 10_000,
    rss_tolerance: float = 0.05,
    n_threads: Optional[int] = None,
    seed: int = 0,
    verbose: bool = True,
) -> Dict[str, Any]:
    """Run the soak; returns the samples and the verdicts (see the module doc)."""
    import numpy as np

    from a2sf import Llama

    if model_path is None:
        from a2sf.models import smollm2_path

        model_path = str(smollm2_path())
    llm = Llama(
        model_path,
        n_ctx=n_ctx,
        kv_policy=policy,
        max_positions=n_tokens + 4096,  # positions keep growing; never the limit here
        n_threads=n_threads or min(4, os.cpu_count() or 1),
        n_threads_batch=n_threads or min(4, os.cpu_count() or 1),
        seed=seed,
        verbose=False,
    )
    pol = llm.kv_policy
    prompt = llm.tokenize(PROMPT.encode())

    samples: List[Dict[str, Any]] = []
    problems: List[str] = []
    n_nan = 0
    generated = 0
    t0 = time.perf_counter()

    def sample() -> None:
        nonlocal n_nan
        s = llm.kv_scores()
        st = llm.kv_stats()
        fed = llm.n_tokens
        bad = int((~np.isfinite(s.scores)).sum())
        n_nan += bad
        pos = s.positions
        kept = set(s.token_index.tolist())  # tokens, whatever positions compaction gave them
        rec = {
            "generated": generated,
            "fed": fed,
            "rss_mib": round(rss_bytes() / 2**20, 2),
            "cells_used": st["cells_used"],
            "cells_evicted": st["cells_evicted"],
            "evictions": st["evictions"],
            "nan_scores": bad,
            "max_position": int(pos.max()) if len(pos) else -1,
            "compactions": st["compactions"],
            "tok_per_s": round(generated / max(time.perf_counter() - t0, 1e-9), 1),
        }
        samples.append(rec)
        if st["cells_evicted"] + st["cells_used"] != fed:
            problems.append(f"at {generated}: evicted {st['cells_evicted']} + used {st['cells_used']} "
                            f"!= fed {fed}")
        if len(pos) != st["cells_used"] or len(pos) > llm.n_ctx():
            problems.append(f"at {generated}: {len(pos)} cells of seq 0, {st['cells_used']} used")
        if not set(range(min(pol.n_sink, fed))) <= kept:
            problems.append(f"at {generated}: a sink was evicted")
        if not set(range(max(0, fed - pol.recent_window(len(pos))), fed)) <= kept:
            problems.append(f"at {generated}: a recent cell was evicted")
        if verbose:
            print(json.dumps(rec), flush=True)

    # sample at 0 generated tokens too (after the prompt) for the accounting
    gen = llm.generate(prompt, temp=0.8, top_k=40, top_p=0.95, reset=True)
    try:
        for _tok in gen:
            generated += 1
            # the token just yielded is fed to the model at the next step; sample
            # between steps, when n_tokens counts every fed token
            if generated % every == 0 or generated == n_tokens:
                sample()
            if generated >= n_tokens:
                break
    finally:
        gen.close()

    rss = [r["rss_mib"] for r in samples if r["generated"] >= warmup]
    rss_ok = True
    rss_spread = None
    if len(rss) >= 2:
        base = rss[0]
        rss_spread = (max(rss) - min(rss)) / base
        rss_ok = all(abs(r - base) <= rss_tolerance * base for r in rss)
        if not rss_ok:
            problems.append(f"RSS after warm-up moved by more than {rss_tolerance:.0%} of {base} MiB: {rss}")
    if n_nan:
        problems.append(f"{n_nan} NaN/inf scores")
    llm.close()
    return {
        "model": os.path.basename(model_path),
        "policy": policy,
        "n_ctx": n_ctx,
        "tokens": generated,
        "warmup": warmup,
        "rss_tolerance": rss_tolerance,
        "rss_spread_after_warmup": rss_spread,
        "rss_ok": rss_ok,
        "nan_scores": n_nan,
        "accounting_ok": not any("!= fed" in p for p in problems),
        "seconds": round(time.perf_counter() - t0, 1),
        "samples": samples,
        "problems": problems,
        "ok": not problems,
    }


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tokens", nargs="?", type=int, default=100_000)
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--policy", default="a2sf")
    ap.add_argument("--every", type=int, default=5000)
    ap.add_argument("--warmup", type=int, default=10_000)
    ap.add_argument("--rss-tolerance", type=float, default=0.05)
    ap.add_argument("--model", default=None, help="GGUF path (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the summary here")
    a = ap.parse_args(argv)
    res = soak(a.tokens, model_path=a.model, n_ctx=a.n_ctx, policy=a.policy, every=a.every,
               warmup=a.warmup, rss_tolerance=a.rss_tolerance, n_threads=a.threads, seed=a.seed)
    line = json.dumps({k: v for k, v in res.items()})
    print(line)
    if a.json:
        with open(a.json, "w") as f:
            f.write(line + "\n")
    for p in res["problems"]:
        print(f"soak: FAIL: {p}", file=sys.stderr)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
