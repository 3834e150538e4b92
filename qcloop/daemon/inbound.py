"""Inbound MQTT messages: one handler table, every payload checked at the edge.

Every subscription is a :class:`Route` (topic filter, handler, QoS). A message is checked once,
before any handler sees it, in this order:

1. size: more than ``mqtt.max_payload_bytes`` -> rejected (``too-large``);
2. nesting: JSON nested deeper than ``mqtt.max_json_depth`` (counted on the raw bytes, so a
   ``[`` x 5000 payload never reaches the parser) -> ``too-deep``;
3. JSON: not UTF-8 JSON -> ``not-json`` (an empty payload is ``None``);
4. JSON Schema of the topic's contract (:mod:`qcloop.daemon.contracts`) -> ``schema``.

A handler may still refuse a well-formed message by raising :class:`Rejected` (``invalid``:
e.g. a close-batch for a batch that does not exist). A rejection publishes an ``events/error``
``command-rejected`` (with ``topic`` and ``reason``) and counts
``qcloop_inbound_rejected_total{topic, reason}``; nothing escapes to the worker loop.

The daemon runs the handlers of one message in one ledger transaction (each in its own
savepoint), records the message in the ``inbox`` table and acknowledges it to the broker only
after that commit (:meth:`qcloop.daemon.service.Daemon._handle_messages`).

The built-in routes (``commands/close-batch``, ``reactor/batch``) are installed by
:func:`install_builtin`; :mod:`qcloop.control.hook` adds the controller's through
``daemon.subscribe``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from paho.mqtt.client import topic_matches_sub

from qcloop.daemon import contracts
from qcloop.daemon.outbox import InboundMessage, OutMessage

if TYPE_CHECKING:  # pragma: no cover
    from qcloop.daemon.service import Daemon, WorkerContext

log = logging.getLogger(__name__)

MessageHandler = Callable[[InboundMessage, "WorkerContext"], "Iterable[OutMessage] | None"]
REJECT_REASONS = ("too-large", "too-deep", "not-json", "schema", "invalid")

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


class Rejected(ValueError):
    """An inbound message refused at the edge; ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def json_depth(payload: bytes) -> int:
    """Deepest nesting of ``[``/``{`` in JSON text, counted without parsing (strings skipped)."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub(b'""', payload)):
        if m.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def decode(payload: bytes, *, max_bytes: int, max_depth: int) -> Any:
    """The payload as JSON after the size and nesting limits (None for an empty payload)."""
    if len(payload) > max_bytes:
        raise Rejected("too-large", f"payload of {len(payload)} bytes exceeds mqtt.max_payload_bytes={max_bytes}")
    if not payload.strip():
        return None
    depth = json_depth(payload)
    if depth > max_depth:
        raise Rejected("too-deep", f"JSON nested {depth} deep exceeds mqtt.max_json_depth={max_depth}")
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Rejected("not-json", f"payload is not UTF-8 JSON: {str(exc)[:200]}") from None


def check(suffix: str, body: Any, *, empty: bool = False) -> None:
    """Validate ``body`` against the inbound contract of ``suffix`` (no contract: no check).

    ``empty``: the payload was empty (a cleared retained message, or "close all" on
    close-batch), which no schema describes; a JSON ``null`` is not empty and is checked."""
    c = contracts.for_topic(suffix, "in")
    if c is None or empty:
        return
    errors = c.errors(body)
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise Rejected("schema", f"does not match {c.name}.json: {'; '.join(e[:200] for e in errors[:3])}{more}")


def msg_key(topic: str, body: Any, payload: bytes) -> str | None:
    """Identity of a message for redelivery checks, when its payload has a ``msg_id``:
    ``topic``, ``msg_id`` and a hash of the payload (an ack's ``msg_id`` names the suggestion,
    so ``accepted`` and ``applied`` for one suggestion are two messages; a redelivery is the
    same bytes)."""
    if isinstance(body, dict) and isinstance(body.get("msg_id"), str) and body["msg_id"]:
        return f"{topic}\0{body['msg_id']}\0{hashlib.sha256(payload).hexdigest()[:16]}"
    return None


@dataclass(frozen=True)
class Route:
    topic: str
    handler: MessageHandler
    qos: int = 1


class Router:
    """The handler table: topic filters -> handlers, in the order they were added."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.routes: list[Route] = []

    def full(self, topic: str) -> str:
        return topic if topic.startswith(self.prefix + "/") else f"{self.prefix}/{topic.strip('/')}"

    def add(self, topic: str, handler: MessageHandler, qos: int = 1) -> Route:
        route = Route(self.full(topic), handler, qos)
        self.routes.append(route)
        return route

    def matching(self, topic: str) -> list[Route]:
        return [r for r in self.routes if topic_matches_sub(r.topic, topic)]

    def suffix(self, topic: str) -> str:
        return topic[len(self.prefix) + 1:] if topic.startswith(self.prefix + "/") else topic

    def parse(self, msg: InboundMessage, *, max_bytes: int, max_depth: int) -> Any:
        """Limits, JSON, schema (raises :class:`Rejected`); the decoded body."""
        body = decode(msg.payload, max_bytes=max_bytes, max_depth=max_depth)
        check(self.suffix(msg.topic), body, empty=not msg.payload.strip())
        return body


# ----------------------------------------------------------------------------- built-in routes
def install_builtin(daemon: "Daemon") -> None:
    """``commands/close-batch`` and ``reactor/batch`` (the daemon's own routes)."""
    daemon.subscribe("commands/close-batch", lambda msg, ctx: close_batch_command(daemon, msg))
    daemon.subscribe("reactor/batch", lambda msg, ctx: reactor_batch(daemon, msg))


def close_batch_command(daemon: "Daemon", msg: InboundMessage) -> None:
    """``{}`` / empty: close every open batch; ``{"batch": id}``: close that existing batch."""
    if msg.retain:
        log.info("close-batch: retained command ignored (a retained command is stale)")
        return None
    body = msg.json() if msg.payload.strip() else {}
    batch = body.get("batch")
    led = daemon.ledger
    if batch is not None and led.get_batch(batch) is None:
        raise Rejected("invalid", f"close-batch: no batch {batch!r} is known")
    closed = daemon.close_batch(batch, "command")
    log.info("close-batch command: closed %s", closed or "nothing")
    return None


def reactor_batch(daemon: "Daemon", msg: InboundMessage) -> None:
    """Batch ``start`` / ``end`` from the reactor (used with ``batch.key: message``)."""
    body = msg.json()
    if body is None:
        return None  # a cleared retained message
    if daemon.settings.batch.key != "message":
        return None
    event = body.get("event", "start")
    timeline = daemon.keyer.timeline
    changed = timeline.start(body["batch"], msg.received_at) if event == "start" else \
        timeline.end(body["batch"], msg.received_at)
    if changed:
        from qcloop.daemon.batches import TIMELINE_STATE_KEY

        daemon.ledger.set_state(TIMELINE_STATE_KEY, timeline.to_json())
        log.info("reactor: batch %s %s", body["batch"], event)
    return None
