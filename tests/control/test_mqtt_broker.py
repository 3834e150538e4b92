"""The pure-Python fallback broker (qcloop/mqtt_broker.py), exercised with real paho clients."""

from __future__ import annotations

import queue
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from qcloop.mqtt_broker import Broker, topic_matches, valid_filter


@pytest.fixture()
def broker():
    b = Broker("127.0.0.1", 0).start()
    yield b
    b.stop()


def client(port: int, protocol=mqtt.MQTTv311, will: tuple[str, bytes] | None = None, keepalive: int = 30):
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}", protocol=protocol)
    inbox: queue.Queue = queue.Queue()
    c.on_message = lambda cl, ud, m: inbox.put((m.topic, m.payload, m.qos, m.retain))
    if will:
        c.will_set(will[0], will[1], qos=1)
    c.connect("127.0.0.1", port, keepalive=keepalive)
    c.loop_start()
    deadline = time.time() + 5
    while not c.is_connected() and time.time() < deadline:
        time.sleep(0.01)
    assert c.is_connected()
    c.inbox = inbox  # type: ignore[attr-defined]
    return c


def subscribe(c, topic: str, qos: int = 1) -> None:
    done = queue.Queue()
    c.on_subscribe = lambda *a: done.put(a)
    c.subscribe(topic, qos)
    done.get(timeout=5)


def get(c, timeout: float = 5.0):
    return c.inbox.get(timeout=timeout)


def test_topic_matching_rules():
    assert topic_matches("a/+/c", "a/b/c")
    assert not topic_matches("a/+/c", "a/b/d")
    assert topic_matches("a/#", "a")
    assert topic_matches("a/#", "a/b/c")
    assert not topic_matches("a/+", "a/b/c")
    assert topic_matches("#", "x/y")
    assert not topic_matches("#", "$SYS/x")
    assert not topic_matches("+/x", "$SYS/x")
    assert valid_filter("a/+/#") and not valid_filter("a/#/b") and not valid_filter("a/b+")


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5])
def test_publish_subscribe_wildcards_qos1(broker, protocol):
    sub = client(broker.port, protocol)
    pub = client(broker.port, protocol)
    subscribe(sub, "line/+/suggestions/#", 1)
    info = pub.publish("line/7/suggestions/ack", b'{"x":1}', qos=1)
    info.wait_for_publish(5)
    assert info.is_published()  # PUBACK came back
    topic, payload, qos, retain = get(sub)
    assert (topic, payload, qos, retain) == ("line/7/suggestions/ack", b'{"x":1}', 1, False)
    pub.publish("line/7/other", b"no", qos=0)
    pub.publish("line/7/suggestions", b"parent", qos=0).wait_for_publish(5)  # '#' matches the parent
    assert get(sub)[1] == b"parent"
    with pytest.raises(queue.Empty):
        sub.inbox.get(timeout=0.3)
    for c in (sub, pub):
        c.disconnect()
        c.loop_stop()


def test_retained_messages_and_clearing(broker):
    pub = client(broker.port)
    pub.publish("r/setpoints", b"v1", qos=1, retain=True).wait_for_publish(5)
    pub.publish("r/setpoints", b"v2", qos=1, retain=True).wait_for_publish(5)
    late = client(broker.port, mqtt.MQTTv5)
    subscribe(late, "r/#")
    topic, payload, _qos, retain = get(late)
    assert (topic, payload, retain) == ("r/setpoints", b"v2", True)
    pub.publish("r/setpoints", b"", qos=1, retain=True).wait_for_publish(5)
    assert get(late)[1] == b""  # the clearing publish itself is delivered live
    later = client(broker.port)
    subscribe(later, "r/#")
    with pytest.raises(queue.Empty):
        later.inbox.get(timeout=0.3)
    for c in (pub, late, later):
        c.disconnect()
        c.loop_stop()


def test_will_on_abnormal_disconnect_not_on_clean_one(broker):
    watcher = client(broker.port)
    subscribe(watcher, "status/#")
    clean = client(broker.port, will=("status/clean", b"offline"))
    clean.disconnect()
    clean.loop_stop()
    with pytest.raises(queue.Empty):
        watcher.inbox.get(timeout=0.3)
    dying = client(broker.port, will=("status/dying", b"offline"))
    dying.loop_stop()
    dying.socket().close()  # network failure: no DISCONNECT
    topic, payload, _q, _r = get(watcher)
    assert (topic, payload) == ("status/dying", b"offline")
    watcher.disconnect()
    watcher.loop_stop()


def test_ping_keeps_connection_alive(broker):
    c = client(broker.port, keepalive=1)
    subscribe(c, "k")
    time.sleep(2.5)  # paho pings every second; the broker drops only silent clients
    assert c.is_connected()
    c.publish("k", b"still here", qos=1).wait_for_publish(5)
    assert get(c)[1] == b"still here"
    c.disconnect()
    c.loop_stop()
