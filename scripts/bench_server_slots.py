#!/usr/bin/env python3
"""Tokens/s of llama-server (build/server, scripts/build-server.sh) per slot and in
total, for N parallel slots with and without a policy, at equal cache (-c).

    .venv/bin/python scripts/bench_server_slots.py [--bin PATH] [--ctx 1024] [--slots 1,2,4]
        [--policies none,a2sf] [--max-tokens 128] [--threads 2] [--out results/server_slots.md]

N requests at once (one per slot), each a ~100-token prompt and --max-tokens generated
tokens (ignore_eos), so that without a policy a request fits in a slot's cells at N=4
(1024/4 = 256 cells); with one, the same requests, plus the policy's scoring. Per slot:
the mean of the server's own predicted_per_second; total: generated tokens of all
requests / wall time of the round. One round per row (no repetition).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=1200) as r:
        return json.loads(r.read())


def prompt(i: int) -> str:
    return " ".join(f"Fact {k}: the box {k + i} holds {k * 3 + i} marbles." for k in range(8)) + \
        " Write a long story about these boxes."


def run(binary, model, n, policy, ctx, max_tokens, threads):
    port = free_port()
    args = [binary, "-m", model, "-np", str(n), "-c", str(ctx), "-t", str(threads), "--host", "127.0.0.1",
            "--port", str(port)]
    if policy != "none":
        args += ["--kv-policy", policy]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        body = lambda i: {"prompt": prompt(i), "n_predict": max_tokens, "temperature": 0, "ignore_eos": True,
                          "cache_prompt": False}
        post(base + "/completion", {**body(99), "n_predict": 4})  # warm-up
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(n) as ex:
            res = list(ex.map(lambda i: post(base + "/completion", body(i)), range(n)))
        wall = time.perf_counter() - t0
        per_slot = sum(r["timings"]["predicted_per_second"] for r in res) / n
        n_gen = sum(r["timings"]["predicted_n"] for r in res)
        return per_slot, n_gen / wall, n_gen
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default=os.environ.get("A2SF_SERVER_BIN", str(ROOT / "build/server/bin/llama-server")))
    ap.add_argument("--model", default=None)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--slots", default="1,2,4")
    ap.add_argument("--policies", default="none,a2sf")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.model is None:
        a.model = subprocess.run([sys.executable, "-m", "a2sf.models", "path", "smollm2"], capture_output=True,
                                 text=True, check=True).stdout.strip().splitlines()[-1]
    lines = [f"`{' '.join(['scripts/bench_server_slots.py'] + (argv if argv is not None else sys.argv[1:]))}` "
             f"(SmolLM2-135M Q4_1, -c {a.ctx}, -t {a.threads}, {a.max_tokens} generated tokens per request)", "",
             "| slots | policy | tokens/s per slot | tokens/s total | generated |", "| ---: | --- | ---: | ---: | ---: |"]
    for n in [int(x) for x in a.slots.split(",")]:
        for p in a.policies.split(","):
            per, tot, n_gen = run(a.bin, a.model, n, p, a.ctx, a.max_tokens, a.threads)
            lines.append(f"| {n} | {p} | {per:.1f} | {tot:.1f} | {n_gen} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if a.out:
        Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
