"""The policy in force and the engine bindings, shared by the parts of a2sf.Llama."""
from __future__ import annotations

from typing import Any, Optional

import llama_cpp

from .._deps import import_hint
from ..policies import KVPolicy, PolicyKind

_INT32_MAX = 2**31 - 1


def core():
    """a2sf._core, imported on first use (the parent class works without it)."""
    with import_hint("a2sf._core (the native eviction engine bindings) could not be imported; "
                     "kv_policy needs a2sf built against the patched libllama: bash scripts/setup.sh"):
        from .. import _core  # type: ignore[attr-defined]
    return _core


def ctx_address(ctx: Any) -> int:
    """The llama_context address of a ctypes pointer, or ValueError if it is closed."""
    v = getattr(ctx, "value", ctx)
    if v is None:
        raise ValueError("the llama_context is closed")
    return int(v)


class PolicyBase(llama_cpp.Llama):
    """The policy in force; the defaults hold before (or if) ``__init__`` finishes."""

    _kv_policy: Optional[KVPolicy] = None
    #: the max_positions setting (None: the model's training context)
    _a2sf_max_positions: Optional[int] = None

    @property
    def a2sf_active(self) -> bool:
        """True while a policy that evicts is in force (not None / NoEviction)."""
        p = self._kv_policy
        return p is not None and p.kind != PolicyKind.NONE

    def _a2sf_ctx(self) -> int:
        return ctx_address(self._ctx.ctx)

    # position compaction (a2sf._llama.compaction) overrides these
    def _a2sf_compacted(self) -> bool:
        """True once cache positions and token indices differ (a compaction ran)."""
        return False

    def _a2sf_unbounded(self) -> bool:
        """True if positions are compacted, so no sequence length is too long."""
        return False

    def _a2sf_token_index(self, positions: Any) -> Any:
        """Token index (input_ids row) of the cells at these cache positions."""
        import numpy as np

        return np.asarray(positions, dtype=np.int64).copy()

    def _a2sf_cells_lost(self) -> bool:
        """True if seq 0 holds fewer cells than evaluated positions (eviction happened)."""
        return core().n_cells(self._a2sf_ctx(), 0) < self.n_tokens

    #: generate() calls in progress (set_kv_policy refuses to switch under them)
    _a2sf_generating = 0

    def generate(self, tokens: Any, *args: Any, **kwargs: Any):
        self._a2sf_generating += 1
        try:
            return (yield from super().generate(tokens, *args, **kwargs))
        finally:
            self._a2sf_generating -= 1

    def load_state(self, state: llama_cpp.LlamaState) -> None:
        try:
            super().load_state(state)
        except Exception as e:
            reason = ""
            try:
                reason = core().state_error()
            except ImportError:  # pragma: no cover - no engine bindings
                pass
            # llama.cpp may have cleared the cache before it gave up: start over
            self._ctx.kv_cache_clear()
            self.reset()
            raise RuntimeError(
                "load_state: the state was not restored: "
                + (reason or f"{e} (llama.cpp refused it: another model or a smaller cache? see its log)")
                + "; the context is now empty"
            ) from e
