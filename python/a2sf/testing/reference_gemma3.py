"""Numpy reference of llama.cpp's Gemma 3 forward pass (sliding-window layers).

Like :class:`a2sf.testing.reference.ReferenceLlama`, in float64, for the tiny
files of :mod:`a2sf.testing.tiny_gemma3` (and any small ``gemma3`` GGUF).
Conventions, as in llama.cpp's ``src/models/gemma3.cpp``:

* the token embedding scaled by ``sqrt(n_embd)``;
* per layer: RMSNorm (the stored weight is Gemma's ``1 + w``), Q/K/V, Q and K
  RMS-normalised per head, NEOX RoPE (pairs ``(x[i], x[i + d/2])``) with
  ``rope.freq_base`` on global layers and ``rope.freq_base_swa`` on
  sliding-window ones, Q scaled by ``1/sqrt(head_dim)`` (softmax scale 1),
  causal mask plus, on sliding-window layers, the window mask
  ``pos_q - pos_k >= n_swa``; the attention output RMS-normalised
  (``post_attention_norm``) before the residual;
* the feed-forward ``down(gelu(gate(h)) * up(h))``, RMS-normalised
  (``post_ffw_norm``) before the residual. ggml's CPU GELU reads a table of
  F16 inputs (``GGML_GELU_FP16``): the gate is rounded to F16 and the GELU
  (tanh form) of it rounded to F16, as :func:`gelu_ggml` does;
* final RMSNorm, tied output embeddings, no final soft-capping unless the
  file sets ``final_logit_softcapping``.

Layer ``il`` is sliding-window when ``il % pattern < pattern - 1`` (llama.cpp's
``set_swa_pattern``; the file's ``attention.sliding_window_pattern``, default 6).
a2sf scores only the global layers (:attr:`ReferenceGemma3.global_layers`).
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Union

import numpy as np

from .reference import ForwardResult, ReferenceLlama, _field, accumulate_scores

__all__ = ["ReferenceGemma3", "gelu_ggml"]


def gelu_ggml(x: np.ndarray) -> np.ndarray:
    """ggml CPU's F32 GELU: the tanh form read from a table of F16 inputs and outputs."""
    x32 = np.asarray(x, dtype=np.float32)
    h = x32.astype(np.float16).astype(np.float64)
    g = 0.5 * h * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * h * (1.0 + 0.044715 * h * h)))
    g = g.astype(np.float32).astype(np.float16).astype(np.float64)
    return np.where(x32 <= -10.0, 0.0, np.where(x32 >= 10.0, x32.astype(np.float64), g))


class ReferenceGemma3(ReferenceLlama):
    """A float64 numpy Gemma 3 read from a GGUF file (small models only)."""

    def __init__(self, path: Union[str, os.PathLike], quantize_activations: bool = True):
        import gguf

        r = gguf.GGUFReader(str(path))
        arch = _field(r, "general.architecture")
        if arch != "gemma3":
            raise ValueError(f"ReferenceGemma3 reads the gemma3 architecture only, got {arch!r}")
        a = arch
        self.n_layer = int(_field(r, f"{a}.block_count"))
        self.n_embd = int(_field(r, f"{a}.embedding_length"))
        self.n_head = int(_field(r, f"{a}.attention.head_count"))
        self.n_head_kv = int(_field(r, f"{a}.attention.head_count_kv", self.n_head))
        self.head_dim = int(_field(r, f"{a}.attention.key_length", self.n_embd // self.n_head))
        self.n_rot = int(_field(r, f"{a}.rope.dimension_count", self.head_dim))
        self.rope_base = float(_field(r, f"{a}.rope.freq_base", 10000.0))
        self.rope_base_swa = float(_field(r, f"{a}.rope.freq_base_swa", self.rope_base))
        self.eps = float(_field(r, f"{a}.attention.layer_norm_rms_epsilon", 1e-6))
        self.n_swa = int(_field(r, f"{a}.attention.sliding_window", 0))
        pattern = int(_field(r, f"{a}.attention.sliding_window_pattern", 6))
        self.softcap = float(_field(r, f"{a}.final_logit_softcapping", 0.0))
        self.is_swa: List[bool] = [self.n_swa > 0 and il % pattern < pattern - 1 for il in range(self.n_layer)]
        self._read_tensors(r, quantize_activations)

    @property
    def global_layers(self) -> List[int]:
        """The layers in llama.cpp's base (non-SWA) cache: the ones a2sf scores."""
        return [il for il in range(self.n_layer) if not self.is_swa[il]]

    def _rope_neox(self, x: np.ndarray, pos: np.ndarray, base: float) -> np.ndarray:
        """x: [T, heads, head_dim]; llama.cpp LLAMA_ROPE_TYPE_NEOX (halves rotated together)."""
        d = self.n_rot
        half = d // 2
        i = np.arange(0, d, 2, dtype=np.float64)
        theta = pos[:, None].astype(np.float64) * base ** (-i / d)[None, :]  # [T, d/2]
        cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        out = x.copy()
        x0, x1 = x[..., :half], x[..., half:d]
        out[..., :half] = x0 * cos - x1 * sin
        out[..., half:d] = x0 * sin + x1 * cos
        return out

    def forward(
        self,
        tokens: Sequence[int],
        positions: Optional[Sequence[int]] = None,
        visible: Optional[np.ndarray] = None,
    ) -> ForwardResult:
        """Forward pass of one sequence; ``visible`` [T, T] (optional) masks keys on
        top of the causal and window masks, for every layer (see ReferenceLlama)."""
        tok = np.asarray(tokens, dtype=np.int64)
        T = len(tok)
        pos = np.arange(T) if positions is None else np.asarray(positions, dtype=np.int64)
        H, Hkv, hd = self.n_head, self.n_head_kv, self.head_dim
        group = H // Hkv
        causal = np.triu(np.ones((T, T), dtype=bool), k=1)  # key > query
        if visible is not None:
            causal = causal | ~np.asarray(visible, dtype=bool)
        window = (pos[:, None] - pos[None, :]) >= max(self.n_swa, 1)  # [query, key]

        x = self.w["token_embd.weight"][tok] * np.float64(np.float32(np.sqrt(self.n_embd)))
        probs = np.zeros((self.n_layer, H, T, T))
        v_l1 = np.zeros((self.n_layer, Hkv, T))
        for il in range(self.n_layer):
            p = f"blk.{il}."
            swa = self.is_swa[il]
            h = self._rms(x, self.w[p + "attn_norm.weight"])
            q = self._mm(h, p + "attn_q.weight").reshape(T, H, hd)
            k = self._mm(h, p + "attn_k.weight").reshape(T, Hkv, hd)
            v = self._mm(h, p + "attn_v.weight").reshape(T, Hkv, hd)
            q = self._rms(q, self.w[p + "attn_q_norm.weight"])
            k = self._rms(k, self.w[p + "attn_k_norm.weight"])
            base = self.rope_base_swa if swa else self.rope_base
            q, k = self._rope_neox(q, pos, base), self._rope_neox(k, pos, base)
            q = q / np.sqrt(hd)
            v_l1[il] = np.abs(v).sum(axis=-1).T
            kk = np.repeat(k, group, axis=1)
            vv = np.repeat(v, group, axis=1)
            att = np.einsum("qhd,khd->hqk", q, kk)
            att[:, causal | window if swa else causal] = -np.inf
            att -= att.max(axis=-1, keepdims=True)
            e = np.exp(att)
            pr = e / e.sum(axis=-1, keepdims=True)
            probs[il] = pr
            o = np.einsum("hqk,khd->qhd", pr, vv).reshape(T, H * hd)
            o = self._rms(self._mm(o, p + "attn_output.weight"), self.w[p + "post_attention_norm.weight"])
            x = x + o
            h = self._rms(x, self.w[p + "ffn_norm.weight"])
            g = self._mm(h, p + "ffn_gate.weight")
            u = self._mm(h, p + "ffn_up.weight")
            f = self._mm(gelu_ggml(g) * u, p + "ffn_down.weight")
            x = x + self._rms(f, self.w[p + "post_ffw_norm.weight"])
        x = self._rms(x, self.w["output_norm.weight"])
        logits = self._mm(x, "output.weight")
        if self.softcap:
            logits = np.tanh(logits / self.softcap) * self.softcap
        return ForwardResult(logits=logits, probs=probs, v_l1=v_l1)

    def scores(
        self,
        tokens: Sequence[int],
        ubatches: Sequence[int],
        forgetting_factor: float,
        value_aware: bool = False,
    ) -> np.ndarray:
        """Engine scores [n_global_layers, T] (the global layers only) after feeding
        ``tokens`` in the given ubatch sizes."""
        fr = self.forward(tokens)
        g = self.global_layers
        return accumulate_scores(fr.probs[g], fr.v_l1[g], ubatches, forgetting_factor, value_aware)
