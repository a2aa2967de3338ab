"""Prefix reuse under eviction: never reuse a cached prefix with holes in it.

llama_cpp.Llama.generate keeps the evaluated tokens a new prompt starts with
and evaluates only the rest. After eviction, some of those tokens' cells may
be gone: reusing them would attend to a prefix the model never saw as such.
Then the prompt is evaluated from an empty cache instead.
"""
from __future__ import annotations

import inspect
import sys
from typing import Any, Sequence

import numpy as np

import llama_cpp

from .base import PolicyBase, core


class PrefixReuse(PolicyBase):
    _GENERATE_SIGNATURE = inspect.signature(llama_cpp.Llama.generate)

    def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any):
        if self.a2sf_active:
            bound = self._GENERATE_SIGNATURE.bind(self, tokens, *args, **kwargs)
            if bound.arguments.get("reset", True) and self.n_tokens > 0:
                self._a2sf_drop_evicted_prefix(list(tokens))
        return (yield from super().generate(tokens, *args, **kwargs))

    def _a2sf_drop_evicted_prefix(self, tokens: list) -> None:
        """Reset unless the prefix the parent's generate() would keep is intact."""
        n_tokens = self.n_tokens
        match = 0
        for a, b in zip(self.input_ids[:n_tokens].tolist(), tokens):
            if a != b:
                break
            match += 1
        # what llama_cpp.Llama.generate keeps (see its prefix-match logic)
        consumed = match == len(tokens)
        if consumed and n_tokens == len(tokens) and not self._requires_eval:
            keep = n_tokens
        elif consumed:
            keep = match - 1
        else:
            keep = match
        if keep >= n_tokens or not self._a2sf_cells_lost():
            return  # pure continuation, or nothing evicted: the parent's reuse is exact
        # after a compaction the tokens before it sit at renumbered positions: a suffix
        # evaluated from inside them would get positions that clash with the kept cells
        # (n_past - offset), so only a pure continuation is safe then
        if keep > 0 and not self._a2sf_compacted():
            pos, _, _ = core().scores(self._a2sf_ctx(), 0)
            if int(np.count_nonzero(self._a2sf_token_index(pos) < keep)) == keep:
                return  # tokens [0, keep) all present
        if self.verbose:
            print(
                f"a2sf.Llama.generate: the cache lost evicted cells of the {keep} reusable "
                "prompt tokens; re-evaluating the prompt from scratch",
                file=sys.stderr,
            )
        self.reset()
