"""Seeded fuzz test (Hypothesis) of every inbound topic's handler, through the daemon's one handler
table: whatever bytes arrive, nothing escapes, the message is recorded as handled or rejected,
and every event the daemon queues matches its schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from daemon_helpers import free_port, write_config
from qcloop.config import load_settings
from qcloop.daemon import contracts
from qcloop.daemon.outbox import InboundMessage
from qcloop.daemon.service import Daemon

INBOUND = sorted(c.topic for c in contracts.contracts().values() if c.direction == "in")
KEYS = ["batch", "event", "msg_id", "status", "setpoints", "at", "detail", "batch_id", "schema_version",
        "temperature", "bacth", ""]
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30),
                      st.sampled_from(["start", "end", "A", "", "applied", "accepted", "B0001", "nope"]))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=5)),
    max_leaves=20)


def _encode(v) -> bytes:
    return json.dumps(v).encode()


payloads = st.one_of(
    st.binary(max_size=300),
    json_value.map(_encode),
    st.dictionaries(st.sampled_from(KEYS), json_value, max_size=5).map(_encode),
    st.integers(1, 6000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 3000).map(lambda n: b'{"batch": ' * n),
    st.integers(60_000, 200_000).map(lambda n: _encode({"msg_id": "x", "status": "applied", "detail": "d" * n})),
    st.sampled_from([b"", b" ", b"null", b"[]", b"0", b'""']),  # empty, and JSON that is no object
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "export").mkdir()
    cfg = write_config(tmp / "qcloop.yaml", watch_dir=tmp / "export", state=tmp / "state", port=free_port(),
                       prefix="qcfuzz/x", batch={"key": "message", "close_after_idle_s": 3600, "min_particles": 1},
                       metrics={"enabled": False}, targets={"ecd_nm.mean": {"target": 50, "tolerance": 2}},
                       control={"enabled": True, "rules": [{"metric": "ecd_nm.mean", "setpoint": "temperature",
                                                             "gain": 0.4}],
                                "setpoints": [{"name": "temperature", "min": 60, "max": 100, "max_step": 2}]})
    d = Daemon(load_settings(cfg, use_env=False), registry=CollectorRegistry())
    d.start()  # on this thread: the test drives the worker's message handling directly
    yield d
    d.shutdown()


def _outbox(d: Daemon) -> list[tuple[str, bytes]]:
    return [(t, bytes(p)) for t, p in d.ledger.conn.execute("SELECT topic, payload FROM outbox ORDER BY id")]


@settings(derandomize=True, database=None, max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(topic=st.sampled_from(INBOUND), payload=payloads, retain=st.booleans(),
       corr=st.one_of(st.none(), st.binary(max_size=40)))
def test_every_inbound_handler_survives_anything(daemon: Daemon, topic: str, payload: bytes, retain: bool,
                                                 corr: bytes | None) -> None:
    d = daemon
    before = len(_outbox(d))
    n_inbox = d.ledger.conn.execute("SELECT COUNT(*) FROM inbox").fetchone()[0]
    msg = InboundMessage(topic=f"{d.prefix}/{topic}", payload=payload, qos=1, retain=retain, mid=1,
                         correlation_data=corr)
    d._handle_messages(msg)  # must not raise
    assert not d.ledger.in_transaction
    inbox = d.ledger.conn.execute("SELECT COUNT(*) FROM inbox").fetchone()[0]
    dup = d.ledger.conn.execute("SELECT COUNT(*) FROM inbox").fetchone()[0] == n_inbox
    assert inbox == n_inbox + 1 or dup, "every message is recorded as handled or rejected"
    for t, body in _outbox(d)[before:]:
        c = contracts.for_topic(t[len(d.prefix) + 1:], "out")
        assert c is not None, t
        assert c.errors(json.loads(body)) == [], (t, body[:300])
    events = [json.loads(b) for t, b in _outbox(d)[before:] if t.endswith("events/error")]
    assert all(e["kind"] in ("command-rejected", "hook-failed") for e in events)
    assert not any(e["kind"] == "hook-failed" for e in events), events  # no handler raised a bug
    if len(payload) > d.settings.mqtt.max_payload_bytes:
        assert [e["reason"] for e in events] == ["too-large"]
