"""Bayesian planner: Gaussian-process model of the objective over the setpoints.

Objective of a batch (lower is better, 0 = every objective metric on target)::

    J = sum_m weight_m * (error_m / scale_m) ** 2

with ``error_m`` as in :func:`qcloop.control.pi.rule_error` (distance to the target value, or to
the violated min/max) and ``scale_m`` the target's tolerance (for a min/max-only target: 10 % of
the limit's magnitude, 1 if the limit is 0). The metrics and weights are
``control.bayes.objective``; by default the rules' metrics, else every target.

Planning (:func:`propose`): the setpoints are scaled to [0, 1] by their bounds; a scikit-learn
``GaussianProcessRegressor`` (constant * Matern 5/2 with one length scale per setpoint, plus a
linear ``DotProduct`` term so that a slope is extrapolated, plus white noise for batch-to-batch
scatter; ``normalize_y``) is fitted to ``log1p(J)`` of the recent batch history. The next
setpoints maximise expected improvement over the best predicted mean of the visited points
among random candidates in the trust region ``current ± trust_region * max_step`` (within the
bounds). Until ``n_initial`` distinct points are known the planner probes one setpoint at a time
by ``probe_fraction * max_step`` towards the side of its range with more room. Whatever it
proposes then goes through the same safety layer as the PI rules.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from qcloop.config import BayesConfig, RuleSpec, SetpointSpec, TargetSpec
from qcloop.control.pi import observed_value, rule_error
from qcloop.control.setpoints import from_unit, to_unit


@dataclass(frozen=True)
class ObjectiveTerm:
    metric: str
    weight: float
    target: float | None
    min: float | None
    max: float | None
    scale: float


def objective_terms(bayes: BayesConfig, rules: Sequence[RuleSpec],
                    targets: Mapping[str, TargetSpec]) -> list[ObjectiveTerm]:
    """The metrics the objective sums, with their weights, references and scales."""
    if bayes.objective:
        weights = dict(bayes.objective)
    elif rules:
        weights = {r.metric: 1.0 for r in rules}
    else:
        weights = {m: 1.0 for m in targets}
    terms = []
    for metric, w in weights.items():
        rule = next((r for r in rules if r.metric == metric), None)
        spec = targets.get(metric)
        target = rule.target if rule is not None and rule.target is not None else (spec.target if spec else None)
        tol = rule.tolerance if rule is not None and rule.tolerance is not None else (spec.tolerance if spec else None)
        lo = spec.min if spec else None
        hi = spec.max if spec else None
        if target is None and lo is None and hi is None:
            continue
        if tol:
            scale = float(tol)
        else:
            ref = target if target is not None else (lo if lo is not None else hi)
            scale = 0.1 * abs(float(ref)) if ref else 1.0  # type: ignore[arg-type]
        terms.append(ObjectiveTerm(metric, float(w), target, lo, hi, scale))
    return terms


def objective(flat: Mapping[str, float], terms: Sequence[ObjectiveTerm]) -> tuple[float | None, dict[str, float]]:
    """(J, per-metric normalised errors); J is None when a term's metric is missing."""
    total = 0.0
    parts: dict[str, float] = {}
    for t in terms:
        obs = observed_value(flat, t.metric)
        if obs is None:
            return None, parts
        err, _ = rule_error(obs, t.target, t.min, t.max)
        z = err / t.scale
        parts[t.metric] = z
        total += t.weight * z * z
    return total, parts


@dataclass(frozen=True)
class BayesPlan:
    """Proposal of the planner (setpoint values before the safety layer) and how it was found."""

    proposal: dict[str, float]
    method: str  # "probe" or "gp-ei"
    predicted_objective: float | None = None
    expected_improvement: float | None = None
    n_points: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "predicted_objective": self.predicted_objective,
                "expected_improvement": self.expected_improvement, "n_points": self.n_points}


def _distinct(X: np.ndarray, tol: float = 1e-6) -> int:
    if len(X) == 0:
        return 0
    keep: list[np.ndarray] = []
    for x in X:
        if not any(np.max(np.abs(x - k)) <= tol for k in keep):
            keep.append(x)
    return len(keep)


def _probe(current: Mapping[str, float], specs: Sequence[SetpointSpec], k: int, fraction: float) -> dict[str, float]:
    spec = specs[k % len(specs)]
    cur = float(current[spec.name])
    room_up, room_down = spec.max - cur, cur - spec.min
    sign = 1.0 if room_up >= room_down else -1.0
    out = dict(current)
    out[spec.name] = cur + sign * fraction * spec.max_step
    return {s.name: out[s.name] for s in specs}


LENGTH_SCALE_MIN = 0.15


def _gp(n_dims: int, seed: int):
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, DotProduct, Matern, WhiteKernel

    # length scales in units of the setpoint range: a process response is smooth on the scale of
    # a tenth of the operating window; the scaled linear term lets a trend extrapolate
    kernel = (ConstantKernel(1.0, (1e-3, 1e3))
              * Matern(length_scale=[0.5] * n_dims, length_scale_bounds=(LENGTH_SCALE_MIN, 20.0), nu=2.5)
              + ConstantKernel(1.0, (1e-4, 1e3)) * DotProduct(sigma_0=0.5, sigma_0_bounds="fixed")
              + WhiteKernel(noise_level=0.05, noise_level_bounds=(1e-5, 1.0)))
    return GaussianProcessRegressor(kernel=kernel, normalize_y=True, n_restarts_optimizer=0, random_state=seed)


def expected_improvement(mu: np.ndarray, sigma: np.ndarray, best: float, xi: float) -> np.ndarray:
    """EI for minimisation: E[max(best - xi - f, 0)] under f ~ N(mu, sigma^2)."""
    from scipy.stats import norm

    imp = best - mu - xi
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(sigma > 0, imp / sigma, 0.0)
    ei = np.where(sigma > 0, imp * norm.cdf(z) + sigma * norm.pdf(z), np.maximum(imp, 0.0))
    return np.maximum(ei, 0.0)


def _term_values(terms: Sequence[ObjectiveTerm], values: Mapping[str, np.ndarray]) -> np.ndarray:
    """Objective J for arrays of metric values (same shape each); vectorised :func:`objective`."""
    total = None
    for t in terms:
        v = np.asarray(values[t.metric], dtype=np.float64)
        if t.target is not None:
            err = v - t.target
        else:
            err = np.zeros_like(v)
            if t.min is not None:
                err = np.where(v < t.min, v - t.min, err)
            if t.max is not None:
                err = np.where(v > t.max, v - t.max, err)
        part = t.weight * (err / t.scale) ** 2
        total = part if total is None else total + part
    assert total is not None
    return total


def _fit(X: np.ndarray, y: np.ndarray, seed: int):
    gp = _gp(X.shape[1], seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on bound-hugging hyper-parameters
        gp.fit(X, y)
    return gp


def propose(history: Sequence[Mapping[str, Any]], current: Mapping[str, float], specs: Sequence[SetpointSpec],
            cfg: BayesConfig, terms: Sequence[ObjectiveTerm] | None = None) -> BayesPlan:
    """Next setpoints from the batch history.

    Parameters
    ----------
    history : sequence of mapping
        Past batches, oldest first: ``{"setpoints": {name: float}, "objective": float,
        "metrics": {metric: float}}``; entries without every setpoint or with a non-finite
        objective are skipped; only the last ``cfg.history`` are used.
    current : mapping of name to float
        Setpoints in force now (the proposal is at most one ``max_step`` away).
    specs : sequence of SetpointSpec
    cfg : BayesConfig
    terms : sequence of ObjectiveTerm, optional
        Needed for ``cfg.model == "metrics"`` (falls back to ``"objective"`` without them).

    Returns
    -------
    BayesPlan
        ``proposal`` holds a value for every setpoint (not yet clipped by the safety layer).
    """
    composite = cfg.model == "metrics" and bool(terms)
    rows = []
    for h in history:
        sp, j = h.get("setpoints") or {}, h.get("objective")
        if j is None or not math.isfinite(float(j)) or any(s.name not in sp for s in specs):
            continue
        mets = h.get("metrics") or {}
        if composite and any(mets.get(t.metric) is None for t in terms or ()):
            continue
        rows.append((to_unit(sp, specs), float(j), mets))
    rows = rows[-cfg.history:]
    X = np.array([r[0] for r in rows], dtype=np.float64).reshape(-1, len(specs))
    y = np.array([r[1] for r in rows], dtype=np.float64)
    n_initial = cfg.n_initial if cfg.n_initial is not None else len(specs) + 1
    n_distinct = _distinct(X)
    if n_distinct < n_initial or len(rows) < 3:
        k = max(0, n_distinct - 1)
        return BayesPlan(_probe(current, specs, k, cfg.probe_fraction), "probe", n_points=len(rows))

    seed = cfg.seed + len(rows)
    rng = np.random.default_rng(seed)
    if composite:
        assert terms is not None
        gps = {t.metric: _fit(X, np.array([r[2][t.metric] for r in rows], dtype=np.float64), seed) for t in terms}
        z = rng.standard_normal((cfg.mc_samples, len(terms)))

        def predict(P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """(J at the predicted means, EI-ready samples of J: shape (samples, n))."""
            means, samples = {}, {}
            for i, t in enumerate(terms):
                mu, sd = gps[t.metric].predict(P, return_std=True)
                means[t.metric] = mu
                samples[t.metric] = mu[None, :] + sd[None, :] * z[:, i:i + 1]
            return _term_values(terms, means), _term_values(terms, samples)
    else:
        gp = _fit(X, np.log1p(np.maximum(y, 0.0)), seed)

        def predict(P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            mu, sd = gp.predict(P, return_std=True)
            return mu, np.stack([mu, sd])

    j_seen, _ = predict(X)
    incumbent = X[int(np.argmin(j_seen))]
    best = float(np.min(j_seen))
    cu = np.clip(np.array(to_unit(current, specs)), 0.0, 1.0)
    step = np.array([s.max_step / (s.max - s.min) for s in specs])
    half = cfg.trust_region * step
    # trust region around the incumbent (best predicted visited point), within one max_step of now
    lo = np.maximum(np.clip(incumbent - half, 0.0, 1.0), np.clip(cu - step, 0.0, 1.0))
    hi = np.minimum(np.clip(incumbent + half, 0.0, 1.0), np.clip(cu + step, 0.0, 1.0))
    if np.any(lo > hi):
        # the incumbent is more than a step away: head back towards it (the safety layer clips)
        j_inc, _ = predict(incumbent[None, :])
        return BayesPlan(from_unit(incumbent, specs), "return", predicted_objective=_j(j_inc[0], composite),
                         expected_improvement=0.0, n_points=len(rows))
    cand = lo + (hi - lo) * rng.random((cfg.candidates, len(specs)))
    corners = np.array(np.meshgrid(*[[a, b] for a, b in zip(lo, hi)])).reshape(len(specs), -1).T
    cand = np.vstack([cand, corners, np.clip(incumbent, lo, hi)[None, :], np.clip(cu, lo, hi)[None, :]])
    j_mean, extra = predict(cand)
    if composite:
        ei = np.maximum(best - cfg.xi - extra, 0.0).mean(axis=0)
    else:
        ei = expected_improvement(extra[0], extra[1], best, cfg.xi)
    if float(np.max(ei)) <= 1e-12:
        i = int(np.argmin(j_mean))  # nothing expected to improve: go to the best predicted mean
    else:
        i = int(np.argmax(ei))
    return BayesPlan(from_unit(cand[i], specs), "gp-ei", predicted_objective=_j(j_mean[i], composite),
                     expected_improvement=float(ei[i]), n_points=len(rows))


def _j(value: float, composite: bool) -> float:
    return float(value) if composite else float(np.expm1(value))
