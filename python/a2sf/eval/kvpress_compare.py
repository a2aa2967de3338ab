"""Side by side: our llama.cpp eviction vs NVIDIA kvpress, same model, same protocol.

kvpress (0.5.x) compresses the KV cache of a HF transformers model after the
prefill of the context, with the full context's attention at hand; our engine
evicts inside llama.cpp while the context streams in. Both are run here on the
same windows of the same SmolLM2 GGUF (transformers dequantises it to float32
and runs eager attention, which ObservedAttentionPress needs), with the same
token ids (llama.cpp's tokenizer), and scored by protocol 1 (perplexity of the
continuation after the compressed context). Our engine is run twice: chunked
(as in protocol 1) and "one-shot" (full prefill, then one eviction to the
budget -- kvpress's setting). tokens/s = (context + continuation) / seconds,
both measured in the same process with the same thread count.

Method pairs: StreamingLLMPress <-> streaming, TOVAPress <-> tova,
ObservedAttentionPress (H2O-like: mean attention over the queries that saw the
key) <-> h2o (summed attention), SnapKVPress (no engine equivalent), and our
a2sf for reference.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from .engine import BudgetRunner, CacheConfig, log_softmax_rows
from .store import Progress, ResultStore
from .sweep import DEFAULT_ALPHA, RecordFactory

__all__ = ["run_kvpress", "KVPRESS_METHODS", "ENGINE_METHODS", "PRESSES", "make_press", "hf_model"]

ENGINE_METHODS = ("none", "streaming", "tova", "h2o", "a2sf")


#: method name -> (kvpress press class, keyword arguments); the one mapping, used by
#: this comparison and by ``a2sf.bench --sections kvpress``
PRESSES = {
    "streaming": ("StreamingLLMPress", {"n_sink": 4}),
    "tova": ("TOVAPress", {}),
    "observed_attention": ("ObservedAttentionPress", {}),
    "snapkv": ("SnapKVPress", {}),
}

KVPRESS_METHODS = ("none",) + tuple(PRESSES)


def make_press(name: str, compression_ratio: float):
    """The kvpress press of method ``name`` removing ``compression_ratio`` of the cache."""
    import kvpress

    try:
        cls, kwargs = PRESSES[name]
    except KeyError:
        raise ValueError(f"unknown kvpress method {name!r}; known: {', '.join(PRESSES)}") from None
    return getattr(kvpress, cls)(compression_ratio=compression_ratio, **kwargs)


def hf_model(model_path: str, threads: int):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    p = Path(model_path)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    return model


def _hf_nll(model, ctx: List[int], cont: List[int], press) -> Dict[str, Any]:
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        t0 = time.perf_counter()
        cache = DynamicCache()
        ids = torch.tensor([ctx])
        with press(model) if press is not None else contextlib.nullcontext():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        kept = int(cache.get_seq_length())
        last = out.logits[0, -1].float().numpy()
        pos = torch.arange(len(ctx), len(ctx) + len(cont) - 1).unsqueeze(0)
        out2 = model(input_ids=torch.tensor([cont[:-1]]), past_key_values=cache, position_ids=pos,
                     use_cache=True)
        logits = np.concatenate([last[None, :], out2.logits[0].float().numpy()], axis=0)
        dt = time.perf_counter() - t0
    ls = log_softmax_rows(logits)
    nll = float(-ls[np.arange(len(cont)), cont].sum())
    return {"nll_sum": nll, "n_scored": len(cont), "ppl": float(np.exp(nll / len(cont))),
            "kept_cells": kept, "seconds": dt, "tokens_per_s": (len(ctx) + len(cont) - 1) / dt}


def _engine_nll(runner: BudgetRunner, config: CacheConfig, ctx, cont, chunk_max: int,
                one_shot: bool) -> Dict[str, Any]:
    budget = config.budget(len(ctx))
    runner.set_config(config, budget)
    t0 = time.perf_counter()
    last = runner.feed_context(ctx, budget, chunk_max, one_shot=one_shot)
    kept = runner.n_cells() if budget is not None else len(ctx)
    lp = runner.continuation_logprobs(last, cont, len(ctx))
    dt = time.perf_counter() - t0
    nll = float(-lp.sum())
    return {"nll_sum": nll, "n_scored": len(cont), "ppl": float(np.exp(nll / len(cont))),
            "kept_cells": kept, "seconds": dt, "tokens_per_s": (len(ctx) + len(cont) - 1) / dt}


def run_kvpress(args, model_path: str) -> int:
    try:
        import kvpress  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise ValueError(f"the kvpress comparison needs requirements-eval.txt and kvpress==0.5.5 "
                         f"(pip install --no-deps kvpress==0.5.5): {e}") from None
    from .data import load_texts
    from .ppl import make_windows

    runner = BudgetRunner(model_path, n_ctx=max(2048, 2 * (args.context + args.continuation)),
                          n_threads=args.threads)
    tok = lambda s: runner.llm.tokenize(s.encode("utf-8"), add_bos=True)  # noqa: E731
    windows = make_windows(load_texts(args.texts), tok, args.context, args.continuation, args.windows)
    import torch
    import transformers

    settings = {"protocol": "kvpress", "texts": args.texts, "context": args.context,
                "continuation": args.continuation, "chunk_max": args.chunk, "threads": args.threads,
                "kvpress": importlib.metadata.version("kvpress"),
                "torch": torch.__version__, "transformers": transformers.__version__,
                "hf_dtype": "float32 (dequantised GGUF)", "hf_attention": "eager"}
    factory = RecordFactory("kvpress", Path(args.texts).name, model_path, settings)
    store = ResultStore(args.out / "kvpress.jsonl")

    engines = getattr(args, "engines", None) or ["kvpress", "llama.cpp", "llama.cpp-oneshot"]
    methods = getattr(args, "methods", None)
    unknown = sorted(set(methods or ()) - set(KVPRESS_METHODS) - set(ENGINE_METHODS))
    if unknown:
        raise ValueError(f"unknown --methods {', '.join(unknown)}; kvpress: {', '.join(KVPRESS_METHODS)}; "
                         f"engine: {', '.join(ENGINE_METHODS)}")

    def wanted(engine, method):
        return engine in engines and (methods is None or method in methods)

    jobs = []
    for i in range(len(windows)):
        jobs += [(e, "none", None, i) for e in ("kvpress", "llama.cpp") if wanted(e, "none")]
        for r in args.ratios:
            jobs += [("kvpress", m, r, i) for m in KVPRESS_METHODS[1:] if wanted("kvpress", m)]
            for m in ENGINE_METHODS[1:]:
                jobs += [(e, m, r, i) for e in ("llama.cpp", "llama.cpp-oneshot") if wanted(e, m)]

    def alpha(method):
        return DEFAULT_ALPHA if method == "a2sf" else None

    def key(engine, method, ratio, i):
        return factory.key_for(f"{engine}:{method}", ratio, alpha(method), 0, i)

    todo = [j for j in jobs if not store.done(key(*j))]
    bar = Progress(len(todo), "kvpress", not args.no_progress)
    model = hf_model(model_path, args.threads) if any(j[0] == "kvpress" for j in todo) else None
    try:
        for engine, method, ratio, i in todo:
            name, toks = windows[i]
            ctx, cont = toks[:args.context], toks[args.context:]
            if engine == "kvpress":
                m = _hf_nll(model, ctx, cont, make_press(method, 1.0 - ratio) if method != "none" else None)
            else:
                cfg = CacheConfig(method, ratio, alpha(method)) \
                    if method != "none" else CacheConfig("none")
                m = _engine_nll(runner, cfg, ctx, cont, args.chunk, engine.endswith("oneshot"))
            rec = factory.make_for(f"{engine}:{method}", ratio, alpha(method), 0, i, m,
                                   label=f"{engine}:{method}" + (f"@{ratio:g}" if ratio is not None else ""),
                                   extra={"engine": engine, "method": method, "document": name})
            store.add(rec)
            bar.update(f"{engine}:{method}@{ratio} ppl={m['ppl']:.2f}")
    finally:
        bar.close()
        runner.close()
    print(f"kvpress: {len(todo)} new records in {args.out / 'kvpress.jsonl'}")
    return 0
