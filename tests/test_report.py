"""HTML batch report: self-contained, every section present, figures are real PNGs."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pandas as pd
from PIL import Image

from qcloop.batch import batch_metrics, embedding_view
from qcloop.config import TargetSpec
from qcloop.report import (
    class_colors,
    figure_png,
    image_png,
    pca_figure,
    render_report,
    size_histogram_figure,
    write_report,
)
from qcloop.targets import evaluate_targets

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def batch(n=150, seed=0, classes=("cube", "triangle", "<rod&>")):
    rng = np.random.default_rng(seed)
    cls = rng.choice(list(classes), n)
    df = pd.DataFrame({
        "image": rng.choice(["img_a", "img_b"], n),
        "particle_id": np.arange(1, n + 1),
        "ecd_nm": rng.normal(130, 6, n),
        "ecd_px": rng.normal(29, 1.3, n),
        "orientation_deg": rng.uniform(-90, 90, n),
        "aspect_ratio": np.where(cls == classes[-1], 3.0, 1.05),
        "touches_border": rng.random(n) < 0.1,
        "class": cls,
    })
    emb = rng.normal(size=(n, 6)) + (cls == "cube")[:, None] * 3.0
    return df, emb


def images_in(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)]


def test_report_is_self_contained_with_all_sections(tmp_path):
    df, emb = batch()
    m = batch_metrics(df, emb)
    targets = {"class_fraction.cube": TargetSpec(min=0.9), "ecd_nm.mean": TargetSpec(target=130, tolerance=5)}
    v = evaluate_targets(m.flat(), targets, m.uncertainty())
    overlay = np.full((2000, 3000, 3), 90, np.uint8)
    path = write_report(tmp_path / "r.html", m, v, particles=df, embeddings=emb,
                        overlays=[("img_a", overlay), ("img_b", image_png(overlay[:50, :80]))],
                        failures=[{"path": "bad.tif", "reason": "truncated file"}], title="Batch 7")
    html = path.read_text(encoding="utf-8")
    # no external resource of any kind
    assert not re.search(r"(src|href)\s*=\s*['\"](?!data:)", html)
    pngs = images_in(html)
    assert len(pngs) == 4  # PCA, histograms, two overlays
    for png in pngs:
        assert png.startswith(PNG_MAGIC)
    sizes = [Image.open(io.BytesIO(p)).size for p in pngs]
    assert (1024, 683) in sizes  # big overlay downscaled to 1024 px on its long side
    for section in ("Checks", "Classes and sizes", "Class separation", "Images that could not be analysed"):
        assert section in html
    # the failed check is shown as such, the passing one as pass
    assert "FAIL (1 of 2 checks)" in html
    assert html.count("<td class='fail'>FAIL</td>") == 1 and html.count("<td class='pass'>pass</td>") == 1
    # class names are escaped, not interpreted
    assert "&lt;rod&amp;&gt;" in html and "<rod&>" not in html
    assert "truncated file" in html
    # fractions table holds every class with its count
    for c, k in m.class_count.items():
        assert re.search(rf"{re.escape(c.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;'))}"
                         rf"</td><td>{k}</td>", html)


def test_report_without_targets_or_embeddings():
    df, _ = batch()
    df = df.drop(columns="class")
    m = batch_metrics(df, None)
    html = render_report(m, None, particles=df, embeddings=None)
    assert "NO TARGETS" in html
    assert len(images_in(html)) == 2  # PCA panel says "no embeddings", histogram still drawn


def test_figures_render(tmp_path):
    df, emb = batch(n=300)
    colors = class_colors(df["class"])
    view = embedding_view(df, emb)
    pca = figure_png(pca_figure(view, colors))
    hist = figure_png(size_histogram_figure(df, colors=colors))
    (tmp_path / "pca.png").write_bytes(pca)
    for png in (pca, hist):
        im = Image.open(io.BytesIO(png))
        assert im.size[0] >= 500
        # not a blank canvas: many distinct colours drawn
        assert len(set(np.asarray(im.convert("RGB")).reshape(-1, 3)[::7].view("V3").ravel().tolist())) > 20
    # px fallback when no pixel size is known
    df_px = df.assign(ecd_nm=np.nan)
    assert figure_png(size_histogram_figure(df_px, unit="px")).startswith(PNG_MAGIC)
    m = batch_metrics(df_px, emb)
    assert "sizes are in pixels" in render_report(m, None, particles=df_px, embeddings=emb)


def test_class_colors_distinct_and_unknown_grey():
    cols = class_colors(["sphere", "truncated_triangle", "rod", "dumbbell", "cube", "unknown"])
    named = [v for k, v in cols.items() if k != "unknown"]
    assert len(set(named)) == len(named)
    assert cols["unknown"] == "#aaaaaa"
