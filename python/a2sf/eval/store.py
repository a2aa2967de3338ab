"""Resumable JSON-lines results: one record per (task, dataset, config, window).

A record carries the exact configuration (settings, policy split, budget), the
model's identity (file name, size and SHA-256 of its first MiB -- hashing the
whole file would cost more than small runs), the a2sf version and git commit
and the llama.cpp commit. A re-run with the same settings skips every record
already present; changing a setting changes ``settings_hash`` and so reruns.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

__all__ = ["ResultStore", "model_identity", "code_identity", "settings_hash", "record_key", "emit_table"]

SCHEMA_VERSION = 1
REQUIRED_FIELDS = ("schema", "task", "dataset", "policy", "ratio", "alpha", "shots", "window",
                   "settings", "settings_hash", "model", "code", "metrics")


def model_identity(path: str) -> Dict[str, Any]:
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(1 << 20)
    return {"file": p.name, "size": p.stat().st_size,
            "sha256_first_mib": hashlib.sha256(head).hexdigest()}


def code_identity() -> Dict[str, Any]:
    import a2sf

    commit = "unknown"
    for d in (Path.cwd(), Path(__file__).resolve().parent):
        try:
            out = subprocess.run(["git", "-C", str(d), "rev-parse", "HEAD"], capture_output=True,
                                 text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0:
            commit = out.stdout.strip()
            break
    return {"a2sf_version": a2sf.__version__, "a2sf_commit": commit,
            "llama_cpp_commit": a2sf.llama_cpp_commit()}


def settings_hash(settings: Dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def record_key(rec: Dict[str, Any]) -> Tuple:
    return (rec["task"], rec["dataset"], rec["policy"], rec["ratio"], rec["alpha"],
            rec["shots"], rec["window"], rec["settings_hash"])


class ResultStore:
    """Append-only JSONL file; ``done(key)`` tells what a resumed run can skip."""

    def __init__(self, path: os.PathLike):
        self.path = Path(path)
        self.records: List[Dict[str, Any]] = []
        self._keys = set()
        if self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by an interrupted run
                    self.records.append(rec)
                    self._keys.add(record_key(rec))

    def done(self, key: Tuple) -> bool:
        return key in self._keys

    def add(self, rec: Dict[str, Any]) -> None:
        missing = [k for k in REQUIRED_FIELDS if k not in rec]
        if missing:
            raise ValueError(f"result record lacks {missing}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(rec)
        self._keys.add(record_key(rec))

    def select(self, **where: Any) -> Iterable[Dict[str, Any]]:
        for r in self.records:
            if all(r.get(k) == v for k, v in where.items()):
                yield r


class Progress:
    """A progress bar on stderr (tqdm when installed, a plain counter otherwise)."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.n = total, desc, 0
        self._bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, label: str = "") -> None:
        self.n += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(1)
        else:
            import sys

            print(f"[{self.desc}] {self.n}/{self.total} {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def emit_table(text: str, path: Optional[os.PathLike] = None) -> None:
    """Print a protocol's Markdown table, and write it to ``path`` too when given."""
    print(text)
    if path:
        Path(path).write_text(text)
