"""Tiny random LLaMA-architecture GGUF files for tests.

The weights are random (deterministic per seed) and the tokenizer is a minimal
SentencePiece-style ("llama") vocabulary: the three special tokens, the 256
byte-fallback tokens and a few dozen word pieces, so any UTF-8 text tokenizes.
The model is useless as a language model, but it runs through exactly the code
paths of a real LLaMA in llama.cpp (RMSNorm, RoPE, GQA attention, SwiGLU) and
is small enough for :mod:`a2sf.testing.reference` to recompute in numpy.

Usage::

    from a2sf.testing.tiny_gguf import write_tiny_llama
    path = write_tiny_llama(tmp_path / "tiny.gguf", qtype="F32", seed=0)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np

from ..gguf_write import add_file_type, add_weight, finish, open_writer

__all__ = ["TinyConfig", "config_of", "tiny_vocab", "tiny_weights", "write_tiny_llama", "finish_tiny"]

# SentencePiece word-boundary marker
_SPACE = "\u2581"

# A few pieces so that ordinary English does not tokenize into bytes only.
_PIECES = [
    _SPACE, _SPACE + "the", _SPACE + "a", _SPACE + "of", _SPACE + "and",
    _SPACE + "to", _SPACE + "in", _SPACE + "is", _SPACE + "it", _SPACE + "that",
    "e", "t", "a", "o", "i", "n", "s", "h", "r", "d", "l", "u", "c", "m", "w",
    "f", "g", "y", "p", "b", "v", "k", ".", ",", "th", "er", "in", "on", "an",
    "re", "ed",
]


@dataclass(frozen=True)
class TinyConfig:
    """Shape of a tiny LLaMA."""

    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx_train: int = 512
    rope_freq_base: float = 10000.0
    rms_eps: float = 1e-5
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def tiny_vocab() -> Tuple[List[str], List[float], List[int]]:
    """(tokens, scores, token types) of the tiny SPM vocabulary (300 tokens)."""
    from gguf import TokenType

    tokens = ["<unk>", "<s>", "</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    scores = [0.0, 0.0, 0.0]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(TokenType.BYTE)
        scores.append(0.0)
    for i, piece in enumerate(_PIECES):
        tokens.append(piece)
        types.append(TokenType.NORMAL)
        # SPM merges prefer higher scores; longer pieces first
        scores.append(-float(i) / 100.0 + len(piece))
    return tokens, scores, [int(t) for t in types]


def tiny_weights(cfg: TinyConfig, n_vocab: int) -> Dict[str, np.ndarray]:
    """Random f32 weights in numpy layout (rows = outputs), keyed by GGUF tensor name."""
    rng = np.random.default_rng(cfg.seed)
    d, hd = cfg.n_embd, cfg.head_dim
    n_q, n_kv = cfg.n_head * hd, cfg.n_head_kv * hd

    def mat(rows: int, cols: int, scale: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w: Dict[str, np.ndarray] = {
        "token_embd.weight": rng.standard_normal((n_vocab, d)).astype(np.float32),
    }
    for il in range(cfg.n_layer):
        p = f"blk.{il}."
        w[p + "attn_norm.weight"] = norm(d)
        # larger Q/K so that attention is peaked rather than uniform
        w[p + "attn_q.weight"] = mat(n_q, d, 2.0)
        w[p + "attn_k.weight"] = mat(n_kv, d, 2.0)
        # spread of value norms across tokens matters for VATP
        w[p + "attn_v.weight"] = mat(n_kv, d, 1.0)
        w[p + "attn_output.weight"] = mat(d, n_q, 1.0)
        w[p + "ffn_norm.weight"] = norm(d)
        w[p + "ffn_gate.weight"] = mat(cfg.n_ff, d, 1.0)
        w[p + "ffn_up.weight"] = mat(cfg.n_ff, d, 1.0)
        w[p + "ffn_down.weight"] = mat(d, cfg.n_ff, 1.0)
    w["output_norm.weight"] = norm(d)
    w["output.weight"] = mat(n_vocab, d, 4.0)
    return w


def finish_tiny(w, tmp: Path, path: Path, vocab, weights: Dict[str, np.ndarray],
                outtype: str) -> Path:
    """Add the tiny SentencePiece-style vocabulary (``vocab``: :func:`tiny_vocab`),
    the file type and ``weights`` (2-D ones as ``outtype``) to a writer from
    :func:`a2sf.gguf_write.open_writer`, then write it to ``path``.

    The end of every tiny writer: what follows the architecture's own keys.
    """
    tokens, scores, types = vocab
    w.add_vocab_size(len(tokens))
    add_file_type(w, outtype)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    for name, arr in weights.items():
        add_weight(w, name, arr, outtype)
    return finish(w, tmp, path)


def write_tiny_llama(
    path: Union[str, os.PathLike],
    *,
    qtype: str = "F32",
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 512,
    rope_freq_base: float = 10000.0,
    rms_eps: float = 1e-5,
) -> Path:
    """Write a tiny random LLaMA GGUF to ``path`` and return the path.

    ``qtype`` is ``"F32"`` (every tensor f32: bit-comparable with the numpy
    reference) or ``"Q8_0"`` (2-D weights quantized, norms f32). The file's
    content depends only on the arguments.
    """
    qtype = qtype.upper()
    if qtype not in ("F32", "Q8_0", "F16"):
        raise ValueError(f"qtype must be F32, F16 or Q8_0, got {qtype!r}")
    cfg = TinyConfig(n_layer, n_embd, n_head, n_head_kv, n_ff, n_ctx_train,
                     rope_freq_base, rms_eps, seed)
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head and n_head by n_head_kv")
    if qtype == "Q8_0" and (n_embd % 32 or n_ff % 32):
        raise ValueError("Q8_0 needs n_embd and n_ff multiples of 32")

    vocab = tiny_vocab()
    weights = tiny_weights(cfg, len(vocab[0]))

    path = Path(path)
    w, tmp = open_writer(path, "llama", f"a2sf-tiny-llama-{qtype.lower()}-s{seed}",
                         n_ctx_train=n_ctx_train, n_embd=n_embd, n_layer=n_layer, n_ff=n_ff,
                         n_head=n_head, n_head_kv=n_head_kv)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(rope_freq_base)
    w.add_layer_norm_rms_eps(rms_eps)
    return finish_tiny(w, tmp, path, vocab, weights, qtype.lower())


def config_of(path: Union[str, os.PathLike]) -> TinyConfig:
    """Read back the TinyConfig of a GGUF written by :func:`write_tiny_llama`."""
    import gguf

    r = gguf.GGUFReader(str(path))

    def val(key: str):
        f = r.fields[key]
        return f.contents()

    return TinyConfig(
        n_layer=int(val("llama.block_count")),
        n_embd=int(val("llama.embedding_length")),
        n_head=int(val("llama.attention.head_count")),
        n_head_kv=int(val("llama.attention.head_count_kv")),
        n_ff=int(val("llama.feed_forward_length")),
        n_ctx_train=int(val("llama.context_length")),
        rope_freq_base=float(val("llama.rope.freq_base")),
        rms_eps=float(val("llama.attention.layer_norm_rms_epsilon")),
    )


if __name__ == "__main__":  # pragma: no cover
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--qtype", default="F32")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(write_tiny_llama(a.path, qtype=a.qtype, seed=a.seed))
