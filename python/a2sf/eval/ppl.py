"""Protocol 1: compressed-context perplexity.

For each document window: feed ``context`` tokens through a cache of
``budget`` cells (evicting after every chunk), then score the next
``continuation`` tokens in one batch on top of the compressed cache; report
the perplexity of those tokens and, in the report, its ratio to the full cache.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .engine import BudgetRunner, CacheConfig
from .store import Progress, ResultStore
from .sweep import RecordFactory, cache_details

__all__ = ["make_windows", "window_nll", "run_ppl"]


def make_windows(texts: Dict[str, str], tokenize, n_context: int, n_cont: int,
                 n_windows: int) -> List[Tuple[str, List[int]]]:
    """Windows of ``n_context + n_cont`` tokens, first one per long-enough document.

    Documents are taken in name order, one window each (the first tokens), so the
    first windows are independent texts. When more windows are asked for than there
    are documents (Austen: six novels), the next pass takes each document's next
    non-overlapping span, named ``doc#k``, and so on. Each window starts with BOS (a
    fresh sequence); a later span gets BOS in front of its first token.
    """
    need = n_context + n_cont
    docs = []
    for name in sorted(texts):
        toks = tokenize(texts[name])
        if len(toks) >= need:
            docs.append((name, toks))
        if len(docs) >= n_windows:
            break
    if not docs:
        raise ValueError(f"no document has {need} tokens")
    out = [(name, toks[:need]) for name, toks in docs]
    span = need - 1  # later spans: BOS + need-1 tokens of the text
    k = 1
    while len(out) < n_windows:
        grew = False
        for name, toks in docs:
            lo = need + (k - 1)*span
            if len(toks) >= lo + span and len(out) < n_windows:
                out.append((f"{name}#{k}", toks[:1] + toks[lo:lo + span]))
                grew = True
        if not grew:
            break
        k += 1
    return out


def window_nll(runner: BudgetRunner, config: CacheConfig, tokens: Sequence[int], n_context: int,
               chunk_max: int) -> Dict[str, float]:
    """Summed NLL of tokens[n_context:] after the compressed context."""
    ctx, cont = list(tokens[:n_context]), list(tokens[n_context:])
    budget = config.budget(len(ctx))
    runner.set_config(config, budget)
    t0 = time.perf_counter()
    last = runner.feed_context(ctx, budget, chunk_max, one_shot=config.compress)
    lp = runner.continuation_logprobs(last, cont, len(ctx))
    dt = time.perf_counter() - t0
    nll = float(-lp.sum())
    return {"nll_sum": nll, "n_scored": len(cont), "ppl": float(np.exp(nll / len(cont))),
            "max_cells": runner.max_cells_seen if budget is not None else len(ctx),
            "seconds": dt, "tokens_per_s": (len(ctx) + len(cont) - 1) / dt}


def run_ppl(runner: BudgetRunner, store: ResultStore, factory: RecordFactory,
            configs: Sequence[CacheConfig], windows: Sequence[Tuple[str, List[int]]],
            n_context: int, chunk_max: int, progress: bool = True) -> int:
    """Run every (config, window) not yet in ``store``; returns how many ran."""
    todo = [(c, i) for c in configs for i in range(len(windows))
            if not store.done(factory.key(c, 0, i))]
    bar = Progress(len(todo), f"ppl {factory.dataset}", progress)
    for config, i in todo:
        name, toks = windows[i]
        m = window_nll(runner, config, toks, n_context, chunk_max)
        budget = config.budget(n_context)
        store.add(factory.make(config, 0, i, m, {"document": name,
                                                 "cache": cache_details(config, budget, chunk_max)}))
        bar.update(f"{config.label} {name} ppl={m['ppl']:.2f}")
    bar.close()
    return len(todo)
