"""Self-contained HTML batch report: verdict, tables and figures a chemist reads.

One HTML file: every picture is embedded as base64 (PNG figures, JPEG overlay thumbnails); the
only references are the links from the thumbnails to the full-size overlays written beside it
(``overlays/<image>.png`` from ``qcloop batch``). Contents:

* verdict banner (pass / fail, and whether every check is statistically confident);
* the checks table (observed ± 95 % half-width, limits, pass/fail coloured);
* class table (count, fraction with its Wilson 95 % interval, ECD mean ± sd, CV, d10/d50/d90);
* embedding-space separation (inter/intra-class variance, silhouette; full space and PCA plane);
* PCA scatter of the embeddings coloured by class;
* ECD histograms per class;
* orientation table for elongated classes;
* lobe diameters per class (the dumbbell / trimer lobe size);
* overlays of the images coloured by class (made by :func:`qcloop.overlay.draw_overlay`):
  thumbnails, each linking to its full-size overlay file when one is given;
* warnings (e.g. images without a pixel size, measured in px) at the top;
* images that failed, with the reason.

Figures are drawn with matplotlib's object-oriented API (:class:`matplotlib.figure.Figure`,
Agg canvas, no pyplot state), so reports can be written from worker threads of the daemon.
"""

from __future__ import annotations

import base64
import html
import io
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from qcloop.batch import (
    UNKNOWN_CLASS,
    BatchMetrics,
    EmbeddingView,
    class_labels,
    embedding_view,
    interior_mask,
    wilson_interval,
)
from qcloop.targets import Verdict

_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31")
UNKNOWN_COLOR = "#aaaaaa"
OVERLAY_MAX_SIDE_PX = 1024
#: long side of the overlay thumbnails embedded in the report (JPEG; each links to the full-size
#: overlay file when the caller gives one): shown two per row at >= 600 CSS px, sharp on zoom
THUMBNAIL_MAX_SIDE_PX = 1280
THUMBNAIL_JPEG_QUALITY = 85


def class_colors(classes: Iterable[str]) -> dict[str, str]:
    """A stable colour per class (hex), ``unknown`` grey.

    Classes take the colour :func:`qcloop.overlay.category_color` gives them in the overlays, so
    plots and overlays agree; when two classes of this batch share a colour there, the later one
    (in sorted order) takes the next free palette colour instead.
    """
    from qcloop.overlay import category_color

    named = sorted(c for c in set(classes) if c != UNKNOWN_CLASS)
    out: dict[str, str] = {}
    used: set[str] = set()
    for c in named:
        col = "#%02x%02x%02x" % tuple(category_color(c))
        if col in used:
            col = next((p for p in _PALETTE if p not in used), _PALETTE[len(used) % len(_PALETTE)])
        used.add(col)
        out[c] = col
    out[UNKNOWN_CLASS] = UNKNOWN_COLOR
    return out


# --------------------------------------------------------------------------- figures
def pca_figure(view: EmbeddingView | None, colors: Mapping[str, str], *, max_points: int = 5000) -> Figure:
    """Scatter of the particles in the PCA plane of their standardised embeddings.

    Parameters
    ----------
    view : EmbeddingView or None
        From :func:`qcloop.batch.embedding_view`; None draws an explanatory empty panel.
    colors : mapping of class to colour
    max_points : int
        Larger batches are drawn from a fixed-seed random subset of this many points.
    """
    fig = Figure(figsize=(6.0, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if view is None or view.pca.shape[0] == 0:
        ax.text(0.5, 0.5, "no embeddings", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    idx = np.arange(view.pca.shape[0])
    if idx.size > max_points:
        idx = np.sort(np.random.default_rng(0).choice(idx, max_points, replace=False))
    pts, lab = view.pca[idx], view.labels[idx]
    for c in sorted(set(lab.tolist())):
        sel = lab == c
        ax.scatter(pts[sel, 0], pts[sel, 1], s=10, alpha=0.7, color=colors.get(c, UNKNOWN_COLOR),
                   label=f"{c} ({int(sel.sum())})", edgecolors="none")
    evr = view.explained_variance_ratio
    ax.set_xlabel(f"PC1 ({_pct(evr[0])} of variance)")
    ax.set_ylabel(f"PC2 ({_pct(evr[1])} of variance)")
    ax.set_title("Embeddings, PCA of standardised features")
    ax.legend(loc="best", fontsize=8, markerscale=2, frameon=False)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def size_histogram_figure(particles: pd.DataFrame, *, class_column: str = "class",
                          colors: Mapping[str, str] | None = None, unit: str = "nm") -> Figure:
    """ECD histograms, one panel per class, common bins; mean and d10/d50/d90 marked.

    Uses interior particles only (as the metrics do). ``unit`` is ``"nm"`` or ``"px"``.
    """
    p = particles.reset_index(drop=True)
    inner = interior_mask(p)
    labels = class_labels(p, class_column)[inner]
    col = f"ecd_{unit}"
    values = (pd.to_numeric(p[col], errors="coerce").to_numpy(float)[inner]
              if col in p.columns else np.full(int(inner.sum()), np.nan))
    finite = np.isfinite(values)
    classes = sorted(set(labels[finite].tolist()))
    colors = colors or class_colors(classes)
    n_panels = max(1, len(classes))
    fig = Figure(figsize=(6.0, 1.9 * n_panels + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    if not classes:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, f"no {col} values", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    lo, hi = np.percentile(values[finite], [0.5, 99.5])
    if hi <= lo:
        lo, hi = lo - 1, hi + 1
    bins = np.linspace(lo, hi, 41)
    axes = fig.subplots(n_panels, 1, sharex=True, squeeze=False)[:, 0]
    for ax, c in zip(axes, classes):
        x = values[finite & (labels == c)]
        outside = int(((x < lo) | (x > hi)).sum())
        ax.hist(x[(x >= lo) & (x <= hi)], bins=bins, color=colors.get(c, UNKNOWN_COLOR), alpha=0.85)
        mean = float(np.mean(x))
        ax.axvline(mean, color="k", lw=1.2)
        for q in np.percentile(x, [10, 50, 90]):
            ax.axvline(q, color="k", lw=0.8, ls=":")
        sd = float(np.std(x, ddof=1)) if x.size > 1 else math.nan
        note = f" ({outside} outside the plotted range)" if outside else ""
        ax.set_title(f"{c}: n = {x.size}, mean {mean:.1f} {unit}, sd {sd:.1f} {unit}{note}",
                     fontsize=9, loc="left")
        ax.set_ylabel("count")
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel(f"equivalent circular diameter ({unit}); solid: mean, dotted: d10/d50/d90")
    fig.tight_layout()
    return fig


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """Render a matplotlib Figure to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def image_png(rgb: np.ndarray, max_side_px: int = OVERLAY_MAX_SIDE_PX, colors: int | None = 128) -> bytes:
    """Encode an RGB (H, W, 3) or grey (H, W) uint8 array as PNG, downscaled to ``max_side_px``.

    ``colors``: RGB images are stored with an adaptive palette of this many colours (an SEM
    overlay is grey plus a few outline colours; this halves the file against 24-bit PNG with no
    visible change); None keeps 24 bits.
    """
    from PIL import Image

    arr = np.asarray(rgb)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    side = max(im.size)
    if side > max_side_px:
        s = max_side_px / side
        im = im.resize((max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))), Image.Resampling.LANCZOS)
    if colors is not None and im.mode == "RGB":
        im = im.quantize(colors)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def thumbnail_jpeg(rgb: np.ndarray, max_side_px: int = THUMBNAIL_MAX_SIDE_PX,
                   quality: int = THUMBNAIL_JPEG_QUALITY) -> bytes:
    """An RGB (H, W, 3) or grey uint8 array as a JPEG thumbnail of at most ``max_side_px``."""
    from PIL import Image

    im = Image.fromarray(np.clip(np.asarray(rgb), 0, 255).astype(np.uint8))
    if max(im.size) > max_side_px:
        im.thumbnail((max_side_px, max_side_px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# --------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1280px}
h1{margin-bottom:4px} h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666;font-size:13px}
.verdict{display:inline-block;padding:8px 16px;border-radius:6px;font-weight:bold;font-size:20px;margin:12px 0}
.pass{background:#d8f3dc;color:#1b5e20} .fail{background:#fde2e1;color:#8b0000}
.warn{background:#fff4ce;color:#6b4f00} .na{color:#888}
table{border-collapse:collapse;font-size:14px;margin:8px 0}
th,td{border:1px solid #ddd;padding:4px 10px;text-align:right} th{background:#f4f4f4}
td.l,th.l{text-align:left}
.swatch{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:6px;vertical-align:middle}
.figs{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.ov{display:grid;grid-template-columns:repeat(auto-fill,minmax(600px,1fr));gap:12px}
.ov figure{margin:0} .ov img{width:100%;border:1px solid #ccc} figcaption{font-size:13px;color:#555}
.warnbox{background:#fff4ce;color:#6b4f00;padding:8px 12px;border-radius:6px;margin:6px 0}
"""


def render_report(metrics: BatchMetrics, verdict: Verdict | None, *, particles: pd.DataFrame,
                  embeddings: np.ndarray | None, class_column: str = "class",
                  overlays: Sequence[tuple[str, bytes | np.ndarray]] = (),
                  failures: Sequence[Mapping[str, str]] = (), title: str = "Batch report",
                  meta: Mapping[str, Any] | None = None, uncertainty: Mapping[str, float] | None = None,
                  scaler: Any = None, warnings: Sequence[str] = ()) -> str:
    """Build the report as one HTML string.

    Parameters
    ----------
    metrics : BatchMetrics
    verdict : Verdict or None
        None: no targets were given (the checks section says so).
    particles : DataFrame
        The batch's particle table (the one ``metrics`` was computed from).
    embeddings : ndarray, shape (len(particles), d), or None
    overlays : sequence of (caption, image) or (caption, image, href)
        ``image``: PNG/JPEG bytes or an RGB uint8 array (H, W, 3), shown as a thumbnail of
        :data:`THUMBNAIL_MAX_SIDE_PX`; ``href``: the full-size overlay the thumbnail links to
        (relative to the report).
    failures : sequence of {"path": ..., "reason": ...}
    meta : mapping, optional
        Extra key/value lines for the header (model, config, timings).
    uncertainty : mapping, optional
        Defaults to ``metrics.uncertainty()``.
    scaler : optional
        The standardisation used for ``metrics`` (see :func:`qcloop.batch.standardise`).
    warnings : sequence of str
        Shown in a yellow box under the title (e.g. "no image carries a pixel size ...").
    """
    unc = dict(metrics.uncertainty() if uncertainty is None else uncertainty)
    colors = class_colors(metrics.classes)
    unit = "nm" if metrics.size["nm"]["all"].n > 0 else "px"
    view = embedding_view(particles, embeddings, class_column=class_column, scaler=scaler)

    parts: list[str] = []
    add = parts.append
    add("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>")
    add(f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>")
    add(f"<h1>{_e(title)}</h1>")
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta_items = {"generated": now, "images": metrics.n_images,
                  "particles counted": metrics.n_particles,
                  "cut by border (excluded)": metrics.n_border, **(meta or {})}
    add("<div class='meta'>" + " &middot; ".join(f"{_e(k)}: <b>{_e(v)}</b>" for k, v in meta_items.items())
        + "</div>")
    for w in warnings:
        add(f"<div class='warnbox'>&#9888; {_e(w)}</div>")

    # verdict
    if verdict is None or not verdict.checks:
        add("<div class='verdict warn'>NO TARGETS &mdash; metrics only</div>")
    else:
        cls_ = "pass" if verdict.passed else "fail"
        word = "PASS" if verdict.passed else f"FAIL ({len(verdict.failed)} of {len(verdict.checks)} checks)"
        add(f"<div class='verdict {cls_}'>{word}</div>")
        if not verdict.confident:
            add("<div class='verdict warn' style='font-size:14px'>not confident: the 95 % interval of "
                + ", ".join(_e(m) for m in verdict.not_confident) + " straddles a limit</div>")

    # checks
    add("<h2>Checks</h2>")
    if verdict is None or not verdict.checks:
        add("<p class='na'>No targets configured (config <code>targets:</code> section or <code>--targets</code>).</p>")
    else:
        add("<table><tr><th class='l'>metric</th><th>observed</th><th>± 95 %</th><th class='l'>required</th>"
            "<th>result</th><th>confident</th><th class='l'>message</th></tr>")
        for c in verdict.checks:
            req = []
            if c.target is not None:
                req.append(f"{_f(c.target)} ± {_f(c.tolerance)}")
            if c.min is not None:
                req.append(f"&ge; {_f(c.min)}")
            if c.max is not None:
                req.append(f"&le; {_f(c.max)}")
            res = "<td class='pass'>pass</td>" if c.passed else "<td class='fail'>FAIL</td>"
            conf = {True: "yes", False: "<span class='fail'>no</span>", None: "<span class='na'>&ndash;</span>"}[c.confident]
            add(f"<tr><td class='l'><code>{_e(c.metric)}</code></td><td>{_f(c.observed)}</td>"
                f"<td>{_f(c.uncertainty)}</td><td class='l'>{' and '.join(req)}</td>{res}<td>{conf}</td>"
                f"<td class='l'>{_e(c.message)}</td></tr>")
        add("</table>")

    # classes
    add("<h2>Classes and sizes</h2>")
    add(f"<table><tr><th class='l'>class</th><th>count</th><th>fraction</th><th>95 % interval</th>"
        f"<th>ECD mean ({unit})</th><th>± 95 %</th><th>sd</th><th>CV</th><th>d10</th><th>d50</th><th>d90</th></tr>")
    n = metrics.n_particles
    for c in metrics.classes:
        k = metrics.class_count[c]
        lo, hi = wilson_interval(k, n)
        s = metrics.size[unit]["by_class"][c]
        add(f"<tr><td class='l'><span class='swatch' style='background:{colors.get(c, UNKNOWN_COLOR)}'></span>"
            f"{_e(c)}</td><td>{k}</td><td>{_f(k / n if n else math.nan)}</td><td>{_f(lo)} &ndash; {_f(hi)}</td>"
            f"<td>{_f(s.mean)}</td><td>{_f(s.halfwidth.get('mean'))}</td><td>{_f(s.sd)}</td><td>{_f(s.cv)}</td>"
            f"<td>{_f(s.d10)}</td><td>{_f(s.d50)}</td><td>{_f(s.d90)}</td></tr>")
    s = metrics.size[unit]["all"]
    add(f"<tr><th class='l'>all</th><th>{n}</th><th>1</th><th></th><th>{_f(s.mean)}</th>"
        f"<th>{_f(unc.get(f'ecd_{unit}.mean'))}</th><th>{_f(s.sd)}</th><th>{_f(s.cv)}</th>"
        f"<th>{_f(s.d10)}</th><th>{_f(s.d50)}</th><th>{_f(s.d90)}</th></tr></table>")
    if unit == "px":
        add("<p class='warn'>No pixel size known for these images: sizes are in pixels.</p>")
    add(_lobe_table(metrics, unit, colors))

    # separation
    add("<h2>Class separation in embedding space</h2>")
    add("<table><tr><th class='l'></th><th>inter-class variance</th><th>intra-class variance</th>"
        "<th>total variance</th><th>silhouette</th><th>particles</th></tr>")
    for name, sep in (("standardised embeddings", metrics.separation), ("PCA plane (PC1, PC2)", metrics.pca)):
        add(f"<tr><td class='l'>{name}</td><td>{_f(sep.inter_class_variance)}</td>"
            f"<td>{_f(sep.intra_class_variance)}</td><td>{_f(sep.total_variance)}</td>"
            f"<td>{_f(sep.silhouette)}</td><td>{sep.n}</td></tr>")
    add("</table><p class='meta'>Standardisation: " + _e(metrics.standardisation) + ". Inter + intra = total; "
        "a sharper, better separated batch has a larger inter-class share and a higher silhouette. "
        "Silhouette needs two classes with at least two particles each.</p>")

    # figures
    add("<div class='figs'>")
    add(_img(figure_png(pca_figure(view, colors)), "PCA of the embeddings"))
    add(_img(figure_png(size_histogram_figure(particles, class_column=class_column, colors=colors, unit=unit)),
             "ECD histograms per class"))
    add("</div>")

    if metrics.orientation:
        add("<h2>Orientation (elongated classes)</h2><table><tr><th class='l'>class</th><th>n</th>"
            "<th>mean direction (deg)</th><th>mean resultant length</th><th>circular sd (deg)</th></tr>")
        for c, o in metrics.orientation.items():
            add(f"<tr><td class='l'>{_e(c)}</td><td>{o.n}</td><td>{_f(o.mean)}</td>"
                f"<td>{_f(o.mean_resultant_length)}</td><td>{_f(o.circular_sd)}</td></tr>")
        add("</table>")

    if overlays:
        add(_overlay_section(overlays))

    if failures:
        add("<h2>Images that could not be analysed</h2><table><tr><th class='l'>file</th><th class='l'>reason</th></tr>")
        for f in failures:
            add(f"<tr><td class='l'>{_e(f.get('path', ''))}</td><td class='l'>{_e(f.get('reason', ''))}</td></tr>")
        add("</table>")
    add("</body></html>")
    return "\n".join(parts)



def _lobe_table(metrics: BatchMetrics, unit: str, colors: Mapping[str, str]) -> str:
    """Lobe diameter per class (mean lobe major axis per particle; the ECD of one-lobe ones)."""
    block = metrics.lobe_diameter.get(unit)
    if not block or block["all"].n == 0:
        return ""
    rows = ["<h2>Lobe diameters</h2><table><tr><th class='l'>class</th><th>particles</th>"
            f"<th>lobe diameter mean ({unit})</th><th>± 95 %</th><th>sd</th><th>d50</th>"
            f"<th>ECD mean ({unit})</th></tr>"]
    for c in metrics.classes:
        s, e = block["by_class"][c], metrics.size[unit]["by_class"][c]
        rows.append(f"<tr><td class='l'><span class='swatch' style='background:{colors.get(c, UNKNOWN_COLOR)}'>"
                    f"</span>{_e(c)}</td><td>{s.n}</td><td>{_f(s.mean)}</td><td>{_f(s.halfwidth.get('mean'))}</td>"
                    f"<td>{_f(s.sd)}</td><td>{_f(s.d50)}</td><td>{_f(e.mean)}</td></tr>")
    rows.append("</table><p class='meta'>Per particle: the mean major axis of its lobes for fused "
                "particles (dumbbells, trimers), the ECD for one-lobe particles. Targets: "
                f"<code>lobe_diameter_{unit}.&lt;class&gt;.mean</code>, <code>.sd</code>, "
                "<code>.d50</code>.</p>")
    return "".join(rows)


def _overlay_section(overlays: Sequence[tuple]) -> str:
    """The thumbnails grid; a thumbnail with an href links to its full-size overlay."""
    parts = ["<h2>Images</h2><p class='meta'>Outlines coloured by class (legend in each image); "
             "dashed outlines: particles cut by the border, not counted. Click an image for the "
             "full-size overlay.</p><div class='ov'>"]
    for caption, img, *href in overlays:
        data = bytes(img) if isinstance(img, (bytes, bytearray)) else thumbnail_jpeg(img)
        tag = _img(data, caption)
        if href and href[0]:
            tag = f"<a href='{_e(href[0])}' target='_blank'>{tag}</a>"
        parts.append(f"<figure>{tag}<figcaption>{_e(caption)}</figcaption></figure>")
    parts.append("</div>")
    return "\n".join(parts)

def write_report(path: str | Path, *args: Any, **kwargs: Any) -> Path:
    """:func:`render_report` and write it to ``path`` (UTF-8). Returns the path."""
    p = Path(path)
    p.write_text(render_report(*args, **kwargs), encoding="utf-8")
    return p


# --------------------------------------------------------------------------- helpers
def _img(data: bytes, alt: str) -> str:
    mime = "image/jpeg" if data[:3] == b"\xff\xd8\xff" else "image/png"
    return f"<img alt='{_e(alt)}' src='data:{mime};base64,{base64.b64encode(data).decode('ascii')}'>"


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _f(v: float | None) -> str:
    if v is None:
        return "<span class='na'>&ndash;</span>"
    v = float(v)
    if math.isnan(v):
        return "<span class='na'>n/a</span>"
    if math.isinf(v):
        return "&infin;"
    return f"{v:.4g}"


def _pct(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{100 * v:.0f} %"
