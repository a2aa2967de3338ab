"""Position compaction: the ``positions`` setting (see :mod:`a2sf.compaction`).

llama-cpp-python gives each token position ``n_tokens`` (``set_batch(batch,
n_past=self.n_tokens)``). With compaction on, the cache's positions are
renumbered from time to time while ``n_tokens`` keeps counting tokens, so the
batch must carry the cache position instead: this part wraps the context's
batch so that, right before each decode, it compacts if the mode asks for it
and writes ``n_past - offset`` as the positions. Its ``seq_rm(seq, n_tokens,
-1)`` (a draft model's rejected tokens, a prompt's unmatched suffix) likewise
removes from the cache position of that token on. Everything that reads
``n_tokens`` / ``input_ids`` (the completion API, streaming, stop sequences,
prefix matching) keeps llama-cpp-python's meaning.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

import llama_cpp

from ..compaction import POSITION_MODES, PositionMap
from .base import _INT32_MAX, PolicyBase, core

def resolve_positions(mode: Optional[str], learned_positions: bool, default: str) -> str:
    """The positions mode a Llama runs with: the user's, or ``default``, the engine's for its
    model and policy (``a2sf._core.default_positions``: "absolute" where the cache's K cannot
    be re-rotated, "training" per layer or head, else "cache").

    ``learned_positions``: the model has learned absolute position embeddings (only the
    message differs: the engine's default is "absolute" for them too)."""
    if mode is None:
        return default
    if mode not in POSITION_MODES:  # the settings table validated it already
        raise ValueError(f"positions must be one of {', '.join(POSITION_MODES)}, got {mode!r}")
    if learned_positions and mode != "absolute":
        raise ValueError(
            f"positions={mode!r}: this model has learned absolute position embeddings, which "
            "cannot be re-rotated; use positions='absolute' (the default for it)")
    if default == "absolute" and mode != "absolute":
        raise ValueError(
            f"positions={mode!r}: this cache's K cannot be re-rotated (a quantized type_k that "
            "llama.cpp stores without its rotation, e.g. head_dim not a multiple of 64); use "
            "positions='absolute' (the default for it) or an F16 type_k")
    return mode


class PositionCompaction(PolicyBase):
    _a2sf_positions: Optional[PositionMap] = None

    def _a2sf_start_positions(self, mode: str) -> None:
        """After the policy is set: track positions (modes other than 'absolute')."""
        if mode == "absolute":
            self._a2sf_positions = None
            return
        self._a2sf_positions = PositionMap(mode=mode, limit=max(1, int(self._model.n_ctx_train())),
                                          cache_cells=int(self.n_ctx()))
        batch = self._batch
        set_batch = batch.set_batch  # llama_cpp._internals.LlamaBatch.set_batch, bound

        def set_batch_at_cache_positions(batch: Sequence[int], n_past: int, logits_all: bool):
            self._a2sf_before_batch(n_past, len(batch))
            return set_batch(batch, n_past - self._a2sf_positions.offset, logits_all)

        # the one place llama_cpp.Llama.eval turns n_tokens into positions
        batch.set_batch = set_batch_at_cache_positions

        # llama_cpp.Llama.generate removes tokens by count as well: a draft model's
        # rejected tokens (seq_rm(-1, n_tokens, -1)) and a prompt's unmatched suffix
        seq_rm = self._ctx.kv_cache_seq_rm  # llama_cpp._internals.LlamaContext, bound

        def seq_rm_at_cache_positions(seq_id: int, p0: int, p1: int):
            m = self._a2sf_positions
            return seq_rm(seq_id, m.first_position_from(p0) if p0 > 0 else p0,
                          m.first_position_from(p1) if p1 > 0 else p1)

        self._ctx.kv_cache_seq_rm = seq_rm_at_cache_positions

    @property
    def positions(self) -> str:
        """The positions mode in force: 'cache', 'training' or 'absolute'."""
        m = self._a2sf_positions
        return m.mode if m is not None else "absolute"

    def _a2sf_compacted(self) -> bool:
        m = self._a2sf_positions
        return m is not None and m.compacted

    def _a2sf_unbounded(self) -> bool:
        return self._a2sf_positions is not None and self.a2sf_active

    def _a2sf_before_batch(self, n_past: int, n_new: int) -> None:
        m = self._a2sf_positions
        if n_past == 0:
            m.reset()
            return
        if not self.a2sf_active:
            return
        ctx = self._a2sf_ctx()
        if m.wants_compaction(n_past, n_new, ctx):  # the engine's rule (llama-server's too)
            c = core()
            m.compact(n_past, lambda: c.scores(ctx, 0)[:2], lambda: c.compact(ctx, 0))

    def _a2sf_token_index(self, positions: np.ndarray) -> np.ndarray:
        m = self._a2sf_positions
        if m is None:
            return np.asarray(positions, dtype=np.int64).copy()
        return m.token_index(positions)

    def save_state(self) -> llama_cpp.LlamaState:
        state = super().save_state()
        if self._a2sf_positions is not None:
            state.a2sf_positions = self._a2sf_positions.snapshot()  # type: ignore[attr-defined]
        return state

    def load_state(self, state: llama_cpp.LlamaState) -> None:
        super().load_state(state)
        m = self._a2sf_positions
        if m is not None:
            max_pos = None
            if self.a2sf_active and self.n_tokens > 0:
                pos = core().scores(self._a2sf_ctx(), 0)[0]
                max_pos = int(pos.max()) if len(pos) else None
            m.restore(getattr(state, "a2sf_positions", None), int(self.n_tokens), max_pos)
        if self.a2sf_active:
            # the next token goes at n_tokens - offset: a cache holding that position or a later
            # one (a state whose token count and cells disagree) would refuse every decode
            nxt = int(self.n_tokens) - (m.offset if m is not None else 0)
            newest = int(llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(self._ctx.ctx), 0))
            if newest >= nxt:
                self._ctx.kv_cache_clear()
                self.reset()
                if m is not None:
                    m.reset()
                raise RuntimeError(
                    f"load_state: the state was not restored: its cache holds position {newest}, but its "
                    f"token count puts the next token at position {nxt} (a damaged or inconsistent "
                    "state); the context is now empty")


__all__ = ["PositionCompaction", "resolve_positions", "_INT32_MAX"]
