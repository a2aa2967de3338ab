"""Quantize a GGUF model with libllama's ``llama_model_quantize`` (the library
a2sf ships, so architectures added by a2sf's patches, e.g. ``opt``, work).

    python -m a2sf.quantize in.gguf out.gguf Q4_K_M [--threads N]

Inputs are checked here first (file exists and is GGUF, type name known,
output different from input), so a mistake is a Python exception, not an
abort inside llama.cpp.

Note: K-quants (Q*_K*) work on blocks of 256 values; tensors whose rows are
not a multiple of 256 are quantized by llama.cpp to a fallback type (it logs
which). Q4_0/Q4_1/Q5_*/Q8_0 need rows that are multiples of 32.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Union

__all__ = ["QUANT_TYPES", "quantize", "main"]

PathLike = Union[str, os.PathLike]

# name accepted on the command line -> llama_ftype name in llama_cpp
QUANT_TYPES: Dict[str, str] = {
    "F32": "LLAMA_FTYPE_ALL_F32",
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
    "BF16": "LLAMA_FTYPE_MOSTLY_BF16",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "Q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "Q5_K_S": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q3_K_S": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "Q3_K_L": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
    "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K",
}


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (magic {magic!r})")


def quantize(src: PathLike, dst: PathLike, qtype: str, *, n_threads: int = 0,
             allow_requantize: bool = False) -> Path:
    """Quantize GGUF ``src`` to ``dst`` as ``qtype`` (a key of
    :data:`QUANT_TYPES`, case-insensitive); return ``dst``.

    ``allow_requantize`` lets already-quantized tensors be quantized again
    (quality loss; llama.cpp refuses by default).
    """
    import a2sf  # noqa: F401  (binds llama_cpp to a2sf's libllama)
    import llama_cpp

    if not isinstance(qtype, str):
        raise TypeError(f"qtype must be a string such as 'Q4_K_M', got {qtype!r}")
    key = qtype.upper()
    if key not in QUANT_TYPES:
        raise ValueError(f"unknown quantization type {qtype!r}; known: {', '.join(QUANT_TYPES)}")
    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 0:
        raise ValueError(f"n_threads must be an int >= 0 (0 = all cores), got {n_threads!r}")
    src, dst = Path(src), Path(dst)
    _check_gguf(src)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: output must differ from the input")
    if dst.is_dir():
        raise ValueError(f"{dst}: is a directory, give a file name")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"{dst.parent}: output directory does not exist")

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[key])
    params.nthread = n_threads
    params.allow_requantize = allow_requantize
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(
            f"llama_model_quantize failed (code {rc}) for {src} -> {key}; llama.cpp's log above says why "
            "(e.g. an already quantized input needs allow_requantize=True)")
    os.replace(tmp, dst)
    return dst


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m a2sf.quantize",
                                 description="Quantize a GGUF model with a2sf's libllama.")
    ap.add_argument("src", help="input GGUF (f32/f16 for best results)")
    ap.add_argument("dst", help="output GGUF")
    ap.add_argument("qtype", help="one of: " + ", ".join(QUANT_TYPES))
    ap.add_argument("--threads", type=int, default=0, help="threads (0 = all cores)")
    ap.add_argument("--allow-requantize", action="store_true",
                    help="quantize tensors that are already quantized")
    a = ap.parse_args(argv)
    try:
        out = quantize(a.src, a.dst, a.qtype, n_threads=a.threads, allow_requantize=a.allow_requantize)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f"a2sf.quantize: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
