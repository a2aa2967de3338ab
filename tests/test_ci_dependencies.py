"""With CI=true a missing test dependency fails the run instead of skipping modules."""
from pathlib import Path

import pytest
from conftest import missing_dependency, require_module

TESTS = Path(__file__).resolve().parent


def test_missing_dependency_skips_locally(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no such thing"):
        missing_dependency("no such thing")
    with pytest.raises(pytest.skip.Exception, match="a2sf_no_such_module"):
        require_module("a2sf_no_such_module")


def test_missing_dependency_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true.*no such thing"):
        missing_dependency("no such thing")
    with pytest.raises(pytest.fail.Exception, match="a2sf_no_such_module"):
        require_module("a2sf_no_such_module")


def test_require_module_returns_the_module():
    import numpy

    assert require_module("numpy") is numpy


def test_no_test_module_skips_on_a_missing_import_by_itself():
    """Dependencies go through conftest's helpers (importorskip would skip under CI too)."""
    needle = "importor" + "skip("
    offenders = [p.name for p in TESTS.glob("test_*.py") if needle in p.read_text()]
    assert offenders == []
