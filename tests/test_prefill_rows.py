"""Bounded prefill scoring: for alpha < 1 only the last query rows of a ubatch are
scored (a row weighs alpha^(later queries)); the scores still equal the numpy
reference, which scores every row."""
from __future__ import annotations

import numpy as np
import pytest
from llama_cpp import GGML_TYPE_F32

from a2sf import Llama
from a2sf.testing.reference import ReferenceLlama, accumulate_scores, ubatch_sizes


def _rows(alpha):  # what the engine keeps (llama-kv-score.cpp score_rows)
    if alpha >= 1:
        return None
    if alpha <= 0:
        return 1
    return int(np.ceil(np.log(1e-7 * (1 - alpha)) / np.log(alpha)))


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("alpha,value_aware", [(0.0, False), (0.5, False), (0.7, True), (0.95, False), (1.0, False)])
def test_scores_with_skipped_rows_equal_the_full_reference(tiny_f32, alpha, value_aware, flash_attn):
    ub = 128
    n = 200
    rows = _rows(alpha)
    if alpha in (0.5, 0.7):
        assert rows < ub  # the case under test: rows were really skipped
    ref = ReferenceLlama(tiny_f32)
    toks = [int(t) for t in np.random.default_rng(1).integers(3, 290, n)]
    llm = Llama(tiny_f32, n_ctx=256, n_batch=ub, n_ubatch=ub, n_threads=1, kv_policy="vatp" if value_aware else "a2sf",
                forgetting_factor=alpha, flash_attn=flash_attn, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
                n_sink=1, n_recent=1, verbose=False)
    llm.eval(toks)
    got = llm.kv_scores().scores
    fr = ref.forward(toks)
    want = accumulate_scores(fr.probs, fr.v_l1, ubatch_sizes(n, ub), alpha, value_aware)
    rtol = 2e-2 if flash_attn else 1e-4  # CPU flash attention's probabilities pass through F16
    np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-4 if not flash_attn else 5e-3)
    llm.close()
