"""MQTT v5 link (paho-mqtt 2.x, ``CallbackAPIVersion.VERSION2``) with the durable outbox.

* ``connected`` becomes True only in ``on_connect`` with a successful CONNACK reason code.
* The Last Will is the retained ``{prefix}/status`` ``offline`` message; on every successful
  connect the retained ``online`` status (version, config hash) is published.
* The publisher thread reads the outbox in id order and hands at most ``max_inflight``
  messages to paho at once; a row is deleted only when paho reports the broker's PUBACK
  (``on_publish`` with the message's mid). Messages handed over but not acknowledged when the
  connection drops stay in paho's session queue and are re-sent (DUP) right after the next
  CONNACK, before any newer row, so order is kept. After a restart nothing is in paho's queue
  and the publisher starts again from the lowest row still stored.
* Subscriptions are (re)made on every connect; inbound messages are handed to a callback
  (the daemon queues them to its worker thread).
"""

from __future__ import annotations

import json
import logging
import queue
import ssl
import threading
import time
from pathlib import Path
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from qcloop.config import MqttConfig
from qcloop.daemon.outbox import InboundMessage, Outbox
from qcloop.errors import ConfigError

log = logging.getLogger(__name__)


def read_password(cfg: MqttConfig) -> str | None:
    """The broker password: first line of ``password_file``, else ``password``."""
    if cfg.password_file is not None:
        try:
            return Path(cfg.password_file).read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            raise ConfigError(f"mqtt.password_file: cannot read {cfg.password_file}: {exc}") from None
    if cfg.password is not None:
        return cfg.password.get_secret_value()
    return None


class MqttLink:
    """The daemon's connection to the broker.

    Parameters
    ----------
    cfg : MqttConfig
    client_id : str
    status_topic : str
        ``{prefix}/status``.
    status_payload : callable
        ``status_payload("online" | "offline") -> dict`` (JSON-able).
    db_path : Path
        The ledger database (the outbox table is read from it).
    on_message : callable
        ``on_message(InboundMessage)``, called on paho's network thread: must only enqueue.
    metrics : DaemonMetrics, optional
    """

    def __init__(self, cfg: MqttConfig, *, client_id: str, status_topic: str,
                 status_payload: Callable[[str], dict], db_path: Path,
                 on_message: Callable[[InboundMessage], None], metrics=None):
        self.cfg = cfg
        self.status_topic = status_topic
        self.status_payload = status_payload
        self.db_path = Path(db_path)
        self.on_message_cb = on_message
        self.metrics = metrics
        self._subs: dict[str, int] = {}
        self._subs_lock = threading.Lock()
        self._connected = threading.Event()
        self._ever_connected = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._acks: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        self._inflight: dict[int, int] = {}  # mid -> outbox row id (publisher thread only)
        self._last_id = 0
        self._idle = threading.Event()  # outbox empty and nothing in flight
        self._thread: threading.Thread | None = None
        self.last_connect_error: str | None = None
        self.published = 0

        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                        protocol=MQTTProtocolVersion.MQTTv5, reconnect_on_failure=True)
        c.max_inflight_messages_set(cfg.max_inflight)
        c.reconnect_delay_set(min_delay=max(1, int(round(cfg.reconnect_min_s))),
                              max_delay=max(1, int(round(cfg.reconnect_max_s))))
        if cfg.username is not None:
            c.username_pw_set(cfg.username, read_password(cfg))
        if cfg.tls.active:
            for name in ("ca", "cert", "key"):
                p = getattr(cfg.tls, name)
                if p is not None and not Path(p).is_file():
                    raise ConfigError(f"mqtt.tls.{name}: no such file {p}")
            c.tls_set(ca_certs=str(cfg.tls.ca) if cfg.tls.ca else None,
                      certfile=str(cfg.tls.cert) if cfg.tls.cert else None,
                      keyfile=str(cfg.tls.key) if cfg.tls.key else None,
                      cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            if cfg.tls.insecure:
                c.tls_insecure_set(True)
        c.will_set(status_topic, json.dumps(status_payload("offline")), qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self.client = c
        self._props = Properties(PacketTypes.PUBLISH)
        self._props.ContentType = "application/json"

    # ------------------------------------------------------------------ public
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now (if connected) and after every reconnect."""
        with self._subs_lock:
            self._subs[topic] = qos
        if self.connected:
            self.client.subscribe(topic, qos=qos)

    def start(self) -> None:
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s,
                                  clean_start=True)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._publisher, name="qcloop-publisher", daemon=True)
        self._thread.start()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    def notify(self) -> None:
        """New rows are in the outbox."""
        self._idle.clear()
        self._wake.set()

    def alive(self) -> bool:
        return bool(self._thread and self._thread.is_alive())

    def flush(self, timeout: float) -> bool:
        """Wait until the outbox is empty and nothing is in flight (or ``timeout`` s)."""
        self._wake.set()
        return self._idle.wait(timeout) if timeout > 0 else self._idle.is_set()

    def stop(self, timeout: float = 3.0) -> None:
        """Publish ``offline`` (retained), disconnect cleanly (no Last Will), stop threads."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.connected:
            try:
                info = self.client.publish(self.status_topic, json.dumps(self.status_payload("offline")),
                                           qos=1, retain=True, properties=self._props)
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
        self._connected.clear()
        if self.metrics is not None:
            self.metrics.mqtt_connected.set(0)

    # ------------------------------------------------------------------ paho callbacks
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.last_connect_error = str(reason_code)
            log.warning("mqtt: connection refused by %s:%s: %s", self.cfg.host, self.cfg.port, reason_code)
            return
        self.last_connect_error = None
        log.info("mqtt: connected to %s:%s", self.cfg.host, self.cfg.port)
        with self._subs_lock:
            subs = list(self._subs.items())
        for topic, qos in subs:
            client.subscribe(topic, qos=qos)
        client.publish(self.status_topic, json.dumps(self.status_payload("online")), qos=1,
                       retain=True, properties=self._props)
        self._connected.set()
        self._ever_connected.set()
        if self.metrics is not None:
            self.metrics.mqtt_connected.set(1)
        self._wake.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._connected.is_set():
            log.warning("mqtt: disconnected: %s", reason_code)
        self._connected.clear()
        if self.metrics is not None:
            self.metrics.mqtt_connected.set(0)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._acks.put((mid, int(getattr(reason_code, "value", 0))))
        self._wake.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for rc in reason_codes:
            if rc.is_failure:
                log.error("mqtt: a subscription was refused: %s", rc)

    def _on_message(self, client, userdata, message) -> None:
        try:
            self.on_message_cb(InboundMessage(topic=message.topic, payload=bytes(message.payload),
                                              qos=int(message.qos), retain=bool(message.retain)))
        except Exception:  # noqa: BLE001 - never kill paho's network thread
            log.exception("mqtt: inbound handler failed")

    # ------------------------------------------------------------------ publisher thread
    def _publisher(self) -> None:
        outbox = Outbox(self.db_path)
        last_count_t = 0.0
        try:
            while not self._stop.is_set():
                self._wake.wait(0.5)
                self._wake.clear()
                self._drain_acks(outbox)
                if self.connected:
                    free = self.cfg.max_inflight - len(self._inflight)
                    if free > 0:
                        for row in outbox.fetch(self._last_id, free):
                            if not self._send(outbox, row):
                                break
                now = time.monotonic()
                if now - last_count_t > 1.0 or not self._inflight:
                    n = outbox.count()
                    last_count_t = now
                    if self.metrics is not None:
                        self.metrics.outbox.set(n)
                    if n == 0 and not self._inflight:
                        self._idle.set()
                    else:
                        self._idle.clear()
            self._drain_acks(outbox)
        except Exception:  # noqa: BLE001
            log.exception("mqtt: publisher thread died")
            raise
        finally:
            outbox.close()

    def _send(self, outbox: Outbox, row) -> bool:
        """Hand one row to paho; False when it must be tried again later."""
        try:
            info = self.client.publish(row.topic, row.payload, qos=row.qos, retain=row.retain,
                                       properties=self._props)
        except ValueError as exc:  # invalid topic / payload too large: never sendable
            log.error("mqtt: dropping outbox message %s (%s): %s", row.msg_id, row.topic, exc)
            if self.metrics is not None:
                self.metrics.mqtt_rejected.inc()
            outbox.delete([row.id])
            self._last_id = row.id
            return True
        if row.qos == 0 and info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False  # paho drops QoS 0 messages it could not write: try this row again later
        self._last_id = row.id
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("mqtt: publish of %s returned %s; will retry", row.msg_id, info.rc)
        # NO_CONN: paho keeps QoS>0 messages queued and sends them after the next CONNACK
        self._inflight[info.mid] = row.id
        return True

    def _drain_acks(self, outbox: Outbox) -> None:
        done: list[int] = []
        while True:
            try:
                mid, rc = self._acks.get_nowait()
            except queue.Empty:
                break
            row_id = self._inflight.pop(mid, None)
            if row_id is None:
                continue  # the status message, or an ack for a message of an older session
            if rc >= 0x80:
                log.error("mqtt: broker refused outbox message %d (reason code 0x%02x); dropped",
                          row_id, rc)
                if self.metrics is not None:
                    self.metrics.mqtt_rejected.inc()
            else:
                self.published += 1
                if self.metrics is not None:
                    self.metrics.mqtt_published.inc()
            done.append(row_id)
        outbox.delete(done)
