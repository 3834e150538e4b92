"""The controller: a small state machine the daemon feeds with plain data.

::

    ctl = Controller(settings, state_json_or_None)
    ctl.on_setpoints(payload)                      # {prefix}/reactor/setpoints (retained)
    ctl.on_batch_started(batch_id, setpoints)      # {prefix}/reactor/batch, optional
    s = ctl.on_batch_closed(batch_id, flat, uncertainty, verdict_passed, n_particles, now)
    if s is not None: publish s.payload() on {prefix}/suggestions (QoS 1, durable outbox)
    ctl.on_ack(msg_id, status, now)                # {prefix}/suggestions/ack
    ledger.set_state("control", ctl.state_json())  # after every call

Everything the controller knows is in :meth:`state_json` (plain JSON), so a restarted daemon
continues where it stopped: a suggestion awaiting its ack stays pending, the cooldown keeps
counting, the Bayesian planner keeps its history.

Per closed batch, in this order (the first that applies decides; ``last_decision`` says which):

1. ``duplicate`` -- the batch was already handled (a restart re-closing it): nothing happens.
2. ``too_few_particles`` -- fewer interior particles than ``control.min_particles``: hold.
3. ``on_target`` -- the verdict passed: no suggestion while the targets are met.
4. ``awaiting_ack`` -- an earlier suggestion is neither acknowledged nor expired: hold.
5. ``cooldown`` -- fewer than ``cooldown_batches`` batches closed since the last change: hold.
6. ``stale_batch`` -- the reactor's batch-start message shows the batch was made with setpoints
   no longer in force: hold (its metrics say nothing about the current setpoints).
7. the planner (PI rules or Bayesian), whose proposal goes through the safety layer; holds
   ``uncertain`` / ``no_data`` / ``in_band`` / ``at_limit`` when nothing is left to suggest.

Suggestion life cycle: *pending* until an ack ``accepted`` / ``applied`` (the suggested values
become the current ones and the cooldown starts), ``rejected`` / ``expired`` (nothing changes),
a reactor setpoints message equal to the suggested values (taken as applied without an ack), or
``suggestion_ttl_s`` passing (expired locally; a late ack is still counted).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Mapping

from qcloop.config import ControlConfig, Settings, TargetSpec
from qcloop.control import bayes as _bayes
from qcloop.control.pi import (accepted_range, evaluate_rules, observed_value, outside_probability, pi_proposal,
                               rule_error)
from qcloop.control.safety import apply_safety, too_few_particles, uncertain
from qcloop.control.setpoints import parse_reactor_setpoints, resolve_rule_target
from qcloop.control.suggestions import ACK_STATUSES, Suggestion, iso, new_msg_id
from qcloop.errors import ConfigError

log = logging.getLogger(__name__)

STATE_VERSION = 1
_KEEP_CLOSED = 200
_KEEP_RECENT = 20
_KEEP_BATCH_SETPOINTS = 50


@dataclass(frozen=True)
class Decision:
    """What the controller did with one closed batch (published on ``{prefix}/control/decision``)."""

    batch_id: str
    action: str  # "suggest" | "hold" | "none"
    reason: str
    detail: str = ""
    msg_id: str | None = None
    at: float | None = None
    setpoints: Mapping[str, float] = field(default_factory=dict)
    suggested: Mapping[str, float] = field(default_factory=dict)
    objective: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["at"] = iso(self.at) if self.at is not None else None
        d["setpoints"] = dict(self.setpoints)
        d["suggested"] = dict(self.suggested)
        if d["objective"] is not None and not math.isfinite(d["objective"]):
            d["objective"] = None
        return d


def _ts(now: float | datetime | None) -> float:
    if now is None:
        return time.time()
    if isinstance(now, datetime):
        return now.timestamp()
    return float(now)


def _fresh_state() -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "setpoints": {},
        "setpoints_source": "initial",
        "setpoints_at": None,
        "pending": None,
        "cooldown_left": 0,
        "prev_errors": {},
        "history": [],
        "batch_setpoints": {},
        "closed": [],
        "recent": {},
        "last_change": None,
        "last_decision": None,
        "on_target_streak": 0,
        "counts": {"suggestions": 0, "acks": {s: 0 for s in ACK_STATUSES}, "expired_local": 0,
                   "implicit_applied": 0, "holds": {}},
    }


def _json_clean(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Mapping):
        return {str(k): _json_clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_clean(x) for x in v]
    return v


class Controller:
    """Setpoint controller (PI rules or Bayesian planner) with a JSON-serialisable state.

    Parameters
    ----------
    cfg : Settings or ControlConfig
        With :class:`~qcloop.config.Settings` the targets, line id and ``batch.min_particles``
        come from it; with a bare ControlConfig pass ``targets`` (and optionally ``line_id``,
        ``min_particles``).
    state_json : str, optional
        A previous :meth:`state_json` (from the ledger). Unreadable state is logged and replaced
        by a fresh one (the controller then waits for the reactor's setpoints again).

    Raises
    ------
    ConfigError
        A rule whose metric has neither a target value nor a min/max (in ``targets`` or on the
        rule), a Bayesian objective without any usable term.
    """

    def __init__(self, cfg: Settings | ControlConfig, state_json: str | None = None, *,
                 targets: Mapping[str, TargetSpec] | None = None, line_id: str | None = None,
                 min_particles: int | None = None):
        if isinstance(cfg, Settings):
            control = cfg.control
            targets = cfg.targets if targets is None else targets
            line_id = line_id or cfg.line_id
            min_particles = cfg.batch.min_particles if min_particles is None else min_particles
        else:
            control = cfg
        self.cfg: ControlConfig = control
        self.targets: dict[str, TargetSpec] = dict(targets or {})
        self.line_id = line_id or "line1"
        self.min_particles = int(control.min_particles if control.min_particles is not None else (min_particles or 0))
        self.specs = list(control.setpoints)
        self.rules = list(control.rules)
        self._lock = threading.RLock()
        self._check_config()
        self.terms = _bayes.objective_terms(control.bayes, self.rules, self.targets)
        if control.planner == "bayes" and not self.terms:
            raise ConfigError("control.bayes.objective: no objective metric has a target, min or max "
                              "(set control.bayes.objective or targets)")
        self.state = self._load(state_json)
        for spec in self.specs:
            if spec.name not in self.state["setpoints"] and spec.initial is not None:
                self.state["setpoints"][spec.name] = float(spec.initial)
        self.last_decision: Decision | None = None

    # ------------------------------------------------------------------ setup
    def _check_config(self) -> None:
        for i, rule in enumerate(self.rules):
            target, _tol, lo, hi = resolve_rule_target(rule, self.targets)
            if target is None and lo is None and hi is None:
                raise ConfigError(f"control.rules.{i}.metric: {rule.metric!r} has no target, min or max "
                                  f"(add targets.{rule.metric} or control.rules.{i}.target)")

    def _load(self, state_json: str | None) -> dict[str, Any]:
        fresh = _fresh_state()
        if not state_json:
            return fresh
        try:
            data = json.loads(state_json)
            if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                raise ValueError(f"unknown state version {data.get('version') if isinstance(data, dict) else '?'}")
        except (ValueError, TypeError) as exc:
            log.warning("control state unreadable (%s); starting fresh", exc)
            return fresh
        for key, value in fresh.items():
            data.setdefault(key, value)
        for status in ACK_STATUSES:
            data["counts"]["acks"].setdefault(status, 0)
        names = {s.name for s in self.specs}
        data["setpoints"] = {k: float(v) for k, v in data["setpoints"].items() if k in names and v is not None}
        return data

    # ------------------------------------------------------------------ read-only views
    @property
    def current(self) -> dict[str, float]:
        """Setpoint values believed to be in force."""
        return dict(self.state["setpoints"])

    @property
    def pending(self) -> dict[str, Any] | None:
        p = self.state["pending"]
        return dict(p) if p else None

    def state_json(self) -> str:
        """The whole state as JSON (NaN stored as null)."""
        with self._lock:
            return json.dumps(_json_clean(self.state), sort_keys=True, allow_nan=False)

    # ------------------------------------------------------------------ events
    def on_setpoints(self, payload: Mapping[str, Any], now: float | datetime | None = None) -> dict[str, float]:
        """The reactor published its current setpoints (``{"setpoints": {...}}`` or a flat dict).

        Returns the parsed values. A change not caused by a known suggestion (an operator turned a
        knob) starts the cooldown like any other change; the first values after a fresh start do
        not. Values equal to a pending suggestion's resolve it as applied.
        """
        t = _ts(now)
        values = parse_reactor_setpoints(payload, self.specs)
        if not values:
            return values
        with self._lock:
            st = self.state
            old = st["setpoints"]
            changed = [s.name for s in self.specs if s.name in values and (
                s.name not in old or abs(values[s.name] - old[s.name]) > 1e-9 * (s.max - s.min))]
            first = st["setpoints_source"] == "initial"
            pend = st["pending"]
            if pend and self._matches(values, pend["suggested"]):
                self._change(pend["msg_id"], pend["batch_id"], pend["suggested"], t)
                st["counts"]["implicit_applied"] += 1
                st["pending"] = None
            elif changed and not first:
                log.info("setpoints changed outside qcloop: %s", {k: values[k] for k in changed})
                st["last_change"] = {"msg_id": None, "batch_id": None, "at": t,
                                     "values": {k: values[k] for k in changed}}
                st["cooldown_left"] = self.cfg.cooldown_batches
            st["setpoints"].update(values)
            st["setpoints_source"] = "reactor"
            st["setpoints_at"] = t
        return values

    def on_batch_started(self, batch_id: str, setpoints: Mapping[str, Any] | None = None,
                         now: float | datetime | None = None) -> None:
        """The reactor started a batch (with these setpoints; default: the current ones)."""
        with self._lock:
            values = parse_reactor_setpoints(setpoints, self.specs) if setpoints else {}
            if not values:
                values = dict(self.state["setpoints"])
            bs = self.state["batch_setpoints"]
            bs[str(batch_id)] = values
            while len(bs) > _KEEP_BATCH_SETPOINTS:
                bs.pop(next(iter(bs)))

    def tick(self, now: float | datetime | None = None) -> bool:
        """Expire a pending suggestion whose ``expires_at`` has passed; True if one expired."""
        t = _ts(now)
        with self._lock:
            pend = self.state["pending"]
            if pend and t >= pend["expires_at"]:
                log.info("suggestion %s expired without an ack", pend["msg_id"])
                self.state["pending"] = None
                self.state["counts"]["expired_local"] += 1
                return True
            return False

    def on_ack(self, msg_id: str, status: str, now: float | datetime | None = None) -> str:
        """Record a reactor acknowledgement.

        Returns
        -------
        str
            ``matched`` (it answered the pending suggestion), ``late`` (a known earlier
            suggestion: an ``applied`` still updates the setpoints and starts the cooldown) or
            ``unknown``.
        """
        if status not in ACK_STATUSES:
            raise ValueError(f"ack status must be one of {ACK_STATUSES}, got {status!r}")
        t = _ts(now)
        with self._lock:
            st = self.state
            st["counts"]["acks"][status] = st["counts"]["acks"].get(status, 0) + 1
            pend = st["pending"]
            if pend and pend["msg_id"] == msg_id:
                if status in ("accepted", "applied"):
                    self._change(msg_id, pend["batch_id"], pend["suggested"], t)
                st["pending"] = None
                return "matched"
            recent = st["recent"].get(msg_id)
            if recent is not None:
                last = st["last_change"]
                if status == "applied" and not (last and last.get("msg_id") == msg_id):
                    self._change(msg_id, recent["batch_id"], recent["suggested"], t)
                return "late"
            return "unknown"

    def on_batch_closed(self, batch_id: str, flat: Mapping[str, float], uncertainty: Mapping[str, float] | None,
                        verdict_passed: bool, n_particles: int | float | None,
                        now: float | datetime | None = None) -> Suggestion | None:
        """Decide what to do about one closed batch; a Suggestion to publish, or None.

        Parameters
        ----------
        batch_id : str
        flat : mapping of str to float
            :meth:`qcloop.batch.BatchMetrics.flat`.
        uncertainty : mapping of str to float, optional
            95 % CI half-widths (:meth:`qcloop.batch.BatchMetrics.uncertainty`).
        verdict_passed : bool
            :attr:`qcloop.targets.Verdict.passed`.
        n_particles : int
            Interior particles of the batch.
        now : float (epoch s) or datetime, optional
        """
        t = _ts(now)
        batch_id = str(batch_id)
        with self._lock:
            st = self.state
            if batch_id in st["closed"]:
                return self._decide(batch_id, "none", "duplicate", "batch already handled", t)
            st["closed"].append(batch_id)
            del st["closed"][:-_KEEP_CLOSED]
            self.tick(t)
            cooling = st["cooldown_left"] > 0
            if cooling:
                st["cooldown_left"] -= 1
            made_with = st["batch_setpoints"].pop(batch_id, None)
            batch_sp = dict(made_with) if made_with else dict(st["setpoints"])
            objective, _parts = _bayes.objective(flat, self.terms) if self.terms else (None, {})
            term_values = {tm.metric: observed_value(flat, tm.metric) for tm in self.terms}

            if too_few_particles(n_particles, self.min_particles):
                return self._decide(batch_id, "hold", "too_few_particles",
                                    f"{int(n_particles or 0)} particles < {self.min_particles}", t, objective=objective)
            unsure = self._uncertain_terms(uncertainty)
            if objective is not None and not unsure:
                st["history"].append({"batch_id": batch_id, "setpoints": batch_sp, "objective": objective,
                                      "metrics": term_values, "passed": bool(verdict_passed),
                                      "n_particles": int(n_particles or 0), "at": t})
                del st["history"][:-max(self.cfg.bayes.history, 60)]
            if verdict_passed:
                st["on_target_streak"] += 1
                return self._decide(batch_id, "none", "on_target", "every target met", t, objective=objective)
            st["on_target_streak"] = 0
            if st["pending"]:
                return self._decide(batch_id, "hold", "awaiting_ack",
                                    f"suggestion {st['pending']['msg_id']} not yet acknowledged", t, objective=objective)
            if cooling:
                return self._decide(batch_id, "hold", "cooldown",
                                    f"{st['cooldown_left'] + 1} of {self.cfg.cooldown_batches} batches after a change",
                                    t, objective=objective)
            if made_with and not self._matches(made_with, st["setpoints"]):
                return self._decide(batch_id, "hold", "stale_batch",
                                    "batch was made with setpoints no longer in force", t, objective=objective)
            if self.cfg.planner == "bayes":
                return self._plan_bayes(batch_id, flat, uncertainty, unsure, n_particles, objective, t)
            return self._plan_pi(batch_id, flat, uncertainty, n_particles, objective, t)

    # ------------------------------------------------------------------ planners
    def _plan_pi(self, batch_id: str, flat: Mapping[str, float], uncertainty: Mapping[str, float] | None,
                 n_particles: Any, objective: float | None, t: float) -> Suggestion | None:
        st = self.state
        evals = evaluate_rules(self.rules, self.targets, flat, uncertainty, st["prev_errors"],
                               hold_when_uncertain=self.cfg.hold_when_uncertain)
        for ev in evals:
            if ev.error is not None and ev.status in ("act", "in_band"):
                st["prev_errors"][str(ev.index)] = ev.error
        acting = [ev for ev in evals if ev.status == "act"]
        if not acting:
            statuses = {ev.status for ev in evals}
            reason = "uncertain" if "uncertain" in statuses else ("no_data" if "no_data" in statuses else "in_band")
            detail = "; ".join(f"{ev.metric}: {ev.status}" for ev in evals)
            return self._decide(batch_id, "hold" if reason != "in_band" else "none", reason, detail, t,
                                objective=objective)
        proposal = pi_proposal(acting, st["setpoints"])
        primary = max(acting, key=lambda ev: ev.severity)
        reason = {"metric": primary.metric, "observed": primary.observed, "target": primary.reference,
                  "tolerance": primary.tolerance, "n_particles": int(n_particles or 0),
                  "confidence": primary.confidence, "ci95_halfwidth": primary.halfwidth, "verdict_passed": False}
        details = {"rules": [{"metric": ev.metric, "setpoint": ev.setpoint, "status": ev.status,
                              "observed": ev.observed, "reference": ev.reference, "error": ev.error,
                              "delta": ev.delta} for ev in evals],
                   "objective": objective}
        return self._suggest(batch_id, proposal, reason, details, objective, t)

    def _plan_bayes(self, batch_id: str, flat: Mapping[str, float], uncertainty: Mapping[str, float] | None,
                    unsure: list[str], n_particles: Any, objective: float | None, t: float) -> Suggestion | None:
        st = self.state
        if objective is None:
            missing = [tm.metric for tm in self.terms if observed_value(flat, tm.metric) is None]
            return self._decide(batch_id, "hold", "no_data", f"objective metric(s) missing: {missing}", t)
        if unsure:
            return self._decide(batch_id, "hold", "uncertain",
                                f"95 % interval wider than the tolerance: {unsure}", t, objective=objective)
        if any(s.name not in st["setpoints"] for s in self.specs):
            return self._decide(batch_id, "hold", "setpoints_unknown", "current setpoints not known yet", t,
                                objective=objective)
        plan = _bayes.propose(st["history"], st["setpoints"], self.specs, self.cfg.bayes, self.terms)
        _obj, parts = _bayes.objective(flat, self.terms)
        worst = max(self.terms, key=lambda tm: abs(parts.get(tm.metric, 0.0)))
        unc = uncertainty or {}
        obs = observed_value(flat, worst.metric)
        target, lo, hi = worst.target, worst.min, worst.max
        spec = self.targets.get(worst.metric)
        tol = spec.tolerance if spec is not None else None
        _err, ref = rule_error(obs if obs is not None else math.nan, target, lo, hi)
        a, b = accepted_range(target, tol, lo, hi)
        hw = unc.get(worst.metric)
        reason = {"metric": worst.metric, "observed": obs, "target": ref, "tolerance": tol,
                  "n_particles": int(n_particles or 0),
                  "confidence": outside_probability(obs, hw, a, b) if obs is not None else None,
                  "ci95_halfwidth": hw, "verdict_passed": False}
        details = {"objective": objective, "normalised_errors": parts, **plan.to_dict()}
        return self._suggest(batch_id, plan.proposal, reason, details, objective, t)

    # ------------------------------------------------------------------ helpers
    def _uncertain_terms(self, uncertainty: Mapping[str, float] | None) -> list[str]:
        if not self.cfg.hold_when_uncertain or not uncertainty:
            return []
        out = []
        for tm in self.terms:
            spec = self.targets.get(tm.metric)
            tol = spec.tolerance if spec is not None else None
            if uncertain(uncertainty.get(tm.metric), tol):
                out.append(tm.metric)
        return out

    def _suggest(self, batch_id: str, proposal: Mapping[str, float], reason: dict[str, Any],
                 details: dict[str, Any], objective: float | None, t: float) -> Suggestion | None:
        st = self.state
        safe = apply_safety(st["setpoints"], proposal, self.specs)
        if safe.notes:
            details = {**details, "safety_notes": safe.notes}
        if safe.limited:
            details = {**details, "limited_by_safety": safe.limited}
        if safe.empty:
            why = "; ".join(safe.notes) or "setpoints already at their limits"
            return self._decide(batch_id, "hold", "at_limit", why, t, objective=objective)
        sugg = Suggestion(msg_id=new_msg_id(), batch_id=batch_id, line_id=self.line_id, created_at=t,
                          expires_at=t + self.cfg.suggestion_ttl_s, mode=self.cfg.mode, planner=self.cfg.planner,
                          moves=tuple(safe.moves), reason=reason, details=details)
        suggested = sugg.suggested()
        st["pending"] = {"msg_id": sugg.msg_id, "batch_id": batch_id, "created_at": t,
                         "expires_at": sugg.expires_at, "suggested": suggested,
                         "previous": {m.name: m.current for m in safe.moves}}
        st["recent"][sugg.msg_id] = {"batch_id": batch_id, "suggested": suggested, "at": t}
        while len(st["recent"]) > _KEEP_RECENT:
            st["recent"].pop(next(iter(st["recent"])))
        st["counts"]["suggestions"] += 1
        self._decide(batch_id, "suggest", reason["metric"], f"{len(safe.moves)} setpoint(s)", t,
                     msg_id=sugg.msg_id, suggested=suggested, objective=objective)
        return sugg

    def _decide(self, batch_id: str, action: str, reason: str, detail: str, t: float, *,
                msg_id: str | None = None, suggested: Mapping[str, float] | None = None,
                objective: float | None = None) -> None:
        d = Decision(batch_id=batch_id, action=action, reason=reason, detail=detail, msg_id=msg_id, at=t,
                     setpoints=dict(self.state["setpoints"]), suggested=dict(suggested or {}), objective=objective)
        self.last_decision = d
        if reason != "duplicate":
            self.state["last_decision"] = _json_clean(d.to_dict())
            if action == "hold":
                holds = self.state["counts"]["holds"]
                holds[reason] = holds.get(reason, 0) + 1
        return None

    def _change(self, msg_id: str | None, batch_id: str | None, values: Mapping[str, float], t: float) -> None:
        st = self.state
        st["setpoints"].update({k: float(v) for k, v in values.items()})
        st["last_change"] = {"msg_id": msg_id, "batch_id": batch_id, "at": t, "values": dict(values)}
        st["cooldown_left"] = self.cfg.cooldown_batches

    def _matches(self, values: Mapping[str, float], wanted: Mapping[str, float]) -> bool:
        """True when every setpoint in ``wanted`` has (about) that value in ``values``."""
        for spec in self.specs:
            if spec.name not in wanted:
                continue
            v = values.get(spec.name)
            if v is None:
                return False
            tol = max(1e-6 * (spec.max - spec.min), (spec.resolution or 0.0) / 2)
            if abs(float(v) - float(wanted[spec.name])) > tol:
                return False
        return True

    def decision_message(self) -> dict[str, Any] | None:
        """The last decision as a JSON-able dict (for ``{prefix}/control/decision``)."""
        return self.last_decision.to_dict() if self.last_decision else None
