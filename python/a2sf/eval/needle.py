"""Protocol 3: pass-key retrieval (a needle in the essays' haystack).

A sentence with a random 5-digit pass key is placed at a relative ``depth``
of a haystack of about ``length`` tokens (the Paul Graham essays), a question
follows, and the cache holds a fixed number of cells (fewer than the haystack).
``found``: every token of the key is the argmax given the ones before it
(exactly what greedy decoding would print), scored teacher-forced in one batch;
``key_logprob``: the summed log-probability of the key.
"""
from __future__ import annotations

import random
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .engine import BudgetRunner, CacheConfig, log_softmax_rows
from .store import Progress, ResultStore
from .sweep import RecordFactory, cache_details

__all__ = ["NEEDLE", "QUESTION", "build_prompt", "run_needle"]

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? The pass key is"


def build_prompt(filler_tokens: Sequence[int], detokenize, tokenize, length: int, depth: float,
                 key: str) -> Tuple[List[int], List[int]]:
    """(context tokens, answer tokens) for a haystack of ~``length`` tokens."""
    needle = NEEDLE.format(key=key)
    overhead = len(tokenize(needle, add_bos=False)) + len(tokenize(QUESTION, add_bos=False)) + 1
    hay = detokenize(list(filler_tokens[: max(0, length - overhead)]))
    at = int(depth * len(hay))
    dot = hay.find(". ", at)  # insert at a sentence boundary
    at = dot + 1 if 0 <= dot < at + 400 else at
    text = hay[:at] + needle + hay[at:] + QUESTION
    ctx = tokenize(text)
    whole = tokenize(text + " " + key)
    answer = whole[len(ctx):] if whole[:len(ctx)] == ctx else tokenize(" " + key, add_bos=False)
    return ctx, answer


def _score(runner: BudgetRunner, config: CacheConfig, ctx: List[int], answer: List[int],
           chunk_max: int) -> Dict[str, object]:
    budget = config.budget(len(ctx))
    runner.set_config(config, budget)
    t0 = time.perf_counter()
    last = runner.feed_context(ctx, budget, chunk_max)
    rows = [last[None, :]]
    if len(answer) > 1:
        rows.append(runner.decode(answer[:-1], len(ctx), "all"))
        runner.drop_from(len(ctx))
    logits = np.concatenate(rows, axis=0)
    ls = log_softmax_rows(logits)
    lp = ls[np.arange(len(answer)), answer]
    found = bool(np.all(logits.argmax(axis=1) == np.asarray(answer)))
    return {"found": found, "key_logprob": float(lp.sum()), "n_context": len(ctx),
            "max_cells": runner.max_cells_seen if budget is not None else len(ctx),
            "seconds": time.perf_counter() - t0}


def run_needle(runner: BudgetRunner, store: ResultStore, factory: RecordFactory,
               configs: Sequence[CacheConfig], filler: Sequence[int], lengths: Sequence[int],
               depths: Sequence[float], trials: int, chunk_max: int, seed: int = 0,
               progress: bool = True) -> int:
    tok = lambda s, add_bos=True: runner.llm.tokenize(s.encode(), add_bos=add_bos)  # noqa: E731
    detok = lambda t: runner.llm.detokenize(t).decode("utf-8", errors="replace")  # noqa: E731
    cases = []
    for L in lengths:
        for d in depths:
            for t in range(trials):
                rng = random.Random(f"{seed}-{L}-{d}-{t}")
                key = str(rng.randint(10000, 99999))
                offset = rng.randint(0, max(0, len(filler) - L - 1))
                cases.append({"length": L, "depth": d, "trial": t, "key": key, "offset": offset})
    todo = [(c, i) for c in configs for i in range(len(cases))
            if not store.done(factory.key(c, 0, i))]
    bar = Progress(len(todo), "needle", progress)
    prompts: Dict[int, Tuple[List[int], List[int]]] = {}
    for config, i in todo:
        case = cases[i]
        if i not in prompts:
            prompts[i] = build_prompt(filler[case["offset"]:], detok, tok, case["length"],
                                      case["depth"], case["key"])
        ctx, ans = prompts[i]
        m = _score(runner, config, ctx, ans, chunk_max)
        store.add(factory.make(config, 0, i, m, {"case": case,
                                                 "cache": cache_details(config, config.budget(len(ctx)), chunk_max)}))
        bar.update(f"{config.label} L={case['length']} d={case['depth']} found={m['found']}")
    bar.close()
    return len(todo)
