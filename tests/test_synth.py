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


# ---------------------------------------------------------------- contrast, halos, mixed sizes, labels
_OLD_CLASSES = ("sphere", "cube", "triangle", "truncated_triangle", "rod", "dumbbell", "trimer", "aggregate")
# sha256 (first 16 hex digits) of pixels + labels + truth CSV (columns of that time), computed on main
# at commit 94767b4, before contrast / halo / populations / bipyramid existed
_GOLDEN = {
    "all_classes_banner": "3e3d15aba8ea3a0d",
    "default": "9734f172bbab205e",
    "cube_rod_touch_u16": "ff00d3db7a472474",
    "lobed_round": "f1568348a42f4282",
}


def _digest(s) -> str:
    import hashlib

    h = hashlib.sha256()
    h.update(s.pixels.tobytes())
    h.update(s.labels.tobytes())
    old = s.truth[[c for c in s.truth.columns if c != "population"]]
    h.update(old.to_csv(index=False, float_format="%.4f").encode())
    return h.hexdigest()[:16]


def test_existing_specs_give_the_same_images_as_before():
    cases = {
        "all_classes_banner": (SynthSpec(class_mix={c: 1.0 for c in _OLD_CLASSES}, banner=True, width_px=320,
                                         height_px=240), 7),
        "default": (SynthSpec(width_px=400, height_px=300), 0),
        "cube_rod_touch_u16": (SynthSpec(class_mix={"cube": 1.0, "rod": 3.0}, touching_fraction=0.4,
                                         overlap_fraction=0.1, n_particles=60, mean_ecd_nm=40.0, width_px=384,
                                         height_px=256, dtype="uint16"), 3),
        "lobed_round": (SynthSpec(class_mix={"dumbbell": 1, "trimer": 1, "aggregate": 1, "triangle": 1},
                                  rounding=0.4, n_particles=30, width_px=320, height_px=240,
                                  dose=float("inf")), 5),
    }
    got = {k: _digest(generate_image(spec, seed)) for k, (spec, seed) in cases.items()}
    assert got == _GOLDEN
    batch = generate_batch(45.0, 0.12, {"sphere": 0.8, "rod": 0.2}, n_images=1, seed=9, width_px=320, height_px=240)
    assert _digest(batch[0]) == "1f381814292defaf"


def test_dark_contrast_draws_the_same_particles_as_transmission():
    base = dict(class_mix={"sphere": 1, "triangle": 1, "dumbbell": 1}, n_particles=40, mean_ecd_nm=80.0,
                touching_fraction=0.3, width_px=512, height_px=384, dose=float("inf"))
    bright = generate_image(SynthSpec(**base), 4)
    dark = generate_image(SynthSpec(contrast="dark", **base), 4)
    assert np.array_equal(bright.labels, dark.labels)
    pd.testing.assert_frame_equal(bright.truth, dark.truth)
    img, lab = dark.pixels.astype(float), dark.labels
    assert img[lab > 0].mean() < img[lab == 0].mean() - 50  # dark particles on a bright substrate
    d = ndi.distance_transform_edt(lab > 0)
    inner = dark.truth[~dark.truth["touches_border"]]
    edge, core = [], []
    for p, r in zip(inner["particle"], inner["ecd_px"] / 2):
        m = lab == p
        edge.append(img[m & (d > 1.5) & (d <= 3)].mean())
        core.append(img[m & (d > 0.6 * r)].mean())
    assert np.mean(edge) > np.mean(core) + 10  # thinner near the edge: lighter, and no bright SE rim
    with pytest.raises(ValueError, match="contrast"):
        SynthSpec(contrast="grey")


@pytest.mark.parametrize("contrast", ["bright", "dark"])
def test_halo_is_a_bright_fringe_just_outside_the_particles(contrast):
    base = dict(class_mix={"cube": 1}, n_particles=30, mean_ecd_nm=80.0, touching_fraction=0.0, overlap_fraction=0.0,
                width_px=512, height_px=384, dose=float("inf"), contrast=contrast)
    plain = generate_image(SynthSpec(**base), 6)
    halo = generate_image(SynthSpec(halo=0.2, halo_width_px=1.5, **base), 6)
    out = ndi.distance_transform_edt(plain.labels == 0)
    ring, far = (out > 1) & (out <= 3), out > 12
    gain = halo.pixels.astype(float) - plain.pixels.astype(float)
    assert gain[ring].mean() > 15 and abs(gain[far].mean()) < 1
    assert np.array_equal(plain.labels, halo.labels)


def test_mixed_size_populations_are_placed_with_their_own_sizes():
    from qcloop.synth import Population

    spec = SynthSpec(class_mix={"triangle": 1}, mean_ecd_nm=600.0, coverage=0.3, touching_fraction=0.3,
                     populations=(Population({"sphere": 1}, 20.0, coverage=0.02),), width_px=1024, height_px=768)
    s = generate_image(spec, 1)
    t = s.truth
    big, dots = t[t["population"] == 0], t[t["population"] == 1]
    assert len(big) >= 2 and len(dots) >= 150
    assert set(big["class"]) == {"triangle"} and set(dots["class"]) == {"sphere"}
    assert big["ecd_px"].mean() / dots["ecd_px"].mean() > 20
    visible = np.bincount(s.labels.ravel(), minlength=len(t) + 1)[1:]
    assert (visible[dots["particle"].to_numpy() - 1] > 0).mean() > 0.95  # dots are drawn, not hidden
    # the large particles are the ones drawn without the extra population
    alone = generate_image(SynthSpec(class_mix={"triangle": 1}, mean_ecd_nm=600.0, coverage=0.3,
                                     touching_fraction=0.3, width_px=1024, height_px=768), 1).truth
    assert np.allclose(alone[["centroid_x_px", "centroid_y_px"]], big[["centroid_x_px", "centroid_y_px"]])
    again = generate_image(spec, 1)
    assert np.array_equal(again.pixels, s.pixels)


def test_bipyramid_is_an_elongated_convex_rhombus():
    from skimage.measure import regionprops

    spec = SynthSpec(class_mix={"bipyramid": 1}, rounding=0.0, rounding_jitter=0.0, mean_ecd_nm=100.0,
                     n_particles=20, touching_fraction=0, overlap_fraction=0, width_px=512, height_px=512,
                     bipyramid_aspect=2.2)
    s = generate_image(spec, 2)
    t = s.truth[~s.truth["touches_border"]]
    assert len(t) >= 8 and t["aspect_ratio"].between(2.2 * 0.85, 2.2 * 1.15).all()
    for p, k in zip(t["particle"], t["aspect_ratio"]):
        r = regionprops((s.labels == p).astype(np.uint8))[0]
        assert r.solidity > 0.95
        # a rhombus's second-moment axes are in the ratio of its diagonals
        assert r.axis_major_length / r.axis_minor_length == pytest.approx(k, rel=0.08)


def test_label_tiff_beside_the_image_holds_the_truth_ids(tmp_path):
    from qcloop.labels_io import is_label_tiff, read_label_tiff

    s = generate_image(SynthSpec(class_mix={"sphere": 1, "cube": 1}, banner=True, **SMALL), 3)
    tif, _ = write_image(tmp_path / "x.tif", s, write_labels=True)
    lab_path = tmp_path / "x_labels.tif"
    assert is_label_tiff(lab_path) and not is_label_tiff(tif)
    back = read_label_tiff(lab_path)
    assert back.labels.dtype == np.uint16 and back.lobe_labels is None
    assert back.labels.shape == (s.analysed_height_px, s.spec.width_px)
    assert np.array_equal(back.labels, s.labels)
    present = set(np.unique(back.labels)) - {0}
    assert present <= set(read_truth(tif)["particle"]) and len(present) > 10


def test_cli_dark_mixed_population_with_labels(tmp_path, capsys):
    from qcloop.cli import main
    from qcloop.labels_io import read_label_tiff

    rc = main(["synth", "--out", str(tmp_path), "--classes", "triangle", "--mean-ecd-nm", "300", "--coverage", "0.3",
               "--population", "sphere+cube:16:0.03", "--contrast", "dark", "--halo", "0.1", "--labels",
               "--width", "320", "--height", "240"])
    assert rc == 0
    truth = read_truth(tmp_path / "synth_0_000.tif")
    assert set(truth["class"][truth["population"] == 1]) == {"sphere", "cube"}
    img = tifffile.imread(tmp_path / "synth_0_000.tif")
    lab = read_label_tiff(tmp_path / "synth_0_000_labels.tif").labels
    assert img[lab > 0].mean() < img[lab == 0].mean()
    for bad in ("sphere:20", "sphere:x:0.1", "blob:20:0.1"):
        assert main(["synth", "--out", str(tmp_path), "--population", bad]) == 2
    assert "--population" in capsys.readouterr().err
