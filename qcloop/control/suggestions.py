"""Suggestion and acknowledgement messages (topics, payloads, parsing).

Topics (``{prefix}`` = ``mqtt.topic_prefix`` with the line id, e.g. ``qcloop/line1``):

* ``{prefix}/suggestions`` -- qcloop -> reactor, QoS 1, not retained; schema
  ``qcloop/schemas/suggestion.json``.
* ``{prefix}/suggestions/ack`` -- reactor -> qcloop: ``{"msg_id", "status"}`` with status
  ``accepted`` | ``rejected`` | ``applied`` | ``expired``; schema
  ``qcloop/schemas/suggestion_ack.json``.
* ``{prefix}/reactor/setpoints`` -- reactor -> qcloop, retained: current setpoint values.
* ``{prefix}/reactor/batch`` -- reactor -> qcloop: batch start / end with the setpoints used.
* ``{prefix}/control/decision`` -- qcloop, every closed batch: what the controller did and why
  (``suggest`` / ``hold`` / ``none``), for dashboards and the demo.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from typing import Any, Mapping

from qcloop.control.safety import Move

SCHEMA_VERSION = 1
ACK_STATUSES = ("accepted", "rejected", "applied", "expired")
MODES = ("advisory", "command")

SUGGESTIONS = "suggestions"
ACKS = "suggestions/ack"
REACTOR_SETPOINTS = "reactor/setpoints"
REACTOR_BATCH = "reactor/batch"
DECISIONS = "control/decision"


def topic(prefix: str, leaf: str) -> str:
    """``prefix/leaf`` without doubled slashes."""
    return f"{prefix.rstrip('/')}/{leaf}"


def iso(ts: float) -> str:
    """Epoch seconds -> ISO 8601 UTC with millisecond precision (``2026-01-02T03:04:05.678Z``)."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> float:
    """ISO 8601 (``Z`` or offset) -> epoch seconds."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def new_msg_id() -> str:
    return uuid.uuid4().hex


def _clean(v: Any) -> Any:
    """JSON-safe copy: NaN / inf become None, tuples lists."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Mapping):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


@dataclass(frozen=True)
class Suggestion:
    """One setpoint suggestion, as published on ``{prefix}/suggestions``.

    ``created_at`` / ``expires_at`` are epoch seconds here and ISO 8601 UTC in the message.
    ``reason`` describes the metric that drove the suggestion (``metric, observed, target,
    tolerance, n_particles, confidence, ci95_halfwidth``); ``details`` carries the planner's
    view (every rule's contribution, or the Bayesian planner's objective and expected
    improvement).
    """

    msg_id: str
    batch_id: str
    line_id: str
    created_at: float
    expires_at: float
    mode: str
    planner: str
    moves: tuple[Move, ...]
    reason: Mapping[str, Any]
    details: Mapping[str, Any] = field(default_factory=dict)

    def message(self) -> dict[str, Any]:
        return _clean({
            "schema_version": SCHEMA_VERSION,
            "msg_id": self.msg_id,
            "batch_id": self.batch_id,
            "line_id": self.line_id,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "mode": self.mode,
            "planner": self.planner,
            "setpoints": [m.to_dict() for m in self.moves],
            "reason": dict(self.reason),
            "details": dict(self.details),
        })

    def payload(self) -> bytes:
        return json.dumps(self.message(), sort_keys=True, allow_nan=False).encode()

    def suggested(self) -> dict[str, float]:
        return {m.name: m.suggested for m in self.moves}


@dataclass(frozen=True)
class Ack:
    """A reactor's answer to a suggestion."""

    msg_id: str
    status: str
    at: str | None = None
    detail: str | None = None


def parse_ack(payload: bytes | str | Mapping[str, Any]) -> Ack:
    """Parse and check an acknowledgement; raises ValueError saying what is wrong."""
    if isinstance(payload, Mapping):
        data: Any = payload
    else:
        try:
            data = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"ack is not JSON: {exc}") from None
    if not isinstance(data, Mapping):
        raise ValueError("ack must be a JSON object")
    msg_id = data.get("msg_id")
    status = data.get("status")
    if not isinstance(msg_id, str) or not msg_id:
        raise ValueError("ack needs a non-empty string msg_id")
    if status not in ACK_STATUSES:
        raise ValueError(f"ack status must be one of {ACK_STATUSES}, got {status!r}")
    at = data.get("at")
    detail = data.get("detail")
    return Ack(msg_id, status, at if isinstance(at, str) else None, detail if isinstance(detail, str) else None)


def ack_message(msg_id: str, status: str, *, at: float | None = None, detail: str | None = None,
                batch_id: str | None = None) -> dict[str, Any]:
    """The ack a reactor sends (used by the simulated reactor and the tests)."""
    if status not in ACK_STATUSES:
        raise ValueError(f"status must be one of {ACK_STATUSES}")
    msg: dict[str, Any] = {"msg_id": msg_id, "status": status}
    if at is not None:
        msg["at"] = iso(at)
    if detail:
        msg["detail"] = detail
    if batch_id:
        msg["batch_id"] = batch_id
    return msg


def load_schema(name: str) -> dict[str, Any]:
    """``suggestion`` or ``suggestion_ack`` JSON Schema shipped in ``qcloop/schemas``."""
    text = resources.files("qcloop").joinpath("schemas", f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)
