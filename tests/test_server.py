"""a2sf.server: llama_cpp.server with a2sf.Llama, driven through the `openai` client on loopback."""
from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from a2sf._llama.rpc import rpc_supported

from conftest import require_module  # noqa: E402

require_module("fastapi")
require_module("uvicorn")
openai = require_module("openai")

N_CTX = 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    env.pop("CONFIG_FILE", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "a2sf.server", *args, "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc, url = _start_server(
        [
            "--model", str(smollm2), "--model-alias", "smollm2",
            "--kv-policy", "a2sf", "--forgetting-factor", "0.9", "--n-recent", "24",
            "--n-ctx", str(N_CTX), "--n-threads", "2", "--seed", "0",
        ],
        log,
    )
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)


def _kv_stats(url: str) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
    with opener.open(url + "/extras/kv_stats", timeout=60) as r:
        return json.loads(r.read())


def test_models_report_policy(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2"]
    policy = models[0].model_extra["kv_policy"]
    assert policy["name"] == "A2SF"
    assert policy["forgetting_factor"] == pytest.approx(0.9)
    assert policy["n_recent"] == 24
    assert models[0].model_extra["n_ctx"] == N_CTX


def test_chat_completion(client):
    r = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        max_tokens=16,
        temperature=0,
    )
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant"
    assert "Paris" in text
    assert r.usage.completion_tokens <= 16


def test_streaming_matches_non_streaming(client):
    kwargs = dict(
        model="smollm2",
        messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=12,
        temperature=0,
    )
    # llama-cpp-python re-evaluates a reused prompt's last token alone, whose rounding differs from
    # the fresh prompt's batch (on an AVX2-only CPU that flips this greedy answer): the first
    # request warms the prefix so the two compared requests take the same path
    client.chat.completions.create(**kwargs)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3  # token by token, not one blob
    assert streamed == full


def test_conversation_longer_than_cache(client, server):
    """Three long turns: the conversation outgrows n_ctx; eviction keeps the server answering."""
    filler = (
        "Here is a note about the weather in the valley, the river, the old mill and the "
        "farmers who bring their grain to it every autumn before the first snow. "
    )
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    usage = None
    for turn in range(3):
        messages.append({"role": "user", "content": filler * 2 + f"Turn {turn}: say OK."})
        r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
        reply = r.choices[0].message.content
        assert reply.strip()
        messages.append({"role": "assistant", "content": reply})
        usage = r.usage
    assert usage.prompt_tokens + usage.completion_tokens > N_CTX + 20
    stats = _kv_stats(server)
    assert stats["kv_policy"] == "A2SF"
    assert stats["evictions"] > 0 and stats["cells_evicted"] > 0
    assert stats["n_cells"] <= N_CTX < stats["n_tokens"]


def test_completion_prompt_longer_than_cache(client, server):
    """A prompt longer than n_ctx (plain llama_cpp.server answers 400 'exceed context window')."""
    prompt = "The river runs past the old mill, and the miller counts the sacks. " * 16
    r = client.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens > N_CTX and r.usage.completion_tokens > 0
    assert r.choices[0].text.strip()
    # every position went through the cache (the last sampled token is not evaluated)
    assert _kv_stats(server)["n_tokens"] == r.usage.prompt_tokens + r.usage.completion_tokens - 1


def test_without_policy_the_same_prompt_is_rejected(smollm2, tmp_path):
    """Control: a2sf.server without --kv-policy is plain llama_cpp.server (the cache limits the prompt)."""
    proc, url = _start_server(["--model", str(smollm2), "--model-alias", "plain", "--n-ctx", str(N_CTX),
                               "--n-threads", "2"], tmp_path / "plain.log")
    try:
        plain = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        assert plain.models.list().data[0].model_extra["kv_policy"] is None
        prompt = "The river runs past the old mill, and the miller counts the sacks. " * 16
        with pytest.raises(openai.BadRequestError, match="context"):
            plain.completions.create(model="plain", prompt=prompt, max_tokens=8, temperature=0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_two_parallel_requests(client):
    """Requests are serialised by llama_cpp.server's lock; both come back complete and correct."""
    questions = ["Paris is the capital of which country?", "Rome is the capital of which country?"]

    def ask(q):
        return client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": q}], max_tokens=16, temperature=0
        ).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(ask, questions))
    assert "France" in answers[0]
    assert "Italy" in answers[1]
    # the same answers as one at a time (no state leaks between the two)
    assert ask(questions[0]) == answers[0]


@pytest.mark.parametrize("flags, rc, message", [
    (["--kv-policy", "bogus"], 2, "unknown KV policy 'bogus'"),
    (["--rpc-servers", "localhost"], 2, "'localhost' is not an endpoint 'host:port'"),
    pytest.param(["--rpc-servers", "127.0.0.1:50052"], 1, "-DGGML_RPC=ON", id="rpc-servers-without-rpc-build",
                 marks=pytest.mark.skipif(rpc_supported(), reason="this build has the RPC backend")),
])
def test_bad_setting_is_a_clear_startup_error(smollm2, flags, rc, message):
    r = subprocess.run([sys.executable, "-m", "a2sf.server", "--model", str(smollm2), *flags],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == rc
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_batch_that_does_not_fit_is_a_clear_error(smollm2):
    r = subprocess.run(
        [sys.executable, "-m", "a2sf.server", "--model", str(smollm2), "--kv-policy", "h2o",
         "--n-ctx", "128", "--n-batch", "512"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode != 0
    assert "does not fit beside the protected cells" in r.stderr


def test_settings_from_command_line_and_config_file(tmp_path, monkeypatch):
    """Both spellings of options, and llama_cpp.server's config file with the policy fields."""
    from a2sf.server import A2SFModelSettings, parse_settings

    monkeypatch.delenv("CONFIG_FILE", raising=False)
    server, (model,) = parse_settings(["--model", "m.gguf", "--n-ctx", "128", "--kv_policy", "tova",
                                       "--n-recent", "16", "--port", "9000"])
    assert isinstance(model, A2SFModelSettings) and server.port == 9000
    assert model.n_ctx == 128 and model.policy_kwargs() == {"kv_policy": "tova", "n_recent": 16}
    assert model.n_batch is None and model.logits_all is False  # fitted by a2sf.Llama; opt-in logits

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"port": 9001, "models": [
        {"model": "a.gguf", "model_alias": "a", "kv_policy": "a2sf", "forgetting_factor": 0.5},
        {"model": "b.gguf", "model_alias": "b"},
    ]}))
    server, models = parse_settings(["--config_file", str(config)])
    assert server.port == 9001
    assert [m.policy_summary() and m.policy_summary()["forgetting_factor"] for m in models] == [0.5, None]

    config.write_text(json.dumps({"models": [{"model": "a.gguf", "kv_policy": "a2sf", "forgetting_factor": 2}]}))
    with pytest.raises(SystemExit):
        parse_settings(["--config_file", str(config)])


def test_rpc_servers_setting_is_checked_when_parsed_and_offloads_every_layer(monkeypatch):
    """--rpc-servers (llama_cpp.server's setting, handed to a2sf.Llama(rpc_servers=...)): without
    --n-gpu-layers every layer goes to the rpc-servers, as with Llama(rpc_servers=...)."""
    from a2sf.server import parse_settings

    monkeypatch.delenv("CONFIG_FILE", raising=False)
    _, (model,) = parse_settings(["--model", "m.gguf", "--rpc-servers", "10.0.0.1:50052,10.0.0.2:50052"])
    assert model.rpc_servers == "10.0.0.1:50052,10.0.0.2:50052" and model.n_gpu_layers == -1
    _, (model,) = parse_settings(["--model", "m.gguf", "--rpc-servers", "10.0.0.1:50052", "--n-gpu-layers", "3"])
    assert model.n_gpu_layers == 3
    _, (model,) = parse_settings(["--model", "m.gguf"])
    assert model.rpc_servers is None and model.n_gpu_layers == 0  # llama_cpp.server's default
