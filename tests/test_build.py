"""The installed build runs on any x86-64 machine: no AMX code unless asked for,
a crash in a native kernel is reported in one line, every import is declared,
and system_info() says what was built."""
from __future__ import annotations

import ast
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import a2sf
from a2sf.testing.smoke import check

PKG = Path(a2sf.__file__).resolve().parent
# mnemonics of the AMX tile instructions (ggml-cpu/amx/ uses these)
AMX_INSN = re.compile(r"\s(tilezero|ldtilecfg|sttilecfg|tileloadd|tileloaddt1|tilestored|tilerelease|"
                      r"tdpbssd|tdpbsud|tdpbusd|tdpbuud|tdpbf16ps|tdpfp16ps)\s")


def _build_info():
    from a2sf import _build_info

    return _build_info


def _cpu_libs():
    libs = sorted((PKG / "lib").glob("libggml-cpu*.so*"))
    assert libs, f"no libggml-cpu in {PKG / 'lib'}"
    return libs


def test_default_build_has_no_amx_instructions():
    b = _build_info()
    if b.AMX_ALLOWED:
        pytest.skip("built with -DA2SF_AMX=ON: AMX kernels were asked for")
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is needed to check the installed library"
    for lib in _cpu_libs():
        out = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(lib)], capture_output=True,
                             text=True, check=True).stdout
        hits = AMX_INSN.findall(out)
        assert not hits, f"{lib.name} holds {len(hits)} AMX instructions ({sorted(set(hits))})"


def test_ggml_reports_no_amx_features():
    feats = a2sf.sysinfo.ggml_cpu_features()
    assert "AVX" in feats or "NEON" in feats or "SSE3" in feats, feats  # the report was parsed
    if not _build_info().AMX_ALLOWED:
        assert feats.get("AMX_INT8", "0") == "0", feats


def test_build_info_names_the_no_amx_flags():
    b = _build_info()
    if sys.platform.startswith("linux") and not b.AMX_ALLOWED and re.match(r"x86_64|AMD64", __import__("platform").machine()):
        assert "-mno-amx-tile" in b.NO_AMX_FLAGS and "-mno-amx-int8" in b.NO_AMX_FLAGS


def test_system_info_names_versions_backends_and_features():
    text = a2sf.system_info()
    d = a2sf.sysinfo.system_info_dict()
    assert f"a2sf {a2sf.__version__}" in text
    assert a2sf.llama_cpp_commit()[:12] in text
    assert "CPU" in d["backends"] and "backends: CPU" in text
    assert "AMX kernels:" in text and "ggml built for:" in text and "cpu reports:" in text
    assert d["ggml_cpu_features"], d
    if sys.platform.startswith("linux"):
        assert d["cpu_flags"], "no ISA flags read from /proc/cpuinfo"


def test_cli_info_and_version():
    exe = [sys.executable, "-m", "a2sf"]
    r = subprocess.run(exe + ["info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ggml built for:" in r.stdout and "AMX kernels:" in r.stdout
    r = subprocess.run(exe + ["--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"a2sf {a2sf.__version__}") and "llama.cpp" in r.stdout


def test_smoke_run_passes_here():
    assert check() is None


def test_a_native_crash_is_one_line_naming_the_signal():
    msg = check([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"])
    assert msg is not None and "\n" not in msg
    assert "SIGILL" in msg and "docs/BUILD.md" in msg


def test_a_failing_smoke_run_is_reported_with_its_exit_code():
    msg = check([sys.executable, "-c", "import sys; sys.exit('no model here')"])
    assert msg is not None and "exit code 1" in msg and "no model here" in msg


# distribution that brings each top-level module the package imports
_DIST_OF = {
    "llama_cpp": "llama-cpp-python", "numpy": "numpy", "gguf": "gguf", "safetensors": "safetensors",
    "torch": "torch", "transformers": "transformers", "tokenizers": "tokenizers",
    "matplotlib": "matplotlib", "tqdm": "tqdm", "fastapi": "fastapi", "uvicorn": "uvicorn",
    "pydantic": "pydantic", "yaml": "pyyaml", "kvpress": "kvpress",
}
# modules imported only by code that says how to install them (kvpress: --no-deps, see requirements-eval.txt)
_UNDECLARED_OK = {"kvpress"}


def _imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_every_import_of_the_package_is_declared():
    reqs = md.requires("a2sf") or []
    declared = {re.split(r"[ ;<>=!\[~]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}
    core = {re.split(r"[ ;<>=!\[~]", r, maxsplit=1)[0].lower() for r in reqs if "extra ==" not in r}
    assert {"llama-cpp-python", "numpy", "gguf", "safetensors"} <= core, core
    missing = {}
    for f in PKG.rglob("*.py"):
        for mod in _imports(f):
            if mod in sys.stdlib_module_names or mod in ("a2sf", "__future__") or mod in _UNDECLARED_OK:
                continue
            dist = _DIST_OF.get(mod)
            if dist is None or dist.lower() not in declared:
                missing.setdefault(mod, []).append(str(f.relative_to(PKG)))
    assert not missing, f"imports no requirement or extra of a2sf brings: {missing}"
