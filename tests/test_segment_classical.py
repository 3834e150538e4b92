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


def _render_shaded(shape, disks, *, bg=BG, noise=0.02, seed=0, blur=1.0, gap=0.7):
    """Spheres ((row, col, radius, brightness), ...) drawn ``gap`` px smaller than their radius,
    so touching ones meet along a dark contact line about as narrow as the blur (as in SEM
    images of packed spheres)."""
    from scipy import ndimage as ndi

    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    img = np.full(shape, bg, np.float32)
    for r, c, rad, level in disks:
        img = np.where(np.hypot(yy - r, xx - c) < rad - gap, np.maximum(img, level), img)
    img = ndi.gaussian_filter(img, blur)
    img += np.random.default_rng(seed).normal(0, noise, shape).astype(np.float32)
    return np.clip(img, 0, 1)


def _hexagonal(n_rows, n_cols, radius, offset=30.0):
    """Centres of a hexagonal packing of touching discs."""
    return [(offset + i * radius * np.sqrt(3.0), offset + j * 2.0 * radius + (i % 2) * radius)
            for i in range(n_rows) for j in range(n_cols)]


def _ecd_at(labels, centres):
    areas = np.bincount(labels.ravel())
    ids = [int(labels[int(round(r)), int(round(c))]) for r, c in centres]
    return ids, np.sqrt(4.0 * areas[ids] / np.pi)


def test_row_of_touching_equal_discs_is_cut_into_equal_parts():
    centres = [(40.0, 30.0 + 30.0 * k) for k in range(6)]
    img = _render_shaded((80, 240), [(r, c, 15.0, 0.8) for r, c in centres])
    labels = segment_classical(img, ClassicalConfig()).labels
    ids, ecd = _ecd_at(labels, centres)
    assert 0 not in ids and len(set(ids)) == len(centres)
    # every cut on its contact line: the parts are as alike as the discs
    assert ecd.std() / ecd.mean() < 0.03
    assert ecd.mean() == pytest.approx(30.0, rel=0.08)


def test_hexagonal_packing_same_size_inside_and_at_the_edge():
    """Packed and free-standing discs get the same outline placement: the ECD of the inner
    discs (six neighbours) matches that of the edge discs."""
    centres = _hexagonal(5, 6, 14.0)
    img = _render_shaded((200, 230), [(r, c, 14.0, 0.8) for r, c in centres], seed=4)
    labels = segment_classical(img, ClassicalConfig()).labels
    ids, ecd = _ecd_at(labels, centres)
    assert 0 not in ids and len(set(ids)) == len(centres)
    assert ecd.std() < 0.05 * ecd.mean()
    inner = np.array([0 < k // 6 < 4 and 0 < k % 6 < 5 for k in range(len(centres))])
    assert abs(ecd[inner].mean() - ecd[~inner].mean()) < 0.04 * ecd.mean()


def test_dim_disc_with_darker_middle_is_one_region():
    """A dim sphere packed among bright ones, brighter at its edge than in its middle (its core
    is a ring), gets one marker of its own: not lost, not cut between its neighbours."""
    centres = _hexagonal(3, 3, 15.0)
    disks = [(r, c, 15.0, 0.85) for r, c in centres]
    dim = 4  # the middle one
    disks[dim] = (centres[dim][0], centres[dim][1], 15.0, 0.7)
    img = _render_shaded((150, 150), disks, bg=0.2, seed=5, gap=1.5)
    r, c = centres[dim]
    img[disk((r, c), 7, shape=img.shape)] -= 0.1  # darker middle
    labels = segment_classical(img, ClassicalConfig()).labels
    ids, ecd = _ecd_at(labels, centres)
    assert 0 not in ids and len(set(ids)) == len(centres)
    own = labels == ids[dim]
    rows, cols = np.nonzero(own)
    assert abs(rows.mean() - r) < 2.0 and abs(cols.mean() - c) < 2.0
    assert ecd[dim] == pytest.approx(np.median(ecd), rel=0.1)


def test_small_disc_next_to_a_large_one_keeps_its_own_region():
    disks = [(60.0, 50.0, 20.0, 0.85), (60.0, 50.0 + 20.0 + 11.0, 11.0, 0.75), (60.0, 150.0, 16.0, 0.85)]
    img = _render_shaded((120, 190), disks, seed=6)
    labels = segment_classical(img, ClassicalConfig()).labels
    big, small = int(labels[60, 50]), int(labels[60, 81])
    assert big != 0 and small != 0 and big != small
    ecd_small = np.sqrt(4.0 * np.count_nonzero(labels == small) / np.pi)
    assert ecd_small == pytest.approx(22.0, rel=0.15)


def test_fused_lobes_give_one_region_per_lobe():
    """Two overlapping discs (a dumbbell, faint seam): the segmenter hands one region per lobe
    to the lobe grouping, cut near the neck."""
    img = _render_shaded((110, 150), [(55.0, 55.0, 18.0, 0.8), (55.0, 55.0 + 28.0, 18.0, 0.8)], seed=7)
    img[:, 68:71] -= 0.04  # faint seam across the neck
    labels = segment_classical(img, ClassicalConfig()).labels
    a, b = int(labels[55, 50]), int(labels[55, 88])
    assert a != 0 and b != 0 and a != b
    cut = np.flatnonzero((labels[55, :-1] == a) & (labels[55, 1:] == b))
    assert cut.size == 1 and abs(cut[0] - 69) <= 3


def test_small_lobe_fused_into_a_big_one_gets_its_own_region():
    """A small lobe deep in a bigger one (the middle lobe of a trimer, no seam): its ridge in the
    cores' distance map climbs into the big lobe, so it has no peak of its own; the core is too
    big for the big lobe's disc and gets a second marker, cut near the neck (radical line at
    column 69.5)."""
    img = _render_shaded((110, 150), [(55.0, 55.0, 18.0, 0.8), (55.0, 77.0, 13.0, 0.8)], seed=8)
    labels = segment_classical(img, ClassicalConfig(), expected_diameter_px=34.0).labels
    big, small = int(labels[55, 50]), int(labels[55, 82])
    assert big != 0 and small != 0 and big != small
    cut = np.flatnonzero((labels[55, :-1] == big) & (labels[55, 1:] == small))
    assert cut.size == 1 and abs(cut[0] - 69) <= 3


def test_single_disc_gets_no_lobe_marker():
    img = _render_shaded((90, 90), [(45.0, 45.0, 20.0, 0.8)], seed=9)
    labels = segment_classical(img, ClassicalConfig(), expected_diameter_px=34.0).labels
    assert len(np.unique(labels[labels > 0])) == 1
