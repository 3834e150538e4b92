"""QC targets: compare a batch's metrics with the configured limits and give a verdict.

Targets come from the ``targets:`` section of the configuration (or a separate YAML file for
``qcloop batch --targets``), one :class:`qcloop.config.TargetSpec` per metric name::

    targets:
      class_fraction.cube: {min: 0.9}
      ecd_nm.mean: {target: 130, tolerance: 5}
      ecd_nm.cv: {max: 0.08}
      silhouette: {min: 0.5}

Metric names are those of :meth:`qcloop.batch.BatchMetrics.flat`, declared once as
:data:`qcloop.batch.METRIC_FAMILIES`; :func:`validate_target_names` checks them at start (class
names are free: ``class_fraction.<any class>``, ``lobe_diameter_nm.<any class>.mean``).

Missing values
--------------
* ``class_fraction.<cls>`` / ``class_count.<cls>`` of a class that does not occur in a
  non-empty batch is **0** (the class is genuinely absent) and is checked like any value.
* Any other metric that is missing or NaN (class absent, no pixel size, too few particles,
  no embeddings) **fails** with a message saying why -- a target that cannot be checked is
  never silently passed.

Uncertainty
-----------
With the 95 % half-widths from :meth:`qcloop.batch.BatchMetrics.uncertainty`, each check also
says whether it is *confident*: the whole interval ``observed ± halfwidth`` lies inside the
accepted range (confident pass) or outside it (confident fail); class fractions use the
(asymmetric) Wilson score interval itself. A check whose interval straddles
a limit -- for instance because the interval is wider than the tolerance -- is not confident; the
controller holds its setpoints on such a verdict. Metrics without an uncertainty estimate have
``confident = None``.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pydantic import TypeAdapter, ValidationError

from qcloop.batch import (METRIC_FAMILIES, metric_name_forms, parse_metric_name,
                          wilson_halfwidth, wilson_interval)
from qcloop.config import TargetSpec
from qcloop.errors import ConfigError

#: human-readable list of the accepted names, for error messages and docs
METRIC_NAME_FORMS = tuple(metric_name_forms())
_FIXED = frozenset(fam.name(None, st) for fam in METRIC_FAMILIES
                   if not fam.per_class for st in fam.stats)


def is_metric_name(name: str) -> bool:
    """True when ``name`` is a metric :meth:`BatchMetrics.flat` can produce."""
    return parse_metric_name(name) is not None


def validate_target_names(targets: Mapping[str, Any]) -> None:
    """Raise ConfigError listing every target whose metric name is not a batch metric.

    Parameters
    ----------
    targets : mapping of metric name to TargetSpec (or anything)

    Raises
    ------
    ConfigError
        ``targets.<name>: unknown metric`` per bad name, with the closest valid spelling when
        there is one, followed by the accepted forms.
    """
    bad = [name for name in targets if not is_metric_name(str(name))]
    if not bad:
        return
    examples = sorted(_FIXED) + ["class_fraction.cube", "class_count.cube", "ecd_nm.mean",
                                 "ecd_nm.cv", "ecd_nm.d50", "ecd_px.mean", "ecd_nm.cube.mean",
                                 "lobe_diameter_nm.dumbbell.mean", "lobe_diameter_nm.dumbbell.sd",
                                 "orientation_deg.rod.mean_resultant_length"]
    lines = ["invalid configuration:"]
    for name in bad:
        hint = difflib.get_close_matches(str(name), examples, n=1, cutoff=0.6)
        lines.append(f"  targets.{name}: unknown metric" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    lines.append("  accepted metric names: " + ", ".join(METRIC_NAME_FORMS))
    raise ConfigError("\n".join(lines))


_TARGETS_ADAPTER = TypeAdapter(dict[str, TargetSpec])


def parse_targets(data: Mapping[str, Any], source: str = "targets") -> dict[str, TargetSpec]:
    """Validate a ``{metric: {min/max/target/tolerance}}`` mapping; ConfigError on any error."""
    try:
        targets = _TARGETS_ADAPTER.validate_python(dict(data))
    except ValidationError as exc:
        lines = [f"invalid targets ({source}):"]
        for err in exc.errors():
            path = ".".join(str(p) for p in err["loc"])
            lines.append(f"  targets.{path}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
    validate_target_names(targets)
    return targets


def load_targets(path: str | Path) -> dict[str, TargetSpec]:
    """Read targets from a YAML file: either a top-level ``targets:`` mapping or the mapping itself."""
    from qcloop.config import read_yaml

    data = read_yaml(path)
    if set(data) == {"targets"}:
        data = data["targets"] or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: targets must be a mapping of metric name to limits")
    return parse_targets(data, str(path))


# --------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class Check:
    """Outcome of one target.

    Attributes
    ----------
    metric : str
    observed : float
        NaN when the metric could not be measured.
    min, max, target, tolerance : float or None
        The limits from the TargetSpec.
    passed : bool
    message : str
        One line for people ("ecd_nm.mean = 131.2 ± 1.4, within 130 ± 5").
    uncertainty : float or None
        95 % CI half-width of ``observed`` when known (``inf``: unbounded).
    confident : bool or None
        True when the whole interval lies on the side of the limits that ``passed`` says; None
        without an uncertainty.
    """

    metric: str
    observed: float
    min: float | None
    max: float | None
    target: float | None
    tolerance: float | None
    passed: bool
    message: str
    uncertainty: float | None = None
    confident: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "observed": _num(self.observed),
            "min": self.min, "max": self.max, "target": self.target, "tolerance": self.tolerance,
            "passed": self.passed,
            "message": self.message,
            "uncertainty": _num(self.uncertainty) if self.uncertainty is not None else None,
            "confident": self.confident,
        }


@dataclass(frozen=True)
class Verdict:
    """All checks of one batch. ``passed`` is True when every check passed (and when there are
    no targets at all: nothing was required)."""

    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[str]:
        """Names of the metrics whose check failed."""
        return [c.metric for c in self.checks if not c.passed]

    @property
    def not_confident(self) -> list[str]:
        """Metrics whose 95 % interval straddles a limit (see module docstring)."""
        return [c.metric for c in self.checks if c.confident is False]

    @property
    def confident(self) -> bool:
        """True when no check's confidence interval straddles a limit."""
        return not self.not_confident

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "confident": self.confident,
            "n_checks": len(self.checks),
            "failed": self.failed,
            "not_confident": self.not_confident,
            "checks": [c.to_dict() for c in self.checks],
        }


def evaluate_targets(flat: Mapping[str, float], targets: Mapping[str, TargetSpec],
                     uncertainty: Mapping[str, float] | None = None) -> Verdict:
    """Check every target against the batch's metrics.

    Parameters
    ----------
    flat : mapping of str to float
        :meth:`qcloop.batch.BatchMetrics.flat`.
    targets : mapping of metric name to TargetSpec
    uncertainty : mapping of str to float, optional
        :meth:`qcloop.batch.BatchMetrics.uncertainty` (95 % half-widths).

    Returns
    -------
    Verdict
        Checks in the order of ``targets``.
    """
    checks = [_check(name, spec, flat, uncertainty or {}) for name, spec in targets.items()]
    return Verdict(checks=checks)


def _check(name: str, spec: TargetSpec, flat: Mapping[str, float],
           uncertainty: Mapping[str, float]) -> Check:
    lo, hi = _accepted_range(spec)
    limits = _describe_limits(spec)
    base = dict(metric=name, min=spec.min, max=spec.max, target=spec.target, tolerance=spec.tolerance)

    if not is_metric_name(name):
        return Check(observed=math.nan, passed=False, message=f"{name}: unknown metric", **base)
    observed = flat.get(name)
    if observed is None and (name.startswith("class_fraction.") or name.startswith("class_count.")):
        n = flat.get("n_particles", 0.0)
        if n and n > 0:
            observed = 0.0  # the class does not occur in a non-empty batch
    if observed is None or not math.isfinite(float(observed)):
        why = _why_missing(name, flat) if observed is None else "not measurable (NaN)"
        return Check(observed=math.nan, passed=False, message=f"{name}: {why}; required {limits}", **base)
    x = float(observed)
    passed = lo <= x <= hi
    u = uncertainty.get(name)
    ci: tuple[float, float] | None = None
    n = int(flat.get("n_particles", 0) or 0)
    if name.startswith("class_fraction.") and n > 0 and (u is not None or x == 0.0):
        # the Wilson interval is not symmetric about p (an absent class: [0, ~3.8/n]); decide
        # confidence on the interval itself, report its half-width
        k = int(round(x * n))
        ci = wilson_interval(k, n)
        u = wilson_halfwidth(k, n) if u is None else u
    elif u is not None:
        ci = (x - float(u), x + float(u))
    confident: bool | None = None
    if ci is not None:
        u = float(u)  # type: ignore[arg-type]
        confident = (lo <= ci[0] and ci[1] <= hi) if passed else (ci[1] < lo or ci[0] > hi)
    if ci is not None and name.startswith("class_fraction."):
        shown = f"{_fmt(x)} (95 % CI {_fmt(ci[0])}-{_fmt(ci[1])})"
    else:
        shown = f"{_fmt(x)}" + (f" ± {_fmt(u)}" if u is not None else "")
    verb = "within" if passed else "outside"
    msg = f"{name} = {shown}, {verb} {limits}"
    if confident is False:
        msg += " (95 % interval straddles a limit)"
    return Check(observed=x, passed=passed, message=msg, uncertainty=u, confident=confident, **base)


def _accepted_range(spec: TargetSpec) -> tuple[float, float]:
    lo, hi = -math.inf, math.inf
    if spec.min is not None:
        lo = max(lo, spec.min)
    if spec.max is not None:
        hi = min(hi, spec.max)
    if spec.target is not None:
        tol = spec.tolerance or 0.0
        lo, hi = max(lo, spec.target - tol), min(hi, spec.target + tol)
    return lo, hi


def _describe_limits(spec: TargetSpec) -> str:
    parts = []
    if spec.target is not None:
        parts.append(f"{_fmt(spec.target)} ± {_fmt(spec.tolerance or 0.0)}")
    if spec.min is not None and spec.max is not None:
        parts.append(f"[{_fmt(spec.min)}, {_fmt(spec.max)}]")
    elif spec.min is not None:
        parts.append(f">= {_fmt(spec.min)}")
    elif spec.max is not None:
        parts.append(f"<= {_fmt(spec.max)}")
    return " and ".join(parts)


def _why_missing(name: str, flat: Mapping[str, float]) -> str:
    if not flat.get("n_particles"):
        return "no particles in the batch"
    fam, cls, _ = parse_metric_name(name) or (None, None, None)
    if fam is None or cls is None:
        return "not available for this batch"
    if fam.base == "orientation_deg":
        return f"no orientation for class {cls!r} (absent, or not elongated)"
    return f"no particles of class {cls!r} in the batch"


def _fmt(v: float | None) -> str:
    if v is None:
        return "?"
    if math.isinf(v):
        return "inf"
    return f"{v:.4g}"


def _num(v: float | None) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None
