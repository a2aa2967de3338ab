"""OPT (Zhang et al. 2022, "OPT: Open Pre-trained Transformer Language Models",
arXiv 2205.01068) Hugging Face checkpoint -> GGUF for a2sf's ``opt``
architecture (cpp/src/llama-model-opt.cpp).

Reads a local directory in the facebook/opt-* layout: ``config.json``, the
weights (``model.safetensors``, sharded ``*.safetensors`` with an index, or
``pytorch_model.bin``) and the GPT-2 byte-level BPE tokenizer (``vocab.json`` +
``merges.txt``, or ``tokenizer.json``).

What the converter changes on the way (see docs/OPT.md):

* ``embed_positions`` loses its first 2 rows: OPT indexes the table with
  ``position + 2``; the GGUF table is indexed by the plain position, and
  ``context_length`` is ``max_position_embeddings``.
* ``lm_head`` is written only when it is not tied to ``embed_tokens``.
* the vocabulary is padded to ``config.vocab_size`` (the embedding's row
  count, 50272 for facebook/opt-*) with unused ``[PAD<i>]`` tokens.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from ..gguf_write import add_file_type, add_weight, finish, open_writer

__all__ = ["ConversionError", "OPTConfig", "read_opt_config", "convert_opt", "OUTTYPES",
           "GGUF_ARCH", "LAYER_NORM_EPS"]

PathLike = Union[str, os.PathLike]

GGUF_ARCH = "opt"
OUTTYPES = ("f32", "f16", "q8_0")
# torch.nn.LayerNorm's default; OPT never sets another one
LAYER_NORM_EPS = 1e-5
# OPTLearnedPositionalEmbedding: position p reads row p + 2
POSITION_OFFSET = 2


class ConversionError(ValueError):
    """The directory is not a convertible OPT checkpoint (message says why)."""


@dataclass(frozen=True)
class OPTConfig:
    """The parts of transformers' OPTConfig that shape the graph."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    ffn_dim: int
    max_position_embeddings: int
    word_embed_proj_dim: int
    do_layer_norm_before: bool
    tie_word_embeddings: bool
    bos_token_id: int
    eos_token_id: int
    pad_token_id: Optional[int]

    @property
    def has_projection(self) -> bool:
        return self.word_embed_proj_dim != self.hidden_size


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def read_opt_config(hf_dir: PathLike) -> OPTConfig:
    """Read and check ``config.json``; raise :class:`ConversionError` if the
    checkpoint is not OPT or uses a variant the graph does not implement."""
    d = Path(hf_dir)
    if not d.is_dir():
        raise ConversionError(f"{d}: not a directory (give a local Hugging Face checkpoint directory)")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{d}: no config.json, not a Hugging Face checkpoint directory")
    c = _load_json(cfg_path)
    if c.get("model_type") != "opt":
        raise ConversionError(
            f"{d}: not an OPT checkpoint (config.json model_type={c.get('model_type')!r}, expected 'opt')")

    unsupported = []
    act = c.get("activation_function", "relu")
    if act != "relu":
        unsupported.append(f"activation_function={act!r} (only 'relu')")
    if not c.get("enable_bias", True):
        unsupported.append("enable_bias=False (the graph expects biases on every linear layer)")
    if not c.get("layer_norm_elementwise_affine", True):
        unsupported.append("layer_norm_elementwise_affine=False (LayerNorms without weights)")
    if c.get("_remove_final_layer_norm", False):
        unsupported.append("_remove_final_layer_norm=True (legacy checkpoints)")
    try:
        hidden = int(c["hidden_size"])
        n_head = int(c["num_attention_heads"])
        cfg = OPTConfig(
            vocab_size=int(c["vocab_size"]),
            hidden_size=hidden,
            num_hidden_layers=int(c["num_hidden_layers"]),
            num_attention_heads=n_head,
            ffn_dim=int(c["ffn_dim"]),
            max_position_embeddings=int(c["max_position_embeddings"]),
            word_embed_proj_dim=int(c.get("word_embed_proj_dim") or hidden),
            do_layer_norm_before=bool(c.get("do_layer_norm_before", True)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
            bos_token_id=int(c.get("bos_token_id", 2)),
            eos_token_id=int(c.get("eos_token_id", 2)),
            pad_token_id=None if c.get("pad_token_id") is None else int(c["pad_token_id"]),
        )
    except KeyError as e:
        raise ConversionError(f"{cfg_path}: missing {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{cfg_path}: bad value ({e})") from None
    if n_head <= 0 or hidden % n_head:
        unsupported.append(f"hidden_size={hidden} not divisible by num_attention_heads={n_head}")
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim",
                 "max_position_embeddings", "word_embed_proj_dim"):
        if getattr(cfg, name) <= 0:
            unsupported.append(f"{name}={getattr(cfg, name)}")
    if unsupported:
        raise ConversionError(f"{d}: OPT config not supported by a2sf's graph: " + "; ".join(unsupported))
    return cfg


# -- weights --------------------------------------------------------------------
def _weight_files(d: Path) -> Tuple[str, List[Path]]:
    for kind, single, index in (("safetensors", "model.safetensors", "model.safetensors.index.json"),
                                ("torch", "pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (d / index).is_file():
            shards = sorted(set(_load_json(d / index).get("weight_map", {}).values()))
            missing = [s for s in shards if not (d / s).is_file()]
            if missing:
                raise ConversionError(f"{d}: shards listed in {index} are missing: {missing}")
            return kind, [d / s for s in shards]
        if (d / single).is_file():
            return kind, [d / single]
    raise ConversionError(
        f"{d}: no weights (model.safetensors, pytorch_model.bin or a sharded index of either)")


def _iter_weights(d: Path) -> Iterator[Tuple[str, Callable[[], np.ndarray]]]:
    """(name, loader) for every tensor of the checkpoint; loaders give float32."""
    kind, files = _weight_files(d)
    if kind == "safetensors":
        from safetensors import safe_open
        try:
            import torch  # noqa: F401  (bf16 checkpoints need torch to widen)
            framework = "pt"
        except ImportError:
            framework = "numpy"
        for f in files:
            with safe_open(str(f), framework=framework) as st:
                for name in st.keys():
                    def load(f=f, name=name):
                        with safe_open(str(f), framework=framework) as st2:
                            t = st2.get_tensor(name)
                        return t.float().numpy() if framework == "pt" else np.asarray(t, np.float32)
                    yield name, load
    else:
        try:
            import torch
        except ImportError:
            raise ConversionError(f"{d}: pytorch_model.bin needs torch to read") from None
        for f in files:
            sd = torch.load(str(f), map_location="cpu", weights_only=True)
            for name, t in sd.items():
                yield name, (lambda t=t: t.float().numpy())


_LAYER_MAP = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_output",
    "self_attn_layer_norm": "attn_norm",
    "final_layer_norm": "ffn_norm",
    "fc1": "ffn_up",
    "fc2": "ffn_down",
}
_TOP_MAP = {
    "decoder.embed_tokens.weight": "token_embd.weight",
    "decoder.embed_positions.weight": "position_embd.weight",
    "decoder.project_in.weight": "project_in.weight",
    "decoder.project_out.weight": "project_out.weight",
    "decoder.final_layer_norm.weight": "output_norm.weight",
    "decoder.final_layer_norm.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"decoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def _gguf_name(hf_name: str) -> Optional[str]:
    """GGUF tensor name of an HF OPT tensor name (with or without 'model.')."""
    name = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_MAP:
        return f"blk.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"
    return None


def _expected_shapes(cfg: OPTConfig) -> Dict[str, Tuple[int, ...]]:
    """numpy shapes (rows = outputs) of every GGUF tensor, after the position slice."""
    d, p, f, v = cfg.hidden_size, cfg.word_embed_proj_dim, cfg.ffn_dim, cfg.vocab_size
    s: Dict[str, Tuple[int, ...]] = {
        "token_embd.weight": (v, p),
        "position_embd.weight": (cfg.max_position_embeddings, d),
    }
    if cfg.has_projection:
        s["project_in.weight"] = (d, p)
        s["project_out.weight"] = (p, d)
    if cfg.do_layer_norm_before:
        s["output_norm.weight"] = (d,)
        s["output_norm.bias"] = (d,)
    if not cfg.tie_word_embeddings:
        s["output.weight"] = (v, p)
    for il in range(cfg.num_hidden_layers):
        b = f"blk.{il}."
        for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
            s[b + t + ".weight"] = (d, d)
            s[b + t + ".bias"] = (d,)
        for t in ("attn_norm", "ffn_norm"):
            s[b + t + ".weight"] = (d,)
            s[b + t + ".bias"] = (d,)
        s[b + "ffn_up.weight"] = (f, d)
        s[b + "ffn_up.bias"] = (f,)
        s[b + "ffn_down.weight"] = (d, f)
        s[b + "ffn_down.bias"] = (d,)
    return s


def _collect_weights(d: Path, cfg: OPTConfig) -> Dict[str, Callable[[], np.ndarray]]:
    expected = _expected_shapes(cfg)
    found: Dict[str, Callable[[], np.ndarray]] = {}
    unknown = []
    for hf_name, load in _iter_weights(d):
        name = _gguf_name(hf_name)
        if name is None:
            unknown.append(hf_name)
        elif name == "output.weight" and cfg.tie_word_embeddings:
            continue  # tied: the graph reuses token_embd
        elif name in ("output_norm.weight", "output_norm.bias") and not cfg.do_layer_norm_before:
            continue  # HF builds no final LayerNorm for post-LN models either
        else:
            found[name] = load
    if unknown:
        more = f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else ""
        raise ConversionError(
            f"{d}: tensors that are not part of an OPT causal LM: {unknown[:8]}{more}")
    missing = sorted(set(expected) - set(found))
    if missing:
        more = f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
        raise ConversionError(f"{d}: weights missing for this config: {missing[:8]}{more}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ConversionError(f"{d}: weights that the config does not use: {extra[:8]}")
    return found


# -- tokenizer ------------------------------------------------------------------
def _read_bpe(d: Path) -> Tuple[Dict[str, int], List[str], Dict[str, int]]:
    """(vocab, merges as 'a b' strings, added special tokens) of the GPT-2 BPE."""
    added: Dict[str, int] = {}
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        vocab = _load_json(d / "vocab.json")
        merges = []
        with open(d / "merges.txt", encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if line and not line.startswith("#version"):
                    merges.append(line)
    elif (d / "tokenizer.json").is_file():
        tj = _load_json(d / "tokenizer.json")
        model = tj.get("model", {})
        if model.get("type") != "BPE":
            raise ConversionError(f"{d}/tokenizer.json: model type {model.get('type')!r}, expected BPE")
        vocab = model["vocab"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    else:
        raise ConversionError(f"{d}: no tokenizer (vocab.json + merges.txt, or tokenizer.json)")
    if (d / "tokenizer.json").is_file():
        for t in _load_json(d / "tokenizer.json").get("added_tokens", []):
            if t.get("special"):
                added[t["content"]] = int(t["id"])
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        for tid, t in (_load_json(tc).get("added_tokens_decoder") or {}).items():
            if isinstance(t, dict) and t.get("special"):
                added[t["content"]] = int(tid)
    for tok in ("<s>", "</s>", "<pad>", "<unk>"):
        if tok in vocab:
            added.setdefault(tok, int(vocab[tok]))
    return vocab, merges, added


def _token_table(d: Path, cfg: OPTConfig):
    import gguf

    vocab, merges, special = _read_bpe(d)
    ids = {**{t: int(i) for t, i in vocab.items()}, **special}
    top = max(ids.values())
    if top >= cfg.vocab_size:
        raise ConversionError(
            f"{d}: tokenizer has token id {top} but the embedding has only {cfg.vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(cfg.vocab_size)]
    types = [gguf.TokenType.UNUSED] * cfg.vocab_size
    for tok, i in ids.items():
        tokens[i] = tok
        types[i] = gguf.TokenType.CONTROL if tok in special else gguf.TokenType.NORMAL
    unk = special.get("<unk>")
    if unk is not None:
        types[unk] = gguf.TokenType.UNKNOWN
    return tokens, [int(t) for t in types], merges, unk


# -- writer ---------------------------------------------------------------------
def convert_opt(hf_dir: PathLike, out_path: PathLike, *, outtype: str = "f32") -> Path:
    """Convert the OPT checkpoint in ``hf_dir`` to a GGUF file at ``out_path``.

    ``outtype``: ``f32`` (exact), ``f16`` or ``q8_0`` for the 2-D weights
    (rows not a multiple of 32 fall back to f16 under q8_0); LayerNorm weights
    and biases always stay f32. Returns the written path.
    """
    outtype = str(outtype).lower()
    if outtype not in OUTTYPES:
        raise ConversionError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    d = Path(hf_dir)
    cfg = read_opt_config(d)
    weights = _collect_weights(d, cfg)
    tokens, types, merges, unk = _token_table(d, cfg)
    shapes = _expected_shapes(cfg)

    out = Path(out_path)
    if out.is_dir():
        raise ConversionError(f"{out}: is a directory, give a file name")
    w, tmp = open_writer(out, GGUF_ARCH, d.resolve().name,
                         n_ctx_train=cfg.max_position_embeddings, n_embd=cfg.hidden_size,
                         n_layer=cfg.num_hidden_layers, n_ff=cfg.ffn_dim,
                         n_head=cfg.num_attention_heads, n_head_kv=cfg.num_attention_heads)
    w.add_layer_norm_eps(LAYER_NORM_EPS)
    w.add_bool(f"{GGUF_ARCH}.layer_norm_before", cfg.do_layer_norm_before)
    w.add_uint32(f"{GGUF_ARCH}.word_embed_proj_dim", cfg.word_embed_proj_dim)
    w.add_vocab_size(cfg.vocab_size)
    add_file_type(w, outtype)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    if cfg.pad_token_id is not None:
        w.add_pad_token_id(cfg.pad_token_id)
    if unk is not None:
        w.add_unk_token_id(unk)
    # OPT's tokenizer prepends BOS (</s>) to every prompt
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    for name in sorted(weights, key=_tensor_order):
        arr = np.ascontiguousarray(weights[name](), dtype=np.float32)
        if name == "position_embd.weight":
            arr = arr[POSITION_OFFSET:]
        if arr.shape != shapes[name]:
            tmp.unlink(missing_ok=True)
            raise ConversionError(f"{d}: {name} has shape {arr.shape}, config implies {shapes[name]}")
        add_weight(w, name, np.ascontiguousarray(arr), outtype)

    return finish(w, tmp, out)


def _tensor_order(name: str):
    """Global tensors first, then layers in order (as llama.cpp's converters write them)."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (1, int(m.group(1)), name) if m else (0, 0, name)
