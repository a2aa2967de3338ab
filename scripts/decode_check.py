"""Quick decode-overhead check at ~900 cells: CPU time of one computing thread,
100 greedy tokens after a 900-token text, vanilla vs streaming/h2o/a2sf, two
interleaved repetitions (flash attention off). Steadier than wall time on a
loaded machine; the full benchmark is python -m a2sf.bench.

    .venv/bin/python scripts/decode_check.py
"""
import time

from a2sf import Llama
from a2sf.bench import _greedy, _text_tokens
from a2sf.models import smollm2_path

res = {}
for rep in range(2):
    for pol in [None, "streaming", "h2o", "a2sf"]:
        llm = Llama(str(smollm2_path()), n_ctx=1024, n_batch=64, n_ubatch=64, kv_policy=pol, flash_attn=False,
                    n_threads=1, n_threads_batch=1, verbose=False)
        llm.eval(_text_tokens(llm, 900))
        tok = _greedy(llm)
        t0 = time.thread_time()
        for _ in range(100):
            llm.eval([tok])
            tok = _greedy(llm)
        res.setdefault(pol or "vanilla", []).append(100 / (time.thread_time() - t0))
        llm.close()
for k, v in res.items():
    print(f"{k:10s} " + "  ".join(f"{x:6.1f}" for x in v) + " t/s (CPU time)")
