"""The kvpress comparison of ``python -m a2sf.bench --sections kvpress``.

NVIDIA kvpress (github NVIDIA/kvpress) compresses the KV cache of a HF
transformers model once, after the prefill of a context; a2sf evicts inside
llama.cpp while the context streams through a bounded cache. The workload both
run here: a context of ``n_context`` tokens, kept to ``budget`` cells, then
``n_decode`` greedy tokens. transformers loads the same SmolLM2 GGUF
(dequantised to F32, torch CPU); a2sf runs the Q4_1 weights, so the ratio
measures the whole stack a user would pick, not the eviction code alone.

Needs ``pip install -r requirements-eval.txt`` (torch CPU, transformers, kvpress).
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import List, Optional

from .bench_common import greedy, open_llama, text_tokens

# a2sf policy -> the kvpress method (eval.kvpress_compare.PRESSES) with the same ranking
PAIRS = [
    ("streaming", "streaming"),
    ("tova", "tova"),
    ("h2o", "observed_attention"),
    ("a2sf", None),
    (None, "snapkv"),
]


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _hf_run(model, ids: List[int], press, n_decode: int) -> tuple:
    """(context seconds, decode seconds, cells after the run) for one press (None: full cache)."""
    import contextlib

    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    x = torch.tensor([ids])
    with torch.inference_mode():
        t0 = time.perf_counter()
        with press(model) if press is not None else contextlib.nullcontext():
            out = model(x, past_key_values=cache, use_cache=True)
        t_ctx = time.perf_counter() - t0
        tok = out.logits[0, -1].argmax()
        pos = len(ids)
        t0 = time.perf_counter()
        for _ in range(n_decode):
            # positions continue from the uncompressed length, as kvpress's pipeline does
            out = model(tok.view(1, 1), past_key_values=cache, use_cache=True,
                        cache_position=torch.tensor([pos]), position_ids=torch.tensor([[pos]]))
            tok = out.logits[0, -1].argmax()
            pos += 1
        t_dec = time.perf_counter() - t0
    return t_ctx, t_dec, int(cache.get_seq_length())


def _a2sf_run(gguf: str, ids: List[int], policy, n_cells: int, n_decode: int, n_threads: int) -> tuple:
    llm = open_llama(gguf, n_cells, policy, False, n_threads, n_batch=min(256, n_cells // 4))
    try:
        t0 = time.perf_counter()
        llm.eval(ids)
        t_ctx = time.perf_counter() - t0
        tok = greedy(llm)
        t0 = time.perf_counter()
        for _ in range(n_decode):
            llm.eval([tok])
            tok = greedy(llm)
        t_dec = time.perf_counter() - t0
        cells = llm.kv_n_cells() if policy is not None else llm.n_tokens
        return t_ctx, t_dec, cells
    finally:
        llm.close()


def section_kvpress(gguf: str, n_context: int, budget: int, n_decode: int, reps: int, n_threads: int,
                    raw: Optional[list] = None) -> List[str]:
    try:
        import kvpress  # noqa: F401  (the check only; make_press imports it)
    except ImportError as e:
        return ["### kvpress comparison", "", f"_not run: {e} (pip install -r requirements-eval.txt)_"]
    # the press mapping and the model loading of the quality comparison
    from .eval.kvpress_compare import PRESSES, hf_model, make_press

    tok_llm = open_llama(gguf, 512, None, False, n_threads, n_batch=64)
    try:
        ids = text_tokens(tok_llm, n_context)
    finally:
        tok_llm.close()
    model = hf_model(gguf, n_threads)
    ratio = 1.0 - budget / n_context
    if budget % 256:
        raise ValueError(f"budget {budget}: use a multiple of 256 (llama.cpp pads the cache size to one)")

    rows: dict = {}
    for _ in range(reps):
        rows.setdefault(("hf", None), []).append(_hf_run(model, ids, None, n_decode))
        rows.setdefault(("a2sf", None), []).append(
            _a2sf_run(gguf, ids, None, n_context + n_decode, n_decode, n_threads))
        for ours, press in PAIRS:
            if press is not None:
                rows.setdefault(("hf", press), []).append(_hf_run(model, ids, make_press(press, ratio), n_decode))
            if ours is not None:
                rows.setdefault(("a2sf", ours), []).append(
                    _a2sf_run(gguf, ids, ours, budget, n_decode, n_threads))
        print(f"  kvpress rep done ({len(rows)} configurations)", file=sys.stderr, flush=True)
    if raw is not None:  # --json: every run, (context seconds, decode seconds, cells)
        for (engine, method), runs in rows.items():
            for i, (t_ctx, t_dec, n_cells) in enumerate(runs):
                raw.append({"section": "kvpress", "engine": engine, "method": method, "rep": i,
                            "context_tokens": n_context, "budget": budget, "context_s": t_ctx,
                            "decode_s": t_dec, "decode_tokens": n_decode, "cells": n_cells})

    def med(key):
        r = rows[key]
        return (n_context / statistics.median(x[0] for x in r), n_decode / statistics.median(x[1] for x in r),
                r[-1][2])

    out = [
        "### a2sf (llama.cpp) vs kvpress (HF transformers, torch CPU)",
        "",
        f"_{n_context}-token context kept to {budget} cells, then {n_decode} greedy tokens; "
        f"threads={n_threads}, medians of {reps} runs; kvpress {_version('kvpress')}, transformers {_version('transformers')}, torch {_version('torch')};"
        f" compresses once after the prefill (compression_ratio {ratio:.2f}) and then grows by the decoded tokens; "
        f"a2sf evicts while the context streams through a cache of {budget} cells (llama.cpp pads n_ctx to a "
        f"multiple of 256); a2sf runs the Q4_1 GGUF, transformers the same GGUF dequantised to F32_",
        "",
        "| policy | a2sf context t/s | a2sf decode t/s | cells | kvpress press | kvpress context t/s "
        "| kvpress decode t/s | cells | context ratio | decode ratio |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for ours, press in [("vanilla", "none")] + PAIRS:
        a = med(("a2sf", None if ours == "vanilla" else ours)) if ours is not None else None
        h = med(("hf", None if press == "none" else press)) if press is not None else None
        press_name = PRESSES[press][0] if press in PRESSES else press
        cells = lambda r: str(r[2]) if r else "-"  # noqa: E731
        out.append(
            f"| {ours or '-'} | {f'{a[0]:.0f}' if a else '-'} | {f'{a[1]:.1f}' if a else '-'} | {cells(a)} "
            f"| {press_name or '-'} | {f'{h[0]:.0f}' if h else '-'} | {f'{h[1]:.1f}' if h else '-'} | {cells(h)} "
            f"| {f'{a[0] / h[0]:.1f}x' if a and h else '-'} | {f'{a[1] / h[1]:.1f}x' if a and h else '-'} |"
        )
    return out
