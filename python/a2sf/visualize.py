"""Which tokens the KV cache kept, and their scores: an HTML page and a PNG heatmap.

    from a2sf import Llama
    from a2sf.visualize import trace, render_html, render_png
    llm = Llama(path, n_ctx=256, kv_policy="a2sf")
    t = trace(llm, open("text.txt", "rb").read())
    open("kv.html", "w").write(render_html(t))
    render_png(t, "kv.png")

    a2sf inspect --model model.gguf --text text.txt --kv-policy a2sf --n-ctx 256

The text is fed through the cache in batches (eviction runs as it would in a
prompt prefill); afterwards every position is either *kept* (its cell is still
in the cache, with one accumulated score per layer, see
:meth:`a2sf.Llama.kv_scores`) or *evicted* (fed, but its cell is gone).

In the HTML page kept tokens are coloured by their score summed over layers
(what eviction ranks by; log scale, since sink tokens gather orders of
magnitude more attention than the rest) and evicted tokens are struck through.
The PNG shows the per-layer scores as a layers x positions heatmap, evicted
positions blank.
"""
from __future__ import annotations

import dataclasses
import html
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from ._deps import require

__all__ = ["KVTrace", "trace", "render_html", "render_png", "score_colour"]


@dataclass
class KVTrace:
    """The cache after a text went through it, position by position."""

    tokens: List[int]  # token ids fed, position i = tokens[i]
    pieces: List[bytes]  # the bytes each token stands for
    kept: np.ndarray  # bool [n_tokens]
    scores: np.ndarray  # float32 [n_layers, n_tokens], NaN where evicted
    policy: str = "none"
    n_ctx: int = 0
    stats: Dict[str, Any] = field(default_factory=dict)
    title: str = ""
    special: Optional[np.ndarray] = None  # bool [n_tokens]: shown by name (e.g. BOS), not text

    @property
    def total(self) -> np.ndarray:
        """Score summed over layers, float64 [n_tokens] (NaN where evicted)."""
        return self.scores.sum(axis=0, dtype=np.float64)

    @property
    def n_kept(self) -> int:
        return int(self.kept.sum())

    @property
    def n_evicted(self) -> int:
        return int((~self.kept).sum())


def _policy_name(llm) -> str:
    policy = getattr(llm, "kv_policy", None)
    if policy is None:
        return "none"
    fields = ", ".join(f"{f.name}={getattr(policy, f.name)}" for f in dataclasses.fields(policy))
    return f"{type(policy).__name__}({fields})"


def trace(
    llm,
    text: Union[str, bytes, Sequence[int]],
    add_bos: bool = True,
    progress: bool = False,
    title: str = "",
) -> KVTrace:
    """Reset ``llm``, feed ``text`` (str, bytes or token ids) in batches of ``n_batch``, read the cache.

    Without a policy the text must fit in ``n_ctx`` (nothing is ever evicted).
    """
    if isinstance(text, str):
        text = text.encode("utf-8")
    if isinstance(text, (bytes, bytearray)):
        tokens = llm.tokenize(bytes(text), add_bos=add_bos, special=False)
    else:
        tokens = [int(t) for t in text]
    if not tokens:
        raise ValueError("the text is empty: nothing to run through the cache")
    active = bool(getattr(llm, "a2sf_active", False))
    if not active and len(tokens) > llm.n_ctx():
        raise ValueError(
            f"{len(tokens)} tokens do not fit in n_ctx={llm.n_ctx()} without a kv_policy; "
            "choose a policy (e.g. kv_policy='a2sf') or a larger n_ctx"
        )

    llm.reset()
    if active:
        llm.kv_reset_stats()
    step = max(1, int(llm.n_batch))
    bar = None
    if progress:
        tqdm = require("tqdm", "viz", "the progress bar of a2sf inspect").tqdm

        bar = tqdm(total=len(tokens), unit="tok", desc="feeding the cache", leave=False)
    try:
        for i in range(0, len(tokens), step):
            chunk = tokens[i : i + step]
            llm.eval(chunk)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()

    n = len(tokens)
    kept = np.zeros(n, dtype=bool)
    stats: Dict[str, Any] = {}
    if active:
        ks = llm.kv_scores()
        # the token each cell holds (compaction renumbers cache positions, not tokens)
        pos = np.asarray(ks.token_index, dtype=np.int64)
        scores = np.full((ks.scores.shape[0], n), np.nan, dtype=np.float32)
        kept[pos] = True
        scores[:, pos] = ks.scores
        stats = llm.kv_stats()
    else:
        import llama_cpp

        # plain llama.cpp: everything stays, and there are no scores
        kept[:] = True
        scores = np.zeros((int(llama_cpp.llama_model_n_layer(llm._model.model)), n), dtype=np.float32)
    pieces = []
    special = np.zeros(n, dtype=bool)
    for i, t in enumerate(tokens):
        piece = llm.detokenize([t], special=True)
        if not piece:  # e.g. BOS: show the token's name rather than nothing
            piece = llm._model.token_get_text(t).encode("utf-8", errors="replace")
            special[i] = True
        pieces.append(piece)
    return KVTrace(
        tokens=tokens,
        pieces=pieces,
        kept=kept,
        scores=scores,
        policy=_policy_name(llm),
        n_ctx=int(llm.n_ctx()),
        stats=stats,
        title=title,
        special=special,
    )


# -- colours ------------------------------------------------------------------
def _normalise(total: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Kept scores mapped to [0, 1] on a log scale (NaN for evicted tokens)."""
    out = np.full(total.shape, np.nan)
    vals = total[kept]
    if vals.size == 0:
        return out
    logv = np.log10(np.maximum(vals, 0.0) + 1e-6)
    lo, hi = float(logv.min()), float(logv.max())
    out[kept] = (logv - lo) / (hi - lo) if hi > lo else 0.5
    return out


def score_colour(x: float) -> str:
    """Background colour of a kept token with normalised score x in [0, 1]: pale yellow to dark red."""
    if x is None or math.isnan(x):
        return "#e0e0e0"
    x = min(1.0, max(0.0, float(x)))
    stops = [(255, 247, 188), (254, 196, 79), (236, 112, 20), (153, 52, 4)]
    seg = min(int(x * (len(stops) - 1)), len(stops) - 2)
    f = x * (len(stops) - 1) - seg
    r, g, b = (round(a + (c - a) * f) for a, c in zip(stops[seg], stops[seg + 1]))
    return f"#{r:02x}{g:02x}{b:02x}"


def _piece_text(piece: bytes) -> str:
    """A token's bytes as text: invalid UTF-8 (a multi-byte character split across tokens) as \\xNN."""
    return piece.decode("utf-8", errors="backslashreplace")


# -- HTML ---------------------------------------------------------------------
def _piece_html(piece: bytes) -> str:
    """A token's bytes as escaped HTML; bytes that are not UTF-8 as a marked \\xNN."""
    out = []
    while piece:
        try:
            out.append(html.escape(piece.decode("utf-8"), quote=False))
            break
        except UnicodeDecodeError as e:
            out.append(html.escape(piece[: e.start].decode("utf-8"), quote=False))
            bad = "".join(f"\\x{b:02x}" for b in piece[e.start : e.end])
            out.append(f'<span class="bad">{bad}</span>')
            piece = piece[e.end :]
    # a newline token (often an attention sink) would otherwise be an invisible box
    return "".join(out).replace("\n", '<span class="nl">\u21b5</span>\n')


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.2em; }
table.summary td { padding: 0 1em 0 0; }
.legend span { display: inline-block; width: 2.5em; height: 1em; vertical-align: middle; }
.text { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9;
        border: 1px solid #ccc; padding: 0.8em; }
.tok { border-radius: 2px; }
.tok.kept { color: #000; }
.tok.evicted, .evicted-sample { color: #999; text-decoration: line-through; background: none; }
.tok.sink { outline: 1px solid #333; }
.bad { color: #b00; font-style: italic; }
.special { font-size: 0.75em; font-style: italic; }
.nl { opacity: 0.55; }
"""


def render_html(t: KVTrace, title: Optional[str] = None) -> str:
    """A self-contained HTML page (inline CSS, no scripts): tokens coloured by score, evicted ones struck through."""
    title = title or t.title or "a2sf: tokens kept in the KV cache"
    norm = _normalise(t.total, t.kept)
    total = t.total
    has_scores = bool(np.any(np.nan_to_num(total[t.kept]) != 0))
    spans = []
    for pos, (tok, piece) in enumerate(zip(t.tokens, t.pieces)):
        body = _piece_html(piece)
        if t.special is not None and t.special[pos]:
            body = f'<span class="special">{body}</span>'
        if t.kept[pos]:
            score = float(total[pos])
            colour = score_colour(norm[pos]) if has_scores else "#fff7bc"
            tip = f"pos {pos} · token {tok} · kept · score {score:.4g}"
            spans.append(
                f'<span class="tok kept" style="background:{colour}" data-pos="{pos}" '
                f'data-score="{score:.6g}" title="{html.escape(tip)}">{body}</span>'
            )
        else:
            tip = f"pos {pos} · token {tok} · evicted"
            spans.append(
                f'<del class="tok evicted" data-pos="{pos}" title="{html.escape(tip)}">{body}</del>'
            )
    stats = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in {
            "policy": t.policy,
            "n_ctx (cells)": t.n_ctx,
            "tokens fed": len(t.tokens),
            "kept": t.n_kept,
            "evicted": t.n_evicted,
            **{k: v for k, v in t.stats.items() if k != "evict_seconds"},
        }.items()
    )
    legend = "".join(
        f'<span style="background:{score_colour(x)}"></span>' for x in np.linspace(0, 1, 8)
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<table class="summary">{stats}</table>
<p class="legend">score (sum over layers, log scale): low {legend} high ·
<del class="evicted-sample">evicted</del> · hover a token for its position and score</p>
<div class="text">{"".join(spans)}</div>
</body>
</html>
"""


# -- PNG ----------------------------------------------------------------------
def render_png(t: KVTrace, path, title: Optional[str] = None, max_labels: int = 80) -> None:
    """Heatmap of per-layer scores (layers x positions, log colour scale; evicted positions blank)."""
    matplotlib = require("matplotlib", "viz", "a2sf inspect --png")

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    n = len(t.tokens)
    data = np.ma.masked_invalid(np.where(t.scores > 0, t.scores, np.nan))
    width = min(24.0, max(8.0, n / 12))
    fig, (ax, ax2) = plt.subplots(
        2, 1, figsize=(width, 7), sharex=True, gridspec_kw={"height_ratios": [4, 1]}
    )
    cmap = plt.get_cmap("YlOrRd").with_extremes(bad="#eeeeee")
    if data.count() > 0:
        im = ax.imshow(
            data, aspect="auto", interpolation="nearest", cmap=cmap,
            norm=LogNorm(vmin=max(float(data.min()), 1e-6), vmax=float(data.max())),
        )
        fig.colorbar(im, ax=[ax, ax2], label="score (log)", fraction=0.03)
    else:
        ax.imshow(np.zeros((t.scores.shape[0], n)), aspect="auto", cmap="Greys", vmin=0, vmax=1)
    ax.set_ylabel("layer")
    ax.set_title(title or t.title or f"{t.policy}: {t.n_kept} of {n} tokens kept in {t.n_ctx} cells")

    status = t.kept.astype(float)[None, :]
    ax2.imshow(status, aspect="auto", interpolation="nearest", cmap="RdYlGn", vmin=-0.2, vmax=1.2)
    ax2.set_yticks([0])
    ax2.set_yticklabels(["kept"])
    ax2.set_xlabel("position (green: kept, red: evicted)")
    if n <= max_labels:
        ax2.set_xticks(range(n))
        ax2.set_xticklabels([_piece_text(p).replace("\n", "\\n") for p in t.pieces], rotation=90, fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
