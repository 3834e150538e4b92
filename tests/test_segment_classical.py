"""Classical segmentation on small synthetic SEM-like images with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage.draw import disk

from qcloop.config import ClassicalConfig
from qcloop.records import PixelSize, SemImage
from qcloop.segment.classical import (
    ClassicalSegmenter,
    detect_candidates,
    estimate_diameter_px,
    grey_levels,
    segment_classical,
)

BG, PARTICLE = 0.35, 0.8


def _render(shape, disks, *, noise=0.03, seed=0, bg=BG, fg=PARTICLE, blur=1.0):
    """Grey image in [0, 1] with bright disks ((row, col, radius), ...), blurred and noisy."""
    from scipy import ndimage as ndi

    img = np.full(shape, bg, np.float32)
    for r, c, rad in disks:
        img[disk((r, c), rad, shape=shape)] = fg
    img = ndi.gaussian_filter(img, blur)
    img += np.random.default_rng(seed).normal(0, noise, shape).astype(np.float32)
    return np.clip(img, 0, 1)


def _sem(img: np.ndarray, analysed: int | None = None) -> SemImage:
    pixels = (img * 255).round().astype(np.uint8)
    return SemImage(Path("synthetic.tif"), pixels, analysed or pixels.shape[0], PixelSize(2.0, "config"))


def _centres(n_side: int, spacing: int, radius: int, offset: int = 30):
    return [(offset + i * spacing, offset + j * spacing, radius) for i in range(n_side) for j in range(n_side)]


def test_separate_disks_found_with_their_size():
    disks = _centres(4, 50, 15)
    img = _render((220, 220), disks)
    res = segment_classical(img, ClassicalConfig())
    assert res.labels.dtype == np.int32 and res.labels.shape == img.shape
    assert res.labels.max() == len(disks)
    areas = np.bincount(res.labels.ravel())[1:]
    ecd = np.sqrt(4 * areas / np.pi)
    assert ecd.mean() == pytest.approx(30.0, rel=0.05)
    # the automatic size estimate is close to the true diameter
    assert res.expected_diameter_px == pytest.approx(30.0, rel=0.15)


def test_estimate_diameter_scales_with_particles():
    small = _render((200, 200), _centres(4, 40, 8))
    large = _render((400, 400), _centres(4, 90, 30), seed=1)
    assert estimate_diameter_px(small) == pytest.approx(16.0, rel=0.2)
    assert estimate_diameter_px(large) == pytest.approx(60.0, rel=0.2)


def test_touching_disks_are_split():
    # two disks touching at a point and a row of three touching ones
    disks = [(60, 40, 20), (60, 80, 20), (150, 40, 18), (150, 76, 18), (150, 112, 18)]
    img = _render((210, 160), disks, noise=0.02)
    labels = segment_classical(img, ClassicalConfig()).labels
    hits = {int(labels[r, c]) for r, c, _ in disks}
    assert 0 not in hits and len(hits) == len(disks)


def test_split_touching_off_keeps_clusters_whole():
    disks = [(60, 40, 20), (60, 80, 20)]
    img = _render((120, 130), disks, noise=0.02)
    labels = segment_classical(img, ClassicalConfig(split_touching=False)).labels
    assert labels[60, 40] == labels[60, 80] != 0


def test_dark_particles_option():
    disks = _centres(3, 50, 14)
    img = 1.0 - _render((170, 170), disks)
    labels = segment_classical(img, ClassicalConfig(dark_particles=True)).labels
    assert labels.max() == len(disks)


@pytest.mark.parametrize("method", ["otsu", "li", "triangle", "local"])
def test_other_threshold_methods_find_the_disks(method):
    disks = _centres(3, 50, 14)
    img = _render((170, 170), disks)
    labels = segment_classical(img, ClassicalConfig(threshold=method)).labels
    hits = {int(labels[r, c]) for r, c, _ in disks}
    assert 0 not in hits and len(hits) == len(disks)


def test_shadows_do_not_fool_the_threshold():
    """Dark shadows around particles make a third grey class; the particle threshold must
    still lie between substrate and particles, not between shadows and substrate."""
    from scipy import ndimage as ndi

    shape = (240, 240)
    disks = _centres(4, 55, 16, offset=35)
    img = np.full(shape, 0.45, np.float32)
    for r, c, rad in disks:
        img[disk((r, c), rad + 9, shape=shape)] = 0.08  # wide dark halo
    for r, c, rad in disks:
        img[disk((r, c), rad, shape=shape)] = 0.75
    img = np.clip(ndi.gaussian_filter(img, 1.0) + np.random.default_rng(3).normal(0, 0.02, shape), 0, 1)
    lv = grey_levels(img.astype(np.float32))
    assert lv.classes == 3
    assert 0.45 < lv.separation < 0.75
    assert lv.background == pytest.approx(0.45, abs=0.05)
    labels = segment_classical(img, ClassicalConfig()).labels
    assert labels.max() == len(disks)
    ecd = np.sqrt(4 * np.bincount(labels.ravel())[1:] / np.pi)
    assert ecd.mean() == pytest.approx(32.0, rel=0.08)


def test_flat_image_gives_no_regions():
    flat = np.full((64, 64), 0.5, np.float32)
    res = segment_classical(flat, ClassicalConfig())
    assert res.labels.max() == 0 and res.labels.shape == (64, 64)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="2-D"):
        segment_classical(np.zeros((4, 4, 3), np.float32), ClassicalConfig())


def test_segmenter_covers_the_analysed_region_only():
    img = _render((200, 200), _centres(3, 50, 14))
    img[170:] = 1.0  # a bright "banner" below the analysed region
    image = _sem(img, analysed=160)
    seg = ClassicalSegmenter(ClassicalConfig())(image)
    assert seg.method == "classical"
    assert seg.labels.shape == (160, 200)
    assert seg.n_regions == 9


def test_detect_candidates_table():
    disks = _centres(3, 50, 14)
    image = _sem(_render((170, 170), disks))
    table = detect_candidates(image, ClassicalConfig())
    assert list(table.columns) == ["x", "y", "bbox_r0", "bbox_c0", "bbox_r1", "bbox_c1", "label"]
    assert len(table) == len(disks)
    found = np.array(sorted(zip(table.y.round(), table.x.round())))
    expected = np.array(sorted((r, c) for r, c, _ in disks), float)
    assert np.abs(found - expected).max() < 1.0
    assert (table.bbox_r1 > table.bbox_r0).all() and (table.bbox_c1 > table.bbox_c0).all()
    empty = detect_candidates(_sem(np.full((50, 50), 0.4, np.float32)), ClassicalConfig())
    assert list(empty.columns) == list(table.columns) and len(empty) == 0
