"""Tiny random Gemma 3 GGUF files: a sliding-window (iSWA) model for tests.

Gemma 2/3 alternate sliding-window and global attention layers, and llama.cpp
gives them a ``llama_kv_cache_iswa``: the sliding-window (SWA) layers in one
cache, the global layers in the base cache, where a2sf scores and evicts. This
writer makes a model of llama.cpp's ``gemma3`` architecture small enough for
:class:`a2sf.testing.reference_gemma3.ReferenceGemma3` to recompute in numpy:
by default 4 layers, sliding window 8 and pattern 4 (layers 0..2 SWA, layer 3
global), 4 query / 2 KV heads, the tiny SentencePiece vocabulary of
:mod:`a2sf.testing.tiny_gguf`, tied output embeddings.

Usage::

    from a2sf.testing.tiny_gemma3 import write_tiny_gemma3
    path = write_tiny_gemma3(tmp_path / "tiny-gemma3.gguf", seed=0)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Union

import numpy as np

from ..gguf_write import open_writer
from .tiny_gguf import finish_tiny, tiny_vocab

__all__ = ["write_tiny_gemma3", "tiny_gemma3_weights"]


def tiny_gemma3_weights(n_layer: int, n_embd: int, n_head: int, n_head_kv: int, n_ff: int,
                        n_vocab: int, seed: int) -> Dict[str, np.ndarray]:
    """Random f32 weights in numpy layout (rows = outputs), keyed by GGUF tensor name.

    The norm weights are what llama.cpp multiplies by (Gemma's ``1 + w``: its
    converter stores the sum)."""
    rng = np.random.default_rng(seed)
    hd = n_embd // n_head

    def mat(rows: int, cols: int, scale: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    # embeddings are scaled by sqrt(n_embd) in the graph: keep them small here
    w: Dict[str, np.ndarray] = {
        "token_embd.weight": (rng.standard_normal((n_vocab, n_embd)) / np.sqrt(n_embd)).astype(np.float32),
    }
    for il in range(n_layer):
        p = f"blk.{il}."
        w[p + "attn_norm.weight"] = norm(n_embd)
        w[p + "attn_q.weight"] = mat(n_head * hd, n_embd, 1.0)
        w[p + "attn_k.weight"] = mat(n_head_kv * hd, n_embd, 1.0)
        w[p + "attn_v.weight"] = mat(n_head_kv * hd, n_embd, 1.0)
        # Q and K are RMS-normalised per head, then Q scaled by 1/sqrt(head_dim):
        # larger norm weights make attention peaked rather than uniform
        w[p + "attn_q_norm.weight"] = (3.0 * norm(hd)).astype(np.float32)
        w[p + "attn_k_norm.weight"] = (3.0 * norm(hd)).astype(np.float32)
        w[p + "attn_output.weight"] = mat(n_embd, n_head * hd, 1.0)
        w[p + "post_attention_norm.weight"] = norm(n_embd)
        w[p + "ffn_norm.weight"] = norm(n_embd)
        w[p + "ffn_gate.weight"] = mat(n_ff, n_embd, 1.0)
        w[p + "ffn_up.weight"] = mat(n_ff, n_embd, 1.0)
        w[p + "ffn_down.weight"] = mat(n_embd, n_ff, 1.0)
        # small: the F16 GELU table of ggml rounds; its boundary flips then barely reach the
        # residual stream (the reference emulates the table, but f32 and f64 inputs can
        # fall on either side of an F16 rounding boundary)
        w[p + "post_ffw_norm.weight"] = (0.1 * norm(n_embd)).astype(np.float32)
    w["output_norm.weight"] = norm(n_embd)
    return w


def write_tiny_gemma3(
    path: Union[str, os.PathLike],
    *,
    seed: int = 0,
    n_layer: int = 4,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 2048,
    sliding_window: int = 8,
    swa_pattern: int = 4,
    rope_freq_base: float = 1_000_000.0,
    rope_freq_base_swa: float = 10_000.0,
    rms_eps: float = 1e-6,
) -> Path:
    """Write a tiny random Gemma 3 GGUF (all tensors f32) to ``path``; return the path.

    Layer ``il`` is sliding-window when ``il % swa_pattern < swa_pattern - 1``
    (llama.cpp's ``set_swa_pattern``); with the defaults layers 0..2 are, layer 3
    is global. The file's content depends only on the arguments.
    """
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head and n_head by n_head_kv")
    if sliding_window < 1 or swa_pattern < 1:
        raise ValueError("sliding_window and swa_pattern must be positive")
    if not any(il % swa_pattern == swa_pattern - 1 for il in range(n_layer)):
        raise ValueError("no global layer: swa_pattern must be <= n_layer")

    vocab = tiny_vocab()
    weights = tiny_gemma3_weights(n_layer, n_embd, n_head, n_head_kv, n_ff, len(vocab[0]), seed)

    path = Path(path)
    arch = "gemma3"
    w, tmp = open_writer(path, arch, f"a2sf-tiny-gemma3-s{seed}", n_ctx_train=n_ctx_train,
                         n_embd=n_embd, n_layer=n_layer, n_ff=n_ff, n_head=n_head,
                         n_head_kv=n_head_kv)
    w.add_key_length(n_embd // n_head)
    w.add_value_length(n_embd // n_head)
    w.add_rope_freq_base(rope_freq_base)
    w.add_float32(f"{arch}.rope.freq_base_swa", rope_freq_base_swa)
    w.add_layer_norm_rms_eps(rms_eps)
    w.add_sliding_window(sliding_window)
    w.add_uint32(f"{arch}.attention.sliding_window_pattern", swa_pattern)
    return finish_tiny(w, tmp, path, vocab, weights, "f32")


if __name__ == "__main__":  # pragma: no cover
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(write_tiny_gemma3(a.path, seed=a.seed))
