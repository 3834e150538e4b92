"""Instance-segmentation scores against hand-computed values on small label images."""

from __future__ import annotations

import numpy as np
import pytest

from qcloop.evaluate import (THRESHOLDS, align_truth, evaluate_labels, match_labels, pieces_per_truth,
                             pool_scores, score_table, shift_labels, truth_from_binary)


def _truth() -> np.ndarray:
    """A: 4x4 (16 px), B: 4x2 (8 px) touching A on its right, C: 3x3 (9 px) apart."""
    t = np.zeros((10, 20), np.int32)
    t[0:4, 0:4] = 1
    t[0:4, 4:6] = 2
    t[6:9, 12:15] = 3
    return t


def _relabel(t: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    out = np.zeros_like(t)
    for a, b in mapping.items():
        out[t == a] = b
    return out


def _f1s(score) -> list[float]:
    return [score.f1_at(t) for t in THRESHOLDS]


def test_perfect_prediction_with_other_label_values():
    t = _truth()
    s = evaluate_labels(t, _relabel(t, {1: 40, 2: 7, 3: 1000}))
    assert (s.n_truth, s.n_pred, s.tp, s.fp, s.fn) == (3, 3, (3,) * 10, (0,) * 10, (0,) * 10)
    assert s.precision == s.recall == s.f1 == s.f1_mean == s.mean_iou == s.count_ratio == 1.0


def test_split_particle():
    """A cut into 12 px + 4 px: IoU 0.75 and 0.25; the small piece is a false positive."""
    t = _truth()
    p = t.copy()
    p[0:4, 3] = 9  # right column of A
    s = evaluate_labels(t, p)
    assert s.tp == (3, 3, 3, 3, 3, 3, 2, 2, 2, 2)  # A matched up to IoU 0.75 inclusive
    assert s.fp == (1,) * 6 + (2,) * 4 and s.fn == (0,) * 6 + (1,) * 4
    assert s.precision == pytest.approx(0.75) and s.recall == 1.0
    assert s.f1 == pytest.approx(6 / 7)
    assert s.f1_at(0.8) == pytest.approx(4 / 7)
    assert s.f1_mean == pytest.approx((6 * 6 / 7 + 4 * 4 / 7) / 10)
    assert s.mean_iou == pytest.approx((0.75 + 1 + 1) / 3)
    assert s.count_ratio == pytest.approx(4 / 3)
    m = match_labels(t, p)
    assert pieces_per_truth(m).tolist() == [2, 1, 1]
    assert pieces_per_truth(m, min_cover=0.3).tolist() == [1, 1, 1]


def test_merged_particles():
    """A + B as one 24 px region: IoU 16/24 with A, 8/24 with B."""
    t = _truth()
    p = _relabel(t, {1: 5, 2: 5, 3: 6})
    s = evaluate_labels(t, p)
    assert s.tp == (2,) * 4 + (1,) * 6  # A matched while t <= 0.65
    assert s.fp == (0,) * 4 + (1,) * 6 and s.fn == (1,) * 4 + (2,) * 6
    assert (s.precision, s.recall, s.f1) == pytest.approx((1.0, 2 / 3, 0.8))
    assert s.f1_at(0.7) == pytest.approx(0.4)
    assert s.f1_mean == pytest.approx((4 * 0.8 + 6 * 0.4) / 10)
    assert s.mean_iou == pytest.approx((16 / 24 + 1) / 2)
    assert s.count_ratio == pytest.approx(2 / 3)
    assert pieces_per_truth(match_labels(t, p)).tolist() == [1, 0, 1]


def test_missing_particle():
    t = _truth()
    s = evaluate_labels(t, _relabel(t, {1: 1, 2: 2}))
    assert (s.tp[0], s.fp[0], s.fn[0]) == (2, 0, 1)
    assert (s.precision, s.recall, s.f1, s.f1_mean, s.mean_iou) == pytest.approx((1.0, 2 / 3, 0.8, 0.8, 1.0))


def test_extra_particle():
    t = _truth()
    p = t.copy()
    p[8:10, 0:3] = 4
    s = evaluate_labels(t, p)
    assert (s.tp[0], s.fp[0], s.fn[0]) == (3, 1, 0)
    assert (s.precision, s.recall, s.f1, s.count_ratio) == pytest.approx((0.75, 1.0, 6 / 7, 4 / 3))


def test_tie_at_iou_one_half_gives_one_match():
    """A split into two equal halves: both pieces have IoU exactly 0.5, only one may match."""
    t = _truth()
    p = t.copy()
    p[0:4, 2:4] = 9
    s = evaluate_labels(t, p)
    assert (s.tp[0], s.fp[0], s.fn[0]) == (3, 1, 0)
    assert s.tp[1] == 2
    t_idx, p_idx, iou = match_labels(t, p).matched(0.5)
    assert len(set(t_idx)) == len(set(p_idx)) == 3 and iou.min() == pytest.approx(0.5)


def test_min_area_drops_slivers_and_ignores_predictions_on_them():
    t = _truth()
    t[9, 17:20] = 4  # a 3 px sliver of the drawing
    p = t.copy()
    p[9, 0:2] = 8  # a 2 px speck on the background
    plain = evaluate_labels(t, p)
    assert (plain.n_truth, plain.tp[0], plain.fp[0]) == (4, 4, 1)
    s = evaluate_labels(t, p, min_area=5)
    assert (s.n_truth, s.n_pred, s.n_dropped_truth, s.n_ignored_pred) == (3, 3, 1, 2)
    assert (s.tp[0], s.fp[0], s.fn[0]) == (3, 0, 0)
    # a prediction larger than min_area but lying mostly on a dropped sliver is ignored too
    t2 = _truth()
    t2[9, 10:14] = 4  # 4 px sliver
    p2 = t2.copy()
    p2[9, 10:16] = 8  # 6 px, 4 of them on the sliver
    s2 = evaluate_labels(t2, p2, min_area=5)
    assert (s2.fp[0], s2.n_ignored_pred) == (0, 1)
    # ... but one only a third on it is a false positive
    p2[8, 14:20] = 8
    assert evaluate_labels(t2, p2, min_area=5).fp[0] == 1


def test_small_prediction_matching_a_kept_truth_counts():
    t = np.zeros((6, 6), np.int32)
    t[0:2, 0:3] = 1  # 6 px, kept with min_area 5
    p = np.zeros_like(t)
    p[0:2, 0:2] = 3  # 4 px < min_area, IoU 4/6
    s = evaluate_labels(t, p, min_area=5)
    assert (s.tp[0], s.fp[0], s.fn[0], s.n_ignored_pred) == (1, 0, 0, 0)
    assert s.mean_iou == pytest.approx(4 / 6)


def test_empty_images_give_nan_ratios_not_errors():
    z = np.zeros((5, 5), np.int32)
    s = evaluate_labels(z, z)
    assert (s.n_truth, s.n_pred, s.tp[0]) == (0, 0, 0)
    assert np.isnan(s.precision) and np.isnan(s.f1) and np.isnan(s.mean_iou)
    one = z.copy()
    one[1:3, 1:3] = 1
    assert evaluate_labels(one, z).recall == 0.0
    assert evaluate_labels(z, one).precision == 0.0


def test_iou_matches_brute_force_on_random_labels():
    from skimage.measure import label

    rng = np.random.default_rng(0)
    t = label(rng.random((60, 70)) > 0.6)
    p = label(np.roll(rng.random((60, 70)) > 0.5, 1, axis=0)) * 3  # non-sequential values
    m = match_labels(t, p)
    for k in rng.choice(len(m.pair_t), 40, replace=False):
        a, b = t == m.truth_ids[m.pair_t[k]], p == m.pred_ids[m.pair_p[k]]
        assert m.pair_iou[k] == pytest.approx((a & b).sum() / (a | b).sum())
    # every overlapping pair is listed once
    both = (t > 0) & (p > 0)
    assert len(m.pair_t) == len(set(zip(t[both], p[both])))
    assert m.pred_truth[m.pred_ids == p.max()][0] == np.bincount(t[p == p.max()]).argmax()


def test_pooled_counts_equal_scoring_the_images_side_by_side():
    t1, t2 = _truth(), _truth()
    p1 = _relabel(t1, {1: 5, 2: 5, 3: 6})
    p2 = t2.copy()
    p2[0:4, 3] = 9
    a, b = evaluate_labels(t1, p1, name="a"), evaluate_labels(t2, p2, name="b")
    pooled = pool_scores([a, b])
    joint = evaluate_labels(np.hstack([t1, t2 + 100 * (t2 > 0)]), np.hstack([p1, p2 + 100 * (p2 > 0)]))
    assert (pooled.tp, pooled.fp, pooled.fn) == (joint.tp, joint.fp, joint.fn)
    assert pooled.mean_iou == pytest.approx(joint.mean_iou) and pooled.f1 == pytest.approx(joint.f1)
    table = score_table([a, b])
    assert table["image"].tolist() == ["a", "b", "all (pooled)", "mean of images"]
    assert table.loc[2, "f1"] == pytest.approx(joint.f1)
    assert table.loc[3, "f1"] == pytest.approx((a.f1 + b.f1) / 2)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((3, 4), np.int32), "shapes differ"),
    (np.zeros((4, 4), float), "integers"),
    (np.zeros((4, 4), bool), "truth_from_binary"),
    (-np.ones((4, 4), np.int32), ">= 0"),
])
def test_bad_label_images_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        evaluate_labels(np.zeros((4, 4), np.int32), bad)


def test_truth_from_binary_uses_4_connected_components():
    m = np.zeros((6, 9), np.uint8)
    m[0:3, 0:3] = 255
    m[0:3, 4:7] = 255  # separated by a 1-px background line
    m[3:5, 7:9] = 255  # touches the second block only diagonally
    lab = truth_from_binary(m)
    assert lab.dtype == np.int32 and lab.max() == 3
    assert len(np.unique(lab[0:3, 0:3])) == 1 and lab[0, 0] != lab[0, 4] != lab[4, 8]
    labels = np.zeros((4, 4), np.uint16)
    labels[0, 0], labels[2:4, 2:4], labels[0, 3] = 70, 9, 9  # a label image keeps its objects
    out = truth_from_binary(labels)
    assert sorted(np.unique(out)) == [0, 1, 2] and out[0, 3] == out[3, 3]
    assert truth_from_binary(labels > 0).max() == 3  # as a binary mask: 3 components


def _blob_field(shape=(200, 240), seed=3) -> np.ndarray:
    from skimage.draw import disk

    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int32)
    for i in range(1, 30):
        rr, cc = disk((rng.uniform(15, shape[0] - 15), rng.uniform(15, shape[1] - 15)), rng.uniform(5, 12),
                      shape=shape)
        lab[rr, cc] = i
    return lab


@pytest.mark.parametrize("dark", [True, False])
def test_align_truth_finds_the_detector_offset(dark):
    truth = _blob_field()
    rng = np.random.default_rng(1)
    seen = shift_labels(truth, 7, -4) > 0
    image = np.where(seen, 0.2, 0.8) if dark else np.where(seen, 0.8, 0.3)
    image = image + rng.normal(0, 0.08, image.shape)
    al = align_truth(truth, image, max_shift=17)
    assert al.shift == (7, -4) and al.contrast == ("dark" if dark else "bright")
    assert al.overlap_iou > 0.9
    assert np.array_equal(al.truth > 0, seen)
    with pytest.raises(ValueError, match="max_shift"):
        align_truth(truth, image, max_shift=5)


def test_shift_labels_moves_and_zero_fills():
    a = np.arange(1, 13).reshape(3, 4)
    assert shift_labels(a, 1, -1).tolist() == [[0, 0, 0, 0], [2, 3, 4, 0], [6, 7, 8, 0]]
    assert not shift_labels(a, 3, 0).any()


def test_score_columns_list_every_row_key():
    from qcloop.evaluate import SCORE_COLUMNS

    s = evaluate_labels(_truth(), _truth())
    assert tuple(s.as_row()) == SCORE_COLUMNS


def test_scores_per_group_add_up_to_the_image_score():
    from qcloop.evaluate import score_groups

    t = _truth()
    p = t.copy()
    p[0:4, 3] = 9  # split A (group "big"): the 4 px piece is a false positive of "big"
    p[8:10, 0:3] = 4  # extra on background: no group unless a fallback is given
    m = match_labels(t, p)
    groups = score_groups(m, ["big", "small", "small"])
    assert (groups["big"].tp[0], groups["big"].fp[0], groups["big"].fn[0]) == (1, 1, 0)
    assert (groups["small"].tp[0], groups["small"].fp[0], groups["small"].fn[0]) == (2, 0, 0)
    assert groups["big"].tp[6] == 0 and groups["big"].fp[6] == 2  # at 0.8 A is unmatched: both pieces FP
    whole = evaluate_labels(t, p)
    assert sum(g.fp[0] for g in groups.values()) == whole.fp[0] - 1
    fallback = ["small" if a < 10 else "big" for a in m.pred_area]
    with_fb = score_groups(m, ["big", "small", "small"], fallback)
    assert with_fb["small"].fp[0] == 1 and with_fb["small"].precision == pytest.approx(2 / 3)
    assert sum(g.fp[0] for g in with_fb.values()) == whole.fp[0]
    assert with_fb["big"].mean_iou == pytest.approx(0.75)


def test_crop_truth_drops_banner_rows_only():
    from qcloop.evaluate import crop_truth

    t = np.arange(12).reshape(4, 3)
    assert crop_truth(t, (3, 3)).tolist() == t[:3].tolist()
    assert crop_truth(t, (4, 3)) is t
    for bad in ((5, 3), (4, 2)):
        with pytest.raises(ValueError, match="does not fit"):
            crop_truth(t, bad)
