"""The `a2sf` command (console script and `python -m a2sf`)."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

SUBCOMMANDS = ["generate", "chat", "inspect", "serve"]


def _a2sf(*args: str, stdin: str | None = None, cwd=None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "a2sf", *args], input=stdin, capture_output=True, text=True,
        timeout=timeout, cwd=cwd,
    )


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "a2sf"
    assert script.is_file(), "pyproject [project.scripts] a2sf = a2sf.cli:main"
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for cmd in SUBCOMMANDS + ["eval"]:
        assert re.search(rf"^\s+{cmd}\s", r.stdout, re.M), cmd
    assert "examples:" in r.stdout


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help_everywhere_with_examples(cmd):
    r = _a2sf(cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert "examples" in r.stdout.lower(), r.stdout
    assert "usage:" in r.stdout


def test_bench_dispatch():
    r = _a2sf("bench", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: a2sf bench") and "--sizes" in r.stdout


def test_eval_dispatch():
    if importlib.util.find_spec("a2sf.eval") is None:
        r = _a2sf("eval", "--help")
        assert r.returncode == 2
        assert "a2sf eval: error: a2sf.eval is not part of this a2sf installation" in r.stderr
        assert "Traceback" not in r.stderr
    else:
        r = _a2sf("eval", "--help")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("usage: a2sf eval")


def test_generate_runs_past_the_cache(tiny_f32):
    r = _a2sf("generate", "--model", tiny_f32, "--kv-policy", "a2sf", "--n-ctx", "64", "--max-tokens", "300",
              "--temperature", "0", "--stats", "the cat sat on the mat")
    assert r.returncode == 0, r.stderr
    m = re.search(r"\[a2sf\] (\d+) positions, (\d+) cells of (\d+) in use, (\d+) evictions freed (\d+) cells", r.stderr)
    assert m, r.stderr
    positions, cells, n_ctx, evictions, freed = map(int, m.groups())
    assert positions > n_ctx >= cells and evictions > 0 and freed > 0
    assert len(r.stdout.strip()) > 0


def test_generate_is_deterministic_at_temperature_0(tiny_f32):
    args = ("generate", "--model", tiny_f32, "--kv-policy", "h2o", "--n-ctx", "64", "--max-tokens", "40",
            "--temperature", "0", "the cat")
    a, b = _a2sf(*args), _a2sf(*args)
    assert a.returncode == 0 and a.stdout == b.stdout


def test_bad_settings_are_clear_errors(tiny_f32):
    r = _a2sf("generate", "--model", tiny_f32, "--kv-policy", "bogus", "x")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = _a2sf("generate", "--model", tiny_f32, "--kv-policy", "a2sf", "--n-ctx", "64", "--n-batch", "500", "x")
    assert r.returncode == 2 and "does not fit beside the protected cells" in r.stderr
    assert "Traceback" not in r.stderr
    r = _a2sf("generate", "--model", tiny_f32, "--forgetting-factor", "0.5", "x")
    assert r.returncode != 0 and "need --kv-policy" in r.stderr
    r = _a2sf("generate", "--model", "/nonexistent.gguf", "x")
    assert r.returncode != 0 and "model file not found" in r.stderr


def test_inspect_writes_html_and_png(tiny_f32, tmp_path):
    text = tmp_path / "t.txt"
    text.write_bytes(b"the cat sat on the mat & <b>bold</b> " * 30)
    r = _a2sf("inspect", "--model", tiny_f32, "--text", str(text), "--kv-policy", "tova", "--n-ctx", "64",
              "--html", "out.html", "--png", "out.png", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = re.search(r"(\d+) tokens, (\d+) kept, (\d+) evicted", r.stdout)
    n, kept, evicted = map(int, m.groups())
    assert evicted > 0 and kept + evicted == n
    page = (tmp_path / "out.html").read_text()
    assert page.count('class="tok evicted"') == evicted
    assert page.count('class="tok kept"') == kept
    assert page.count("&lt;") >= 60 and "<b>" not in page and "</b>" not in page  # markup in the text is escaped
    assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"


def test_chat_from_a_pipe(smollm2):
    """Non-interactive chat: two turns, /stats, and the second turn is read after the first turn
    (its history stays in the cache: the positions in use exceed a one-turn chat's by at least
    the first answer's tokens)."""
    args = ("chat", "--model", smollm2, "--kv-policy", "a2sf", "--n-ctx", "256", "--temperature", "0",
            "--max-tokens", "32")
    r = _a2sf(*args, stdin="Hi, I am Alice and I like cats.\nWhat animal do I like?\n/stats\n/quit\n")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 3
    stats = r"\[a2sf\] (\d+) positions, \d+ cells of 256 in use"
    two_turns = int(re.search(stats, r.stdout).group(1))
    one = _a2sf(*args, stdin="What animal do I like?\n/stats\n/quit\n")
    assert one.returncode == 0, one.stderr
    one_turn = int(re.search(stats, one.stdout).group(1))
    from a2sf import Llama

    vocab = Llama(smollm2, vocab_only=True, verbose=False)
    first_answer = vocab.tokenize(lines[0].encode(), add_bos=False)
    vocab.close()
    assert two_turns - one_turn >= len(first_answer)
