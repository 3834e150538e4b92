"""Setpoint and rule models, and the plain helpers around them.

The pydantic models live in :mod:`qcloop.config` (section ``control``) so that the whole
configuration validates in one place; they are re-exported here. Example (YAML)::

    control:
      enabled: true
      planner: pi            # or bayes
      mode: advisory         # or command
      cooldown_batches: 1
      setpoints:
        - {name: temperature, unit: degC, min: 60, max: 100, max_step: 2.0}
        - {name: reagent_ratio, unit: "", min: 0.5, max: 2.5, max_step: 0.2}
      rules:
        # ECD mean above target -> raise the temperature by 0.4 degC per nm
        - {metric: ecd_nm.mean, setpoint: temperature, gain: 0.4}

The reactor publishes its current values, retained, on ``{prefix}/reactor/setpoints`` as
``{"setpoints": {"temperature": 80.0, ...}, "at": "..."}`` (a flat ``{"temperature": 80.0}``
mapping is accepted as well); each setpoint reads the key named by its ``source`` (default:
its ``name``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from qcloop.config import BayesConfig, ControlConfig, RuleSpec, SetpointSpec, TargetSpec

__all__ = [
    "BayesConfig",
    "ControlConfig",
    "RuleSpec",
    "SetpointSpec",
    "TargetSpec",
    "parse_reactor_setpoints",
    "resolve_rule_target",
    "to_unit",
    "from_unit",
]


def parse_reactor_setpoints(payload: Mapping[str, Any], specs: Sequence[SetpointSpec]) -> dict[str, float]:
    """Current setpoint values from a reactor message.

    Parameters
    ----------
    payload : mapping
        ``{"setpoints": {key: value}}`` or a flat ``{key: value}`` mapping.
    specs : sequence of SetpointSpec

    Returns
    -------
    dict of setpoint name to float
        Only the configured setpoints whose key is present with a finite number; unknown keys
        and non-numbers are ignored (the reactor may publish more than qcloop controls).
    """
    values = payload.get("setpoints", payload) if isinstance(payload, Mapping) else {}
    if not isinstance(values, Mapping):
        return {}
    out: dict[str, float] = {}
    for spec in specs:
        raw = values.get(spec.source or spec.name)
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            continue
        v = float(raw)
        if math.isfinite(v):
            out[spec.name] = v
    return out


def resolve_rule_target(rule: RuleSpec, targets: Mapping[str, TargetSpec]) -> tuple[float | None, float | None,
                                                                                    float | None, float | None]:
    """The (target, tolerance, min, max) a rule steers to.

    ``rule.target`` / ``rule.tolerance`` win over ``targets[rule.metric]``. A rule needs either a
    target value or at least one of min/max; callers check that.
    """
    spec = targets.get(rule.metric)
    target = rule.target if rule.target is not None else (spec.target if spec is not None else None)
    tolerance = rule.tolerance if rule.tolerance is not None else (spec.tolerance if spec is not None else None)
    lo = spec.min if spec is not None else None
    hi = spec.max if spec is not None else None
    return target, tolerance, lo, hi


def to_unit(values: Mapping[str, float], specs: Sequence[SetpointSpec]) -> list[float]:
    """Setpoint values scaled to [0, 1] by each setpoint's [min, max] (order of ``specs``)."""
    return [(float(values[s.name]) - s.min) / (s.max - s.min) for s in specs]


def from_unit(u: Sequence[float], specs: Sequence[SetpointSpec]) -> dict[str, float]:
    """Inverse of :func:`to_unit`."""
    return {s.name: s.min + float(x) * (s.max - s.min) for s, x in zip(specs, u)}
