"""The patch series: every patch says why, git checkouts get `git am -3`, a
failure prints the resolve / continue / regenerate steps, regen keeps bodies."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "cpp" / "scripts"
PATCHES = sorted((ROOT / "cpp" / "patches").glob("*.patch"))


def _git(cwd, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout


def _body(patch: Path) -> list:
    """Lines between the (possibly wrapped) Subject header and the '---' separator."""
    lines = patch.read_text().splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith("Subject: "))
    i += 1
    while lines[i].startswith(" "):  # folded subject
        i += 1
    end = lines.index("---", i)
    return [ln for ln in lines[i:end] if ln.strip()]


@pytest.mark.parametrize("patch", PATCHES, ids=[p.name[:4] for p in PATCHES])
def test_every_patch_has_a_body_that_says_why(patch):
    body = _body(patch)
    assert len(body) >= 3, f"{patch.name}: the message needs a body of a few lines"
    assert len(" ".join(body)) >= 200, patch.name


def test_every_patch_has_the_project_author():
    """make-checkout.sh's identity, whoever edited the checkout (regen writes the authors)."""
    authors = {p.name: p.read_text().splitlines()[1] for p in PATCHES}
    assert set(authors.values()) == {"From: a2sf <a2sf@localhost>"}, authors


def _repo(tmp_path, name="checkout"):
    """A pristine tree (one file) committed as the first commit, plus one patch commit with a body."""
    co = tmp_path / name
    co.mkdir()
    (co / "a.cpp").write_text("".join(f"int f{i}() {{ return {i}; }}\n" for i in range(12)))
    _git(co, "init", "-q")
    _git(co, "add", "-A")
    _git(co, "commit", "-q", "-m", "pristine")
    return co


def _series(tmp_path):
    """(checkout, patch dir): one patch commit with a body, written back by regen-patches.sh."""
    co = _repo(tmp_path)
    (co / "a.cpp").write_text((co / "a.cpp").read_text().replace("return 5;", "return hook(5);"))
    _git(co, "commit", "-q", "-am", "a2sf: a hook\n\nWhy the hook is needed,\nin two lines.")
    out = tmp_path / "patches"
    subprocess.run(["bash", str(SCRIPTS / "regen-patches.sh"), str(co), str(out)], check=True,
                   capture_output=True, text=True)
    return co, out


def test_regen_keeps_the_message_body(tmp_path):
    _, out = _series(tmp_path)
    (p,) = out.glob("*.patch")
    assert _body(p) == ["Why the hook is needed,", "in two lines."]


def test_git_checkout_gets_git_am_3_and_a_conflict_prints_the_steps(tmp_path):
    co, patches = _series(tmp_path)
    # a git checkout of the pristine tree whose upstream moved: 3-way merge, one commit per patch
    moved = _repo(tmp_path, "moved")
    (moved / "a.cpp").write_text("// upstream header\n" + (moved / "a.cpp").read_text())
    _git(moved, "commit", "-q", "-am", "upstream moved the context")
    r = subprocess.run(["bash", str(SCRIPTS / "apply-patches.sh"), str(moved), str(patches)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "git am -3" in r.stdout
    assert _git(moved, "log", "-1", "--format=%s%n%b").startswith("a2sf: a hook\nWhy the hook")
    assert "return hook(5);" in (moved / "a.cpp").read_text()

    # upstream changed the very line: the run stops with the steps
    conf = _repo(tmp_path, "conflict")
    (conf / "a.cpp").write_text((conf / "a.cpp").read_text().replace("return 5;", "return 55;"))
    _git(conf, "commit", "-q", "-am", "upstream changed the line")
    r = subprocess.run(["bash", str(SCRIPTS / "apply-patches.sh"), str(conf), str(patches)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "a2sf: a hook" in r.stderr
    for step in ("resolve:", "git add", "git am --continue", "regen-patches.sh"):
        assert step in r.stderr, step
    assert "UU a.cpp" in _git(conf, "status", "--short")
    _git(conf, "am", "--abort")


def test_plain_tree_failure_prints_the_steps(tmp_path):
    co, patches = _series(tmp_path)
    tree = tmp_path / "plain"
    tree.mkdir()
    (tree / "a.cpp").write_text("nothing the patch expects\n")
    r = subprocess.run(["bash", str(SCRIPTS / "apply-patches.sh"), str(tree), str(patches)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "does not apply" in r.stderr
    for step in ("make-checkout.sh", "git am --continue", "regen-patches.sh"):
        assert step in r.stderr, step


def _make_checkout(tmp_path, patches, pristine_a_cpp: str, check=False):
    """make-checkout.sh of ``patches`` onto a tree whose a.cpp reads ``pristine_a_cpp``,
    into tmp_path/edit. make-checkout reads the llama.cpp commit from the tree; a tree
    without one says "unknown"."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.cpp").write_text(pristine_a_cpp)
    return subprocess.run(["bash", str(SCRIPTS / "make-checkout.sh"), str(tmp_path / "edit"), "--src", str(src),
                           "--patches", str(patches)], check=check, capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="git")
def test_make_checkout_stops_with_the_steps(tmp_path):
    co, patches = _series(tmp_path)
    r = _make_checkout(tmp_path, patches, (co / "a.cpp").read_text().replace("return hook(5);", "return 55;"))
    assert r.returncode == 1, r.stdout + r.stderr
    for step in ("resolve:", "git am --continue", "regen-patches.sh"):
        assert step in r.stderr, step


@pytest.mark.skipif(shutil.which("git") is None, reason="git")
def test_make_checkout_commits_carry_the_project_author(tmp_path):
    co, patches = _series(tmp_path)
    _make_checkout(tmp_path, patches, _git(co, "show", "HEAD~1:a.cpp"), check=True)  # the pristine tree
    edit = tmp_path / "edit"
    # a commit made in the checkout later, without -c user.*: the checkout's own identity
    (edit / "a.cpp").write_text((edit / "a.cpp").read_text() + "int g() { return 0; }\n")
    subprocess.run(["git", "commit", "-q", "-am", "a2sf: another hook"], cwd=edit, check=True)
    log = subprocess.run(["git", "log", "--format=%an <%ae>"], cwd=edit, check=True,
                         capture_output=True, text=True).stdout.splitlines()
    assert log[0] == "a2sf <a2sf@localhost>"
