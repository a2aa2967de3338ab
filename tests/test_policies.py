"""a2sf.policies: construction, defaults, validation, make_policy."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from a2sf.policies import (
    A2SF,
    H2O,
    POLICIES,
    TOVA,
    VATP,
    KVPolicy,
    NoEviction,
    PolicyKind,
    RandomEviction,
    StreamingLLM,
    make_policy,
)

ALL = [NoEviction, StreamingLLM, H2O, TOVA, A2SF, VATP, RandomEviction]


def test_defaults_and_kinds():
    assert (StreamingLLM().kind, H2O().kind, TOVA().kind, A2SF().kind, VATP().kind,
            RandomEviction().kind, NoEviction().kind) == (
        PolicyKind.STREAMING, PolicyKind.SCORE, PolicyKind.SCORE, PolicyKind.SCORE,
        PolicyKind.SCORE, PolicyKind.RANDOM, PolicyKind.NONE)
    assert H2O().forgetting_factor == 1.0 and not H2O().value_aware
    assert TOVA().forgetting_factor == 0.0
    assert A2SF().forgetting_factor == 0.95
    assert VATP().forgetting_factor == 1.0 and VATP().value_aware
    for cls in (StreamingLLM, H2O, TOVA, A2SF, VATP, RandomEviction):
        p = cls()
        assert (p.n_sink, p.n_recent, p.evict_chunk) == (4, None, 16)  # None: half of what is kept
        assert p.n_protected == 4  # the recent half adapts to each eviction (recent_window)


def test_every_policy_documents_its_paper():
    papers = {StreamingLLM: "2309.17453", H2O: "2306.14048", TOVA: "2401.06104",
              A2SF: "2407.20485", VATP: "2406.12335"}
    for cls, arxiv in papers.items():
        assert arxiv in cls.__doc__
    for cls in ALL:
        assert cls.__doc__ and cls.__doc__.strip()


def test_to_native_matches_core_signature():
    n = A2SF(forgetting_factor=0.5, n_sink=2, n_recent=8, evict_chunk=4, seed=7, granularity="head").to_native()
    assert n == {"kind": 2, "forgetting_factor": 0.5, "value_aware": False, "n_sink": 2,
                 "n_recent": 8, "evict_chunk": 4, "seed": 7, "granularity": 2, "mean_attention": False,
                 "decode_scoring": 2, "pool_kernel": 12, "pool_weight": 0.25}
    assert all(type(v) in (int, float, bool) for v in n.values())
    assert VATP().to_native()["value_aware"] is True
    assert StreamingLLM().to_native()["kind"] == 1
    assert RandomEviction(seed=3).to_native()["kind"] == 3
    from a2sf.policies import MeanAttention
    assert MeanAttention().to_native()["mean_attention"] is True and MeanAttention().forgetting_factor == 1.0


def test_frozen_and_replace():
    p = A2SF()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.forgetting_factor = 0.1  # type: ignore[misc]
    q = p.replace(forgetting_factor=0.5)
    assert q.forgetting_factor == 0.5 and p.forgetting_factor == 0.95
    assert q == A2SF(forgetting_factor=0.5)


def test_numpy_scalars_are_normalised():
    p = A2SF(forgetting_factor=np.float32(0.5), n_sink=np.int64(3), value_aware=np.bool_(True))
    assert type(p.forgetting_factor) is float and type(p.n_sink) is int and p.value_aware is True


@pytest.mark.parametrize("name,cls", [
    ("none", NoEviction), ("streaming", StreamingLLM), ("StreamingLLM", StreamingLLM),
    ("h2o", H2O), ("H2O", H2O), ("tova", TOVA), ("a2sf", A2SF), ("vatp", VATP),
    ("random", RandomEviction),
])
def test_make_policy_by_name(name, cls):
    assert type(make_policy(name)) is cls


def test_make_policy_none_instance_class_and_overrides():
    assert make_policy(None) is None
    assert make_policy(None, n_sink=None) is None  # None overrides count as not given
    p = H2O(n_recent=8)
    assert make_policy(p) is p
    assert make_policy(p, n_sink=2) == H2O(n_recent=8, n_sink=2)
    assert make_policy(TOVA, n_recent=5) == TOVA(n_recent=5)
    assert make_policy("a2sf", forgetting_factor=0.3, n_recent=None).forgetting_factor == 0.3
    assert set(POLICIES) == {"none", "streaming", "h2o", "tova", "a2sf", "vatp", "mean", "random"}


@pytest.mark.parametrize("bad", [-0.01, 1.01, math.nan, math.inf, -math.inf])
def test_alpha_out_of_range(bad):
    with pytest.raises(ValueError, match="forgetting_factor"):
        A2SF(forgetting_factor=bad)
    with pytest.raises(ValueError, match="forgetting_factor"):
        make_policy("a2sf", forgetting_factor=bad)


@pytest.mark.parametrize("bad", [True, False, "0.5", [0.5], 1j, object()])
def test_alpha_not_a_real_number(bad):
    with pytest.raises(TypeError, match="forgetting_factor"):
        A2SF(forgetting_factor=bad)


@pytest.mark.parametrize("field", ["n_sink", "n_recent", "evict_chunk", "seed"])
def test_sizes(field):
    with pytest.raises(ValueError, match=field):
        A2SF(**{field: -1})
    for bad in (1.0, "4", True) + (() if field == "n_recent" else (None,)):
        with pytest.raises(TypeError, match=field):
            A2SF(**{field: bad})
    if field == "n_recent":  # None (the default): half of what each eviction keeps
        assert A2SF(n_recent=None).n_recent is None and A2SF(n_recent=None).recent_window(100) == 48
    with pytest.raises(ValueError):
        A2SF(**{field: 2**32})
    assert getattr(A2SF(**{field: 0}), field) == 0


def test_value_aware_must_be_bool():
    for bad in (1, 0, "yes", None):
        with pytest.raises(TypeError, match="value_aware"):
            A2SF(value_aware=bad)


def test_pinned_fields_cannot_be_overridden():
    with pytest.raises(TypeError, match="H2O fixes forgetting_factor"):
        make_policy("h2o", forgetting_factor=0.5)
    with pytest.raises(TypeError, match="TOVA fixes forgetting_factor"):
        make_policy("tova", forgetting_factor=0.5)
    with pytest.raises(TypeError, match="VATP fixes value_aware"):
        make_policy("vatp", value_aware=False)
    with pytest.raises(TypeError):
        StreamingLLM(forgetting_factor=0.5)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        make_policy("none", n_sink=4)
    with pytest.raises(TypeError, match="no field 'window'"):
        make_policy("h2o", window=3)


def test_make_policy_bad_specs():
    with pytest.raises(ValueError, match="unknown KV policy 'snapkv'"):
        make_policy("snapkv")
    for bad in (3, 0.5, ["h2o"], {"kind": 2}, b"h2o"):
        with pytest.raises(TypeError, match="kv_policy must be"):
            make_policy(bad)
    with pytest.raises(ValueError, match="without a policy"):
        make_policy(None, forgetting_factor=0.5)


def test_no_hidden_state():
    a, b = make_policy("a2sf"), make_policy("a2sf")
    assert a == b and a is not b
    make_policy("a2sf", forgetting_factor=0.1)
    assert make_policy("a2sf").forgetting_factor == 0.95
    assert hash(A2SF()) == hash(A2SF())  # frozen: usable as dict keys
    assert A2SF().to_dict()["policy"] == "a2sf"
    assert issubclass(A2SF, KVPolicy)


# -- the settings table drives the Llama keywords, the server, the CLI, the C mapping --
from a2sf.policies import POLICY_NAMES, SETTINGS, Setting, policy_from_settings  # noqa: E402
from conftest import require_module  # noqa: E402


def test_policy_names_are_one_list():
    from a2sf.eval import DEFAULT_POLICIES
    from a2sf.eval.engine import EVAL_POLICIES

    assert POLICY_NAMES == tuple(POLICIES)
    assert tuple(DEFAULT_POLICIES) == POLICY_NAMES and EVAL_POLICIES is POLICY_NAMES


def test_table_rows_are_the_policy_fields():
    fields = [f.name for f in dataclasses.fields(KVPolicy)]
    assert fields == [s.field for s in SETTINGS if s.field is not None]
    for s in SETTINGS:
        if s.field is not None:
            assert getattr(KVPolicy, s.field) == s.default  # the table's default
    # to_native: kind plus every row with a C name, under that name
    assert set(A2SF().to_native()) == {"kind"} | {s.native for s in SETTINGS if s.native}


def test_policy_from_settings():
    policy, extras = policy_from_settings("random", kv_seed=5, n_recent=8, max_positions=4096, n_sink=None)
    assert policy == RandomEviction(seed=5, n_recent=8) and extras == {"max_positions": 4096}
    assert policy_from_settings(None) == (None, {})
    with pytest.raises(TypeError, match="unknown policy settings \\['alpha'\\]"):
        policy_from_settings("a2sf", alpha=0.5)
    with pytest.raises(TypeError, match="max_positions must be an int"):
        policy_from_settings("a2sf", max_positions=4096.0)
    with pytest.raises(ValueError, match="max_positions must be in"):
        policy_from_settings("a2sf", max_positions=0)
    with pytest.raises(ValueError, match="max_positions needs a kv_policy"):
        policy_from_settings("none", max_positions=4096)


def test_setting_check_of_str_choices():
    s = Setting("mode", str, None, "a mode", choices=("a", "b"))
    assert s.check("b") == "b"
    with pytest.raises(ValueError, match="mode must be one of a, b, got 'c'"):
        s.check("c")
    with pytest.raises(TypeError, match="mode must be a str"):
        s.check(1)


def test_every_setting_has_a_cli_flag_and_a_server_field():
    from a2sf.cli import build_parser

    ap = build_parser()
    sub = next(a for a in ap._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    for command in ("generate", "chat", "inspect"):
        dests = {a.dest for a in sub.choices[command]._actions}
        assert {s.name for s in SETTINGS} <= dests, command
    args = sub.choices["generate"].parse_args(["--kv-policy", "random", "--kv-seed", "3", "--value-aware", "x"])
    assert (args.kv_seed, args.value_aware) == (3, True)
    assert sub.choices["chat"].parse_args(["--no-value-aware"]).value_aware is False
    server = require_module("a2sf.server")
    for s in SETTINGS:
        assert s.name in server.A2SFModelSettings.model_fields
        assert server.A2SFModelSettings.model_fields[s.name].description == s.help


NEW_ROW_SCRIPT = r"""
import a2sf.policies as P
row = P.Setting("example_mode", str, None, "a made-up setting", choices=("keep", "drop"))
assert row.name not in P.SETTINGS_BY_NAME
P.SETTINGS = P.SETTINGS + (row,)
P.SETTINGS_BY_NAME[row.name] = row
import sys
from a2sf import Llama
from a2sf.cli import build_parser
import a2sf.server as server

ap = build_parser()
args = ap.parse_args(["generate", "--kv-policy", "a2sf", "--example-mode", "drop", "x"])
assert args.example_mode == "drop"
m = server.A2SFModelSettings(model="m.gguf", kv_policy="a2sf", example_mode="drop")
assert m.policy_kwargs() == {"kv_policy": "a2sf", "example_mode": "drop"}, m.policy_kwargs()
assert m.policy_summary()["example_mode"] == "drop"
_, (m,) = server.parse_settings(["--model", "m.gguf", "--kv-policy", "a2sf", "--example_mode", "keep"])
assert m.example_mode == "keep"
try:
    server.A2SFModelSettings(model="m.gguf", kv_policy="a2sf", example_mode="bogus")
    raise AssertionError("no error")
except ValueError as e:
    assert "example_mode must be one of keep, drop" in str(e), e
llm = Llama(sys.argv[1], n_ctx=128, kv_policy="a2sf", example_mode="drop", verbose=False)
assert llm.a2sf_active
llm.close()
try:
    Llama(sys.argv[1], n_ctx=128, kv_policy="a2sf", example_mode="bogus", verbose=False)
    raise AssertionError("no error")
except ValueError as e:
    assert "example_mode must be one of" in str(e), e
print("ok")
"""


def test_a_new_python_only_row_reaches_llama_server_and_cli(tiny_f32):
    """What the next setting needs: one row (here a made-up str setting with choices)."""
    import subprocess
    import sys

    require_module("a2sf.server")
    r = subprocess.run([sys.executable, "-c", NEW_ROW_SCRIPT, tiny_f32], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
