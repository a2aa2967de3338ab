"""State save/load carries the eviction engine's scores and value norms.

A context restored with ``load_state`` (or llama.cpp's sequence state
functions) must continue exactly as the one that saved it: same tokens, same
scores per cell, same evicted positions. A state that does not fit (another
kind of policy, another model, a truncated buffer) is refused with an error
that names the problem, never loaded into a silently wrong cache.
"""
from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np
import pytest

from a2sf import Llama

COMMON = dict(n_threads=2, verbose=False, seed=1)
N_CTX = 256  # llama.cpp pads smaller caches to 256 cells


def make(path, policy="a2sf", **kw):
    kw.setdefault("n_sink", 2)
    kw.setdefault("n_recent", 16)
    kw.setdefault("evict_chunk", 4)
    kw.setdefault("max_positions", 4096)
    if policy is None:
        for k in ("n_sink", "n_recent", "evict_chunk", "max_positions"):
            kw.pop(k)
    return Llama(path, n_ctx=N_CTX, kv_policy=policy, **COMMON, **kw)


def prompt(n=400, seed=0):
    return np.random.default_rng(seed).integers(3, 300, size=n).tolist()


def greedy(llm, n):
    """n greedy steps; per step the token, the kept positions and their scores."""
    steps = []
    for _ in range(n):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        tok = int(np.argmax(logits))
        llm.eval([tok])
        s = llm.kv_scores()
        steps.append((tok, s.positions.tolist(), s.scores.copy()))
    return steps


def assert_same_run(a, b, rtol=1e-3, atol=1e-4):
    # the restored cache holds the same cells at other indices (compacted), so
    # attention sums run in another order: scores agree to float rounding only
    assert [t for t, _, _ in a] == [t for t, _, _ in b], "tokens differ"
    for i, ((_, pa, sa), (_, pb, sb)) in enumerate(zip(a, b)):
        assert pa == pb, f"step {i}: kept positions differ (evicted differently)"
        np.testing.assert_allclose(sa, sb, rtol=rtol, atol=atol, err_msg=f"step {i}: scores differ")


@pytest.mark.parametrize("policy", ["a2sf", "h2o", "vatp", "random", "streaming"])
def test_load_state_continues_identically(core, tiny_f32, policy):
    orig = make(tiny_f32, policy)
    orig.eval(prompt())
    assert orig.kv_stats()["evictions"] > 0  # the snapshot is of an evicting cache
    before = orig.kv_scores()
    state = orig.save_state()
    assert state.llama_state_size == llama_cpp.llama_state_get_size(orig._ctx.ctx)

    fresh = make(tiny_f32, policy)
    fresh.load_state(state)
    after = fresh.kv_scores()
    assert fresh.n_tokens == orig.n_tokens
    assert after.positions.tolist() == before.positions.tolist()
    np.testing.assert_array_equal(after.scores, before.scores)  # bit-exact copy
    if policy in ("a2sf", "h2o", "vatp"):
        assert after.total.max() > 0

    # logits are not part of llama.cpp's state: feed both the same next token,
    # then continue greedily far enough to evict several more times
    orig.eval([7])
    fresh.eval([7])
    a = greedy(orig, 40)
    b = greedy(fresh, 40)
    assert_same_run(a, b)
    kept = set(a[-1][1])
    assert not set(before.positions.tolist()) <= kept, "no eviction after the snapshot"


def test_load_state_with_all_logits_keeps_room_for_the_next_batches(core, tiny_f32):
    """logits_all: a fresh context that loads a state of a sequence longer than its cache keeps
    every later token's logits (llama_cpp.Llama.load_state replaces input_ids by the saver's,
    longer array; the logits rows must still grow with the sequence)."""
    orig = make(tiny_f32, "a2sf", logits_all=True, n_batch=8, n_ubatch=8)
    toks = prompt(640)
    orig.eval(toks[:600])
    state = orig.save_state()
    orig.eval(toks[600:])
    fresh = make(tiny_f32, "a2sf", logits_all=True, n_batch=8, n_ubatch=8)
    fresh.load_state(state)
    fresh.eval(toks[600:])  # five batches past what the load reserved
    assert fresh.n_tokens == 640
    # the load packs the cells to the front, so attention sums run in another order: the same
    # tokens are kept (positions compared), the logits agree to float noise amplified by 40 steps
    assert (fresh.kv_head_scores()[0] == orig.kv_head_scores()[0]).all()
    np.testing.assert_allclose(np.array(fresh.scores[600:640]), np.array(orig.scores[600:640]), rtol=2e-3, atol=2e-3)


def test_load_state_into_the_same_context_rewinds(core, tiny_f32):
    llm = make(tiny_f32, "a2sf")
    llm.eval(prompt())
    state = llm.save_state()
    llm.eval([7])
    a = greedy(llm, 30)
    llm.load_state(state)
    llm.eval([7])
    b = greedy(llm, 30)
    assert_same_run(a, b)


def _seq_get(llm, seq_id=0):
    ctx = llm._ctx.ctx
    n = llama_cpp.llama_state_seq_get_size(ctx, seq_id)
    buf = (ctypes.c_uint8 * n)()
    got = llama_cpp.llama_state_seq_get_data(ctx, buf, n, seq_id)
    assert got == n, "llama_state_seq_get_size disagrees with what get_data wrote"
    return bytes(buf)


def _seq_set(llm, data, seq_id=0):
    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    return llama_cpp.llama_state_seq_set_data(llm._ctx.ctx, buf, len(data), seq_id)


@pytest.mark.parametrize("policy", ["a2sf", "vatp"])
def test_seq_state_carries_scores(core, tiny_f32, policy):
    toks = prompt()
    orig = make(tiny_f32, policy)
    orig.eval(toks)
    data = _seq_get(orig)
    before = orig.kv_scores()

    fresh = make(tiny_f32, policy)
    fresh.eval([1, 2, 3])  # something in the cache that the restore replaces
    assert _seq_set(fresh, data) == len(data)
    # the Python bookkeeping is the caller's job with the raw sequence API
    fresh.input_ids = orig.input_ids.copy()
    fresh.n_tokens = orig.n_tokens
    after = fresh.kv_scores()
    assert after.positions.tolist() == before.positions.tolist()
    np.testing.assert_array_equal(after.scores, before.scores)

    # the logits of the last prompt token are not part of a sequence state:
    # feed the same next token to both and compare from there
    orig.eval([7])
    fresh.eval([7])
    assert_same_run(greedy(orig, 30), greedy(fresh, 30))


# -- refusals: a clear error, the process and the context survive -------------
@pytest.mark.parametrize("saver,loader,match", [
    ("a2sf", None, "score-ranked policy"),
    (None, "a2sf", "no score-ranked policy"),
    ("streaming", "h2o", "no score-ranked policy"),
    ("h2o", "random", "score-ranked"),
    ("a2sf", "vatp", "value-aware"),
    ("vatp", "h2o", "value-aware"),
])
def test_load_state_refuses_another_kind_of_policy(core, tiny_f32, saver, loader, match):
    src = make(tiny_f32, saver)
    src.eval(prompt(100))
    state = src.save_state()
    dst = make(tiny_f32, loader)
    dst.eval([5, 6, 7])
    with pytest.raises(RuntimeError, match=match):
        dst.load_state(state)
    assert dst.n_tokens == 0 and core.n_cells(dst._ctx.ctx, 0) == 0  # emptied, not half-loaded
    out = dst.create_completion("hello", max_tokens=4, temperature=0.0)  # the next call works
    assert out["usage"]["completion_tokens"] >= 1


def test_load_state_compatible_policies_are_accepted(core, tiny_f32):
    # same kind (scored), another forgetting factor: like set_kv_policy on a live context
    src = make(tiny_f32, "h2o")
    src.eval(prompt())
    dst = make(tiny_f32, "a2sf")
    dst.load_state(src.save_state())
    np.testing.assert_array_equal(dst.kv_scores().scores, src.kv_scores().scores)


def test_load_state_refuses_another_model(core, tiny_f32, tmp_path):
    from a2sf.testing.tiny_gguf import write_tiny_llama

    try:
        other = write_tiny_llama(tmp_path / "three-layers.gguf", qtype="F32", seed=0, n_layer=3)
    except TypeError:
        pytest.skip("write_tiny_llama takes no n_layer")
    src = make(tiny_f32, "a2sf")
    src.eval(prompt(100))
    dst = make(str(other), "a2sf")
    with pytest.raises(RuntimeError, match="layers"):
        dst.load_state(src.save_state())
    dst.eval([4, 5])
    assert dst.kv_n_cells() == 2


def test_load_state_refuses_a_truncated_state(core, tiny_f32):
    src = make(tiny_f32, "a2sf")
    src.eval(prompt(100))
    state = src.save_state()
    for cut in (3, 20, state.llama_state_size // 2, state.llama_state_size - 3):
        bad = llama_cpp.LlamaState(
            input_ids=state.input_ids, scores=state.scores, n_tokens=state.n_tokens,
            llama_state=state.llama_state[:cut], llama_state_size=cut, seed=state.seed,
        )
        with pytest.raises(RuntimeError, match="not restored"):
            src.load_state(bad)
        assert src.n_tokens == 0 and src.kv_n_cells() == 0
    src.load_state(state)  # the good one still loads
    assert src.kv_n_cells() > 0


def test_load_state_wrong_type(core, tiny_f32):
    llm = make(tiny_f32, "a2sf")
    with pytest.raises(TypeError, match="LlamaState"):
        llm.load_state(b"not a state")


def test_seq_state_refusals(core, tiny_f32):
    src = make(tiny_f32, "a2sf")
    src.eval(prompt(100))
    data = _seq_get(src)
    dst = make(tiny_f32, None)
    assert _seq_set(dst, data) == 0
    assert "score-ranked" in core.state_error()
    # a destination sequence out of range: refused, not a GGML_ASSERT abort
    assert _seq_set(src, data, seq_id=7) == 0
    assert "out of range" in core.state_error()
    # saving a sequence out of range: a 0 size, not an abort
    assert llama_cpp.llama_state_seq_get_size(src._ctx.ctx, 99) == 0
    assert llama_cpp.llama_state_seq_get_size(src._ctx.ctx, -5) == 0
    # a truncated sequence state
    assert _seq_set(src, data[: len(data) // 2]) == 0
    # and a good restore afterwards works
    assert _seq_set(src, data) == len(data)
    assert core.state_error() == ""


def test_load_state_refuses_a_state_larger_than_the_cache(core, tiny_f32):
    src = Llama(tiny_f32, n_ctx=512, kv_policy="a2sf", **COMMON)
    src.eval(prompt(450))
    dst = make(tiny_f32, "a2sf")  # 256 cells cannot hold 450
    with pytest.raises(RuntimeError, match="not restored"):
        dst.load_state(src.save_state())
    assert dst.n_tokens == 0 and dst.kv_n_cells() == 0
    dst.eval([4, 5, 6])
    assert dst.kv_n_cells() == 3


# -- integrity: a checksum over the whole state, field checks of a2sf's sections -------------
# A per-head a2sf state after evictions (tokens moved between cells per head), one thread.
# Edits below are "resealed" (checksum recomputed by the Python reference) so that only the
# field checks can refuse them; damage that is not resealed must fail the checksum.
from a2sf.testing import state_format as sf  # noqa: E402
from a2sf.testing import state_fuzz as fz  # noqa: E402


@pytest.fixture(scope="module")
def head_states(tiny_f32):
    return fz.verified_sources(tiny_f32)


def _with_bytes(state, data):
    return llama_cpp.LlamaState(input_ids=state.input_ids, scores=state.scores, n_tokens=state.n_tokens,
                                llama_state=data, llama_state_size=len(data), seed=state.seed)


def _assert_empty_and_usable(core, llm):
    assert core.n_cells(llm._ctx.ctx, 0) == 0, "the refused restore left cells behind"
    llm.reset()
    llm.eval([1, 2, 3])
    assert core.n_cells(llm._ctx.ctx, 0) == 3
    assert np.isfinite(last_logits(llm)).all()


def last_logits(llm):
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


@pytest.mark.parametrize("n", [0, 1, 7, 8, 31, 32, 33, 64, 100, 1000, 4099])
def test_state_hash_matches_the_python_reference(core, n):
    data = np.random.default_rng(n).integers(0, 256, size=n, dtype=np.uint8).tobytes()
    assert core.state_hash(data) == sf.state_hash(data)


def test_state_hash_changes_with_the_length_and_any_bit():
    # (the C++ hashes a state in the pieces the io hands it, 4-byte fields and tensor rows: that
    # its sum equals the reference of the whole byte string is test_saved_checksum_is_the_hash_...)
    data = bytes(range(256)) * 3
    h = sf.state_hash(data)
    assert h != sf.state_hash(data[:-1]) and h != sf.state_hash(data + b"\0")
    one = bytearray(data)
    one[100] ^= 1
    assert sf.state_hash(bytes(one)) != h


@pytest.mark.parametrize("kind", ["whole", "seq"])
def test_saved_checksum_is_the_hash_of_the_state(head_states, kind):
    data = head_states["state"].llama_state if kind == "whole" else head_states["seq"]
    lay = sf.parse(data, kind)
    assert lay.version == 3 and lay.checksum == len(data) - 8
    assert sf.stored_checksum(data, lay) == sf.computed_checksum(data, lay)
    assert lay.names("s0.a2sc.unit"), "the per-head state carries a unit map"


def _damaged_kv(data, kind):
    lay = sf.parse(data, kind)
    f = lay["s0.l1.v"]
    out = bytearray(data)
    out[f.offset + f.size // 2] ^= 0x10  # one bit of one V value
    return bytes(out)


def test_load_state_refuses_a_flipped_bit_in_v(core, tiny_f32, head_states):
    state = head_states["state"]
    llm = fz.make_llm(tiny_f32)
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        llm.load_state(_with_bytes(state, _damaged_kv(state.llama_state, "whole")))
    assert llm.n_tokens == 0
    _assert_empty_and_usable(core, llm)
    llm.load_state(state)  # the undamaged state still loads and continues as the saver would
    assert fz.continue_greedy(llm)[0] == head_states["reference"]["whole"]


def test_seq_set_data_refuses_a_flipped_bit_in_v(core, tiny_f32, head_states):
    seq = head_states["seq"]
    llm = fz.make_llm(tiny_f32)
    llm.eval([5, 6, 7])  # a sequence the refused restore replaces: it is emptied
    assert fz.seq_set(llm, _damaged_kv(seq, "seq")) == 0
    assert "checksum mismatch" in core.state_error()
    _assert_empty_and_usable(core, llm)
    assert fz.seq_set(llm, seq) == len(seq)
    assert core.state_error() == ""
    fz.adopt(llm, head_states["input_ids"], head_states["n_tokens"])
    assert fz.continue_greedy(llm)[0] == head_states["reference"]["seq"]


def _cells(lay):
    return sum(1 for n in lay.names("s0.cell") if n.endswith(".pos"))


def _edit_unit_pos(k, i, value_of):
    """unit k's position in cell i := value_of(unit k's positions)"""
    def edit(data, lay):
        f = lay[f"s0.a2sc.unit{k}.pos"]
        pos = np.frombuffer(data, np.int32, count=f.size // 4, offset=f.offset).copy()
        pos[i] = value_of(pos)
        out = bytearray(data)
        out[f.offset:f.offset + f.size] = pos.tobytes()
        return bytes(out)
    return edit


def _edit_f32(name, index, value):
    def edit(data, lay):
        f = lay[name]
        out = bytearray(data)
        out[f.offset + 4 * index:f.offset + 4 * index + 4] = np.float32(value).tobytes()
        return bytes(out)
    return edit


def _edit_born(k, i, value):
    def edit(data, lay):
        f = lay[f"s0.a2sc.unit{k}.born"]
        out = bytearray(data)
        out[f.offset + 8 * i:f.offset + 8 * i + 8] = np.int64(value).tobytes()
        return bytes(out)
    return edit


def _edit_cell_pos(i, j):
    """cell i's llama.cpp position := cell j's"""
    def edit(data, lay):
        return sf.put(data, lay, f"s0.cell{i}.pos", lay.value(data, f"s0.cell{j}.pos"))
    return edit


# (id, edit(data, layout) -> data, expected words of llama_kv_policy_state_error())
INCONSISTENT = [
    ("unit-pos-twice", _edit_unit_pos(3, 40, lambda p: p[41]), "twice in sequence 0"),
    ("unit-pos-beyond-newest", _edit_unit_pos(2, 5, lambda p: p.max() + 100), "outside its sequence's positions"),
    ("unit-pos-negative", _edit_unit_pos(1, 7, lambda p: -1), "outside its sequence's positions"),
    ("unit0-not-its-cell", _edit_unit_pos(0, 9, lambda p: min(set(range(int(p.max()))) - set(p.tolist()))),
     "whose position is"),  # an evicted position, inside the sequence's range
    ("cell-pos-twice", _edit_cell_pos(30, 31), "two cells of sequence 0 hold position"),
    ("a2sc-cell-count", lambda d, lay: sf.put(d, lay, "s0.a2sc.n_cells", _cells(lay) - 1), "the score block is for"),
    ("score-nan", _edit_f32("s0.a2sc.l1.score", 3, np.nan), "finite and >= 0"),
    ("score-negative", _edit_f32("s0.a2sc.l0.score", 0, -1.0), "finite and >= 0"),
    ("vnorm-inf", _edit_f32("s0.a2sc.l0.vnorm", 2, np.inf), "finite and >= 0"),
    ("n-head-kv", lambda d, lay: sf.put(d, lay, "s0.a2sc.l1.n_head_kv", 3), "KV heads"),
    ("n-units", lambda d, lay: sf.put(d, lay, "s0.a2sc.n_units", 5), "layer/head units"),
    ("diverged-flag", lambda d, lay: sf.put(d, lay, "s0.a2sc.diverged", 7), "diverged flag"),
    ("n-seq-huge", lambda d, lay: sf.put(d, lay, "s0.a2sc.n_seq", 0xFFFFFFFF), "query counts of"),
    ("query-count-negative", lambda d, lay: sf.put(d, lay, "s0.a2sc.nq0.n", -5), "query count"),
    ("born-negative", _edit_born(2, 11, -3), "written at query"),
    ("version", lambda d, lay: sf.put(d, lay, "a2sf.version", 9), "format version 9"),
    ("policy-flags", lambda d, lay: sf.put(d, lay, "a2sf.flags", 0x81), "unknown policy flags"),
    ("seq-id-of-header", lambda d, lay: sf.put(d, lay, "a2sf.seq_id", 0 if lay.kind == "whole" else -1), "saved as"),
    ("cell-seq-id-out-of-range", lambda d, lay: sf.put(d, lay, "s0.cell12.seq0", 77) if lay.kind == "whole" else None,
     "llama.cpp refused"),
    ("rng-length", lambda d, lay: sf.put(d, lay, "trailer.rng_len", 1 << 30) if lay.kind == "whole" else None,
     "RNG text of"),
]


@pytest.mark.parametrize("kind", ["whole", "seq"])
@pytest.mark.parametrize("case_id, edit, words", INCONSISTENT, ids=[c[0] for c in INCONSISTENT])
def test_inconsistent_state_is_refused_field_by_field(core, tiny_f32, head_states, kind, case_id, edit, words):
    data = head_states["state"].llama_state if kind == "whole" else head_states["seq"]
    lay = sf.parse(data, kind)
    bad = edit(data, lay)
    if bad is None:
        pytest.skip(f"{case_id}: no such field in a {kind} state")
    assert bad != data
    if case_id not in ("version", "rng-length"):
        bad = sf.reseal(bad, kind, lay)  # a valid checksum: the field check must refuse it
    llm = fz.make_llm(tiny_f32)
    llm.eval([5, 6, 7])
    if kind == "whole":
        with pytest.raises(RuntimeError, match="not restored") as e:
            llm.load_state(_with_bytes(head_states["state"], bad))
        assert words in str(e.value), str(e.value)
    else:
        assert fz.seq_set(llm, bad) == 0
        assert words in core.state_error(), core.state_error()
    _assert_empty_and_usable(core, llm)


@pytest.mark.parametrize("kind", ["whole", "seq"])
def test_resealing_an_unchanged_state_changes_nothing(head_states, kind):
    """The control of the test above: the Python reseal writes the checksum the engine wrote."""
    data = head_states["state"].llama_state if kind == "whole" else head_states["seq"]
    assert sf.reseal(data, kind) == data


@pytest.mark.parametrize("kind", ["whole", "seq"])
def test_version2_state_still_loads_and_continues(core, tiny_f32, head_states, kind):
    data = head_states["state"].llama_state if kind == "whole" else head_states["seq"]
    old = sf.to_version2(data, kind)
    assert sf.parse(old, kind).version == 2 and len(old) == len(data) - 4 - 4 - 8
    llm = fz.make_llm(tiny_f32)
    if kind == "whole":
        llm.load_state(_with_bytes(head_states["state"], old))
        assert fz.continue_greedy(llm)[0] == head_states["reference"]["whole"]
    else:
        assert fz.seq_set(llm, old) == len(old)
        fz.adopt(llm, head_states["input_ids"], head_states["n_tokens"])
        assert fz.continue_greedy(llm)[0] == head_states["reference"]["seq"]


def test_seq_state_file_checksum_covers_its_token_list(core, tiny_f32, head_states, tmp_path):
    """llama_state_seq_save_file writes the prompt's tokens before the state (llama-server's slot
    files): a changed token is refused like changed K/V, by llama_state_seq_load_file, the
    function llama-server's slot restore calls."""
    src = fz.make_llm(tiny_f32)
    assert fz.seq_set(src, head_states["seq"]) == len(head_states["seq"])
    toks = [int(t) for t in head_states["input_ids"][:head_states["n_tokens"]]]
    path = tmp_path / "slot.bin"
    arr = (llama_cpp.llama_token * len(toks))(*toks)
    assert llama_cpp.llama_state_seq_save_file(src.ctx, str(path).encode(), 0, arr, len(toks)) > 0
    raw = path.read_bytes()
    # LLAMA_STATE_SEQ magic, version, token count, tokens, then the sequence state (seq_id 0 prefix)
    n = int.from_bytes(raw[8:12], "little")
    assert n == len(toks)
    # the state after them, framed as llama_state_seq_get_data would (magic, seq id) to parse it
    framed = (0xAF143CD8).to_bytes(4, "little") + bytes(4) + raw[12 + 4 * n:]
    lay = sf.parse(framed, "seq")
    assert sf.stored_checksum(framed, lay) == sf.computed_checksum(framed, lay, tokens=toks)

    def load(data):
        p = tmp_path / "damaged.bin"
        p.write_bytes(data)
        dst = fz.make_llm(tiny_f32)
        out = (llama_cpp.llama_token * (n + 8))()
        n_out = ctypes.c_size_t(0)
        got = llama_cpp.llama_state_seq_load_file(dst.ctx, str(p).encode(), 0, out, n + 8, ctypes.byref(n_out))
        return dst, got, list(out[:n_out.value])

    dst, got, back = load(raw)
    assert got > 0 and back == toks and core.n_cells(dst._ctx.ctx, 0) > 0
    bad = bytearray(raw)
    bad[12 + 4 * 17] ^= 0x01  # token 17
    dst, got, _ = load(bytes(bad))
    assert got == 0 and "checksum mismatch" in core.state_error()
    _assert_empty_and_usable(core, dst)


def test_session_file_checksum_covers_its_token_list(core, tiny_f32, head_states, tmp_path):
    """llama_state_save_file / load_file (whole context, with the prompt's tokens)."""
    src = fz.make_llm(tiny_f32)
    src.load_state(head_states["state"])
    toks = [int(t) for t in head_states["input_ids"][:head_states["n_tokens"]]]
    path = tmp_path / "session.bin"
    arr = (llama_cpp.llama_token * len(toks))(*toks)
    assert llama_cpp.llama_state_save_file(src.ctx, str(path).encode(), arr, len(toks))
    raw = path.read_bytes()

    def load(data):
        p = tmp_path / "damaged.bin"
        p.write_bytes(data)
        dst = fz.make_llm(tiny_f32)
        out = (llama_cpp.llama_token * (len(toks) + 8))()
        n_out = ctypes.c_size_t(0)
        ok = llama_cpp.llama_state_load_file(dst.ctx, str(p).encode(), out, len(toks) + 8, ctypes.byref(n_out))
        return dst, ok

    dst, ok = load(raw)
    assert ok and core.n_cells(dst._ctx.ctx, 0) > 0
    bad = bytearray(raw)
    bad[12 + 4 * 3] ^= 0x40  # token 3
    dst, ok = load(bytes(bad))
    assert not ok and "checksum mismatch" in core.state_error()
    _assert_empty_and_usable(core, dst)


def test_load_state_refuses_a_token_count_behind_its_cells(core, tiny_f32, head_states):
    """A LlamaState whose n_tokens puts the next token at a position the cache already holds
    (every decode would fail) is refused; the context stays usable."""
    state = head_states["state"]
    behind = llama_cpp.LlamaState(input_ids=state.input_ids, scores=state.scores, n_tokens=state.n_tokens - 10,
                                  llama_state=state.llama_state, llama_state_size=state.llama_state_size,
                                  seed=state.seed)
    behind.a2sf_positions = state.a2sf_positions  # the saved position map (its offset) comes along
    llm = fz.make_llm(tiny_f32)
    with pytest.raises(RuntimeError, match="next token at position"):
        llm.load_state(behind)
    assert llm.n_tokens == 0
    _assert_empty_and_usable(core, llm)


def test_version2_state_with_a_cell_past_its_tokens_is_refused(core, tiny_f32):
    """Without a checksum (format version 2) and without a unit map (granularity token), a
    damaged cell position that is still unique passes the field checks; with absolute positions
    (the next token at n_tokens) the position check against the token count refuses it instead
    of leaving a context whose decodes all fail."""
    kw = dict(n_ctx=N_CTX, kv_policy="a2sf", granularity="token", positions="absolute", n_threads=1,
              verbose=False, seed=1)
    src = Llama(tiny_f32, **kw)
    src.eval(prompt(100))
    state = src.save_state()
    old = sf.to_version2(state.llama_state, "whole")
    lay = sf.parse(old, "whole")
    last = max(int(n.split(".")[1][4:]) for n in lay.names("s0.cell") if n.endswith(".pos"))
    bad = sf.put(old, lay, f"s0.cell{last}.pos", 5000)
    dst = Llama(tiny_f32, **kw)
    with pytest.raises(RuntimeError, match="holds position 5000"):
        dst.load_state(_with_bytes(state, bad))
    _assert_empty_and_usable(core, dst)
    dst.load_state(_with_bytes(state, old))  # the undamaged version-2 state loads
    assert dst.n_tokens == 100 and core.n_cells(dst._ctx.ctx, 0) == 100
