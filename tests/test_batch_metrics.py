"""Batch QC metrics on hand-made and random particle tables."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from qcloop.batch import (
    BatchMetrics,
    OrientationStats,
    SizeStats,
    batch_metrics,
    standardise,
    variance_decomposition,
    wilson_halfwidth,
    wilson_interval,
)


def table(classes, ecd_nm, *, border=None, images=None, orientation=None, aspect=None, ecd_px=None):
    n = len(classes)
    return pd.DataFrame({
        "image": images if images is not None else ["img0"] * n,
        "particle_id": np.arange(1, n + 1),
        "ecd_nm": np.asarray(ecd_nm, float),
        "ecd_px": np.asarray(ecd_px if ecd_px is not None else np.asarray(ecd_nm, float) / 4.0, float),
        "orientation_deg": orientation if orientation is not None else np.zeros(n),
        "aspect_ratio": aspect if aspect is not None else np.ones(n),
        "touches_border": border if border is not None else np.zeros(n, bool),
        "class": classes,
    })


# --------------------------------------------------------------------------- variance split
def test_variance_decomposition_by_hand():
    # 1-D points: class a at 0 and 2 (mean 1), class b at 10 (mean 10); grand mean 4
    x = np.array([[0.0], [2.0], [10.0]])
    labels = np.array(["a", "a", "b"])
    inter, intra, total = variance_decomposition(x, labels)
    assert total == pytest.approx((16 + 4 + 36) / 3)
    assert intra == pytest.approx((1 + 1 + 0) / 3)
    assert inter == pytest.approx((2 * 9 + 1 * 36) / 3)
    assert inter + intra == pytest.approx(total, rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_inter_plus_intra_equals_total_random(seed):
    rng = np.random.default_rng(seed)
    n, d = 300, 12
    classes = rng.choice(["cube", "triangle", "sphere", "rod"], n)
    emb = rng.normal(size=(n, d)) * rng.uniform(0.1, 50, d) + rng.normal(size=d) * 100
    emb[classes == "cube"] += 3.0
    df = table(classes, rng.normal(100, 5, n), border=rng.random(n) < 0.1)
    m = batch_metrics(df, emb)
    f = m.flat()
    assert f["inter_class_variance"] + f["intra_class_variance"] == pytest.approx(f["total_variance"], rel=1e-9)
    assert f["pca.inter_class_variance"] + f["pca.intra_class_variance"] == pytest.approx(
        f["pca.total_variance"], rel=1e-9)
    # batch standardisation: total variance = number of non-constant dims
    assert f["total_variance"] == pytest.approx(d, rel=1e-9)
    # PCA plane keeps the share of variance PC1 + PC2 explain
    assert f["pca.total_variance"] == pytest.approx(d * sum(m.pca_explained_variance_ratio), rel=1e-9)
    assert -1 <= f["silhouette"] <= 1


def test_separated_classes_score_higher_than_mixed():
    rng = np.random.default_rng(1)
    n = 200
    classes = np.array(["a", "b"] * (n // 2))
    noise = rng.normal(size=(n, 5))
    sep = noise + (classes == "a")[:, None] * 6.0
    df = table(classes, np.full(n, 50.0))
    good, bad = batch_metrics(df, sep).flat(), batch_metrics(df, noise).flat()
    assert good["silhouette"] > 0.5 > bad["silhouette"]
    assert good["inter_class_variance"] > 10 * bad["inter_class_variance"]
    assert good["intra_class_variance"] < bad["intra_class_variance"]


def test_silhouette_nan_with_one_class_and_reference_scaler():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(20, 3))
    df = table(["particle"] * 20, np.full(20, 80.0))
    m = batch_metrics(df, emb)
    assert math.isnan(m.flat()["silhouette"])
    assert m.flat()["inter_class_variance"] == pytest.approx(0.0, abs=1e-12)
    assert m.flat()["intra_class_variance"] == pytest.approx(m.flat()["total_variance"])
    # a fixed reference scaler: total variance is no longer pinned to d
    ref = (np.zeros(3), np.full(3, 0.5))
    m_ref = batch_metrics(df, emb, scaler=ref)
    assert m_ref.standardisation == "reference"
    assert m_ref.flat()["total_variance"] == pytest.approx(4 * emb.var(axis=0).sum(), rel=1e-9)


def test_silhouette_needs_two_classes_with_two_members():
    emb = np.array([[0.0], [0.1], [5.0]])
    m = batch_metrics(table(["a", "a", "b"], [1, 1, 1]), emb)
    assert math.isnan(m.flat()["silhouette"])
    m2 = batch_metrics(table(["a", "a", "b", "b"], [1, 1, 1, 1]), np.array([[0.0], [0.1], [5.0], [5.1]]))
    assert m2.flat()["silhouette"] > 0.9


def test_unknown_class_counts_in_fractions_not_in_separation():
    emb = np.array([[0.0], [0.2], [5.0], [5.2], [100.0]])
    df = table(["a", "a", "b", "b", "unknown"], [1, 2, 3, 4, 5])
    m = batch_metrics(df, emb)
    assert m.class_count == {"a": 2, "b": 2, "unknown": 1}
    assert m.flat()["class_fraction.a"] == pytest.approx(0.4)
    assert m.separation.n == 4 and m.separation.n_classes == 2


def test_embedding_rows_must_align():
    with pytest.raises(ValueError, match="expected \\(3, d\\)"):
        batch_metrics(table(["a"] * 3, [1, 2, 3]), np.zeros((4, 2)))


# --------------------------------------------------------------------------- sizes, counts
def test_border_particles_excluded_everywhere():
    df = table(["a", "a", "b", "b"], [100, 110, 200, 1000], border=[False, False, False, True],
               images=["x", "x", "y", "y"])
    m = batch_metrics(df, None)
    f = m.flat()
    assert f["n_particles"] == 3 and f["n_border"] == 1 and f["n_images"] == 2
    assert f["class_count.b"] == 1
    assert f["class_fraction.a"] == pytest.approx(2 / 3)
    assert f["ecd_nm.mean"] == pytest.approx(410 / 3)
    assert f["ecd_nm.b.mean"] == pytest.approx(200)
    assert math.isnan(f["ecd_nm.b.sd"])  # one particle: no sd
    assert math.isnan(f["silhouette"]) and m.standardisation == "none"


def test_size_statistics_values():
    x = np.arange(1.0, 101.0)
    s = SizeStats.of(x)
    assert s.mean == pytest.approx(50.5)
    assert s.sd == pytest.approx(np.std(x, ddof=1))
    assert s.cv == pytest.approx(s.sd / 50.5)
    assert (s.d10, s.d50, s.d90) == pytest.approx(tuple(np.percentile(x, [10, 50, 90])))
    assert s.halfwidth["mean"] == pytest.approx(stats.t.ppf(0.975, 99) * s.sd / 10)
    lo, hi = stats.chi2.ppf([0.025, 0.975], 99)
    assert s.halfwidth["sd"] == pytest.approx(s.sd * (np.sqrt(99 / lo) - np.sqrt(99 / hi)) / 2)
    assert 0 < s.halfwidth["d50"] < 15
    few = SizeStats.of([5.0, 6.0, 7.0])
    assert math.isinf(few.halfwidth["d10"])  # 3 values cannot bound the 10th percentile


def test_mean_interval_covers_truth_about_95_percent():
    rng = np.random.default_rng(3)
    hits = 0
    for _ in range(400):
        s = SizeStats.of(rng.normal(130.0, 5.0, 25))
        hits += abs(s.mean - 130.0) <= s.halfwidth["mean"]
    assert 0.92 <= hits / 400 <= 0.98


def test_no_pixel_size_falls_back_to_px():
    df = table(["a", "a", "a"], [np.nan] * 3, ecd_px=[10.0, 12.0, 14.0])
    f = batch_metrics(df, None).flat()
    assert math.isnan(f["ecd_nm.mean"]) and math.isnan(f["ecd_nm.a.mean"])
    assert f["ecd_px.mean"] == pytest.approx(12.0)
    assert f["ecd_px.a.sd"] == pytest.approx(2.0)


def test_no_class_column_is_one_class_particle():
    df = table(["x"] * 4, [1, 2, 3, 4]).drop(columns="class")
    m = batch_metrics(df, np.eye(4))
    assert m.classes == ("particle",)
    assert m.flat()["class_fraction.particle"] == 1.0
    assert "ecd_nm.particle.mean" in m.flat()


def test_empty_batch():
    m = batch_metrics(table([], []), np.zeros((0, 4)))
    f = m.flat()
    assert f["n_particles"] == 0 and f["n_images"] == 0
    assert math.isnan(f["ecd_nm.mean"]) and math.isnan(f["silhouette"])
    json.dumps(m.to_dict(), allow_nan=False)


# --------------------------------------------------------------------------- orientation
def test_orientation_is_axial():
    # -89 and +89 deg are 2 deg apart on the axial circle: mean near +-90, tight spread
    o = OrientationStats.of([-89.0, 89.0, -88.0, 88.0])
    assert abs(abs(o.mean) - 90.0) < 1e-6
    assert o.mean_resultant_length > 0.99
    assert o.circular_sd < 3
    iso = OrientationStats.of(np.linspace(-90, 90, 180, endpoint=False))
    assert iso.mean_resultant_length < 1e-9


def test_orientation_only_for_elongated_classes():
    rng = np.random.default_rng(4)
    n = 100
    classes = np.array(["rod", "cube", "rod", "unknown"] * (n // 4))
    angle = np.where(classes == "rod", rng.normal(30, 4, n), rng.uniform(-90, 90, n))
    aspect = np.where(classes == "cube", 1.02, 3.0)
    f = batch_metrics(table(classes, np.full(n, 50.0), orientation=angle, aspect=aspect), None).flat()
    assert f["orientation_deg.rod.mean"] == pytest.approx(30, abs=2)
    assert f["orientation_deg.rod.mean_resultant_length"] > 0.95
    assert not any(k.startswith(("orientation_deg.cube", "orientation_deg.unknown")) for k in f)


# --------------------------------------------------------------------------- uncertainty, JSON
def test_wilson_interval():
    # textbook example: 8 of 10 -> Wilson 95 % interval (0.490, 0.943)
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-3)
    assert wilson_halfwidth(8, 10) == pytest.approx((hi - lo) / 2)
    assert math.isinf(wilson_halfwidth(0, 0))


def test_uncertainty_and_to_dict_are_consistent():
    rng = np.random.default_rng(5)
    n = 120
    classes = rng.choice(["cube", "triangle"], n)
    m = batch_metrics(table(classes, rng.normal(130, 5, n)), rng.normal(size=(n, 6)))
    assert isinstance(m, BatchMetrics)
    f, u = m.flat(), m.uncertainty()
    assert set(u) <= set(f)
    k = m.class_count["cube"]
    assert u["class_fraction.cube"] == pytest.approx(wilson_halfwidth(k, n))
    assert u["ecd_nm.mean"] == pytest.approx(stats.t.ppf(0.975, n - 1) * f["ecd_nm.sd"] / np.sqrt(n))
    d = json.loads(json.dumps(m.to_dict(), allow_nan=False))
    assert d["class_count"]["cube"] == k
    assert d["ecd"]["nm"]["by_class"]["cube"]["mean"] == pytest.approx(f["ecd_nm.cube.mean"])
    assert d["separation"]["silhouette"] == pytest.approx(f["silhouette"])
    assert all(isinstance(v, float) for v in f.values())


def test_standardise_with_sklearn_scaler():
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(6)
    x = rng.normal(3, 2, size=(50, 4))
    sc = StandardScaler().fit(x)
    np.testing.assert_allclose(standardise(x, sc), sc.transform(x))
    np.testing.assert_allclose(standardise(x), sc.transform(x))
    with pytest.raises(ValueError, match="dims"):
        standardise(x[:, :3], sc)


def test_zero_width_embeddings_count_as_none():
    df = table(["a", "a", "b", "b"], [1, 2, 3, 4])
    m = batch_metrics(df, np.zeros((4, 0)))
    assert m.standardisation == "none"
    assert all(math.isnan(m.flat()[k]) for k in ("silhouette", "total_variance", "pca.silhouette"))
    # identical embeddings: variances 0, silhouette undefined
    m = batch_metrics(df, np.ones((4, 3)))
    assert m.flat()["total_variance"] == 0.0 and math.isnan(m.flat()["silhouette"])
