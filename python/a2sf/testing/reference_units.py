"""Numpy reference of eviction per layer or per (layer, KV head) ("granularity").

The engine lets each unit -- all layers and heads together (``"token"``), one
layer (``"layer"``) or one (layer, KV head) (``"head"``) -- keep its own
tokens. What a unit holds after a sequence of evaluations and eviction events
depends only on the scores it accumulated, and those depend on which tokens
each head could still see. :class:`UnitReference` replays such a history in
float64:

* :meth:`feed` evaluates ``n`` more tokens as ubatches of the given sizes;
* :meth:`evict` drops ``k`` tokens from every unit, each unit its own
  lowest-ranked candidates (never its ``n_sink`` oldest and ``n_recent``
  newest tokens; ties go to the older token), as llama-kv-evict.cpp ranks;
  with ``pool_kernel`` > 1 a candidate ranks at least ``pool_weight`` times the
  best of itself and the candidates up to ``pool_kernel - 1`` positions before it;
* :meth:`forward` is a forward pass in which each (layer, KV head) attends only
  to the tokens its unit still holds, giving logits, probabilities and scores.

Scores follow the engine's rule per KV head: per ubatch of ``n`` queries, a
token's score decays by ``alpha^n`` and gains ``sum_q alpha^(n-1-q) P[q]``
summed over the query heads of the KV head's group (times ``|v|_1`` for VATP);
"mean attention" divides by the number of queries that saw the token.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from ..policies import SETTINGS
from .reference import ReferenceLlama

__all__ = ["UnitReference", "pool_before"]


def pool_before(positions: np.ndarray, rank: np.ndarray, kernel: int, weight: float = 1.0) -> np.ndarray:
    """Span pooling: each candidate's rank becomes the larger of its own and ``weight``
    times the largest rank among the candidates at positions ``[p - (kernel-1), p]``
    (written as a plain double loop)."""
    out = np.array(rank, dtype=np.float64)
    for i, p in enumerate(positions):
        window = [rank[j] for j, q in enumerate(positions) if p - (kernel - 1) <= q <= p]
        out[i] = max(rank[i], weight * max(window))
    return out


class UnitReference:
    def __init__(self, ref: ReferenceLlama, granularity: str, forgetting_factor: float,
                 n_sink: int, n_recent: int, value_aware: bool = False, mean_attention: bool = False,
                 pool_kernel: Optional[int] = None, pool_weight: Optional[float] = None):
        if granularity not in ("token", "layer", "head"):
            raise ValueError(granularity)
        self.ref = ref
        self.granularity = granularity
        self.alpha = float(forgetting_factor)
        self.n_sink, self.n_recent = n_sink, n_recent
        self.value_aware, self.mean_attention = value_aware, mean_attention
        # unset: the engine's defaults (a2sf.policies.SETTINGS)
        defaults = {s.name: s.default for s in SETTINGS}
        self.pool_kernel = int(defaults["pool_kernel"] if pool_kernel is None else pool_kernel)
        self.pool_weight = float(defaults["pool_weight"] if pool_weight is None else pool_weight)
        self.tokens: List[int] = []
        self.ubatches: List[int] = []
        L, Hkv = ref.n_layer, ref.n_head_kv
        # evicted_at[l, h, k]: number of tokens evaluated when unit (l, h) dropped token k (inf: held)
        self.evicted_at = np.zeros((L, Hkv, 0))

    # -- history -------------------------------------------------------------------
    def feed(self, tokens: Sequence[int], ubatch: int) -> None:
        n = len(tokens)
        self.tokens += list(tokens)
        self.ubatches += [min(ubatch, n - i) for i in range(0, n, ubatch)]
        L, Hkv = self.ref.n_layer, self.ref.n_head_kv
        self.evicted_at = np.concatenate([self.evicted_at, np.full((L, Hkv, n), np.inf)], axis=2)

    def visible(self) -> np.ndarray:
        """bool [L, Hkv, T(query), T(key)]: key k still held by the unit when query q ran."""
        T = len(self.tokens)
        q = np.arange(T)[:, None]
        k = np.arange(T)[None, :]
        return (k <= q)[None, None] & (self.evicted_at[:, :, None, :] > q[None, None])

    def forward(self):
        """(logits [T, V], probs [L, H, T, T], v_l1 [L, Hkv, T]) with per-head visibility."""
        fr = self.ref.forward(self.tokens, visible=self.visible())
        return fr.logits, fr.probs, fr.v_l1

    def unit_scores(self, ranked: bool = True) -> np.ndarray:
        """float64 [L, Hkv, T]: every (layer, KV head)'s score of every token so far
        (with mean attention and ``ranked``: divided by the queries that saw it, what
        eviction ranks by; else the accumulated score the engine stores)."""
        _, probs, v_l1 = self.forward()
        L, H, T, _ = probs.shape
        Hkv = v_l1.shape[1]
        g = H // Hkv
        P = probs.reshape(L, Hkv, g, T, T).sum(axis=2)  # [L, Hkv, T, T]
        if self.value_aware:
            P = P * v_l1[:, :, None, :]
        S = np.zeros((L, Hkv, T))
        seen = np.zeros(T)
        a = self.alpha
        start = 0
        for n in self.ubatches:
            stop = start + n
            S[:, :, start:stop] = 0.0
            w = np.array([a ** (n - 1 - q) for q in range(n)])
            S = (a ** n) * S + np.einsum("q,lhqk->lhk", w, P[:, :, start:stop, :])
            seen[start:stop] = 0.0
            seen[:stop] += np.tril(np.ones((n, stop)), k=start).sum(axis=0)  # queries start..stop-1 see k <= q
            start = stop
        if self.mean_attention and ranked:
            S = S / np.maximum(seen, 1.0)[None, None, :]
        return S

    def held(self) -> List[List[np.ndarray]]:
        """[l][h] -> sorted token indices the unit holds now."""
        L, Hkv, _ = self.evicted_at.shape
        return [[np.flatnonzero(np.isinf(self.evicted_at[l, h])) for h in range(Hkv)] for l in range(L)]

    def evict(self, k: int) -> None:
        """Every unit drops its k lowest-ranked candidates (granularity groups rank together)."""
        S = self.unit_scores()
        L, Hkv, T = S.shape
        groups = {"token": [[(l, h) for l in range(L) for h in range(Hkv)]],
                  "layer": [[(l, h) for h in range(Hkv)] for l in range(L)],
                  "head": [[(l, h)] for l in range(L) for h in range(Hkv)]}[self.granularity]
        held = self.held()
        for grp in groups:
            l0, h0 = grp[0]
            mine = held[l0][h0]  # every unit of a group holds the same tokens
            n = len(mine)
            n_sink = min(n, self.n_sink)
            n_keep = n_sink + min(n - n_sink, self.n_recent)
            cand = mine[n_sink:n - (n_keep - n_sink)]
            rank = pool_before(cand, sum(S[l, h, cand] for l, h in grp), self.pool_kernel, self.pool_weight)
            order = np.lexsort((cand, rank.astype(np.float32)))  # lowest rank, then older
            victims = cand[order[:min(k, len(cand))]]
            for l, h in grp:
                self.evicted_at[l, h, victims] = len(self.tokens)
