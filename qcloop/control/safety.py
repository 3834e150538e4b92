"""The safety layer every planner's proposal goes through before it becomes a suggestion.

Guarantees (property-tested in tests/control/test_safety.py): for every setpoint in the result

* ``min <= suggested <= max``, and
* ``|suggested - current| <= max_step``,

exactly, in floating point. A setpoint whose current value lies so far outside its bounds that
one ``max_step`` cannot bring it back is left out (with a note) rather than moved illegally;
NaN / inf proposals are dropped. Hold decisions that do not depend on the proposal (too few
particles, uncertain metric, cooldown, awaiting an acknowledgement) are plain functions here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from qcloop.config import SetpointSpec


@dataclass(frozen=True)
class Move:
    """One setpoint change that passed the safety layer (values in the setpoint's unit)."""

    name: str
    unit: str
    current: float
    suggested: float
    min: float
    max: float

    @property
    def delta(self) -> float:
        return self.suggested - self.current

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "unit": self.unit, "current": self.current, "suggested": self.suggested,
                "delta": self.delta, "min": self.min, "max": self.max}


@dataclass(frozen=True)
class SafeProposal:
    """Result of :func:`apply_safety`: the moves to suggest and why others were dropped."""

    moves: list[Move] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    limited: list[str] = field(default_factory=list)  # setpoints clipped by max_step or a bound

    @property
    def empty(self) -> bool:
        return not self.moves


def feasible_interval(current: float, spec: SetpointSpec) -> tuple[float, float] | None:
    """Values reachable in one suggestion: ``[min, max] ∩ [current - max_step, current + max_step]``.

    None when the intersection is empty (current value outside the bounds by more than a step).
    """
    lo = max(spec.min, current - spec.max_step)
    hi = min(spec.max, current + spec.max_step)
    if lo > hi:
        return None
    return lo, hi


def _within_step(current: float, value: float, step: float) -> float:
    """Nudge ``value`` towards ``current`` until ``|value - current| <= step`` holds in floats."""
    for _ in range(64):
        if abs(value - current) <= step:
            return value
        value = math.nextafter(value, current)
    return current  # pragma: no cover - unreachable for finite inputs


def safe_value(current: float, proposed: float, spec: SetpointSpec) -> float | None:
    """The value closest to ``proposed`` that respects bounds, ``max_step`` and ``resolution``.

    Returns None when nothing legal exists (see :func:`feasible_interval`) or the inputs are not
    finite.
    """
    if not (math.isfinite(current) and math.isfinite(proposed)):
        return None
    box = feasible_interval(current, spec)
    if box is None:
        return None
    lo, hi = box
    value = min(max(proposed, lo), hi)
    if spec.resolution:
        r = spec.resolution
        candidates = [round(value / r) * r, math.floor(value / r) * r, math.ceil(value / r) * r]
        legal = [c for c in candidates if lo <= c <= hi and abs(c - current) <= spec.max_step]
        if legal:
            value = min(legal, key=lambda c: abs(c - value))
    value = min(max(value, spec.min), spec.max)
    value = _within_step(current, value, spec.max_step)
    if not (spec.min <= value <= spec.max):  # pragma: no cover - guarded by construction
        return None
    return value


def apply_safety(current: Mapping[str, float], proposed: Mapping[str, float],
                 specs: Sequence[SetpointSpec]) -> SafeProposal:
    """Clamp a planner's proposal to the bounds and the per-batch step of each setpoint.

    Parameters
    ----------
    current : mapping of name to float
        Values now in force (from the reactor, or the configured ``initial``).
    proposed : mapping of name to float
        Planner's wish; setpoints it does not name stay where they are.
    specs : sequence of SetpointSpec

    Returns
    -------
    SafeProposal
        ``moves`` holds only setpoints that actually change (by more than 1e-9 of their range,
        or to another ``resolution`` step).
    """
    moves: list[Move] = []
    notes: list[str] = []
    limited: list[str] = []
    for spec in specs:
        if spec.name not in proposed:
            continue
        cur = current.get(spec.name)
        if cur is None or not math.isfinite(cur):
            notes.append(f"{spec.name}: current value unknown, not moved")
            continue
        want = float(proposed[spec.name])
        value = safe_value(float(cur), want, spec)
        if value is None:
            if not math.isfinite(want):
                notes.append(f"{spec.name}: planner proposed {want}, ignored")
            else:
                notes.append(f"{spec.name}: current {cur:g} {spec.unit} is outside [{spec.min:g}, {spec.max:g}] "
                             f"by more than max_step {spec.max_step:g}; not moved (needs an operator)")
            continue
        if abs(value - want) > 1e-12 * max(1.0, abs(want)):
            limited.append(spec.name)
        if abs(value - cur) <= 1e-9 * (spec.max - spec.min):
            continue
        moves.append(Move(spec.name, spec.unit, float(cur), float(value), spec.min, spec.max))
    return SafeProposal(moves=moves, notes=notes, limited=limited)


def violations(move: Mapping[str, object], spec: SetpointSpec) -> list[str]:
    """Why a suggestion entry ``{name, current, suggested, ...}`` breaks the limits (empty if it does not)."""
    out = []
    s = float(move["suggested"])  # type: ignore[arg-type]
    c = float(move["current"])  # type: ignore[arg-type]
    if not math.isfinite(s):
        out.append(f"{spec.name}: suggested value {s} is not finite")
        return out
    if s < spec.min or s > spec.max:
        out.append(f"{spec.name}: suggested {s} outside [{spec.min}, {spec.max}]")
    if abs(s - c) > spec.max_step:
        out.append(f"{spec.name}: step {s - c} larger than max_step {spec.max_step}")
    return out


# --------------------------------------------------------------------------- holds
def too_few_particles(n_particles: int | float | None, min_particles: int) -> bool:
    """True when a batch has fewer interior particles than required (None counts as 0)."""
    n = 0 if n_particles is None or not math.isfinite(float(n_particles)) else float(n_particles)
    return n < min_particles


def uncertain(halfwidth: float | None, tolerance: float | None) -> bool:
    """True when a metric's 95 % CI half-width is wider than its tolerance (or unbounded).

    No tolerance or no estimate: not uncertain by this test (nothing to compare).
    """
    if tolerance is None or halfwidth is None:
        return False
    h = float(halfwidth)
    return math.isnan(h) or h > tolerance
