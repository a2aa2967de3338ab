"""The README is a guide and docs/RESULTS.md holds the tables: the generated sections of the
results page are what their commands write from the saved outputs, and the links resolve."""
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "RESULTS.md"


def _update_results():
    spec = importlib.util.spec_from_file_location("update_results", ROOT / "scripts" / "update_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_is_a_guide():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    for needed in ("bash scripts/demo.sh", "bash scripts/test.sh", "## Which setting should I use",
                   "docs/RESULTS.md", "## Which script regenerates what"):
        assert needed in text, needed
    assert "<!-- results:begin -->" not in text and "<!-- eval:begin -->" not in text


def test_speed_section_is_the_saved_bench_outputs():
    """scripts/update_results.py --saved would leave docs/RESULTS.md unchanged."""
    ur = _update_results()
    text = RESULTS.read_text()
    assert ur.splice(text, [(ROOT / f).read_text() for f in ur.SAVED]) == text
    # two overhead runs that differ in their flash-attention modes carry two headings
    headings = re.findall(r"^### Score-tracking overhead.*$", text, flags=re.M)
    assert len(headings) == len(set(headings)) == 2


def test_quality_section_is_the_eval_report():
    """python -m a2sf.eval report would leave docs/RESULTS.md unchanged (plots linked from docs/)."""
    from a2sf.eval.report import BEGIN, END, render_section

    text = RESULTS.read_text()
    section = text[text.index(BEGIN) + len(BEGIN):text.index(END)]
    assert section == "\n" + render_section(ROOT / "results" / "eval", image_dir="../results/eval")


def test_relative_links_resolve():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            assert (page.parent / path).exists(), f"{page.name}: {target}"
