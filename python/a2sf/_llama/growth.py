"""With a policy the sequence outgrows the cache: n_tokens may pass n_ctx.

llama_cpp.Llama sizes ``input_ids`` (and ``scores`` under ``logits_all``) for
n_ctx positions and caps the completion API at n_ctx. Under a policy the
cache evicts instead of overflowing, so this part

* grows ``input_ids``/``scores`` as the sequence grows;
* makes the completion API's context window :attr:`context_window`
  (``max_positions``, default the model's training context): prompts longer
  than n_ctx are accepted, ``max_tokens=None`` runs to it;
* without a policy, refuses evals that would overflow the plain cache.
"""
from __future__ import annotations

import contextlib
from collections import deque
from typing import Any, Deque, Iterator, List, Sequence

import numpy as np

import llama_cpp

from .base import _INT32_MAX, PolicyBase


class GrowingSequence(PolicyBase):
    _a2sf_windows = 0  # completions/generations in progress that see context_window

    @property
    def context_window(self) -> int:
        """The longest sequence the completion API runs to: n_ctx without a policy;
        with one, ``max_positions`` (default: the model's training context, at least n_ctx)."""
        n_ctx = self.n_ctx()
        if not self.a2sf_active:
            return n_ctx
        limit = self._a2sf_max_positions
        if limit is None:
            # compacted positions never pass the cache: no length is too long
            limit = _INT32_MAX if self._a2sf_unbounded() else int(self._model.n_ctx_train())
        return max(limit, n_ctx)

    @contextlib.contextmanager
    def _a2sf_context_window(self) -> Iterator[None]:
        """The parent's completion code reads its context window from ``self._n_ctx``
        (prompt check, max_tokens cap, draft length): for the time it runs, that is
        :attr:`context_window`. Outside, ``_n_ctx`` is n_ctx as the parent set it."""
        self._a2sf_windows += 1
        self._n_ctx = self.context_window
        try:
            yield
        finally:
            self._a2sf_windows -= 1
            if self._a2sf_windows == 0:
                self._n_ctx = self.n_ctx()

    def _create_completion(self, *args: Any, **kwargs: Any):
        if not self.a2sf_active:
            return (yield from super()._create_completion(*args, **kwargs))
        with self._a2sf_context_window():
            return (yield from super()._create_completion(*args, **kwargs))

    def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any):
        if not self.a2sf_active:
            return (yield from super().generate(tokens, *args, **kwargs))
        with self._a2sf_context_window():
            return (yield from super().generate(tokens, *args, **kwargs))

    @property
    def eval_tokens(self) -> Deque[int]:
        return deque(self.input_ids[: self.n_tokens].tolist(), maxlen=self.context_window)

    @property
    def eval_logits(self) -> Deque[List[float]]:
        return deque(
            self.scores[: self.n_tokens, :].tolist(),
            maxlen=self.context_window if self._logits_all else 1,
        )

    def _a2sf_reserve(self, n: int) -> None:
        """Grow input_ids (and scores under logits_all) to hold at least n positions.

        Each is checked on its own: llama_cpp.Llama.load_state replaces input_ids by the
        saver's array, whose length need not match this context's scores."""
        have = self.input_ids.shape[0]
        if n > have:
            ids = np.zeros((max(n, 2 * have),), dtype=self.input_ids.dtype)
            ids[:have] = self.input_ids
            self.input_ids = ids
        rows = self.scores.shape[0]
        if self._logits_all and n > rows:
            sc = np.zeros((max(n, 2 * rows), self.scores.shape[1]), dtype=self.scores.dtype)
            sc[:rows] = self.scores
            self.scores = sc

    def eval(self, tokens: Sequence[int]):
        if not self.a2sf_active:
            if self.n_tokens + len(tokens) > self.n_ctx():
                raise ValueError(
                    f"eval: {self.n_tokens} evaluated + {len(tokens)} new tokens exceed the KV cache "
                    f"of n_ctx={self.n_ctx()} cells (without a kv_policy nothing is evicted)"
                )
            return super().eval(tokens)
        self._a2sf_reserve(self.n_tokens + len(tokens))
        super().eval(tokens)
        # room for the next batch and for speculative drafts written before eval
        self._a2sf_reserve(self.n_tokens + self.n_batch)

    def load_state(self, state: llama_cpp.LlamaState) -> None:
        if self.a2sf_active:
            self._a2sf_reserve(int(state.n_tokens) + self.n_batch)
        if state.scores.ndim != 2 or state.scores.shape[1] != self.scores.shape[1]:
            raise ValueError(
                f"load_state: the state holds logits over {state.scores.shape[-1]} tokens, this "
                f"model's vocabulary has {self.scores.shape[1]} (a state of another model)"
            )
        # the logits kept per position depend on n_batch/logits_all of the context
        # that saved them; llama_cpp.Llama.load_state needs them in this one's shape
        rows = self.scores[: int(state.n_tokens)].shape[0]
        if state.scores.shape[0] != rows:
            kept = np.zeros((rows, self.scores.shape[1]), dtype=self.scores.dtype)
            n = min(rows, state.scores.shape[0])
            kept[:n] = state.scores[:n]
            state = llama_cpp.LlamaState(
                input_ids=state.input_ids, scores=kept, n_tokens=state.n_tokens,
                llama_state=state.llama_state, llama_state_size=state.llama_state_size,
                seed=state.seed,
            )
        return super().load_state(state)
