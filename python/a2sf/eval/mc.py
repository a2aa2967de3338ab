"""Protocol 2: multiple choice, lm-eval style (log-likelihood of each choice).

The context (question, after ``shots`` solved examples) is fed chunk by chunk
through a cache whose budget is a fraction of the context's tokens (the A2SF
paper: 0.2 and 0.5); every choice is then scored on top of the same compressed
cache and removed again. ``acc``: the choice with the highest summed
log-probability is gold; ``acc_norm``: the same divided by the choice's length
in characters (lm-eval's acc_norm).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from .data import MCQuestion, shot_prefix
from .engine import BudgetRunner, CacheConfig, chunk_for
from .store import Progress, ResultStore
from .sweep import RecordFactory, cache_details

__all__ = ["EncodedQuestion", "encode_questions", "score_question", "run_mc"]


@dataclass
class EncodedQuestion:
    context: List[int]
    choices: List[List[int]]
    choice_chars: List[int]
    gold: int
    id: str


def encode_questions(questions: Sequence[MCQuestion], pool: Sequence[MCQuestion], shots: int,
                     tokenize) -> List[EncodedQuestion]:
    """Tokenize context and choices as lm-eval does (split of the joint encoding)."""
    out = []
    for i, q in enumerate(questions):
        ctx_text = shot_prefix(questions, pool, i, shots) + q.query
        ctx = tokenize(ctx_text)
        conts = []
        for j in range(len(q.choices)):
            whole = tokenize(ctx_text + q.continuation(j))
            if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
                conts.append(whole[len(ctx):])
            else:  # the joint encoding merged across the boundary
                conts.append(tokenize(q.continuation(j), add_bos=False))
        out.append(EncodedQuestion(ctx, conts, [len(q.continuation(j)) for j in range(len(q.choices))],
                                   q.gold, q.id))
    return out


def score_question(runner: BudgetRunner, config: CacheConfig, q: EncodedQuestion,
                   chunk_max: int, chunk_min: int = 1) -> Dict[str, object]:
    """Log-likelihood of each choice after the compressed context."""
    budget = config.budget(len(q.context))
    runner.set_config(config, budget)
    last = runner.feed_context(q.context, budget, chunk_max, chunk_min)
    cells = runner.max_cells_seen if budget is not None else len(q.context)
    ll = [float(runner.continuation_logprobs(last, c, len(q.context)).sum()) for c in q.choices]
    ll_arr = np.asarray(ll)
    norm = ll_arr / np.asarray(q.choice_chars, dtype=np.float64)
    return {"loglik": ll, "pred": int(ll_arr.argmax()), "pred_norm": int(norm.argmax()),
            "gold": q.gold, "n_context": len(q.context), "budget": budget, "max_cells": cells}


def run_mc(runner: BudgetRunner, store: ResultStore, factory: RecordFactory,
           configs: Sequence[CacheConfig], questions: Sequence[EncodedQuestion], shots: int,
           block: int, chunk_max: int, chunk_min: int = 1, progress: bool = True) -> int:
    """Score every (config, block of questions) not yet in ``store``."""
    blocks = [list(range(s, min(s + block, len(questions)))) for s in range(0, len(questions), block)]
    todo = [(c, b) for c in configs for b in range(len(blocks))
            if not store.done(factory.key(c, shots, b))]
    bar = Progress(len(todo), f"mc {factory.dataset} {shots}-shot", progress)
    for config, b in todo:
        t0 = time.perf_counter()
        rows = [score_question(runner, config, questions[i], chunk_max, chunk_min) for i in blocks[b]]
        dt = time.perf_counter() - t0
        correct = [int(r["pred"] == r["gold"]) for r in rows]
        correct_norm = [int(r["pred_norm"] == r["gold"]) for r in rows]
        metrics = {"n": len(rows), "correct": sum(correct), "correct_norm": sum(correct_norm),
                   "acc": sum(correct) / len(rows), "acc_norm": sum(correct_norm) / len(rows),
                   "seconds": dt}
        questions_out = [{"id": questions[i].id, "pred": r["pred"], "pred_norm": r["pred_norm"],
                          "gold": r["gold"], "n_context": r["n_context"], "budget": r["budget"],
                          "chunk": chunk_for(r["budget"], chunk_max, chunk_min) if r["budget"] else None,
                          "max_cells": r["max_cells"], "loglik": [round(x, 4) for x in r["loglik"]]}
                         for i, r in zip(blocks[b], rows)]
        store.add(factory.make(config, shots, b, metrics, {"questions": questions_out}))
        bar.update(f"{config.label} acc={metrics['acc']:.2f}")
    bar.close()
    return len(todo)
