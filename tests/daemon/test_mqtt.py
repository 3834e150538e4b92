"""MQTT link + durable outbox against real Mosquitto brokers (machine's and private ones)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from daemon_helpers import Broker, Recorder, clear_retained, validator, wait_until
from qcloop.config import MqttConfig
from qcloop.daemon.ledger import Ledger
from qcloop.daemon.messages import status_payload
from qcloop.daemon.metrics import DaemonMetrics
from qcloop.daemon.mqtt import MqttLink
from qcloop.daemon.outbox import OutMessage

pytestmark = pytest.mark.broker
SEQ = {"seq": {"type": "object", "required": ["msg_id", "i"]}}  # the test's own topic


def _status(state: str, cause: str, will: bool = False) -> dict:
    return status_payload("t1", "0123456789ab", state, cause, will=will)


def _link(tmp_path: Path, cfg: MqttConfig, prefix: str, metrics: DaemonMetrics | None = None) -> tuple[MqttLink, Ledger]:
    led = Ledger(tmp_path / "state")
    link = MqttLink(cfg, client_id=f"test-{prefix.rsplit('/', 1)[-1]}", status_topic=f"{prefix}/status",
                    status_payload=_status, db_path=led.path, on_message=lambda m: None, metrics=metrics)
    return link, led


def _queue(led: Ledger, prefix: str, n: int, start: int = 0) -> None:
    with led.transaction():
        for i in range(start, start + n):
            led.add_message(OutMessage(f"{prefix}/seq", {"msg_id": f"m{i:04d}", "i": i}))


def test_outbox_drains_in_order_after_puback(tmp_path: Path, machine_broker, prefix: str) -> None:
    host, port = machine_broker
    rec = Recorder(host, port, prefix, extra_schemas=SEQ)
    metrics = DaemonMetrics(CollectorRegistry())
    link, led = _link(tmp_path, MqttConfig(host=host, port=port, max_inflight=5), prefix, metrics)
    try:
        _queue(led, prefix, 60)  # stored before any connection exists
        link.start()
        assert link.wait_connected(10)
        link.notify()
        assert rec.wait_for(lambda r: len(r.on("seq")) >= 60, 20)
        assert [m["i"] for m in rec.on("seq")] == list(range(60))
        assert wait_until(lambda: led.outbox_count() == 0, 10), "rows are deleted once acknowledged"
        assert link.flush(5)
        assert metrics.mqtt_connected._value.get() == 1
        assert metrics.mqtt_published._value.get() == 60
        status = rec.on("status")
        assert status and status[-1]["state"] == "online"
        validator("status.json").validate(status[-1])
    finally:
        link.stop()
        led.close()
        assert rec.wait_for(lambda r: r.on("status")[-1]["state"] == "offline", 5)
        rec.close()
        clear_retained(host, port, prefix)


def test_broker_outage_loses_nothing_and_keeps_order(tmp_path: Path, own_broker: Broker, prefix: str) -> None:
    b = own_broker
    metrics = DaemonMetrics(CollectorRegistry())
    cfg = MqttConfig(host=b.host, port=b.port, max_inflight=4, reconnect_min_s=1, reconnect_max_s=1,
                     keepalive_s=5)
    link, led = _link(tmp_path, cfg, prefix, metrics)
    rec = Recorder(b.host, b.port, prefix, extra_schemas=SEQ)
    try:
        link.start()
        assert link.wait_connected(10)
        _queue(led, prefix, 10)
        link.notify()
        assert rec.wait_for(lambda r: len(r.on("seq")) >= 10, 10)
        rec.close()
        b.stop()
        assert wait_until(lambda: not link.connected, 10)
        assert metrics.mqtt_connected._value.get() == 0
        for k in range(4):  # messages keep arriving during the outage
            _queue(led, prefix, 10, start=10 + 10 * k)
            link.notify()
            time.sleep(0.5)
        assert led.outbox_count() == 40
        b.start()
        rec = Recorder(b.host, b.port, prefix, extra_schemas=SEQ)
        assert link.wait_connected(15)
        assert rec.wait_for(lambda r: len(r.on("seq")) >= 40, 20)
        got = [m["i"] for m in rec.on("seq")]
        # paho re-sends what was in flight at the cut first (DUP), then the rest in id order
        assert sorted(set(got)) == list(range(10, 50))
        dedup = list(dict.fromkeys(got))
        assert dedup == list(range(10, 50)), "order is kept"
        assert wait_until(lambda: led.outbox_count() == 0, 10)
    finally:
        rec.close()
        link.stop()
        led.close()


def test_tls_and_password(tmp_path: Path, certs: dict, prefix: str) -> None:
    b = Broker(tmp_path / "tlsbroker", tls=certs, passwords={"qcloop": "s3cret", "reader": "r"}).start()
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    try:
        rec = Recorder(b.host, b.port, prefix, username="reader", password="r", tls_ca=certs["ca"], extra_schemas=SEQ)
        cfg = MqttConfig(host="localhost", port=b.port, username="qcloop", password_file=pw,
                         tls={"ca": certs["ca"]})
        link, led = _link(tmp_path, cfg, prefix)
        link.start()
        assert link.wait_connected(10), link.last_connect_error
        _queue(led, prefix, 3)
        link.notify()
        assert rec.wait_for(lambda r: len(r.on("seq")) == 3, 10)
        link.stop()
        led.close()
        # a wrong password is refused at CONNACK: never "connected", messages stay stored
        bad = tmp_path / "bad"
        bad.write_text("wrong\n")
        cfg2 = MqttConfig(host="localhost", port=b.port, username="qcloop", password_file=bad,
                          tls={"ca": certs["ca"]})
        metrics = DaemonMetrics(CollectorRegistry())
        link2, led2 = _link(tmp_path / "second", cfg2, prefix, metrics)
        _queue(led2, prefix, 2)
        link2.start()
        assert not link2.wait_connected(3)
        assert link2.last_connect_error and "authoriz" in link2.last_connect_error.lower()
        assert metrics.mqtt_connected._value.get() == 0
        assert led2.outbox_count() == 2
        link2.stop()
        led2.close()
        rec.close()
    finally:
        b.stop()


def test_suggestions_carry_expiry_response_topic_and_correlation_data(tmp_path: Path, machine_broker,
                                                                      prefix: str) -> None:
    """Issue 14 item 3: MQTT v5 message expiry = the suggestion's TTL (time left), response topic
    = the ack topic, correlation data = its msg_id; an expired outbox row is dropped unsent."""
    import time as _time

    from qcloop.control.safety import Move
    from qcloop.control.suggestions import Suggestion
    from qcloop.daemon import messages

    host, port = machine_broker
    rec = Recorder(host, port, prefix)
    metrics = DaemonMetrics(CollectorRegistry())
    link, led = _link(tmp_path, MqttConfig(host=host, port=port), prefix, metrics)
    now = _time.time()

    def sugg(msg_id: str, created: float, ttl: float) -> Suggestion:
        return Suggestion(msg_id=msg_id, batch_id="B1", line_id="t1", created_at=created, expires_at=created + ttl,
                          mode="advisory", planner="pi", moves=(Move("temperature", "degC", 80.0, 82.0, 60.0, 100.0),), reason={"metric": "ecd_nm.mean", "observed": 60.0,
                          "target": 50.0, "tolerance": 2.5, "n_particles": 100, "confidence": 1.0})

    try:
        led.add_message(messages.suggestion(prefix, sugg("gone", now - 100, 50)),  # expired while waiting
                        messages.suggestion(prefix, sugg("s-1", now, 900)))
        link.start()
        assert link.wait_connected(10)
        link.notify()
        assert rec.wait_for(lambda r: len(r.full("suggestions")) == 1, 10)
        got = rec.full("suggestions")[0]
        assert got.body["msg_id"] == "s-1" and 895 <= got.expiry <= 900
        assert got.response_topic == f"{prefix}/suggestions/ack" and got.correlation_data == b"s-1"
        assert got.content_type == "application/json"
        assert wait_until(lambda: led.outbox_count() == 0, 10)
        assert metrics.mqtt_expired._value.get() == 1
    finally:
        link.stop()
        led.close()
        rec.close()
        clear_retained(host, port, prefix)
