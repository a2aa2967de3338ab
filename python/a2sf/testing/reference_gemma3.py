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
from typing import List, Union

import numpy as np

from .reference import ReferenceLlama, _field

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

    @property
    def scored_layers(self) -> List[int]:
        """The global layers only (:attr:`global_layers`)."""
        return self.global_layers

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

    def _embed(self, tok: np.ndarray) -> np.ndarray:
        # Gemma scales the embeddings by sqrt(n_embd), rounded to f32 as llama.cpp's graph does
        return self.w["token_embd.weight"][tok] * np.float64(np.float32(np.sqrt(self.n_embd)))

    def _qkv(self, x: np.ndarray, il: int, pos: np.ndarray):
        """Layer il's queries (RMS-normalised per head, NEOX RoPE, scaled by
        1/sqrt(head_dim)), keys (normalised, RoPE) and values."""
        p = f"blk.{il}."
        q, k, v = self._project_qkv(x, il)
        q = self._rms(q, self.w[p + "attn_q_norm.weight"])
        k = self._rms(k, self.w[p + "attn_k_norm.weight"])
        q, k = self._rope_layer(q, pos, il), self._rope_layer(k, pos, il)
        return q / np.sqrt(self.head_dim), k, v

    def _rope_layer(self, x: np.ndarray, pos: np.ndarray, il: int) -> np.ndarray:
        return self._rope_neox(x, pos, self.rope_base_swa if self.is_swa[il] else self.rope_base)

    def _window(self, il: int) -> int:
        return max(self.n_swa, 1) if self.is_swa[il] else 0

    @property
    def _kq_scale(self) -> float:
        # Q is already scaled in _qkv (llama.cpp's Gemma 3 graph: softmax scale 1)
        return 1.0

    def _layer_mask(self, masked: np.ndarray, il: int, pos: np.ndarray) -> np.ndarray:
        """Sliding-window layers also hide the keys ``pos_q - pos_k >= n_swa`` back."""
        if not self.is_swa[il]:
            return masked
        return masked | ((pos[:, None] - pos[None, :]) >= self._window(il))  # [query, key]

    def _block_out(self, x: np.ndarray, o: np.ndarray, il: int) -> np.ndarray:
        """Output projection and GELU FFN, each RMS-normalised before its residual."""
        p = f"blk.{il}."
        o = self._rms(self._mm(o, p + "attn_output.weight"), self.w[p + "post_attention_norm.weight"])
        x = x + o
        h = self._rms(x, self.w[p + "ffn_norm.weight"])
        g = self._mm(h, p + "ffn_gate.weight")
        u = self._mm(h, p + "ffn_up.weight")
        f = self._mm(gelu_ggml(g) * u, p + "ffn_down.weight")
        return x + self._rms(f, self.w[p + "post_ffw_norm.weight"])

    def _logits(self, x: np.ndarray) -> np.ndarray:
        logits = super()._logits(x)
        if self.softcap:
            logits = np.tanh(logits / self.softcap) * self.softcap
        return logits
