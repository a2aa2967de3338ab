"""Seeded fuzz of state restores: damaged copies of a per-head a2sf state after evictions.

20 whole-context states (``Llama.load_state``) and 20 sequence states
(``llama_state_seq_set_data``), plus 5 + 5 of the same states in the old format
version 2 (no checksum), each damaged one way (flipped bytes, an overwritten
run, a length field set huge, truncation, a flipped bit inside K/V;
a2sf.testing.state_fuzz.corrupt) and restored in a child process of its own, with
one thread. Every case must end one of two ways, never with an abort, a crash or a
restore that cannot decode:

* refused: an error (with a reason from llama_kv_policy_state_error() when the damage
  is inside a2sf's framing), the restored context (sequence) left empty, and the next
  decode works with finite logits;
* restored: the next decodes work, logits finite, and the continuation is the
  undamaged state's (a restore that succeeds restored the saved cache).

Damage inside the checksummed part (from a2sf's header to the end) must be refused:
only the bytes llama.cpp reads before that header (the architecture name, the
sequence-state magic and source id) are outside it. No case may allocate more than
the stream holds (peak RSS bounded).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from a2sf.testing import state_format as sf
from a2sf.testing import state_fuzz as fz

N_PER_MODE = 20
N_V2 = 5  # the same damage to the state converted to format version 2 (no checksum)
SEED = 1234
MAX_RSS_MB = 1500  # a length field set to 4 GiB must not allocate it


@pytest.fixture(scope="module")
def source(core, tiny_f32):
    return fz.verified_sources(tiny_f32)


def _data(source, mode, version):
    data = source["state"].llama_state if mode == "whole" else source["seq"]
    return data if version == 3 else sf.to_version2(data, mode)


def _run_child(tmp_path, source, mode, case, version=3):
    bad, info = fz.corrupt(_data(source, mode, version), mode, case, seed=SEED)
    path = tmp_path / f"{mode}-{case}.npz"
    st = source["state"]
    np.savez(path, model=np.array(source["model"]), mode=np.array(mode),
             data=np.frombuffer(bad, np.uint8), input_ids=source["input_ids"], scores=st.scores,
             n_tokens=np.array(source["n_tokens"]), seed=np.array(st.seed))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "a2sf.testing.state_fuzz", str(path)],
                       capture_output=True, text=True, timeout=120, env=env)
    return bad, info, r


@pytest.mark.parametrize("mode, version, n_cases", [("whole", 3, N_PER_MODE), ("seq", 3, N_PER_MODE),
                                                     ("whole", 2, N_V2), ("seq", 2, N_V2)])
def test_damaged_states_are_refused_or_restored_and_keep_generating(tmp_path, source, mode, version, n_cases):
    """Version 3: as the module says. Version 2 (no checksum; still loaded): refused as above,
    or restored and decoding (damaged K/V cannot be told apart there: no claim on the logits)."""
    t0 = time.time()
    problems, outcomes = [], []
    data = _data(source, mode, version)
    for case in range(n_cases):
        bad, info, r = _run_child(tmp_path, source, mode, case, version)
        what = f"case {case} {info}"
        if r.returncode != 0:
            problems.append(f"{what}: child exited {r.returncode}: {r.stderr[-1500:]}")
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        outcomes.append(res["outcome"])
        if res["maxrss_mb"] > MAX_RSS_MB:
            problems.append(f"{what}: peak RSS {res['maxrss_mb']:.0f} MB")
        changed = info["first_changed"]
        if changed is None:  # the damage happened to write the same bytes
            continue
        inside = changed >= info["a2sf_start"] and version == 3
        if res["outcome"] == "refused":
            if not (res["finite"] and res["cells_after"] == 0 and res["cells_used"] == 3):
                problems.append(f"{what}: refused but not left empty and usable: {res}")
            if inside and not res["state_error"]:
                problems.append(f"{what}: refused without a reason in llama_kv_policy_state_error()")
        elif res["outcome"] == "restored":
            if inside:
                problems.append(f"{what}: damage inside the checksummed part was restored: {res}")
            if version == 3 and (not res["finite"] or res["tokens"] != source["reference"][mode]):
                problems.append(f"{what}: restored but did not continue as the saved state: {res}")
            if len(res["tokens"]) != fz.N_GREEDY:
                problems.append(f"{what}: restored but stopped decoding: {res}")
        else:
            problems.append(f"{what}: {res['outcome']}")
    assert not problems, "\n".join(problems)
    # the cases cover the kinds of damage and both outcomes where they can happen
    assert outcomes.count("refused") >= n_cases // 2, outcomes
    assert len(data) > 10_000
    assert time.time() - t0 < 40, f"{n_cases} cases took {time.time() - t0:.0f} s"


def test_cases_are_seeded_and_cover_every_kind_of_damage(source):
    data = source["seq"]
    kinds = set()
    for case in range(N_PER_MODE):
        a, info = fz.corrupt(data, "seq", case, seed=SEED)
        b, _ = fz.corrupt(data, "seq", case, seed=SEED)
        assert a == b  # the same bytes on every run
        kinds.add(info["how"])
        if info["how"] == "kv_flip":
            assert info["field"].endswith((".k", ".v"))
        if info["how"] == "huge":
            o, n = info["offsets"][0], info["size"]
            assert int.from_bytes(a[o:o + n], "little") == info["value"] >= 0x10000000
    assert kinds == set(fz.KINDS)
