#!/usr/bin/env python3
"""Does a GPU build of a2sf keep what its CPU keeps?

For every policy x granularity x mode (continuous eviction; compression after
the prompt) x flash attention off/on, the same token ids go through the same
library twice: all layers offloaded (``n_gpu_layers=-1``) and none
(``n_gpu_layers=0``). The report compares what a user would see:

* kept sets: the positions each (layer, KV head) holds (``kv_head_scores``);
* scores: the largest difference over the positions both sides hold, relative
  to the largest score;
* logits of the last token: the largest absolute difference, and whether the
  argmax is the same.

Then, with ``GGML_SCHED_DEBUG=2``, which backend each node of the scored graphs
ran on, against vanilla's graphs (a scoring op that falls back to the CPU shows
up as a CPU row that vanilla has not).

    python scripts/gpu_check.py --out gpu_check.md     # a CUDA build, on a GPU
    python scripts/gpu_check.py --quick                # a few configurations

On a CPU-only build both sides are the CPU: every row agrees exactly and the
placement table is skipped, which checks the script itself
(tests/test_gpu_check.py). ``scripts/device_check.sh`` builds the CUDA library
on a lent device and runs this there. Exit status 1 when a row differs beyond
the tolerances below.

``--shape-model PATH`` instead writes a random model of SmolLM2-135M's shape
(30 layers, 9/3 heads of 64, vocabulary 49152) quantized to Q4_K_M, for
``python -m a2sf.bench --n-gpu-layers -1 --model PATH`` where the real
SmolLM2 cannot be had (the device machine fetches nothing): speed depends on
the shape, not on the weights.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

#: The tiny model's KV cache is F16 on both sides and its weights F32: the two
#: backends round K/V to F16 from slightly different F32 products, so scores
#: and logits agree to about that rounding, and a kept set may differ where two
#: scores tie to within it.
SCORE_TOL = 2e-3       # of the largest score
LOGIT_TOL = 5e-2       # absolute
KEPT_SHARE_TOL = 0.99  # of the (layer, head, position) entries both sides hold

POLICIES = ["streaming", "h2o", "tova", "a2sf", "vatp", "mean"]
GRANULARITIES = ["token", "layer", "head"]
MODES = ["continuous", "compress"]
N_CTX = 256
N_PROMPT = 600
N_DECODE = 16
BUDGET = 128


@dataclass(frozen=True)
class Config:
    policy: str
    granularity: Optional[str]  # None: the policy has none (streaming)
    mode: str
    flash_attn: bool

    @property
    def label(self) -> str:
        g = f"/{self.granularity}" if self.granularity else ""
        return f"{self.policy}{g} {self.mode} fa={'on' if self.flash_attn else 'off'}"


@dataclass
class Side:
    positions: np.ndarray  # I32 [n_layers, n_head_kv, n_cells], sorted per head
    scores: Dict[Tuple[int, int, int], float]  # (layer, head, position) -> score
    logits: np.ndarray     # F32 [n_vocab]
    evictions: int = 0


def write_tiny(path: Path) -> Path:
    from a2sf.testing.tiny_gguf import write_tiny_llama

    return write_tiny_llama(path, qtype="F32", seed=7, n_layer=4, n_embd=128, n_head=4, n_head_kv=2,
                            n_ff=256, n_ctx_train=4096)


def write_shape_model(path: Path, n_threads: int = 0) -> Path:
    """A random SmolLM2-135M-shaped LLaMA, Q4_K_M (written F16, then quantized by libllama)."""
    from gguf import TokenType

    from a2sf.gguf_write import open_writer
    from a2sf.quantize import quantize
    from a2sf.testing.tiny_gguf import TinyConfig, finish_tiny, tiny_vocab, tiny_weights

    cfg = TinyConfig(n_layer=30, n_embd=576, n_head=9, n_head_kv=3, n_ff=1536, n_ctx_train=8192,
                     rope_freq_base=100000.0, seed=1)
    tokens, scores, types = tiny_vocab()
    n_vocab = 49152  # SmolLM2's: the output matrix is a large share of a 135M model's decode
    pad = n_vocab - len(tokens)
    vocab = (tokens + [f"<unused{i}>" for i in range(pad)], scores + [0.0] * pad,
             types + [int(TokenType.UNUSED)] * pad)
    f16 = path.with_name(path.stem + ".f16.gguf")
    w, tmp = open_writer(f16, "llama", "a2sf-smollm2-shape-random", n_ctx_train=cfg.n_ctx_train,
                         n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_ff=cfg.n_ff, n_head=cfg.n_head,
                         n_head_kv=cfg.n_head_kv)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_freq_base)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    finish_tiny(w, tmp, f16, vocab, tiny_weights(cfg, n_vocab), "f16")
    quantize(f16, path, "Q4_K_M", n_threads=n_threads)
    f16.unlink()
    return path


def configs(quick: bool) -> List[Config]:
    out = []
    for fa in (False, True):
        for mode in MODES:
            for pol in POLICIES:
                for g in ([None] if pol == "streaming" else GRANULARITIES):
                    out.append(Config(pol, g, mode, fa))
    if quick:
        keep = {("streaming", None), ("a2sf", "head"), ("h2o", "token")}
        out = [c for c in out if (c.policy, c.granularity) in keep and c.mode == "continuous"]
    return out


def token_ids(n: int, n_vocab: int, seed: int = 0) -> List[int]:
    rng = np.random.default_rng(seed)
    return [1] + [int(t) for t in rng.integers(3, n_vocab, n - 1)]


def run_side(model: str, cfg: Config, n_gpu_layers: int, n_threads: int) -> Side:
    from a2sf import Llama
    from a2sf.bench_common import last_logits

    kw = {"granularity": cfg.granularity} if cfg.granularity else {}
    n_ctx = N_CTX if cfg.mode == "continuous" else 1024
    if cfg.mode == "compress":
        kw["kv_budget"] = BUDGET
    llm = Llama(model, n_ctx=n_ctx, n_batch=64, n_ubatch=64, kv_policy=cfg.policy, flash_attn=cfg.flash_attn,
                n_gpu_layers=n_gpu_layers, n_threads=n_threads, n_threads_batch=n_threads, verbose=False, **kw)
    try:
        toks = token_ids(N_PROMPT + N_DECODE, llm.n_vocab())
        llm.eval(toks[:N_PROMPT])  # continuous: evicts as it streams; compress: then kept to BUDGET cells
        for t in toks[N_PROMPT:]:  # fixed ids, not sampled: both sides see the same tokens whatever they predict
            llm.eval([t])
        logits = last_logits(llm).copy()
        pos, sc = llm.kv_head_scores()
        pos, sc = np.asarray(pos), np.asarray(sc)
        order = np.argsort(pos, axis=-1, kind="stable")
        pos = np.take_along_axis(pos, order, -1)
        sc = np.take_along_axis(sc, order, -1)
        scores = {(l, h, int(p)): float(s) for l in range(pos.shape[0]) for h in range(pos.shape[1])
                  for p, s in zip(pos[l, h], sc[l, h])}
        return Side(pos, scores, logits, llm.kv_stats()["evictions"])
    finally:
        llm.close()


def compare(cpu: Side, gpu: Side) -> dict:
    same_heads = sum(np.array_equal(a, b) for a, b in zip(cpu.positions.reshape(-1, cpu.positions.shape[-1]),
                                                           gpu.positions.reshape(-1, gpu.positions.shape[-1])))
    n_heads = cpu.positions.shape[0] * cpu.positions.shape[1]
    both = cpu.scores.keys() & gpu.scores.keys()
    kept_share = len(both) / max(len(cpu.scores), len(gpu.scores), 1)
    top = max((abs(v) for v in cpu.scores.values()), default=0.0) or 1.0
    score_diff = max((abs(cpu.scores[k] - gpu.scores[k]) for k in both), default=0.0) / top
    logit_diff = float(np.max(np.abs(cpu.logits - gpu.logits)))
    argmax_same = int(np.argmax(cpu.logits)) == int(np.argmax(gpu.logits))
    ok = (kept_share >= KEPT_SHARE_TOL and score_diff <= SCORE_TOL and logit_diff <= LOGIT_TOL and argmax_same
          and np.isfinite(gpu.logits).all())
    return {"evictions": f"{cpu.evictions}/{gpu.evictions}", "heads_same": f"{same_heads}/{n_heads}",
            "kept_share": kept_share, "score_diff": score_diff, "logit_diff": logit_diff,
            "argmax_same": argmax_same, "ok": ok}


# -- where each op runs --------------------------------------------------------------
_NODE = re.compile(r"node #\s*\d+ \(\s*([^)]*?)\s*\):.*?\[\s*([A-Za-z0-9_]+)\s")


def _placement_child(model: str, policy: Optional[str], flash_attn: bool, n_gpu_layers: int) -> None:
    """In a child process with GGML_SCHED_DEBUG=2: a prompt that evicts, a few decode steps, a score read."""
    from a2sf import Llama

    kw = {"granularity": "head"} if policy not in (None, "streaming") else {}
    llm = Llama(model, n_ctx=N_CTX, n_batch=64, n_ubatch=64, kv_policy=policy, flash_attn=flash_attn,
                n_gpu_layers=n_gpu_layers, verbose=True, **kw)
    toks = token_ids(N_CTX + 64 if policy else 192, llm.n_vocab())
    llm.eval(toks)
    for t in toks[:4]:
        llm.eval([t])
    if policy:
        llm.kv_scores()
    llm.close()


def placement(model: str, policy: Optional[str], flash_attn: bool) -> Counter:
    """(backend, op) -> nodes, over every graph the scheduler ran."""
    env = dict(os.environ, GGML_SCHED_DEBUG="2")
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import gpu_check; "
            f"gpu_check._placement_child({model!r}, {policy!r}, {flash_attn!r}, -1)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"placement run of {policy} failed:\n{r.stderr[-2000:]}")
    return Counter((m.group(2), m.group(1)) for m in _NODE.finditer(r.stderr))


def _is_gpu(backend: str) -> bool:
    return backend.upper().startswith(("CUDA", "ROCM", "VULKAN", "METAL", "SYCL"))


def gpu_offload() -> bool:
    import a2sf  # noqa: F401  (binds llama_cpp to a2sf's libllama)
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    ap.add_argument("--quick", action="store_true", help="three policies, continuous only")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--model", default=None, help="GGUF (default: a tiny random F32 LLaMA written here)")
    ap.add_argument("--shape-model", type=Path, default=None, metavar="PATH",
                    help="only write a random SmolLM2-shaped Q4_K_M model to PATH, then exit")
    a = ap.parse_args(argv)
    if a.shape_model is not None:
        print(write_shape_model(a.shape_model, a.threads))
        return 0

    tmp = tempfile.TemporaryDirectory()
    model = a.model or str(write_tiny(Path(tmp.name) / "tiny.gguf"))
    on_gpu = gpu_offload()
    cmd = " ".join(["python scripts/gpu_check.py"] + [shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])])
    lines = [
        "### GPU vs CPU: kept sets, scores, logits",
        "",
        f"_{'all layers offloaded (n_gpu_layers=-1)' if on_gpu else 'CPU-only build: both sides ran on the CPU'} "
        f"against n_gpu_layers=0, same library and token ids; model {Path(model).name}; continuous: {N_PROMPT} "
        f"tokens through {N_CTX} cells in ubatches of 64, then {N_DECODE} single tokens; compress: the same "
        f"prompt read with a full cache and kept to {BUDGET} cells (`kv_budget`), then the {N_DECODE} tokens. "
        f"Agree: kept entries >= {KEPT_SHARE_TOL}, scores within {SCORE_TOL} of the largest, logits within "
        f"{LOGIT_TOL} and the same argmax_",
        f"_command: `{cmd}`_",
        "",
        "| configuration | evictions cpu/gpu | heads with equal kept sets | kept entries in common | score diff / max "
        "| max logit diff | same argmax | verdict |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    failed = 0
    for cfg in configs(a.quick):
        cpu = run_side(model, cfg, 0, a.threads)
        gpu = run_side(model, cfg, -1, a.threads)
        c = compare(cpu, gpu)
        failed += not c["ok"]
        lines.append(f"| {cfg.label} | {c['evictions']} | {c['heads_same']} | {c['kept_share']:.4f} | {c['score_diff']:.1e} "
                     f"| {c['logit_diff']:.1e} | {'yes' if c['argmax_same'] else 'no'} "
                     f"| {'agree' if c['ok'] else 'DIFFER'} |")
        print(lines[-1], file=sys.stderr, flush=True)

    lines += ["", "### Where the ops run (all layers offloaded, GGML_SCHED_DEBUG=2)", ""]
    if not on_gpu:
        lines.append("_skipped: this build has no GPU backend_")
    else:
        lines += ["_nodes of every scheduled graph of a 320-token prompt through "
                  f"{N_CTX} cells (per head: evictions move K/V rows), 4 decode steps and a score read; vanilla: "
                  "a 192-token prompt and the 4 steps. Off the GPU: the ops the scheduler ran elsewhere, "
                  "with their node counts_", "",
                  "| flash attn | run | nodes | on the GPU | off the GPU |", "|---|---|---:|---:|---|"]
        for fa in (False, True):
            for pol in (None, "a2sf", "h2o", "vatp"):
                counts = placement(model, pol, fa)
                on = sum(n for (backend, _), n in counts.items() if _is_gpu(backend))
                off = ", ".join(f"{op} x{n} ({backend})" for (backend, op), n in sorted(counts.items())
                                if not _is_gpu(backend))
                lines.append(f"| {'on' if fa else 'off'} | {pol or 'vanilla'} | {sum(counts.values())} | {on} "
                             f"| {off or '-'} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(report)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
