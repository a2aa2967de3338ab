"""Run a sequence through llama.cpp's KV cache under a cell budget.

One :class:`BudgetRunner` owns one ``a2sf.Llama`` context, large enough that
llama.cpp itself never has to evict; the budget is enforced from Python by
calling :meth:`a2sf.Llama.kv_evict` after every chunk of the context, so the
cells of the sequence never exceed ``budget`` once a chunk is in (the way the
A2SF authors' lm-eval simulation evicted while the prompt was processed, and
H2O's "heavy hitter + recent" split). The same context is reused across
documents and policies (``set_kv_policy``): freshly written cells start from a
zero score in the engine, so nothing leaks from one document to the next.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import llama_cpp
import numpy as np

from ..llama import Llama
from ..policies import POLICY_NAMES, make_policy

__all__ = ["CacheConfig", "BudgetRunner", "split_budget", "log_softmax_rows", "EVAL_POLICIES"]

#: policies the harness sweeps ("none" = full cache, the reference)
EVAL_POLICIES = POLICY_NAMES


def split_budget(budget: int) -> Dict[str, int]:
    """The paper's split of a budget: half recent window, half selected by score.

    A2SF's lm-eval code kept 10% recent + 10% selected for a 20% cache; we keep
    a few attention sinks on top (StreamingLLM needs them; for the scored
    policies the first token is a heavy hitter anyway): ``n_sink = min(4,
    budget // 8)``, ``n_recent = (budget - n_sink) // 2``, the rest selected.
    """
    if budget < 1:
        raise ValueError(f"budget must be at least 1 cell, got {budget}")
    n_sink = min(4, budget // 8)
    n_recent = (budget - n_sink) // 2
    return {"n_sink": n_sink, "n_recent": n_recent, "n_selected": budget - n_sink - n_recent}


def chunk_for(budget: Optional[int], chunk_max: int, chunk_min: int = 1) -> int:
    """Context chunk between two evictions: a quarter of the budget, clamped.

    Evicting after every token (the paper's simulation) is the most faithful
    but costs one llama_decode per token; a chunk of budget/4 means one
    eviction never drops more than a quarter of what the cache holds.
    ``chunk_min`` bounds the number of decodes for tiny budgets (short
    multiple-choice contexts): the chunk then briefly sees up to
    budget + chunk cells before the eviction that follows it.
    """
    if budget is None:
        return chunk_max
    return max(1, chunk_min, min(chunk_max, budget // 4)) if chunk_min <= chunk_max else chunk_max


@dataclass(frozen=True)
class CacheConfig:
    """One point of the sweep: policy, budget ratio, forgetting factor."""

    policy: str
    ratio: Optional[float] = None  # fraction of the context kept (None: full cache)
    alpha: Optional[float] = None  # A2SF / VATP forgetting factor
    cells: Optional[int] = None  # a fixed budget in cells instead of a ratio (needle)
    granularity: str = "token"  # token / layer / head (scored policies)
    compress: bool = False  # full prefill, then one compression (else: evict while the context streams in)
    pool_kernel: int = 1  # span pooling of the scored policies (1: none)

    def __post_init__(self) -> None:
        if self.policy not in EVAL_POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; expected one of {EVAL_POLICIES}")
        if self.granularity not in ("token", "layer", "head"):
            raise ValueError(f"granularity must be token, layer or head, got {self.granularity!r}")
        if self.granularity != "token" and self.policy in ("none", "streaming", "random"):
            raise ValueError(f"{self.policy} has no scores: granularity is for the scored policies")
        if self.pool_kernel != 1 and self.policy in ("none", "streaming", "random"):
            raise ValueError(f"{self.policy} has no scores: pool_kernel is for the scored policies")
        if self.policy == "none":
            if self.ratio is not None or self.alpha is not None or self.cells is not None:
                raise ValueError("policy 'none' takes no ratio, cells or alpha")
            return
        if self.cells is not None:
            if self.ratio is not None:
                raise ValueError("give a ratio or a number of cells, not both")
            if isinstance(self.cells, bool) or not isinstance(self.cells, int) or self.cells < 4:
                raise ValueError(f"cells must be an int >= 4, got {self.cells!r}")
        elif self.ratio is None or not (0.0 < float(self.ratio) <= 1.0):
            raise ValueError(f"{self.policy}: ratio must be in (0, 1], got {self.ratio!r}")
        if self.alpha is not None:
            if self.policy not in ("a2sf", "vatp"):
                raise ValueError(f"{self.policy} fixes its forgetting factor; alpha is for a2sf/vatp")
            if not (0.0 <= float(self.alpha) <= 1.0):
                raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")

    @property
    def variant(self) -> str:
        """The policy with its granularity and mode: ``a2sf``, ``a2sf/head``, ``h2o/head+compress``."""
        g = f"/{self.granularity}" if self.granularity != "token" else ""
        pool = f"/pool{self.pool_kernel}" if self.pool_kernel != 1 else ""
        return f"{self.policy}{g}{'+compress' if self.compress else ''}{pool}"

    @property
    def label(self) -> str:
        if self.policy == "none":
            return "none"
        a = f",a={self.alpha:g}" if self.alpha is not None else ""
        b = f"{self.cells}c" if self.cells is not None else f"{self.ratio:g}"
        return f"{self.variant}@{b}{a}"

    def budget(self, n_context: int, min_budget: int = 4) -> Optional[int]:
        """Cells kept for a context of ``n_context`` tokens (None: all)."""
        if self.policy == "none":
            return None
        if self.cells is not None:
            return min(self.cells, n_context)
        return max(min(min_budget, n_context), int(math.ceil(self.ratio * n_context)))

    def policy_for(self, budget: int):
        split = split_budget(budget)
        # the granularity always explicit: the engine's default (unset) chooses per head
        kw = dict(n_sink=split["n_sink"], n_recent=split["n_recent"])
        if self.policy not in ("none", "streaming", "random"):
            kw["granularity"] = self.granularity
            kw["pool_kernel"] = self.pool_kernel
        if self.policy in ("a2sf", "vatp") and self.alpha is not None:
            kw["forgetting_factor"] = float(self.alpha)
        return make_policy(self.policy, **kw)


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


class BudgetRunner:
    """Feed tokens through one llama.cpp context, evicting down to a budget.

    Uses llama-cpp-python's batch and ``llama_decode`` directly so that logits
    are requested only for the rows that are scored.
    """

    def __init__(self, model_path: str, n_ctx: int = 2048, n_threads: int = 1,
                 n_batch: int = 512, seed: int = 0, type_k: int = llama_cpp.GGML_TYPE_F16,
                 type_v: int = llama_cpp.GGML_TYPE_F16, flash_attn: bool = False):
        self.n_ctx = n_ctx
        n_batch = max(1, min(n_batch, n_ctx // 2))
        self.n_batch = n_batch
        self.llm = Llama(str(model_path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, type_k=type_k,
                         type_v=type_v, flash_attn=flash_attn, n_threads=n_threads, n_threads_batch=n_threads,
                         seed=seed, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        # plain llama.cpp until a config with a budget needs the engine, so that a
        # full-cache reference also runs on models the engine cannot score yet
        self._policy_active = False
        self.max_cells_seen = 0  # after each chunk's eviction (what the tests check)

    # -- policy ---------------------------------------------------------------
    def set_config(self, config: CacheConfig, budget: Optional[int]) -> None:
        if config.policy == "none" or budget is None:
            if self.llm.kv_policy is not None:
                self.llm.set_kv_policy(None)
            self._policy_active = False
        else:
            self.llm.set_kv_policy(config.policy_for(budget))
            self._policy_active = True

    # -- low level ------------------------------------------------------------
    def clear(self) -> None:
        self.llm._ctx.kv_cache_clear()
        self.llm.n_tokens = 0
        self.max_cells_seen = 0
        if self._policy_active:
            self.llm.kv_reset_stats()

    def n_cells(self) -> int:
        return self.llm.kv_n_cells(0)

    def decode(self, tokens: Sequence[int], pos0: int, logits: str = "last") -> Optional[np.ndarray]:
        """Decode ``tokens`` at positions pos0.. ; return logits rows.

        ``logits``: "all" -> float32 [len(tokens), n_vocab]; "last" -> [n_vocab];
        "none" -> None.
        """
        tokens = list(tokens)
        if not tokens:
            raise ValueError("nothing to decode")
        if pos0 + len(tokens) > self.llm._n_ctx and not self._policy_active:
            raise ValueError(f"{pos0 + len(tokens)} positions do not fit in n_ctx={self.n_ctx}")
        rows: List[np.ndarray] = []
        last = None
        for i in range(0, len(tokens), self.n_batch):
            part = tokens[i:i + self.n_batch]
            self.llm._batch.set_batch(batch=part, n_past=pos0 + i, logits_all=(logits == "all"))
            self.llm._ctx.decode(self.llm._batch)
            n_out = len(part) if logits == "all" else 1
            out = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(n_out, self.n_vocab))
            if logits == "all":
                rows.append(out.copy())
            else:
                last = out[-1].copy()
        if logits == "all":
            return np.concatenate(rows, axis=0)
        return last if logits == "last" else None

    def drop_from(self, pos: int) -> None:
        """Remove positions >= pos of sequence 0 (a scored continuation)."""
        self.llm._ctx.kv_cache_seq_rm(0, pos, -1)

    # -- protocol building block ----------------------------------------------
    def feed_context(self, tokens: Sequence[int], budget: Optional[int], chunk_max: int = 64,
                     chunk_min: int = 1, one_shot: bool = False) -> np.ndarray:
        """Clear the cache, feed a context chunk by chunk, evicting to ``budget``.

        Returns the logits of the context's last token (computed before the
        eviction that follows its chunk, as in streaming use). ``one_shot``:
        prefill the whole context with a full cache, then evict once (what
        kvpress does), instead of evicting while the context streams in.
        """
        tokens = list(tokens)
        self.clear()
        if one_shot and budget is not None and budget < len(tokens):
            if not self._policy_active:
                raise ValueError("a budget needs an eviction policy (set_config)")
            last = self.decode(tokens, 0, "last")
            n = self.n_cells()
            self.llm.kv_evict(n - budget, 0)
            self.max_cells_seen = self.n_cells()
            return last
        if budget is None or budget >= len(tokens):
            last = self.decode(tokens, 0, "last")
            if self._policy_active:
                self.max_cells_seen = self.n_cells()
            return last
        if not self._policy_active:
            raise ValueError("a budget needs an eviction policy (set_config)")
        chunk = chunk_for(budget, chunk_max, chunk_min)
        last = None
        for i in range(0, len(tokens), chunk):
            part = tokens[i:i + chunk]
            last = self.decode(part, i, "last")
            n = self.n_cells()
            if n > budget:
                freed = self.llm.kv_evict(n - budget, 0)
                if freed != n - budget:
                    raise RuntimeError(f"kv_evict freed {freed} of {n - budget} cells (protected cells exceed the budget?)")
                n -= freed
            self.max_cells_seen = max(self.max_cells_seen, n)
        return last

    def continuation_logprobs(self, last_logits: np.ndarray, cont: Sequence[int], pos0: int,
                              keep: bool = False) -> np.ndarray:
        """Log-probabilities of ``cont`` given the cache, one per token.

        ``last_logits``: logits of the token before ``cont``. Unless ``keep``,
        the continuation's cells are removed again afterwards.
        """
        cont = list(cont)
        lp = np.empty(len(cont), dtype=np.float64)
        lp[0] = log_softmax_rows(last_logits[None, :])[0, cont[0]]
        if len(cont) > 1:
            logits = self.decode(cont[:-1], pos0, "all")
            ls = log_softmax_rows(logits)
            lp[1:] = ls[np.arange(len(cont) - 1), cont[1:]]
            if not keep:
                self.drop_from(pos0)
        return lp

    def close(self) -> None:
        self.llm.close()
