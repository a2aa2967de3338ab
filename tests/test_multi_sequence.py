"""Several sequences in one context (llama_cpp's low-level API, n_seq_max = 2).

* One ubatch holding tokens of two sequences: each query's decay weight counts
  only the later queries of its own sequence and each cell decays once per query
  of its sequence (llama-kv-score.cpp set_score_inputs); the scores of each
  sequence must equal the numpy reference run on that sequence alone.
* kv_unified=false, seq_cp across streams: llama_kv_cache::update copies the
  K/V stream; the score and value-norm rows of the stream must follow.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

import a2sf  # noqa: F401  (binds llama_cpp to a2sf's libllama)
import llama_cpp
from a2sf.policies import make_policy
from a2sf.testing.reference import ReferenceLlama, accumulate_scores

TOL = dict(rtol=1e-4, atol=1e-4)
GGML_TYPE_F32 = 0


class Ctx:
    """A bare llama_context with n_seq_max sequences, F32 K/V, one thread."""

    def __init__(self, path, n_seq_max=2, kv_unified=True, n_ctx=256, n_batch=32, flash_attn=False):
        mp = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
        assert self.model
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, n_batch
        cp.n_seq_max, cp.kv_unified = n_seq_max, kv_unified
        cp.n_threads = cp.n_threads_batch = 1
        cp.type_k = cp.type_v = GGML_TYPE_F32
        cp.flash_attn_type = 1 if flash_attn else 0
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        assert self.ctx
        self.addr = int(ctypes.cast(self.ctx, ctypes.c_void_p).value)
        self.n_batch = n_batch
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, n_seq_max)

    def decode(self, items):
        """items: [(token, pos, seq_id)] in batch order (at most n_batch)."""
        assert len(items) <= self.n_batch
        b = self.batch
        for i, (tok, pos, seq) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
            b.seq_id[i][0] = seq
            b.logits[i] = False
        b.logits[len(items) - 1] = True
        b.n_tokens = len(items)
        assert llama_cpp.llama_decode(self.ctx, b) == 0

    def seq_cp(self, src, dst):
        llama_cpp.llama_memory_seq_cp(llama_cpp.llama_get_memory(self.ctx), src, dst, -1, -1)

    def close(self):
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


def _scores(core, c, seq):
    pos, cells, scores = core.scores(c.addr, seq)
    return np.asarray(pos), np.asarray(scores, dtype=np.float64)


SEQ0 = [5, 17, 42, 260, 99, 280, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 33, 34, 35, 36, 37, 38]
SEQ1 = [200, 201, 3, 4, 150, 151, 152, 60, 61, 62, 63, 64, 65]


def _interleave(seqs, starts):
    """Tokens of the sequences in one batch, alternating, each in its own position order."""
    out = []
    its = [iter(enumerate(s, start)) for s, start in zip(seqs, starts)]
    live = list(range(len(its)))
    while live:
        for k in list(live):
            try:
                pos, tok = next(its[k])
                out.append((tok, pos, k))
            except StopIteration:
                live.remove(k)
    return out


@pytest.mark.parametrize("policy", ["a2sf", "vatp", "h2o", "tova"])
def test_two_sequences_in_one_ubatch_match_the_reference(core, tiny_f32, policy):
    alpha = {"a2sf": 0.7, "vatp": 0.8}.get(policy)
    pol = make_policy(policy, **({"forgetting_factor": alpha} if alpha is not None else {}))
    c = Ctx(tiny_f32, kv_unified=True)
    try:
        core.set_policy(c.addr, **pol.to_native())
        # ubatch 1: 16 tokens of each sequence's start, interleaved; ubatch 2: the rest;
        # then 3 decode steps with one token of each sequence per ubatch
        split = [(SEQ0[:9], SEQ1[:7]), (SEQ0[9:], SEQ1[7:])]
        start = [0, 0]
        sizes = [[], []]
        for parts in split:
            items = _interleave(parts, start)
            c.decode(items)
            for k in (0, 1):
                start[k] += len(parts[k])
                sizes[k].append(len(parts[k]))
        dec = [[70, 71, 72], [80, 81, 82]]
        for i in range(3):
            c.decode([(dec[0][i], start[0] + i, 0), (dec[1][i], start[1] + i, 1)])
            sizes[0].append(1)
            sizes[1].append(1)
        ref = ReferenceLlama(tiny_f32)
        for k, toks in enumerate((SEQ0 + dec[0], SEQ1 + dec[1])):
            fr = ref.forward(toks)
            exp = accumulate_scores(fr.probs, fr.v_l1, sizes[k], pol.forgetting_factor, pol.value_aware)
            pos, got = _scores(core, c, k)
            assert pos.tolist() == list(range(len(toks)))
            np.testing.assert_allclose(got, exp, **TOL, err_msg=f"sequence {k}")
    finally:
        c.close()


@pytest.mark.parametrize("value_aware", [False, True], ids=["attn", "value"])
def test_seq_cp_across_streams_copies_scores_and_value_norms(core, tiny_f32, value_aware):
    """kv_unified=false: seq_cp(0 -> 1) copies stream 0 into stream 1 at the next update;
    sequence 1 then has sequence 0's scores, and after the same next token on both
    sequences (which reads the value norms when value_aware) the two still agree."""
    pol = make_policy("vatp" if value_aware else "a2sf", forgetting_factor=0.8)
    c = Ctx(tiny_f32, kv_unified=False)
    try:
        core.set_policy(c.addr, **pol.to_native())
        c.decode([(t, i, 0) for i, t in enumerate(SEQ0)])
        c.decode([(t, i, 1) for i, t in enumerate(SEQ1)])  # stream 1 has cells (and scores) of its own
        pos0, s0 = _scores(core, c, 0)
        c.seq_cp(0, 1)
        n = len(SEQ0)
        c.decode([(70, n, 0), (70, n, 1)])  # the copy runs in the update before this batch
        pos0, s0 = _scores(core, c, 0)
        pos1, s1 = _scores(core, c, 1)
        assert pos1.tolist() == pos0.tolist() == list(range(n + 1))
        np.testing.assert_allclose(s1, s0, rtol=1e-6, atol=1e-7)
        # and both equal the reference of sequence 0 fed as it was
        fr = ReferenceLlama(tiny_f32).forward(SEQ0 + [70])
        exp = accumulate_scores(fr.probs, fr.v_l1, [n, 1], pol.forgetting_factor, pol.value_aware)
        np.testing.assert_allclose(s0, exp, **TOL)
    finally:
        c.close()
