"""HTML batch report: self-contained, every section present, figures are real PNGs."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pandas as pd
import pytest
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


JPEG_MAGIC = b"\xff\xd8\xff"


def images_in(html: str, kind: str = "png") -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(rf"src='data:image/{kind};base64,([A-Za-z0-9+/=]+)'", html)]


def test_report_is_self_contained_with_all_sections(tmp_path):
    df, emb = batch()
    m = batch_metrics(df, emb)
    targets = {"class_fraction.cube": TargetSpec(min=0.9), "ecd_nm.mean": TargetSpec(target=130, tolerance=5)}
    v = evaluate_targets(m.flat(), targets, m.uncertainty())
    overlay = np.full((2000, 3000, 3), 90, np.uint8)
    path = write_report(tmp_path / "r.html", m, v, particles=df, embeddings=emb,
                        overlays=[("img_a", overlay, "overlays/img_a.png"), ("img_b", image_png(overlay[:50, :80]))],
                        failures=[{"path": "bad.tif", "reason": "truncated file"}], title="Batch 7")
    html = path.read_text(encoding="utf-8")
    # every picture is embedded; the only reference is the thumbnail's link to its full overlay
    assert not re.search(r"src\s*=\s*['\"](?!data:)", html)
    assert re.findall(r"href\s*=\s*['\"]([^'\"]*)", html) == ["overlays/img_a.png"]
    pngs = images_in(html)
    assert len(pngs) == 3  # PCA, histograms, the small overlay given as PNG
    for png in pngs:
        assert png.startswith(PNG_MAGIC)
    (jpeg,) = images_in(html, "jpeg")  # the big overlay: a JPEG thumbnail, 1280 px on its long side
    assert jpeg.startswith(JPEG_MAGIC) and Image.open(io.BytesIO(jpeg)).size == (1280, 853)
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


def test_report_warnings_lobe_table_and_linked_thumbnails():
    df, emb = batch()
    df["lobe_diameter_nm"] = np.where(df["class"] == "cube", df["ecd_nm"] / np.sqrt(2), df["ecd_nm"])
    m = batch_metrics(df, emb)
    rgb = np.random.default_rng(1).integers(0, 255, (900, 1200, 3), dtype=np.uint8)
    html = render_report(m, None, particles=df, embeddings=emb, overlays=[("a", rgb, "overlays/a&b.png")],
                         warnings=["no image carries a pixel size (x): sizes are in px"])
    assert "<div class='warnbox'>&#9888; no image carries a pixel size (x): sizes are in px</div>" in html
    # the thumbnail (smaller than the cap: kept at its size) sits inside a link to the full overlay
    assert re.search(r"<a href='overlays/a&amp;b.png' target='_blank'><img alt='a' src='data:image/jpeg", html)
    (jpeg,) = images_in(html, "jpeg")
    assert Image.open(io.BytesIO(jpeg)).size == (1200, 900)
    assert "minmax(600px" in html  # shown at >= 600 CSS px, two per row
    # lobe diameters per class, the cube's is its ECD / sqrt(2)
    assert "<h2>Lobe diameters</h2>" in html
    cube = m.lobe_diameter["nm"]["by_class"]["cube"]
    assert cube.mean == pytest.approx(m.size["nm"]["by_class"]["cube"].mean / np.sqrt(2))
    assert f"cube</td><td>{cube.n}</td><td>{cube.mean:.4g}</td>" in html
