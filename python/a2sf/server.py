"""OpenAI-compatible server: llama-cpp-python's ``llama_cpp.server`` with :class:`a2sf.Llama`.

    python -m a2sf.server --model model.gguf --kv-policy a2sf --forgetting-factor 0.95 --n-ctx 1024
    a2sf serve --model model.gguf --kv-policy h2o --n-recent 64 --port 8000

Everything of ``python -m llama_cpp.server`` is reused (its FastAPI app and
routes, request locking, settings and their command-line parsing, config
files); this module only

* extends its ``ModelSettings`` with ``kv_policy`` and the policy settings of
  :class:`a2sf.Llama` (one per row of :data:`a2sf.policies.SETTINGS`:
  ``forgetting_factor``, ``n_sink``, ``n_recent``, ``max_positions`` ...),
  validated when the settings are parsed;
* makes the model proxy build :class:`a2sf.Llama` instead of ``llama_cpp.Llama``;
* makes ``/v1/models`` report each model's policy (field ``kv_policy``) and adds
  ``GET /extras/kv_stats`` (eviction counters of the loaded model);
* accepts ``--kv-policy`` as well as ``--kv_policy`` for every option.

With a policy the cache evicts instead of overflowing, so a conversation can
run past ``--n_ctx`` (up to ``--max_positions``, default: the model's training
context).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import types
from typing import Any, Dict, List, Optional, Tuple
from unittest import mock

import a2sf  # binds llama_cpp to a2sf's libllama before llama_cpp.server imports it

from ._deps import import_hint

with import_hint("a2sf.server needs llama-cpp-python's server extras: "
                 "pip install fastapi uvicorn sse-starlette starlette-context pydantic-settings"):
    import llama_cpp.server.app as _server_app
    import llama_cpp.server.model as _server_model
    from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
    from llama_cpp.server.settings import ModelSettings, ServerSettings

from fastapi import Depends
from pydantic import Field, create_model, model_validator

from ._llama.rpc import parse_rpc_servers
from .policies import POLICY_NAMES, SETTINGS, KVPolicy, PolicyKind, policy_from_settings

__all__ = [
    "A2SFModelSettings",
    "A2SFSettings",
    "A2SFConfigFileSettings",
    "A2SFLlamaProxy",
    "create_app",
    "main",
]

#: the kv_policy setting's help (its choices: POLICY_NAMES)
KV_POLICY_HELP = (
    f"KV-cache eviction policy: {', '.join(POLICY_NAMES)} "
    "(unset: plain llama.cpp, the cache is limited to n_ctx)."
)


class _A2SFModelSettingsBase(ModelSettings):
    """llama_cpp.server's model settings, with a2sf's defaults and checks.

    :data:`A2SFModelSettings` adds one field per row of
    :data:`a2sf.policies.SETTINGS`.
    """

    kv_policy: Optional[str] = Field(default=None, description=KV_POLICY_HELP)
    # llama_cpp.server defaults to 512; with a policy the batch must fit beside
    # the protected cells, so a2sf.Llama picks it unless it is given.
    n_batch: Optional[int] = Field(
        default=None,
        ge=1,
        description="The batch size to use per eval (default: 512, or fitted to n_ctx with a kv_policy).",
    )
    n_ubatch: Optional[int] = Field(
        default=None,
        ge=1,
        description="The physical batch size used by llama.cpp (default: n_batch).",
    )
    # llama_cpp.server defaults to True; with a policy the logits kept per
    # position grow with the conversation (n_vocab floats each), so it is opt-in.
    logits_all: bool = Field(
        default=False,
        description="Keep logits of every position (needed for logprobs; memory grows with the sequence under a kv_policy).",
    )

    @model_validator(mode="after")
    def _check_policy(self):
        # Fail at start-up with a clear message, not at the first request.
        if self.kv_policy is not None and self.kv_policy.strip().lower() in ("", "null"):
            self.kv_policy = None
        self.resolved_policy()
        if self.rpc_servers is not None:
            # llama_cpp.server hands rpc_servers to the Llama; a2sf.Llama registers them
            # (a2sf._llama.rpc). A malformed endpoint fails here, before any load, and
            # without n_gpu_layers every layer goes there, as with Llama(rpc_servers=...)
            parse_rpc_servers(self.rpc_servers)
            if "n_gpu_layers" not in self.model_fields_set:
                self.n_gpu_layers = -1
        if self.hf_model_repo_id is not None:
            raise ValueError("a2sf.server loads local GGUF files only (no model hub): drop hf_model_repo_id")
        return self

    def resolved_policy(self) -> Tuple[Optional[KVPolicy], Dict[str, Any]]:
        """(policy, Python-only settings) as :func:`a2sf.policies.policy_from_settings` resolves them."""
        return policy_from_settings(self.kv_policy, **{s.name: getattr(self, s.name) for s in SETTINGS})

    def policy_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of :class:`a2sf.Llama` these settings set."""
        names = ("kv_policy",) + tuple(s.name for s in SETTINGS)
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def policy_summary(self) -> Optional[Dict[str, Any]]:
        """The resolved policy (name and every field), as /v1/models reports it."""
        policy, extras = self.resolved_policy()
        if policy is None:
            return None
        summary: Dict[str, Any] = {"name": type(policy).__name__}
        summary.update(dataclasses.asdict(policy))
        summary["kind"] = PolicyKind(policy.kind).name.lower()
        summary.update({s.name: extras.get(s.name) for s in SETTINGS if s.field is None})
        return summary


#: llama_cpp.server's model settings plus a2sf's KV-cache eviction policy: one
#: optional field per row of a2sf.policies.SETTINGS (None: the policy's value),
#: validated when the settings are parsed.
A2SFModelSettings = create_model(
    "A2SFModelSettings",
    __base__=_A2SFModelSettingsBase,
    __module__=__name__,
    **{s.name: (Optional[s.type], Field(default=None, description=s.help)) for s in SETTINGS},
)
A2SFModelSettings.__doc__ = "llama_cpp.server's model settings plus a2sf's KV-cache eviction policy."


class A2SFSettings(ServerSettings, A2SFModelSettings):
    """Server and model settings of one command line (cf. llama_cpp.server.settings.Settings)."""


class A2SFConfigFileSettings(ServerSettings):
    """Config file (--config_file / CONFIG_FILE): server settings and a list of models."""

    models: List[A2SFModelSettings] = Field(default=[], description="Model configs")


def _build_llama(**kwargs: Any) -> a2sf.Llama:
    """llama_cpp.server's loader calls this as ``llama_cpp.Llama(**kwargs)``."""
    for name in ("n_batch", "n_ubatch"):
        if kwargs.get(name) is None:
            kwargs.pop(name, None)  # the Llama's own default / policy fitting
    return a2sf.Llama(**kwargs)


class A2SFLlamaProxy(_server_model.LlamaProxy):
    """llama_cpp.server's model proxy, loading :class:`a2sf.Llama` with each model's policy."""

    def __init__(self, models: List[ModelSettings]) -> None:
        models = [
            m if isinstance(m, A2SFModelSettings) else A2SFModelSettings.model_validate(m.model_dump())
            for m in models
        ]
        super().__init__(models)

    def __setitem__(self, model: str, settings: Any):
        if isinstance(settings, (bytes, str)):
            settings = A2SFModelSettings.model_validate_json(settings)
        super().__setitem__(model, settings)

    def settings(self, alias: str) -> A2SFModelSettings:
        """The settings of a model alias."""
        return self._model_settings_dict[alias]  # type: ignore[return-value]

    @staticmethod
    def load_llama_from_model_settings(settings: ModelSettings) -> a2sf.Llama:
        if not isinstance(settings, A2SFModelSettings):
            settings = A2SFModelSettings.model_validate(settings.model_dump())
        policy = settings.policy_kwargs()

        def llama(**kwargs: Any) -> a2sf.Llama:
            return _build_llama(**kwargs, **policy)

        # The parent's loader (chat handlers, LoRA, caches, tokenizers ...)
        # constructs ``llama_cpp.Llama``; reuse it with that one name pointing
        # at a2sf.Llama. Loads run one at a time (the server's request lock).
        llama_cpp_with_a2sf = types.ModuleType("llama_cpp")
        llama_cpp_with_a2sf.__dict__.update(vars(_server_model.llama_cpp))
        llama_cpp_with_a2sf.Llama = llama  # type: ignore[attr-defined]
        with mock.patch.object(_server_model, "llama_cpp", llama_cpp_with_a2sf):
            return _server_model.LlamaProxy.load_llama_from_model_settings(settings)


def _models_with_policy():
    """``/v1/models`` of llama_cpp.server, each entry with its ``kv_policy``."""

    async def get_models(
        llama_proxy: A2SFLlamaProxy = Depends(_server_app.get_llama_proxy),
    ) -> Dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": alias,
                    "object": "model",
                    "owned_by": "me",
                    "permissions": [],
                    "kv_policy": llama_proxy.settings(alias).policy_summary(),
                    "n_ctx": llama_proxy.settings(alias).n_ctx,
                }
                for alias in llama_proxy
            ],
        }

    return get_models


async def _kv_stats(
    model: Optional[str] = None,
    llama_proxy: A2SFLlamaProxy = Depends(_server_app.get_llama_proxy),
) -> Dict[str, Any]:
    """Eviction counters of the model (``kv_stats()``), and the cells it holds now."""
    llama = llama_proxy(model)
    if not llama.a2sf_active:
        return {"kv_policy": None, "n_tokens": llama.n_tokens}
    return {
        "kv_policy": type(llama.kv_policy).__name__,
        "n_tokens": llama.n_tokens,
        "n_cells": llama.kv_n_cells(),
        "n_ctx": llama.n_ctx(),
        **llama.kv_stats(),
    }


def create_app(
    server_settings: ServerSettings,
    model_settings: List[A2SFModelSettings],
):
    """llama_cpp.server.app.create_app, serving :class:`a2sf.Llama` models."""
    with contextlib.ExitStack() as stack:
        # create_app would re-read CONFIG_FILE with the plain settings classes
        # (losing the policy fields); our main() has read it already.
        stack.enter_context(mock.patch.dict(os.environ))
        os.environ.pop("CONFIG_FILE", None)
        stack.enter_context(mock.patch.object(_server_app, "LlamaProxy", A2SFLlamaProxy))
        app = _server_app.create_app(server_settings=server_settings, model_settings=model_settings)

    # Our routes go in front of llama_cpp.server's router: the first match
    # wins, so /v1/models is ours (it reports the policies).
    n_routes = len(app.router.routes)
    app.add_api_route(
        "/v1/models",
        _models_with_policy(),
        methods=["GET"],
        summary="Models (with their KV-cache policy)",
        dependencies=[Depends(_server_app.authenticate)],
        tags=["OpenAI V1"],
    )
    app.add_api_route(
        "/extras/kv_stats",
        _kv_stats,
        methods=["GET"],
        summary="Eviction statistics of the loaded model",
        dependencies=[Depends(_server_app.authenticate)],
        tags=["Extras"],
    )
    ours = app.router.routes[n_routes:]
    app.router.routes[:] = ours + app.router.routes[:n_routes]
    app.title = "a2sf (llama.cpp with KV-cache eviction) OpenAI-compatible API"
    return app


class _DashedArgumentParser(argparse.ArgumentParser):
    """Every ``--snake_case`` option also answers to ``--kebab-case``."""

    def add_argument(self, *names: str, **kwargs: Any):
        extra = [
            "--" + n[2:].replace("_", "-")
            for n in names
            if n.startswith("--") and "_" in n
        ]
        return super().add_argument(*names, *extra, **kwargs)


EXAMPLES = """\
examples:
  # A2SF eviction in a 1024-cell cache, OpenAI API on http://localhost:8000/v1
  python -m a2sf.server --model model.gguf --kv-policy a2sf --forgetting-factor 0.95 --n-ctx 1024

  # H2O keeping 64 recent tokens, on all interfaces
  a2sf serve --model model.gguf --kv-policy h2o --n-recent 64 --host 0.0.0.0 --port 8080

  # plain llama.cpp (no eviction): leave --kv-policy out
  python -m a2sf.server --model model.gguf --n-ctx 4096

  # then, from Python:
  #   from openai import OpenAI
  #   client = OpenAI(base_url="http://localhost:8000/v1", api_key="none")
  #   client.chat.completions.create(model="model.gguf", messages=[{"role": "user", "content": "Hi"}])
"""


def build_parser(prog: str = "python -m a2sf.server") -> argparse.ArgumentParser:
    """The command line of llama_cpp.server, with the policy options."""
    parser = _DashedArgumentParser(
        prog=prog,
        description="OpenAI-compatible server (llama_cpp.server) running a2sf.Llama: "
        "llama.cpp with attention-score KV-cache eviction.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_args_from_model(parser, A2SFSettings)
    parser.add_argument("--config_file", type=str, help="Path to a JSON or YAML config file.")
    return parser


def parse_settings(argv: Optional[List[str]] = None, prog: str = "python -m a2sf.server"):
    """(server settings, model settings list) from a command line or a config file."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    config_file = os.environ.get("CONFIG_FILE", args.config_file)
    try:
        if config_file:
            if not os.path.exists(config_file):
                raise ValueError(f"Config file {config_file} not found!")
            with open(config_file, "rb") as f:
                data = f.read()
            if config_file.endswith((".yaml", ".yml")):
                import json

                import yaml

                data = json.dumps(yaml.safe_load(data))
            config = A2SFConfigFileSettings.model_validate_json(data)
            return ServerSettings.model_validate(config.model_dump(exclude={"models"})), config.models
        if args.model is None:
            raise ValueError("--model is required (a local .gguf file)")
        return (
            parse_model_from_args(ServerSettings, args),
            [parse_model_from_args(A2SFModelSettings, args)],
        )
    except Exception as e:  # pydantic's message names the bad field
        parser.exit(2, f"{parser.prog}: error: {e}\n")
        raise  # pragma: no cover


def main(argv: Optional[List[str]] = None, prog: str = "python -m a2sf.server") -> int:
    server_settings, model_settings = parse_settings(argv, prog)
    import uvicorn

    try:
        app = create_app(server_settings=server_settings, model_settings=model_settings)
    except (ValueError, TypeError) as e:  # bad settings, found while loading the model
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, ConnectionError) as e:  # rpc_servers: a build without RPC, no rpc-server there
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    uvicorn.run(
        app,
        host=os.getenv("HOST", server_settings.host),
        port=int(os.getenv("PORT", server_settings.port)),
        ssl_keyfile=server_settings.ssl_keyfile,
        ssl_certfile=server_settings.ssl_certfile,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
