"""The native library's smoke run, meant for a subprocess.

    python -m a2sf.testing.smoke [model.gguf]

Loads SmolLM2 (or the model given; a tiny random Q8_0 model when SmolLM2 is
not installed) with a policy, evaluates a prompt longer than the cache and
samples a few tokens: the matrix products, the scoring ops and an eviction all
run once. A crash in a native kernel (SIGILL in ggml's AMX code on VMs that do
not keep the tile state, say) then kills this process, not a test run:
:func:`check` runs it and turns a death by signal into one line.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

__all__ = ["run", "check"]


def _model_path(tmp: str) -> str:
    try:
        from a2sf.models import smollm2_path

        return str(smollm2_path(install=False))
    except Exception:  # not installed: a tiny random model, quantized like SmolLM2's blocks
        from a2sf.testing.tiny_gguf import write_tiny_llama

        return str(write_tiny_llama(os.path.join(tmp, "smoke-q8_0.gguf"), qtype="Q8_0", seed=0))


def run(model_path: Optional[str] = None) -> int:
    from a2sf import Llama

    with tempfile.TemporaryDirectory() as tmp:
        path = model_path or _model_path(tmp)
        llm = Llama(path, n_ctx=128, n_threads=1, kv_policy="a2sf", verbose=False)
        llm.eval(llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 20))
        out = llm.create_completion("The capital of France is", max_tokens=4, temperature=0.0)
        print(f"smoke: {llm.kv_stats()['evictions']} evictions, text {out['choices'][0]['text']!r}")
        llm.close()
    return 0


def check(argv: Optional[Sequence[str]] = None, timeout: float = 300.0) -> Optional[str]:
    """Run the smoke run (or ``argv``) in a subprocess; None if it ran, else one line saying how it died."""
    argv = list(argv) if argv is not None else [sys.executable, "-m", "a2sf.testing.smoke"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode == 0:
        return None
    if r.returncode < 0:
        try:
            name = signal.Signals(-r.returncode).name
        except ValueError:
            name = f"signal {-r.returncode}"
        return (f"the native library died with {name} in a plain SmolLM2 run (python -m a2sf.testing.smoke); "
                "this build does not run on this CPU: see docs/BUILD.md, 'Crashes in native kernels (AMX)', "
                "and paste `a2sf info` into the bug report")
    tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
    return f"the smoke run (python -m a2sf.testing.smoke) failed with exit code {r.returncode}: {tail}"


if __name__ == "__main__":
    sys.exit(run(sys.argv[1] if len(sys.argv) > 1 else None))
