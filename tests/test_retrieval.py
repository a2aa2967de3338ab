"""The retrieval harness: RULER-style samples, their scoring, and the runner's modes."""
from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from a2sf.eval.retrieval import RetrievalRunner, Variant, plan_jobs, run_sample, main
from a2sf.eval.retrieval_report import paired, render_tables
from a2sf.eval.ruler import NEEDLE_TASKS, TASKS, make_sample, noise_tokens, sample_tokens, score_output


@pytest.fixture(scope="module")
def runner(tiny_f32):
    r = RetrievalRunner(tiny_f32, n_ctx=2048, n_threads=2)
    yield r
    r.close()


@pytest.fixture(scope="module")
def filler(runner):
    from a2sf.eval.data import load_texts

    return runner.tokenize(load_texts("austen")["emma"][:60000], False)


def _sample(runner, filler, task, length=1024, index=0):
    tok = lambda s: runner.tokenize(s, False)  # noqa: E731
    return make_sample(task, length, index, tok, runner.detokenize, filler, noise_tokens(tok, length + 64))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_builds_a_prompt_of_the_asked_length_whose_answers_are_in_the_context(runner, filler, task):
    s = _sample(runner, filler, task)
    ctx, qs = sample_tokens(s, runner.tokenize)
    n = len(ctx) + len(qs[0])
    lo = 0.6 if task == "cwe" else 0.95  # a word list stops at whole items
    assert lo * s.length <= n <= 1.03 * s.length, n
    assert s == _sample(runner, filler, task), "a sample is a function of (task, length, index, seed)"
    for q in s.questions:
        assert q.answers and all(a in s.context for a in q.answers)


@pytest.mark.parametrize("task", NEEDLE_TASKS + ("multiturn",))
def test_needles_sit_at_their_recorded_depth(runner, filler, task):
    s = _sample(runner, filler, task, index=3)
    for q, depths in zip(s.questions, s.depths):
        for a, d in zip(q.answers, depths):
            start = s.context.rfind(" One of the special magic", 0, s.context.index(a))
            assert start >= 0 and start / len(s.context) == pytest.approx(d), (a, d)
    # the asked needle of sample i sits near depth 0.05 + 0.1 * (i % 10): runs cover every depth
    if task == "niah_number":
        assert abs(_sample(runner, filler, task, length=4096, index=7).depths[0][0] - 0.75) < 0.05


def test_distractors_multi_values_and_turns_ask_what_the_task_says(runner, filler):
    mk = _sample(runner, filler, "niah_multikey")
    assert len(re.findall(r"special magic numbers for", mk.context)) == 4 and len(mk.questions[0].answers) == 1
    mv = _sample(runner, filler, "niah_multivalue")
    key = re.search(r"numbers for (\S+) mentioned", mv.questions[0].text).group(1)
    assert mv.context.count(f"for {key} is:") == 4 and len(mv.questions[0].answers) == 4
    mq = _sample(runner, filler, "niah_multiquery")
    assert len(mq.questions[0].answers) == 4 and len(set(mq.questions[0].answers)) == 4
    mt = _sample(runner, filler, "multiturn")
    assert len(mt.questions) == 3 and len({q.answers for q in mt.questions}) == 3
    vt = _sample(runner, filler, "vt")
    names = vt.questions[0].answers
    assert f"VAR {names[1]} = VAR {names[0]}." in vt.context and len(names) == 5
    cwe = _sample(runner, filler, "cwe", length=4096)
    counts = Counter(re.findall(r"\d+\. (\S+)", cwe.context))
    top = {w for w, _ in counts.most_common(10)}
    assert top == set(cwe.questions[0].answers) and len(counts) > 20
    assert min(counts[w] for w in top) > max(c for w, c in counts.items() if w not in top)


@pytest.mark.parametrize("output,answers,score", [
    (" 3803163.", ["3803163"], 1.0),
    (" 38031634.", ["3803163"], 0.0),  # a longer number is not the answer
    (" 380316", ["3803163"], 0.0),
    ("Panda and eagle", ["panda", "otter"], 0.5),
    (": 114732a1-1f3d-efc0-7505-612a9d079f2e.", ["114732A1-1f3d-efc0-7505-612a9d079f2e"], 1.0),
    ("pandas", ["panda"], 0.0),
])
def test_score_is_ruler_string_match_all(output, answers, score):
    assert score_output(output, answers) == score


def test_variant_labels_parse_into_policies():
    v = Variant.parse("a2sf/head:forgetting_factor=0.9,n_sink=8")
    p = v.kv_policy()
    assert (p.name, p.granularity, p.forgetting_factor, p.n_sink) == ("a2sf", "head", 0.9, 8)
    assert Variant.parse("full").kv_policy() is None
    assert Variant.parse("a2sf/token").prefill_signature() == Variant.parse("a2sf/head").prefill_signature()
    assert Variant.parse("h2o/head").prefill_signature() == Variant.parse("mean/token").prefill_signature()
    assert Variant.parse("a2sf/head").prefill_signature() != Variant.parse("tova/head").prefill_signature()
    assert Variant.parse("streaming").prefill_signature() is None
    with pytest.raises(ValueError, match="granularity"):
        Variant.parse("a2sf/cell")
    with pytest.raises(ValueError, match="unknown KV policy"):
        Variant.parse("nope/head")


def _direct(runner, sample, variant, ratio, mode):
    """The job run on its own: a prefill under the variant's own policy, no shared state
    (the context and the question read by two evals, as the harness reads them)."""
    from a2sf.eval.retrieval import _answer, _budget

    ctx, qs = sample_tokens(sample, runner.tokenize)
    budget = _budget(ratio, sample.length)
    runner.set_policy(variant.kv_policy())
    runner.clear()
    if mode == "agnostic":
        runner.feed(ctx, 0)
        runner.compress(budget)
        logits = runner.feed(qs[0], len(ctx))
        recompress = None
    else:
        runner.feed(ctx, 0)
        logits = runner.feed(qs[0], len(ctx))
        runner.compress(budget)
        recompress = budget
    return _answer(runner, sample, qs, logits, len(ctx) + len(qs[0]), None, recompress)["outputs"]


@pytest.mark.parametrize("mode", ["aware", "agnostic"])
def test_a_shared_prefill_gives_each_variant_the_cache_of_its_own_prefill(runner, filler, mode, monkeypatch):
    sample = _sample(runner, filler, "multiturn", length=768, index=1)
    kept = []  # what every (layer, head) holds after each compression
    compress = runner.compress

    def recording(budget):
        compress(budget)
        kept.append([[sorted(h) for h in layer] for layer in runner.llm.kv_head_scores()[0].tolist()])

    monkeypatch.setattr(runner, "compress", recording)
    variants = [Variant.parse(v) for v in ("a2sf/token", "a2sf/head", "streaming")]
    shared = run_sample(runner, sample, plan_jobs(variants, [0.25], [mode]))
    shared_kept, kept[:] = list(kept), []
    for v in variants:
        assert shared[f"{v.label}|0.25|{mode}"]["outputs"] == _direct(runner, sample, v, 0.25, mode), v.label
        assert shared[f"{v.label}|0.25|{mode}"]["cells_kept"] == 192
    assert kept == shared_kept and len(kept) == (3 * 3 if mode == "aware" else 3)


def test_continuous_mode_never_holds_more_cells_than_the_budget(runner, filler):
    sample = _sample(runner, filler, "niah_number", length=768)
    jobs = plan_jobs([Variant.parse("a2sf/head")], [0.25], ["continuous"])
    got = run_sample(runner, sample, jobs)["a2sf/head|0.25|continuous"]
    assert got["budget"] == 192 and got["cells_kept"] <= 192
    assert runner.n_cells() <= 192  # after generation too


def test_cli_writes_resumable_records_and_the_report(tiny_f32, tmp_path, capsys):
    argv = ["--model", tiny_f32, "--texts", "austen", "--tasks", "niah_number", "multiturn", "--lengths", "768",
            "--samples", "2", "--ratios", "0.25", "0.5", "--modes", "aware", "agnostic",
            "--variants", "full", "streaming", "a2sf/head", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    recs = [json.loads(l) for l in (tmp_path / "retrieval.jsonl").read_text().splitlines()]
    assert len(recs) == 2 * 2 * (1 + 2 * 2 * 2)  # tasks x samples x (full + 2 variants x 2 ratios x 2 modes)
    assert {r["mode"] for r in recs} == {"full", "aware", "agnostic"}
    assert all(r["metrics"]["cells_kept"] <= r["metrics"]["budget"] for r in recs if r["ratio"])
    assert main(argv) == 0 and len((tmp_path / "retrieval.jsonl").read_text().splitlines()) == len(recs)
    doc = tmp_path / "RETRIEVAL.md"
    assert main(["--report", "--out", str(tmp_path), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "### multiturn/768 — turns 2-3" in text and "| a2sf/head |" in text
    assert (tmp_path / "retrieval_niah_number_768.png").stat().st_size > 1000
    assert main(["--variants", "a2sf/cell", "--out", str(tmp_path)]) == 2
    assert "granularity" in capsys.readouterr().err


def test_report_pairs_samples_and_marks_two_standard_errors():
    def rec(variant, sample, score, ratio=0.25, mode="aware"):
        return {"task": "retrieval", "rtask": "niah_number", "length": 2048, "variant": variant, "ratio": ratio,
                "mode": mode, "sample": sample, "depths": [[0.1]],
                "metrics": {"score": score, "scores": [score], "found": score == 1.0}}
    recs = [rec("streaming", i, 0.0) for i in range(10)] + [rec("a2sf/head", i, 1.0 if i < 8 else 0.0)
                                                           for i in range(10)]
    recs += [rec("full", i, 1.0, ratio=None, mode="full") for i in range(10)]
    a = {r["sample"]: r for r in recs if r["variant"] == "a2sf/head"}
    b = {r["sample"]: r for r in recs if r["variant"] == "streaming"}
    n, d, se = paired(a, b)
    # eight differences of 1 and two of 0: mean 0.8, variance 1.6 / 9, s.e. sqrt(1.6 / 90)
    assert n == 10 and d == pytest.approx(0.8) and se == pytest.approx((1.6 / 90) ** 0.5)
    text = render_tables(recs)
    assert "| a2sf/head | 80 ± 13 (10) |" in text
    assert "| full | 100 ± 0 (10) |" in text
    assert "**+80 ± 13 (10)**" in text
