"""scripts/gpu_check.py, the GPU-vs-CPU check a lent device runs, works before it gets there.

On this CPU-only build both of its sides run on the CPU, so every configuration must
agree exactly; a GPU build is compared the same way (scripts/device_check.sh).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402


def test_gpu_check_on_a_cpu_build_reports_every_configuration_in_agreement(tmp_path):
    out = tmp_path / "report.md"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--quick", "--threads", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = out.read_text()
    assert "CPU-only build: both sides ran on the CPU" in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and " fa=" in line]
    assert len(rows) == len(gpu_check.configs(quick=True)) == 6
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        label, evictions, heads, share, score_diff, logit_diff, argmax, verdict = cells
        n_cpu, n_gpu = map(int, evictions.split("/"))
        assert n_cpu == n_gpu > 0, row  # 600 tokens through 256 cells evict
        n_same, n_heads = map(int, heads.split("/"))
        assert n_same == n_heads and n_heads == 4 * 2, row  # 4 layers x 2 KV heads, all equal
        assert float(share) == 1.0 and float(score_diff) == 0.0 and float(logit_diff) == 0.0, row
        assert argmax == "yes" and verdict == "agree", row
    assert "skipped: this build has no GPU backend" in report


def test_compare_flags_a_side_that_kept_other_tokens():
    pos = np.arange(8, dtype=np.int32).reshape(1, 2, 4)
    logits = np.zeros(5, dtype=np.float32)
    cpu = gpu_check.Side(pos, {(0, h, int(p)): 1.0 for h in range(2) for p in pos[0, h]}, logits)
    moved = pos.copy()
    moved[0, 1, 3] = 9  # head 1 holds position 9 where the CPU holds 7
    gpu = gpu_check.Side(moved, {(0, h, int(p)): 1.0 for h in range(2) for p in moved[0, h]}, logits)
    same = gpu_check.compare(cpu, cpu)
    differ = gpu_check.compare(cpu, gpu)
    assert same["ok"] and same["heads_same"] == "2/2"
    assert not differ["ok"] and differ["heads_same"] == "1/2" and differ["kept_share"] == 7 / 8


def test_placement_counts_the_backend_of_every_scheduled_node(tmp_path, monkeypatch):
    # The placement table is skipped on a CPU build, but its plumbing is not: llama.cpp's
    # scheduler prints every node under GGML_SCHED_DEBUG=2 and the parser must read them,
    # here all on the CPU, so the one device run does not find a broken parser.
    # A GPU cache moves per-head rows through a scheduled graph; forced here, so that the
    # moves show up as they will there.
    monkeypatch.setenv("A2SF_MOVES_ON_GRAPH", "1")
    model = str(gpu_check.write_tiny(tmp_path / "tiny.gguf"))
    vanilla = gpu_check.placement(model, None, False)
    recency = gpu_check.placement(model, "streaming", False)  # the same prompt as a2sf, evicts per token
    per_head = gpu_check.placement(model, "a2sf", False)
    for counts in (vanilla, recency, per_head):
        assert counts and {backend for backend, _ in counts} == {"CPU"}
        assert not any(gpu_check._is_gpu(backend) for backend, _ in counts)
        assert counts[("CPU", "MUL_MAT")] > 0 and counts[("CPU", "SOFT_MAX")] > 0
    # the per-head evictions' row gathers and scatters are counted beside the decode graphs
    assert per_head[("CPU", "GET_ROWS")] > recency[("CPU", "GET_ROWS")]
    assert per_head[("CPU", "SET_ROWS")] > recency[("CPU", "SET_ROWS")]
