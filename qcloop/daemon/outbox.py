"""Durable MQTT outbox: every message is a row in the ledger database before it is sent.

The worker inserts rows inside the same transaction as the state change they announce
(:meth:`qcloop.daemon.ledger.Ledger.add_message`); the publisher thread reads them in id order
through its own :class:`Outbox` connection and deletes a row only once the broker has
acknowledged it (PUBACK for QoS 1). A broker outage of any length therefore loses nothing:
the rows wait on disk, and after a restart or reconnect they go out in their original order.
Every payload carries a stable ``msg_id`` so consumers can drop the rare duplicate (a message
whose PUBACK arrived just before a crash, before the row could be deleted).
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

SCHEMA_VERSION = 1

OUTBOX_SQL = """
CREATE TABLE IF NOT EXISTS outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id      TEXT    NOT NULL UNIQUE,
    topic       TEXT    NOT NULL,
    payload     BLOB    NOT NULL,
    qos         INTEGER NOT NULL,
    retain      INTEGER NOT NULL,
    created_at  REAL    NOT NULL,
    expires_at  REAL,
    props       TEXT
);
"""
#: columns added after the first release (added by :func:`migrate_outbox` to older ledgers)
OUTBOX_ADDED_COLUMNS = (("expires_at", "REAL"), ("props", "TEXT"))


@dataclass(frozen=True)
class OutMessage:
    """One message to publish.

    Attributes
    ----------
    topic : str
        Full topic (use ``ctx.topic("suggestions")`` / ``daemon.topic(...)`` to build one under
        the configured prefix).
    payload : mapping
        JSON-able mapping. ``schema_version`` (default 1) and ``msg_id`` (default: a new UUID)
        are added when missing; NaN/inf become ``null``; NumPy scalars/arrays become JSON.
    qos : int
        0, 1 or 2 (default 1).
    retain : bool
    schema : str, optional
        Name of its JSON Schema in ``qcloop/schemas`` (set by :mod:`qcloop.daemon.messages`).
    expires_at : float, optional
        Unix time after which the message is useless: sent with the MQTT v5 message expiry
        interval set to the time left, and dropped from the outbox unsent once past.
    response_topic, correlation_data : optional
        MQTT v5 request/response properties (the suggestion -> ack exchange).
    """

    topic: str
    payload: Mapping[str, Any]
    qos: int = 1
    retain: bool = False
    schema: str | None = None
    expires_at: float | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None

    def __post_init__(self) -> None:
        if self.qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {self.qos!r}")
        if not self.topic or "+" in self.topic or "#" in self.topic:
            raise ValueError(f"invalid publish topic {self.topic!r}")

    def encoded(self) -> tuple[str, bytes]:
        """``(msg_id, JSON bytes)`` with ``schema_version`` and ``msg_id`` filled in."""
        body = dict(jsonable(dict(self.payload)))
        body.setdefault("schema_version", SCHEMA_VERSION)
        body.setdefault("msg_id", uuid.uuid4().hex)
        return str(body["msg_id"]), json.dumps(body, allow_nan=False, separators=(",", ":")).encode()

    def props_json(self) -> str | None:
        """The MQTT v5 properties to store with the row (JSON), or None."""
        props = {}
        if self.response_topic:
            props["response_topic"] = self.response_topic
        if self.correlation_data is not None:
            props["correlation_data"] = self.correlation_data.hex()
        return json.dumps(props) if props else None


@dataclass(frozen=True)
class InboundMessage:
    """A message received on a subscribed topic (handled on the worker thread).

    ``mid`` is the MQTT packet id (the daemon acknowledges it only after the ledger commit that
    handled it); ``response_topic`` / ``correlation_data`` are the MQTT v5 request/response
    properties (None from v3 clients); ``dup`` is the redelivery flag.
    """

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    received_at: float = field(default_factory=time.time)
    mid: int = 0
    dup: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None

    def json(self) -> Any:
        """Payload decoded as JSON; None for an empty payload (a cleared retained message).

        Raises ValueError for anything else."""
        if not self.payload.strip():
            return None
        try:
            return json.loads(self.payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"payload on {self.topic} is not JSON: {exc}") from None


@dataclass(frozen=True)
class OutboxRow:
    id: int
    msg_id: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    expires_at: float | None = None
    props: dict | None = None


def jsonable(obj: Any) -> Any:
    """Recursively turn NumPy / Path / datetime values into JSON types; NaN and inf -> None."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, datetime):
        return obj.isoformat()
    if obj is None or isinstance(obj, str):
        return obj
    if hasattr(obj, "to_dict"):
        return jsonable(obj.to_dict())
    return str(obj)


def iso_time(t: float | None = None) -> str:
    """UTC ISO-8601 time with milliseconds (``2025-01-31T12:00:00.123+00:00``)."""
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).isoformat(
        timespec="milliseconds")


def insert_messages(conn: sqlite3.Connection, messages: Iterable[OutMessage]) -> list[str]:
    """Insert messages into the outbox on ``conn`` (inside the caller's transaction).

    A message whose ``msg_id`` is already waiting in the outbox is not inserted twice.
    Returns the msg_ids.
    """
    ids = []
    now = time.time()
    for m in messages:
        msg_id, body = m.encoded()
        conn.execute(
            "INSERT OR IGNORE INTO outbox (msg_id, topic, payload, qos, retain, created_at, expires_at, props) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (msg_id, m.topic, body, int(m.qos), int(bool(m.retain)), now, m.expires_at, m.props_json()),
        )
        ids.append(msg_id)
    return ids


def migrate_outbox(conn: sqlite3.Connection) -> None:
    """Add the columns of :data:`OUTBOX_ADDED_COLUMNS` to an outbox table made by an older qcloop."""
    have = {r[1] for r in conn.execute("PRAGMA table_info(outbox)")}
    for name, kind in OUTBOX_ADDED_COLUMNS:
        if name not in have:
            conn.execute(f"ALTER TABLE outbox ADD COLUMN {name} {kind}")


class Outbox:
    """The publisher's own connection to the outbox table (read in id order, delete on ack)."""

    def __init__(self, db_path: str | Path):
        self.conn = sqlite3.connect(str(db_path), timeout=30.0, isolation_level=None,
                                    check_same_thread=True)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA busy_timeout=30000")
        self.conn.execute(OUTBOX_SQL)
        migrate_outbox(self.conn)

    def fetch(self, after_id: int, limit: int) -> list[OutboxRow]:
        """Up to ``limit`` rows with id > ``after_id``, oldest first."""
        cur = self.conn.execute(
            "SELECT id, msg_id, topic, payload, qos, retain, expires_at, props FROM outbox WHERE id > ? "
            "ORDER BY id LIMIT ?", (after_id, limit))
        return [OutboxRow(r[0], r[1], r[2], bytes(r[3]), int(r[4]), bool(r[5]),
                          None if r[6] is None else float(r[6]), json.loads(r[7]) if r[7] else None)
                for r in cur]

    def delete(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        if not ids:
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def close(self) -> None:
        self.conn.close()
