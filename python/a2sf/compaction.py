"""Position compaction: endless streams on a bounded cache (the ``positions`` setting).

llama-cpp-python counts evaluated tokens in ``n_tokens`` and gives the next
token position ``n_tokens`` (``input_ids[i]`` is the token at position i). With
eviction the cache holds a few hundred of those tokens, but their positions
keep growing, and past its training context a RoPE model stops working. So
a2sf.Llama keeps two numberings:

* the *token index*: llama-cpp-python's, the index into ``input_ids`` (what
  ``n_tokens`` counts, what the completion API and prefix reuse see);
* the *cache position*: what llama.cpp's cells hold and RoPE rotates by.

They agree until the first compaction. A compaction (``a2sf._core.compact``)
renumbers the sequence's kept cells 0..n-1 in order, re-rotating their K, and
the next token takes cache position n. With per-head cells (granularity
"layer"/"head" after moves) the positions any head holds become 0..m-1, one
numbering for every head, and the next token takes position m. :class:`PositionMap` remembers, for the
cells renumbered by the last compaction, which token index each holds, and for
the tokens evaluated since, the constant offset between the two numberings.

When to compact is :data:`POSITION_MODES` (the rule is the engine's,
``llama_kv_policy_wants_compaction`` in cpp/include/llama-kv-policy.h, which
llama-server follows as well):

``"cache"``
    positions stay below twice the cache (StreamingLLM, arXiv 2309.17453,
    section 3.2, numbers positions within the cache): once eviction has left
    holes and the next position would reach ``2 * cache`` cells (or the
    training context, if lower), so one compaction serves about a cache's
    worth of tokens instead of one eviction chunk (a compaction re-rotates
    every cell's K; renumbering after every eviction event cost 4-5% of
    decode time at 1024 cells);
``"training"``
    only when the next position would reach the model's training context;
``"absolute"``
    never (llama.cpp's own behaviour without context shift; the completion API
    then stops at ``max_positions``).

The default (``llama_kv_policy_default_positions``): "cache" for one token per
cell, "training" per layer or head, "absolute" where K cannot be re-rotated.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

__all__ = ["POSITION_MODES", "PositionMap"]

#: in the order of the engine's enum llama_kv_positions (a2sf._core.POSITIONS_*)
POSITION_MODES = ("cache", "training", "absolute")


@dataclass
class PositionMap:
    """Token index <-> cache position of one sequence (seq 0 of a2sf.Llama)."""

    mode: str
    #: training context of the model ("training" compacts before reaching it)
    limit: int
    #: cells of the cache ("cache" keeps positions below twice this, and below limit)
    cache_cells: int = 0
    #: token index held by cache position p, for p < len(renumbered)
    renumbered: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    #: token index - cache position, for the positions >= len(renumbered)
    offset: int = 0
    n_compactions: int = 0
    compact_seconds: float = 0.0

    #: positions below len(renumbered) that hold no cell: below the first cell on iSWA
    #: memory, and those only other heads hold with per-head cells (set with renumbered)
    n_unheld: int = 0

    def reset(self) -> None:
        """An empty sequence: both numberings start again at 0."""
        self.renumbered = np.zeros(0, dtype=np.int64)
        self.n_unheld = 0
        self.offset = 0

    def _renumber(self, renumbered: np.ndarray) -> None:
        self.renumbered = renumbered
        self.n_unheld = int(np.count_nonzero(renumbered < 0))

    @property
    def compacted(self) -> bool:
        return self.offset != 0 or len(self.renumbered) > 0

    def position_of(self, token_index: int) -> int:
        """Cache position of a token evaluated after the last compaction (or the next one)."""
        return token_index - self.offset

    def token_index(self, positions: np.ndarray) -> np.ndarray:
        """Token index of the cells at the given cache positions."""
        positions = np.asarray(positions, dtype=np.int64)
        out = positions + self.offset
        old = positions < len(self.renumbered)
        out[old] = self.renumbered[positions[old]]
        return out

    def first_position_from(self, token_index: int) -> int:
        """The lowest cache position holding a token >= ``token_index`` (or where the next
        one would go): removing positions from it removes exactly the tokens from
        ``token_index`` on, as llama-cpp-python's ``seq_rm(n_tokens)`` means."""
        n_old = len(self.renumbered)
        if token_index >= n_old + self.offset:
            return token_index - self.offset
        later = np.flatnonzero(self.renumbered >= token_index)  # held positions keep token order
        return int(later[0]) if len(later) else n_old

    def wants_compaction(self, next_token_index: int, n_new: int, ctx: int, seq_id: int = 0) -> bool:
        """Whether to compact ``seq_id`` of the context ``ctx`` before evaluating ``n_new``
        tokens from ``next_token_index`` on: the engine's rule (``a2sf._core.wants_compaction``,
        see the module's doc), given what this map remembers of the last compaction."""
        from . import _core

        return _core.wants_compaction(
            ctx, seq_id, POSITION_MODES.index(self.mode), self.position_of(next_token_index), n_new,
            n_ctx_train=self.limit, n_cells=self.cache_cells, next_after=len(self.renumbered),
            n_unheld=self.n_unheld)

    def compact(self, next_token_index: int, cells: Callable[[], tuple], compact: Callable[[], int]) -> None:
        """Run ``compact()`` (a2sf._core.compact for seq 0) and renumber the map.

        ``cells()``: (cache positions, cell indices) of the sequence's cells, read before
        and after compacting (a cell keeps its token, its position changes).
        """
        t0 = time.perf_counter()
        pos, cell = (np.asarray(a, dtype=np.int64) for a in cells())
        token_of_cell = dict(zip(cell.tolist(), self.token_index(pos).tolist()))
        n = int(compact())  # the next position: len(cells), or more (iSWA window, per-head cells)
        pos, cell = (np.asarray(a, dtype=np.int64) for a in cells())
        assert n >= len(pos) and (len(pos) == 0 or pos.max() < n), (n, len(pos))
        # positions below n that hold no cell (-1): below the first cell on iSWA memory
        # whose window holds more tokens than the global cache; with per-head cells, those
        # that only other heads hold
        renumbered = np.full(n, -1, dtype=np.int64)
        renumbered[pos] = [token_of_cell[c] for c in cell.tolist()]
        self._renumber(renumbered)
        self.offset = next_token_index - n
        self.n_compactions += 1
        self.compact_seconds += time.perf_counter() - t0

    # -- save_state / load_state ------------------------------------------------
    def snapshot(self) -> dict:
        return {"renumbered": self.renumbered.copy(), "offset": int(self.offset)}

    def restore(self, snap: Optional[dict], n_tokens: int, max_position: Optional[int]) -> None:
        """After a state restore: the saved map, or (a state without one) the offset implied
        by the restored cells (the last cell holds token n_tokens - 1)."""
        if snap is not None:
            self._renumber(np.asarray(snap["renumbered"], dtype=np.int64).copy())
            self.offset = int(snap["offset"])
            return
        self.reset()
        if max_position is not None and n_tokens > 0:
            self.offset = n_tokens - 1 - int(max_position)
