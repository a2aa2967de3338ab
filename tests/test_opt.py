"""OPT in llama.cpp (issue 5): converter, graph parity with transformers,
quantization, eviction.

Tiny random OPT checkpoints are made with transformers (a2sf.testing.tiny_opt):
``pre_ln`` (pre-LayerNorm, tied head), ``post_ln_proj`` (post-LayerNorm with
project_in/out, as opt-350m; saved as a facebook-style pytorch_model.bin) and
``pre_ln_untied`` (separate lm_head). Each is converted with
``a2sf.convert`` and loaded through ``a2sf.Llama``; transformers (torch, CPU,
float32, eager attention) is the reference.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import require_module  # noqa: E402

torch = require_module("torch")
transformers = require_module("transformers")

from a2sf import Llama  # noqa: E402
from a2sf.convert import ConversionError, convert_opt, read_opt_config  # noqa: E402
from a2sf.policies import make_policy  # noqa: E402
from a2sf.quantize import quantize  # noqa: E402
from a2sf.testing.reference import accumulate_scores, ubatch_sizes  # noqa: E402
from a2sf.testing.tiny_opt import TEXT, write_tiny_opt  # noqa: E402

transformers.utils.logging.disable_progress_bar()

GGML_TYPE_F32 = 0
COMMON = dict(n_threads=2, verbose=False, seed=1)
# F32 GGUF vs torch float32: different summation orders only
LOGIT_RTOL = 1e-4  # of the largest |logit| in the compared rows
VARIANTS = {"pre_ln": "safetensors", "post_ln_proj": "bin", "pre_ln_untied": "safetensors"}
PROMPT = "It is a truth universally acknowledged, that the quick brown fox"
N_GREEDY = 32


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("opt-hf")
    return {v: write_tiny_opt(root / v, v, seed=i, weights=w)
            for i, (v, w) in enumerate(VARIANTS.items())}


@pytest.fixture(scope="module")
def ggufs(hf_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("opt-gguf")
    return {v: str(convert_opt(d, out / f"{v}-f32.gguf", outtype="f32")) for v, d in hf_dirs.items()}


@pytest.fixture(scope="module")
def hf_models(hf_dirs):
    from transformers import OPTForCausalLM

    return {v: OPTForCausalLM.from_pretrained(str(d), attn_implementation="eager").eval()
            for v, d in hf_dirs.items()}


@pytest.fixture(scope="module")
def hf_tokenizer(hf_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dirs["pre_ln"]))


def _llm(path, **kw):
    kw.setdefault("n_ctx", 512)
    return Llama(path, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, **COMMON, **kw)


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def _last_logits(llm):
    """Logits of the last evaluated token (llama-cpp-python keeps none without logits_all)."""
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float64)


def _assert_logits_close(got, want):
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=LOGIT_RTOL * scale)


def _long_text_ids(llm, n):
    ids = llm.tokenize(TEXT.encode(), add_bos=True)
    while len(ids) < n:
        ids += llm.tokenize(TEXT.encode(), add_bos=False)
    return ids[:n]


# -- tokenizer ------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "Hello world", " leading space and  two spaces", "numbers 1234 and 56.78!",
    "It's a truth, isn't it?\nNew line\ttab", "Ünïcödé — text 日本語",
    "I'll've  trailing   \n\n\n 2024-11-23 ", "   ",
])
def test_tokenizer_matches_transformers(ggufs, hf_tokenizer, text):
    llm = _llm(ggufs["pre_ln"], n_ctx=64, vocab_only=True)
    want = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=False) == want
    # OPT prepends BOS = </s> (id 2) to every prompt
    assert llm.tokenize(text.encode()) == [2] + want
    assert llm.token_bos() == 2 and llm.token_eos() == 2
    assert llm.detokenize(want).decode() == text


# -- graph parity ----------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(ggufs, hf_models, variant):
    llm = _llm(ggufs[variant], logits_all=True)
    ids = llm.tokenize(PROMPT.encode())
    assert ids[0] == 2 and len(ids) > 10
    want = _hf_logits(hf_models[variant], ids)
    llm.eval(ids)
    _assert_logits_close(np.asarray(llm.scores[: len(ids)], np.float64), want)

    # last-token logits of a plain (logits_all=False) context, in several batches
    llm = _llm(ggufs[variant], n_batch=8, n_ubatch=8)
    llm.eval(ids)
    _assert_logits_close(_last_logits(llm), want[-1])


def test_logits_match_transformers_with_flash_attention(ggufs, hf_models):
    """The flash-attention path: ggml's CPU kernel rounds through f16 inside,
    so the tolerance is looser (measured 1.1e-3 of the largest logit)."""
    llm = _llm(ggufs["post_ln_proj"], logits_all=True, flash_attn=True)
    ids = llm.tokenize(PROMPT.encode())
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], np.float64)
    want = _hf_logits(hf_models["post_ln_proj"], ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-3 * np.abs(want).max())
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_continuation_matches_transformers(ggufs, hf_models, variant):
    llm = _llm(ggufs[variant])
    ids = llm.tokenize(PROMPT.encode())
    with torch.no_grad():
        out = hf_models[variant].generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=N_GREEDY, min_new_tokens=N_GREEDY, do_sample=False,
            pad_token_id=1, eos_token_id=None)
    want = out[0, len(ids):].tolist()
    got = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        got.append(tok)
        if len(got) == N_GREEDY:
            break
    assert got == want


def test_positions_offset_dropped(hf_dirs, ggufs):
    """The GGUF position table is HF's embed_positions without its first 2 rows."""
    import gguf
    from safetensors import safe_open

    with safe_open(str(hf_dirs["pre_ln"] / "model.safetensors"), "pt") as st:
        hf_pos = st.get_tensor("model.decoder.embed_positions.weight").numpy()
    r = gguf.GGUFReader(ggufs["pre_ln"])
    t = next(t for t in r.tensors if t.name == "position_embd.weight")
    np.testing.assert_array_equal(np.asarray(t.data).reshape(-1, hf_pos.shape[1]), hf_pos[2:])
    assert int(r.fields["opt.context_length"].contents()) == hf_pos.shape[0] - 2


# -- quantization -----------------------------------------------------------------------
def _top1_agreement(a_path, b_path, n=256):
    a, b = _llm(a_path, logits_all=True), _llm(b_path, logits_all=True)
    ids = _long_text_ids(a, n)
    a.eval(ids)
    b.eval(ids)
    return float(np.mean(np.argmax(a.scores[:n], 1) == np.argmax(b.scores[:n], 1)))


def test_q8_0_top1_agreement_with_f32(hf_dirs, ggufs, tmp_path):
    q8_conv = convert_opt(hf_dirs["pre_ln"], tmp_path / "conv-q8_0.gguf", outtype="q8_0")
    q8_lib = quantize(ggufs["pre_ln"], tmp_path / "lib-q8_0.gguf", "Q8_0")
    for q8 in (q8_conv, q8_lib):
        assert _top1_agreement(ggufs["pre_ln"], str(q8)) >= 0.95


@pytest.mark.parametrize("qtype,ftype", [("Q4_0", 2), ("Q4_K_M", 15), ("f16", 1)])
def test_quantize_types_load_and_run(ggufs, tmp_path, qtype, ftype):
    import gguf

    out = quantize(ggufs["post_ln_proj"], tmp_path / f"{qtype}.gguf", qtype)
    r = gguf.GGUFReader(str(out))
    assert int(r.fields["general.file_type"].contents()) == ftype
    assert r.fields["general.architecture"].contents() == "opt"
    from pathlib import Path
    assert out.stat().st_size < Path(ggufs["post_ln_proj"]).stat().st_size
    # the quantized model still predicts like the f32 one, far above chance
    # (1/512); random post-LN weights with 32-wide rows are hard on 4-bit
    # types (measured 0.48 for Q4_0 over 256 tokens, 0.66 for Q4_K_M)
    assert _top1_agreement(ggufs["post_ln_proj"], str(out), n=128) >= (0.95 if qtype == "f16" else 0.3)


def test_q4_k_m_uses_k_quants_on_k_quant_shapes(tmp_path):
    """hidden 256 / ffn 1024: rows are multiples of 256, so Q4_K_M really writes
    Q4_K/Q6_K blocks (the tiny models above fall back to Q5_0/Q8_0)."""
    import gguf

    d = write_tiny_opt(tmp_path / "wide", "pre_ln", hidden_size=256, ffn_dim=1024, seed=3)
    f32 = convert_opt(d, tmp_path / "wide-f32.gguf")
    out = quantize(f32, tmp_path / "wide-q4_k_m.gguf", "Q4_K_M")
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert {"Q4_K", "Q6_K"} <= types
    assert out.stat().st_size < f32.stat().st_size / 4
    assert _top1_agreement(str(f32), str(out)) >= 0.6


def test_quantize_rejects_bad_input(ggufs, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="unknown quantization type"):
        quantize(ggufs["pre_ln"], tmp_path / "o.gguf", "Q9_9")
    with pytest.raises(ValueError, match="not a GGUF"):
        quantize(bad, tmp_path / "o.gguf", "Q8_0")
    with pytest.raises(FileNotFoundError):
        quantize(tmp_path / "missing.gguf", tmp_path / "o.gguf", "Q8_0")
    with pytest.raises(ValueError, match="differ"):
        quantize(ggufs["pre_ln"], ggufs["pre_ln"], "Q8_0")
    with pytest.raises(FileNotFoundError, match="directory"):
        quantize(ggufs["pre_ln"], tmp_path / "nodir" / "o.gguf", "Q8_0")


def test_cli_convert_and_quantize(hf_dirs, tmp_path):
    f16 = tmp_path / "cli-f16.gguf"
    r = subprocess.run([sys.executable, "-m", "a2sf.convert", "opt", str(hf_dirs["pre_ln"]), str(f16),
                        "--outtype", "f16"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    q4 = tmp_path / "cli-q4_0.gguf"
    r = subprocess.run([sys.executable, "-m", "a2sf.quantize", str(f16), str(q4), "q4_0"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert q4.stat().st_size < f16.stat().st_size
    r = subprocess.run([sys.executable, "-m", "a2sf.convert", "opt", str(tmp_path), str(tmp_path / "x.gguf")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no config.json" in r.stderr


def test_other_checkpoint_layouts_convert_identically(hf_dirs, ggufs, tmp_path):
    """Sharded safetensors, and a tokenizer given only as tokenizer.json, give
    the same GGUF tensors and vocabulary as the single-file layout."""
    import gguf

    d = write_tiny_opt(tmp_path / "sharded", "pre_ln", seed=0, weights="sharded")
    assert len(list(d.glob("*.safetensors"))) > 1
    (d / "vocab.json").unlink()
    (d / "merges.txt").unlink()
    out = convert_opt(d, tmp_path / "sharded.gguf")
    a, b = gguf.GGUFReader(ggufs["pre_ln"]), gguf.GGUFReader(str(out))
    ta = {t.name: np.asarray(t.data) for t in a.tensors}
    tb = {t.name: np.asarray(t.data) for t in b.tensors}
    assert ta.keys() == tb.keys()
    for name in ta:
        np.testing.assert_array_equal(ta[name], tb[name], err_msg=name)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        assert a.fields[key].contents() == b.fields[key].contents(), key


# -- converter errors -------------------------------------------------------------------
def _copy_ckpt(src, dst, **config_changes):
    import json
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config_changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_converter_rejects_what_it_cannot_convert(hf_dirs, tmp_path):
    src = hf_dirs["pre_ln"]
    out = tmp_path / "o.gguf"
    with pytest.raises(ConversionError, match="not a directory"):
        convert_opt(tmp_path / "nope", out)
    with pytest.raises(ConversionError, match="no config.json"):
        convert_opt(tmp_path, out)
    with pytest.raises(ConversionError, match="not an OPT checkpoint.*'llama'"):
        convert_opt(_copy_ckpt(src, tmp_path / "llama", model_type="llama"), out)
    with pytest.raises(ConversionError, match="activation_function='gelu'"):
        convert_opt(_copy_ckpt(src, tmp_path / "gelu", activation_function="gelu"), out)
    with pytest.raises(ConversionError, match="enable_bias=False"):
        convert_opt(_copy_ckpt(src, tmp_path / "nobias", enable_bias=False), out)
    with pytest.raises(ConversionError, match="not divisible"):
        read_opt_config(_copy_ckpt(src, tmp_path / "heads", num_attention_heads=5))
    # config and weights disagree: 3 layers declared, 2 stored
    with pytest.raises(ConversionError, match="weights missing.*blk.2"):
        convert_opt(_copy_ckpt(src, tmp_path / "layers", num_hidden_layers=3), out)
    # weights of another head (sequence classification)
    d = _copy_ckpt(src, tmp_path / "extra")
    import torch as _t
    from safetensors.torch import load_file, save_file
    sd = load_file(str(d / "model.safetensors"))
    sd["score.weight"] = _t.zeros(2, 64)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ConversionError, match="score.weight"):
        convert_opt(d, out)
    # no tokenizer
    d = _copy_ckpt(src, tmp_path / "notok")
    for f in ("vocab.json", "merges.txt", "tokenizer.json"):
        (d / f).unlink(missing_ok=True)
    with pytest.raises(ConversionError, match="no tokenizer"):
        convert_opt(d, out)
    with pytest.raises(ConversionError, match="outtype"):
        convert_opt(src, out, outtype="q4_0")
    assert not out.exists()


# -- eviction ---------------------------------------------------------------------------
def test_eviction_on_opt_bounded_cells_and_scores(ggufs):
    n_ctx = 256  # llama.cpp's smallest cache (it pads n_ctx to 256)
    llm = Llama(ggufs["pre_ln"], n_ctx=n_ctx, kv_policy="a2sf", **COMMON)
    assert llm.n_ctx() == n_ctx
    ids = llm.tokenize(PROMPT.encode())
    n_gen = 400  # ids + n_gen stays below the training context (512)
    got = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        got.append(tok)
        assert llm.kv_n_cells() <= n_ctx
        if len(got) == n_gen:
            break
    st = llm.kv_stats()
    assert st["evictions"] > 0 and st["cells_used"] <= n_ctx
    s = llm.kv_scores()
    assert s.scores.shape == (2, len(s))
    assert np.all(np.isfinite(s.scores)) and np.all(s.scores >= 0)
    pol = llm.kv_policy
    pos = s.positions.tolist()
    n = len(ids) + n_gen - 1  # the last sampled token is not evaluated yet
    assert pos == sorted(pos) and pos[-1] == n - 1
    # positions are never shifted: sinks and the newest positions keep their absolute values
    assert pos[: pol.n_sink] == list(range(pol.n_sink))
    r = pol.recent_window(len(pos))
    assert r > 0 and pos[-r:] == list(range(n - r, n))


def test_scores_match_transformers_attention(ggufs, hf_models):
    """Before any eviction, the engine's per-layer scores on OPT are the
    forgetting-factor sums of transformers' attention probabilities."""
    alpha = 0.7
    n_ubatch = 8
    llm = _llm(ggufs["post_ln_proj"], n_ctx=256, n_batch=n_ubatch, n_ubatch=n_ubatch,
               kv_policy=make_policy("a2sf", forgetting_factor=alpha))
    ids = llm.tokenize(PROMPT.encode())
    llm.eval(ids)
    with torch.no_grad():
        att = hf_models["post_ln_proj"](torch.tensor([ids]), output_attentions=True).attentions
    probs = np.stack([a[0].double().numpy() for a in att])  # [L, H, T, T]
    v_l1 = np.zeros((probs.shape[0], probs.shape[1], len(ids)))
    want = accumulate_scores(probs, v_l1, ubatch_sizes(len(ids), n_ubatch), alpha)
    s = llm.kv_scores()
    assert s.positions.tolist() == list(range(len(ids)))
    np.testing.assert_allclose(s.scores, want, rtol=1e-4, atol=1e-4)


def test_positions_past_the_learned_table_are_rejected(ggufs):
    """OPT's positions index a table of max_position_embeddings rows: settings or
    evals that would pass it raise ValueError instead of aborting in llama.cpp."""
    with pytest.raises(ValueError, match="n_ctx=1024 exceeds .* 512 learned positions"):
        Llama(ggufs["pre_ln"], n_ctx=1024, **COMMON)
    with pytest.raises(ValueError, match="max_positions=1024 exceeds"):
        Llama(ggufs["pre_ln"], n_ctx=256, kv_policy="h2o", max_positions=1024, **COMMON)
    llm = Llama(ggufs["pre_ln"], n_ctx=256, kv_policy="h2o", **COMMON)
    llm.eval([5] * 500)
    with pytest.raises(ValueError, match="512 learned positions"):
        llm.eval([5] * 13)
    assert llm.n_tokens == 500
    llm.eval([5] * 12)  # exactly up to the last learned position
    assert llm.n_tokens == 512 and llm.kv_n_cells() <= 256


# -- real OPT shapes (slow) -------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("shape", ["opt-125m", "opt-350m"])
def test_real_opt_shapes_parity_and_k_quants(tmp_path, shape):
    """Widths, heads, vocabulary (50272) and positions (2048) of facebook/opt-125m
    (pre-LN) and opt-350m (post-LN, project_in/out 1024 <-> 512), with 2 layers
    of random weights instead of 12/24: logits match transformers, greedy
    continuations are equal, and Q4_K_M writes real K-quant blocks."""
    import gguf
    from transformers import OPTForCausalLM

    kw = dict(vocab_size=50272, max_position_embeddings=2048, num_hidden_layers=2)
    if shape == "opt-125m":
        kw.update(hidden_size=768, num_attention_heads=12, ffn_dim=3072)
        variant = "pre_ln"
    else:
        kw.update(hidden_size=1024, num_attention_heads=16, ffn_dim=4096)
        variant = "post_ln_proj"
    d = write_tiny_opt(tmp_path / shape, variant, seed=7, **kw)
    f32 = str(convert_opt(d, tmp_path / f"{shape}-f32.gguf"))
    model = OPTForCausalLM.from_pretrained(str(d), attn_implementation="eager").eval()

    llm = _llm(f32, n_ctx=2048, logits_all=True)
    ids = _long_text_ids(llm, 96)
    llm.eval(ids)
    _assert_logits_close(np.asarray(llm.scores[: len(ids)], np.float64), _hf_logits(model, ids))

    llm = _llm(f32, n_ctx=256)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids[:40]]), max_new_tokens=N_GREEDY, min_new_tokens=N_GREEDY,
                             do_sample=False, pad_token_id=1, eos_token_id=None)
    got = []
    for tok in llm.generate(ids[:40], temp=0.0, top_k=1, repeat_penalty=1.0):
        got.append(tok)
        if len(got) == N_GREEDY:
            break
    assert got == out[0, 40:].tolist()

    q = quantize(f32, tmp_path / f"{shape}-q4_k_m.gguf", "Q4_K_M")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(q)).tensors}
    assert types["blk.0.attn_q.weight"] in ("Q4_K", "Q5_K", "Q6_K")
    assert types["blk.0.ffn_up.weight"] in ("Q4_K", "Q5_K", "Q6_K")
    # random weights are hard on 4 bits; chance is 1/50272
    agreement = _top1_agreement(str(f32), str(q), n=128)
    print(f"{shape}: Q4_K_M top-1 agreement with F32 over 128 tokens = {agreement:.3f}")
    assert agreement >= 0.2
