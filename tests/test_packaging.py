"""Packaging: the installed wheel works from anywhere; the sdist holds our sources and no llama.cpp."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import a2sf
from conftest import missing_dependency

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP_PYTHON_SDIST = "llama_cpp_python-0.3.36.tar.gz"


def test_installed_package_works_from_another_directory(tmp_path, tiny_f32):
    code = (
        "import a2sf, a2sf._core, a2sf.cli, a2sf.visualize\n"
        "from a2sf import Llama\n"
        f"llm = Llama({tiny_f32!r}, n_ctx=64, kv_policy='a2sf', verbose=False)\n"
        "r = llm.create_completion('the cat', max_tokens=300, temperature=0)\n"
        "print(a2sf.__file__)\n"
        "print(a2sf.LIB_DIR)\n"
        "print(llm.n_tokens, llm.kv_stats()['evictions'])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr
    init, lib_dir, counts = r.stdout.strip().splitlines()[-3:]
    assert "site-packages" in init and not init.startswith(str(ROOT / "python")), init
    assert any(Path(lib_dir).glob("libllama.*"))
    n_tokens, evictions = map(int, counts.split())
    assert n_tokens > 256 and evictions > 0  # the patched engine, not a stock libllama

    r = subprocess.run([str(Path(sys.executable).parent / "a2sf"), "--version"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith(f"a2sf {a2sf.__version__}  llama.cpp "), r.stdout


def _build_sdist(out: Path) -> Path:
    if importlib.util.find_spec("build") is None:
        missing_dependency("the 'build' package is not installed (requirements.txt)")
    r = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (sdist,) = out.glob("a2sf-*.tar.gz")
    return sdist


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    return _build_sdist(tmp_path_factory.mktemp("sdist"))


def test_sdist_holds_our_sources_and_no_llama_cpp(sdist):
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    expected = {"pyproject.toml", "CMakeLists.txt", "README.md", "requirements.txt", "cpp/patches/README.md"}
    for pattern in ("cpp/patches/*.patch", "cpp/src/*", "cpp/include/*", "cpp/bindings/*", "cpp/scripts/*",
                    "cmake/*", "python/a2sf/*.py", "python/a2sf/testing/*.py"):
        files = {str(p.relative_to(ROOT)) for p in ROOT.glob(pattern) if p.is_file() and "__pycache__" not in str(p)}
        assert files, pattern
        expected |= files
    missing = expected - names
    assert not missing, sorted(missing)
    assert any(n.startswith("cpp/patches/0001-") for n in names)
    # nothing of llama.cpp / ggml, nor build outputs
    foreign = [n for n in names if n.startswith(("build/", ".venv/", "vendor/", "ggml/", "src/", "include/", "common/"))
               or "llama.cpp/" in n or "/ggml" in n or n.endswith((".so", ".o", ".a"))]
    assert not foreign, foreign
    cpp_sources = [n for n in names if n.endswith((".c", ".cpp", ".cu", ".h", ".hpp"))]
    assert all(n.startswith(("cpp/src/", "cpp/include/", "cpp/bindings/", "cpp/server/")) for n in cpp_sources), cpp_sources


@pytest.mark.slow
def test_wheel_from_sdist_builds_offline(sdist, tmp_path):
    """The sdist builds a working wheel with no network, given llama-cpp-python's sdist (A2SF_LLAMA_CPP_SDIST)."""
    cache = Path(os.environ.get("A2SF_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                          Path.home() / ".cache") / "a2sf")
    llama_sdist = cache / LLAMA_CPP_PYTHON_SDIST
    if not llama_sdist.is_file():
        missing_dependency(f"{llama_sdist} is not cached")
    dead = "http://127.0.0.1:9"  # any download attempt fails
    env = dict(os.environ, A2SF_CACHE_DIR=str(tmp_path / "cache"), A2SF_LLAMA_CPP_SDIST=str(llama_sdist),
               PIP_NO_INDEX="1", http_proxy=dead, https_proxy=dead, HTTP_PROXY=dead, HTTPS_PROXY=dead)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(tmp_path / "wheel"),
         str(sdist)],
        env=env, capture_output=True, text=True, timeout=3600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("a2sf-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "a2sf/lib/libllama.so" in names
    assert any(n.startswith("a2sf/_core") and n.endswith(".so") for n in names)
    assert {"a2sf/cli.py", "a2sf/server.py", "a2sf/visualize.py", "a2sf/_build_info.py"} <= set(names)
    assert "a2sf = a2sf.cli:main" in entry_points
