"""Hugging Face checkpoint -> GGUF converters for architectures llama.cpp lacks.

    python -m a2sf.convert opt <hf_dir> <out.gguf> [--outtype f32|f16|q8_0]

Only local directories are read (no model hub). See :mod:`a2sf.convert.opt`.
"""
from __future__ import annotations

from .opt import ConversionError, OPTConfig, convert_opt, read_opt_config

__all__ = ["ConversionError", "OPTConfig", "convert_opt", "read_opt_config", "ARCHITECTURES"]

# converter name -> function(hf_dir, out_path, outtype=...)
ARCHITECTURES = {"opt": convert_opt}
