"""llama.cpp's llama-server built from a2sf's tree (scripts/build-server.sh), on loopback.

* the --kv-* flags' table (cpp/server/a2sf-server-settings.inc) is generated from
  python/a2sf/policies.py and up to date (no binary needed);
* bad --kv-* values exit non-zero with one "error: ..." line, as the Python side words it;
* SmolLM2, -np 4 -c 1024 with a policy (256 cells per slot), 4 concurrent chat
  requests whose prompts are longer than a slot's cells: all answered (no context
  shift, no "context size exceeded"), streamed text equals non-streamed, the same
  request alone gives the same greedy answer as under load, /slots reports each
  slot's evictions and cells.

The tests that need the binary run when it exists (A2SF_SERVER_BIN, or
build/server/bin/llama-server) and are skipped otherwise: they never build it
(bash scripts/build-server.sh does, in minutes). The four-slot test is also
marked slow (-m slow).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import require_module  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_SLOTS, N_CTX = 4, 1024
MAX_TOKENS = 40


def test_settings_table_is_generated_from_policies():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_server_settings.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_settings_table_names_every_policy_and_setting():
    from a2sf.policies import POLICY_NAMES, SETTINGS_BY_NAME

    inc = (ROOT / "cpp" / "server" / "a2sf-server-settings.inc").read_text()
    for name in POLICY_NAMES:
        assert f'{{"{name}", ' in inc, name
    for flag, setting in [("--kv-sink", "n_sink"), ("--kv-recent", "n_recent"),
                          ("--kv-evict-chunk", "evict_chunk"), ("--kv-forgetting-factor", "forgetting_factor"),
                          ("--kv-value-aware", "value_aware"), ("--kv-granularity", "granularity"),
                          ("--kv-positions", "positions"), ("--kv-seed", "kv_seed")]:
        assert f'{{"{flag}", "{setting}", ' in inc, flag
        assert setting in SETTINGS_BY_NAME


def _server_bin() -> Path:
    env = os.environ.get("A2SF_SERVER_BIN")
    path = Path(env) if env else ROOT / "build" / "server" / "bin" / "llama-server"
    if not path.exists():
        pytest.skip(f"{path} not built (bash scripts/build-server.sh)")
    return path


@pytest.fixture(scope="session")
def server_bin():
    return _server_bin()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_bad(server_bin, smollm2, *flags):
    r = subprocess.run([str(server_bin), "-m", smollm2, "--host", "127.0.0.1", "--port", str(_free_port()),
                        *flags], capture_output=True, text=True, timeout=120)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    return r.returncode, errors, r.stderr


@pytest.mark.parametrize("flags, message", [
    (["--kv-policy", "lru"], "error: --kv-policy: unknown KV policy 'lru'; expected one of ['a2sf', 'h2o', "
                             "'mean', 'none', 'random', 'streaming', 'tova', 'vatp']"),
    (["--kv-policy", "a2sf", "--kv-forgetting-factor", "1.5"],
     "error: --kv-forgetting-factor: forgetting_factor must be in [0, 1], got 1.5"),
    (["--kv-policy", "a2sf", "--kv-forgetting-factor", "x"],
     "error: --kv-forgetting-factor: forgetting_factor must be a real number in [0, 1], got 'x'"),
    (["--kv-policy", "h2o", "--kv-sink", "-1"], "error: --kv-sink: n_sink must be in [0, 2^31-1], got -1"),
    (["--kv-policy", "h2o", "--kv-recent", "ten"], "error: --kv-recent: n_recent must be an int, got 'ten'"),
    (["--kv-policy", "h2o", "--kv-forgetting-factor", "0.5"],
     "error: --kv-forgetting-factor: H2O fixes forgetting_factor=1.0; it cannot be overridden (settable: "
     "n_sink, n_recent, evict_chunk, value_aware, seed, granularity, mean_attention, pool_kernel, pool_weight, decode_scoring)"),
    (["--kv-policy", "a2sf", "--kv-granularity", "cell"],
     "error: --kv-granularity: granularity must be one of token, layer, head, got 'cell'"),
    (["--kv-sink", "8"], "error: policy settings ['n_sink'] given without a policy (kv_policy is None); "
                         "name one of ['a2sf', 'h2o', 'mean', 'none', 'random', 'streaming', 'tova', 'vatp']"),
    (["--kv-policy", "tova", "--kv-positions", "sideways"],
     "error: --kv-positions: positions must be one of cache, training, absolute, got 'sideways'"),
])
def test_bad_flags_exit_nonzero_with_one_line(server_bin, smollm2, flags, message):
    rc, errors, stderr = _run_bad(server_bin, smollm2, *flags)
    assert rc != 0 and rc not in (-6, 134), stderr[-2000:]  # non-zero, and not an abort
    assert errors == [message], stderr[-2000:]


def test_batch_that_cannot_fit_is_refused(server_bin, smollm2):
    rc, errors, stderr = _run_bad(server_bin, smollm2, "-np", "4", "-c", "128", "--kv-policy", "a2sf",
                                  "--kv-recent", "40")
    assert rc != 0 and rc not in (-6, 134)
    assert len(errors) == 1 and "leaves no room for a batch in a slot's 32 cells" in errors[0], stderr[-2000:]


# --- a running server ----------------------------------------------------------

TOPICS = ["lighthouses", "volcanoes", "honey bees", "glaciers"]


def _prompt(i: int) -> str:
    topic = TOPICS[i]
    facts = " ".join(f"Note {k} about {topic}: item {k * 7 + i} is filed under shelf {k % 5} in room {k % 3}."
                     for k in range(30))
    return f"{facts}\nIn two sentences, what are these notes about?"


@contextlib.contextmanager
def _running(args, log: Path, ready, what: str, timeout: float):
    """Popen(args) with its output in log, once ready() holds; stopped on exit."""
    with open(log, "w") as f:
        proc = subprocess.Popen([str(a) for a in args], stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"{what} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.time() > deadline:
                pytest.fail(f"{what} did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield proc
    finally:
        _stop(proc)


def _answers(fn) -> bool:
    try:
        fn()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _running_server(args, log: Path):
    """llama-server with ``args``, its output in ``log``: yields its base URL once /health answers."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    healthy = lambda: _answers(lambda: urllib.request.urlopen(base + "/health", timeout=2).close())  # noqa: E731
    with _running([*args, "--host", "127.0.0.1", "--port", port], log, healthy, "llama-server", 180):
        yield base


@pytest.fixture(scope="module")
def llama_server(server_bin, smollm2, tmp_path_factory):
    require_module("openai")
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    # per-head cells (the default) renumbered at twice a slot's cells, so that the prompts compact
    args = [server_bin, "-m", smollm2, "-np", N_SLOTS, "-c", N_CTX, "--kv-policy", "a2sf", "--kv-positions", "cache",
            "-t", "2", "--seed", "0"]
    with _running_server(args, log) as base:
        yield base, log


def _stop(proc):
    """Terminate a server process, killing it if it does not exit within 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _client(base):
    from openai import OpenAI

    return OpenAI(base_url=base + "/v1", api_key="none", timeout=600, max_retries=0)


def _chat(base, i, stream):
    client = _client(base)
    kw = dict(model="smollm2", messages=[{"role": "user", "content": _prompt(i)}],
              max_tokens=MAX_TOKENS, temperature=0.0, seed=0)
    if stream:
        parts, usage = [], None
        for chunk in client.chat.completions.create(stream=True, **kw):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        return "".join(parts), usage
    r = client.chat.completions.create(**kw)
    return r.choices[0].message.content, r.usage


def _slots(base):
    with urllib.request.urlopen(base + "/slots", timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.slow  # about 8 minutes on 2 shared cores
def test_four_slots_longer_than_their_cells(llama_server, smollm2):
    base, log = llama_server
    from a2sf.models import smollm2_path  # noqa: F401  (the same model file)

    # prompts are longer than a slot's 256 cells
    for i in range(N_SLOTS):
        with urllib.request.urlopen(urllib.request.Request(
                base + "/tokenize", data=json.dumps({"content": _prompt(i)}).encode(),
                headers={"Content-Type": "application/json"}), timeout=30) as r:
            assert len(json.loads(r.read())["tokens"]) > N_CTX // N_SLOTS + 64

    # under load: 4 streamed and then 4 non-streamed requests, all at once
    with concurrent.futures.ThreadPoolExecutor(2 * N_SLOTS) as ex:
        streamed = [ex.submit(_chat, base, i, True) for i in range(N_SLOTS)]
        plain = [ex.submit(_chat, base, i, False) for i in range(N_SLOTS)]
        streamed = [f.result()[0] for f in streamed]
        plain = [f.result() for f in plain]
    for i in range(N_SLOTS):
        text, usage = plain[i]
        assert text and text.strip(), i
        assert usage.prompt_tokens > N_CTX // N_SLOTS, usage
        assert streamed[i] == text, (i, streamed[i], text)

    slots = _slots(base)
    assert len(slots) == N_SLOTS
    assert all(s["a2sf"]["policy"] == "a2sf" for s in slots)
    assert all(s["a2sf"]["cells"] <= N_CTX // N_SLOTS for s in slots), slots
    assert sum(s["a2sf"]["evictions"] for s in slots) >= N_SLOTS, [s["a2sf"] for s in slots]
    assert any(s["a2sf"]["compactions"] > 0 for s in slots)

    # alone: the same greedy answers
    for i in range(N_SLOTS):
        alone, _ = _chat(base, i, False)
        assert alone == plain[i][0], (i, alone, plain[i][0])
    text = log.read_text()
    assert "context shift" not in text and "exceeds the available context size" not in text


def test_unified_cache_slots_share_its_cells_and_evict(server_bin, smollm2, tmp_path):
    """-np 2 --kv-unified: both slots' sequences live in one 512-cell cache; two concurrent prompts
    longer than it are answered, the slots together never hold more than its cells, and it evicted
    (llama.cpp alone would refuse the second prompt or shift context)."""
    log = tmp_path / "server.log"
    args = [server_bin, "-m", smollm2, "-np", 2, "-c", 512, "--kv-unified", "--kv-policy", "a2sf", "-t", 1,
            "--seed", 0, "--cache-ram", 0]
    with _running_server(args, log) as base:
        def ask(i):
            body = json.dumps({"messages": [{"role": "user", "content": _prompt(i)}], "max_tokens": 48,
                               "temperature": 0}).encode()
            req = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as r:
                d = json.loads(r.read())
            return d["choices"][0]["message"]["content"], d["usage"]["prompt_tokens"]

        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            answers = list(ex.map(ask, [0, 1]))
        slots = [s["a2sf"] for s in _slots(base)]
    assert all(text.strip() for text, _ in answers), answers
    assert min(n for _, n in answers) > 512  # each prompt alone is longer than the shared cache
    assert sum(s["cells"] for s in slots) <= 512, slots
    assert sum(s["evictions"] for s in slots) > 0, slots
    text = log.read_text()
    assert "context shift" not in text and "exceeds the available context size" not in text


@pytest.mark.parametrize("positions", [None, "cache"])
def test_slot_selects_per_head_by_default_and_compacts_its_cells(server_bin, smollm2, tmp_path, positions):
    """A scored policy selects per (layer, KV head) in llama-server too, with positions "training"
    unless told (as a2sf.Llama); --kv-positions cache renumbers the slot's per-head cells: a
    ~600-token prompt through a 256-cell slot is answered, evicts, compacts, and the slot never
    holds more than its cells."""
    log = tmp_path / "server.log"
    args = [server_bin, "-m", smollm2, "-np", 1, "-c", 256, "--kv-policy", "a2sf", "-t", 2, "--seed", 0]
    if positions is not None:
        args += ["--kv-positions", positions]
    with _running_server(args, log) as base:
        body = json.dumps({"messages": [{"role": "user", "content": _prompt(0)}], "max_tokens": 16,
                           "temperature": 0}).encode()
        req = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            d = json.loads(r.read())
        slot = _slots(base)[0]["a2sf"]
    assert d["choices"][0]["message"]["content"].strip() and d["usage"]["prompt_tokens"] > 2 * 256
    assert "granularity 2)" in log.read_text()  # LLAMA_KV_GRANULARITY_HEAD, resolved from unset
    assert slot["positions"] == (positions or "training")
    assert slot["cells"] <= 256 and slot["evictions"] > 0, slot
    if positions == "cache":
        assert slot["compactions"] > 0 and slot["position_offset"] > 0, slot
    else:  # "training": SmolLM2's 8192 positions are far away
        assert slot["compactions"] == 0, slot
