"""KV-cache eviction policies, one small immutable class per method.

A policy is plain configuration: it holds no state and touches no global; the
engine inside the patched llama.cpp does the work. ``a2sf.Llama(kv_policy=...)``
accepts an instance, a name (see :func:`make_policy`) or ``None``.

Every policy shares the same knobs (fields of :class:`KVPolicy`):

``n_sink``
    the first positions of a sequence, never evicted (attention sinks).
``n_recent``
    the newest positions of a sequence, never evicted (local window).
``evict_chunk``
    how many cells an eviction frees beyond what the incoming batch needs, so
    that eviction (a sort over the cache) runs once every ``evict_chunk``
    decoded tokens instead of at every token.
``forgetting_factor``
    alpha in [0, 1] of the accumulated score ``S <- alpha^n S + sum_q
    alpha^(n-1-q) A[q]`` (1 = H2O, 0 = TOVA).
``value_aware``
    weigh attention by the L1 norm of each cell's value vector (VATP).
``seed``
    RNG seed of :class:`RandomEviction`.

Defaults: ``n_sink=4`` (StreamingLLM's four sink tokens), ``n_recent=32`` and
``evict_chunk=16``. The A2SF authors keep 16 recent tokens; 32 is a little
safer for chat turns and costs nothing at the cache sizes llama.cpp runs with
(256 and up). VATP's reference code keeps 20 sink tokens; we keep the shared
default so that policies are compared at equal protected budgets.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional, Tuple, Type, Union

__all__ = [
    "PolicyKind",
    "KVPolicy",
    "NoEviction",
    "StreamingLLM",
    "H2O",
    "TOVA",
    "A2SF",
    "VATP",
    "MeanAttention",
    "RandomEviction",
    "POLICIES",
    "POLICY_NAMES",
    "Setting",
    "SETTINGS",
    "make_policy",
    "policy_from_settings",
]

_INT32_MAX = 2**31 - 1
_UINT32_MAX = 2**32 - 1


class PolicyKind(enum.IntEnum):
    """Mirror of ``enum llama_kv_policy_kind`` (cpp/include/llama-kv-policy.h)."""

    NONE = 0
    STREAMING = 1
    SCORE = 2
    RANDOM = 3


def _is_numpy_bool(value: Any) -> bool:
    t = type(value)
    return t.__module__ == "numpy" and t.__name__ in ("bool_", "bool")


@dataclass(frozen=True)
class Setting:
    """One row of :data:`SETTINGS`: a policy setting and every name it goes by.

    ``name`` is the keyword of :class:`a2sf.Llama`, the field of the server's
    ``A2SFModelSettings`` and (dashed) the CLI flag; ``field`` the
    :class:`KVPolicy` field it sets (None: a setting of ``a2sf.Llama`` only,
    such as ``max_positions``); ``native`` its name in ``llama_kv_policy_params``
    and ``a2sf._core.set_policy`` (None: it lives in Python only).
    """

    name: str
    type: type  # int, float, bool or str
    default: Any  # KVPolicy's default (None: unset unless given)
    help: str
    field: Optional[str] = None
    native: Optional[str] = None
    range: Optional[Tuple[Any, Any]] = None  # inclusive bounds of an int/float
    choices: Optional[Tuple[str, ...]] = None  # allowed values of a str
    native_none: Any = None  # what llama_kv_policy_params holds for None (a setting whose default is None)

    def check(self, value: Any, owner: Optional[str] = None) -> Any:
        """``value`` as a plain Python value of this setting, or TypeError/ValueError.

        ``owner`` prefixes the setting's name in messages (e.g. ``A2SF.seed``).
        """
        what = f"{owner}.{self.field or self.name}" if owner else self.name
        if value is None and self.default is None:
            return None  # unset: the setting's documented automatic value
        kind = self.type
        # bool is an int subclass in Python; a flag is never a size here
        if kind is bool:
            if not (isinstance(value, bool) or _is_numpy_bool(value)):
                raise TypeError(f"{what} must be a bool, got {type(value).__name__} ({value!r})")
            return bool(value)
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{what} must be an int, got {type(value).__name__} ({value!r})")
            value = int(value)
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                bounds = f" in [{self._fmt(0)}, {self._fmt(1)}]" if self.range else ""
                raise TypeError(
                    f"{what} must be a real number{bounds}, got {type(value).__name__} ({value!r})"
                )
            if math.isnan(float(value)):
                raise ValueError(f"{what} must be in [{self._fmt(0)}, {self._fmt(1)}], got {value!r}")
            value = float(value)
        elif kind is str:
            if not isinstance(value, str):
                raise TypeError(f"{what} must be a str, got {type(value).__name__} ({value!r})")
            if self.choices is not None and value not in self.choices:
                raise ValueError(f"{what} must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        else:  # pragma: no cover - a row of an unsupported type
            raise AssertionError(f"setting {self.name}: unsupported type {kind!r}")
        if self.range is not None and not self.range[0] <= value <= self.range[1]:
            raise ValueError(f"{what} must be in [{self._fmt(0)}, {self._fmt(1)}], got {value!r}")
        return value

    def to_native(self, value: Any) -> Any:
        """``value`` as ``llama_kv_policy_params`` holds it: a str choice is the C enum,
        numbered in the order of ``choices``."""
        if value is None:
            return self.native_none
        if self.type is str and self.choices is not None:
            return self.choices.index(value)
        return value

    def _fmt(self, i: int) -> str:
        bound = self.range[i]  # type: ignore[index]
        return {_INT32_MAX: "2^31-1", _UINT32_MAX: "2^32-1"}.get(bound, f"{bound:g}")


#: The policy settings, one row each: the single source of the a2sf.Llama
#: keywords, the server settings, the CLI flags, KVPolicy's fields and the
#: mapping to the C struct (:meth:`KVPolicy.to_native`). A row with ``native``
#: is a row of the engine's table, cpp/include/llama-kv-policy-settings.def (which
#: generates the C struct, its defaults and checks, a2sf._core.set_policy's keywords
#: and llama-server's mapping): its type, range, default, choices (in the order of
#: the C numbers), None (the C auto value) and help are that row's;
#: tests/test_engine_core.py checks them against ``a2sf._core.settings()``.
#: docs/SETTINGS.md: adding a setting.
SETTINGS: Tuple[Setting, ...] = (
    Setting("n_sink", int, 4, "first positions of a sequence, never evicted (attention sinks)",
            field="n_sink", native="n_sink", range=(0, _INT32_MAX)),
    Setting("n_recent", int, None, "newest positions of a sequence, never evicted (local window); "
            "None: half of the cells each eviction keeps after the sinks (H2O's and A2SF's split)",
            field="n_recent", native="n_recent", range=(0, _INT32_MAX), native_none=-1),
    Setting("evict_chunk", int, 16, "extra cells an eviction frees beyond what the batch needs "
            "(eviction then runs once every evict_chunk tokens)",
            field="evict_chunk", native="evict_chunk", range=(0, _INT32_MAX)),
    Setting("forgetting_factor", float, 1.0, "A2SF alpha in [0, 1] of the accumulated score "
            "(1 = H2O, 0 = TOVA)",
            field="forgetting_factor", native="forgetting_factor", range=(0.0, 1.0)),
    Setting("value_aware", bool, False, "weigh attention by the L1 norm of each cell's value vector (VATP)",
            field="value_aware", native="value_aware"),
    Setting("kv_seed", int, 0, "seed of the random policy",
            field="seed", native="seed", range=(0, _UINT32_MAX)),
    Setting("granularity", str, None, "which unit keeps its own tokens when a scored policy evicts: "
            "token (a cell is one token for all layers and heads), layer, or head (per layer and KV head). "
            "Default: head, or token where head cannot run (ALiBi models; a quantized K/V whose head rows are not whole blocks)",
            field="granularity", native="granularity", choices=("token", "layer", "head"), native_none=-1),
    Setting("mean_attention", bool, False, "rank by accumulated attention divided by the number of "
            "queries that saw the token (kvpress's ObservedAttention)",
            field="mean_attention", native="mean_attention"),
    Setting("pool_kernel", int, 12, "span pooling: a token ranks with (pool_weight times) the highest score among itself and "
            "the pool_kernel-1 positions before it, so the tokens that follow an attended one (the digits "
            "of a number after its key, a name after 'is') are kept with it; 1: no pooling",
            field="pool_kernel", native="pool_kernel", range=(1, 256)),
    Setting("pool_weight", float, 0.25, "span pooling: the share of the best score among the pool_kernel-1 "
            "positions before a token that the token ranks with at least (1: plain max-pooling; smaller "
            "keeps more of the budget for the tokens that score high themselves)",
            field="pool_weight", native="pool_weight", range=(0.0, 1.0)),
    Setting("decode_scoring", str, "auto", "with flash attention, how queries are scored (all exact): "
            "lazy (store the queries of decode steps, and for alpha < 1 of prefill ubatches too, and "
            "score them in one batched product when the scores are needed), eager (each ubatch in its "
            "own graph: the unfused attention where every query row counts, else one extra K.q and "
            "softmax) or auto (lazy, but decode steps of a cache in host memory eager, with the "
            "unfused attention where ggml's CPU backend runs AVX-512 kernels on an Intel CPU, faster there than its "
            "flash-attention kernel for one query)",
            field="decode_scoring", native="decode_scoring", choices=("eager", "lazy", "auto")),
    Setting("positions", str, None, "position compaction for endless streams: cache (renumber the kept "
            "cells, re-rotating K, before positions reach twice the cache), training (only before the "
            "model's training context), absolute (never; the completion API stops at max_positions). "
            "Default: cache for RoPE models with granularity token, training per layer or head, "
            "absolute for learned positions (OPT, GPT-2)",
            choices=("cache", "training", "absolute")),
    Setting("kv_budget", int, None, "prompt compression: after each prompt (an eval of more than one "
            "token) keep this many cells of the sequence, chosen with the whole prompt's scores, moved "
            "to the front of the cache", range=(1, _INT32_MAX)),
    Setting("max_positions", int, None, "with a policy: the longest sequence the completion API "
            "runs to (default: the model's training context, at least n_ctx)",
            range=(1, _INT32_MAX)),
)

#: the rows that are fields of KVPolicy, by field name
POLICY_SETTINGS: Dict[str, Setting] = {s.field: s for s in SETTINGS if s.field is not None}
#: all rows, by their a2sf.Llama keyword
SETTINGS_BY_NAME: Dict[str, Setting] = {s.name: s for s in SETTINGS}


def _fields_from_settings(cls: type) -> type:
    """Declare KVPolicy's dataclass fields from :data:`SETTINGS` (before @dataclass)."""
    annotations = cls.__dict__.get("__annotations__", {})
    cls.__annotations__ = {**{f: s.type for f, s in POLICY_SETTINGS.items()}, **annotations}
    for f, s in POLICY_SETTINGS.items():
        setattr(cls, f, s.default)
    return cls


@dataclass(frozen=True)
@_fields_from_settings
class KVPolicy:
    """Base class: an eviction policy for llama.cpp's KV cache.

    Instances are frozen; derive variants with :meth:`replace` or
    :func:`make_policy` overrides. Subclasses pin the fields that define their
    method (e.g. :class:`H2O` pins ``forgetting_factor=1``); passing a pinned
    field raises TypeError.
    """

    # fields: one per row of SETTINGS with a ``field`` (see _fields_from_settings)

    #: engine ranking used by this policy
    kind: ClassVar[PolicyKind] = PolicyKind.SCORE
    #: name accepted by :func:`make_policy`
    name: ClassVar[str] = "score"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name, setting in POLICY_SETTINGS.items():
            # validated, and numpy scalars etc. normalised to plain Python types
            object.__setattr__(self, name, setting.check(getattr(self, name), owner))

    # -- helpers -----------------------------------------------------------
    @classmethod
    def settable_fields(cls) -> tuple:
        """Names of the fields this policy lets a caller set."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.init)

    def recent_window(self, n_kept: int) -> int:
        """Newest positions an eviction that keeps ``n_kept`` cells of a sequence never
        drops: ``n_recent``, or when it is None half of what is kept after the sinks
        (the engine's ``llama_kv_policy_cfg::n_recent_for``). With None, the newest
        ``recent_window(n_cells)`` positions of a sequence holding ``n_cells`` cells are
        kept at any time (cells only grow between evictions)."""
        if self.n_recent is not None:
            return self.n_recent
        return max(0, n_kept - min(n_kept, self.n_sink)) // 2

    @property
    def n_protected(self) -> int:
        """Cells of each sequence that are never evicted (sinks + recent)."""
        return self.n_sink + (self.n_recent or 0)

    def replace(self, **overrides: Any) -> "KVPolicy":
        """A copy with some fields changed (validated like the constructor)."""
        allowed = self.settable_fields()
        for key in overrides:
            if key not in allowed:
                pinned = {f.name for f in dataclasses.fields(self)}
                if key in pinned:
                    raise TypeError(
                        f"{type(self).__name__} fixes {key}="
                        f"{getattr(self, key)!r}; it cannot be overridden "
                        f"(settable: {', '.join(allowed) or 'none'})"
                    )
                raise TypeError(
                    f"{type(self).__name__} has no field {key!r} "
                    f"(settable: {', '.join(allowed) or 'none'})"
                )
        return dataclasses.replace(self, **overrides)

    def to_native(self) -> Dict[str, Any]:
        """Keyword arguments of ``a2sf._core.set_policy`` (minus the context)."""
        native = {"kind": int(self.kind)}
        for name, setting in POLICY_SETTINGS.items():
            if setting.native is not None:
                native[setting.native] = setting.to_native(getattr(self, name))
        return native

    def to_dict(self) -> Dict[str, Any]:
        """All fields plus the policy name (JSON-friendly)."""
        d = dataclasses.asdict(self)
        d["policy"] = self.name
        return d


@dataclass(frozen=True)
class NoEviction(KVPolicy):
    """Vanilla llama.cpp: no scores, no eviction; decoding stops when the cache is full.

    ``a2sf.Llama`` treats it exactly like ``kv_policy=None``.
    """

    n_sink: int = field(default=0, init=False)
    n_recent: int = field(default=0, init=False)
    evict_chunk: int = field(default=0, init=False)
    forgetting_factor: float = field(default=1.0, init=False)
    value_aware: bool = field(default=False, init=False)
    seed: int = field(default=0, init=False)
    granularity: str = field(default="token", init=False)
    mean_attention: bool = field(default=False, init=False)
    pool_kernel: int = field(default=1, init=False)
    pool_weight: float = field(default=SETTINGS_BY_NAME["pool_weight"].default, init=False)

    kind: ClassVar[PolicyKind] = PolicyKind.NONE
    name: ClassVar[str] = "none"


@dataclass(frozen=True)
class StreamingLLM(KVPolicy):
    """StreamingLLM: keep the ``n_sink`` first tokens and the newest ones.

    Xiao, Tian, Chen, Han, Lewis. "Efficient Streaming Language Models with
    Attention Sinks", arXiv:2309.17453 (ICLR 2024). No scores are computed;
    when the cache is full the oldest non-sink cells go first. Unlike the
    paper, positions are not re-assigned inside the cache (llama.cpp keeps each
    cell's original RoPE position).
    """

    forgetting_factor: float = field(default=1.0, init=False)
    value_aware: bool = field(default=False, init=False)
    granularity: str = field(default="token", init=False)
    mean_attention: bool = field(default=False, init=False)
    pool_kernel: int = field(default=1, init=False)
    pool_weight: float = field(default=SETTINGS_BY_NAME["pool_weight"].default, init=False)

    kind: ClassVar[PolicyKind] = PolicyKind.STREAMING
    name: ClassVar[str] = "streaming"


@dataclass(frozen=True)
class H2O(KVPolicy):
    """H2O, Heavy-Hitter Oracle: evict the cells with the least accumulated attention.

    Zhang et al. "H2O: Heavy-Hitter Oracle for Efficient Generative Inference
    of Large Language Models", arXiv:2306.14048 (NeurIPS 2023). Scores sum the
    softmax attention every query paid to a cell (forgetting factor 1), over
    heads and layers; a recent window is always kept.
    """

    forgetting_factor: float = field(default=1.0, init=False)

    name: ClassVar[str] = "h2o"


@dataclass(frozen=True)
class TOVA(KVPolicy):
    """TOVA, Token Omission Via Attention: rank cells by the newest query's attention.

    Oren, Hassid, Yarden, Adi, Schwartz. "Transformers are Multi-State RNNs",
    arXiv:2401.06104 (EMNLP 2024). Equivalent to forgetting factor 0: only the
    last query of the last ubatch counts.
    """

    forgetting_factor: float = field(default=0.0, init=False)

    name: ClassVar[str] = "tova"


@dataclass(frozen=True)
class A2SF(KVPolicy):
    """A2SF, Accumulative Attention Scoring with Forgetting factor.

    Jo & Shin. "A2SF: Accumulative Attention Scoring with Forgetting Factor for
    Token Pruning in Transformer Decoder", arXiv:2407.20485. Older attention
    is discounted: ``S <- alpha * S + A[q]`` per query, so a cell's score is
    ``sum_q alpha^(n-q) A[q, cell]``. The authors use alpha=0.95.
    """

    forgetting_factor: float = 0.95

    name: ClassVar[str] = "a2sf"


@dataclass(frozen=True)
class VATP(KVPolicy):
    """VATP, Value-Aware Token Pruning: attention weighted by the value vector's L1 norm.

    Guo, Kamigaito, Watanabe. "Attention Score is not All You Need for Token
    Importance Indicator in KV Cache Reduction: Value Also Matters",
    arXiv:2406.12335 (EMNLP 2024). Per head, attention to a cell is multiplied
    by ``||v_cell||_1`` of that head's value vector before accumulation. The
    base scorer is H2O (``forgetting_factor=1``); set another alpha to combine
    it with A2SF. The paper keeps 20 sink tokens; pass ``n_sink=20`` for that.
    """

    forgetting_factor: float = 1.0
    value_aware: bool = field(default=True, init=False)

    name: ClassVar[str] = "vatp"


@dataclass(frozen=True)
class MeanAttention(KVPolicy):
    """Mean attention: accumulated attention divided by the queries that saw the token.

    kvpress's ``ObservedAttentionPress`` (NVIDIA kvpress; after H2O, Zhang et al.,
    arXiv:2306.14048): H2O's sum favours old tokens simply because more queries
    saw them; the mean does not. Forgetting factor 1 (every query counts alike).
    Most useful with ``granularity="head"`` and prompt compression (``kv_budget``).
    """

    forgetting_factor: float = field(default=1.0, init=False)
    mean_attention: bool = field(default=True, init=False)

    name: ClassVar[str] = "mean"


@dataclass(frozen=True)
class RandomEviction(KVPolicy):
    """Random eviction among unprotected cells: the baseline any scorer must beat.

    Sinks and the recent window are protected as for the other policies; the
    remaining cells are dropped uniformly at random (deterministic per ``seed``).
    """

    forgetting_factor: float = field(default=1.0, init=False)
    value_aware: bool = field(default=False, init=False)
    granularity: str = field(default="token", init=False)
    mean_attention: bool = field(default=False, init=False)
    pool_kernel: int = field(default=1, init=False)
    pool_weight: float = field(default=SETTINGS_BY_NAME["pool_weight"].default, init=False)

    kind: ClassVar[PolicyKind] = PolicyKind.RANDOM
    name: ClassVar[str] = "random"


#: name -> class, the names :func:`make_policy` accepts
POLICIES: Dict[str, Type[KVPolicy]] = {
    cls.name: cls
    for cls in (NoEviction, StreamingLLM, TOVA, H2O, A2SF, VATP, MeanAttention, RandomEviction)
}
#: the policy names, the one list the CLI, eval and bench use
POLICY_NAMES: Tuple[str, ...] = tuple(POLICIES)
_ALIASES = {
    "streamingllm": "streaming",
    "sink": "streaming",
    "h2o": "h2o",
    "a2sf": "a2sf",
    "vatp": "vatp",
    "tova": "tova",
    "random": "random",
    "mean": "mean",
    "observedattention": "mean",
    "none": "none",
    "no": "none",
}

PolicySpec = Union[None, str, KVPolicy, Type[KVPolicy]]


def make_policy(spec: PolicySpec, **overrides: Any) -> Optional[KVPolicy]:
    """Build a policy from ``None``, a name, a class or an instance.

    ``make_policy(None)`` is ``None`` (no policy). Names (case-insensitive):
    ``none``, ``streaming``, ``h2o``, ``tova``, ``a2sf``, ``vatp``, ``random``.
    Keyword overrides replace fields; an override whose value is ``None`` counts
    as not given. Raises TypeError for wrong types or fields the policy pins,
    ValueError for unknown names and out-of-range values.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if spec is None:
        if overrides:
            raise ValueError(
                f"policy settings {sorted(overrides)} given without a policy "
                f"(kv_policy is None); name one of {sorted(POLICIES)}"
            )
        return None
    if isinstance(spec, KVPolicy):
        return spec.replace(**overrides) if overrides else spec
    if isinstance(spec, type) and issubclass(spec, KVPolicy):
        return spec().replace(**overrides) if overrides else spec()
    if isinstance(spec, str):
        key = spec.strip().lower().replace("-", "").replace("_", "")
        key = _ALIASES.get(key, key)
        if key not in POLICIES:
            raise ValueError(
                f"unknown KV policy {spec!r}; expected one of {sorted(POLICIES)}"
            )
        policy = POLICIES[key]()
        return policy.replace(**overrides) if overrides else policy
    raise TypeError(
        "kv_policy must be None, a policy name, a KVPolicy class or instance, "
        f"got {type(spec).__name__} ({spec!r})"
    )


def policy_from_settings(
    kv_policy: PolicySpec = None, **settings: Any
) -> Tuple[Optional[KVPolicy], Dict[str, Any]]:
    """The policy, and the Python-only settings, that ``a2sf.Llama``'s keywords name.

    ``settings`` are rows of :data:`SETTINGS` by name (``kv_seed=3``,
    ``max_positions=4096``); ``None`` counts as not given. Returns the policy
    (:func:`make_policy` with the rows that set a field) and a dict of the given
    rows that set none (e.g. ``{"max_positions": 4096}``), each validated.
    Raises TypeError for unknown names and wrong types, ValueError for
    out-of-range values and for Python-only settings without a policy.
    """
    unknown = sorted(set(settings) - set(SETTINGS_BY_NAME))
    if unknown:
        raise TypeError(
            f"unknown policy settings {unknown}; expected some of {sorted(SETTINGS_BY_NAME)}"
        )
    given = {SETTINGS_BY_NAME[k]: v for k, v in settings.items() if v is not None}
    policy = make_policy(kv_policy, **{s.field: v for s, v in given.items() if s.field is not None})
    extras = {s.name: s.check(v) for s, v in given.items() if s.field is None}
    if extras and (policy is None or policy.kind == PolicyKind.NONE):
        raise ValueError(
            f"{', '.join(extras)} needs a kv_policy other than none "
            "(without one nothing is evicted and the limit is n_ctx)"
        )
    return policy, extras
