"""Writing GGUF weights and files, shared by the OPT converter and the tiny test models."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def add_weight(writer, name: str, arr: np.ndarray, outtype: str) -> None:
    """Add ``arr`` as ``f32``, ``f16`` or ``q8_0``.

    1-D tensors (norms, biases) stay F32, as llama.cpp's converters write them;
    rows that are not a multiple of Q8_0's 32-element block are written F16.
    """
    import gguf

    if arr.ndim == 1 or outtype == "f32":
        writer.add_tensor(name, arr)
    elif outtype == "f16" or arr.shape[-1] % 32:
        writer.add_tensor(name, arr.astype(np.float16))
    else:
        q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)


def finish(writer, tmp: Path, path: Path) -> Path:
    """Write everything added to ``writer`` (opened on ``tmp``), then move it to ``path``."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path
