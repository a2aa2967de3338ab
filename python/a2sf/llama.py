"""`a2sf.Llama`: llama_cpp.Llama with a KV-cache eviction policy.

    from a2sf import Llama
    llm = Llama("model.gguf", n_ctx=2048, kv_policy="a2sf")          # alpha 0.95
    llm = Llama("model.gguf", kv_policy="h2o", n_recent=64)
    llm("Once upon a time", max_tokens=8000)                         # runs past n_ctx

With ``kv_policy=None`` (the default) the class is llama_cpp.Llama: every
override below hands straight to the parent.

With a policy, the patched llama.cpp evicts cells when the cache is full, so a
sequence can grow past ``n_ctx``; positions keep increasing (no shift). This
class then

* picks ``n_batch``/``n_ubatch`` so that a batch always fits beside the
  protected cells (``n_sink + n_recent + n_batch < n_ctx``), and rejects values
  the caller chose that do not (:mod:`a2sf._llama.batch`);
* grows ``input_ids`` (and ``scores`` under ``logits_all``) as the sequence
  grows, instead of the parent's fixed ``n_ctx`` rows;
* lifts the completion API's context-window limit to ``max_positions``
  (:attr:`Llama.context_window`, default: the model's training context):
  prompts longer than ``n_ctx`` are fed in chunks of ``n_batch``, and
  ``max_tokens=None`` means "until ``max_positions``" (both in
  :mod:`a2sf._llama.growth`);
* never reuses a cached prefix that eviction has punched holes in: a new
  prompt that does not continue the evaluated tokens, once any of the cells it
  would keep were evicted, starts from an empty cache (:mod:`a2sf._llama.prefix`).

With or without a policy, closed objects and bad input raise Python
exceptions (:mod:`a2sf._llama.guards`), models with learned positions refuse
positions past their table (:mod:`a2sf._llama.positions`), and a model file
llama.cpp refuses is diagnosed (:mod:`a2sf.gguf_header`).

Note: ``logits_all=True`` keeps one row of logits per position ever evaluated
(n_vocab floats each), so very long generations with it cost memory.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np

import llama_cpp

from ._llama.base import _INT32_MAX, core as _core, ctx_address as _ctx_address
from ._llama.batch import check_batch_sizes, fit_batch
from ._llama.growth import GrowingSequence
from ._llama.guards import InputGuards, check_seq_id
from ._llama.budget import PromptCompression
from ._llama.compaction import PositionCompaction, resolve_positions
from .compaction import POSITION_MODES
from ._llama.positions import PositionLimit
from ._llama.prefix import PrefixReuse
from ._llama.rpc import add_rpc_servers
from .gguf_header import diagnose_model_file
from .policies import SETTINGS, SETTINGS_BY_NAME, KVPolicy, PolicyKind, make_policy, policy_from_settings

__all__ = ["Llama", "KVScores"]


@dataclass
class KVScores:
    """Cells of one sequence, ordered by position (see :meth:`Llama.kv_scores`)."""

    positions: np.ndarray  # int32 [n_cells]: cache position (RoPE), renumbered by compaction
    cells: np.ndarray  # int32 [n_cells]: cell index in the KV cache
    scores: np.ndarray  # float32 [n_layers, n_cells]
    token_index: Optional[np.ndarray] = None  # int64 [n_cells]: index of the token in input_ids
    #: int32 [n_layers]: the model layer of each row of ``scores``. Every KV layer for most
    #: models; for sliding-window (iSWA) models such as Gemma 2/3 only the global layers,
    #: the ones in llama.cpp's base cache where a2sf scores and evicts (the
    #: sliding-window layers keep their own window, unscored)
    scored_layers: Optional[np.ndarray] = None

    @property
    def total(self) -> np.ndarray:
        """Score summed over layers (what eviction ranks by), float64 [n_cells]."""
        return self.scores.sum(axis=0, dtype=np.float64)

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    # dict-style access, for callers that prefer kv_scores()["scores"]
    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def keys(self):
        return ("positions", "cells", "scores", "token_index", "scored_layers")


class Llama(InputGuards, PositionLimit, PositionCompaction, PrefixReuse, PromptCompression, GrowingSequence):
    """Drop-in llama_cpp.Llama with a KV-cache eviction policy.

    Args (besides llama_cpp.Llama's):
        kv_policy: None (plain llama.cpp), a name ("streaming", "h2o", "tova",
            "a2sf", "vatp", "random", "none"), a :class:`a2sf.policies.KVPolicy`
            instance or class.
        forgetting_factor, n_sink, n_recent, evict_chunk, value_aware, kv_seed,
        max_positions, ...: the rows of :data:`a2sf.policies.SETTINGS` (None =
            keep the policy's value); e.g. ``kv_seed`` sets the field ``seed``,
            ``max_positions`` is the longest sequence the completion API runs
            to with a policy (default: the model's training context).
        rpc_servers: ``"host:port[,host:port...]"`` (as llama-server's ``--rpc``) or a
            list: offload layers (default: all, ``n_gpu_layers=-1``) to these
            rpc-servers (a build with ``-DGGML_RPC=ON``; :mod:`a2sf._llama.rpc`,
            docs/DEPLOY.md).

    The parts (checks, growth past n_ctx, prefix reuse, learned positions) are
    in :mod:`a2sf._llama`; this class wires the policy to the engine.
    """

    #: the Python-only settings given (e.g. {"max_positions": 4096}), for pickling
    _a2sf_settings: Dict[str, Any] = {}

    #: the rpc_servers given (endpoints), for pickling
    _a2sf_rpc_servers: Optional[list] = None

    def __init__(self, model_path: str, *, kv_policy: Any = None, rpc_servers: Any = None, **kwargs: Any):
        # the policy settings (rows of a2sf.policies.SETTINGS) from the rest
        settings = {k: kwargs.pop(k) for k in list(kwargs) if k in SETTINGS_BY_NAME}
        if isinstance(model_path, os.PathLike):
            model_path = os.fspath(model_path)
        if not isinstance(model_path, str):
            raise TypeError(
                f"model_path must be a str or os.PathLike path to a GGUF file, got "
                f"{type(model_path).__name__} ({model_path!r})"
            )
        policy, extras = policy_from_settings(kv_policy, **settings)
        if rpc_servers is not None:
            # before the model load: llama.cpp places layers on the devices registered then
            self._a2sf_rpc_servers = add_rpc_servers(rpc_servers)
            kwargs.setdefault("n_gpu_layers", -1)  # all layers, unless told otherwise
        self._kv_policy = policy
        if not self.a2sf_active:
            self._a2sf_load(model_path, kwargs)
            self._a2sf_check_positions(None)
            return

        kwargs = fit_batch(model_path, policy, kwargs)
        max_positions = extras.get("max_positions")
        if max_positions is not None and max_positions < kwargs["n_ctx"]:
            raise ValueError(f"max_positions ({max_positions}) must be at least n_ctx ({kwargs['n_ctx']})")
        _core()  # fail before loading the model if the engine is missing
        self._a2sf_load(model_path, kwargs)
        self._a2sf_check_positions(max_positions)
        try:
            policy = self._kv_policy = self._a2sf_set_native_policy(policy)
            positions = resolve_positions(extras.get("positions"), self._a2sf_position_limit is not None,
                                          POSITION_MODES[_core().default_positions(self._a2sf_ctx())])
            self._a2sf_start_budget(extras.get("kv_budget"))
        except ValueError:
            self.close()
            raise

        self._a2sf_settings = extras
        self._a2sf_max_positions = max_positions
        self._a2sf_start_positions(positions)
        self._a2sf_reserve(self.n_tokens + self.n_batch)

    def _a2sf_load(self, model_path: str, kwargs: Dict[str, Any]) -> None:
        """llama_cpp.Llama.__init__, with its load failures explained."""
        check_batch_sizes(kwargs)
        try:
            super().__init__(model_path, **kwargs)
        except ValueError as e:
            msg = str(e)
            if msg.startswith("Failed to load model"):
                why = diagnose_model_file(model_path)
                raise ValueError(
                    f"{msg}: {why or 'llama.cpp refused it (pass verbose=True to see its log)'}"
                ) from e
            if msg.startswith("Failed to create llama_context"):
                raise ValueError(
                    f"{msg} (n_ctx={kwargs.get('n_ctx', 512)}, n_batch={kwargs.get('n_batch', 512)}, "
                    f"n_ubatch={kwargs.get('n_ubatch', 512)}): too large for memory, or rejected "
                    "by llama.cpp (pass verbose=True to see its log)"
                ) from e
            raise

    # keyword arguments for help() and IDEs: one per row of SETTINGS
    __init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
         inspect.Parameter("model_path", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str),
         inspect.Parameter("kv_policy", inspect.Parameter.KEYWORD_ONLY, default=None),
         inspect.Parameter("rpc_servers", inspect.Parameter.KEYWORD_ONLY, default=None,
                           annotation=Optional[str])]
        + [inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Optional[s.type]) for s in SETTINGS]
        + [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    )

    # -- the policy ----------------------------------------------------------
    @property
    def kv_policy(self) -> Optional[KVPolicy]:
        """The policy in force (None: plain llama.cpp)."""
        return self._kv_policy

    @kv_policy.setter
    def kv_policy(self, value: Any) -> None:
        self.set_kv_policy(value)

    def set_kv_policy(self, kv_policy: Any = None, **overrides: Any) -> Optional[KVPolicy]:
        """Replace the policy of the live context (scores gathered so far are kept).

        Accepts what the constructor's ``kv_policy`` does, plus field overrides.
        Switching to None/NoEviction after cells were evicted resets the state
        (the plain cache cannot hold a sequence longer than n_ctx).
        """
        policy = make_policy(kv_policy, **overrides)
        active = policy is not None and policy.kind != PolicyKind.NONE
        if self._a2sf_generating:
            raise RuntimeError(
                "cannot change the kv_policy while generate()/create_completion() is running; "
                "finish or close the generator first"
            )
        core = _core()
        ctx = self._a2sf_ctx()
        if active:
            n_ctx = self.n_ctx()
            if policy.n_protected + self.n_batch >= n_ctx:
                raise ValueError(
                    f"n_sink + n_recent + n_batch = {policy.n_protected + self.n_batch} must be "
                    f"< n_ctx = {n_ctx} for {type(policy).__name__}"
                )
            policy = self._kv_policy = self._a2sf_set_native_policy(policy)
            self._a2sf_reserve(self.n_tokens + self.n_batch)
        else:
            was_evicting = self.n_tokens > 0 and self._a2sf_cells_lost()
            core.set_policy(ctx, kind=int(PolicyKind.NONE))
            self._kv_policy = policy
            if was_evicting or self.n_tokens > self.n_ctx():
                self.reset()
        return policy

    def _a2sf_set_native_policy(self, policy: KVPolicy) -> KVPolicy:
        """Set ``policy`` on the context; the policy in force, with the granularity the
        engine chose when it was left unset (head, or token where head cannot run)."""
        core = _core()
        core.set_policy(self._a2sf_ctx(), **policy.to_native())
        if policy.granularity is None and "granularity" in policy.settable_fields():
            chosen = int(core.get_policy(self._a2sf_ctx())["granularity"])
            policy = policy.replace(granularity=SETTINGS_BY_NAME["granularity"].choices[chosen])
        return policy

    def kv_scores(self, seq_id: int = 0) -> KVScores:
        """Positions, cell indices and per-layer scores of the cells of ``seq_id``."""
        check_seq_id(seq_id)
        pos, cells, scores = _core().scores(self._a2sf_ctx(), seq_id)
        index = self._a2sf_token_index(pos) if seq_id == 0 else pos.astype(np.int64)
        return KVScores(positions=pos, cells=cells, scores=scores, token_index=index,
                        scored_layers=_core().scored_layers(self._a2sf_ctx()))

    def kv_n_cells(self, seq_id: int = 0) -> int:
        """Number of KV cells holding ``seq_id``."""
        check_seq_id(seq_id)
        return int(_core().n_cells(self._a2sf_ctx(), seq_id))

    def kv_stats(self) -> Dict[str, Any]:
        """Eviction statistics: evictions, cells_evicted, cells_used, evict_seconds;
        move_events, bytes_moved, move_seconds (granularity layer/head and compression
        moving K/V rows between cells; host_moves: those done as copies in host memory,
        a CPU cache, instead of a graph); lazy_flushes, lazy_queries, lazy_seconds (with
        flash attention: the batched products that scored the deferred queries)."""
        s = _core().stats(self._a2sf_ctx())
        return {
            "evictions": int(s["n_evictions"]),
            "cells_evicted": int(s["n_cells_evicted"]),
            "cells_used": int(s["n_cells_used"]),
            "evict_seconds": float(s["t_evict_us"]) / 1e6,
            "move_events": int(s["n_move_events"]),
            "bytes_moved": int(s["n_bytes_moved"]),
            "move_seconds": float(s["t_move_us"]) / 1e6,
            "compactions": int(s["n_compactions"]),
            "compact_seconds": float(s["t_compact_us"]) / 1e6,
            "lazy_flushes": int(s["n_lazy_flushes"]),
            "lazy_queries": int(s["n_lazy_queries"]),
            "lazy_seconds": float(s["t_lazy_us"]) / 1e6,
            "host_moves": int(s["n_host_moves"]),
        }

    def kv_head_scores(self, seq_id: int = 0):
        """What each (scored layer, KV head) holds: ``(positions, scores)``, both
        [n_layers, n_head_kv, n_cells] over the cells of :meth:`kv_scores` (same order).

        With ``granularity="token"`` every head of a cell holds the cell's token;
        ``"layer"``/``"head"`` move tokens between cells, so heads differ.
        """
        check_seq_id(seq_id)
        return _core().head_scores(self._a2sf_ctx(), seq_id)

    def kv_evict(self, n_free: int, seq_id: int = 0) -> int:
        """Evict ``n_free`` cells of ``seq_id`` now, by the policy's ranking.

        Decode does this by itself when the cache is full; this is for tests and
        tools. Returns the number of cells freed.
        """
        if isinstance(n_free, bool) or not isinstance(n_free, int) or n_free < 0:
            raise ValueError(f"n_free must be a non-negative int, got {n_free!r}")
        if n_free > _INT32_MAX:
            raise ValueError(f"n_free must be at most 2^31-1, got {n_free!r}")
        check_seq_id(seq_id)
        return int(_core().evict(self._a2sf_ctx(), seq_id, n_free))

    def kv_reset_stats(self) -> None:
        """Zero the eviction statistics."""
        _core().reset_stats(self._a2sf_ctx())

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: Optional[str] = None, *args: Any, **kwargs: Any):
        """Not available: a2sf never downloads models (no model hub at run time).

        Download the GGUF file yourself and pass its path: ``Llama(model_path, ...)``.
        """
        raise RuntimeError(
            f"a2sf.Llama.from_pretrained({repo_id!r}, {filename!r}): a2sf runs offline and never "
            "downloads models; fetch the .gguf file yourself and pass its path, "
            "Llama(model_path='/path/to/model.gguf', ...)"
        )

    def __getstate__(self):
        state = super().__getstate__()
        if self._kv_policy is not None:
            state["kv_policy"] = self._kv_policy
            state.update(self._a2sf_settings)
        if self._a2sf_rpc_servers is not None:
            state["rpc_servers"] = ",".join(self._a2sf_rpc_servers)
        return state
