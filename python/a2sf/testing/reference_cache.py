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

from typing import Optional, Sequence

import numpy as np

from .reference import ReferenceLlama

__all__ = ["CachedReference", "UnitCachedReference"]


class UnitCachedReference:
    """:class:`CachedReference` with each (layer, KV head) holding its own tokens.

    After eviction per layer or per head (granularity ``"layer"``/``"head"``), every
    unit keeps its own keys, and a compaction renumbers the positions any unit holds
    0..m-1 (one numbering: a token keeps one position in every unit), rotating each key
    by its own delta. ``keep(l, h, token_indices)`` is a
    unit's eviction; :meth:`step` and :meth:`compact` are as in CachedReference.
    """

    def __init__(self, ref: ReferenceLlama):
        self.ref = ref
        L, Hkv, hd = ref.n_layer, ref.n_head_kv, ref.head_dim
        empty = lambda: [[np.zeros((0, hd)) for _ in range(Hkv)] for _ in range(L)]  # noqa: E731
        self.k, self.v = empty(), empty()
        self.unit_pos = [[np.zeros(0, dtype=np.int64) for _ in range(Hkv)] for _ in range(L)]
        self.tok = [[np.zeros(0, dtype=np.int64) for _ in range(Hkv)] for _ in range(L)]
        self.n_seen = 0

    def step(self, tokens: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        r = self.ref
        tok = np.asarray(tokens, dtype=np.int64)
        qpos = np.asarray(positions, dtype=np.int64)
        n = len(tok)
        H, Hkv, hd = r.n_head, r.n_head_kv, r.head_dim
        group = H // Hkv
        scale = r._kq_scale
        idx = self.n_seen + np.arange(n)
        x = r._embed(tok)
        for il in range(r.n_layer):
            q, k, v = r._qkv(x, il, qpos)
            o = np.zeros((n, H, hd))
            for hk in range(Hkv):
                self.k[il][hk] = np.concatenate([self.k[il][hk], k[:, hk]])
                self.v[il][hk] = np.concatenate([self.v[il][hk], v[:, hk]])
                self.unit_pos[il][hk] = np.concatenate([self.unit_pos[il][hk], qpos])
                self.tok[il][hk] = np.concatenate([self.tok[il][hk], idx])
                masked = self.unit_pos[il][hk][None, :] > qpos[:, None]
                if r._window(il):
                    masked |= (qpos[:, None] - self.unit_pos[il][hk][None, :]) >= r._window(il)
                for g in range(group):
                    hq = hk * group + g
                    att = q[:, hq] @ self.k[il][hk].T * scale
                    att[masked] = -np.inf
                    att -= att.max(axis=-1, keepdims=True)
                    e = np.exp(att)
                    o[:, hq] = (e / e.sum(axis=-1, keepdims=True)) @ self.v[il][hk]
            x = r._block_out(x, o.reshape(n, H * hd), il)
        self.n_seen += n
        return r._logits(x)

    def keep(self, il: int, hk: int, token_indices: Sequence[int]) -> None:
        sel = np.isin(self.tok[il][hk], np.asarray(token_indices, dtype=np.int64))
        for a in (self.k, self.v, self.unit_pos, self.tok):
            a[il][hk] = a[il][hk][sel]

    def keep_held(self, positions: np.ndarray, layers: Optional[Sequence[int]] = None) -> None:
        """Each unit keeps the keys at the positions the engine's unit holds: ``positions``
        [len(layers), n_head_kv, n_cells] as ``Llama.kv_head_scores()`` gives them, row j
        for model layer ``layers[j]`` (default: every layer, in order)."""
        layers = range(self.ref.n_layer) if layers is None else layers
        for j, il in enumerate(layers):
            for hk in range(self.ref.n_head_kv):
                UnitCachedReference.keep(self, il, hk, self.tok[il][hk][np.isin(self.unit_pos[il][hk], positions[j, hk])])

    def compact(self, per_unit: bool = False) -> None:
        """Renumber the held keys and rotate each by its change of position: the positions
        any unit holds become 0..m-1, one numbering for all units (``per_unit``: each
        unit's own 0..n-1 instead, the engine's fallback near the training context).
        Beside sliding-window layers the positions inside the window join the numbering,
        and those layers' keys all shift by the window's one delta."""
        r = self.ref
        L, Hkv = r.n_layer, r.n_head_kv
        swa = [il for il in range(L) if r._window(il)]
        if swa and per_unit:
            raise ValueError("per-unit numbering would break the sliding window's single delta")
        every = np.concatenate([p for row in self.unit_pos for p in row] + [np.zeros(0, np.int64)])
        nxt = int(every.max()) + 1 if len(every) else 0  # the next query's position
        # what the next query still sees of each window layer's keys
        seen = {(il, hk): self.unit_pos[il][hk][nxt - self.unit_pos[il][hk] < r._window(il)]
                for il in swa for hk in range(Hkv)}
        held = [self.unit_pos[il][hk] for il in range(L) if il not in swa for hk in range(Hkv)]
        held = np.unique(np.concatenate(held + list(seen.values()) + [np.zeros(0, np.int64)]))
        for il in range(L):
            for hk in range(Hkv):
                order = np.argsort(self.unit_pos[il][hk], kind="stable")
                for a in (self.k, self.v, self.unit_pos, self.tok):
                    a[il][hk] = a[il][hk][order]
                p = self.unit_pos[il][hk]
                if per_unit:
                    new = np.arange(len(order), dtype=np.int64)
                elif il in swa:
                    w = seen[il, hk]
                    new = p + (int(np.searchsorted(held, w.min()) - w.min()) if len(w) else 0)
                else:
                    new = np.searchsorted(held, p).astype(np.int64)
                delta = new - p
                self.k[il][hk] = r._rope_layer(self.k[il][hk][:, None, :], delta, il)[:, 0, :]
                self.unit_pos[il][hk] = new
                if il in swa:  # the engine frees the cells pushed below position 0
                    keep = new >= 0
                    for a in (self.k, self.v, self.unit_pos, self.tok):
                        a[il][hk] = a[il][hk][keep]


class CachedReference(UnitCachedReference):
    """The cache of one token per cell (granularity "token"): every (layer, KV head)
    keeps the same tokens, so eviction drops a token everywhere."""

    def keep(self, token_indices: Sequence[int]) -> None:  # type: ignore[override]
        """Evict every entry whose token index is not listed."""
        for il in range(self.ref.n_layer):
            for hk in range(self.ref.n_head_kv):
                super().keep(il, hk, token_indices)

    @property
    def pos(self) -> np.ndarray:
        """Cache position of each entry (those of layer 0, head 0: every unit holds the same)."""
        return self.unit_pos[0][0]

    @property
    def token_index(self) -> np.ndarray:
        return self.tok[0][0]
