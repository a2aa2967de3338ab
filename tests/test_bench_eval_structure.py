"""bench and eval share helpers through one module and one press mapping (no import cycle)."""
import ast
import sys
from pathlib import Path

import pytest

import a2sf

PKG = Path(a2sf.__file__).resolve().parent


def _imports(path: Path):
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            out.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_bench_modules_do_not_import_each_other():
    # bench dispatches to bench_kvpress's section; the helpers both use live in bench_common
    assert not {".bench", "a2sf.bench"} & _imports(PKG / "bench_kvpress.py")
    assert not {".bench", "a2sf.bench", ".bench_kvpress", "a2sf.bench_kvpress"} & _imports(PKG / "bench_common.py")


def test_one_press_mapping():
    from a2sf import bench_kvpress
    from a2sf.eval import kvpress_compare

    assert kvpress_compare.KVPRESS_METHODS == ("none",) + tuple(kvpress_compare.PRESSES)
    assert {p for _, p in bench_kvpress.PAIRS if p is not None} <= set(kvpress_compare.PRESSES)
    for path in (PKG / "bench_kvpress.py", PKG / "eval" / "kvpress_compare.py"):
        src = path.read_text()
        assert src.count('"TOVAPress"') == (1 if path.name == "kvpress_compare.py" else 0), path


def test_text_tokens_reads_the_eval_texts(tiny_f32):
    from a2sf import Llama
    from a2sf.bench_common import text_tokens
    from a2sf.eval.data import load_texts

    llm = Llama(tiny_f32, n_ctx=64, n_threads=1, verbose=False)
    try:
        toks = text_tokens(llm, 50)
        want = llm.tokenize("\n".join(load_texts("austen").values()).encode(), add_bos=True)[:50]
        assert toks == want
    finally:
        llm.close()


def test_text_tokens_without_text_is_an_error(tmp_path):
    from a2sf.bench_common import text_tokens

    class NoModel:
        def tokenize(self, *a, **k):  # never reached
            raise AssertionError("tokenized a text that should not exist")

    with pytest.raises(FileNotFoundError, match="needs a text"):
        text_tokens(NoModel(), 10, source=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="needs a text"):
        text_tokens(NoModel(), 10, source=str(tmp_path))  # a directory without .txt files


def test_sweep_exports_exist():
    from a2sf.eval import sweep

    for name in sweep.__all__:
        assert hasattr(sweep, name), name


def test_record_factory_key_matches_the_store_key(tmp_path, tiny_f32):
    from a2sf.eval.engine import CacheConfig
    from a2sf.eval.store import record_key
    from a2sf.eval.sweep import RecordFactory

    f = RecordFactory("kvpress", "austen", tiny_f32, {"x": 1})
    rec = f.make_for("llama.cpp:a2sf", 0.2, 0.95, 0, 3, {"ppl": 1.0}, extra={"engine": "llama.cpp"})
    assert record_key(rec) == f.key_for("llama.cpp:a2sf", 0.2, 0.95, 0, 3)
    assert rec["engine"] == "llama.cpp" and rec["label"] == "llama.cpp:a2sf"
    cfg = CacheConfig("a2sf", 0.2, 0.95)
    assert record_key(f.make(cfg, 1, 0, {})) == f.key(cfg, 1, 0)


def test_compress_section_decodes_over_the_budget_and_reports_the_event(tiny_f32):
    """The bench's prompt-compression table: the policy decodes over kv_budget cells,
    vanilla over the whole prompt, and the compression event is timed and its moves counted."""
    from a2sf.bench import _compressed_decode, section_compress

    out = section_compress(tiny_f32, 96, 40, 4, ["a2sf"], False, 1, 1)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out if line.startswith("| ") and not line.startswith("| policy")}
    assert rows["vanilla"][0] == "96" and rows["a2sf"][0] == "40"
    r = _compressed_decode(tiny_f32, 96, 40, 4, "a2sf", False, 1)
    assert r["cells"] == 40 and r["compress_s"] > 0 and r["moved"] > 0  # per-head moves copied K/V rows


def test_long_extension_goes_on_past_vanilla(tiny_f32):
    """--long-extend: the bounded cache runs on to 2048 tokens in the same run; the first
    table is its first 1024, the second its speed per 1024-token part."""
    from a2sf.bench import section_long

    out = section_long(tiny_f32, 1024, 256, ["a2sf"], False, 1, n_extend=2048)
    first = [line for line in out if line.startswith("| a2sf | 256 |")]
    assert len(first) == 1 and "= 1024 (1024)" in first[0]  # cells evicted + used = fed, at 1024
    ext = out[out.index(next(line for line in out if line.startswith("Bounded caches on to 2048"))):]
    assert ext[2].startswith("| policy | 1k | 2k |") and ext[4].startswith("| a2sf |")


def test_bench_json_keeps_every_measurement_behind_the_tables(tiny_f32, tmp_path, capsys):
    """--json: one record per rep and configuration (the tables print their medians), with the command."""
    import json

    from a2sf.bench import main

    out = tmp_path / "raw.json"
    assert main(["--model", tiny_f32, "--sections", "overhead", "compress", "--sizes", "256", "--flash-attn", "off",
                 "--reps", "2", "--policies", "a2sf", "--decode", "4", "--compress-prompt", "96",
                 "--compress-budget", "40", "--compress-decode", "4", "--compress-policies", "a2sf",
                 "--threads", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["command"].endswith(f"--json {out}") and doc["command"] in table
    over = [r for r in doc["records"] if r["section"] == "overhead"]
    assert sorted((r["policy"] or "vanilla", r["rep"]) for r in over) == [("a2sf", 0), ("a2sf", 1), ("vanilla", 0), ("vanilla", 1)]
    assert all(r["cells"] == 256 and r["decode_tps"] > 0 and r["prefill_tps"] > 0 for r in over)
    comp = [r for r in doc["records"] if r["section"] == "compress"]
    assert len(comp) == 4 and {r["cells"] for r in comp if r["policy"] == "a2sf"} == {40}
