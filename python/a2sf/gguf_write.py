"""Writing GGUF weights and files, shared by the OPT converter and the tiny test models."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# outtype -> gguf.LlamaFileType member name (gguf is imported where it is used)
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}


def open_writer(path: Path, arch: str, name: str, *, n_ctx_train: int, n_embd: int,
                n_layer: int, n_ff: int, n_head: int, n_head_kv: int):
    """A ``gguf.GGUFWriter`` for ``arch`` on a temporary file beside ``path``,
    holding the model name and the transformer shape every architecture has;
    returns ``(writer, tmp)``. :func:`finish` moves ``tmp`` to ``path``, so an
    interrupted write never leaves a truncated model under the final name.
    """
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(name)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    return w, tmp


def add_file_type(writer, outtype: str) -> None:
    """The file type (``f32``, ``f16`` or ``q8_0``: what :func:`add_weight`
    writes the 2-D weights as) and the quantization version."""
    import gguf

    writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[outtype])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


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
