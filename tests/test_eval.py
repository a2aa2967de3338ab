"""a2sf.eval: the evaluation harness on the tiny random model and Austen text (fast)."""
from __future__ import annotations

import json
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from a2sf.eval import main
from a2sf.eval.data import MCQuestion, austen_dir, load_mc, load_texts
from a2sf.eval.engine import BudgetRunner, CacheConfig, chunk_for, log_softmax_rows, split_budget
from a2sf.eval.mc import EncodedQuestion, encode_questions, score_question
from a2sf.eval.ppl import make_windows, window_nll
from a2sf.eval.store import REQUIRED_FIELDS, ResultStore
from a2sf.eval.sweep import build_sweep


def _austen_tokens(runner, n):
    text = load_texts("austen")["persuasion"]
    toks = runner.llm.tokenize(text[:20000].encode(), add_bos=True)
    assert len(toks) >= n
    return toks[:n]


@pytest.fixture(scope="module")
def runner(tiny_f32):
    r = BudgetRunner(tiny_f32, n_ctx=512, n_threads=1)
    yield r
    r.close()


# -- configuration -----------------------------------------------------------------
def test_split_and_chunk_follow_the_paper_split():
    assert split_budget(100) == {"n_sink": 4, "n_recent": 48, "n_selected": 48}
    assert split_budget(6) == {"n_sink": 0, "n_recent": 3, "n_selected": 3}
    assert chunk_for(100, 64) == 25 and chunk_for(100, 16) == 16 and chunk_for(6, 64, 8) == 8
    assert chunk_for(None, 64) == 64
    assert CacheConfig("h2o", 0.2).budget(1000) == 200
    assert CacheConfig("h2o", 0.2).budget(10) == 4  # min_budget
    assert CacheConfig("h2o", cells=128).budget(1000) == 128
    assert CacheConfig("none").budget(1000) is None


@pytest.mark.parametrize("kw,match", [
    (dict(policy="snapkv"), "unknown policy"),
    (dict(policy="none", ratio=0.5), "takes no"),
    (dict(policy="h2o"), "ratio must be"),
    (dict(policy="h2o", ratio=1.5), "ratio must be"),
    (dict(policy="h2o", ratio=0.5, alpha=0.9), "fixes its forgetting factor"),
    (dict(policy="a2sf", ratio=0.5, alpha=2.0), "alpha"),
    (dict(policy="a2sf", ratio=0.5, cells=64), "not both"),
])
def test_bad_cache_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        CacheConfig(**kw)


def test_sweep_order_and_alpha_points():
    s = build_sweep(["none", "h2o", "a2sf"], [0.2, 0.5], [0.5, 0.95], 0.2)
    assert [c.label for c in s] == ["none", "h2o@0.2", "a2sf@0.2,a=0.95", "h2o@0.5", "a2sf@0.5,a=0.95",
                                    "a2sf@0.2,a=0.5"]


# -- protocol 1: perplexity ----------------------------------------------------------
def test_full_cache_ppl_equals_ppl_from_the_logits(tiny_f32, runner):
    toks = _austen_tokens(runner, 160)
    m = window_nll(runner, CacheConfig("none"), toks, 128, chunk_max=64)
    # independently: the plain llama_cpp.Llama, logits of every position
    ref = llama_cpp.Llama(tiny_f32, n_ctx=256, logits_all=True, n_threads=1, verbose=False)
    ref.eval(toks)
    lp = log_softmax_rows(np.asarray(ref.scores[:len(toks)], dtype=np.float32))
    nll = -sum(lp[i - 1, toks[i]] for i in range(128, 160))
    ref.close()
    assert m["n_scored"] == 32
    assert m["nll_sum"] == pytest.approx(nll, rel=1e-4)
    assert m["ppl"] == pytest.approx(np.exp(nll / 32), rel=1e-4)


def test_compressed_ppl_keeps_the_budget_and_differs(runner):
    toks = _austen_tokens(runner, 160)
    full = window_nll(runner, CacheConfig("none"), toks, 128, chunk_max=64)
    streaming = window_nll(runner, CacheConfig("streaming", 0.25), toks, 128, chunk_max=64)
    assert streaming["max_cells"] == 32
    # StreamingLLM kept exactly the sinks and the newest positions
    pos = runner.llm.kv_scores().positions.tolist()
    assert pos[:4] == [0, 1, 2, 3] and pos[-1] == 127 and len(pos) == 32
    assert streaming["nll_sum"] != pytest.approx(full["nll_sum"], rel=1e-6)


# -- protocol 2: multiple choice -------------------------------------------------------
class SpyRunner(BudgetRunner):
    """Records the cells of the sequence before every decode of the context."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.cells_before = []

    def decode(self, tokens, pos0, logits="last"):
        if self._policy_active and logits != "all":
            self.cells_before.append(self.n_cells())
        return super().decode(tokens, pos0, logits)


@pytest.mark.parametrize("policy,alpha", [("h2o", None), ("a2sf", 0.9), ("tova", None), ("vatp", None),
                                          ("random", None), ("streaming", None)])
def test_mc_cells_never_exceed_the_budget(tiny_f32, policy, alpha):
    spy = SpyRunner(tiny_f32, n_ctx=512, n_threads=1)
    try:
        ctx = _austen_tokens(spy, 120)
        q = EncodedQuestion(ctx, [[200 + i, 210 + i] for i in range(4)], [3] * 4, 0, "q")
        cfg = CacheConfig(policy, 0.2, alpha)
        out = score_question(spy, cfg, q, chunk_max=16, chunk_min=1)
        assert out["budget"] == 24
        # after every chunk's eviction the sequence holds at most the budget
        assert spy.cells_before and max(spy.cells_before) <= 24
        assert out["max_cells"] == 24
        # the choices were removed again: the compressed context is what is left
        assert spy.n_cells() == 24
        assert len(out["loglik"]) == 4 and all(np.isfinite(out["loglik"]))
    finally:
        spy.close()


def test_mc_scorer_picks_the_most_likely_choice(runner):
    ctx = _austen_tokens(runner, 40)
    runner.set_config(CacheConfig("none"), None)
    last = runner.feed_context(ctx, None)
    order = np.argsort(-last)
    best, others = int(order[0]), [int(t) for t in order[50:53]]
    for gold in range(4):
        choices = others[:gold] + [best] + others[gold:]
        q = EncodedQuestion(ctx, [[t] for t in choices], [1] * 4, gold, "constructed")
        out = score_question(runner, CacheConfig("none"), q, chunk_max=64)
        assert out["pred"] == gold and out["pred_norm"] == gold
        # two-token choices: the scorer sums over the tokens of each choice
        q2 = EncodedQuestion(ctx, [[t, t] for t in choices], [2] * 4, gold, "constructed")
        out2 = score_question(runner, CacheConfig("none"), q2, chunk_max=64)
        assert out2["loglik"][gold] < out["loglik"][gold]


def test_mc_on_smollm2_knows_an_easy_fact(smollm2, tmp_path):
    qs = tmp_path / "q.jsonl"
    qs.write_text(json.dumps({"query": "The capital of France is", "choices": ["banana", "Paris", "seven"],
                              "gold": 1}) + "\n")
    questions = load_mc(str(qs))
    r = BudgetRunner(smollm2, n_ctx=256, n_threads=1)
    try:
        enc = encode_questions(questions, questions, 0, lambda s, add_bos=True: r.llm.tokenize(s.encode(), add_bos=add_bos))
        assert r.llm.detokenize(enc[0].choices[1]).decode() == " Paris"
        out = score_question(r, CacheConfig("none"), enc[0], chunk_max=64)
        assert out["pred"] == 1
    finally:
        r.close()


def test_mc_jsonl_validation(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 5}) + "\n")
    with pytest.raises(ValueError, match="gold 5"):
        load_mc(str(bad))
    with pytest.raises(ValueError, match="unknown multiple-choice task"):
        load_mc("no_such_task")


def test_shot_prefix_uses_another_solved_question():
    from a2sf.eval.data import shot_prefix

    qs = [MCQuestion(f"Q{i}?", ("a", "b"), i % 2, str(i)) for i in range(5)]
    p = shot_prefix(qs, qs, 0, 1)
    assert p.endswith("\n\n") and not p.startswith("Q0?")
    assert p in {f"Q{j}? {'ab'[j % 2]}\n\n" for j in range(1, 5)}


# -- harness: JSON records, resumability, CLI errors -------------------------------------
def _ppl_args(tiny, out):
    return ["ppl", "--model", tiny, "--texts", "austen", "--windows", "2", "--context", "96",
            "--continuation", "16", "--policies", "none", "h2o", "a2sf", "--ratios", "0.5",
            "--alphas", "0.5", "--alpha-ratio", "0.5", "--n-ctx", "256", "--no-progress", "--out", str(out)]


@pytest.fixture(scope="module")
def ppl_run(tiny_f32, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    assert main(_ppl_args(tiny_f32, out)) == 0
    return out


def test_ppl_records_schema(ppl_run, tiny_f32):
    recs = [json.loads(l) for l in (ppl_run / "ppl.jsonl").read_text().splitlines()]
    # none + h2o@0.5 + a2sf@0.5 (0.95) + a2sf@0.5 (0.5), two windows each
    assert len(recs) == 8
    assert {r["label"] for r in recs} == {"none", "h2o@0.5", "a2sf@0.5,a=0.95", "a2sf@0.5,a=0.5"}
    for r in recs:
        assert all(k in r for k in REQUIRED_FIELDS)
        assert r["model"]["file"] == Path(tiny_f32).name and len(r["model"]["sha256_first_mib"]) == 64
        assert r["model"]["size"] == Path(tiny_f32).stat().st_size
        assert r["settings"]["context"] == 96 and r["settings"]["continuation"] == 16
        assert r["metrics"]["n_scored"] == 16 and r["metrics"]["ppl"] > 1
        if r["policy"] != "none":
            assert r["cache"]["budget"] == 48 and r["metrics"]["max_cells"] == 48
            assert r["cache"]["n_sink"] + r["cache"]["n_recent"] + r["cache"]["n_selected"] == 48
            assert r["cache"]["policy_fields"]["n_recent"] == r["cache"]["n_recent"]


def test_ppl_type_k_quantizes_the_k_cache(ppl_run, tiny_f32, tmp_path):
    """--type-k q8_0: the records say so (another settings hash), and the full cache reads
    differently from the F16 K cache of the same windows."""
    out = tmp_path / "q8"
    assert main(_ppl_args(tiny_f32, out) + ["--type-k", "q8_0"]) == 0
    q8 = [json.loads(l) for l in (out / "ppl.jsonl").read_text().splitlines()]
    f16 = [json.loads(l) for l in (ppl_run / "ppl.jsonl").read_text().splitlines()]
    assert {r["settings"].get("type_k") for r in q8} == {"q8_0"} and "type_k" not in f16[0]["settings"]
    assert q8[0]["settings_hash"] != f16[0]["settings_hash"]
    full = lambda recs: {r["window"]: r["metrics"]["nll_sum"] for r in recs if r["policy"] == "none"}  # noqa: E731
    assert full(q8).keys() == full(f16).keys() and full(q8) != full(f16)


def test_rerun_does_nothing(ppl_run, tiny_f32, capsys):
    before = (ppl_run / "ppl.jsonl").read_text()
    assert main(_ppl_args(tiny_f32, ppl_run)) == 0
    assert "ppl: 0 new records" in capsys.readouterr().out
    assert (ppl_run / "ppl.jsonl").read_text() == before
    # a run cut short: a partial last line is ignored and the missing records rerun
    lines = before.splitlines()
    (ppl_run / "ppl.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:40])
    assert len(ResultStore(ppl_run / "ppl.jsonl").records) == 5
    assert main(_ppl_args(tiny_f32, ppl_run)) == 0
    assert "ppl: 3 new records" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["ppl", "--policies", "snapkv"], "unknown policies"),
    (["ppl", "--ratios", "0"], "ratios"),
    (["ppl", "--alphas", "1.5"], "alphas"),
    (["ppl", "--context", "4000", "--continuation", "200", "--n-ctx", "1024"], "must fit"),
    (["mc", "--limit", "0"], "--limit"),
    (["needle", "--cells", "2"], "--cells"),
])
def test_cli_bad_input_is_a_clear_error(tiny_f32, argv, match, capsys):
    assert main(argv + ["--model", tiny_f32]) == 2
    assert match in capsys.readouterr().err


def test_austen_is_found_beside_the_repository():
    assert (austen_dir() / "emma.txt").is_file()


def test_windows_are_one_per_long_document_first(runner):
    texts = {"b": "word " * 400, "a": "short", "c": "other " * 400}
    w = make_windows(texts, lambda s: runner.llm.tokenize(s.encode()), 64, 16, 2)
    assert [name for name, _ in w] == ["b", "c"] and all(len(t) == 80 for _, t in w)


def test_more_windows_than_documents_take_each_documents_next_span(runner):
    """Austen has six novels: windows past the sixth are the next non-overlapping spans,
    each starting with the document's first token (BOS) as a fresh sequence."""
    tok = lambda s: runner.llm.tokenize(s.encode())  # noqa: E731
    texts = {"b": "word " * 400, "a": "short", "c": "other " * 400}
    w = make_windows(texts, tok, 64, 16, 5)
    assert [name for name, _ in w] == ["b", "c", "b#1", "c#1", "b#2"] and all(len(t) == 80 for _, t in w)
    b = tok(texts["b"])
    assert w[0][1] == b[:80] and w[2][1] == b[:1] + b[80:159] and w[4][1] == b[:1] + b[159:238]


def test_plots_and_readme_section(ppl_run, tmp_path):
    from a2sf.eval.report import BEGIN, END, update_readme

    assert main(["plots", "--out", str(ppl_run)]) == 0
    assert (ppl_run / "quality_vs_ratio.png").stat().st_size > 1000
    assert (ppl_run / "quality_vs_alpha.png").stat().st_size > 1000
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- results:begin -->\nspeed\n<!-- results:end -->\n\ntext\n\n## Layout\n")
    update_readme(readme, ppl_run)
    text = readme.read_text()
    assert text.index("<!-- results:end -->") < text.index(BEGIN) < text.index(END) < text.index("## Layout")
    section = text[text.index(BEGIN):text.index(END)]
    assert "| none (full cache) |" in section and "| h2o |" in section and "a2sf (best a)" in section
    assert "A2SF (a=0.95) vs H2O, paired per window" in section
    # the plots are linked relative to the page that shows them
    link = section.split("![quality vs cache ratio](", 1)[1].split(")", 1)[0]
    assert (readme.parent / link).resolve() == (ppl_run / "quality_vs_ratio.png").resolve()
    # regenerating replaces the section instead of adding a second one
    update_readme(readme, ppl_run)
    assert readme.read_text() == text


def test_needle_records_keep_the_cell_budget(tiny_f32, tmp_path):
    argv = ["needle", "--model", tiny_f32, "--texts", "austen", "--cells", "32", "--lengths", "96", "160",
            "--depths", "0.5", "--trials", "1", "--policies", "none", "h2o", "streaming", "--n-ctx", "512",
            "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 0
    recs = [json.loads(l) for l in (tmp_path / "needle.jsonl").read_text().splitlines()]
    assert len(recs) == 6
    for r in recs:
        assert isinstance(r["metrics"]["found"], bool) and r["metrics"]["key_logprob"] < 0
        assert abs(r["metrics"]["n_context"] - r["case"]["length"]) <= 8
        if r["policy"] != "none":
            assert r["label"].endswith("@32c") and r["metrics"]["max_cells"] == 32
    assert main(argv) == 0  # resumed: nothing new
    assert len((tmp_path / "needle.jsonl").read_text().splitlines()) == 6


def test_mc_report_compares_policies_on_the_questions_both_answered(tmp_path):
    """A config that ran only the first 2 of 4 questions is compared with streaming on those 2 (paired),
    and its table cell says how many it ran."""
    from a2sf.eval.report import render_section

    def rec(policy, ratio, right):  # right: {question id: answered correctly}
        qs = [{"id": i, "gold": 0, "pred": 0 if ok else 1, "pred_norm": 0 if ok else 1, "budget": 4}
              for i, ok in right.items()]
        return {"schema": 1, "task": "mc", "dataset": "arc_easy", "policy": policy, "ratio": ratio,
                "alpha": None, "shots": 1, "window": 0, "settings": {"chunk_min": 8, "chunk_max": 64},
                "settings_hash": "x", "model": {"file": "m.gguf", "size": 1, "sha256_first_mib": "0" * 64},
                "code": {"a2sf_commit": "0" * 40, "llama_cpp_commit": "0" * 40}, "label": policy,
                "metrics": {}, "questions": qs}

    recs = [rec("none", None, {0: True, 1: True, 2: True, 3: True}),
            rec("streaming", 0.2, {0: False, 1: True, 2: False, 3: False}),
            rec("h2o", 0.2, {0: True, 1: True})]  # the first 2 questions only
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    section = render_section(tmp_path)
    assert "| h2o | 0.2 | 100.0 / 100.0 (2) |" in section  # ran 2 of the column's 4
    # paired on questions 0 and 1: h2o right on both, streaming on one -> +50 points over 2 questions
    assert "| h2o | 0.2 | +50.0 +- 50.0 (2) | +50.0 +- 50.0 (2) |" in section
    # the full cache against streaming on all 4: +75 points
    assert "| none (full) | 0.2 | +75.0 +- 25.0 (4) |" in section
