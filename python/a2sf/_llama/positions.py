"""Learned absolute positions (OPT, GPT-2, StarCoder): a hard limit on the sequence.

Positions index a table of n_ctx_train rows, and a2sf never shifts positions:
a position past the table would abort inside llama.cpp (get_rows out of
range), so such settings and evals are refused in Python first.
"""
from __future__ import annotations

import ctypes
from typing import Optional, Sequence

import llama_cpp

from .base import PolicyBase

LEARNED_POSITION_ARCHS = frozenset({"opt", "gpt2", "starcoder"})


def learned_position_limit(llm: llama_cpp.Llama) -> Optional[int]:
    """n_ctx_train if the loaded model has learned absolute positions, else None."""
    buf = (ctypes.c_char * 64)()
    n = llama_cpp.llama_model_meta_val_str(llm._model.model, b"general.architecture", buf, len(buf))
    arch = buf.value.decode("utf-8", "replace") if n > 0 else ""
    n_ctx_train = int(llm._model.n_ctx_train())  # 0 with vocab_only: nothing to check
    return n_ctx_train if arch in LEARNED_POSITION_ARCHS and n_ctx_train > 0 else None


class PositionLimit(PolicyBase):
    """Refuses n_ctx, max_positions and evals past a learned position table."""

    _a2sf_position_limit: Optional[int] = None

    def _a2sf_check_positions(self, max_positions: Optional[int]) -> None:
        """After loading: n_ctx and max_positions must fit the position table."""
        limit = self._a2sf_position_limit = learned_position_limit(self)
        if limit is None:
            return
        for name, v in (("n_ctx", self.n_ctx()), ("max_positions", max_positions)):
            if v is not None and v > limit:
                self.close()
                raise ValueError(
                    f"{name}={v} exceeds this model's {limit} learned positions "
                    "(absolute position embeddings; positions are never shifted)")

    def eval(self, tokens: Sequence[int]):
        limit = self._a2sf_position_limit
        if limit is not None and self.n_tokens + len(tokens) > limit:
            raise ValueError(
                f"evaluating {len(tokens)} tokens after {self.n_tokens} would pass this model's "
                f"{limit} learned positions (absolute position embeddings)")
        return super().eval(tokens)
