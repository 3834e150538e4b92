"""Synthetic SEM generator: determinism, ground truth, look, metadata, CLI."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import ndimage as ndi

from qcloop.synth import (CLASSES, TRUTH_COLUMNS, SynthSpec, generate_batch, generate_image, generate_images,
                          read_truth, write_image)

SMALL = dict(width_px=320, height_px=240, mean_ecd_nm=60.0, pixel_size_nm=2.0)


def test_same_seed_identical_bytes_different_seed_differs(tmp_path):
    spec = SynthSpec(class_mix={c: 1.0 for c in CLASSES}, banner=True, **SMALL)
    a, b, c = generate_image(spec, 7), generate_image(spec, 7), generate_image(spec, 8)
    files = {}
    for key, synth in (("a", a), ("b", b), ("c", c)):
        tif, csv = write_image(tmp_path / key / "x.tif", synth)  # same name: the name is in the metadata
        files[key] = (tif.read_bytes(), csv.read_bytes())
    assert files["a"] == files["b"]
    assert files["a"][0] != files["c"][0] and files["a"][1] != files["c"][1]
    assert not np.array_equal(a.pixels, c.pixels)


def test_truth_matches_labels_and_size_distribution():
    spec = SynthSpec(class_mix={"sphere": 1.0}, mean_ecd_nm=50.0, size_cv=0.1, pixel_size_nm=2.5,
                     n_particles=400, width_px=1024, height_px=1024, touching_fraction=0.0, overlap_fraction=0.0)
    s = generate_image(spec, 1)
    t = s.truth
    assert list(t.columns) == list(TRUTH_COLUMNS)
    assert len(t) >= 380  # nearly all placed on a roomy frame
    assert s.labels.max() == len(t)
    assert s.labels.dtype == np.int32 and s.labels.shape == (1024, 1024)
    # requested size distribution (log-normal with this mean and CV)
    assert t["ecd_nm"].mean() == pytest.approx(50.0, rel=0.03)
    assert t["ecd_nm"].std() / t["ecd_nm"].mean() == pytest.approx(0.10, abs=0.02)
    # whole, unoccluded particles: pixel area of the label equals the truth area (sub-pixel AA)
    inner = t[~t["touches_border"] & (t["n_contacts"] == 0)]
    areas = ndi.sum_labels(np.ones_like(s.labels), s.labels, inner["particle"].to_numpy())
    rel = areas / inner["area_px"].to_numpy() - 1
    assert np.abs(rel).mean() < 0.03
    # visible centroid = shape centroid for whole discs
    d = np.hypot(inner["visible_centroid_x_px"] - inner["centroid_x_px"],
                 inner["visible_centroid_y_px"] - inner["centroid_y_px"])
    assert d.max() < 0.5


def test_class_mix_touching_and_overlap_fractions():
    spec = SynthSpec(class_mix={"cube": 1.0, "rod": 3.0}, touching_fraction=0.4, overlap_fraction=0.1,
                     n_particles=300, mean_ecd_nm=40.0, pixel_size_nm=2.0)
    t = generate_image(spec, 3).truth
    frac_rod = (t["class"] == "rod").mean()
    assert 0.65 < frac_rod < 0.85
    place = t["placement"].value_counts(normalize=True)
    assert 0.28 < place.get("touching", 0) < 0.52
    assert 0.04 < place.get("overlapping", 0) < 0.18
    # touching/overlapping particles really are in contact with another one
    placed_in_contact = t[t["placement"] != "free"]
    assert (placed_in_contact["n_contacts"] > 0).mean() > 0.97
    # overlaps hide parts of particles; without overlaps every whole particle is fully visible
    inner = t[~t["touches_border"]]
    assert (inner["visible_fraction"] < 0.95).sum() >= 5
    t0 = generate_image(SynthSpec(class_mix={"cube": 1.0, "rod": 3.0}, touching_fraction=0.4, overlap_fraction=0.0,
                                  n_particles=300, mean_ecd_nm=40.0, pixel_size_nm=2.0), 3).truth
    assert (t0["visible_fraction"][~t0["touches_border"]] > 0.99).all()
    assert set(t["n_lobes"][t["class"] == "rod"]) == {1}
    assert t["aspect_ratio"][t["class"] == "rod"].between(3.5 * 0.85, 3.5 * 1.15).all()


def test_lobed_classes_have_their_lobes():
    spec = SynthSpec(class_mix={"dumbbell": 1, "trimer": 1, "aggregate": 1}, n_particles=60, **SMALL)
    t = generate_image(spec, 5).truth
    assert set(t["n_lobes"][t["class"] == "dumbbell"]) == {2}
    assert set(t["n_lobes"][t["class"] == "trimer"]) == {3}
    agg = t["n_lobes"][t["class"] == "aggregate"]
    assert len(agg) and agg.between(4, 8).all()


def _circularity(mask: np.ndarray) -> float:
    from skimage import measure

    p = measure.regionprops(mask.astype(np.uint8))[0]
    return 4 * math.pi * p.area / p.perimeter_crofton ** 2


@pytest.mark.parametrize("cls, sharp_circ", [("cube", 0.785), ("triangle", 0.605)])  # ideal polygons
def test_rounding_goes_from_sharp_polygon_to_round_blob(cls, sharp_circ):
    """rounding=0: the polygon's circularity; rounding=1: a disc. Monotonic in between."""
    medians = []
    for r in (0.0, 0.25, 0.5, 1.0):
        spec = SynthSpec(class_mix={cls: 1}, rounding=r, rounding_jitter=0.0, mean_ecd_nm=100.0,
                         pixel_size_nm=2.0, n_particles=25, touching_fraction=0, overlap_fraction=0,
                         width_px=512, height_px=512)
        s = generate_image(spec, 11)
        t = s.truth[~s.truth["touches_border"]]
        assert (t["rounding"] == r).all()
        medians.append(np.median([_circularity(s.labels == p) for p in t["particle"]]))
    assert np.all(np.diff(medians) > 0.01), medians
    # (pixelated outlines read a bit rounder than the ideal polygon)
    assert sharp_circ - 0.02 < medians[0] < sharp_circ + 0.06
    assert medians[-1] > 0.95


def test_looks_like_an_sem_image():
    """Bright particles on a darker substrate, brighter rims (SE edge effect), shot noise."""
    base = dict(class_mix={"sphere": 1}, n_particles=40, mean_ecd_nm=80.0, pixel_size_nm=2.0,
                touching_fraction=0.0, overlap_fraction=0.0, width_px=512, height_px=384)
    clean = generate_image(SynthSpec(dose=float("inf"), **base), 2)
    noisy = generate_image(SynthSpec(**base), 2)
    img = clean.pixels.astype(float)
    lab = clean.labels
    inside, outside = img[lab > 0].mean(), img[lab == 0].mean()
    assert inside > outside + 50
    t = clean.truth[~clean.truth["touches_border"]]
    d = ndi.distance_transform_edt(lab > 0)
    rims, cores = [], []
    for p, r in zip(t["particle"], t["ecd_px"] / 2):
        m = lab == p
        rims.append(img[m & (d > 1.5) & (d <= 4)].mean())
        cores.append(img[m & (d > 0.6 * r)].mean())
    assert np.mean(rims) > np.mean(cores) + 10
    # shot noise: the substrate of the noisy image is much rougher than the clean one
    bg = (lab == 0) & (ndi.distance_transform_edt(lab == 0) > 6)
    hp_clean = img - ndi.uniform_filter(img, 5)
    noisy_img = noisy.pixels.astype(float)
    hp_noisy = noisy_img - ndi.uniform_filter(noisy_img, 5)
    assert hp_noisy[bg].std() > 3 * hp_clean[bg].std()


def test_banner_and_zeiss_metadata_round_trip(tmp_path):
    from qcloop.config import ImagingConfig
    from qcloop.imaging import load_image

    spec = SynthSpec(class_mix={"sphere": 1, "cube": 1}, banner=True, pixel_size_nm=3.25)
    s = generate_image(spec, 4)
    assert s.analysed_height_px == 768 - 77
    assert s.labels.shape == (691, 1024)
    assert (s.pixels[691:] < 40).mean() > 0.6  # mostly black band
    assert (s.pixels[691:] > 200).any()  # with white text
    tif, csv = write_image(tmp_path / "x.tif", s)
    with tifffile.TiffFile(tif) as t:
        md = t.sem_metadata
        assert md[""][3] == pytest.approx(3.25e-9)
        assert md["ap_image_pixel_size"][1:] == (3.25, "nm")
        assert np.array_equal(t.asarray(), s.pixels)
    img = load_image(tif, ImagingConfig())
    assert img.pixel_size.source == "zeiss"
    assert img.pixel_size_nm == pytest.approx(3.25)
    assert img.analysed_height_px == 691
    truth = read_truth(tif)
    pd.testing.assert_frame_equal(truth[["particle", "class"]], s.truth[["particle", "class"]])
    assert np.allclose(truth["ecd_nm"], s.truth["ecd_nm"], atol=1e-3)


def test_uint16_and_batch_api():
    spec = SynthSpec(dtype="uint16", **SMALL)
    s = generate_image(spec, 0)
    assert s.pixels.dtype == np.uint16 and s.pixels.max() > 20000
    imgs = generate_batch(mean_ecd_nm=45.0, size_cv=0.12, class_fractions={"sphere": 0.8, "rod": 0.2},
                          n_images=2, seed=9, width_px=512, height_px=384, rounding=0.3)
    assert len(imgs) == 2 and not np.array_equal(imgs[0].pixels, imgs[1].pixels)
    assert imgs[0].spec.pixel_size_nm == pytest.approx(45.0 / 32, rel=0.01)
    t = pd.concat([i.truth for i in imgs])
    assert t["ecd_nm"].mean() == pytest.approx(45.0, rel=0.08)
    # the image sequence is reproducible
    again = list(generate_images(imgs[0].spec, 2, 9))
    assert np.array_equal(again[1].pixels, imgs[1].pixels)


@pytest.mark.parametrize("kwargs, match", [
    (dict(class_mix={"blob": 1}), "unknown particle class"),
    (dict(class_mix={"sphere": 0}), "positive sum"),
    (dict(size_cv=-0.1), "size_cv"),
    (dict(rounding=1.5), "rounding"),
    (dict(touching_fraction=0.8, overlap_fraction=0.5), "must not exceed"),
    (dict(dtype="float32"), "dtype"),
])
def test_bad_spec_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SynthSpec(**kwargs)


def test_cli_writes_images_and_truth(tmp_path, capsys):
    from qcloop.cli import main

    rc = main(["synth", "--out", str(tmp_path), "--n-images", "2", "--seed", "5", "--classes", "sphere:3",
               "rod", "--width", "256", "--height", "192", "--pixel-size-nm", "1.5", "--banner"])
    assert rc == 0
    tifs = sorted(tmp_path.glob("*.tif"))
    assert [p.name for p in tifs] == ["synth_5_000.tif", "synth_5_001.tif"]
    truth = read_truth(tifs[0])
    assert set(truth["class"]) <= {"sphere", "rod"} and len(truth) > 0
    with tifffile.TiffFile(tifs[0]) as t:
        assert t.sem_metadata["ap_image_pixel_size"][1] == 1.5
    assert main(["synth", "--out", str(tmp_path), "--classes", "blob"]) == 2
    assert "unknown particle class" in capsys.readouterr().err


def test_match_centroids_is_one_to_one_within_the_limit():
    from qcloop.synth import match_centroids

    truth = np.array([[10, 10], [50, 50], [90, 90], [np.nan, np.nan]], float)
    det = np.array([[11, 10], [52, 49], [49, 51], [200, 200], [89, 97]], float)
    pairs = match_centroids(det, truth, max_dist=np.array([3.0, 3.0, 3.0, 3.0]))
    # (2 is nearer to truth 1 than detection 1 is; detection 4 is too far from truth 2)
    assert sorted(pairs) == [(0, 0), (2, 1)]
    assert match_centroids(det, truth, max_dist=10.0) == [(0, 0), (2, 1), (4, 2)]
    assert match_centroids(np.zeros((0, 2)), truth, 5.0) == []
