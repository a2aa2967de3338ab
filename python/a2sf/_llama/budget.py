"""Prompt compression: the ``kv_budget`` setting and :meth:`kv_compress`.

The methods' reference code (A2SF's ``utils_real_drop``, kvpress's presses)
selects once the whole prompt was read with full attention, per (layer, KV
head), then decodes. With ``kv_budget=N`` every eval of more than one token (a
prompt, a chat turn) is followed by a compression of the sequence to N cells
with the scores of that prefill, by the policy and its granularity, and the kept
cells are moved to the front of the cache, so decoding attends over N cells.
Single-token evals (generation) let the sequence grow again; once the cache is
full, continuous eviction takes over with the same policy.
"""
from __future__ import annotations

from typing import Optional, Sequence

from .base import PolicyBase, core


class PromptCompression(PolicyBase):
    _a2sf_budget: Optional[int] = None

    def _a2sf_start_budget(self, budget: Optional[int]) -> None:
        if budget is not None:
            self._a2sf_check_budget(budget)
        self._a2sf_budget = budget

    def _a2sf_check_budget(self, budget: int) -> None:
        p = self._kv_policy
        if budget <= p.n_protected:
            raise ValueError(
                f"kv_budget={budget} must be more than n_sink + n_recent = {p.n_protected} "
                "(those cells are never evicted)")
        if budget >= self.n_ctx():
            raise ValueError(f"kv_budget={budget} must be less than n_ctx={self.n_ctx()}")

    def kv_compress(self, n_keep: int, seq_id: int = 0) -> int:
        """Compress ``seq_id`` to ``n_keep`` cells now, by the policy (and its granularity),
        kept cells moved to the front of the cache. Returns the cells it then holds."""
        if isinstance(n_keep, bool) or not isinstance(n_keep, int) or n_keep < 0:
            raise ValueError(f"n_keep must be a non-negative int, got {n_keep!r}")
        if not self.a2sf_active:
            raise ValueError("kv_compress needs a kv_policy (none evicts nothing)")
        if seq_id == 0:
            self._a2sf_check_budget(n_keep)
        return int(core().compress(self._a2sf_ctx(), seq_id, n_keep))

    def eval(self, tokens: Sequence[int]):
        res = super().eval(tokens)
        budget = self._a2sf_budget
        if budget is not None and self.a2sf_active and len(tokens) > 1:
            if core().n_cells(self._a2sf_ctx(), 0) > budget:
                self.kv_compress(budget)
        return res
