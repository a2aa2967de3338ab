"""Closed-object and input guards: bad calls raise a clear Python exception.

llama-cpp-python hands most arguments straight to llama.cpp, where a freed
model or an out-of-range token id is a crash (or a GGML_ASSERT), not an
error. Every public entry point that reaches native code checks first.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

import llama_cpp

from .base import _INT32_MAX, PolicyBase


def check_seq_id(seq_id: Any) -> None:
    if isinstance(seq_id, bool) or not isinstance(seq_id, int):
        raise TypeError(f"seq_id must be an int, got {type(seq_id).__name__} ({seq_id!r})")
    if not 0 <= seq_id <= _INT32_MAX:
        raise ValueError(f"seq_id must be in [0, 2^31-1], got {seq_id!r}")


class InputGuards(PolicyBase):
    """Checks before the parent's methods: the object is open, the input is what llama.cpp takes."""

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
        return super().eval(tokens)

    def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any):
        # checked here, when called, not at the generator's first step
        self._a2sf_check_open("generate")
        if len(tokens) == 0:
            raise ValueError("generate: the token list is empty (give at least one token, e.g. BOS)")
        self._a2sf_check_tokens(tokens, "generate")
        return super().generate(tokens, *args, **kwargs)

    def load_state(self, state) -> None:
        self._a2sf_check_open("load_state")
        if not isinstance(state, llama_cpp.LlamaState):
            raise TypeError(
                f"load_state expects a LlamaState from save_state(), got {type(state).__name__}"
            )
        return super().load_state(state)

    def close(self) -> None:
        if "_stack" not in self.__dict__:
            return  # __init__ raised (bad settings) before the parent set anything up
        super().close()
