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
  the caller chose that do not;
* grows ``input_ids`` (and ``scores`` under ``logits_all``) as the sequence
  grows, instead of the parent's fixed ``n_ctx`` rows;
* lifts the completion API's context-window limit to ``max_positions``
  (default: the model's training context): prompts longer than ``n_ctx`` are
  fed in chunks of ``n_batch``, and ``max_tokens=None`` means "until
  ``max_positions``";
* never reuses a cached prefix that eviction has punched holes in: a new
  prompt that does not continue the evaluated tokens, once any of the cells it
  would keep were evicted, starts from an empty cache.

Note: ``logits_all=True`` keeps one row of logits per position ever evaluated
(n_vocab floats each), so very long generations with it cost memory.
"""
from __future__ import annotations

import ctypes
import inspect
import os
import struct
import sys
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import numpy as np

import llama_cpp

from .policies import SETTINGS_BY_NAME, KVPolicy, PolicyKind, make_policy, policy_from_settings

__all__ = ["Llama", "KVScores"]

# the parent's own n_batch default (llama_cpp.Llama.__init__)
_PARENT_N_BATCH = 512
_INT32_MAX = 2**31 - 1

# Architectures whose positions index a learned table of n_ctx_train rows: a
# position past it would abort inside llama.cpp (get_rows out of range), so
# a2sf.Llama refuses such settings and evals in Python first.
_LEARNED_POSITION_ARCHS = frozenset({"opt", "gpt2", "starcoder"})


def _learned_position_limit(llm: "llama_cpp.Llama") -> Optional[int]:
    """n_ctx_train if the loaded model has learned absolute positions, else None."""
    buf = (ctypes.c_char * 64)()
    n = llama_cpp.llama_model_meta_val_str(llm._model.model, b"general.architecture", buf, len(buf))
    arch = buf.value.decode("utf-8", "replace") if n > 0 else ""
    n_ctx_train = int(llm._model.n_ctx_train())  # 0 with vocab_only: nothing to check
    return n_ctx_train if arch in _LEARNED_POSITION_ARCHS and n_ctx_train > 0 else None


def _core():
    """a2sf._core, imported on first use (the parent class works without it)."""
    try:
        from . import _core as core  # type: ignore[attr-defined]
    except ImportError as e:  # pragma: no cover - depends on the build
        raise ImportError(
            "a2sf._core (the native eviction engine bindings) could not be imported; "
            "kv_policy needs a2sf built against the patched libllama "
            f"(bash scripts/setup.sh): {e}"
        ) from e
    return core


@dataclass
class KVScores:
    """Cells of one sequence, ordered by position (see :meth:`Llama.kv_scores`)."""

    positions: np.ndarray  # int32 [n_cells]
    cells: np.ndarray  # int32 [n_cells]: cell index in the KV cache
    scores: np.ndarray  # float32 [n_layers, n_cells]

    @property
    def total(self) -> np.ndarray:
        """Score summed over layers (what eviction ranks by), float64 [n_cells]."""
        return self.scores.sum(axis=0, dtype=np.float64)

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    # dict-style access, for callers that prefer kv_scores()["scores"]
    def __getitem__(self, key: str) -> np.ndarray:
        if key not in ("positions", "cells", "scores"):
            raise KeyError(key)
        return getattr(self, key)

    def keys(self):
        return ("positions", "cells", "scores")


# -- GGUF header: the training context, to resolve n_ctx=0 before loading ---------
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}


def _gguf_context_length(path: str) -> Optional[int]:
    """``<arch>.context_length`` from a GGUF header, or None if it can't be read."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return None
            (version,) = struct.unpack("<I", f.read(4))
            if version < 2:
                return None
            _n_tensors, n_kv = struct.unpack("<QQ", f.read(16))

            def read_str() -> str:
                (n,) = struct.unpack("<Q", f.read(8))
                return f.read(n).decode("utf-8", errors="replace")

            def read_val(t: int):
                if t in _GGUF_SCALARS:
                    fmt = _GGUF_SCALARS[t]
                    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
                if t == 8:
                    return read_str()
                if t == 9:
                    (it,) = struct.unpack("<I", f.read(4))
                    (n,) = struct.unpack("<Q", f.read(8))
                    if it in _GGUF_SCALARS:  # skip without decoding
                        f.seek(n * struct.calcsize(_GGUF_SCALARS[it]), os.SEEK_CUR)
                        return None
                    for _ in range(n):
                        read_val(it)
                    return None
                raise ValueError(f"unknown GGUF value type {t}")

            arch = None
            values: Dict[str, Any] = {}
            for _ in range(n_kv):
                key = read_str()
                (t,) = struct.unpack("<I", f.read(4))
                v = read_val(t)
                if key == "general.architecture":
                    arch = v
                elif key.endswith(".context_length"):
                    values[key] = v
                if arch is not None and f"{arch}.context_length" in values:
                    return int(values[f"{arch}.context_length"])
            return None
    except (OSError, struct.error, ValueError):
        return None


def _diagnose_model_file(path: Any) -> str:
    """Why llama.cpp may have refused to load ``path``: a sentence, or "" if the
    file looks like a complete GGUF of a known architecture.

    Only called after a load failed, to turn llama.cpp's "Failed to load model"
    into a message that names the problem (not a GGUF, truncated, unknown
    architecture).
    """
    try:
        path = os.fspath(path)
    except TypeError:
        return ""
    if os.path.isdir(path):
        return "it is a directory, not a GGUF file"
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")
    except OSError as e:
        return f"it cannot be read ({e.strerror})"
    with f:
        magic = f.read(4)
        if size == 0:
            return "the file is empty"
        if magic != b"GGUF":
            return f"it is not a GGUF file (starts with {magic!r}, not b'GGUF')"
        try:
            (version,) = struct.unpack("<I", f.read(4))
            n_tensors, n_kv = struct.unpack("<QQ", f.read(16))
            if n_kv > size or n_tensors > size:
                return f"the GGUF header is corrupt ({n_kv} keys, {n_tensors} tensors in {size} bytes)"

            def take(n: int) -> bytes:
                b = f.read(n)
                if len(b) != n:
                    raise EOFError
                return b

            def read_str() -> str:
                (n,) = struct.unpack("<Q", take(8))
                if n > size:
                    raise EOFError
                return take(n).decode("utf-8", errors="replace")

            def read_val(t: int):
                if t in _GGUF_SCALARS:
                    fmt = _GGUF_SCALARS[t]
                    return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]
                if t == 8:
                    return read_str()
                if t == 9:
                    (it,) = struct.unpack("<I", take(4))
                    (n,) = struct.unpack("<Q", take(8))
                    if n > size:
                        raise EOFError
                    for _ in range(n):
                        read_val(it)
                    return None
                raise ValueError(f"unknown GGUF value type {t}")

            meta: Dict[str, Any] = {}
            for _ in range(n_kv):
                key = read_str()
                (t,) = struct.unpack("<I", take(4))
                meta[key] = read_val(t)
            data_end = 0
            tensor_sizes = None
            try:
                import gguf  # for the byte size of each tensor type

                tensor_sizes = gguf.GGML_QUANT_SIZES
            except ImportError:  # pragma: no cover
                pass
            for _ in range(n_tensors):
                read_str()
                (n_dims,) = struct.unpack("<I", take(4))
                dims = struct.unpack(f"<{n_dims}Q", take(8 * n_dims))
                (ttype,) = struct.unpack("<I", take(4))
                (offset,) = struct.unpack("<Q", take(8))
                if tensor_sizes is not None:
                    try:
                        block, nbytes = tensor_sizes[gguf.GGMLQuantizationType(ttype)]
                    except (ValueError, KeyError):
                        return f"a tensor has an unknown type id {ttype}"
                    n_el = 1
                    for d in dims:
                        n_el *= int(d)
                    data_end = max(data_end, offset + n_el // block * nbytes)
        except (EOFError, struct.error):
            return f"the GGUF file is truncated ({size} bytes end inside its header)"
        except ValueError as e:
            return f"the GGUF header is corrupt ({e})"
        align = meta.get("general.alignment", 32) or 32
        data_start = (f.tell() + align - 1) // align * align
        if data_start + data_end > size:
            return (f"the GGUF file is truncated: its tensors need {data_start + data_end} bytes, "
                    f"the file has {size}")
        arch = meta.get("general.architecture")
        if arch is None:
            return "the GGUF has no general.architecture"
        try:
            import gguf

            known = set(gguf.MODEL_ARCH_NAMES.values())
        except ImportError:  # pragma: no cover
            known = set()
        if known and arch not in known:
            return f"its architecture {arch!r} is not one llama.cpp supports"
    return ""


def _ctx_address(ctx: Any) -> int:
    v = getattr(ctx, "value", ctx)
    if v is None:
        raise ValueError("the llama_context is closed")
    return int(v)


def _check_seq_id(seq_id: Any) -> None:
    if isinstance(seq_id, bool) or not isinstance(seq_id, int):
        raise TypeError(f"seq_id must be an int, got {type(seq_id).__name__} ({seq_id!r})")
    if not 0 <= seq_id <= _INT32_MAX:
        raise ValueError(f"seq_id must be in [0, 2^31-1], got {seq_id!r}")


class Llama(llama_cpp.Llama):
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
    """

    def __init__(self, model_path: str, *, kv_policy: Any = None, **kwargs: Any):
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
        max_positions = extras.get("max_positions")
        self._kv_policy: Optional[KVPolicy] = policy
        self._a2sf_max_positions: Optional[int] = None
        self._a2sf_generating = 0  # generate() calls in progress (see set_kv_policy)
        active = policy is not None and policy.kind != PolicyKind.NONE

        if not active:
            self._a2sf_load(model_path, kwargs)
            self._a2sf_check_positions(None)
            return

        kwargs = self._a2sf_fit_batch(model_path, policy, kwargs)
        if max_positions is not None:
            if max_positions < kwargs["n_ctx"]:
                raise ValueError(
                    f"max_positions ({max_positions}) must be at least n_ctx ({kwargs['n_ctx']})"
                )
        core = _core()  # fail before loading the model if the engine is missing
        self._a2sf_load(model_path, kwargs)
        self._a2sf_check_positions(max_positions)

        self._a2sf_max_positions = max_positions
        core.set_policy(_ctx_address(self._ctx.ctx), **policy.to_native())
        self._a2sf_lift_limits()

    # -- set-up helpers ------------------------------------------------------
    def _a2sf_load(self, model_path: Any, kwargs: Dict[str, Any]) -> None:
        """llama_cpp.Llama.__init__, with its load failures explained."""
        for name in ("n_batch", "n_ubatch"):
            v = kwargs.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        try:
            super().__init__(model_path, **kwargs)
        except ValueError as e:
            msg = str(e)
            if msg.startswith("Failed to load model"):
                why = _diagnose_model_file(model_path)
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

    @staticmethod
    def _a2sf_fit_batch(model_path: str, policy: KVPolicy, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """Resolve n_ctx and choose (or check) n_batch / n_ubatch for the policy."""
        kwargs = dict(kwargs)
        n_ctx = kwargs.get("n_ctx", 512)
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 0 <= n_ctx <= _INT32_MAX:
            raise ValueError(f"n_ctx must be an int in [0, 2^31-1], got {n_ctx!r}")
        if n_ctx == 0:
            n_ctx_train = _gguf_context_length(model_path) if os.path.exists(model_path) else None
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

        def user_value(name: str) -> Optional[int]:
            v = kwargs.get(name)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
            if protected + v >= n_ctx:
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
                n_batch = max(1, min(_PARENT_N_BATCH, room - 1, n_ctx // 4))
        kwargs["n_batch"] = n_batch
        kwargs["n_ubatch"] = min(n_batch, n_ubatch) if n_ubatch is not None else n_batch
        return kwargs

    def _a2sf_check_positions(self, max_positions: Optional[int]) -> None:
        """Learned-position models (OPT, GPT-2): n_ctx and max_positions must fit
        the position table; positions are never shifted, so this is a hard limit."""
        limit = self._a2sf_position_limit = _learned_position_limit(self)
        if limit is None:
            return
        for name, v in (("n_ctx", self.n_ctx()), ("max_positions", max_positions)):
            if v is not None and v > limit:
                self.close()
                raise ValueError(
                    f"{name}={v} exceeds this model's {limit} learned positions "
                    "(absolute position embeddings; positions are never shifted)")

    def _a2sf_lift_limits(self) -> None:
        """With a policy, the completion API's 'context window' is max_positions."""
        n_ctx = self.n_ctx()
        limit = self._a2sf_max_positions
        if limit is None:
            try:
                limit = int(self._model.n_ctx_train())
            except Exception:  # pragma: no cover
                limit = n_ctx
        self._n_ctx = max(limit, n_ctx)
        self._a2sf_reserve(self.n_tokens + self.n_batch)

    @property
    def a2sf_active(self) -> bool:
        """True while a policy that evicts is in force (not None / NoEviction)."""
        p = getattr(self, "_kv_policy", None)
        return p is not None and p.kind != PolicyKind.NONE

    def _a2sf_reserve(self, n: int) -> None:
        """Grow input_ids (and scores under logits_all) to hold at least n positions."""
        have = self.input_ids.shape[0]
        if n <= have:
            return
        new = max(n, 2 * have)
        ids = np.zeros((new,), dtype=self.input_ids.dtype)
        ids[:have] = self.input_ids
        self.input_ids = ids
        if self._logits_all and self.scores.shape[0] < new:
            sc = np.zeros((new, self.scores.shape[1]), dtype=self.scores.dtype)
            sc[: self.scores.shape[0]] = self.scores
            self.scores = sc

    # -- public API ----------------------------------------------------------
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
        if getattr(self, "_a2sf_generating", 0):
            raise RuntimeError(
                "cannot change the kv_policy while generate()/create_completion() is running; "
                "finish or close the generator first"
            )
        core = _core()
        ctx = _ctx_address(self._ctx.ctx)
        if active:
            n_ctx = self.n_ctx()
            if policy.n_protected + self.n_batch >= n_ctx:
                raise ValueError(
                    f"n_sink + n_recent + n_batch = {policy.n_protected + self.n_batch} must be "
                    f"< n_ctx = {n_ctx} for {type(policy).__name__}"
                )
            core.set_policy(ctx, **policy.to_native())
            self._kv_policy = policy
            self._a2sf_lift_limits()
        else:
            was_evicting = self.n_tokens > 0 and self._a2sf_cells_lost()
            core.set_policy(ctx, kind=int(PolicyKind.NONE))
            self._kv_policy = policy
            self._n_ctx = self.n_ctx()
            if was_evicting or self.n_tokens > self._n_ctx:
                self.reset()
        return policy

    def kv_scores(self, seq_id: int = 0) -> KVScores:
        """Positions, cell indices and per-layer scores of the cells of ``seq_id``."""
        _check_seq_id(seq_id)
        pos, cells, scores = _core().scores(_ctx_address(self._ctx.ctx), seq_id)
        return KVScores(positions=pos, cells=cells, scores=scores)

    def kv_n_cells(self, seq_id: int = 0) -> int:
        """Number of KV cells holding ``seq_id``."""
        _check_seq_id(seq_id)
        return int(_core().n_cells(_ctx_address(self._ctx.ctx), seq_id))

    def kv_stats(self) -> Dict[str, Any]:
        """Eviction statistics: evictions, cells_evicted, cells_used, evict_seconds."""
        s = _core().stats(_ctx_address(self._ctx.ctx))
        return {
            "evictions": int(s["n_evictions"]),
            "cells_evicted": int(s["n_cells_evicted"]),
            "cells_used": int(s["n_cells_used"]),
            "evict_seconds": float(s["t_evict_us"]) / 1e6,
        }

    def kv_evict(self, n_free: int, seq_id: int = 0) -> int:
        """Evict ``n_free`` cells of ``seq_id`` now, by the policy's ranking.

        Decode does this by itself when the cache is full; this is for tests and
        tools. Returns the number of cells freed.
        """
        if isinstance(n_free, bool) or not isinstance(n_free, int) or n_free < 0:
            raise ValueError(f"n_free must be a non-negative int, got {n_free!r}")
        if n_free > _INT32_MAX:
            raise ValueError(f"n_free must be at most 2^31-1, got {n_free!r}")
        _check_seq_id(seq_id)
        return int(_core().evict(_ctx_address(self._ctx.ctx), seq_id, n_free))

    def kv_reset_stats(self) -> None:
        """Zero the eviction statistics."""
        _core().reset_stats(_ctx_address(self._ctx.ctx))

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

    # -- overrides (policy only; plain parent behaviour otherwise) ------------
    def _a2sf_check_open(self, what: str) -> None:
        ctx = getattr(getattr(self, "_ctx", None), "ctx", None)
        if ctx is None or getattr(getattr(self, "_model", None), "model", None) is None:
            raise ValueError(f"{what}: the model was closed (Llama.close()); create a new Llama")

    def _a2sf_check_tokens(self, tokens: Sequence[int], what: str) -> None:
        """Token ids llama.cpp would reject (decode) or abort on (detokenize)."""
        arr = np.asarray(tokens)
        if arr.size == 0:
            return
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise TypeError(f"{what}: tokens must be a sequence of int token ids, got {arr.dtype} "
                            f"with shape {arr.shape}")
        n_vocab = self._n_vocab
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= n_vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{what}: token id {bad} is out of range [0, {n_vocab}) of this model's vocabulary")

    def tokenize(self, text: bytes, *args: Any, **kwargs: Any):
        self._a2sf_check_open("tokenize")
        if not isinstance(text, (bytes, bytearray)):
            raise TypeError(f"tokenize expects bytes (e.g. text.encode('utf-8')), got {type(text).__name__}")
        return super().tokenize(bytes(text), *args, **kwargs)

    def detokenize(self, tokens: Sequence[int], *args: Any, **kwargs: Any) -> bytes:
        self._a2sf_check_open("detokenize")
        self._a2sf_check_tokens(tokens, "detokenize")
        return super().detokenize(tokens, *args, **kwargs)

    def create_completion(self, prompt: Any, *args: Any, **kwargs: Any):
        # the parent reads the vocabulary (token_bos ...) before anything else checks:
        # after close() that is freed memory (found by scripts/sanitize.sh)
        self._a2sf_check_open("create_completion")
        if not isinstance(prompt, (str, list, tuple, np.ndarray)):
            hint = " (decode the bytes to str first)" if isinstance(prompt, (bytes, bytearray)) else ""
            raise TypeError(
                f"prompt must be a str or a list of token ids, got {type(prompt).__name__}{hint}"
            )
        return super().create_completion(prompt, *args, **kwargs)

    def token_bos(self) -> int:
        self._a2sf_check_open("token_bos")
        return super().token_bos()

    def token_eos(self) -> int:
        self._a2sf_check_open("token_eos")
        return super().token_eos()

    def save_state(self):
        self._a2sf_check_open("save_state")
        return super().save_state()

    def eval(self, tokens: Sequence[int]):
        self._a2sf_check_open("eval")
        self._a2sf_check_tokens(tokens, "eval")
        limit = getattr(self, "_a2sf_position_limit", None)
        if limit is not None and self.n_tokens + len(tokens) > limit:
            raise ValueError(
                f"evaluating {len(tokens)} tokens after {self.n_tokens} would pass this model's "
                f"{limit} learned positions (absolute position embeddings)")
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

    def load_state(self, state) -> None:
        """Restore a :meth:`save_state` snapshot, scores and value norms included.

        The state carries each cell's per-layer score (and VATP value norms), so
        the restored context evicts exactly as the one that saved it. A state
        that does not fit this context (another model, a different kind of
        policy: scored vs not, value-aware vs not, a cache too small, a truncated
        buffer) raises RuntimeError naming the reason; the context is then left
        empty (n_tokens = 0), never holding a half-restored cache.
        """
        self._a2sf_check_open("load_state")
        if not isinstance(state, llama_cpp.LlamaState):
            raise TypeError(
                f"load_state expects a LlamaState from save_state(), got {type(state).__name__}"
            )
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
        try:
            super().load_state(state)
        except Exception as e:
            reason = ""
            try:
                reason = _core().state_error()
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

    def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any):
        # checked here, when called, not at the generator's first step
        self._a2sf_check_open("generate")
        if len(tokens) == 0:
            raise ValueError("generate: the token list is empty (give at least one token, e.g. BOS)")
        self._a2sf_check_tokens(tokens, "generate")
        return self._a2sf_generate_guarded(tokens, *args, **kwargs)

    def _a2sf_generate_guarded(self, tokens: Sequence[int], *args: Any, **kwargs: Any):
        # set_kv_policy refuses while this generator is alive
        self._a2sf_generating += 1
        try:
            if self.a2sf_active:
                inner = self._a2sf_generate(tokens, *args, **kwargs)
            else:
                inner = super().generate(tokens, *args, **kwargs)
            return (yield from inner)
        finally:
            self._a2sf_generating -= 1

    _GENERATE_SIGNATURE = inspect.signature(llama_cpp.Llama.generate)

    def _a2sf_generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any):
        bound = self._GENERATE_SIGNATURE.bind(self, tokens, *args, **kwargs)
        reset = bound.arguments.get("reset", True)
        if reset and self.n_tokens > 0:
            self._a2sf_drop_evicted_prefix(list(tokens))
        return (yield from super().generate(tokens, *args, **kwargs))

    def _a2sf_cells_lost(self) -> bool:
        """True if seq 0 holds fewer cells than evaluated positions (eviction happened)."""
        return _core().n_cells(_ctx_address(self._ctx.ctx), 0) < self.n_tokens

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
        if keep > 0:
            pos, _, _ = _core().scores(_ctx_address(self._ctx.ctx), 0)
            if int(np.count_nonzero(pos < keep)) == keep:
                return  # positions [0, keep) all present
        if self.verbose:
            print(
                f"a2sf.Llama.generate: the cache lost evicted cells of the {keep} reusable "
                "prompt tokens; re-evaluating the prompt from scratch",
                file=sys.stderr,
            )
        self.reset()

    def close(self) -> None:
        if "_stack" not in self.__dict__:
            return  # __init__ raised (bad settings) before the parent set anything up
        super().close()

    def __getstate__(self):
        state = super().__getstate__()
        if self._kv_policy is not None:
            state["kv_policy"] = self._kv_policy
            if self._a2sf_max_positions is not None:
                state["max_positions"] = self._a2sf_max_positions
        return state
