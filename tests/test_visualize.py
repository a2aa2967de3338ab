"""a2sf.visualize: which tokens the cache kept (trace), and the HTML page / PNG heatmap of it."""
from __future__ import annotations

import html.parser
import re
import shutil
import subprocess

import numpy as np
import pytest

from a2sf import Llama
from a2sf.visualize import KVTrace, render_html, render_png, score_colour, trace

N_CTX = 64
TEXT = ("The cat sat on the mat and it is in the house of a man that the dog saw. " * 8
        + "café <b>&amp; naïve — done").encode()


class _Tokens(html.parser.HTMLParser):
    """Collects the token elements of the page: (tag, attrs, text)."""

    def __init__(self):
        super().__init__()
        self.tokens = []
        self._open = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "tok" in (a.get("class") or "").split() and "data-pos" in a:
            self._open = [tag, a, ""]
            self.tokens.append(self._open)

    def handle_endtag(self, tag):
        if self._open is not None and tag == self._open[0]:
            self._open = None

    def handle_data(self, data):
        if self._open is not None:
            self._open[2] += data


def _luminance(colour: str) -> float:
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


@pytest.fixture(scope="module")
def a2sf_trace(tiny_f32):
    llm = Llama(tiny_f32, n_ctx=N_CTX, kv_policy="a2sf", n_sink=4, n_recent=8, verbose=False)
    try:
        yield trace(llm, TEXT), llm.n_ctx(), llm.tokenize(TEXT, add_bos=True)
    finally:
        llm.close()


def test_trace_kept_and_evicted(a2sf_trace):
    t, n_ctx, tokens = a2sf_trace
    assert t.tokens == tokens and len(tokens) > 2 * n_ctx
    assert t.n_kept + t.n_evicted == len(tokens)
    assert 0 < t.n_kept <= n_ctx and t.n_evicted >= len(tokens) - n_ctx
    assert t.kept[:4].all(), "sink positions are never evicted"
    assert t.kept[-8:].all(), "the newest positions are never evicted"
    assert t.stats["evictions"] > 0 and t.stats["cells_evicted"] == t.n_evicted
    assert np.isnan(t.scores[:, ~t.kept]).all()
    assert np.isfinite(t.scores[:, t.kept]).all() and (t.total[t.kept] > 0).all()
    # pieces are the bytes of the text (SentencePiece adds a leading space; BOS is shown by name)
    assert b"".join(t.pieces[1:]).lstrip(b" ") == TEXT
    assert t.pieces[0] and not t.special[1:].any()  # BOS shows as something, never as nothing


def test_html_marks_kept_and_evicted_tokens(a2sf_trace):
    t, _, _ = a2sf_trace
    page = render_html(t)
    p = _Tokens()
    p.feed(page)
    assert [int(a["data-pos"]) for _, a, _ in p.tokens] == list(range(len(t.tokens)))
    kept = [(tag, a) for tag, a, _ in p.tokens if "kept" in a["class"]]
    evicted = [(tag, a) for tag, a, _ in p.tokens if "evicted" in a["class"]]
    assert len(kept) == t.n_kept and len(evicted) == t.n_evicted
    assert all(tag == "del" for tag, _ in evicted), "evicted tokens are struck through"
    assert all(t.kept[int(a["data-pos"])] for _, a in kept)
    assert "text-decoration: line-through" in page
    # colour follows the score: a higher score is never lighter
    by_score = sorted(kept, key=lambda x: float(x[1]["data-score"]))
    lum = [_luminance(re.search(r"background:(#[0-9a-f]{6})", a["style"]).group(1)) for _, a in by_score]
    assert all(a >= b - 1e-9 for a, b in zip(lum, lum[1:]))
    assert lum[0] - lum[-1] > 100  # lowest and highest scores look clearly different
    for _, a in kept:
        assert float(a["data-score"]) == pytest.approx(t.total[int(a["data-pos"])], rel=1e-5)
    assert "<script" not in page.lower()  # self-contained, no scripts


def test_html_escapes_markup_and_marks_invalid_utf8():
    pieces = [b"<s>", b"<script>alert(1)</script>", b" &amp;", b" caf", b"\xc3", b"\xa9", b' "q"', b"\xff"]
    n = len(pieces)
    t = KVTrace(
        tokens=list(range(n)), pieces=pieces, kept=np.array([True] * 6 + [False, True]),
        scores=np.array([[1, 2, 3, 4, 5, 6, np.nan, 8]], dtype=np.float32), policy="A2SF(<x>)", n_ctx=8,
    )
    page = render_html(t, title="a < b & c")
    page.encode("utf-8")  # a valid str whatever the bytes were
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&amp;amp;" in page  # the text "&amp;" shown literally
    assert '<span class="bad">\\xc3</span>' in page and '<span class="bad">\\xa9</span>' in page
    assert '<span class="bad">\\xff</span>' in page
    assert "<title>a &lt; b &amp; c</title>" in page and "A2SF(&lt;x&gt;)" in page
    p = _Tokens()
    p.feed(page)
    assert [x[2] for x in p.tokens][:3] == ["<s>", "<script>alert(1)</script>", " &amp;"]


def test_score_colour_scale():
    assert score_colour(0.0) == "#fff7bc" and score_colour(1.0) == "#993404"
    assert score_colour(float("nan")) == "#e0e0e0"
    lum = [_luminance(score_colour(x)) for x in np.linspace(0, 1, 21)]
    assert all(a > b for a, b in zip(lum, lum[1:]))


def test_png_heatmap(a2sf_trace, tmp_path):
    import matplotlib.image

    t, _, _ = a2sf_trace
    out = tmp_path / "kv.png"
    render_png(t, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(out)
    assert img.shape[0] > 300 and img.shape[1] > 600
    # the kept/evicted strip: green and red pixels, both present
    rgb = img[..., :3]
    green = ((rgb[..., 1] > 0.55) & (rgb[..., 0] < 0.4)).sum()
    red = ((rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.4) & (rgb[..., 2] < 0.3)).sum()
    assert green > 500 and red > 500


def test_trace_without_policy(tiny_f32):
    llm = Llama(tiny_f32, n_ctx=N_CTX, verbose=False)
    try:
        t = trace(llm, b"the cat sat on the mat")
        assert t.kept.all() and t.n_evicted == 0 and t.policy == "none"
        with pytest.raises(ValueError, match="do not fit in n_ctx"):
            trace(llm, TEXT)
        with pytest.raises(ValueError, match="empty"):
            trace(llm, b"", add_bos=False)
    finally:
        llm.close()


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no chromium on this machine (apt-get install chromium)")
def test_html_in_headless_chromium(a2sf_trace, tmp_path):
    """Chromium renders the page: the darkest score colour and the struck-through grey text are on screen."""
    import matplotlib.image

    t, _, _ = a2sf_trace
    page = tmp_path / "kv.html"
    page.write_text(render_html(t), encoding="utf-8")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--window-size=1000,900", f"--screenshot={shot}", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    rgb = (matplotlib.image.imread(shot)[..., :3] * 255).round().astype(int)
    assert rgb.shape[:2] == (900, 1000)

    def count(colour: str, tol: int = 6) -> int:
        target = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(rgb - target).max(axis=-1) <= tol).sum())

    top = max(range(len(t.tokens)), key=lambda i: t.total[i] if t.kept[i] else -1)
    assert count(score_colour(1.0)) > 50, "the highest-scored token's colour is drawn"
    assert count("#999999", tol=20) > 50, "evicted tokens are drawn in grey"
    assert t.kept[top]
