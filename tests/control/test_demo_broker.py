"""The demo's broker helper, for real: an existing broker, mosquitto started on a free port, and
the pure-Python fallback when mosquitto is hidden from the PATH -- each checked with a paho MQTT
v5 client (the daemon's protocol) doing QoS 1, a retained message and a last will."""

from __future__ import annotations

import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from qcloop.demo import broker as demo_broker
from qcloop.demo.broker import DemoError, ensure_broker, free_port, mqtt_answers

pytestmark = pytest.mark.broker


def _client(port: int, name: str, **will) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{uuid.uuid4().hex[:6]}",
                    protocol=MQTTProtocolVersion.MQTTv5)
    if will:
        c.will_set(will["topic"], will["payload"], qos=1, retain=True)
    c.connect("127.0.0.1", port, keepalive=5)
    c.loop_start()
    deadline = time.time() + 5
    while not c.is_connected():
        assert time.time() < deadline, "no CONNACK"
        time.sleep(0.02)
    return c


def _round_trip(port: int) -> None:
    """QoS 1 publish acknowledged, a retained message delivered to a later subscriber, a last will."""
    topic = f"qctest/{uuid.uuid4().hex[:8]}"
    pub = _client(port, "pub")
    info = pub.publish(f"{topic}/state", b"retained", qos=1, retain=True)
    info.wait_for_publish(5)
    assert info.is_published()  # PUBACK received
    dying = _client(port, "dying", topic=f"{topic}/will", payload=b"offline")
    got: dict[str, bytes] = {}
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:6]}",
                      protocol=MQTTProtocolVersion.MQTTv5)
    sub.on_message = lambda c, u, m: got.__setitem__(m.topic.rsplit("/", 1)[1], m.payload)
    sub.on_connect = lambda c, *a: c.subscribe(f"{topic}/#", qos=1)
    sub.connect("127.0.0.1", port, keepalive=5)
    sub.loop_start()
    try:
        dying.socket().close()  # abnormal disconnect: the broker publishes the will
        dying.loop_stop()
        deadline = time.time() + 15
        while not {"state", "will"} <= set(got):
            assert time.time() < deadline, got
            time.sleep(0.05)
        assert got == {"state": b"retained", "will": b"offline"}
    finally:
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()


def test_python_fallback_when_mosquitto_is_hidden_from_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no mosquitto on the PATH
    monkeypatch.setattr(demo_broker, "SBIN_DIRS", "")
    assert demo_broker.find_mosquitto() is None
    port = free_port()
    handle = ensure_broker("127.0.0.1", port, start="auto")
    try:
        assert handle.kind == "python" and handle.port == port
        _round_trip(handle.port)
    finally:
        handle.stop()
    assert not mqtt_answers("127.0.0.1", port, timeout=0.5)
    with pytest.raises(DemoError, match="mosquitto is not installed"):
        ensure_broker("127.0.0.1", free_port(), start="mosquitto")


def test_mosquitto_is_started_on_a_free_port_and_stopped(monkeypatch):
    if demo_broker.find_mosquitto() is None:
        pytest.skip("mosquitto not installed")
    port = free_port()
    handle = ensure_broker("127.0.0.1", port, start="mosquitto")
    try:
        assert handle.kind == "mosquitto" and handle.process.poll() is None
        _round_trip(handle.port)
    finally:
        handle.stop()
    assert handle.process.poll() is not None


def test_an_answering_broker_is_used_and_never_fails_without_one():
    if not mqtt_answers("127.0.0.1", 1883, timeout=0.5):
        pytest.skip("no MQTT broker on 127.0.0.1:1883")
    handle = ensure_broker("127.0.0.1", 1883, start="never")
    assert handle.kind == "existing" and handle.process is None and handle.broker is None
    with pytest.raises(DemoError, match="no MQTT broker answers"):
        ensure_broker("127.0.0.1", free_port(), start="never")
