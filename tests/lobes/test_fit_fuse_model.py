"""The route that refits FUSE_MODEL (bench/fit_fuse_model.py), on pairs with a known model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

from qcloop.lobes import FUSE_MODEL, fuse_logit

_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "fit_fuse_model.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("fit_fuse_model", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refit_recovers_the_model_that_labelled_the_pairs():
    fit_fuse_model = _load_script()
    rng = np.random.default_rng(0)
    n = 20_000
    pairs = pd.DataFrame({"neck": rng.uniform(0, 1.2, n), "contrast": rng.uniform(0, 0.5, n),
                          "line_contrast": rng.uniform(0, 0.6, n), "overlap": rng.uniform(0.4, 1.1, n),
                          "gap": rng.uniform(0, 1.0, n), "same_region": rng.integers(0, 2, n).astype(float)})
    pairs.loc[::10, "overlap"] = np.nan  # no circle: fuse_logit uses the neutral overlap
    truth = dict(FUSE_MODEL)
    p = 1.0 / (1.0 + np.exp(-fuse_logit(pairs, truth)))
    pairs = pairs.assign(fused=(rng.random(n) < p).astype(int), split="train")
    refit = fit_fuse_model.fit(pairs, c=1e6)  # (almost) no penalty: the maximum-likelihood weights
    assert set(refit) == set(FUSE_MODEL)
    for name, weight in truth.items():
        assert abs(refit[name] - weight) < 0.15 * max(abs(weight), 2.0), (name, refit[name], weight)
    scores = fit_fuse_model.score(pairs, refit, fit_fuse_model.LobesConfig())
    assert scores["pairs"] == n and 0 < scores["log_loss"] < np.log(2)


def test_mutual_nearest_matches_one_to_one_within_the_distance():
    fit_fuse_model = _load_script()
    ours = np.array([[0.0, 0.0], [10.0, 0.0], [10.5, 0.0], [50.0, 50.0]])
    theirs = np.array([[1.0, 0.0], [10.2, 0.0], [80.0, 80.0]])
    np.testing.assert_array_equal(fit_fuse_model._mutual_nearest(ours, theirs, 5.0), [0, 1, -1, -1])
