"""Tiny random OPT checkpoints in the Hugging Face layout, for tests.

A GPT-2 byte-level BPE tokenizer is trained on a few paragraphs of built-in
text (OPT's special tokens ``<s> <pad> </s> <unk>`` at ids 0-3, as in
facebook/opt-*), and an ``OPTForCausalLM`` with random weights is saved beside
it. The weights are drawn wider than transformers' init (std 0.02) so that the
next-token distribution is peaked: greedy decoding is then well defined and a
quantized copy can be compared by top-1 agreement.

Needs torch, transformers and tokenizers (test-only dependencies)::

    from a2sf.testing.tiny_opt import write_tiny_opt
    hf_dir = write_tiny_opt(tmp_path / "opt-pre", variant="pre_ln")
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

__all__ = ["TEXT", "VARIANTS", "write_tiny_tokenizer", "write_tiny_opt"]

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of "
    "such a man may be on his first entering a neighbourhood, this truth is so well fixed "
    "in the minds of the surrounding families, that he is considered the rightful property "
    "of some one or other of their daughters. The quick brown fox jumps over the lazy dog; "
    "numbers like 1234 and 56.78 appear too, as do names such as Elizabeth, Darcy and Bingley. "
    "When the cache is full, the cells with the lowest accumulated attention are evicted, "
    "and the newest tokens are always kept. Attention scores decay with a forgetting factor, "
    "so old attention counts less than recent attention. "
)

# name -> OPTConfig overrides (on top of the tiny shape below); "proj" is
# word_embed_proj_dim as a fraction of hidden_size
VARIANTS = {
    # pre-LayerNorm blocks + final LayerNorm, lm_head tied (most OPT sizes)
    "pre_ln": dict(do_layer_norm_before=True, proj=1.0),
    # post-LayerNorm blocks, no final LayerNorm, project_in/out (as opt-350m: 512 of 1024)
    "post_ln_proj": dict(do_layer_norm_before=False, proj=0.5),
    # pre-LN with its own (untied) lm_head
    "pre_ln_untied": dict(do_layer_norm_before=True, proj=1.0, tie_word_embeddings=False),
}

_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


def write_tiny_tokenizer(out_dir: Union[str, os.PathLike], vocab_size: int = 400) -> Path:
    """Train a byte-level BPE on :data:`TEXT`; write vocab.json + merges.txt
    (+ the tokenizer configs transformers reads) into ``out_dir``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([TEXT] * 4, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=_SPECIALS, show_progress=False)
    tok.save_model(str(out))
    hf = GPT2Tokenizer(str(out / "vocab.json"), str(out / "merges.txt"),
                       bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    hf.save_pretrained(str(out))
    return out


def write_tiny_opt(out_dir: Union[str, os.PathLike], variant: str = "pre_ln", *, seed: int = 0,
                   vocab_size: int = 512, hidden_size: int = 64, num_hidden_layers: int = 2,
                   num_attention_heads: int = 4, ffn_dim: int = 128,
                   max_position_embeddings: int = 512, weights: str = "safetensors") -> Path:
    """Write a random tiny OPT checkpoint + tokenizer to ``out_dir``; return it.

    ``weights``: ``"safetensors"`` (``save_pretrained``: ``model.`` prefixed
    names, tied lm_head dropped), ``"sharded"`` (the same in several
    ``*.safetensors`` shards with an index) or ``"bin"`` (``pytorch_model.bin`` with
    ``decoder.`` names, as the original facebook/opt-* files).
    """
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    out = Path(out_dir)
    write_tiny_tokenizer(out)
    overrides = dict(VARIANTS[variant])
    overrides["word_embed_proj_dim"] = int(hidden_size * overrides.pop("proj"))
    cfg = OPTConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                    num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                    ffn_dim=ffn_dim, max_position_embeddings=max_position_embeddings,
                    pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0,
                    attention_dropout=0.0, **overrides)
    torch.manual_seed(seed)
    model = OPTForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed" in name or "lm_head" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:  # Linear: unit-variance outputs, a bit larger so attention is peaked
                p.copy_(1.5 * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    if weights == "safetensors":
        model.save_pretrained(str(out))
    elif weights == "sharded":
        model.save_pretrained(str(out), max_shard_size="40KB")
    elif weights == "bin":
        cfg.save_pretrained(str(out))
        sd = {k[len("model."):] if k.startswith("model.") else k: v.contiguous()
              for k, v in model.state_dict().items()}
        if cfg.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        torch.save(sd, str(out / "pytorch_model.bin"))
    else:
        raise ValueError(f"weights must be 'safetensors', 'sharded' or 'bin', got {weights!r}")
    return out
