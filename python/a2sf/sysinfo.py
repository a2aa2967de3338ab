"""What a user pastes into a bug report: ``a2sf.system_info()`` / ``a2sf info``.

It names the a2sf and llama.cpp versions, the build (backends, AMX allowed or
not, GGML_NATIVE, the compiler's -mno-amx flags), the CPU features ggml was
compiled for (``llama_print_system_info()``) and the features the CPU reports
(/proc/cpuinfo on Linux), so a crash in a native kernel can be matched to the
instructions that were built in (docs/BUILD.md, "AMX").
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Any, Dict, List, Optional

__all__ = ["system_info", "system_info_dict", "ggml_cpu_features", "cpu_flags", "cpu_vendor"]

# /proc/cpuinfo flags worth reporting (the ISA extensions ggml has kernels for)
_CPU_FLAG_PREFIXES = ("sse", "ssse3", "avx", "amx", "fma", "f16c", "bmi", "neon", "asimd", "sve", "sme")


def ggml_cpu_features() -> Dict[str, str]:
    """``{"AVX2": "1", ...}``: the features ggml's CPU backend was compiled for.

    Parsed from llama.cpp's ``llama_print_system_info()``
    (``CPU : SSE3 = 1 | AVX = 1 | ...``).
    """
    import llama_cpp

    text = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    feats: Dict[str, str] = {}
    for part in text.replace("\n", "|").split("|"):
        if ":" in part:  # "CPU : SSE3 = 1" -> backend label, first feature
            part = part.split(":", 1)[1]
        if "=" in part:
            k, v = (x.strip() for x in part.split("=", 1))
            if k:
                feats[k] = v
    return feats


def _cpuinfo_field(*keys: str) -> Optional[str]:
    """The value of the first /proc/cpuinfo line whose key is one of ``keys`` (None: none, or no such file)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in keys:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_flags() -> List[str]:
    """The ISA flags the CPU reports (Linux /proc/cpuinfo; [] elsewhere)."""
    flags = _cpuinfo_field("flags", "Features")
    return [] if flags is None else sorted(x for x in flags.split() if x.startswith(_CPU_FLAG_PREFIXES))


def cpu_vendor() -> str:
    """The CPU's vendor string ("GenuineIntel", "AuthenticAMD"; Linux /proc/cpuinfo; "" elsewhere)."""
    return _cpuinfo_field("vendor_id") or ""


def _cpu_model() -> str:
    model = _cpuinfo_field("model name", "Model", "cpu model")
    return model if model is not None else platform.processor() or platform.machine()


def system_info_dict() -> Dict[str, Any]:
    """The facts of :func:`system_info` as a dict (JSON-friendly)."""
    import llama_cpp

    from . import LIB_DIR, __version__, llama_cpp_commit

    try:
        from . import _build_info as b
    except ImportError:  # a source tree without a build
        b = None
    backends = ["CPU"]
    if b is not None and getattr(b, "GGML_CUDA", False):
        backends.append("CUDA")
    return {
        "a2sf": __version__,
        "llama_cpp_commit": llama_cpp_commit(),
        "llama_cpp_python": getattr(llama_cpp, "__version__", "unknown"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "backends": backends,
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "build_type": getattr(b, "BUILD_TYPE", "unknown"),
        "ggml_native": getattr(b, "GGML_NATIVE", None),
        "amx_allowed": getattr(b, "AMX_ALLOWED", None),
        "no_amx_flags": list(getattr(b, "NO_AMX_FLAGS", ())),
        "patches": list(getattr(b, "PATCH_SERIES", ())),
        "ggml_cpu_features": ggml_cpu_features(),
        "cpu_flags": cpu_flags(),
        "lib_dir": str(LIB_DIR),
    }


def system_info() -> str:
    """A few lines naming the versions, the build and the CPU features (built for / reported)."""
    d = system_info_dict()
    built = " ".join(k for k, v in d["ggml_cpu_features"].items() if v not in ("0", "")) or "-"
    amx = {True: "allowed (-DA2SF_AMX=ON)", False: "off (" + " ".join(d["no_amx_flags"]) + ")",
           None: "unknown"}[d["amx_allowed"]]
    lines = [
        f"a2sf {d['a2sf']}  llama.cpp {d['llama_cpp_commit'][:12]}  llama-cpp-python {d['llama_cpp_python']}",
        f"python {d['python']}  {d['platform']}",
        f"cpu: {d['cpu']} ({d['cpu_count']} logical cores)",
        f"backends: {', '.join(d['backends'])}  gpu offload: {'yes' if d['gpu_offload'] else 'no'}  "
        f"build: {d['build_type']}, GGML_NATIVE={d['ggml_native']}",
        f"AMX kernels: {amx}",
        f"ggml built for: {built}",
        f"cpu reports: {' '.join(d['cpu_flags']) or '-'}",
        f"patches: {len(d['patches'])}  libraries: {d['lib_dir']}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(system_info())
