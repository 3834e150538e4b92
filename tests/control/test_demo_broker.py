"""The demo's broker helper, for real: an existing broker, mosquitto started on a free port, and
amqtt (MQTT 3.1.1) when mosquitto is hidden from the PATH -- each checked with paho clients of the
protocol it is used with, doing QoS 1 both ways, a retained message and a retained last will; and
what amqtt does with persistent sessions (docs/control.md, qcloop/demo/broker.py)."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from qcloop.demo import broker as demo_broker
from qcloop.demo.broker import BrokerHandle, DemoError, broker_protocol, ensure_broker, free_port, mqtt_answers

pytestmark = pytest.mark.broker
VERSIONS = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311}

needs_amqtt = pytest.mark.skipif(not demo_broker.find_amqtt(), reason="amqtt not installed (pip install 'qcloop[broker]')")


def _client(port: int, name: str, protocol: str, *, clean: bool = True, user: str | None = None,
            manual_ack: bool = False, **will) -> mqtt.Client:
    session = {} if protocol == "5" else {"clean_session": clean}
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=VERSIONS[protocol],
                    manual_ack=manual_ack, **session)
    c.got = []  # (topic, payload, retain, qos, mid)
    c.on_message = lambda cl, u, m: c.got.append((m.topic, m.payload, m.retain, m.qos, m.mid))
    c.present = None
    c.on_connect = lambda cl, u, flags, rc, p: setattr(c, "present", flags.session_present)
    if user:
        c.username_pw_set(user)
    if will:
        c.will_set(will["topic"], will["payload"], qos=1, retain=True)
    c.connect("127.0.0.1", port, keepalive=5)
    c.loop_start()
    deadline = time.time() + 5
    while not c.is_connected():
        assert time.time() < deadline, "no CONNACK"
        time.sleep(0.02)
    return c


def _until(pred, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while not pred() and time.time() < deadline:
        time.sleep(0.05)
    return bool(pred())


def _kill(c: mqtt.Client) -> None:
    """An abnormal disconnect (as a kill -9): the socket closes without DISCONNECT."""
    c.socket().close()
    c.loop_stop()


def _round_trip(port: int, protocol: str) -> None:
    """QoS 1 publish acknowledged and delivered at QoS 1, a retained message delivered to a later
    subscriber, a retained last will published on an abnormal disconnect."""
    topic = f"qctest/{uuid.uuid4().hex[:8]}"
    sub = _client(port, f"sub-{topic[-8:]}", protocol)
    sub.subscribe(f"{topic}/#", qos=1)
    pub = _client(port, f"pub-{topic[-8:]}", protocol)
    try:
        time.sleep(0.3)
        info = pub.publish(f"{topic}/live", b"q1", qos=1)
        info.wait_for_publish(5)
        assert info.is_published()  # PUBACK received
        assert _until(lambda: sub.got), "QoS 1 message not delivered"
        assert sub.got[0][:4] == (f"{topic}/live", b"q1", False, 1)
        pub.publish(f"{topic}/state", b"retained", qos=1, retain=True).wait_for_publish(5)
        dying = _client(port, f"dying-{topic[-8:]}", protocol, topic=f"{topic}/will", payload=b"offline")
        _kill(dying)  # the broker publishes the will
        assert _until(lambda: any(t.endswith("/will") for t, *_ in sub.got), 15), sub.got
        late = _client(port, f"late-{topic[-8:]}", protocol)
        try:
            late.subscribe(f"{topic}/#", qos=1)
            want = {("state", b"retained", True), ("will", b"offline", True)}
            assert _until(lambda: {(t.rsplit("/", 1)[1], p, r) for t, p, r, *_ in late.got} >= want), late.got
        finally:
            late.disconnect()
            late.loop_stop()
        for t in ("state", "will"):  # clear the retained messages
            pub.publish(f"{topic}/{t}", b"", qos=1, retain=True).wait_for_publish(5)
    finally:
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()


@needs_amqtt
def test_amqtt_fallback_when_mosquitto_is_hidden_from_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no mosquitto on the PATH
    monkeypatch.setattr(demo_broker, "SBIN_DIRS", "")
    assert demo_broker.find_mosquitto() is None
    port = free_port()
    handle = ensure_broker("127.0.0.1", port, start="auto")
    try:
        assert (handle.kind, handle.protocol, handle.port) == ("amqtt", "3.1.1", port)
        assert str(handle) == f"amqtt at 127.0.0.1:{port} (MQTT 3.1.1)"
        assert handle.workdir is not None and (handle.workdir / "amqtt.yaml").is_file()
        _round_trip(handle.port, "3.1.1")
        assert broker_protocol("127.0.0.1", port) == "3.1.1"  # it refuses v5
    finally:
        handle.stop()
    assert handle.process.poll() is not None and not handle.workdir.exists()
    assert not mqtt_answers("127.0.0.1", port, timeout=0.5)
    with pytest.raises(DemoError, match="mosquitto is not installed"):
        ensure_broker("127.0.0.1", free_port(), start="mosquitto")


def test_nothing_to_start_names_both_brokers(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(demo_broker, "SBIN_DIRS", "")
    monkeypatch.setattr(demo_broker, "find_amqtt", lambda: False)
    with pytest.raises(DemoError, match=r"install mosquitto \(apt-get install mosquitto\) or amqtt "
                                        r"\(pip install 'qcloop\[broker\]'\)"):
        ensure_broker("127.0.0.1", free_port(), start="auto")
    with pytest.raises(DemoError, match=r"amqtt is not installed"):
        ensure_broker("127.0.0.1", free_port(), start="amqtt")


@needs_amqtt
def test_a_v5_daemon_against_amqtt_is_told_to_set_mqtt_protocol(tmp_path):
    from qcloop.config import MqttConfig
    from qcloop.daemon.mqtt import probe_connect

    handle = ensure_broker("127.0.0.1", free_port(), start="amqtt", workdir=tmp_path / "amqtt")
    try:
        label, text = probe_connect(MqttConfig(port=handle.port), timeout=5)
        assert label == "connack" and "Unsupported protocol version" in text and "mqtt.protocol" in text, text
        assert probe_connect(MqttConfig(port=handle.port, protocol="3.1.1"), timeout=5) is None
    finally:
        handle.stop()
    assert (tmp_path / "amqtt" / "amqtt.log").is_file()  # a given workdir is kept


@needs_amqtt
@pytest.mark.slow
def test_amqtt_persistent_sessions_as_documented(tmp_path):
    """What qcloop/demo/broker.py says amqtt 0.12 does with persistent (clean_session=False)
    sessions: none for anonymous clients; for a named client, messages sent while it is away are
    queued but arrive flagged retained, and a message delivered but not acknowledged when the
    client dies is never redelivered (Mosquitto redelivers it: tests/daemon/test_mqtt311.py)."""
    found = {}
    for allow_anonymous in (True, False):
        port = free_port()
        work = tmp_path / f"anonymous-{allow_anonymous}"
        work.mkdir()
        cfg = demo_broker.amqtt_config("127.0.0.1", port)
        cfg["plugins"]["amqtt.plugins.authentication.AnonymousAuthPlugin"]["allow_anonymous"] = allow_anonymous
        (work / "amqtt.yaml").write_text(yaml.safe_dump(cfg))
        proc = subprocess.Popen([sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(work / "amqtt.yaml")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        handle = BrokerHandle("127.0.0.1", port, "amqtt", "3.1.1", process=proc)
        try:
            assert _until(lambda: demo_broker.port_free(port) is False, 15), "amqtt did not start"
            found[allow_anonymous] = _session_behaviour(port)
        finally:
            handle.stop()
    anonymous, named = found[True], found[False]
    assert anonymous == {"session_present": False, "queued": [], "redelivered": []}
    assert named["session_present"] is True
    assert named["queued"] == [(b"while-away", True)], "queued while away, flagged retained"
    assert named["redelivered"] == [], "an unacknowledged delivery is not redelivered"


def _session_behaviour(port: int) -> dict:
    topic, user = f"qctest/{uuid.uuid4().hex[:8]}", "qcloop-demo"
    pub = _client(port, f"pub-{topic[-8:]}", "3.1.1", user=user)
    cid = f"pers-{topic[-8:]}"
    try:
        # 1. subscribe, die, a message arrives while away, come back
        c = _client(port, cid, "3.1.1", clean=False, user=user, manual_ack=True)
        c.subscribe(f"{topic}/cmd", qos=1)
        time.sleep(0.3)
        _kill(c)
        time.sleep(1.5)
        pub.publish(f"{topic}/cmd", b"while-away", qos=1).wait_for_publish(5)
        time.sleep(0.5)
        c = _client(port, cid, "3.1.1", clean=False, user=user, manual_ack=True)
        present = c.present
        _until(lambda: c.got, 3)
        queued = [(p, r) for t, p, r, *_ in c.got if t.endswith("/cmd")]
        for *_, mid in c.got:
            c.ack(mid, 1)
        # 2. a message delivered, not acknowledged, the client dies, comes back
        c.subscribe(f"{topic}/cmd", qos=1)
        time.sleep(0.3)
        pub.publish(f"{topic}/cmd", b"unacked", qos=1).wait_for_publish(5)
        _until(lambda: any(p == b"unacked" for _, p, *_ in c.got), 5)
        _kill(c)
        time.sleep(1.5)
        c = _client(port, cid, "3.1.1", clean=False, user=user, manual_ack=True)
        _until(lambda: c.got, 4)
        redelivered = [p for t, p, *_ in c.got if t.endswith("/cmd")]
        c.disconnect()
        c.loop_stop()
        return {"session_present": present, "queued": queued, "redelivered": redelivered}
    finally:
        pub.disconnect()
        pub.loop_stop()


def test_mosquitto_is_started_on_a_free_port_and_stopped(monkeypatch):
    if demo_broker.find_mosquitto() is None:
        pytest.skip("mosquitto not installed")
    port = free_port()
    handle = ensure_broker("127.0.0.1", port, start="mosquitto")
    try:
        assert (handle.kind, handle.protocol) == ("mosquitto", "5") and handle.process.poll() is None
        _round_trip(handle.port, "5")
    finally:
        handle.stop()
    assert handle.process.poll() is not None


def test_an_answering_broker_is_used_and_never_fails_without_one():
    if not mqtt_answers("127.0.0.1", 1883, timeout=0.5):
        pytest.skip("no MQTT broker on 127.0.0.1:1883")
    handle = ensure_broker("127.0.0.1", 1883, start="never")
    assert (handle.kind, handle.protocol) == ("existing", "5") and handle.process is None
    with pytest.raises(DemoError, match="no MQTT broker answers"):
        ensure_broker("127.0.0.1", free_port(), start="never")
