#!/usr/bin/env python3
"""What a2sf's state checksum costs (docs/STATE.md).

Prints, in MB/s of state:
  * the hash alone (llama_kv_policy_state_hash over a buffer in memory), beside a memcpy;
  * llama_state_get_data (save, checksummed) and the hash of the same bytes, so the
    share of the save that is the checksum;
  * llama_state_set_data of the state (load, verified) side by side with the same state
    in format version 2 (no checksum: the load without the check).

    .venv/bin/python scripts/bench_state.py                 # a generated model, 64 MB of K/V
    .venv/bin/python scripts/bench_state.py --model M.gguf --n-ctx 4096

Run it alone on the machine (flock /tmp/cpu.lock ... on a shared one).
"""
from __future__ import annotations

import argparse
import ctypes
import tempfile
import time
from pathlib import Path

import numpy as np


def best(f, repeat):
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="GGUF (default: a generated tiny llama, 8 layers, 8 KV heads of 64)")
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--hash-mb", type=int, default=256)
    args = ap.parse_args()

    from a2sf import Llama, _core  # first: binds llama_cpp to a2sf's libllama
    from a2sf.testing import state_format as sf

    import llama_cpp

    buf = np.random.default_rng(0).integers(0, 256, size=args.hash_mb << 20, dtype=np.uint8)
    dst = np.empty_like(buf)
    mb = buf.nbytes / 1e6
    t_hash = best(lambda: _core.state_hash(buf), args.repeat)
    t_copy = best(lambda: np.copyto(dst, buf), args.repeat)
    print(f"hash      {mb / t_hash:9.0f} MB/s   ({args.hash_mb} MiB in memory; memcpy {mb / t_copy:.0f} MB/s)")

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from a2sf.testing.tiny_gguf import write_tiny_llama

            model = str(write_tiny_llama(Path(tmp) / "bench.gguf", qtype="F32", n_layer=8, n_embd=512,
                                         n_head=8, n_head_kv=8, n_ff=512, n_ctx_train=args.n_ctx))
        llm = Llama(model, n_ctx=args.n_ctx, kv_policy="a2sf", n_threads=args.threads,
                    n_threads_batch=args.threads, n_batch=512, verbose=False)
        toks = np.random.default_rng(1).integers(3, min(300, llm.n_vocab()), size=args.n_ctx - 64).tolist()
        llm.eval(toks)
        ctx = llm.ctx
        n = llama_cpp.llama_state_get_size(ctx)
        out = (ctypes.c_uint8 * n)()
        t_save = best(lambda: llama_cpp.llama_state_get_data(ctx, out, n), args.repeat)
        data = bytes(out)
        t_sum = best(lambda: _core.state_hash(data), args.repeat)
        smb = n / 1e6
        print(f"save      {smb / t_save:9.0f} MB/s   ({smb:.1f} MB state; the checksum's hash of it alone "
              f"{smb / t_sum:.0f} MB/s = {100 * t_sum / t_save:.0f}% of the save)")

        old = sf.to_version2(data, "whole")
        src3 = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        src2 = (ctypes.c_uint8 * len(old)).from_buffer_copy(old)

        def load(src, size):
            got = llama_cpp.llama_state_set_data(ctx, src, size)
            assert got == size, (got, size)

        t3 = best(lambda: load(src3, len(data)), args.repeat)
        t2 = best(lambda: load(src2, len(old)), args.repeat)
        print(f"load      {smb / t3:9.0f} MB/s   verified (version 3) vs {smb / t2:.0f} MB/s without the check "
              f"(the same state as version 2): {1e3 * (t3 - t2) / smb:+.2f} ms per MB")


if __name__ == "__main__":
    main()
