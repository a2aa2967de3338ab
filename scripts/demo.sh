#!/usr/bin/env bash
# Set up (idempotent), then show eviction at work: SmolLM2 reads a text several times
# longer than its 256-cell KV cache under the A2SF policy, answers a question about it,
# and prints one line of what the cache did.
#   bash scripts/demo.sh [--no-text]
# The text is the opening of Jane Austen's *Emma* from ../shared/data/austen beside the
# repository (where the evaluation finds it); without it (or with --no-text) SmolLM2 writes a
# story long enough to run past the cache instead.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec .venv/bin/python - "$@" <<'PY'
import sys

import a2sf
from a2sf.bench import kv_bytes_per_cell
from a2sf.eval.data import austen_dir
from a2sf.models import smollm2_path

N_CTX = 256  # cells in the KV cache: all the model attends over, whatever the length

print(f"a2sf {a2sf.__version__}, llama.cpp {a2sf.llama_cpp_commit()[:7]}")
llm = a2sf.Llama(str(smollm2_path()), n_ctx=N_CTX, n_threads=2, seed=1, verbose=False, kv_policy="a2sf")
try:
    if "--no-text" in sys.argv[1:]:  # the path taken where the novels are missing
        raise FileNotFoundError
    emma = (austen_dir() / "emma.txt").read_text()
    start = emma.index("Emma Woodhouse, handsome, clever, and rich")
    text = emma[start:start + 4500]  # about 1100 tokens: four caches' worth
    question, max_tokens = "Summarize this text in one sentence.", 64
    print(f"[the first {len(text)} characters of Emma]")
    content = text + "\n\n" + question
except FileNotFoundError:
    question, max_tokens = "Write a long story about a lighthouse keeper and the sea.", 600
    content = question  # the generation alone runs past the cache
print(f"User: {question}")
out = llm.create_chat_completion([{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0.0)
print(f"SmolLM2: {out['choices'][0]['message']['content'].strip()}")

s = llm.kv_stats()
n_tokens = out["usage"]["total_tokens"]  # what a cache that never evicts would hold
kv, extra = kv_bytes_per_cell(llm)  # bytes per cell: F16 K+V, F32 scores and value norms
mib = lambda cells: cells * (kv + extra) / 2**20  # noqa: E731
print(f"stats: {s['evictions']} evictions ({s['cells_evicted']} cells freed), {llm.kv_n_cells()} cells kept "
      f"of {n_tokens} tokens, KV {mib(llm.n_ctx()):.1f} MiB vs {mib(n_tokens):.1f} MiB for the full cache")
PY
