"""Wiring of the controller into the daemon (:func:`install`, called by
:meth:`qcloop.daemon.service.Daemon.start` when ``control.enabled``).

Everything runs on the daemon's worker thread, inside the daemon's ledger transactions:

* batch-closed hook -> :meth:`Controller.on_batch_closed`; the suggestion (``{prefix}/suggestions``,
  QoS 1) and the decision (``{prefix}/control/decision``, QoS 1) go to the durable outbox in the
  transaction that closes the batch, together with the controller state
  (ledger key ``control.state``).
* ``{prefix}/reactor/setpoints`` -> :meth:`Controller.on_setpoints`
* ``{prefix}/reactor/batch`` -> :meth:`Controller.on_batch_started` (``{"batch": ..., "setpoints": {...}}``)
* ``{prefix}/suggestions/ack`` -> :meth:`Controller.on_ack`; every ack is appended to the ledger
  (key ``control.acks``, the latest 500) and counted in ``qcloop_suggestion_acks_total{status}``.

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
from qcloop.control.suggestions import ACK_STATUSES, ACKS, DECISIONS, REACTOR_BATCH, REACTOR_SETPOINTS, SUGGESTIONS
from qcloop.control.suggestions import parse_ack

log = logging.getLogger(__name__)

STATE_KEY = "control.state"
ACK_LOG_KEY = "control.acks"
ACK_LOG_KEEP = 500


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
        for status in ACK_STATUSES:
            self.m_acks.labels(status=status)
        self.m_suggestions.labels(planner=self.settings.control.planner)
        # after a restart the latest suggestion still shows (the controller's state keeps it)
        recent = self.controller.state.get("recent") or {}
        if recent:
            latest = max(recent.values(), key=lambda r: float(r.get("at") or 0.0))
            for name, value in (latest.get("suggested") or {}).items():
                self.m_suggested.labels(name=name).set(value)
        self._refresh_gauges()

    # ------------------------------------------------------------------ helpers
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
        from qcloop.daemon.outbox import OutMessage

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
            out.append(OutMessage(ctx.topic(SUGGESTIONS), sugg.message(), qos=1, retain=False))
            self.m_suggestions.labels(planner=sugg.planner).inc()
            for name, value in sugg.suggested().items():
                self.m_suggested.labels(name=name).set(value)
            log.info("control: suggestion %s for batch %s: %s", sugg.msg_id, event.batch, sugg.suggested())
        d = self.controller.last_decision
        if d is not None:
            self.m_decisions.labels(action=d.action, reason=d.reason).inc()
            body = d.to_dict()
            body["suggestion_msg_id"] = body.pop("msg_id")
            body["line_id"] = self.settings.line_id
            body["verdict_passed"] = verdict_passed
            body["n_particles"] = n
            out.append(OutMessage(ctx.topic(DECISIONS), body, qos=1, retain=False))
            log.info("control: batch %s -> %s (%s) %s", event.batch, d.action, d.reason, d.detail)
        return out

    def on_setpoints(self, msg: Any, ctx: Any):
        try:
            body = msg.json()
        except ValueError as exc:
            log.warning("control: %s", exc)
            return None
        if not isinstance(body, dict):
            log.warning("control: reactor setpoints message is not a JSON object")
            return None
        self._guarded(ctx, lambda: self.controller.on_setpoints(body, now=msg.received_at))
        return None

    def on_reactor_batch(self, msg: Any, ctx: Any):
        try:
            body = msg.json()
        except ValueError:
            return None  # the daemon reports malformed reactor/batch messages itself
        if not isinstance(body, dict) or not isinstance(body.get("batch"), str):
            return None
        if body.get("event", "start") != "start":
            return None
        sp = body.get("setpoints")
        self._guarded(ctx, lambda: self.controller.on_batch_started(
            body["batch"], {"setpoints": sp} if isinstance(sp, dict) else None, now=msg.received_at))
        return None

    def on_ack(self, msg: Any, ctx: Any):
        try:
            ack = parse_ack(msg.payload)
        except ValueError as exc:
            log.warning("control: bad ack on %s: %s", msg.topic, exc)
            self.daemon.metrics.errors.labels(kind="command-rejected").inc()
            return None
        outcome = self._guarded(ctx, lambda: self.controller.on_ack(ack.msg_id, ack.status, now=msg.received_at))
        self.m_acks.labels(status=ack.status).inc()
        raw = ctx.ledger.get_state(ACK_LOG_KEY)
        try:
            entries = json.loads(raw) if raw else []
        except ValueError:
            entries = []
        entries.append({"msg_id": ack.msg_id, "status": ack.status, "outcome": outcome,
                        "received_at": msg.received_at, "at": ack.at, "detail": ack.detail})
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
