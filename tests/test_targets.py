"""QC targets: limits, missing values, confidence, name validation, config loading."""

from __future__ import annotations

import json
import math

import pytest

from qcloop.config import TargetSpec, load_settings
from qcloop.errors import ConfigError
from qcloop.targets import (
    evaluate_targets,
    is_metric_name,
    load_targets,
    parse_targets,
    validate_target_names,
)

FLAT = {
    "n_particles": 200.0,
    "n_images": 3.0,
    "class_count.cube": 184.0,
    "class_fraction.cube": 0.92,
    "class_count.triangle": 16.0,
    "class_fraction.triangle": 0.08,
    "ecd_nm.mean": 131.0,
    "ecd_nm.sd": 4.0,
    "ecd_nm.cv": 4.0 / 131,
    "ecd_nm.cube.mean": 132.0,
    "silhouette": 0.62,
    "inter_class_variance": float("nan"),
}


def T(**kw):
    return TargetSpec(**kw)


def test_min_max_target_pass_and_fail():
    v = evaluate_targets(FLAT, {
        "class_fraction.cube": T(min=0.9),
        "ecd_nm.mean": T(target=130, tolerance=5),
        "ecd_nm.cv": T(max=0.02),
        "silhouette": T(min=0.5, max=0.6),
    })
    by = {c.metric: c for c in v.checks}
    assert by["class_fraction.cube"].passed
    assert by["ecd_nm.mean"].passed and "within 130 ± 5" in by["ecd_nm.mean"].message
    assert not by["ecd_nm.cv"].passed and "outside <= 0.02" in by["ecd_nm.cv"].message
    assert not by["silhouette"].passed
    assert not v.passed
    assert v.failed == ["ecd_nm.cv", "silhouette"]


def test_limits_are_inclusive():
    v = evaluate_targets(FLAT, {"ecd_nm.mean": T(target=126, tolerance=5), "silhouette": T(max=0.62)})
    assert v.passed


def test_absent_class_fraction_is_zero_but_other_missing_metrics_fail():
    v = evaluate_targets(FLAT, {
        "class_fraction.sphere": T(max=0.05),
        "class_count.sphere": T(max=0),
        "ecd_nm.sphere.mean": T(min=100),
        "inter_class_variance": T(min=0),
        "orientation_deg.rod.mean_resultant_length": T(min=0.5),
    })
    by = {c.metric: c for c in v.checks}
    assert by["class_fraction.sphere"].passed and by["class_fraction.sphere"].observed == 0.0
    assert by["class_count.sphere"].passed
    assert not by["ecd_nm.sphere.mean"].passed
    assert "no particles of class 'sphere'" in by["ecd_nm.sphere.mean"].message
    assert not by["inter_class_variance"].passed and "NaN" in by["inter_class_variance"].message
    assert "not elongated" in by["orientation_deg.rod.mean_resultant_length"].message


def test_empty_batch_fractions_fail():
    v = evaluate_targets({"n_particles": 0.0}, {"class_fraction.cube": T(min=0.9)})
    assert not v.passed and "no particles" in v.checks[0].message


def test_confidence_from_uncertainty():
    unc = {"ecd_nm.mean": 1.0, "class_fraction.cube": 0.04}
    v = evaluate_targets(FLAT, {"ecd_nm.mean": T(target=130, tolerance=5),
                                "class_fraction.cube": T(min=0.9)}, unc)
    by = {c.metric: c for c in v.checks}
    assert by["ecd_nm.mean"].confident is True  # [130, 132] inside [125, 135]
    # 184/200 -> Wilson interval about [0.875, 0.95]: straddles 0.9
    assert by["class_fraction.cube"].passed and by["class_fraction.cube"].confident is False
    assert v.not_confident == ["class_fraction.cube"] and not v.confident
    # an interval wider than the tolerance can never be a confident pass
    v2 = evaluate_targets(FLAT, {"ecd_nm.mean": T(target=131, tolerance=1)}, {"ecd_nm.mean": 1.5})
    assert v2.passed and v2.checks[0].confident is False
    # confident fail: interval entirely outside
    v3 = evaluate_targets(FLAT, {"ecd_nm.mean": T(max=120)}, {"ecd_nm.mean": 2.0})
    assert not v3.passed and v3.checks[0].confident is True
    # no uncertainty known -> not assessed
    assert evaluate_targets(FLAT, {"silhouette": T(min=0.5)}, unc).checks[0].confident is None


def test_absent_class_gets_wilson_upper_bound():
    # 0 of 200: Wilson upper bound ~0.019 -> confidently below 0.05, not below 0.01
    v = evaluate_targets(FLAT, {"class_fraction.sphere": T(max=0.05)}, {})
    assert v.checks[0].confident is True
    v = evaluate_targets(FLAT, {"class_fraction.sphere": T(max=0.01)}, {})
    assert v.checks[0].passed and v.checks[0].confident is False


def test_no_targets_passes_and_to_dict_is_json():
    assert evaluate_targets(FLAT, {}).passed
    v = evaluate_targets(FLAT, {"inter_class_variance": T(min=1), "ecd_nm.mean": T(min=1)}, {"ecd_nm.mean": math.inf})
    d = json.loads(json.dumps(v.to_dict(), allow_nan=False))
    assert d["passed"] is False and d["checks"][0]["observed"] is None
    assert d["checks"][1]["uncertainty"] is None and d["checks"][1]["confident"] is False


@pytest.mark.parametrize("name", [
    "n_particles", "silhouette", "pca.silhouette", "pca.inter_class_variance", "total_variance",
    "class_fraction.cube", "class_count.dumb-bell_2", "ecd_nm.mean", "ecd_px.d90",
    "ecd_nm.cube.cv", "orientation_deg.rod.mean_resultant_length",
])
def test_valid_names(name):
    assert is_metric_name(name)


@pytest.mark.parametrize("name", [
    "class_fraction", "class_fraction.", "ecd_nm.median", "ecd_um.mean", "silhuette",
    "pca.n_particles", "orientation_deg.rod.sd", "ecd_nm.a.b.mean",
])
def test_invalid_names(name):
    assert not is_metric_name(name)


def test_validate_target_names_message():
    with pytest.raises(ConfigError) as exc:
        validate_target_names({"class_fractoin.cube": T(min=1), "ecd_nm.mean": T(min=1)})
    msg = str(exc.value)
    assert "targets.class_fractoin.cube: unknown metric" in msg
    assert "did you mean 'class_fraction.cube'" in msg
    assert "ecd_nm.mean:" not in msg


def test_target_spec_validation():
    for bad in ({}, {"target": 1}, {"tolerance": 1}, {"min": 2, "max": 1}, {"target": 1, "tolerance": -1}):
        with pytest.raises(Exception):
            TargetSpec(**bad)
    with pytest.raises(ConfigError, match="targets.ecd_nm.mean.tolerance"):
        load_settings(use_env=False, targets={"ecd_nm.mean": {"target": 130}})
    with pytest.raises(ConfigError, match="Extra inputs"):
        load_settings(use_env=False, targets={"ecd_nm.mean": {"minimum": 130}})


def test_load_targets_file(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("targets:\n  class_fraction.cube: {min: 0.9}\n  ecd_nm.mean: {target: 130, tolerance: 5}\n")
    t = load_targets(p)
    assert t["ecd_nm.mean"].tolerance == 5
    p.write_text("silhouette: {min: 0.5}\n")
    assert load_targets(p)["silhouette"].min == 0.5
    p.write_text("silhouette: {mn: 0.5}\n")
    with pytest.raises(ConfigError, match="targets.silhouette.mn"):
        load_targets(p)
    p.write_text("silhouete: {min: 0.5}\n")
    with pytest.raises(ConfigError, match="unknown metric"):
        load_targets(p)
    assert parse_targets({})  == {}
