"""Lobe splitting and grouping on drawn shapes with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.draw import disk

from qcloop.config import ClassicalConfig, LobesConfig
from qcloop._binary import cross_opening as _cross_opening
from qcloop._binary import dilate_square as _dilate_square
from qcloop.lobes import (
    _fuse_lobes,
    _pieces_and_features,
    border_flags,
    exterior_circle,
    fill_enclosed_holes,
    fit_circle,
    fit_circles,
    fuse_logit,
    group_lobes,
    lobe_pair_features,
)
from qcloop.measure import measure_particles
from qcloop.records import PixelSize, Segmentation, SemImage
from qcloop.segment.classical import ClassicalSegmenter


def _image_for(labels: np.ndarray, grey: np.ndarray | None = None, nm: float = 2.0) -> SemImage:
    if grey is None:
        grey = np.where(labels > 0, 0.8, 0.3)
    pixels = (np.clip(grey, 0, 1) * 255).astype(np.uint8)
    return SemImage(Path("shapes.tif"), pixels, pixels.shape[0], PixelSize(nm, "config"))


def _discs(shape, discs) -> np.ndarray:
    m = np.zeros(shape, bool)
    for r, c, rad in discs:
        m[disk((r, c), rad, shape=shape)] = True
    return m


def _lobe_counts(masks) -> np.ndarray:
    return np.bincount(masks.lobe_parent[1:], minlength=masks.n_particles + 1)


def test_fit_circle_on_full_and_partial_arcs():
    rng = np.random.default_rng(0)
    for span in (2 * np.pi, np.pi / 2):
        t = np.linspace(0, span, 80)
        y = 40 + 18 * np.sin(t) + rng.normal(0, 0.3, t.size)
        x = -7 + 18 * np.cos(t) + rng.normal(0, 0.3, t.size)
        c = fit_circle(y, x)
        assert (c.cy, c.cx, c.r) == pytest.approx((40, -7, 18), abs=0.6)
        assert c.coverage == pytest.approx(span, abs=0.15)
    assert fit_circle(np.arange(10.0), np.arange(10.0)) is None  # collinear


def test_fit_two_circles_to_a_dumbbell_outline():
    a = np.linspace(0.6, 2 * np.pi - 0.6, 60)
    y = np.concatenate([30 + 15 * np.sin(a), 30 + 15 * np.sin(a)])
    x = np.concatenate([30 - 15 * np.cos(a), 52 + 15 * np.cos(a)])
    circles = sorted(fit_circles(y, x, 2), key=lambda c: c.cx)
    assert [(c.cx, c.r) for c in circles] == [pytest.approx((30, 15), abs=0.5), pytest.approx((52, 15), abs=0.5)]


def test_overlapping_disks_in_one_region_become_two_lobes():
    shape = (90, 140)
    labels = _discs(shape, [(45, 45, 20), (45, 73, 20)]).astype(np.int32)  # centres 1.4 r apart
    masks = group_lobes(Segmentation(labels, "test"), _image_for(labels), LobesConfig())
    assert masks.n_particles == 1
    assert _lobe_counts(masks)[1] == 2
    assert masks.lobe_labels[45, 40] != masks.lobe_labels[45, 80]
    # the cut runs along the neck, halfway between the centres
    cut_cols = np.flatnonzero(masks.lobe_labels[45, :-1] != masks.lobe_labels[45, 1:])
    assert any(abs(c - 59) <= 2 for c in cut_cols)
    row = measure_particles(_image_for(labels), masks).iloc[0]
    assert row.lobes == 2
    diameters = [float(v) for v in row.lobe_diameters_nm.split(";")]
    assert diameters == pytest.approx([82.0, 82.0], rel=0.06)  # 2 x 20.5 px x 2 nm/px


def test_lobes_from_separate_regions_fuse_across_a_wide_neck():
    shape = (90, 140)
    both = _discs(shape, [(45, 45, 20), (45, 73, 20)])
    labels = np.zeros(shape, np.int32)
    labels[both] = 1
    labels[both & (np.arange(shape[1])[None, :] >= 59)] = 2  # the segmenter cut at the neck
    masks = group_lobes(Segmentation(labels, "test"), _image_for(labels), LobesConfig())
    assert masks.n_particles == 1 and _lobe_counts(masks)[1] == 2


def test_a_chain_of_three_overlapping_disks_is_a_trimer():
    shape = (90, 190)
    labels = _discs(shape, [(45, 40, 20), (45, 68, 18), (45, 96, 20)]).astype(np.int32)
    masks = group_lobes(Segmentation(labels, "test"), _image_for(labels), LobesConfig())
    assert masks.n_particles == 1 and _lobe_counts(masks)[1] == 3


@pytest.mark.parametrize("angle", [0, 35, 70])
def test_trimer_with_a_small_dim_middle_lobe_cut_from_one_end_has_three_lobes(angle):
    # big lobe a, small dimmer middle lobe b, medium lobe c in a chain; the segmenter cut the
    # particle between b and c, so one region holds a and b, whose outline barely shows b
    shape = (120, 180)
    step = np.array([np.sin(np.deg2rad(angle)), np.cos(np.deg2rad(angle))])
    a = np.array([45.0, 40.0])
    b = a + 26 * step
    c = b + 22 * step
    da, db, dc = (_discs(shape, [(p[0], p[1], r)]) for p, r in ((a, 22), (b, 14), (c, 18)))
    grey = np.full(shape, 0.3)
    grey[da | db | dc] = 0.8
    grey[db & ~da & ~dc] = 0.65
    labels = np.zeros(shape, np.int32)
    labels[da | db | dc] = 1
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    power_b = (yy - b[0]) ** 2 + (xx - b[1]) ** 2 - 14**2
    power_c = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 - 18**2
    labels[(labels == 1) & (power_c < power_b)] = 2  # the cut along the b|c neck
    image = _image_for(labels, ndi.gaussian_filter(grey, 1.0))
    masks = group_lobes(Segmentation(labels, "test"), image, LobesConfig())
    assert masks.n_particles == 1 and _lobe_counts(masks)[1] == 3
    centres = [tuple(np.round(p).astype(int)) for p in (a, b, c)]
    assert len({int(masks.lobe_labels[r, col]) for r, col in centres}) == 3  # one lobe each


def _lobe_beside(left_discs, contact_grey: float = 0.715):
    """``left_discs`` (one region) and a separate disc of radius 20 at column 102 that meets the
    disc at column 68 across a 0.62 r neck whose 2 px rim is ``contact_grey`` (lobes 0.8,
    background 0.3): a narrow, slightly darker neck. (image, labels)"""
    shape = (90, 140)
    left = _discs(shape, left_discs)
    right = _discs(shape, [(45, 102, 20)]) & ~left
    grey = np.full(shape, 0.3)
    grey[left | right] = 0.8
    grey[right & ndi.binary_dilation(left, iterations=2)] = contact_grey
    labels = np.zeros(shape, np.int32)
    labels[left] = 1
    labels[right] = 2
    return _image_for(labels, ndi.gaussian_filter(grey, 1.0)), labels


def test_a_third_lobe_joins_a_clear_pair_across_a_narrow_neck():
    cfg = LobesConfig()
    # a dumbbell (clear pair) with a third lobe beside it: the trimer of a chain whose middle
    # lobe meets one end across a narrow, slightly darker neck
    image, labels = _lobe_beside([(45, 40, 20), (45, 68, 20)])
    *_, lobes, feats = _pieces_and_features(labels, image.intensity(), cfg)
    logits = fuse_logit(feats)
    assert int(lobes.max()) == 3 and logits.max() >= cfg.clear_pair_score
    weak = logits.min()
    assert cfg.third_lobe_score <= weak < cfg.fuse_score  # the case this rule is about
    masks = group_lobes(Segmentation(labels, "test"), image, cfg)
    assert masks.n_particles == 1 and _lobe_counts(masks)[1] == 3
    assert masks.labels[45, 40] == masks.labels[45, 102]
    # without the rule (third lobes need fuse_score too) it stays a dumbbell and a sphere
    masks = group_lobes(Segmentation(labels, "test"), image, LobesConfig(third_lobe_score=cfg.fuse_score))
    assert masks.n_particles == 2 and sorted(_lobe_counts(masks)[1:]) == [1, 2]


def test_a_lobe_beside_a_single_lobe_needs_fuse_score():
    # the same neck between two single lobes (no clear pair): two particles
    cfg = LobesConfig()
    image, labels = _lobe_beside([(45, 68, 20)])
    feats = lobe_pair_features(labels, image.intensity())
    assert len(feats) == 1
    assert cfg.third_lobe_score <= fuse_logit(feats)[0] < cfg.fuse_score
    masks = group_lobes(Segmentation(labels, "test"), image, cfg)
    assert masks.n_particles == 2 and list(_lobe_counts(masks)[1:]) == [1, 1]


def test_fuse_lobes_third_lobe_rule():
    cfg = LobesConfig(fuse_score=1.0, third_lobe_score=-0.5, clear_pair_score=4.0, third_lobe_angle=100.0,
                      max_lobes=6)
    chain = np.array([[0, 0], [50, 0], [50, 30], [50, 60], [50, 90]], float)  # lobes 1..4 in a row

    def groups(pairs, centres=chain):
        a, b, f = (np.array(v) for v in zip(*pairs))
        roots, fused = _fuse_lobes(a, b, f.astype(float), centres, cfg)
        lab = {}
        return [lab.setdefault(int(r), len(lab)) for r in roots[1:]], fused

    # clear pair 1-2, lobe 3 continues the chain and joins at 0.2 (>= third_lobe_score); its
    # link counts as fused
    g, fused = groups([(1, 2, 6.0), (2, 3, 0.2)])
    assert g == [0, 0, 0, 1] and fused.tolist() == [True, True]
    # ... but not below third_lobe_score
    assert groups([(1, 2, 6.0), (2, 3, -0.8)])[0] == [0, 0, 1, 2]
    # ... nor beside the neck of the pair (angle 60 degrees at lobe 2: a neighbour particle or
    # the other half of a split lobe)
    beside = chain.copy()
    beside[3] = (50 + 30 * np.sin(np.pi / 3), 30 * np.cos(np.pi / 3))
    assert groups([(1, 2, 6.0), (2, 3, 0.2)], beside)[0] == [0, 0, 1, 2]
    assert groups([(1, 2, 6.0), (2, 3, 1.5)], beside)[0] == [0, 0, 0, 1]  # fuse_score still fuses
    # a pair fused at a modest score is no clear pair: the third lobe needs fuse_score
    assert groups([(1, 2, 2.0), (2, 3, 0.2)])[0] == [0, 0, 1, 2]
    # two single lobes need fuse_score
    assert groups([(1, 2, 0.2)])[0] == [0, 1, 2, 3]
    # a fourth lobe needs fuse_score: the rule only completes trimers
    assert groups([(1, 2, 6.0), (2, 3, 5.0), (3, 4, 0.2)])[0] == [0, 0, 0, 1]
    # two clear pairs do not merge across a weak link
    assert groups([(1, 2, 6.0), (3, 4, 6.0), (2, 3, 0.2)])[0] == [0, 0, 1, 1]
    # a weak link inside one particle is not a fused pair (no gap bridging along it)
    g, fused = groups([(1, 2, 6.0), (2, 3, 5.0), (1, 3, 0.2)])
    assert g == [0, 0, 0, 1] and fused.tolist() == [True, True, False]


def _two_lobes_cut_along_column_59():
    """Two fused discs cut by a 1 px background line (column 59), touching at 4 px only:
    (bright-lobes grey image, labels)."""
    shape = (90, 140)
    both = _discs(shape, [(45, 45, 20), (45, 73, 20)])
    grey = np.full(shape, 0.3)
    grey[both] = 0.8
    labels = np.zeros(shape, np.int32)
    cols = np.arange(shape[1])[None, :]
    labels[both & (cols < 59)] = 1
    labels[both & (cols > 59)] = 2
    labels[43:47, 59] = 2
    return grey, labels


def test_fused_lobes_fuse_when_the_cut_between_them_is_partly_open():
    # the segmenter left a 1 px background line along the seam, touching at 4 px only: the
    # neck is the whole stretch no more than 1 px wider than the narrowest gap
    grey, labels = _two_lobes_cut_along_column_59()
    image = _image_for(labels, ndi.gaussian_filter(grey, 1.0))
    feats = lobe_pair_features(labels, ndi.gaussian_filter(grey, 1.0))
    assert feats.neck.iloc[0] > 0.65
    masks = group_lobes(Segmentation(labels, "test"), image, LobesConfig())
    assert masks.n_particles == 1 and _lobe_counts(masks)[1] == 2


def test_dark_crevice_along_a_cut_does_not_widen_the_neck():
    # as above, but the background line is a dark crevice between two pressed spheres
    grey, labels = _two_lobes_cut_along_column_59()
    grey[:, 59] = 0.35
    grey[43:47, 59] = 0.8
    feats = lobe_pair_features(labels, ndi.gaussian_filter(grey, 1.0))
    assert feats.neck.iloc[0] < 0.3


def test_touching_spheres_cut_by_the_segmenter_stay_two_particles():
    shape = (80, 130)
    left, right = _discs(shape, [(40, 40, 20)]), _discs(shape, [(40, 80, 20)])  # 40 px apart: touching
    grey = np.full(shape, 0.3)
    grey[left | right] = 0.8
    grey[:, 59:61] = np.minimum(grey[:, 59:61], 0.45)  # the darker contact
    labels = np.zeros(shape, np.int32)
    labels[left] = 1
    labels[right & ~left] = 2
    image = _image_for(labels, ndi.gaussian_filter(grey, 1.0))
    masks = group_lobes(Segmentation(labels, "test"), image, LobesConfig())
    assert masks.n_particles == 2
    assert list(_lobe_counts(masks)[1:]) == [1, 1]


def test_disks_touching_at_a_point_are_two_particles():
    shape = (80, 130)
    grey = np.full(shape, 0.3)
    grey[_discs(shape, [(40, 40, 20), (40, 81, 20)])] = 0.8
    image = _image_for(np.zeros(shape, np.int32), ndi.gaussian_filter(grey, 1.0))
    seg = ClassicalSegmenter(ClassicalConfig())(image)
    masks = group_lobes(seg, image, LobesConfig())
    assert masks.n_particles == 2
    assert masks.labels[40, 40] != masks.labels[40, 81]
    assert list(_lobe_counts(masks)[1:]) == [1, 1]


def test_a_plain_disk_and_a_square_are_single_lobes():
    shape = (80, 170)
    labels = np.zeros(shape, np.int32)
    labels[_discs(shape, [(40, 40, 22)])] = 1
    labels[15:65, 100:150] = 2
    masks = group_lobes(Segmentation(labels, "test"), _image_for(labels), LobesConfig())
    assert masks.n_particles == 2
    assert list(_lobe_counts(masks)[1:]) == [1, 1]


def test_edge_cut_disk_touches_border_and_banner_line_counts():
    shape = (100, 100)
    labels = np.zeros(shape, np.int32)
    labels[_discs(shape, [(50, 5, 15)])] = 1  # cut by the left edge
    labels[_discs(shape, [(50, 55, 15)])] = 2  # inside
    labels[_discs(shape, [(97, 55, 8)])] = 3  # reaches the last analysed row (banner line)
    masks = group_lobes(Segmentation(labels, "test"), _image_for(labels), LobesConfig())
    by_label = {int(masks.labels[r, c]): bool(masks.touches_border[masks.labels[r, c]])
                for r, c in [(50, 5), (50, 55), (97, 55)]}
    assert list(by_label.values()) == [True, False, True]
    flags = border_flags(labels)
    assert flags.tolist() == [False, True, False, True]


def test_disabled_grouping_keeps_regions():
    shape = (90, 140)
    labels = _discs(shape, [(45, 45, 20), (45, 73, 20)]).astype(np.int32)
    masks = group_lobes(Segmentation(labels, "test"), _image_for(labels), LobesConfig(enabled=False))
    assert masks.n_particles == 1 and masks.lobe_parent.tolist() == [0, 1]


def test_max_lobes_caps_particles():
    shape = (90, 190)
    labels = _discs(shape, [(45, 40, 20), (45, 68, 18), (45, 96, 20)]).astype(np.int32)
    masks = group_lobes(Segmentation(labels, "test"), _image_for(labels), LobesConfig(max_lobes=2))
    assert _lobe_counts(masks)[1:].max() <= 2


def test_invariants_of_the_output():
    shape = (90, 190)
    labels = _discs(shape, [(45, 40, 20), (45, 68, 18)]).astype(np.int32)
    labels[_discs(shape, [(45, 150, 15)])] = 2
    masks = group_lobes(Segmentation(labels, "test"), _image_for(labels), LobesConfig())
    # every lobe pixel belongs to exactly the particle its parent says
    lobe = masks.lobe_labels
    assert np.array_equal(masks.labels, masks.lobe_parent[lobe])
    assert np.array_equal(masks.labels > 0, labels > 0)
    assert masks.touches_border.shape == (masks.n_particles + 1,)
    with pytest.raises(ValueError, match="shape"):
        group_lobes(Segmentation(labels[:-1], "test"), _image_for(labels), LobesConfig())


def test_pair_features_tell_fused_neck_from_contact():
    shape = (90, 200)
    grey = np.full(shape, 0.3)
    fused = _discs(shape, [(45, 35, 20), (45, 63, 20)])
    grey[fused] = 0.8
    lab = np.zeros(shape, np.int32)
    lab[fused] = 1
    lab[fused & (np.arange(shape[1])[None, :] >= 49)] = 2
    left, right = _discs(shape, [(45, 120, 21)]), _discs(shape, [(45, 160, 20)])  # touch at col 140/141
    grey[left | right] = 0.8
    grey[:, 140:142] = 0.35  # dark gap between touching particles
    lab[left] = 3
    lab[right] = 4
    feats = lobe_pair_features(lab, ndi.gaussian_filter(grey, 1.0)).set_index(["a", "b"])
    f12, f34 = feats.loc[(1, 2)], feats.loc[(3, 4)]
    assert f12.neck > 0.65 and f34.neck < 0.4  # half-width of the neck over the inscribed radius
    assert f12.contrast < 0.1 < f34.contrast
    assert f12.overlap < 0.8


def test_exterior_circle_ignores_cut_sides():
    shape = (80, 80)
    labels = np.zeros(shape, np.int32)
    d = _discs(shape, [(40, 40, 20)])
    labels[d] = 1
    labels[d & (np.arange(80)[None, :] >= 50)] = 2  # neighbour takes a cap
    sl = ndi.find_objects(labels)[0]
    c = exterior_circle(labels[sl] == 1, (sl[0].start, sl[1].start), labels)
    assert (c.cy, c.cx, c.r) == pytest.approx((40, 40, 20.3), abs=0.8)


def test_fill_enclosed_holes_only_fills_holes_of_one_region():
    labels = np.zeros((40, 60), np.int32)
    labels[5:20, 5:20] = 1
    labels[10:13, 10:13] = 0  # hole inside region 1
    labels[5:20, 30:40] = 2
    labels[5:20, 40:50] = 3
    labels[10:13, 39:41] = 0  # hole between regions 2 and 3
    labels[25:40, 5:20] = 4
    labels[35:40, 10:12] = 0  # notch open to the image edge
    out = fill_enclosed_holes(labels, 50)
    assert (out[10:13, 10:13] == 1).all()
    assert (out[10:13, 39:41] == 0).all() and (out[35:40, 10:12] == 0).all()
    assert (fill_enclosed_holes(labels, 5)[10:13, 10:13] == 0).all()  # larger than max_area


def test_fast_morphology_helpers_match_scipy():
    rng = np.random.default_rng(3)
    for _ in range(5):
        mask = ndi.gaussian_filter(rng.random((50, 70)), 2.0) > 0.5
        for reach in (1, 3, 40):
            expected = ndi.maximum_filter(mask.view(np.uint8), size=2 * reach + 1) > 0
            assert np.array_equal(_dilate_square(mask, reach), expected)
        assert np.array_equal(_cross_opening(mask, 2), ndi.binary_opening(mask, iterations=2))
