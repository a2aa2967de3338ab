"""n_ctx, n_batch and n_ubatch under a policy: a batch must fit beside the protected cells.

Eviction frees cells for the incoming batch among the unprotected ones, so
``n_sink + n_recent + n_batch < n_ctx`` must hold; values the caller chose that
do not are refused, and unset ones are chosen to fit.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

from ..gguf_header import context_length
from ..policies import KVPolicy
from .base import _INT32_MAX

# the parent's own n_batch default (llama_cpp.Llama.__init__)
PARENT_N_BATCH = 512


def check_batch_sizes(kwargs: Dict[str, Any]) -> None:
    """n_batch / n_ubatch, if given, are positive ints."""
    for name in ("n_batch", "n_ubatch"):
        v = kwargs.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def fit_batch(model_path: str, policy: KVPolicy, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """llama_cpp.Llama's keyword arguments with n_ctx resolved and n_batch / n_ubatch
    chosen (or checked) for the policy."""
    kwargs = dict(kwargs)
    n_ctx = kwargs.get("n_ctx", 512)
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 0 <= n_ctx <= _INT32_MAX:
        raise ValueError(f"n_ctx must be an int in [0, 2^31-1], got {n_ctx!r}")
    if n_ctx == 0:
        n_ctx_train = context_length(model_path) if os.path.exists(model_path) else None
        if n_ctx_train is None:
            raise ValueError(
                "n_ctx=0 (the model's training context) could not be resolved from "
                f"{model_path!r}; pass n_ctx explicitly when using a kv_policy"
            )
        n_ctx = n_ctx_train
    kwargs["n_ctx"] = n_ctx

    protected = policy.n_protected
    room = n_ctx - protected  # cells left for the incoming batch
    if room <= 1:
        raise ValueError(
            f"{type(policy).__name__}: n_sink + n_recent = {protected} leaves no room "
            f"for a batch in n_ctx={n_ctx}; lower n_sink/n_recent or raise n_ctx"
        )

    check_batch_sizes(kwargs)

    def user_value(name: str) -> Optional[int]:
        v = kwargs.get(name)
        if v is not None and protected + v >= n_ctx:
            raise ValueError(
                f"{name}={v} does not fit beside the protected cells: n_sink + n_recent "
                f"+ {name} = {protected + v} must be < n_ctx = {n_ctx} "
                f"(eviction must free a whole batch; use {name} <= {room - 1})"
            )
        return v

    n_batch = user_value("n_batch")
    n_ubatch = user_value("n_ubatch")
    if n_batch is None:
        if n_ubatch is not None:
            n_batch = n_ubatch
        else:
            # a quarter of the cache at most: one prefill chunk never evicts
            # most of what the scores have learnt
            n_batch = max(1, min(PARENT_N_BATCH, room - 1, n_ctx // 4))
    kwargs["n_batch"] = n_batch
    kwargs["n_ubatch"] = min(n_batch, n_ubatch) if n_ubatch is not None else n_batch
    return kwargs
