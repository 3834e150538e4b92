"""Wiring of the controller into the daemon (:func:`install`, called by
:meth:`qcloop.daemon.service.Daemon.start` when ``control.enabled``).

Everything runs on the daemon's worker thread, inside the daemon's ledger transactions:

* batch-closed hook -> :meth:`Controller.on_batch_closed`; the suggestion (``{prefix}/suggestions``,
  QoS 1) and the decision (``{prefix}/control/decision``, QoS 1) go to the durable outbox in the
  transaction that closes the batch, together with the controller state
  (ledger key ``control.state``).
* ``{prefix}/reactor/setpoints`` -> :meth:`Controller.on_setpoints`; a controlled setpoint's value
  outside its configured ``[min, max]`` rejects the whole message (``events/error``
  ``command-rejected``): the controller keeps the last good values.
* ``{prefix}/reactor/batch`` -> :meth:`Controller.on_batch_started` (``{"batch": ..., "setpoints": {...}}``;
  ``"event": "end"`` messages are not batch starts)
* ``{prefix}/suggestions/ack`` -> :meth:`Controller.on_ack`; the suggestion is named by the MQTT v5
  correlation data (the suggestion carries its ``msg_id`` there, with the ack topic as response
  topic) or, from v3 clients, by the payload's ``msg_id``. Every ack is appended to the ledger
  (key ``control.acks``, the latest 500, ``detail`` cut to 200 characters) and counted in
  ``qcloop_suggestion_acks_total{status}``.

Payloads reach these handlers only after the daemon's size, nesting and schema checks
(:mod:`qcloop.daemon.inbound`); every outbound message is built by :mod:`qcloop.daemon.messages`.

Prometheus (on the daemon's registry): ``qcloop_suggestions_total{planner}``,
``qcloop_suggestion_acks_total{status}``, ``qcloop_control_decisions_total{action,reason}``,
``qcloop_control_pending`` (1 while a suggestion awaits its ack), ``qcloop_setpoint{name}``
(value believed in force) and ``qcloop_setpoint_suggested{name}`` (latest suggestion).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from qcloop.control.controller import Controller
from qcloop.control.setpoints import parse_reactor_setpoints
from qcloop.control.suggestions import ACK_STATUSES, ACKS, REACTOR_BATCH, REACTOR_SETPOINTS, parse_ack
from qcloop.daemon import messages
from qcloop.daemon.inbound import Rejected

log = logging.getLogger(__name__)

STATE_KEY = "control.state"
ACK_LOG_KEY = "control.acks"
ACK_LOG_KEEP = 500
ACK_DETAIL_KEEP = 200
#: (action, reason) of every decision the controller can make without naming a metric
DECISIONS_KNOWN = (("none", "duplicate"), ("hold", "too_few_particles"), ("none", "on_target"),
                   ("hold", "awaiting_ack"), ("hold", "cooldown"), ("hold", "stale_batch"), ("none", "in_band"),
                   ("hold", "uncertain"), ("hold", "no_data"), ("hold", "setpoints_unknown"), ("hold", "at_limit"))


class ControlMetrics:
    """The control loop's Prometheus metrics, registered on ``registry`` (the daemon's)."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.suggestions = Counter("qcloop_suggestions", "Setpoint suggestions published", ["planner"], registry=r)
        self.acks = Counter("qcloop_suggestion_acks", "Acknowledgements received from the reactor, by status",
                            ["status"], registry=r)
        self.decisions = Counter("qcloop_control_decisions", "Controller decisions per closed batch",
                                 ["action", "reason"], registry=r)
        self.pending = Gauge("qcloop_control_pending", "1 while a suggestion awaits its acknowledgement",
                             registry=r)
        self.setpoint = Gauge("qcloop_setpoint", "Setpoint value believed in force", ["name"], registry=r)
        self.suggested = Gauge("qcloop_setpoint_suggested", "Latest suggested setpoint value", ["name"],
                               registry=r)


class ControlHook:
    """Holds the controller and its Prometheus metrics for one daemon."""

    def __init__(self, daemon: Any):
        self.daemon = daemon
        self.settings = daemon.settings
        led = daemon.ledger
        self.controller = Controller(self.settings, led.get_state(STATE_KEY) if led is not None else None)
        m = ControlMetrics(daemon.registry)
        self.m_suggestions, self.m_acks, self.m_decisions = m.suggestions, m.acks, m.decisions
        self.m_pending, self.m_setpoint, self.m_suggested = m.pending, m.setpoint, m.suggested
        self._precreate()
        # after a restart the latest suggestion still shows (the controller's state keeps it)
        recent = self.controller.state.get("recent") or {}
        if recent:
            latest = max(recent.values(), key=lambda r: float(r.get("at") or 0.0))
            for name, value in (latest.get("suggested") or {}).items():
                self.m_suggested.labels(name=name).set(value)
        self._refresh_gauges()

    # ------------------------------------------------------------------ helpers
    def _precreate(self) -> None:
        """Every label set at 0 from the first scrape (so ``increase()`` sees the first event)."""
        c = self.settings.control
        for status in ACK_STATUSES:
            self.m_acks.labels(status=status)
        self.m_suggestions.labels(planner=c.planner)
        metrics = {r.metric for r in c.rules} | set(c.bayes.objective)
        for action, reason in DECISIONS_KNOWN + tuple(("suggest", m) for m in sorted(metrics)):
            self.m_decisions.labels(action=action, reason=reason)
        for spec in c.setpoints:
            self.m_setpoint.labels(name=spec.name)
            self.m_suggested.labels(name=spec.name)

    def _refresh_gauges(self) -> None:
        for name, value in self.controller.current.items():
            self.m_setpoint.labels(name=name).set(value)
        self.m_pending.set(1 if self.controller.pending else 0)

    def _guarded(self, ctx: Any, fn) -> Any:
        """Run ``fn`` on the controller; on error restore the controller from its snapshot (the
        daemon rolls the ledger back), so memory and ledger never disagree."""
        snapshot = self.controller.state_json()
        try:
            out = fn()
            ctx.ledger.set_state(STATE_KEY, self.controller.state_json())
            return out
        except BaseException:
            self.controller = Controller(self.settings, snapshot)
            raise
        finally:
            self._refresh_gauges()

    # ------------------------------------------------------------------ daemon callbacks
    def on_batch_closed(self, event: Any, ctx: Any):
        if event.revision > 1:
            log.info("control: batch %s re-closed (revision %d); not acted on again", event.batch, event.revision)
            return None
        flat = dict(event.flat or {})
        verdict_passed = bool(event.verdict.passed) if event.verdict is not None else False
        n = int(flat.get("n_particles") or 0)

        def step():
            return self.controller.on_batch_closed(event.batch, flat, event.uncertainty, verdict_passed, n,
                                                   now=event.closed_at)

        sugg = self._guarded(ctx, step)
        out = []
        if sugg is not None:
            out.append(messages.suggestion(ctx.prefix, sugg))
            self.m_suggestions.labels(planner=sugg.planner).inc()
            for name, value in sugg.suggested().items():
                self.m_suggested.labels(name=name).set(value)
            log.info("control: suggestion %s for batch %s: %s", sugg.msg_id, event.batch, sugg.suggested())
        d = self.controller.last_decision
        if d is not None:
            self.m_decisions.labels(action=d.action, reason=d.reason).inc()
            out.append(messages.control_decision(ctx.prefix, self.settings.line_id, d,
                                                 verdict_passed=verdict_passed, n_particles=n))
            log.info("control: batch %s -> %s (%s) %s", event.batch, d.action, d.reason, d.detail)
        return out

    def on_setpoints(self, msg: Any, ctx: Any):
        body = msg.json()  # checked against reactor_setpoints.json by the daemon
        if body is None:
            return None  # a cleared retained message
        values = parse_reactor_setpoints(body, self.settings.control.setpoints)
        bad = [f"{s.name}={values[s.name]:g} outside [{s.min:g}, {s.max:g}]"
               for s in self.settings.control.setpoints if s.name in values and not s.min <= values[s.name] <= s.max]
        if bad:
            raise Rejected("invalid", f"setpoints outside the configured bounds, not taken as current: {', '.join(bad)}")
        self._guarded(ctx, lambda: self.controller.on_setpoints(body, now=msg.received_at))
        return None

    def on_reactor_batch(self, msg: Any, ctx: Any):
        body = msg.json()  # checked against reactor_batch.json by the daemon
        if body is None or body.get("event", "start") != "start":
            return None
        sp = body.get("setpoints")
        self._guarded(ctx, lambda: self.controller.on_batch_started(
            body["batch"], {"setpoints": sp} if isinstance(sp, dict) else None, now=msg.received_at))
        return None

    def on_ack(self, msg: Any, ctx: Any):
        body = msg.json() or {}
        if msg.correlation_data:  # MQTT v5: the suggestion's msg_id, copied back by the reactor
            body = {**body, "msg_id": msg.correlation_data.decode("utf-8", "replace")}
        try:
            ack = parse_ack(body)
        except ValueError as exc:
            raise Rejected("invalid", f"bad ack: {exc}") from None
        outcome = self._guarded(ctx, lambda: self.controller.on_ack(ack.msg_id, ack.status, now=msg.received_at))
        self.m_acks.labels(status=ack.status).inc()
        raw = ctx.ledger.get_state(ACK_LOG_KEY)
        try:
            entries = json.loads(raw) if raw else []
        except ValueError:
            entries = []
        detail = None if ack.detail is None else ack.detail[:ACK_DETAIL_KEEP]
        entries.append({"msg_id": ack.msg_id, "status": ack.status, "outcome": outcome,
                        "received_at": msg.received_at, "at": ack.at, "detail": detail})
        ctx.ledger.set_state(ACK_LOG_KEY, json.dumps(entries[-ACK_LOG_KEEP:]))
        log.info("control: ack %s %s (%s)", ack.msg_id, ack.status, outcome)
        return None


def install(daemon: Any) -> ControlHook:
    """Register the controller's hook and subscriptions on a started daemon (ledger open)."""
    hook = ControlHook(daemon)
    daemon.add_batch_closed_hook(hook.on_batch_closed)
    daemon.subscribe(REACTOR_SETPOINTS, hook.on_setpoints)
    daemon.subscribe(REACTOR_BATCH, hook.on_reactor_batch)
    daemon.subscribe(ACKS, hook.on_ack)
    daemon.control = hook
    log.info("control: %s planner, %s mode, %d setpoint(s), %d rule(s)", daemon.settings.control.planner,
             daemon.settings.control.mode, len(daemon.settings.control.setpoints), len(daemon.settings.control.rules))
    return hook
