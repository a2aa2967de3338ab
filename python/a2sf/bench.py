"""Decode/prefill speed of each policy against vanilla llama.cpp, measured side by side.

    python -m a2sf.bench [--sizes 256 1024 4096] [--reps 3] [--decode 64] [--flash-attn]

For every cache size the cache is filled to (size - decode - 8) cells from a text,
then `decode` tokens are generated one by one without eviction, so the figure is
the cost of score tracking alone. Repetitions interleave the configurations, and
the table shows medians and the ratio to vanilla measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

POLICIES = [None, "streaming", "h2o", "a2sf", "vatp"]


def _text_tokens(llm, n: int) -> list[int]:
    here = Path(__file__).resolve()
    candidates = [p / "shared" / "data" / "austen" for p in here.parents] + [
        p.parent / "shared" / "data" / "austen" for p in here.parents
    ]
    text = ""
    for d in candidates:
        if d.is_dir():
            text = "\n".join(f.read_text(errors="replace") for f in sorted(d.glob("*.txt")))
            break
    if not text:
        text = "The quick brown fox jumps over the lazy dog. " * 4000
    toks = llm.tokenize(text.encode(), add_bos=True)
    while len(toks) < n:
        toks = toks + toks
    return toks[:n]


def _greedy(llm) -> int:
    import llama_cpp

    logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),))))


def measure(model: str, n_ctx: int, policy, n_decode: int, flash_attn: bool, n_threads: int) -> tuple[float, float]:
    from a2sf import Llama

    n_batch = min(256, n_ctx // 4)  # the same for every policy, and one that fits beside the protected cells
    llm = Llama(model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, kv_policy=policy, flash_attn=flash_attn,
                n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
    try:
        depth = n_ctx - n_decode - 8
        toks = _text_tokens(llm, depth)
        t0 = time.perf_counter()
        llm.eval(toks)
        t_prefill = time.perf_counter() - t0
        tok = _greedy(llm)
        t0 = time.perf_counter()
        for _ in range(n_decode):
            llm.eval([tok])
            tok = _greedy(llm)
        t_decode = time.perf_counter() - t0
        if policy is not None:
            assert llm.kv_stats()["evictions"] == 0, "the benchmark must not evict"
        return depth / t_prefill, n_decode / t_decode
    finally:
        llm.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF path (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)

    model = a.model
    if model is None:
        from a2sf.models import smollm2_path

        model = str(smollm2_path())

    res: dict = {}
    for size in a.sizes:
        for _ in range(a.reps):
            for pol in POLICIES:
                pre, dec = measure(model, size, pol, a.decode, a.flash_attn, a.threads)
                res.setdefault((size, pol), []).append((pre, dec))
                print(f"  {size:5d} {pol or 'vanilla':9s} prefill {pre:7.0f} t/s  decode {dec:6.1f} t/s",
                      file=sys.stderr, flush=True)

    print(f"model {Path(model).name}, flash_attn={a.flash_attn}, threads={a.threads}, "
          f"medians of {a.reps} interleaved runs, decode of {a.decode} tokens at depth size-{a.decode + 8}")
    print("| cells | policy | prefill t/s | ratio | decode t/s | ratio |")
    print("|---:|---|---:|---:|---:|---:|")
    for size in a.sizes:
        base_p = statistics.median(r[0] for r in res[(size, None)])
        base_d = statistics.median(r[1] for r in res[(size, None)])
        for pol in POLICIES:
            p = statistics.median(r[0] for r in res[(size, pol)])
            d = statistics.median(r[1] for r in res[(size, pol)])
            print(f"| {size} | {pol or 'vanilla'} | {p:.0f} | {p / base_p:.2f} | {d:.1f} | {d / base_d:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
