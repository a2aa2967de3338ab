"""The numpy reference LLaMA, run step by step over an explicit KV cache.

:meth:`ReferenceLlama.forward` recomputes a whole sequence at once, which is
what the engine computes only while positions never change. Once cells are
evicted and renumbered, a new query attends to keys that were computed (and
RoPE-rotated) when their tokens were evaluated, then rotated again by their
change of position. :class:`CachedReference` models exactly that:

* :meth:`step` evaluates tokens at given positions over the cache and appends
  their (rotated) K and V, layer by layer;
* :meth:`keep` drops every entry but the given token indices (eviction);
* :meth:`compact` renumbers the entries 0..n-1 in position order and rotates
  each K by its change of position (RoPE composes: R(p + d) = R(d) R(p)), as
  llama.cpp's K-shift does.

The mask is by position, as llama.cpp's: a query at position p sees the
entries at positions <= p.
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np

from .reference import ReferenceLlama

__all__ = ["CachedReference"]


class CachedReference:
    def __init__(self, ref: ReferenceLlama):
        self.ref = ref
        L, Hkv, hd = ref.n_layer, ref.n_head_kv, ref.head_dim
        self.k: List[np.ndarray] = [np.zeros((0, Hkv, hd)) for _ in range(L)]
        self.v: List[np.ndarray] = [np.zeros((0, Hkv, hd)) for _ in range(L)]
        self.pos = np.zeros(0, dtype=np.int64)  # cache position of each entry
        self.token_index = np.zeros(0, dtype=np.int64)  # index of the token in its sequence
        self.n_seen = 0  # tokens evaluated so far

    def step(self, tokens: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        """Evaluate ``tokens`` at cache ``positions``; returns their logits [n, n_vocab]."""
        r = self.ref
        tok = np.asarray(tokens, dtype=np.int64)
        qpos = np.asarray(positions, dtype=np.int64)
        n = len(tok)
        H, Hkv, hd = r.n_head, r.n_head_kv, r.head_dim
        group = H // Hkv
        scale = 1.0 / np.sqrt(hd)
        kpos = np.concatenate([self.pos, qpos])
        masked = kpos[None, :] > qpos[:, None]  # [n, n_cache + n]

        x = r.w["token_embd.weight"][tok]
        for il in range(r.n_layer):
            q, k, v = r._qkv(x, il, qpos)
            self.k[il] = np.concatenate([self.k[il], k])
            self.v[il] = np.concatenate([self.v[il], v])
            kk = np.repeat(self.k[il], group, axis=1)
            vv = np.repeat(self.v[il], group, axis=1)
            att = np.einsum("qhd,khd->hqk", q, kk) * scale
            att[:, masked] = -np.inf
            att -= att.max(axis=-1, keepdims=True)
            e = np.exp(att)
            pr = e / e.sum(axis=-1, keepdims=True)
            o = np.einsum("hqk,khd->qhd", pr, vv).reshape(n, H * hd)
            x = r._block_out(x, o, il)
        self.pos = kpos
        self.token_index = np.concatenate([self.token_index, self.n_seen + np.arange(n)])
        self.n_seen += n
        x = r._rms(x, r.w["output_norm.weight"])
        return r._mm(x, "output.weight")

    def keep(self, token_indices: Sequence[int]) -> None:
        """Evict every entry whose token index is not listed."""
        sel = np.isin(self.token_index, np.asarray(token_indices, dtype=np.int64))
        self._select(sel)

    def compact(self) -> int:
        """Renumber the entries 0..n-1 in position order, K rotated by the change; returns n."""
        order = np.argsort(self.pos, kind="stable")
        self._select(order)
        new = np.arange(len(self.pos), dtype=np.int64)
        delta = new - self.pos
        self.k = [self.ref._rope(k, delta) for k in self.k]
        self.pos = new
        return len(new)

    def _select(self, sel: np.ndarray) -> None:
        self.k = [k[sel] for k in self.k]
        self.v = [v[sel] for v in self.v]
        self.pos = self.pos[sel]
        self.token_index = self.token_index[sel]


class UnitCachedReference:
    """:class:`CachedReference` with each (layer, KV head) holding its own tokens.

    After eviction per layer or per head (granularity ``"layer"``/``"head"``), every
    unit keeps its own keys, and a compaction renumbers each unit's keys 0..n-1 in its
    own order, rotating them by their own deltas. ``keep(l, h, token_indices)`` is a
    unit's eviction; :meth:`step` and :meth:`compact` are as in CachedReference.
    """

    def __init__(self, ref: ReferenceLlama):
        self.ref = ref
        L, Hkv, hd = ref.n_layer, ref.n_head_kv, ref.head_dim
        empty = lambda: [[np.zeros((0, hd)) for _ in range(Hkv)] for _ in range(L)]  # noqa: E731
        self.k, self.v = empty(), empty()
        self.pos = [[np.zeros(0, dtype=np.int64) for _ in range(Hkv)] for _ in range(L)]
        self.tok = [[np.zeros(0, dtype=np.int64) for _ in range(Hkv)] for _ in range(L)]
        self.n_seen = 0

    def step(self, tokens: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        r = self.ref
        tok = np.asarray(tokens, dtype=np.int64)
        qpos = np.asarray(positions, dtype=np.int64)
        n = len(tok)
        H, Hkv, hd = r.n_head, r.n_head_kv, r.head_dim
        group = H // Hkv
        scale = 1.0 / np.sqrt(hd)
        idx = self.n_seen + np.arange(n)
        x = r.w["token_embd.weight"][tok]
        for il in range(r.n_layer):
            q, k, v = r._qkv(x, il, qpos)
            o = np.zeros((n, H, hd))
            for hk in range(Hkv):
                self.k[il][hk] = np.concatenate([self.k[il][hk], k[:, hk]])
                self.v[il][hk] = np.concatenate([self.v[il][hk], v[:, hk]])
                self.pos[il][hk] = np.concatenate([self.pos[il][hk], qpos])
                self.tok[il][hk] = np.concatenate([self.tok[il][hk], idx])
                masked = self.pos[il][hk][None, :] > qpos[:, None]
                for g in range(group):
                    hq = hk * group + g
                    att = q[:, hq] @ self.k[il][hk].T * scale
                    att[masked] = -np.inf
                    att -= att.max(axis=-1, keepdims=True)
                    e = np.exp(att)
                    o[:, hq] = (e / e.sum(axis=-1, keepdims=True)) @ self.v[il][hk]
            x = r._block_out(x, o.reshape(n, H * hd), il)
        self.n_seen += n
        x = r._rms(x, r.w["output_norm.weight"])
        return r._mm(x, "output.weight")

    def keep(self, il: int, hk: int, token_indices: Sequence[int]) -> None:
        sel = np.isin(self.tok[il][hk], np.asarray(token_indices, dtype=np.int64))
        for a in (self.k, self.v, self.pos, self.tok):
            a[il][hk] = a[il][hk][sel]

    def compact(self) -> None:
        for il in range(self.ref.n_layer):
            for hk in range(self.ref.n_head_kv):
                order = np.argsort(self.pos[il][hk], kind="stable")
                for a in (self.k, self.v, self.pos, self.tok):
                    a[il][hk] = a[il][hk][order]
                new = np.arange(len(order), dtype=np.int64)
                delta = new - self.pos[il][hk]
                self.k[il][hk] = self.ref._rope(self.k[il][hk][:, None, :], delta)[:, 0, :]
                self.pos[il][hk] = new
