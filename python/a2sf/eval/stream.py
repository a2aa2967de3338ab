"""Protocol 4: an endless stream through a bounded cache, read at increasing depths.

    python -m a2sf.eval stream --texts austen --n-ctx 256 --policies streaming a2sf \\
        --positions absolute cache training --depths 1280 7936 16384 32512

One ``a2sf.Llama`` with ``n_ctx`` cells reads one long text (the product path:
``Llama.eval`` in chunks, eviction inside llama.cpp, positions as the
``positions`` setting says). At each depth ``d`` the perplexity of the next
``window`` tokens is measured token by token, and compared with a *fresh*
context of the same policy and size that read only BOS + the ``fresh`` tokens
before ``d`` (same recent history, positions from 0). A ratio near 1 at every
depth means the stream still reads as well as a new conversation would; past
the training context, positions that are never compacted make it explode.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..compaction import POSITION_MODES
from .store import emit_table

__all__ = ["stream_nll", "run_stream", "table", "main"]


def _last_logits(llm) -> np.ndarray:
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float64)


def _feed(llm, tokens: Sequence[int], chunk: int) -> None:
    for i in range(0, len(tokens), chunk):
        llm.eval(tokens[i:i + chunk])


def stream_nll(llm, window: Sequence[int]) -> float:
    """Summed NLL of ``window`` after what ``llm`` has read, one token at a time."""
    nll = 0.0
    for t in window:
        z = _last_logits(llm)
        z -= z.max()
        nll -= float(z[t] - math.log(np.exp(z).sum()))
        llm.eval([t])
    return nll


def _llama(model: str, n_ctx: int, policy: str, positions: Optional[str], threads: int,
           granularity: Optional[str] = None):
    from ..llama import Llama

    kw = {} if positions is None else {"positions": positions}
    if granularity is not None:
        kw["granularity"] = granularity
    # n_threads_batch too: llama-cpp-python's default (all cores) spins against other jobs
    return Llama(model, n_ctx=n_ctx, kv_policy=policy, n_threads=threads, n_threads_batch=threads,
                 verbose=False, **kw)


def run_stream(model: str, tokens: Sequence[int], policy: str, positions: str, n_ctx: int,
               depths: Sequence[int], window: int, fresh: int, threads: int, chunk: int,
               bos: int, granularity: Optional[str] = None) -> List[Dict]:
    """One stream per (policy, positions): a record per depth, with its fresh baseline
    (the same policy and granularity; None: the policy's default)."""
    tokens = list(tokens)
    depths = sorted(depths)
    if depths[-1] + window > len(tokens):
        raise ValueError(f"the text has {len(tokens)} tokens; depth {depths[-1]} + window {window} needs more")
    llm = _llama(model, n_ctx, policy, positions, threads, granularity)
    out = []
    read = 0
    t_start = time.perf_counter()
    for d in depths:
        if d < read:
            raise ValueError(f"depth {d} is inside the previous window (depths must be >= window apart)")
        t0 = time.perf_counter()
        _feed(llm, tokens[read:d], chunk)
        t_feed = time.perf_counter() - t0
        nll = stream_nll(llm, tokens[d:d + window])
        read = d + window
        kv = llm.kv_scores()
        stats = llm.kv_stats()
        base = _llama(model, n_ctx, policy, None, threads, granularity)
        _feed(base, [bos] + tokens[max(0, d - fresh):d], chunk)
        nll_fresh = stream_nll(base, tokens[d:d + window])
        base.close()
        out.append({
            "policy": policy, "granularity": granularity, "positions": positions, "n_ctx": n_ctx, "depth": d, "window": window,
            "fresh": fresh, "ppl": math.exp(nll / window), "ppl_fresh": math.exp(nll_fresh / window),
            "ratio": math.exp((nll - nll_fresh) / window),
            "max_position": int(kv.positions.max()) if len(kv) else -1, "cells": len(kv),
            "evictions": stats["evictions"], "compactions": stats.get("compactions", 0),
            "compact_seconds": stats.get("compact_seconds", 0.0), "evict_seconds": stats["evict_seconds"],
            "feed_tokens_per_s": (d - (out[-1]["depth"] + window if out else 0)) / max(t_feed, 1e-9),
            "seconds": time.perf_counter() - t_start,
        })
        print(f"stream {_label(policy, granularity)}/{positions} depth {d}: ppl {out[-1]['ppl']:.2f} vs fresh "
              f"{out[-1]['ppl_fresh']:.2f} = x{out[-1]['ratio']:.3f}, max position {out[-1]['max_position']}",
              file=sys.stderr, flush=True)
    llm.close()
    return out


def _label(policy: str, granularity: Optional[str]) -> str:
    return policy if granularity is None else f"{policy}/{granularity}"


def table(records: Sequence[Dict], command: str) -> str:
    """Markdown: ppl / fresh per (policy, positions) and depth, plus the cost of compaction."""
    depths = sorted({r["depth"] for r in records})
    rows = {}
    for r in records:
        rows.setdefault((_label(r["policy"], r.get("granularity")), r["positions"]), {})[r["depth"]] = r
    lines = [f"Perplexity of the next {records[0]['window']} tokens at each position, divided by a fresh "
             f"{records[0]['n_ctx']}-cell context of the same policy that read BOS + the {records[0]['fresh']} "
             f"tokens before them. Command: `{command}`", "",
             "| policy | positions | " + " | ".join(str(d) for d in depths) +
             " | max position | compactions | compaction ms (mean) | feed t/s (last) |",
             "|---|---|" + "---:|" * (len(depths) + 4)]
    for (pol, pos), by_d in rows.items():
        last = by_d[max(by_d)]
        n_c = last["compactions"]
        ms = 1000.0 * last["compact_seconds"] / n_c if n_c else 0.0
        cells = " | ".join(f"{by_d[d]['ratio']:.3f}" if d in by_d else "" for d in depths)
        lines.append(f"| {pol} | {pos} | {cells} | {last['max_position']} | {n_c} | {ms:.2f} | "
                     f"{last['feed_tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None, prog: str = "python -m a2sf.eval stream") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF path (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--texts", default="austen", help="'essays', 'austen', a .txt file or a directory")
    ap.add_argument("--document", default=None, help="the document of --texts to stream (default: the longest)")
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--policies", nargs="+", default=["streaming", "a2sf"])
    ap.add_argument("--granularities", nargs="+", default=None, choices=("token", "layer", "head"),
                    help="scored policies: one stream per granularity (default: the policy's own); "
                         "policies without scores run once")
    ap.add_argument("--positions", nargs="+", default=list(POSITION_MODES), choices=POSITION_MODES)
    ap.add_argument("--depths", nargs="+", type=int, default=[1280, 7936, 16384, 32512])
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--fresh", type=int, default=1024, help="tokens the fresh baseline reads before each depth")
    ap.add_argument("--chunk", type=int, default=64, help="tokens per Llama.eval call while streaming")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("results") / "eval" / "stream.jsonl")
    ap.add_argument("--table", type=Path, default=None, help="also write the Markdown table here")
    args = ap.parse_args(argv)

    from .. import llama_cpp_commit
    from ..models import smollm2_path
    from .data import load_texts

    model = args.model or str(smollm2_path())
    texts = load_texts(args.texts)
    name = args.document or max(texts, key=lambda k: len(texts[k]))
    from ..llama import Llama

    tok = Llama(model, n_ctx=64, vocab_only=True, verbose=False)
    tokens = tok.tokenize(texts[name].encode("utf-8"), add_bos=True)
    bos = tok.token_bos()
    tok.close()

    command = f"{prog} " + " ".join(argv if argv is not None else sys.argv[1:])
    records = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from ..policies import PolicyKind, make_policy

    for policy in args.policies:
        scored = make_policy(policy).kind == PolicyKind.SCORE
        for granularity in (args.granularities or [None]) if scored else [None]:
            for positions in args.positions:
                recs = run_stream(model, tokens, policy, positions, args.n_ctx, args.depths, args.window,
                                  args.fresh, args.threads, args.chunk, bos, granularity)
                with open(args.out, "a") as f:
                    for r in recs:
                        r.update({"document": f"{args.texts}/{name}", "llama_cpp": llama_cpp_commit()[:12]})
                        f.write(json.dumps(r) + "\n")
                records += recs
    emit_table(table(records, command), args.table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
