"""Damaged copies of a state, each restored in a child process (tests/test_state_fuzz.py).

The parent builds a per-head a2sf state after evictions (:func:`make_llm`,
:func:`source_states`), damages copies (:func:`corrupt`: flipped bytes, overwritten
runs, length fields set huge, truncation, a flipped byte inside K/V) and runs each
with ``python -m a2sf.testing.state_fuzz CASE.npz``: the child restores it into a
fresh context (``load_state`` or ``llama_state_seq_set_data``), then either
generates a few greedy tokens (restored) or checks that the context is empty and
still decodes (refused), and prints one JSON line. An abort or a crash shows up as
the child's exit status.
"""
from __future__ import annotations

import ctypes
import json
import re
import resource
import sys
from typing import Dict, List, Tuple

import numpy as np

SETTINGS = dict(n_ctx=256, kv_policy="a2sf", granularity="head", n_sink=2, n_recent=16, evict_chunk=4,
                n_threads=1, n_threads_batch=1, seed=1, verbose=False)
N_PROMPT = 400
N_GREEDY = 8
NEXT_TOKEN = 7


def make_llm(model: str):
    from a2sf import Llama

    return Llama(model, **SETTINGS)


def prompt() -> List[int]:
    return np.random.default_rng(0).integers(3, 300, size=N_PROMPT).tolist()


def _logits(llm) -> np.ndarray:
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def continue_greedy(llm) -> Tuple[List[int], bool]:
    """Feed NEXT_TOKEN, then N_GREEDY greedy tokens; (tokens, every logit row finite)."""
    llm.eval([NEXT_TOKEN])
    toks, finite = [], True
    for _ in range(N_GREEDY):
        lg = _logits(llm)
        finite &= bool(np.isfinite(lg).all())
        t = int(np.argmax(lg))
        toks.append(t)
        llm.eval([t])
    finite &= bool(np.isfinite(_logits(llm)).all())
    return toks, finite


def adopt(llm, input_ids, n_tokens: int) -> None:
    """The Python bookkeeping a raw sequence restore leaves to the caller: the tokens."""
    llm.input_ids = np.array(input_ids, dtype=np.intc).copy()
    llm.n_tokens = int(n_tokens)


def seq_get(llm, seq_id: int = 0) -> bytes:
    import llama_cpp

    n = llama_cpp.llama_state_seq_get_size(llm.ctx, seq_id)
    buf = (ctypes.c_uint8 * n)()
    assert llama_cpp.llama_state_seq_get_data(llm.ctx, buf, n, seq_id) == n
    return bytes(buf)


def seq_set(llm, data: bytes, seq_id: int = 0) -> int:
    import llama_cpp

    buf = (ctypes.c_uint8 * max(1, len(data))).from_buffer_copy(data if data else b"\0")
    return int(llama_cpp.llama_state_seq_set_data(llm.ctx, buf, len(data), seq_id))


def source_states(model: str):
    """(the Llama that saved them, its LlamaState, its sequence-0 state bytes) after a
    prompt longer than the cache (evictions, per-head moves)."""
    llm = make_llm(model)
    llm.eval(prompt())
    return llm, llm.save_state(), seq_get(llm)


def verified_sources(model: str) -> Dict:
    """The states of :func:`source_states`, checked to be worth damaging: saved after
    evictions, per head (some head holds other tokens than layer 0 head 0), and a
    whole-context and a sequence restore into fresh contexts continue exactly as the
    saver does. Keys: model, state, seq, n_tokens, input_ids, reference {"whole", "seq"}
    (the greedy tokens of each undamaged restore)."""
    llm, state, seq = source_states(model)
    assert llm.kv_stats()["evictions"] > 0
    pos, _ = llm.kv_head_scores()
    assert (pos != pos[:1, :1]).any(), "not a per-head state (no head holds other tokens than head 0)"
    ref_whole = make_llm(model)
    ref_whole.load_state(state)
    ref_seq = make_llm(model)
    assert seq_set(ref_seq, seq) == len(seq)
    adopt(ref_seq, llm.input_ids, llm.n_tokens)
    n_tokens, input_ids = llm.n_tokens, llm.input_ids.copy()
    saver = continue_greedy(llm)[0]  # the context that saved them, going on
    whole, seq_tokens = continue_greedy(ref_whole)[0], continue_greedy(ref_seq)[0]
    assert whole == saver and seq_tokens == saver, "an undamaged restore does not continue as its saver"
    return dict(model=model, state=state, seq=seq, n_tokens=n_tokens, input_ids=input_ids,
                reference={"whole": whole, "seq": seq_tokens})


# -- damage --------------------------------------------------------------------------------
KINDS = ("flip", "run", "huge", "truncate", "kv_flip")


def corrupt(data: bytes, kind: str, case: int, seed: int = 0) -> Tuple[bytes, Dict]:
    """A damaged copy of a ``kind`` ("whole"/"seq") state and what was done: the kind of
    damage, the first changed offset (``at``; truncation: the new length)."""
    from a2sf.testing.state_format import parse

    lay = parse(data, kind)
    rng = np.random.default_rng([seed, case, 0 if kind == "whole" else 1])
    how = KINDS[case % len(KINDS)]
    out = bytearray(data)
    info: Dict = {"how": how}
    if how == "flip":
        offs = sorted(int(o) for o in rng.choice(len(data), size=int(rng.integers(1, 5)), replace=False))
        for o in offs:
            out[o] ^= int(rng.integers(1, 256))
        info["offsets"] = offs
    elif how == "run":
        n = int(rng.integers(8, 65))
        o = int(rng.integers(0, len(data) - n))
        out[o:o + n] = rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
        info["offsets"] = [o, o + n - 1]
    elif how == "huge":
        # one kind of length field (cell counts, row sizes, string lengths, ...), then one of its instances
        groups: Dict[str, list] = {}
        for f in lay.length_fields():
            groups.setdefault(re.sub(r"\d+", "#", f.name), []).append(f)
        group = groups[sorted(groups)[int(rng.integers(0, len(groups)))]]
        f = group[int(rng.integers(0, len(group)))]
        big = [0xFFFFFFFF, 0x7FFFFFFF, 0x10000000][int(rng.integers(0, 3))]
        if f.size == 8:
            big = big << 24
        out[f.offset:f.offset + f.size] = big.to_bytes(f.size, "little")
        info.update(offsets=[f.offset], field=f.name, value=big, size=f.size)
    elif how == "truncate":
        cut = int(rng.integers(1, len(data)))
        out = out[:cut]
        info["offsets"] = [cut]
    else:  # kv_flip: one byte inside K or V
        f = lay.kv_data()[int(rng.integers(0, len(lay.kv_data())))]
        o = f.offset + int(rng.integers(0, f.size))
        out[o] ^= 1 << int(rng.integers(0, 8))
        info.update(offsets=[o], field=f.name)
    if how == "truncate":
        info["first_changed"] = len(out)
    else:
        diff = np.flatnonzero(np.frombuffer(bytes(out), np.uint8) != np.frombuffer(data, np.uint8))
        info["first_changed"] = int(diff[0]) if len(diff) else None
    info["a2sf_start"] = lay.a2sf_start
    return bytes(out), info


# -- the child ---------------------------------------------------------------------------
def run_case(path: str) -> Dict:
    """Restore the damaged state in ``path`` (an .npz written by the parent) into a fresh
    context; return what happened."""
    import llama_cpp

    from a2sf import _core

    z = np.load(path, allow_pickle=False)
    model, mode = str(z["model"]), str(z["mode"])
    data = z["data"].tobytes()
    llm = make_llm(model)
    res: Dict = {"mode": mode}
    if mode == "whole":
        state = llama_cpp.LlamaState(
            input_ids=z["input_ids"], scores=z["scores"], n_tokens=int(z["n_tokens"]),
            llama_state=data, llama_state_size=len(data), seed=int(z["seed"]),
        )
        try:
            llm.load_state(state)
            res["outcome"] = "restored"
        except RuntimeError as e:
            res["outcome"] = "refused"
            res["message"] = str(e)
    else:
        n = seq_set(llm, data)
        if n == len(data):
            res["outcome"] = "restored"
            adopt(llm, z["input_ids"], int(z["n_tokens"]))
        elif n == 0:
            res["outcome"] = "refused"
            res["message"] = _core.state_error()
        else:
            res["outcome"] = f"partial ({n} of {len(data)} bytes)"
    res["state_error"] = _core.state_error()

    if res["outcome"] == "restored":
        res["cells"] = int(_core.n_cells(llm._ctx.ctx, 0))
        res["tokens"], res["finite"] = continue_greedy(llm)
    elif res["outcome"] == "refused":
        # left empty, and the next decode works
        res["cells_after"] = int(_core.n_cells(llm._ctx.ctx, 0))
        llm.reset()
        llm.eval([1, 2, 3])
        res["finite"] = bool(np.isfinite(_logits(llm)).all())
        res["cells_used"] = int(_core.n_cells(llm._ctx.ctx, 0))
    res["maxrss_mb"] = _peak_rss_mb()
    return res


def _peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM belongs to the address space exec made, whereas
    getrusage's ru_maxrss carries the peak of the parent it was forked from (a test
    runner that once held gigabytes would make every child look that large)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m a2sf.testing.state_fuzz CASE.npz", file=sys.stderr)
        return 2
    print(json.dumps(run_case(argv[0])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
