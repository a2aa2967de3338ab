"""An independent reader of a2sf's llama.cpp state bytes, for tests (docs/STATE.md).

:func:`parse` walks a state as ``llama_state_get_data`` (``kind="whole"``) or
``llama_state_seq_get_data`` (``kind="seq"``) wrote it, for a plain KV cache (one
``llama_kv_cache``, no M-RoPE cell extension; the tiny llama and SmolLM2), and returns
every field with its offset, so tests can damage chosen fields, and :func:`state_hash`
is a pure-Python version of the checksum's hash (llama-kv-state.cpp), to check the
stored checksum and to write a consistent one after an edit (:func:`reseal`).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional

MASK = (1 << 64) - 1
M1 = 0xC2B2AE3D27D4EB4F
M2 = 0x94D049BB133111EB
GOLDEN = 0x9E3779B97F4A7C15

STATE_MAGIC = 0x46533241  # "A2SF"
CELLS_MAGIC = 0x43533241  # "A2SC"
SEQ_IO_MAGIC = 0xAF143CD8  # llama.cpp's sequence state magic


def _step(lane: int, w: int) -> int:
    x = ((lane ^ w) * M1) & MASK
    return x ^ (x >> 31)


def _fold(h: int) -> int:
    h ^= h >> 33
    h = (h * M2) & MASK
    h ^= h >> 29
    h = (h * M1) & MASK
    h ^= h >> 32
    return h


def state_hash(data: bytes) -> int:
    """The checksum's 64-bit hash of ``data`` (written from the description in
    docs/STATE.md, not from the C++)."""
    data = bytes(data)
    lanes = [((i + 1) * GOLDEN) & MASK for i in range(4)]
    n_blocks = len(data) // 32
    for w0, w1, w2, w3 in struct.iter_unpack("<4Q", data[: 32 * n_blocks]):
        lanes[0] = _step(lanes[0], w0)
        lanes[1] = _step(lanes[1], w1)
        lanes[2] = _step(lanes[2], w2)
        lanes[3] = _step(lanes[3], w3)
    tail = data[32 * n_blocks:]
    for i in range((len(tail) + 7) // 8):
        lanes[i] = _step(lanes[i], int.from_bytes(tail[8 * i: 8 * i + 8].ljust(8, b"\0"), "little"))
    h = _fold((len(data) * M2) & MASK)
    for lane in lanes:
        h = _fold(h ^ lane)
    return h


@dataclass
class Field:
    name: str
    offset: int
    size: int
    fmt: str = ""          # struct format of a scalar ("<I", "<i", "<Q", "<q"), "" for a byte run
    length: bool = False   # a count or length that sizes what follows


@dataclass
class Layout:
    kind: str
    version: int
    fields: List[Field] = field(default_factory=list)
    a2sf_start: int = 0                  # offset of the A2SF magic: the checksum covers [a2sf_start, checksum)
    checksum: Optional[int] = None       # offset of the u64 checksum (version 3)
    size: int = 0

    def __getitem__(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def names(self, prefix: str) -> List[str]:
        return [f.name for f in self.fields if f.name.startswith(prefix)]

    def value(self, data: bytes, name: str):
        f = self[name]
        return struct.unpack_from(f.fmt, data, f.offset)[0]

    def length_fields(self) -> List[Field]:
        return [f for f in self.fields if f.length]

    def kv_data(self) -> List[Field]:
        """The K and V rows (llama.cpp's tensor data)."""
        return [f for f in self.fields if f.name.endswith((".k", ".v"))]


class _Cursor:
    def __init__(self, data: bytes, layout: Layout):
        self.data, self.pos, self.layout = data, 0, layout

    def scalar(self, name: str, fmt: str, length: bool = False):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise ValueError(f"state ends inside {name}")
        v = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.layout.fields.append(Field(name, self.pos, size, fmt, length))
        self.pos += size
        return v

    def run(self, name: str, size: int):
        if size < 0 or self.pos + size > len(self.data):
            raise ValueError(f"state ends inside {name}")
        self.layout.fields.append(Field(name, self.pos, size))
        self.pos += size


def parse(data: bytes, kind: str) -> Layout:
    """Fields of a whole-context (``"whole"``) or sequence (``"seq"``) state; raises
    ValueError if the bytes do not follow the layout."""
    data = bytes(data)
    lay = Layout(kind=kind, version=0, size=len(data))
    c = _Cursor(data, lay)
    if kind == "whole":
        n = c.scalar("arch_len", "<I", length=True)
        c.run("arch", n)
    elif kind == "seq":
        if c.scalar("io_magic", "<I") != SEQ_IO_MAGIC:
            raise ValueError("not a sequence state")
        c.scalar("io_seq_id", "<i")
    else:
        raise ValueError(f"kind must be 'whole' or 'seq', got {kind!r}")

    lay.a2sf_start = c.pos
    if c.scalar("a2sf.magic", "<I") != STATE_MAGIC:
        raise ValueError("no a2sf header")
    lay.version = ver = c.scalar("a2sf.version", "<I")
    if ver not in (2, 3):
        raise ValueError(f"a2sf state version {ver}")
    c.scalar("a2sf.flags", "<I")
    c.scalar("a2sf.n_layer", "<I", length=True)
    if ver >= 3:
        c.scalar("a2sf.seq_id", "<i")

    n_stream = c.scalar("n_stream", "<I", length=True)
    for s in range(n_stream):
        p = f"s{s}"
        n_cells = c.scalar(f"{p}.cell_count", "<I", length=True)
        if n_cells == 0:
            continue
        for i in range(n_cells):
            c.scalar(f"{p}.cell{i}.pos", "<i")
            n_seq_id = c.scalar(f"{p}.cell{i}.n_seq_id", "<I", length=True)
            for j in range(n_seq_id):
                c.scalar(f"{p}.cell{i}.seq{j}", "<i")
        v_trans = c.scalar(f"{p}.v_trans", "<I")
        n_layer = c.scalar(f"{p}.n_layer", "<I", length=True)
        for il in range(n_layer):
            c.scalar(f"{p}.l{il}.k_type", "<i")
            row = c.scalar(f"{p}.l{il}.k_size_row", "<Q", length=True)
            c.run(f"{p}.l{il}.k", row * n_cells)
        for il in range(n_layer):
            c.scalar(f"{p}.l{il}.v_type", "<i")
            if not v_trans:
                row = c.scalar(f"{p}.l{il}.v_size_row", "<Q", length=True)
                c.run(f"{p}.l{il}.v", row * n_cells)
            else:
                el = c.scalar(f"{p}.l{il}.v_size_el", "<I", length=True)
                n_embd = c.scalar(f"{p}.l{il}.n_embd_v_gqa", "<I", length=True)
                c.run(f"{p}.l{il}.v", el * n_embd * n_cells)
        # a2sf's block for these cells
        if c.scalar(f"{p}.a2sc.magic", "<I") != CELLS_MAGIC:
            raise ValueError("no a2sf cell block")
        n_scored = c.scalar(f"{p}.a2sc.n_layer", "<I", length=True)
        if ver >= 3:
            c.scalar(f"{p}.a2sc.n_cells", "<I", length=True)
        for il in range(n_scored):
            nh = c.scalar(f"{p}.a2sc.l{il}.n_head_kv", "<I", length=True)
            c.run(f"{p}.a2sc.l{il}.score", 4 * nh * n_cells)
            c.run(f"{p}.a2sc.l{il}.vnorm", 4 * nh * n_cells)
        n_units = c.scalar(f"{p}.a2sc.n_units", "<I", length=True)
        if n_units:
            c.scalar(f"{p}.a2sc.diverged", "<I")
            for k in range(n_units):
                c.run(f"{p}.a2sc.unit{k}.pos", 4 * n_cells)
                c.run(f"{p}.a2sc.unit{k}.born", 8 * n_cells)
            n_seq = c.scalar(f"{p}.a2sc.n_seq", "<I", length=True)
            for j in range(n_seq):
                c.scalar(f"{p}.a2sc.nq{j}.seq", "<q")
                c.scalar(f"{p}.a2sc.nq{j}.n", "<q")

    has_rng = c.scalar("trailer.has_rng", "<I")
    if has_rng:
        n = c.scalar("trailer.rng_len", "<I", length=True)
        c.run("trailer.rng", n)
    if ver >= 3:
        lay.checksum = c.pos
        c.scalar("trailer.checksum", "<Q")
    if c.pos != len(data):
        raise ValueError(f"{len(data) - c.pos} bytes after the trailer")
    return lay


def stored_checksum(data: bytes, lay: Layout) -> int:
    return struct.unpack_from("<Q", data, lay.checksum)[0]


def computed_checksum(data: bytes, lay: Layout, tokens: Optional[List[int]] = None) -> int:
    """What the checksum of ``data`` must be (``tokens``: the list a state file holds before it)."""
    prefix = b""
    if tokens is not None:
        prefix = struct.pack("<I", len(tokens)) + struct.pack(f"<{len(tokens)}i", *tokens)
    return state_hash(prefix + bytes(data[lay.a2sf_start: lay.checksum]))


def reseal(data: bytes, kind: str, lay: Optional[Layout] = None) -> bytes:
    """``data`` with its checksum recomputed: an edited state that passes the integrity
    check, so that only the field checks can refuse it. ``lay``: the layout of the state
    before an edit of a length field (which the edited bytes no longer follow)."""
    lay = parse(data, kind) if lay is None else lay
    out = bytearray(data)
    struct.pack_into("<Q", out, lay.checksum, computed_checksum(out, lay))
    return bytes(out)


def put(data: bytes, lay: Layout, name: str, value) -> bytes:
    """``data`` with field ``name`` set to ``value`` (checksum not updated)."""
    f = lay[name]
    out = bytearray(data)
    struct.pack_into(f.fmt, out, f.offset, value)
    return bytes(out)


def to_version2(data: bytes, kind: str) -> bytes:
    """The same state in format version 2 (no sequence id, no cell count, no checksum), as a
    libllama of before the checksum wrote it."""
    lay = parse(data, kind)
    drop: Dict[int, int] = {}
    for f in lay.fields:
        if f.name == "a2sf.seq_id" or f.name.endswith(".a2sc.n_cells") or f.name == "trailer.checksum":
            drop[f.offset] = f.size
    out = bytearray()
    pos = 0
    for off in sorted(drop):
        out += data[pos:off]
        pos = off + drop[off]
    out += data[pos:]
    struct.pack_into("<I", out, lay["a2sf.version"].offset, 2)
    return bytes(out)
