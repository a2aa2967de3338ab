"""The harness runs every policy x granularity x mode (continuous / compress after
prefill), keeps them apart in its records, and tables them against streaming;
the stream protocol reads a stream at depths with and without compaction."""
from __future__ import annotations

import json

from a2sf.eval import main
from a2sf.eval.stream import table


def _args(tiny, out):
    return ["ppl", "--model", tiny, "--texts", "austen", "--windows", "3", "--context", "96",
            "--continuation", "16", "--policies", "none", "streaming", "a2sf", "mean", "--ratios", "0.5",
            "--alphas", "--granularities", "token", "head", "--modes", "continuous", "compress",
            "--n-ctx", "256", "--no-progress", "--out", str(out)]


def test_ppl_sweeps_granularity_and_mode_and_the_table_compares_with_streaming(tiny_f32, tmp_path, capsys):
    assert main(_args(tiny_f32, tmp_path)) == 0
    recs = [json.loads(l) for l in (tmp_path / "ppl.jsonl").read_text().splitlines()]
    variants = {r["policy"] for r in recs}
    assert variants == {"none", "streaming", "streaming+compress", "a2sf", "a2sf/head", "a2sf+compress",
                        "a2sf/head+compress", "mean", "mean/head", "mean+compress", "mean/head+compress"}
    for r in recs:
        if r["policy"] != "none":
            assert r["metrics"]["max_cells"] == 48  # the budget held in every mode
            assert r["mode"] == ("compress" if r["policy"].endswith("+compress") else "continuous")
            assert r["granularity"] == ("head" if "/head" in r["policy"] else "token")
    capsys.readouterr()
    assert main(["variants", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| a2sf/head+compress |" in text and "(baseline)" in text and "vs streaming" in text


def test_stream_table_has_a_row_per_policy_and_mode():
    recs = [dict(policy=p, positions=m, n_ctx=256, depth=d, window=8, fresh=32, ratio=1.0 + d / 1e4,
                 max_position=10, compactions=2, compact_seconds=0.01, feed_tokens_per_s=100.0)
            for p in ("streaming", "a2sf") for m in ("cache", "absolute") for d in (100, 200)]
    t = table(recs, "cmd")
    assert t.count("\n| streaming |") == 2 and "| a2sf | cache | 1.010 | 1.020 |" in t and "`cmd`" in t


def test_stream_runs_through_the_compacting_cache(tiny_f32, tmp_path):
    from a2sf.eval.stream import run_stream

    toks = [int(t) for t in __import__("numpy").random.default_rng(0).integers(3, 290, 700)]
    recs = run_stream(tiny_f32, toks, "a2sf", "cache", 256, [300, 600], 16, 64, 1, 32, 1)
    assert [r["depth"] for r in recs] == [300, 600]
    assert recs[-1]["compactions"] > 0 and recs[-1]["max_position"] < 2 * 256
    assert all(r["ppl"] > 1 and r["ppl_fresh"] > 1 for r in recs)


def test_variants_pairs_per_head_compression_with_kvpress_observed_attention_window_by_window():
    from a2sf.eval.variants import variants_table

    st = {"context": 96, "continuation": 16}
    n = 16  # scored tokens: nll_sum = n * mean loss

    def ours(policy, ratio, window, loss, alpha=None):
        return {"dataset": "austen", "settings_hash": "h", "settings": st, "policy": policy, "ratio": ratio,
                "cells": None, "alpha": alpha, "window": window, "metrics": {"nll_sum": n * loss, "n_scored": n}}

    def press(method, ratio, window, loss):
        return {"engine": "kvpress", "dataset": "austen", "settings": st, "method": method, "ratio": ratio,
                "window": window, "metrics": {"nll_sum": n * loss, "n_scored": n}}

    recs, kv = [], []
    jitters = (0.0, 0.01, -0.01, 0.005)
    for w, jitter in enumerate(jitters):
        full, kv_full = 3.0 + w, 2.5 + w  # the engines' own full caches differ; only losses to them count
        recs += [ours("none", None, w, full), ours("streaming", 0.2, w, full + 0.2),
                 ours("a2sf/head+compress", 0.2, w, full + 0.10 + jitter, 0.95)]
        kv += [press("none", None, w, kv_full), press("observed_attention", 0.2, w, kv_full + 0.05 + jitter / 2)]
    text = variants_table(recs, "cmd", kv)
    row = next(line for line in text.splitlines() if line.startswith("| austen | 0.2 | a2sf/head+compress |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3:5] == ["0.95", "4"]
    mean, se = (float(x) for x in cells[6].split("+-"))
    # per window: (loss - full) - (kvpress loss - kvpress full) = 0.05 + jitter / 2
    assert abs(mean - (0.05 + sum(jitters) / len(jitters) / 2)) < 1e-4 and 0 < se < 0.01
    assert cells[7] == "loses to kvpress"
    # and the kvpress row of the budget table is taken to kvpress's own full cache
    assert "| kvpress:observed_attention |  | 4 |" in text
