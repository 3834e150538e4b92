"""The batch-metric name grammar: one declaration (qcloop.batch.METRIC_FAMILIES) behind
BatchMetrics.flat(), the target names and the Prometheus labels; lobe-diameter statistics."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from qcloop.batch import METRIC_FAMILIES, batch_metrics, metric_name_forms, parse_metric_name
from qcloop.config import TargetSpec
from qcloop.daemon.metrics import split_metric_name
from qcloop.targets import METRIC_NAME_FORMS, evaluate_targets, is_metric_name, parse_targets


def _batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    n = 120
    cls = rng.choice(["sphere", "dumbbell", "rod", "unknown"], n)
    ecd = rng.normal(60, 4, n)
    lobes = np.where(cls == "dumbbell", 2, 1)
    lobe_d = np.where(lobes == 2, ecd / math.sqrt(2), ecd)  # two discs of half the area
    df = pd.DataFrame({
        "image": rng.choice(["a", "b"], n), "particle_id": np.arange(1, n + 1), "class": cls,
        "ecd_nm": ecd, "ecd_px": ecd / 2, "lobe_diameter_nm": lobe_d, "lobe_diameter_px": lobe_d / 2,
        "lobes": lobes, "touches_border": rng.random(n) < 0.1,
        "aspect_ratio": np.where(cls == "rod", 3.0, 1.0), "orientation_deg": rng.uniform(0, 180, n),
    })
    return df, batch_metrics(df, rng.normal(size=(n, 5)))


def test_every_flat_name_belongs_to_exactly_one_family_and_round_trips():
    _, m = _batch()
    flat = m.flat()
    assert len(flat) > 80
    for name in flat:
        hits = [f for f in METRIC_FAMILIES if f.pattern.fullmatch(name)]
        assert len(hits) == 1, (name, [f.base for f in hits])
        fam, cls, stat = parse_metric_name(name)
        assert fam.name(cls, stat) == name
        assert is_metric_name(name), name  # a target may name it
        metric, label = split_metric_name(name)  # the Prometheus labels
        assert fam.name(label or None, metric.split(".")[-1] if fam.stats else None) == name
    # every family produces names on a batch that has classes, sizes, embeddings, rods
    produced = {parse_metric_name(n)[0] for n in flat}
    assert produced == set(METRIC_FAMILIES)
    assert tuple(metric_name_forms()) == METRIC_NAME_FORMS


@pytest.mark.parametrize("name, labels", [
    ("class_fraction.rod", ("class_fraction", "rod")),
    ("ecd_nm.rod.d90", ("ecd_nm.d90", "rod")),
    ("lobe_diameter_nm.dumbbell.mean", ("lobe_diameter_nm.mean", "dumbbell")),
    ("lobe_diameter_px.d50", ("lobe_diameter_px.d50", "")),
    ("orientation_deg.rod.circular_sd", ("orientation_deg.circular_sd", "rod")),
    ("pca.silhouette", ("pca.silhouette", "")),
    ("n_border", ("n_border", "")),
    ("not.a.metric.name", ("not.a.metric.name", "")),
])
def test_prometheus_labels(name, labels):
    assert split_metric_name(name) == labels


@pytest.mark.parametrize("name", ["lobe_diameter_nm.mean", "lobe_diameter_nm.dumbbell.sd",
                                  "lobe_diameter_nm.dumbbell.d50", "lobe_diameter_px.sphere.cv"])
def test_lobe_diameter_names_are_targets(name):
    assert is_metric_name(name)
    parse_targets({name: {"max": 100}})


@pytest.mark.parametrize("name", ["lobe_diameter.mean", "lobe_diameter_um.mean",
                                  "lobe_diameter_nm.dumbbell.median", "lobe_diameters_nm.mean"])
def test_bad_lobe_names_are_rejected(name):
    assert not is_metric_name(name)


def test_lobe_diameter_statistics_per_class():
    df, m = _batch(3)
    inner = df[~df["touches_border"]]
    d = inner.loc[inner["class"] == "dumbbell", "lobe_diameter_nm"].to_numpy()
    flat, unc = m.flat(), m.uncertainty()
    assert flat["lobe_diameter_nm.dumbbell.mean"] == pytest.approx(d.mean())
    assert flat["lobe_diameter_nm.dumbbell.sd"] == pytest.approx(d.std(ddof=1))
    assert flat["lobe_diameter_nm.dumbbell.d50"] == pytest.approx(np.median(d))
    assert flat["lobe_diameter_px.dumbbell.mean"] == pytest.approx(d.mean() / 2)
    # one-lobe classes: the lobe diameter is the ECD
    assert flat["lobe_diameter_nm.sphere.mean"] == pytest.approx(flat["ecd_nm.sphere.mean"])
    assert flat["lobe_diameter_nm.dumbbell.mean"] < flat["ecd_nm.dumbbell.mean"]
    assert 0 < unc["lobe_diameter_nm.dumbbell.mean"] < 5
    doc = m.to_dict()
    assert doc["lobe_diameter"]["nm"]["by_class"]["dumbbell"]["mean"] == pytest.approx(d.mean())
    assert doc["lobe_diameter"]["nm"]["by_class"]["dumbbell"]["n"] == d.size
    # and a target on it is checked with its confidence interval
    v = evaluate_targets(flat, {"lobe_diameter_nm.dumbbell.mean": TargetSpec(target=d.mean(), tolerance=5)}, unc)
    assert v.passed and v.checks[0].confident is True


def test_lobe_target_on_absent_class_fails_with_reason():
    _, m = _batch()
    v = evaluate_targets(m.flat(), {"lobe_diameter_nm.trimer.mean": TargetSpec(max=80)}, m.uncertainty())
    assert not v.passed and "no particles of class 'trimer'" in v.checks[0].message


def test_without_lobe_column_the_statistics_are_nan_not_missing():
    df, _ = _batch()
    m = batch_metrics(df.drop(columns=["lobe_diameter_nm", "lobe_diameter_px"]), None)
    flat = m.flat()
    assert math.isnan(flat["lobe_diameter_nm.mean"]) and math.isnan(flat["lobe_diameter_nm.sphere.d50"])
