"""What the speed benchmarks share: opening a model, greedy decoding, a text to feed.

``a2sf.bench`` and ``a2sf.bench_kvpress`` both import from here (and not from
each other).
"""
from __future__ import annotations

from typing import List

import numpy as np

__all__ = ["open_llama", "last_logits", "greedy", "text_tokens"]


def open_llama(model: str, n_ctx: int, policy, flash_attn: bool, n_threads: int, n_batch: int,
               n_gpu_layers: int = 0):
    """An a2sf Llama with n_batch == n_ubatch and the same threads for prefill and decode
    (``n_gpu_layers``: layers offloaded to a GPU build's device, -1 all).

    ``policy`` is a policy name, optionally with ``+<setting>=<value>`` overrides
    (``"a2sf+decode_scoring=eager"``), or None for vanilla llama.cpp."""
    from a2sf import Llama

    from .policies import SETTINGS_BY_NAME

    kw = {}
    if policy is not None and "+" in policy:
        policy, *overrides = policy.split("+")
        for name, text in (o.split("=", 1) for o in overrides):
            kind = SETTINGS_BY_NAME[name].type  # the table row's type: "n_recent=64" is an int
            kw[name] = text.lower() == "true" if kind is bool else kind(text)
    return Llama(model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, kv_policy=policy, flash_attn=flash_attn,
                 n_threads=n_threads, n_threads_batch=n_threads, n_gpu_layers=n_gpu_layers, verbose=False, **kw)


def last_logits(llm) -> np.ndarray:
    """llama.cpp's logits of the last evaluated token, F32 [n_vocab]: a view of its buffer,
    valid until the next eval (copy it to keep it)."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))


def greedy(llm) -> int:
    """Argmax of the last logits row."""
    return int(np.argmax(last_logits(llm)))


def text_tokens(llm, n: int, source: str = "austen") -> List[int]:
    """The first ``n`` tokens of the texts of ``source`` (see ``a2sf.eval.data.load_texts``).

    The texts are joined in file order and repeated if shorter than ``n``
    tokens. No text is an error: a benchmark fed a made-up sentence would
    measure something else without saying so.
    """
    from .eval.data import load_texts

    try:
        texts = load_texts(source)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"the benchmark needs a text to feed ({source!r}): {e}") from None
    toks = llm.tokenize("\n".join(texts.values()).encode(), add_bos=True)
    if len(toks) < 2:
        raise ValueError(f"the texts of {source!r} tokenize to {len(toks)} token(s)")
    while len(toks) < n:
        toks = toks + toks
    return toks[:n]
