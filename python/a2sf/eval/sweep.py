"""The sweep (policies x budgets x alpha) and the fields every record shares."""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

from .engine import CacheConfig, chunk_for, split_budget
from .store import code_identity, model_identity, settings_hash

__all__ = ["build_sweep", "DEFAULT_ALPHA", "RecordFactory", "cache_details"]

#: A2SF's forgetting factor when none is swept (the authors' README example)
DEFAULT_ALPHA = 0.95


def build_sweep(policies: Sequence[str], ratios: Sequence[float], alphas: Sequence[float],
                alpha_ratio: Optional[float], cells: Optional[int] = None,
                granularities: Sequence[str] = ("token",), modes: Sequence[str] = ("continuous",),
                pool_kernels: Sequence[int] = (1,)) -> List[CacheConfig]:
    """Full cache first, then every policy at every budget, then the alpha sweep.

    A2SF runs at ``DEFAULT_ALPHA`` at every budget and at each of ``alphas`` at
    ``alpha_ratio``; the order puts the configurations a report needs first so
    that a run cut short is still useful.
    """
    out: List[CacheConfig] = []
    if "none" in policies:
        out.append(CacheConfig("none"))
    budgets = [("cells", cells)] if cells is not None else [("ratio", r) for r in ratios]
    for kind, b in budgets:
        for p in policies:
            if p == "none":
                continue
            alpha = DEFAULT_ALPHA if p == "a2sf" else None
            scored = p not in ("streaming", "random")
            grans = granularities if scored else ("token",)
            for mode in modes:
                for g in grans:
                    for k in (pool_kernels if scored else (1,)):
                        out.append(CacheConfig(p, alpha=alpha, granularity=g, compress=mode == "compress",
                                               pool_kernel=k, **{kind: b}))
    if "a2sf" in policies and alphas:
        kind, b = ("cells", cells) if cells is not None else ("ratio", alpha_ratio)
        if b is not None:
            for a in alphas:
                c = CacheConfig("a2sf", alpha=float(a), **{kind: b})
                if c not in out:
                    out.append(c)
    return out


class RecordFactory:
    """Stamps records with identity, settings and the config's cache split."""

    def __init__(self, task: str, dataset: str, model_path: str, settings: Dict[str, Any]):
        self.task, self.dataset = task, dataset
        self.settings = dict(settings)
        self.hash = settings_hash(self.settings)
        self.model = model_identity(model_path)
        self.code = code_identity()

    def key(self, config: CacheConfig, shots: int, window: Any):
        return self.key_for(config.variant, self._ratio(config), config.alpha, shots, window)

    def key_for(self, policy: str, ratio: Optional[float], alpha: Optional[float], shots: int, window: Any):
        """The store key (``store.record_key``) of the record ``make_for`` would write."""
        return (self.task, self.dataset, policy, ratio, alpha, shots, window, self.hash)

    @staticmethod
    def _ratio(config: CacheConfig):
        return config.ratio if config.cells is None else None

    def make(self, config: CacheConfig, shots: int, window: Any, metrics: Dict[str, Any],
             extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        extra = dict(extra or {}, granularity=config.granularity,
                     mode="compress" if config.compress else "continuous")
        return self.make_for(config.variant, self._ratio(config), config.alpha, shots, window, metrics,
                             cells=config.cells, label=config.label, extra=extra)

    def make_for(self, policy: str, ratio: Optional[float], alpha: Optional[float], shots: int, window: Any,
                 metrics: Dict[str, Any], cells: Optional[int] = None, label: Optional[str] = None,
                 extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """A record whose policy is not a ``CacheConfig`` (the kvpress comparison's engine:method)."""
        rec = {
            "schema": 1,
            "task": self.task,
            "dataset": self.dataset,
            "policy": policy,
            "ratio": ratio,
            "cells": cells,
            "alpha": alpha,
            "label": label if label is not None else policy,
            "shots": shots,
            "window": window,
            "settings": self.settings,
            "settings_hash": self.hash,
            "model": self.model,
            "code": self.code,
            "metrics": metrics,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if extra:
            rec.update(extra)
        return rec


def cache_details(config: CacheConfig, budget: Optional[int], chunk_max: int,
                  chunk_min: int = 1) -> Dict[str, Any]:
    """What the record says about the cache: budget, split, chunk, policy fields."""
    if budget is None:
        return {"budget": None}
    pol = config.policy_for(budget)
    return {"budget": budget, **split_budget(budget), "chunk": chunk_for(budget, chunk_max, chunk_min),
            "policy_fields": pol.to_dict()}
