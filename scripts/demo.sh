#!/usr/bin/env bash
# Set up (idempotent), then generate text with SmolLM2 under the A2SF policy.
#   bash scripts/demo.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec .venv/bin/python - <<'PY'
import a2sf
from a2sf.models import smollm2_path

print(f"a2sf {a2sf.__version__}, llama.cpp {a2sf.llama_cpp_commit()[:7]}")
llm = a2sf.Llama(str(smollm2_path()), n_ctx=256, n_threads=2, seed=1, verbose=False, kv_policy="a2sf")
prompt = "The three most important ideas in computer science are"
out = llm(prompt, max_tokens=64, temperature=0.0)
print(prompt + out["choices"][0]["text"])
PY
