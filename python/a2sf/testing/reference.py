"""Numpy reference of a LLaMA forward pass and of the engine's attention scores.

Reads a LLaMA-architecture GGUF back with ``gguf.GGUFReader`` (quantized
tensors are dequantized with ``gguf.quants``) and recomputes, in float64:

* the logits of every token (to check the conventions below against llama.cpp),
* per layer, the softmax attention probabilities ``P[head, query, key]``,
* per layer, the L1 norm of each token's value vector per KV head,
* the scores the a2sf engine must hold: per ubatch of ``n`` queries, cells
  written by that ubatch are reset to 0, then
  ``S <- alpha^n S + sum_q alpha^(n-1-q) sum_h P[q, h, cell] (* |v_cell,h|_1)``.

Matrix products with a Q8_0 weight see the activations rounded to Q8_0 first
(``quantize_activations``, on by default), as ggml's CPU backend does: its
Q8_0 dot product multiplies int8 blocks of both operands, so llama.cpp's
result differs from a product with unrounded activations by ~1e-2.

Conventions, as in llama.cpp's ``llm_build_llama``: RMSNorm, "normal" RoPE
(adjacent pairs ``(x[2i], x[2i+1])`` rotated by ``pos * base^(-2i/d)``), GQA
with query head ``h`` reading KV head ``h // (n_head / n_head_kv)``, causal
mask, softmax scale ``1/sqrt(head_dim)``, SwiGLU feed-forward.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

__all__ = ["ReferenceLlama", "ForwardResult", "accumulate_scores", "ubatch_sizes"]


@dataclass
class ForwardResult:
    """Everything :meth:`ReferenceLlama.forward` computes for one token sequence."""

    logits: np.ndarray  # [T, n_vocab]
    probs: np.ndarray  # [n_layer, n_head, T(query), T(key)], causal (0 above the diagonal)
    v_l1: np.ndarray  # [n_layer, n_head_kv, T]: L1 norm of each token's value vector


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


class ReferenceLlama:
    """A float64 numpy LLaMA read from a GGUF file (small models only)."""

    def __init__(self, path: Union[str, os.PathLike], quantize_activations: bool = True):
        import gguf

        r = gguf.GGUFReader(str(path))
        arch = _field(r, "general.architecture")
        if arch != "llama":
            raise ValueError(f"reference supports the llama architecture only, got {arch!r}")
        self.n_layer = int(_field(r, "llama.block_count"))
        self.n_embd = int(_field(r, "llama.embedding_length"))
        self.n_head = int(_field(r, "llama.attention.head_count"))
        self.n_head_kv = int(_field(r, "llama.attention.head_count_kv", self.n_head))
        self.head_dim = self.n_embd // self.n_head
        self.n_rot = int(_field(r, "llama.rope.dimension_count", self.head_dim))
        self.rope_base = float(_field(r, "llama.rope.freq_base", 10000.0))
        self.eps = float(_field(r, "llama.attention.layer_norm_rms_epsilon", 1e-5))
        self._read_tensors(r, quantize_activations)

    @property
    def scored_layers(self) -> List[int]:
        """The layers whose cells the engine scores (every layer of a LLaMA)."""
        return list(range(self.n_layer))

    def _read_tensors(self, r, quantize_activations: bool) -> None:
        """Every tensor of the GGUF reader ``r``, dequantized to float64 (numpy layout)."""
        from gguf.quants import dequantize

        self.w: Dict[str, np.ndarray] = {}
        self.qtype: Dict[str, "gguf.GGMLQuantizationType"] = {}
        for t in r.tensors:
            shape = tuple(int(x) for x in reversed([int(s) for s in t.shape]))
            arr = dequantize(np.asarray(t.data), t.tensor_type)
            self.w[t.name] = np.asarray(arr, dtype=np.float64).reshape(shape)
            self.qtype[t.name] = t.tensor_type
        if "output.weight" not in self.w:  # tied embeddings
            self.w["output.weight"] = self.w["token_embd.weight"]
            self.qtype["output.weight"] = self.qtype["token_embd.weight"]
        self.quantize_activations = quantize_activations
        self.n_vocab = self.w["token_embd.weight"].shape[0]

    # -- building blocks ---------------------------------------------------
    def _mm(self, x: np.ndarray, name: str) -> np.ndarray:
        """x @ W.T; x rounded to Q8_0 first when W is Q8_0 (ggml CPU's vec_dot type for Q8_0)."""
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import dequantize, quantize

        if self.quantize_activations and self.qtype.get(name) == Q.Q8_0:
            x32 = np.ascontiguousarray(x, dtype=np.float32)
            x = dequantize(quantize(x32, Q.Q8_0), Q.Q8_0).astype(np.float64).reshape(x.shape)
        return x @ self.w[name].T

    def _rms(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * weight

    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """x: [T, heads, head_dim]; llama.cpp LLAMA_ROPE_TYPE_NORM (adjacent pairs)."""
        d = self.n_rot
        i = np.arange(0, d, 2, dtype=np.float64)
        theta = pos[:, None].astype(np.float64) * self.rope_base ** (-i / d)[None, :]  # [T, d/2]
        cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        out = x.copy()
        x0, x1 = x[..., 0:d:2], x[..., 1:d:2]
        out[..., 0:d:2] = x0 * cos - x1 * sin
        out[..., 1:d:2] = x0 * sin + x1 * cos
        return out

    def _rope_layer(self, x: np.ndarray, pos: np.ndarray, il: int) -> np.ndarray:
        """Layer il's RoPE (one for every layer here; Gemma 3 has two bases)."""
        return self._rope(x, pos)

    def _window(self, il: int) -> int:
        """Layer il's sliding window (a query at p sees keys above p - window), 0 for none."""
        return 0

    # -- one layer; the forward pass is the same for every architecture, which
    #    overrides these steps (see reference_gemma3) ------------------------
    def _embed(self, tok: np.ndarray) -> np.ndarray:
        """The hidden states [T, n_embd] the first layer reads."""
        return self.w["token_embd.weight"][tok]

    def _project_qkv(self, x: np.ndarray, il: int):
        """Layer il's queries [T, H, hd], keys and values [T, Hkv, hd] of hidden
        states x, before RoPE: the attention norm and the three projections."""
        p = f"blk.{il}."
        T, H, Hkv, hd = x.shape[0], self.n_head, self.n_head_kv, self.head_dim
        h = self._rms(x, self.w[p + "attn_norm.weight"])
        q = self._mm(h, p + "attn_q.weight").reshape(T, H, hd)
        k = self._mm(h, p + "attn_k.weight").reshape(T, Hkv, hd)
        v = self._mm(h, p + "attn_v.weight").reshape(T, Hkv, hd)
        return q, k, v

    def _qkv(self, x: np.ndarray, il: int, pos: np.ndarray):
        """Layer il's RoPE'd queries [T, H, hd], keys and values [T, Hkv, hd] of hidden states x."""
        q, k, v = self._project_qkv(x, il)
        return self._rope_layer(q, pos, il), self._rope_layer(k, pos, il), v

    @property
    def _kq_scale(self) -> float:
        """The softmax scale of ``q . k``."""
        return 1.0 / np.sqrt(self.head_dim)

    def _layer_mask(self, masked: np.ndarray, il: int, pos: np.ndarray) -> np.ndarray:
        """What layer il may not see, given the causal (and ``visible``) mask."""
        return masked

    def _block_out(self, x: np.ndarray, o: np.ndarray, il: int) -> np.ndarray:
        """The rest of layer il after attention: output projection, residual, SwiGLU FFN."""
        p = f"blk.{il}."
        x = x + self._mm(o, p + "attn_output.weight")
        h = self._rms(x, self.w[p + "ffn_norm.weight"])
        g = self._mm(h, p + "ffn_gate.weight")
        u = self._mm(h, p + "ffn_up.weight")
        return x + self._mm((g / (1.0 + np.exp(-g))) * u, p + "ffn_down.weight")

    def _attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, masked: np.ndarray,
                scale: float):
        """Softmax attention of queries ``q`` [T, H, hd] over keys ``k`` and values
        ``v`` [T, Hkv, hd] (GQA: query head h reads KV head h // (H / Hkv)).

        ``masked`` [T, T] (every head) or [H, T, T] (per query head): True where a
        query may not see a key. Returns the probabilities [H, T, T] and the
        attention output [T, H * hd].
        """
        T, H, hd = q.shape
        group = H // k.shape[1]
        kk = np.repeat(k, group, axis=1)  # [T, H, hd]: head h reads kv head h // group
        vv = np.repeat(v, group, axis=1)
        att = np.einsum("qhd,khd->hqk", q, kk) * scale
        if masked.ndim == 2:
            att[:, masked] = -np.inf
        else:
            att[masked] = -np.inf
        att -= att.max(axis=-1, keepdims=True)
        e = np.exp(att)  # a query always sees itself: no all-masked row
        pr = e / e.sum(axis=-1, keepdims=True)
        return pr, np.einsum("hqk,khd->qhd", pr, vv).reshape(T, H * hd)

    def forward(
        self,
        tokens: Sequence[int],
        positions: Optional[Sequence[int]] = None,
        visible: Optional[np.ndarray] = None,
    ) -> ForwardResult:
        """Forward pass of one sequence (positions default to 0..T-1).

        ``visible`` [T, T] bool, optional: which keys each query may attend to,
        on top of the causal mask (and the window of sliding-window layers); e.g. ``visible[q, k] = False`` for every query
        after the cell of token k was evicted. ``visible`` [n_layer, n_head_kv, T, T]
        gives each (layer, KV head) its own (eviction per layer / head); query head
        h uses its KV head's.
        """
        tok = np.asarray(tokens, dtype=np.int64)
        T = len(tok)
        pos = np.arange(T) if positions is None else np.asarray(positions, dtype=np.int64)
        H, Hkv = self.n_head, self.n_head_kv
        group = H // Hkv
        mask = np.triu(np.ones((T, T), dtype=bool), k=1)  # key > query
        head_mask = None
        if visible is not None:
            visible = np.asarray(visible, dtype=bool)
            if visible.ndim == 2:
                mask = mask | ~visible
            else:  # [L, Hkv, T, T] -> per layer [H, T, T]
                head_mask = mask[None, None] | ~visible

        x = self._embed(tok)
        probs = np.zeros((self.n_layer, H, T, T))
        v_l1 = np.zeros((self.n_layer, Hkv, T))
        for il in range(self.n_layer):
            q, k, v = self._qkv(x, il, pos)
            v_l1[il] = np.abs(v).sum(axis=-1).T
            masked = mask if head_mask is None else np.repeat(head_mask[il], group, axis=0)
            probs[il], o = self._attend(q, k, v, self._layer_mask(masked, il, pos), self._kq_scale)
            x = self._block_out(x, o, il)
        return ForwardResult(logits=self._logits(x), probs=probs, v_l1=v_l1)

    def _logits(self, x: np.ndarray) -> np.ndarray:
        """The logits [T, n_vocab] of the last layer's hidden states."""
        return self._mm(self._rms(x, self.w["output_norm.weight"]), "output.weight")

    def scores(
        self,
        tokens: Sequence[int],
        ubatches: Sequence[int],
        forgetting_factor: float,
        value_aware: bool = False,
    ) -> np.ndarray:
        """Engine scores [len(scored_layers), T] after feeding ``tokens`` in the given
        ubatch sizes."""
        fr = self.forward(tokens)
        g = self.scored_layers
        return accumulate_scores(fr.probs[g], fr.v_l1[g], ubatches, forgetting_factor, value_aware)


def ubatch_sizes(n_prompt: int, n_ubatch: int, n_decode: int = 0) -> List[int]:
    """Ubatch sizes llama.cpp uses for one sequence: the prompt split in chunks of
    ``n_ubatch`` (when n_batch == n_ubatch or n_ubatch divides n_batch), then
    ``n_decode`` single-token steps."""
    sizes = [min(n_ubatch, n_prompt - i) for i in range(0, n_prompt, n_ubatch)]
    return sizes + [1] * n_decode


def accumulate_scores(
    probs: np.ndarray,
    v_l1: np.ndarray,
    ubatches: Sequence[int],
    forgetting_factor: float,
    value_aware: bool = False,
) -> np.ndarray:
    """The engine's per-layer cell scores [n_layer, T] for tokens 0..T-1 in cells 0..T-1.

    ``probs`` [L, H, T, T] and ``v_l1`` [L, Hkv, T] from :meth:`ReferenceLlama.forward`.
    ``ubatches`` are the sizes of the consecutive ubatches (summing to at most T).
    """
    L, H, T, _ = probs.shape
    Hkv = v_l1.shape[1]
    group = H // Hkv
    a = float(forgetting_factor)
    P = probs
    if value_aware:
        # weight key column j of head h by the L1 norm of v_j for kv head h // group
        P = probs * np.repeat(v_l1, group, axis=1)[:, :, None, :]
    S = np.zeros((L, T))
    start = 0
    for n in ubatches:
        if n <= 0:
            raise ValueError("ubatch sizes must be positive")
        stop = start + n
        if stop > T:
            raise ValueError(f"ubatches cover {stop} tokens, only {T} given")
        S[:, start:stop] = 0.0
        w = np.array([a ** (n - 1 - q) for q in range(n)])  # 0**0 == 1: TOVA keeps the last query
        S = (a**n) * S + np.einsum("q,lhqk->lk", w, P[:, :, start:stop, :])
        start = stop
    return S[:, :start]
