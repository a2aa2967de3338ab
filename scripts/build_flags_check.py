#!/usr/bin/env python3
"""Prefill and decode speed of SmolLM2 on two (or more) builds of the native
libraries, side by side in one run (docs/BUILD.md, "CPU features and AMX").

    .venv/bin/python scripts/build_flags_check.py \\
        --lib native-no-amx=.venv/lib/python3.11/site-packages/a2sf/lib \\
        --lib explicit-isa=/tmp/nonative/a2sf/lib --reps 3 --out results/build_flags.md

Each measurement runs in its own process with llama-cpp-python bound to the
given directory (LLAMA_CPP_LIB_PATH), one thread, no policy; the builds are
interleaved rep by rep and timed with the process's CPU-time clock, so a busy
machine disturbs the ratio less than wall time would.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

_CHILD = r"""
import json, os, sys, time
import llama_cpp
path, n_prompt, n_gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = llama_cpp.Llama(path, n_ctx=1024, n_batch=512, n_threads=1, verbose=False)
toks = llm.tokenize(b"It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. " * 40)[:n_prompt]
t0 = time.process_time(); llm.eval(toks); t1 = time.process_time()
for _ in range(n_gen):
    llm.eval([llm.sample(temp=0.0)])
t2 = time.process_time()
print(json.dumps({"prefill": n_prompt / (t1 - t0), "decode": n_gen / (t2 - t1)}))
"""


def measure(lib: str, model: str, n_prompt: int, n_gen: int) -> dict:
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=lib, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _CHILD, model, str(n_prompt), str(n_gen)],
                       capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"{lib}: the run failed (exit {r.returncode}): {r.stderr.strip()[-400:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", action="append", required=True, metavar="NAME=DIR",
                    help="a build's library directory (the first is the baseline of the ratios)")
    ap.add_argument("--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    args = ap.parse_args(argv)
    libs = [x.split("=", 1) for x in args.lib]
    if any(len(x) != 2 for x in libs):
        ap.error("--lib takes NAME=DIR")
    if args.model is None:
        from a2sf.models import smollm2_path

        args.model = str(smollm2_path())
    res = {name: [] for name, _ in libs}
    for _ in range(args.reps):
        for name, d in libs:
            res[name].append(measure(d, args.model, args.prompt, args.gen))
    base = libs[0][0]
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("prefill", "decode")} for n, rs in res.items()}
    cmd = "python scripts/build_flags_check.py " + " ".join(f"--lib {n}=..." for n, _ in libs) + \
        f" --prompt {args.prompt} --gen {args.gen} --reps {args.reps}"
    lines = [f"SmolLM2-135M Q4_1, 1 thread, CPU-time clock, median of {args.reps} interleaved reps, "
             f"prefill {args.prompt} tokens, decode {args.gen} tokens. Command: `{cmd}`", "",
             "| build | prefill t/s | decode t/s | prefill / first | decode / first |", "|---|---:|---:|---:|---:|"]
    for n, _ in libs:
        m = med[n]
        lines.append(f"| {n} | {m['prefill']:.1f} | {m['decode']:.1f} | {m['prefill'] / med[base]['prefill']:.3f} | "
                     f"{m['decode'] / med[base]['decode']:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
