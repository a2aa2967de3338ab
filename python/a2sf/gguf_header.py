"""One small reader of GGUF headers: the training context before a load, and why a load failed.

``gguf.GGUFReader`` parses every value of the file (the tokenizer's tens of
thousands of strings included) and takes ~1.8 s on the 100 MB SmolLM2 model;
this reader takes ~0.1 s for the whole header and stops early when asked
(``until``), so :func:`context_length` costs well under a millisecond. Array
values are skipped, not decoded (None in ``metadata``). The ``gguf`` package
still provides the tensor type sizes and the architecture names.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple

__all__ = ["GGUFFormatError", "GGUFHeader", "read_gguf_header", "context_length", "diagnose_model_file"]

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The file is not a readable GGUF header; the message says why (a sentence)."""


@dataclass
class GGUFHeader:
    version: int
    size: int  # of the file, in bytes
    metadata: Dict[str, Any] = field(default_factory=dict)  # arrays: None
    #: (name, dims, ggml type id, offset in the data section); empty if not read
    tensors: List[Tuple[str, Tuple[int, ...], int, int]] = field(default_factory=list)
    data_start: int = 0  # where the tensor data begins (0 if the tensors were not read)


class _Reader:
    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size = f, size

    def take(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise EOFError
        return b

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def count(self) -> int:
        (n,) = self.unpack("<Q")
        if n > self.size:  # more items than bytes: the file ends inside them
            raise EOFError
        return n

    def string(self) -> str:
        return self.take(self.count()).decode("utf-8", errors="replace")

    def value(self, t: int) -> Any:
        if t in _SCALARS:
            return self.unpack(_SCALARS[t])[0]
        if t == _STRING:
            return self.string()
        if t == _ARRAY:
            (it,) = self.unpack("<I")
            n = self.count()
            if it in _SCALARS:  # skipped without decoding
                nbytes = n * struct.calcsize(_SCALARS[it])
                if self.f.tell() + nbytes > self.size:
                    raise EOFError
                self.f.seek(nbytes, os.SEEK_CUR)
            else:
                for _ in range(n):
                    self.value(it)
            return None
        raise GGUFFormatError(f"the GGUF header is corrupt (unknown GGUF value type {t})")


def read_gguf_header(
    path: str,
    *,
    tensors: bool = True,
    until: Optional[Callable[[Dict[str, Any]], bool]] = None,
) -> GGUFHeader:
    """The metadata (and tensor infos) of the GGUF file ``path``.

    ``until(metadata)`` is asked after each key: True stops reading there (the
    tensors are then not read). Raises OSError if the file cannot be read and
    :class:`GGUFFormatError` (a ValueError whose message is a sentence) if it is
    not a complete GGUF header.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(4)
        if size == 0:
            raise GGUFFormatError("the file is empty")
        if magic != b"GGUF":
            raise GGUFFormatError(f"it is not a GGUF file (starts with {magic!r}, not b'GGUF')")
        r = _Reader(f, size)
        try:
            (version,) = r.unpack("<I")
            n_tensors, n_kv = r.unpack("<QQ")
            if n_kv > size or n_tensors > size:
                raise GGUFFormatError(
                    f"the GGUF header is corrupt ({n_kv} keys, {n_tensors} tensors in {size} bytes)"
                )
            header = GGUFHeader(version=version, size=size)
            for _ in range(n_kv):
                key = r.string()
                (t,) = r.unpack("<I")
                header.metadata[key] = r.value(t)
                if until is not None and until(header.metadata):
                    return header
            if not tensors:
                return header
            for _ in range(n_tensors):
                name = r.string()
                (n_dims,) = r.unpack("<I")
                dims = r.unpack(f"<{n_dims}Q")
                (ttype,) = r.unpack("<I")
                (offset,) = r.unpack("<Q")
                header.tensors.append((name, tuple(int(d) for d in dims), int(ttype), int(offset)))
        except (EOFError, struct.error):
            raise GGUFFormatError(
                f"the GGUF file is truncated ({size} bytes end inside its header)"
            ) from None
        align = header.metadata.get("general.alignment", 32) or 32
        header.data_start = (f.tell() + align - 1) // align * align
    return header


def context_length(path: str) -> Optional[int]:
    """``<arch>.context_length`` from a GGUF header, or None if it can't be read."""

    def found(meta: Dict[str, Any]) -> bool:
        arch = meta.get("general.architecture")
        return arch is not None and f"{arch}.context_length" in meta

    try:
        header = read_gguf_header(path, tensors=False, until=found)
    except (OSError, ValueError):
        return None
    if header.version < 2 or not found(header.metadata):
        return None
    return int(header.metadata[f"{header.metadata['general.architecture']}.context_length"])


def diagnose_model_file(path: Any) -> str:
    """Why llama.cpp may have refused to load ``path``: a sentence, or "" if the
    file looks like a complete GGUF of a known architecture.

    Only called after a load failed, to turn llama.cpp's "Failed to load model"
    into a message that names the problem (not a GGUF, truncated, unknown
    architecture).
    """
    import gguf  # tensor type sizes and llama.cpp's architecture names

    try:
        path = os.fspath(path)
    except TypeError:
        return ""
    if os.path.isdir(path):
        return "it is a directory, not a GGUF file"
    try:
        header = read_gguf_header(path)
    except OSError as e:
        return f"it cannot be read ({e.strerror})"
    except GGUFFormatError as e:
        return str(e)
    data_end = 0
    for _name, dims, ttype, offset in header.tensors:
        try:
            block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            return f"a tensor has an unknown type id {ttype}"
        n_el = 1
        for d in dims:
            n_el *= d
        data_end = max(data_end, offset + n_el // block * nbytes)
    if header.data_start + data_end > header.size:
        return (f"the GGUF file is truncated: its tensors need {header.data_start + data_end} bytes, "
                f"the file has {header.size}")
    arch = header.metadata.get("general.architecture")
    if arch is None:
        return "the GGUF has no general.architecture"
    if arch not in set(gguf.MODEL_ARCH_NAMES.values()):
        return f"its architecture {arch!r} is not one llama.cpp supports"
    return ""
