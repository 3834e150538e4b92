"""Incremental (velocity-form) PI rules: metric deviation -> setpoint move, per batch.

For a rule with ``e_k = observed_k - target`` on batch ``k``::

    move_k = gain * e_k + kp * (e_k - e_{k-1})        (setpoint units)

and the suggestion is ``current + sum of the moves of the rules on that setpoint``, then clipped
by the safety layer (bounds, ``max_step``). ``gain`` is the integral action -- the setpoint itself
integrates the error from batch to batch -- and ``kp`` an optional proportional action on the
change of the error.

Why the velocity form: the integrator *is* the setpoint the reactor reports back, so a move the
safety layer clipped, a suggestion the operator rejected or a bound the setpoint sits on is never
accumulated anywhere (anti-windup by construction): as soon as the error changes sign the next
move goes the other way, however long the setpoint was saturated (tested). A rule is silent
inside its deadband (default: the target's tolerance) and held when its metric is missing or its
95 % confidence half-width is wider than the tolerance.

For a ``min``/``max`` target without a ``target`` value the error is the distance to the violated
limit (0 inside the range).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from scipy.stats import norm

from qcloop.config import RuleSpec, TargetSpec
from qcloop.control.safety import uncertain
from qcloop.control.setpoints import resolve_rule_target

Z95 = 1.959963984540054


@dataclass(frozen=True)
class RuleEval:
    """What one rule saw on one batch and what it asks for.

    status : ``act`` (asks for ``delta``), ``in_band`` (within its deadband), ``no_data`` (metric
    missing / NaN) or ``uncertain`` (CI half-width wider than the tolerance).
    reference : the value the error is measured from (the target, or the violated limit).
    confidence : probability (normal approximation from the 95 % half-width) that the true
    value lies outside the accepted range; None without an uncertainty estimate.
    """

    index: int
    metric: str
    setpoint: str
    observed: float | None
    reference: float | None
    tolerance: float | None
    halfwidth: float | None
    error: float | None
    status: str
    delta: float
    confidence: float | None

    @property
    def severity(self) -> float:
        """|error| in tolerances (or raw |error| without a tolerance); 0 without data."""
        if self.error is None:
            return 0.0
        return abs(self.error) / (self.tolerance or 1.0)


def observed_value(flat: Mapping[str, float], metric: str) -> float | None:
    """Metric value from a flat metrics dict; a class fraction of an absent class in a non-empty
    batch is 0 (as :func:`qcloop.targets.evaluate_targets` treats it); NaN / missing -> None."""
    v = flat.get(metric)
    if v is None and metric.startswith(("class_fraction.", "class_count.")):
        n = flat.get("n_particles") or 0
        if n and n > 0:
            v = 0.0
    if v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def accepted_range(target: float | None, tolerance: float | None, lo: float | None,
                   hi: float | None) -> tuple[float, float]:
    """The [low, high] range a metric must lie in (same rule as :mod:`qcloop.targets`)."""
    a, b = -math.inf, math.inf
    if lo is not None:
        a = max(a, lo)
    if hi is not None:
        b = min(b, hi)
    if target is not None:
        t = tolerance or 0.0
        a, b = max(a, target - t), min(b, target + t)
    return a, b


def outside_probability(observed: float, halfwidth: float | None, low: float, high: float) -> float | None:
    """P(true value outside [low, high]) for a normal estimate with 95 % half-width ``halfwidth``."""
    if halfwidth is None or not math.isfinite(halfwidth) or halfwidth < 0:
        return None
    if halfwidth == 0:
        return 0.0 if low <= observed <= high else 1.0
    se = halfwidth / Z95
    p = 0.0
    if math.isfinite(low):
        p += float(norm.cdf((low - observed) / se))
    if math.isfinite(high):
        p += float(norm.sf((high - observed) / se))
    return min(1.0, p)


def rule_error(observed: float, target: float | None, lo: float | None, hi: float | None) -> tuple[float, float]:
    """(error, reference): distance to the target, else to the violated min/max (0 inside)."""
    if target is not None:
        return observed - target, target
    if lo is not None and observed < lo:
        return observed - lo, lo
    if hi is not None and observed > hi:
        return observed - hi, hi
    ref = lo if lo is not None else (hi if hi is not None else observed)
    return 0.0, ref


def evaluate_rules(rules: Sequence[RuleSpec], targets: Mapping[str, TargetSpec], flat: Mapping[str, float],
                   uncertainty: Mapping[str, float] | None, prev_errors: Mapping[str, float | None],
                   *, hold_when_uncertain: bool = True) -> list[RuleEval]:
    """Evaluate every rule on one batch's metrics.

    Parameters
    ----------
    rules : sequence of RuleSpec
    targets : mapping of metric name to TargetSpec
    flat : mapping of str to float
        :meth:`qcloop.batch.BatchMetrics.flat` of the batch.
    uncertainty : mapping of str to float, optional
        95 % CI half-widths (:meth:`qcloop.batch.BatchMetrics.uncertainty`).
    prev_errors : mapping of rule key (``str(index)``) to the previous error (or None)

    Returns
    -------
    list of RuleEval, one per rule, in order.
    """
    unc = uncertainty or {}
    out: list[RuleEval] = []
    for i, rule in enumerate(rules):
        target, tol, lo, hi = resolve_rule_target(rule, targets)
        obs = observed_value(flat, rule.metric)
        hw_raw = unc.get(rule.metric)
        hw = None if hw_raw is None else float(hw_raw)
        if obs is None:
            out.append(RuleEval(i, rule.metric, rule.setpoint, None, target, tol, hw, None, "no_data", 0.0, None))
            continue
        err, ref = rule_error(obs, target, lo, hi)
        a, b = accepted_range(target, tol, lo, hi)
        conf = outside_probability(obs, hw, a, b)
        deadband = rule.deadband if rule.deadband is not None else (tol if target is not None and tol else 0.0)
        if hold_when_uncertain and uncertain(hw, tol):
            out.append(RuleEval(i, rule.metric, rule.setpoint, obs, ref, tol, hw, err, "uncertain", 0.0, conf))
            continue
        if abs(err) <= deadband:
            out.append(RuleEval(i, rule.metric, rule.setpoint, obs, ref, tol, hw, err, "in_band", 0.0, conf))
            continue
        prev = prev_errors.get(str(i))
        delta = rule.gain * err
        if rule.kp and prev is not None and math.isfinite(prev):
            delta += rule.kp * (err - prev)
        out.append(RuleEval(i, rule.metric, rule.setpoint, obs, ref, tol, hw, err, "act", float(delta), conf))
    return out


def pi_proposal(evals: Sequence[RuleEval], current: Mapping[str, float]) -> dict[str, float]:
    """Sum the moves of the acting rules per setpoint: ``{setpoint: current + sum(delta)}``."""
    moves: dict[str, float] = {}
    for ev in evals:
        if ev.status == "act" and ev.delta != 0.0 and math.isfinite(ev.delta):
            moves[ev.setpoint] = moves.get(ev.setpoint, 0.0) + ev.delta
    return {name: float(current[name]) + d for name, d in moves.items() if name in current}
