"""Layers on an rpc-server (llama.cpp's RPC backend), against the local CPU run.

* ``rpc_servers=`` is checked before anything loads: a malformed endpoint is a
  ValueError, a build without RPC a RuntimeError, nothing listening (or a server
  that is not an rpc-server) a ConnectionError, never ggml's abort;
* SmolLM2 with every layer on an rpc-server on 127.0.0.1 (so its K/V and the
  score tensors live there), a2sf with a cache that evicts many times, granularity
  token and head: the same greedy tokens, the same kept cells (positions,
  token_index) and the same scores (rtol 1e-4) as the local CPU run;
* llama-server ``--rpc 127.0.0.1:PORT -ngl 99 --kv-policy a2sf`` answers as the
  local llama-server does, with the same eviction counters in /slots; so does
  ``python -m a2sf.server --rpc-servers 127.0.0.1:PORT`` (every layer there by default).

Each run is its own process (ggml registers RPC devices process-wide, and an
rpc-server serves one client at a time). The comparisons need an a2sf built with
``-DGGML_RPC=ON`` and ggml-rpc-server (bash scripts/build-rpc.sh; A2SF_RPC_SERVER
names another binary): an optional build, so they are skipped without it, also
under CI=true, and marked slow. They never build anything.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from a2sf._llama.rpc import parse_rpc_servers, rpc_supported
from test_llama_server import _answers, _free_port, _running, _server_bin, _stop

ROOT = Path(__file__).resolve().parents[1]


# --- checks before the model load (no rpc-server needed) ------------------------

@pytest.mark.parametrize("value", ["", "localhost", "127.0.0.1:", ":50052", "127.0.0.1:0", "127.0.0.1:65536",
                                   "127.0.0.1:http", "[::1]:50052", "a b:1", "127.0.0.1:1,", 50052,
                                   ["127.0.0.1:1", 2], "127.0.0.1:1,127.0.0.1:1"])
def test_bad_endpoint_is_a_value_error(value):
    with pytest.raises(ValueError, match="rpc_servers"):
        parse_rpc_servers(value)


def test_endpoints_parse():
    assert parse_rpc_servers("127.0.0.1:50052, host-2.lan:1") == [("127.0.0.1", 50052), ("host-2.lan", 1)]
    assert parse_rpc_servers(["10.0.0.1:5"]) == [("10.0.0.1", 5)]


def test_llama_rejects_a_bad_endpoint_before_loading(tmp_path):
    from a2sf import Llama

    # the model file does not exist: the endpoint is refused first
    with pytest.raises(ValueError, match="is not an endpoint"):
        Llama(str(tmp_path / "missing.gguf"), rpc_servers="localhost", kv_policy="a2sf")


@pytest.mark.skipif(rpc_supported(), reason="this build has the RPC backend")
def test_build_without_rpc_says_so(tmp_path):
    from a2sf import Llama

    with pytest.raises(RuntimeError, match="-DGGML_RPC=ON"):
        Llama(str(tmp_path / "missing.gguf"), rpc_servers=f"127.0.0.1:{_free_port()}")


def test_nothing_listening_is_a_connection_error():
    from a2sf._llama.rpc import _check_server

    with pytest.raises(ConnectionError, match="no RPC server at 127.0.0.1"):
        _check_server("127.0.0.1", _free_port())


def test_a_server_that_is_not_rpc_is_a_connection_error():
    from a2sf._llama.rpc import _check_server

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)

        def answer():  # an HTTP-ish server: reads the request, replies nonsense, hangs up
            conn, _ = srv.accept()
            with conn:
                conn.recv(64)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        with pytest.raises(ConnectionError, match="rpc_servers"):
            _check_server("127.0.0.1", srv.getsockname()[1], timeout=10)
        t.join(10)


# --- an rpc-server on loopback ----------------------------------------------------

def _rpc_server_bin() -> Path:
    path = Path(os.environ.get("A2SF_RPC_SERVER") or ROOT / "build" / "server" / "bin" / "ggml-rpc-server")
    if not path.exists():
        pytest.skip(f"{path} not built (bash scripts/build-rpc.sh)")
    return path


@pytest.fixture()
def rpc_server(tmp_path):
    """An rpc-server on 127.0.0.1 (one CPU thread): (endpoint, process, log)."""
    port = _free_port()
    log = tmp_path / "rpc-server.log"
    # listening? (a bare connect: the server sees a client that leaves)
    listening = lambda: _answers(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close())  # noqa: E731
    with _running([_rpc_server_bin(), "-H", "127.0.0.1", "-p", port, "-t", "1"], log, listening,
                  "rpc-server", 60) as proc:
        yield f"127.0.0.1:{port}", proc, log


# One run of a2sf.Llama in a fresh process: greedy tokens, the kept cells and their
# scores after the prompt and at the end, and the eviction counters.
_RUN = r"""
import json, sys
import numpy as np
from a2sf import Llama
from a2sf.bench_common import greedy
args = json.loads(sys.argv[1])
kw = dict(n_ctx=256, n_batch=32, n_ubatch=32, n_threads=1, n_threads_batch=1, verbose=True, kv_policy="a2sf",
          n_recent=16, evict_chunk=8, **args["settings"])
if args["rpc"]:
    kw["rpc_servers"] = args["rpc"]
llm = Llama(args["model"], **kw)
assert llm.__getstate__().get("rpc_servers") == args["rpc"]  # pickling keeps them
def cells():
    s = llm.kv_scores()
    out = {"positions": s.positions.tolist(), "token_index": s.token_index.tolist(),
           "scores": s.scores.tolist()}
    if kw.get("granularity", "token") != "token":
        pos, sc = llm.kv_head_scores()
        out["head_positions"], out["head_scores"] = np.asarray(pos).tolist(), np.asarray(sc).tolist()
    return out
def generate(n):
    out = []
    for _ in range(n):
        out.append(greedy(llm))
        llm.eval([out[-1]])
    return out
llm.eval(llm.tokenize(args["prompt"].encode()))
after_prompt = cells()
tokens = generate(args["n_gen"])
end = cells()
state = llm.save_state()  # K/V and scores read back from the device
more = generate(8)
llm.load_state(state)     # ... and written to it
restored = cells()
llm.eval(more[:1])        # (the logits of the restored state are not the last token's)
print(json.dumps({"tokens": tokens, "prompt": after_prompt, "end": end, "stats": llm.kv_stats(),
                  "more": more, "more_after_restore": more[:1] + generate(7), "restored": restored}))
"""


def _run(smollm2, rpc, settings):
    prompt = ("The lighthouse keeper wrote in his log every evening. " * 14
              + "On the last page of the log he wrote:")
    args = dict(model=smollm2, rpc=rpc, settings=settings, n_gen=256, prompt=prompt)
    r = subprocess.run(["nice", sys.executable, "-c", _RUN, json.dumps(args)], capture_output=True, text=True,
                       timeout=900, cwd=str(ROOT))
    assert r.returncode == 0, f"{'rpc' if rpc else 'local'} run failed ({r.returncode}):\n{r.stderr[-4000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["log"] = r.stderr
    return out


@pytest.fixture()
def rpc_build():
    if not rpc_supported():
        pytest.skip("a2sf built without the RPC backend (CMAKE_ARGS=\"-DGGML_RPC=ON\" bash scripts/setup.sh)")


def _assert_same_cells(local, remote, what):
    for key in ("positions", "token_index", "head_positions"):
        if key in local:
            assert local[key] == remote[key], f"{what}: {key} differ"
    for key in ("scores", "head_scores"):
        if key in local:
            a, b = np.asarray(local[key]), np.asarray(remote[key])
            assert a.shape == b.shape, what
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=f"{what}: {key}")


# token: the K-shift of compaction; head: the move graph and the per-(layer, head) rope
# graph; flash attention: probabilities recomputed for scoring; kv_budget: compression
SETTINGS = {
    "token": {},
    "head": {"granularity": "head"},
    "token-flash": {"flash_attn": True},
    "layer-budget": {"granularity": "layer", "kv_budget": 96},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SETTINGS))
def test_layers_on_an_rpc_server_evict_as_on_the_cpu(rpc_build, smollm2, rpc_server, case):
    endpoint, proc, log = rpc_server
    local = _run(smollm2, None, SETTINGS[case])
    remote = _run(smollm2, endpoint, SETTINGS[case])
    assert proc.poll() is None, log.read_text()[-3000:]
    # every layer, and the KV buffer (K, V and the scores beside them), on the rpc-server
    assert "RPC0" not in local["log"]
    assert f"RPC0[{endpoint}] KV buffer size" in remote["log"], remote["log"][-3000:]
    assert "offloaded 31/31 layers" in remote["log"], remote["log"][-3000:]

    assert local["stats"]["evictions"] >= 3, local["stats"]  # the cache evicted several times
    assert remote["tokens"] == local["tokens"]
    for key in ("evictions", "cells_evicted", "cells_used", "compactions", "move_events"):
        assert remote["stats"][key] == local["stats"][key], key
    _assert_same_cells(local["prompt"], remote["prompt"], "after the prompt")
    _assert_same_cells(local["end"], remote["end"], "after decoding")
    # a saved state (read from the rpc-server) restores there: the same continuation
    assert remote["more_after_restore"] == remote["more"] == local["more"]
    _assert_same_cells(local["end"], remote["restored"], "after the restore")


# --- llama-server --rpc -----------------------------------------------------------

def _completion(server_bin, smollm2, extra, prompt, log):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    healthy = lambda: _answers(lambda: urllib.request.urlopen(base + "/health", timeout=2).close())  # noqa: E731
    with _running([server_bin, "-m", smollm2, "-np", 1, "-c", 128, "-t", 1, "-tb", 1, "--kv-policy", "a2sf",
                   "--host", "127.0.0.1", "--port", port, *extra], log, healthy, f"llama-server {extra}", 180):
        body = json.dumps({"prompt": prompt, "n_predict": 260, "temperature": 0, "cache_prompt": False}).encode()
        req = urllib.request.Request(base + "/completion", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            content = json.loads(r.read())["content"]
        with urllib.request.urlopen(base + "/slots", timeout=30) as r:
            slot = json.loads(r.read())[0]["a2sf"]
        return content, slot


@pytest.fixture()
def rpc_llama_server():
    """build/server's llama-server (A2SF_SERVER_BIN), if built with --rpc."""
    server_bin = _server_bin()
    usage = subprocess.run([str(server_bin), "--help"], capture_output=True, text=True, timeout=60).stdout
    if "--rpc" not in usage:
        pytest.skip(f"{server_bin} built without GGML_RPC (bash scripts/build-rpc.sh)")
    return server_bin


@pytest.mark.slow
def test_llama_server_rpc_answers_as_local(rpc_llama_server, smollm2, rpc_server, tmp_path):
    endpoint, proc, log = rpc_server
    prompt = "Once upon a time, in a village near the forest, there lived a little girl who " * 4
    local = _completion(rpc_llama_server, smollm2, [], prompt, tmp_path / "local.log")
    remote = _completion(rpc_llama_server, smollm2, ["--rpc", endpoint, "-ngl", "99"], prompt, tmp_path / "rpc.log")
    assert proc.poll() is None, log.read_text()[-3000:]
    assert local[1]["evictions"] >= 3, local[1]
    assert remote == local


def _python_completion(smollm2, extra, prompt, log):
    """python -m a2sf.server (this build) on a free port: (completion text, /extras/kv_stats)."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    healthy = lambda: _answers(lambda: urllib.request.urlopen(base + "/v1/models", timeout=2).close())  # noqa: E731
    with _running([sys.executable, "-m", "a2sf.server", "--model", smollm2, "--n_ctx", 128, "--n_threads", 1,
                   "--n_threads_batch", 1, "--kv-policy", "a2sf", "--host", "127.0.0.1", "--port", port, *extra],
                  log, healthy, f"a2sf.server {extra}", 180):
        body = json.dumps({"prompt": prompt, "max_tokens": 260, "temperature": 0}).encode()
        req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            text = json.loads(r.read())["choices"][0]["text"]
        with urllib.request.urlopen(base + "/extras/kv_stats", timeout=30) as r:
            stats = json.loads(r.read())
        return text, stats


@pytest.mark.slow
def test_python_server_rpc_servers_answers_as_local(rpc_build, smollm2, rpc_server, tmp_path):
    """python -m a2sf.server --rpc-servers: every layer (n_gpu_layers defaults to all) on the
    rpc-server, the same completion and eviction counters as the local server."""
    endpoint, proc, log = rpc_server
    prompt = "Once upon a time, in a village near the forest, there lived a little girl who " * 4
    local = _python_completion(smollm2, [], prompt, tmp_path / "local.log")
    remote = _python_completion(smollm2, ["--rpc-servers", endpoint], prompt, tmp_path / "rpc.log")
    assert proc.poll() is None, log.read_text()[-3000:]
    remote_log = (tmp_path / "rpc.log").read_text()
    assert f"RPC0[{endpoint}] KV buffer size" in remote_log, remote_log[-3000:]
    assert "RPC0" not in (tmp_path / "local.log").read_text()
    assert local[1]["evictions"] >= 3, local[1]
    assert remote[0] == local[0]
    for key in ("evictions", "cells_evicted", "n_cells", "n_tokens"):
        assert remote[1][key] == local[1][key], key
