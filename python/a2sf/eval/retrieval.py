"""Retrieval under a bounded cache: RULER-style tasks through llama.cpp's KV cache.

    python -m a2sf.eval retrieval --tasks niah_number --lengths 2048 --ratios 0.25 \\
        --variants full streaming a2sf/token a2sf/head --modes aware agnostic --samples 50

Each sample (:mod:`a2sf.eval.ruler`) is a context with facts in it and one or
more questions. A *variant* is a policy with its settings (``a2sf/head``,
``mean/token``, ``a2sf/head:pool_kernel=7``, ``streaming``, ``full``); a *mode*
says when the cache is cut to ``ratio`` of the sample's length:

* ``aware``: the context and the question are read with the full cache, then
  the sequence is compressed (``kv_budget``: the question's attention takes part
  in the choice), then the answer is generated;
* ``agnostic``: the context alone is compressed; the question is read by the
  compressed cache (a reused prompt cache, the next turn of a chat);
* ``continuous``: the prompt streams through a cache of that many cells,
  evicting as it goes (``n_ctx`` = cells), and so does generation.

With several questions (``multiturn``) the answers stay in the cache and the
next question follows them; ``aware`` compresses again after each question (what
``kv_budget`` does with every prompt), ``agnostic`` only once, before the first.

Answers are greedy; a sample scores RULER's ``string_match_all``. Records go
to ``<out>/retrieval.jsonl`` (resumable); the tables and the plot are written by
``python -m a2sf.eval retrieval --report`` (:mod:`a2sf.eval.retrieval_report`).

The context and the first question are read by two evals (as a chat client
sends a document and then asks), in every mode but ``continuous``.

Speed: variants that score the prompt alike (same policy kind, forgetting factor,
value weighting) share one prefill per sample: its state is saved after the
context and after the question and restored for each of them, which gives the
same cache as a prefill of their own (``tests/test_retrieval.py`` checks it).
"""
from __future__ import annotations

import argparse
import ctypes
import math
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import llama_cpp
import numpy as np

from ..policies import KVPolicy, PolicyKind, make_policy
from .engine import BudgetRunner, chunk_for
from .ruler import NEEDLE_TASKS, TASKS, Sample, make_sample, noise_tokens, sample_tokens, score_output
from .store import Progress, ResultStore
from .sweep import RecordFactory

__all__ = ["Variant", "MODES", "RetrievalRunner", "run_retrieval", "main", "DEFAULT_VARIANTS"]

MODES = ("aware", "agnostic", "continuous")
DEFAULT_VARIANTS = ("full", "streaming", "a2sf/token", "a2sf/head", "mean/head", "tova/head")
#: policy fields that only change the ranking, not what the prompt's graph computes:
#: variants differing only in these share a prefill
RANKING_ONLY = frozenset({"granularity", "n_sink", "n_recent", "evict_chunk", "seed", "mean_attention",
                          "decode_scoring", "pool_kernel"})


@dataclass(frozen=True)
class Variant:
    """A policy and its settings, by a label: ``full``, ``streaming``, ``a2sf/head``,
    ``mean/token:n_sink=8``, ``a2sf/head:pool_kernel=7,forgetting_factor=0.9``."""

    label: str
    policy: Optional[str]  # None: the full cache
    overrides: Tuple[Tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, text: str) -> "Variant":
        if text == "full":
            return cls("full", None)
        head, _, rest = text.partition(":")
        name, _, gran = head.partition("/")
        over: Dict[str, Any] = {}
        if gran:
            over["granularity"] = gran
        for item in filter(None, rest.split(",")):
            k, eq, v = item.partition("=")
            if not eq:
                raise ValueError(f"variant {text!r}: setting {item!r} is not key=value")
            over[k.strip()] = _literal(v.strip())
        v = cls(text, name, tuple(sorted(over.items())))
        v.kv_policy()  # validates the policy name and its settings now
        return v

    def kv_policy(self) -> Optional[KVPolicy]:
        return None if self.policy is None else make_policy(self.policy, **dict(self.overrides))

    def prefill_signature(self) -> Optional[Tuple]:
        """What the prompt's scoring depends on (None: nothing, any prefill serves)."""
        p = self.kv_policy()
        if p is None or p.kind != PolicyKind.SCORE:
            return None
        d = p.to_dict()
        return tuple(sorted((k, v) for k, v in d.items() if k not in RANKING_ONLY and k != "policy"))

    def prefill_policy(self) -> KVPolicy:
        """The policy a shared prefill runs under: this one, tracking every (layer, head)."""
        p = self.kv_policy()
        return p.replace(granularity="head") if "granularity" in p.settable_fields() else p


def _literal(v: str) -> Any:
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


class RetrievalRunner:
    """One llama.cpp context (never full: budgets are enforced by compress / evict)."""

    def __init__(self, model_path: str, n_ctx: int, n_threads: int = 1, type_k: int = llama_cpp.GGML_TYPE_F16,
                 type_v: int = llama_cpp.GGML_TYPE_F16, flash_attn: bool = False):
        self.b = BudgetRunner(model_path, n_ctx=n_ctx, n_threads=n_threads, type_k=type_k, type_v=type_v,
                              flash_attn=flash_attn)
        self.llm = self.b.llm
        self.eos = self.llm.token_eos()

    # -- tokens ----------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True) -> List[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)

    def detokenize(self, toks: Sequence[int]) -> str:
        return self.llm.detokenize(list(toks)).decode("utf-8", errors="replace")

    # -- cache -----------------------------------------------------------------
    def set_policy(self, policy: Optional[KVPolicy]) -> None:
        self.llm.set_kv_policy(policy)
        self.b._policy_active = policy is not None

    def clear(self) -> None:
        self.b.clear()

    def save(self) -> bytes:
        ctx = self.llm._ctx.ctx
        n = llama_cpp.llama_state_seq_get_size(ctx, 0)
        buf = (ctypes.c_uint8 * n)()
        if llama_cpp.llama_state_seq_get_data(ctx, buf, n, 0) != n:
            raise RuntimeError("llama_state_seq_get_data wrote less than its size")
        return bytes(buf)

    def load(self, data: bytes) -> None:
        self.clear()
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if llama_cpp.llama_state_seq_set_data(self.llm._ctx.ctx, buf, len(data), 0) != len(data):
            raise RuntimeError("restoring the shared prefill failed")

    def n_cells(self) -> int:
        return self.b.n_cells()

    def compress(self, budget: int) -> None:
        if self.n_cells() > budget:
            self.llm.kv_compress(budget)

    def evict_to(self, budget: Optional[int]) -> None:
        n = self.n_cells()
        if budget is not None and n > budget:
            self.llm.kv_evict(n - budget, 0)

    def feed(self, tokens: Sequence[int], pos0: int, budget: Optional[int] = None) -> np.ndarray:
        """Decode ``tokens`` at pos0.. (in chunks, evicting down to ``budget`` after each
        when given); the logits of the last token."""
        if budget is None:
            return self.b.decode(tokens, pos0, "last")
        chunk = chunk_for(budget, 64)
        last = None
        for i in range(0, len(tokens), chunk):
            last = self.b.decode(tokens[i:i + chunk], pos0 + i, "last")
            self.evict_to(budget)
        return last

    def generate(self, logits: np.ndarray, pos: int, max_new: int, budget: Optional[int] = None,
                 one_sentence: bool = True) -> Tuple[List[int], str]:
        """Greedy answer from ``logits`` (of the token before ``pos``), every token decoded
        into the cache; stops at a newline after some text (or, ``one_sentence``, the end
        of the first sentence), EOS or ``max_new`` tokens."""
        out: List[int] = []
        text = ""
        for _ in range(max_new):
            tok = int(np.argmax(logits))
            if tok == self.eos:
                break
            out.append(tok)
            logits = self.b.decode([tok], pos + len(out) - 1, "last")
            self.evict_to(budget)
            text = self.detokenize(out)
            if _answer_ended(text, one_sentence):
                break
        return out, text

    def close(self) -> None:
        self.b.close()


def _answer_ended(text: str, one_sentence: bool) -> bool:
    body = text.lstrip()
    return "\n" in body or (one_sentence and (". " in body or body.endswith(".")) and any(c.isalnum() for c in body))


def _answer(runner: RetrievalRunner, sample: Sample, qs: List[List[int]], logits: np.ndarray, pos: int,
            budget: Optional[int], recompress: Optional[int]) -> Dict[str, Any]:
    """Ask every question in turn; ``logits`` are those after the first question was read.
    ``budget``: continuous eviction to it; ``recompress``: compress to it after each later question."""
    outputs, scores = [], []
    for i, q in enumerate(sample.questions):
        if i > 0:
            logits = runner.feed(qs[i], pos, budget)
            pos += len(qs[i])
            if recompress is not None:
                runner.compress(recompress)
        toks, text = runner.generate(logits, pos, q.max_new_tokens, budget, q.one_sentence)
        pos += len(toks)
        outputs.append(text)
        scores.append(score_output(text, q.answers))
    return {"outputs": outputs, "scores": scores, "score": float(np.mean(scores)),
            "found": all(s == 1.0 for s in scores)}


def _budget(ratio: float, length: int) -> int:
    return max(16, int(math.ceil(ratio * length)))


@dataclass
class _Job:
    variant: Variant
    ratio: Optional[float]  # None: the full cache
    mode: str  # aware / agnostic / continuous / full

    @property
    def key(self) -> str:
        r = "-" if self.ratio is None else f"{self.ratio:g}"
        return f"{self.variant.label}|{r}|{self.mode}"


def _groups(jobs: Sequence[_Job]) -> "OrderedDict[Optional[Tuple], List[_Job]]":
    """Jobs that can share a prefill, by signature; unscored ones join the first scored group."""
    groups: "OrderedDict[Optional[Tuple], List[_Job]]" = OrderedDict()
    for j in jobs:
        if j.mode != "continuous":
            groups.setdefault(j.variant.prefill_signature(), []).append(j)
    loose = groups.pop(None, [])
    if loose:
        if groups:
            groups[next(iter(groups))].extend(loose)
        else:
            groups[None] = loose
    return groups


def run_sample(runner: RetrievalRunner, sample: Sample, jobs: Sequence[_Job]) -> Dict[str, Dict[str, Any]]:
    """Every job on one sample: job key -> metrics."""
    ctx, qs = sample_tokens(sample, runner.tokenize)
    n_prompt = len(ctx) + len(qs[0])
    res: Dict[str, Dict[str, Any]] = {}
    for sig, group in _groups(jobs).items():
        scored = next((j.variant for j in group if sig is not None and j.variant.prefill_signature() == sig), None)
        base = scored.prefill_policy() if scored is not None else make_policy("streaming")
        t0 = time.perf_counter()
        runner.set_policy(base)
        runner.clear()
        runner.feed(ctx, 0)
        s_ctx = runner.save() if any(j.mode == "agnostic" for j in group) else None
        logits_q = runner.feed(qs[0], len(ctx))
        s_q = runner.save()
        t_prefill = time.perf_counter() - t0
        for j in group:
            t0 = time.perf_counter()
            budget = None if j.ratio is None else _budget(j.ratio, sample.length)
            runner.set_policy(base)
            if j.mode == "agnostic":
                runner.load(s_ctx)
                runner.set_policy(j.variant.kv_policy())
                runner.compress(budget)
                kept = runner.n_cells()
                logits = runner.feed(qs[0], len(ctx))
                m = _answer(runner, sample, qs, logits, n_prompt, None, None)
            else:  # aware, or the full cache
                runner.load(s_q)
                runner.set_policy(j.variant.kv_policy() or base)
                if budget is not None:
                    runner.compress(budget)
                kept = runner.n_cells()
                m = _answer(runner, sample, qs, logits_q, n_prompt, None, budget)
            res[j.key] = dict(m, cells_kept=kept, budget=budget, seconds=time.perf_counter() - t0,
                              prefill_seconds=t_prefill, n_prompt=n_prompt)
    for j in jobs:
        if j.mode != "continuous":
            continue
        t0 = time.perf_counter()
        budget = _budget(j.ratio, sample.length)
        runner.set_policy(j.variant.kv_policy())
        runner.clear()
        logits = runner.feed(ctx + qs[0], 0, budget)
        kept = runner.n_cells()
        m = _answer(runner, sample, qs, logits, n_prompt, budget, None)
        res[j.key] = dict(m, cells_kept=kept, budget=budget, seconds=time.perf_counter() - t0, n_prompt=n_prompt)
    return res


def plan_jobs(variants: Sequence[Variant], ratios: Sequence[float], modes: Sequence[str]) -> List[_Job]:
    jobs = []
    for v in variants:
        if v.policy is None:
            jobs.append(_Job(v, None, "full"))
            continue
        for r in ratios:
            for m in modes:
                jobs.append(_Job(v, r, m))
    return jobs


def run_retrieval(runner: RetrievalRunner, store: ResultStore, factory: RecordFactory, tasks: Sequence[str],
                  lengths: Sequence[int], samples: int, jobs: Sequence[_Job], filler: List[int],
                  seed: int = 0, progress: bool = True) -> int:
    """Run every job on every (task, length, sample) not yet in ``store``; returns new records."""
    noise = noise_tokens(lambda s: runner.tokenize(s, False), max(lengths) + 64)
    work = []
    for task in tasks:
        for length in lengths:
            for i in range(samples):
                todo = [j for j in jobs if not store.done(factory.key_for(j.key, j.ratio, None, 0,
                                                                          f"{task}/{length}/{i}"))]
                if todo:
                    work.append((task, length, i, todo))
    bar = Progress(len(work), "retrieval", progress)
    n = 0
    for task, length, i, todo in work:
        sample = make_sample(task, length, i, lambda s: runner.tokenize(s, False), runner.detokenize,
                             filler, noise, seed=seed)
        res = run_sample(runner, sample, todo)
        for j in todo:
            m = res[j.key]
            store.add(factory.make_for(j.key, j.ratio, None, 0, f"{task}/{length}/{i}", m, label=j.key,
                                       extra={"variant": j.variant.label, "mode": j.mode, "rtask": task,
                                              "length": length, "sample": i,
                                              "depths": [list(d) for d in sample.depths],
                                              "answers": [list(q.answers) for q in sample.questions]}))
            n += 1
        found = sum(res[j.key]["found"] for j in todo)
        bar.update(f"{task} L={length} #{i}: {found}/{len(todo)} found")
    bar.close()
    return n


def build_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF path (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--out", type=Path, default=Path("results") / "retrieval")
    ap.add_argument("--tasks", nargs="+", default=["niah_number"], choices=sorted(TASKS))
    ap.add_argument("--lengths", nargs="+", type=int, default=[2048])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.25])
    ap.add_argument("--modes", nargs="+", default=["aware", "agnostic"], choices=MODES)
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                    help="full, streaming, <policy>[/<granularity>][:setting=value,...]")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--texts", default="essays", help="haystack: 'essays', 'austen', a .txt file or a directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--type-k", default="f16", help="K cache type (f16, q8_0, q5_1, q5_0, q4_0, iq4_nl)")
    ap.add_argument("--type-v", default="f16", help="V cache type (a quantized V needs --flash-attn)")
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--report", action="store_true", help="only write the tables and the plot from the records")
    ap.add_argument("--doc", type=Path, default=Path("docs") / "RETRIEVAL.md",
                    help="the document whose generated tables --report rewrites")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def _ggml_type(name: str) -> int:
    t = getattr(llama_cpp, f"GGML_TYPE_{name.upper()}", None)
    if t is None:
        raise ValueError(f"unknown cache type {name!r}")
    return t


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m a2sf.eval retrieval") -> int:
    args = build_parser(prog).parse_args(argv)
    from .retrieval_report import write_report

    if args.report:
        for p in write_report(args.out, args.doc):
            print(p)
        return 0
    try:
        variants = [Variant.parse(v) for v in args.variants]
        if args.samples < 1 or any(r <= 0 or r >= 1 for r in args.ratios) or min(args.lengths) < 128:
            raise ValueError("--samples must be positive, --ratios in (0, 1), --lengths at least 128")
        type_k, type_v = _ggml_type(args.type_k), _ggml_type(args.type_v)
    except (ValueError, TypeError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    from . import _model_path
    from .data import load_texts

    model = _model_path(args.model)
    n_ctx = max(args.lengths) + 512
    runner = RetrievalRunner(model, n_ctx=n_ctx, n_threads=args.threads, type_k=type_k, type_v=type_v,
                             flash_attn=args.flash_attn)
    try:
        texts = load_texts(args.texts)
        filler = runner.tokenize("\n\n".join(texts[k] for k in sorted(texts)), False)
        settings = {"protocol": "retrieval", "texts": args.texts, "seed": args.seed, "threads": args.threads,
                    "n_ctx": n_ctx, "budget_of": "ceil(ratio * length), at least 16",
                    "generation": "greedy, stops at a newline, EOS or the question's max_new_tokens"}
        if (args.type_k, args.type_v, args.flash_attn) != ("f16", "f16", False):
            settings.update(type_k=args.type_k, type_v=args.type_v, flash_attn=args.flash_attn)
        factory = RecordFactory("retrieval", Path(args.texts).name, model, settings)
        store = ResultStore(args.out / "retrieval.jsonl")
        jobs = plan_jobs(variants, args.ratios, args.modes)
        n = run_retrieval(runner, store, factory, args.tasks, args.lengths, args.samples, jobs, filler,
                          args.seed, not args.no_progress)
    finally:
        runner.close()
    print(f"retrieval: {n} new records in {args.out / 'retrieval.jsonl'}")
    return 0


def records_for_report(records: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The retrieval records of a store (other protocols' lines skipped)."""
    return [r for r in records if r.get("task") == "retrieval"]


__all__ += ["records_for_report", "plan_jobs", "run_sample", "NEEDLE_TASKS"]
