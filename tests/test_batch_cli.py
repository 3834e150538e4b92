"""``qcloop batch`` end to end on real TIFF files (synthetic images with Zeiss metadata)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from qcloop.cli import main
from qcloop.synth import SynthSpec, generate_image, write_image

SPEC = SynthSpec(width_px=320, height_px=256, pixel_size_nm=2.0, mean_ecd_nm=50.0, size_cv=0.06,
                 class_mix={"cube": 0.5, "triangle": 0.5}, rounding=0.05, coverage=0.18,
                 touching_fraction=0.0, overlap_fraction=0.0, banner=True, banner_rows=24)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    paths = []
    for seed in (1, 2):
        tif, _ = write_image(d / f"B7_{seed:02d}.tif", generate_image(SPEC, seed))
        paths.append(tif)
    return d, paths


def read_outputs(out):
    doc = json.loads((out / "batch.json").read_text())
    particles = pd.read_csv(out / "particles.csv")
    html = (out / "report.html").read_text(encoding="utf-8")
    return doc, particles, html


def test_batch_without_model_bad_file_and_targets(images, tmp_path, capsys):
    d, paths = images
    bad = tmp_path / "B7_bad.tif"
    bad.write_bytes(paths[0].read_bytes()[:3000])  # truncated TIFF
    targets = tmp_path / "targets.yaml"
    targets.write_text("targets:\n  ecd_nm.mean: {target: 50, tolerance: 5}\n"
                       "  class_fraction.particle: {min: 0.99}\n  silhouette: {min: 0.5}\n")
    out = tmp_path / "out"
    rc = main(["batch", str(paths[0]), str(paths[1]), str(bad), "--out", str(out), "--targets", str(targets)])
    assert rc == 1  # one image failed
    captured = capsys.readouterr()
    assert "B7_bad.tif" in captured.err
    doc, particles, html = read_outputs(out)
    assert doc["schema"] == "qcloop.batch/1"
    assert doc["images"] == ["B7_01", "B7_02"]
    assert [f["image"] for f in doc["failed"]] == ["B7_bad"]
    # every particle is of the one class "particle"; measurements carried through
    assert set(particles["class"]) == {"particle"}
    for col in ("image", "particle_id", "ecd_nm", "touches_border", "class_probability"):
        assert col in particles.columns
    inner = particles[~particles["touches_border"].astype(bool)]
    assert doc["flat"]["n_particles"] == len(inner) > 10
    assert doc["flat"]["ecd_nm.mean"] == pytest.approx(inner["ecd_nm"].mean())
    assert doc["flat"]["ecd_nm.mean"] == pytest.approx(50.0, rel=0.15)  # synthetic truth: 50 nm
    assert doc["uncertainty"]["ecd_nm.mean"] > 0
    # the verdict: sizes and fraction pass, silhouette is undefined with one class -> fails
    checks = {c["metric"]: c for c in doc["verdict"]["checks"]}
    assert checks["ecd_nm.mean"]["passed"] and checks["class_fraction.particle"]["passed"]
    assert not checks["silhouette"]["passed"] and doc["verdict"]["passed"] is False
    assert doc["flat"]["silhouette"] is None  # NaN written as null
    # the report embeds PCA and histograms (PNG) and two overlay thumbnails (JPEG), each linking
    # to its full-size overlay file; it lists the bad file
    assert html.count("data:image/png;base64,") == 2 and html.count("data:image/jpeg;base64,") == 2
    links = re.findall(r"<a href='([^']+)'", html)
    assert links == ["overlays/B7_01.png", "overlays/B7_02.png"]
    for link in links:
        assert Image.open(out / link).size == (SPEC.width_px, SPEC.height_px)  # full size
    assert "B7_bad.tif" in html and "FAIL" in html
    assert doc["warnings"] == [] and doc["images_without_pixel_size"] == []  # Zeiss metadata
    # lobe diameters are batch statistics (one-lobe cubes: the lobe diameter is the ECD)
    assert doc["flat"]["lobe_diameter_nm.particle.mean"] == pytest.approx(doc["flat"]["ecd_nm.particle.mean"], rel=0.05)
    assert doc["metrics"]["lobe_diameter"]["nm"]["by_class"]["particle"]["n"] == len(inner)
    assert "<h2>Lobe diameters</h2>" in html


def test_batch_config_targets_and_verdict_exit(images, tmp_path):
    d, _ = images
    cfg = tmp_path / "qcloop.yaml"
    cfg.write_text("targets:\n  ecd_nm.mean: {max: 10}\n")
    out = tmp_path / "out"
    assert main(["batch", str(d), "--out", str(out), "--config", str(cfg), "--max-overlays", "0"]) == 0
    doc, _, html = read_outputs(out)
    assert doc["verdict"]["failed"] == ["ecd_nm.mean"]
    assert "data:image/png" in html and html.count("data:image/png;base64,") == 2
    assert main(["batch", str(d), "--out", str(out), "--config", str(cfg), "--max-overlays", "0",
                 "--fail-on-verdict"]) == 3


def test_target_typo_fails_before_analysis(images, tmp_path, capsys):
    d, _ = images
    t = tmp_path / "t.yaml"
    t.write_text("class_fractoin.cube: {min: 0.9}\n")
    out = tmp_path / "out"
    assert main(["batch", str(d), "--out", str(out), "--targets", str(t)]) == 2
    err = capsys.readouterr().err
    assert "targets.class_fractoin.cube: unknown metric" in err and "did you mean 'class_fraction.cube'" in err
    assert not out.exists()


def test_missing_model_file(images, tmp_path, capsys):
    d, _ = images
    assert main(["batch", str(d), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "nope.npz")]) == 2
    assert "model file not found" in capsys.readouterr().err


def train_cube_triangle_model(path):
    """Classifier trained on ground-truth masks of two other synthetic images (not the batch's)."""
    from qcloop.classify import Classifier
    from qcloop.embed.morphology import MorphologyEmbedder
    from qcloop.records import ParticleMasks

    emb, X, y = MorphologyEmbedder(), [], []
    for seed in (101, 102):
        s = generate_image(SPEC, seed)
        n = int(s.labels.max())
        masks = ParticleMasks(labels=s.labels, lobe_labels=s.labels, lobe_parent=np.arange(n + 1, dtype=np.int32),
                              touches_border=np.r_[False, s.truth["touches_border"].to_numpy(bool)])
        t = s.truth[~s.truth["touches_border"]]
        X.append(emb(s.to_sem_image(), masks, t.rename(columns={"particle": "particle_id"})))
        y += t["class"].tolist()
    return Classifier.fit(np.vstack(X), y, kind="logreg", embedder_spec=emb.spec).save(path)


def test_batch_with_model(images, tmp_path):
    d, _ = images
    model = train_cube_triangle_model(tmp_path / "model.json")
    out = tmp_path / "out"
    assert main(["batch", str(d), "--out", str(out), "--model", str(model)]) == 0
    doc, particles, html = read_outputs(out)
    assert doc["model"].endswith("model.json")
    assert set(particles["class"]) <= {"cube", "triangle", "unknown"}
    assert particles["class_probability"].between(0, 1).all()
    frac = doc["metrics"]["class_fraction"]
    # the synthetic batch is half cubes, half triangles
    assert 0.25 < frac["cube"] < 0.75 and 0.25 < frac["triangle"] < 0.75, frac
    assert doc["flat"]["silhouette"] is not None and doc["flat"]["silhouette"] > 0
    f = doc["flat"]
    assert f["inter_class_variance"] + f["intra_class_variance"] == pytest.approx(f["total_variance"], rel=1e-9)
    assert "ecd_nm.cube.mean" in f and math.isfinite(f["ecd_nm.cube.mean"])
    assert "cube" in html and "triangle" in html


@pytest.mark.slow  # spawns two worker processes (~10 s on a busy 2-core machine)
def test_parallel_jobs_give_the_same_result(images, tmp_path):
    d, paths = images
    bad = tmp_path / "B7_zz_bad.png"
    bad.write_bytes(b"not an image")
    outs = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"j{jobs}"
        assert main(["batch", str(paths[0]), str(bad), str(paths[1]), "--out", str(out), "--jobs", jobs,
                     "--max-overlays", "1"]) == 1
        outs[jobs] = read_outputs(out)
    (doc1, p1, html1), (doc2, p2, html2) = outs["1"], outs["2"]
    pd.testing.assert_frame_equal(p1, p2)
    assert doc1["flat"] == doc2["flat"] and doc1["images"] == doc2["images"] == ["B7_01", "B7_02"]
    assert doc1["failed"] == doc2["failed"] and doc2["failed"][0]["image"] == "B7_zz_bad"
    assert html1.count("data:image/png;base64,") == html2.count("data:image/png;base64,") == 2
    assert html1.count("data:image/jpeg;base64,") == html2.count("data:image/jpeg;base64,") == 1
    assert (tmp_path / "j2" / "overlays" / "B7_01.png").is_file()  # written by the worker process


@pytest.fixture(scope="module")
def png_images(tmp_path_factory):
    """The same synthetic images as PNG: no pixel size in the file."""
    d = tmp_path_factory.mktemp("png")
    for seed in (1, 2):
        Image.fromarray(generate_image(SPEC, seed).pixels).save(d / f"B8_{seed:02d}.png")
    return d


def test_batch_without_pixel_size_warns_everywhere(png_images, tmp_path, capsys):
    out = tmp_path / "px"
    assert main(["batch", str(png_images), "--out", str(out), "--max-overlays", "1"]) == 0
    err = capsys.readouterr().err
    doc, particles, html = read_outputs(out)
    assert doc["images_without_pixel_size"] == ["B8_01", "B8_02"]
    (warning,) = doc["warnings"]
    assert "no image carries a pixel size" in warning and "--pixel-size-nm" in warning
    assert f"qcloop: warning: {warning}" in err
    assert "class='warnbox'" in html and "no image carries a pixel size" in html
    assert doc["flat"]["ecd_nm.mean"] is None and doc["flat"]["ecd_px.mean"] > 0


def test_pixel_size_flag_gives_nm(png_images, tmp_path, capsys):
    out = tmp_path / "nm"
    assert main(["batch", str(png_images), "--out", str(out), "--max-overlays", "0",
                 "--pixel-size-nm", str(SPEC.pixel_size_nm)]) == 0
    assert "warning" not in capsys.readouterr().err
    doc, particles, _ = read_outputs(out)
    assert doc["warnings"] == [] and doc["images_without_pixel_size"] == []
    assert doc["flat"]["ecd_nm.mean"] == pytest.approx(50.0, rel=0.15)  # synthetic truth: 50 nm
    assert doc["flat"]["ecd_nm.mean"] == pytest.approx(doc["flat"]["ecd_px.mean"] * SPEC.pixel_size_nm)
    # analyze and crops take the flag too
    a = tmp_path / "analyze"
    assert main(["analyze", str(png_images), "--out", str(a)]) == 0
    assert "qcloop: warning: no image carries a pixel size" in capsys.readouterr().err
    assert main(["analyze", str(png_images), "--out", str(a), "--pixel-size-nm", "2"]) == 0
    assert "warning" not in capsys.readouterr().err
    images = pd.read_csv(a / "images.csv")
    assert (images["pixel_size_nm"] == 2.0).all() and (images["pixel_size_source"] == "config").all()
    c = tmp_path / "crops"
    assert main(["crops", "export", str(png_images), "--out", str(c), "--pixel-size-nm", "2"]) == 0
    assert json.loads((c / "crops.json").read_text())["settings"]["imaging"]["pixel_size_nm"] == 2.0


@pytest.mark.parametrize("value", ["0", "-1", "nan", "abc"])
def test_pixel_size_flag_rejects_nonsense(png_images, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(png_images), "--out", str(tmp_path / "o"), "--pixel-size-nm", value])
    assert exc.value.code == 2 and "--pixel-size-nm" in capsys.readouterr().err
