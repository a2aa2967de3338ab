"""Quick decode-overhead check at ~900 cells: CPU time of one computing thread,
100 greedy tokens after a 900-token text, vanilla vs streaming/h2o/a2sf, two
interleaved repetitions (flash attention off). Steadier than wall time on a
loaded machine; the full benchmark is python -m a2sf.bench.

    .venv/bin/python scripts/decode_check.py [--out results/decode_check.md]

Prints a Markdown table whose caption carries this command (and writes it to
--out): docs/RESULTS.md and docs/PERFORMANCE.md quote only figures from such files.
"""
import argparse
import time

from a2sf import Llama
from a2sf.bench_common import greedy, text_tokens
from a2sf.models import smollm2_path

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=None)
ap.add_argument("--reps", type=int, default=2)
args = ap.parse_args()

res = {}
for rep in range(args.reps):
    for pol in [None, "streaming", "h2o", "a2sf"]:
        llm = Llama(str(smollm2_path()), n_ctx=1024, n_batch=64, n_ubatch=64, kv_policy=pol, flash_attn=False,
                    n_threads=1, n_threads_batch=1, verbose=False)
        llm.eval(text_tokens(llm, 900))
        tok = greedy(llm)
        t0 = time.thread_time()
        for _ in range(100):
            llm.eval([tok])
            tok = greedy(llm)
        res.setdefault(pol or "vanilla", []).append(100 / (time.thread_time() - t0))
        llm.close()
cmd = "python scripts/decode_check.py" + (f" --reps {args.reps}" if args.reps != 2 else "")
lines = [f"_decode t/s (CPU time of one thread), 900-token context in 1024 cells, 100 greedy tokens, FA off, "
         f"{args.reps} interleaved reps; command: `{cmd}`_", "",
         "| policy | " + " | ".join(f"rep {i + 1}" for i in range(args.reps)) + " |",
         "|---|" + "---:|" * args.reps]
for k, v in res.items():
    lines.append(f"| {k} | " + " | ".join(f"{x:.1f}" for x in v) + " |")
text = "\n".join(lines) + "\n"
print(text)
if args.out:
    open(args.out, "w").write(text)
