"""MQTT link (paho-mqtt 2.x, ``CallbackAPIVersion.VERSION2``) with the durable outbox.

``mqtt.protocol`` picks MQTT v5 (default) or MQTT 3.1.1 (brokers without v5). Everything below
holds for both, except what names a v5 property: in 3.1.1 no properties exist (no content type,
message expiry, response topic, correlation data, session expiry); the payloads carry
``msg_id`` and ``expires_at``, and the outbox still drops an expired row unsent.

Threads: a **network** thread owns the connection (its own loop around ``client.loop()``, so every
failed connect is seen with its reason) and a **publisher** thread drains the outbox.

* Connecting: every failure is logged with its reason (the OpenSSL reason for TLS trouble, the
  CONNACK reason code for a refused login -- in 3.1.1 the CONNACK return code 1-5; the first of a kind at once, repeats once a minute) and
  counted in ``qcloop_mqtt_connect_failures_total{reason}`` (:data:`CONNECT_FAILURES`). Failed
  attempts back off from ``reconnect_min_s`` to ``reconnect_max_s``; while the broker's port is
  closed (refused / unreachable) it is probed every ``probe_interval_s``, so the daemon reconnects
  as soon as the broker is back, whatever the outage's length.
* ``connected`` becomes True only in ``on_connect`` with a successful CONNACK.
* Session: ``clean_start=False`` with ``session_expiry_s`` (3.1.1: ``clean_session=False``; the
  broker decides how long it keeps the session) and a stable client id, and **manual
  acknowledgements**: an inbound QoS 1 message is acknowledged (:meth:`MqttLink.ack`) only after
  the worker committed its handling. The broker redelivers what a crash interrupted and queues
  what arrives while the daemon is away.
* Status: the Last Will is the retained ``offline`` status (content type ``application/json`` in
  v5; ``time`` null: it is registered at connect); after every connect and every
  ``status_interval_s`` the retained ``online`` status carries the current time.
* Outbox: rows are handed to paho in id order, at most ``max_inflight`` unacknowledged; a row is
  deleted only on the broker's PUBACK. An expired row (``expires_at`` passed) is dropped unsent;
  in v5 rows carry properties: message expiry (the time left until ``expires_at``), response
  topic, correlation data.
* Inbound: a message on a topic this client did not subscribe to is dropped (acknowledged
  unread): amqtt 0.12 sends every retained message matching *any* client's subscription on connect.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import socket
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
from qcloop.daemon.outbox import InboundMessage, Outbox, OutboxRow
from qcloop.errors import ConfigError

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/json"
#: ``mqtt.protocol`` -> paho's protocol version
PROTOCOLS = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311}
#: MQTT 3.1.1 CONNACK return codes, by the name paho gives the v5 reason code it maps them to
V311_CONNACK = {"Unsupported protocol version": 1, "Client identifier not valid": 2, "Server unavailable": 3,
                "Bad user name or password": 4, "Not authorized": 5}
#: CONNACK reason code (v5 value; paho maps 3.1.1 codes onto them) -> (label, hint)
_CONNACK_HINTS = {0x86: ("auth", " (mqtt.username, mqtt.password_file)"),
                  0x87: ("auth", " (mqtt.username, mqtt.password_file)"),
                  0x8C: ("auth", " (mqtt.username, mqtt.password_file)"),
                  0x84: ("connack", " (the broker does not speak this MQTT version: mqtt.protocol)")}
#: ``reason`` label values of ``qcloop_mqtt_connect_failures_total``
CONNECT_FAILURES = ("refused", "unreachable", "dns", "timeout", "tls-verify", "tls", "closed",
                    "no-connack", "auth", "connack")
_PROBED = ("refused", "unreachable", "timeout", "dns")  # port closed: probe, reconnect when open


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


def tls_context(cfg: MqttConfig) -> ssl.SSLContext:
    """The client TLS context; a file that cannot be loaded raises ConfigError naming the field."""
    tls = cfg.tls
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    try:
        if tls.ca is not None:
            ctx.load_verify_locations(cafile=str(tls.ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"mqtt.tls.ca: cannot load {tls.ca}: {_ssl_text(exc)}") from None
    if tls.cert is not None or tls.key is not None:
        if tls.cert is None or tls.key is None:
            raise ConfigError("mqtt.tls: cert and key must be given together")
        try:
            ctx.load_cert_chain(str(tls.cert), str(tls.key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"mqtt.tls.cert/key: cannot load {tls.cert} / {tls.key}: {_ssl_text(exc)}") from None
    if tls.insecure:
        ctx.check_hostname = False
    return ctx


def build_client(cfg: MqttConfig, client_id: str, *, will: bytes | None = None, will_topic: str | None = None,
                 manual_ack: bool = False, clean: bool = True) -> mqtt.Client:
    """A paho client of ``cfg.protocol`` with auth, TLS and Last Will; raises ConfigError for
    unusable settings. ``clean``: the 3.1.1 ``clean_session`` flag (v5 sets clean start at connect)."""
    session = {} if cfg.v5 else {"clean_session": clean}
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=PROTOCOLS[cfg.protocol],
                    reconnect_on_failure=False, manual_ack=manual_ack, **session)
    c.max_inflight_messages_set(cfg.max_inflight)
    c.connect_timeout = cfg.connect_timeout_s
    if cfg.username is not None:
        c.username_pw_set(cfg.username, read_password(cfg))
    if cfg.tls.active:
        c.tls_set_context(tls_context(cfg))
    if will is not None and will_topic is not None:
        props = None
        if cfg.v5:
            props = Properties(PacketTypes.WILLMESSAGE)
            props.ContentType = CONTENT_TYPE
        c.will_set(will_topic, will, qos=1, retain=True, properties=props)
    # never let paho write to the socket from a publishing thread: the network thread does
    c.on_socket_register_write = lambda client, userdata, sock: None
    return c


def _ssl_text(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc.strerror or exc).replace("_", " ").lower()
    return str(getattr(exc, "strerror", None) or exc)


def classify(exc: BaseException, where: str, *, tls: bool = False) -> tuple[str, str]:
    """``(reason label, text)`` of a failed connect (:data:`CONNECT_FAILURES`); ``tls``: the
    connection was to start TLS (a reset then happened during the handshake)."""
    reset = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
    if tls and isinstance(exc, reset):
        return "tls", (f"TLS to {where}: the broker closed the connection during the handshake "
                       f"({exc.strerror or exc}; a plain listener? mqtt.port, mqtt.tls)")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "tls-verify", f"TLS to {where}: {_ssl_text(exc)} (mqtt.tls.ca, mqtt.host)"
    if isinstance(exc, ssl.SSLEOFError) or (isinstance(exc, ssl.SSLError) and "EOF" in str(exc)):
        return "tls", (f"TLS to {where}: the broker closed the connection during the handshake "
                       f"(a plain listener? mqtt.port, mqtt.tls)")
    if isinstance(exc, ssl.SSLError):
        return "tls", f"TLS to {where}: handshake failed: {_ssl_text(exc)} (a plain listener? mqtt.port, mqtt.tls)"
    if isinstance(exc, ConnectionRefusedError):
        return "refused", f"connection to {where} refused (no broker listening there: mqtt.host, mqtt.port)"
    if isinstance(exc, socket.gaierror):
        return "dns", f"cannot resolve mqtt.host of {where}: {exc.strerror or exc}"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timeout", f"connection to {where} timed out"
    if isinstance(exc, reset):
        return "closed", f"{where} closed the connection ({exc.strerror or exc})"
    if isinstance(exc, OSError):
        return "unreachable", f"cannot reach {where}: {exc.strerror or exc}"
    return "closed", f"connection to {where} failed: {type(exc).__name__}: {exc}"


def connack_failure(reason_code, protocol: str = "5") -> tuple[str, str]:
    """``(label, text)`` of a refused CONNACK; 3.1.1 names its return code (1-5)."""
    value = int(getattr(reason_code, "value", 0))
    label, hint = _CONNACK_HINTS.get(value, ("connack", ""))
    if protocol == "5":
        code = f"CONNACK 0x{value:02x}"
    else:
        code = f"MQTT 3.1.1 CONNACK return code {V311_CONNACK.get(str(reason_code), '?')}"
    return label, f"broker refused the connection: {reason_code} ({code}){hint}"


def probe_connect(cfg: MqttConfig, *, timeout: float = 10.0) -> tuple[str, str] | None:
    """Connect once (``check-config --connect``): None when the broker accepted, else
    ``(reason label, text)``. Publishes and subscribes nothing; clean session."""
    c = build_client(cfg, f"qcloop-check-{time.monotonic_ns() % 10**8}")
    where = f"{cfg.host}:{cfg.port}"
    result: dict = {}
    c.on_connect = lambda cl, u, flags, rc, props: result.setdefault("rc", rc)
    try:
        c.connect(cfg.host, cfg.port, keepalive=cfg.keepalive_s, **({"clean_start": True} if cfg.v5 else {}))
    except Exception as exc:  # noqa: BLE001 - every failure is a reason to report
        return classify(exc, where, tls=cfg.tls.active)
    deadline = time.monotonic() + timeout
    try:
        while "rc" not in result and time.monotonic() < deadline:
            if c.loop(0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
    finally:
        if "rc" in result and not result["rc"].is_failure:
            c.disconnect()
            c.loop(0.1)
    if "rc" not in result:
        return "no-connack", (f"{where} closed the connection before CONNACK (a TLS listener spoken to "
                              f"without TLS? mqtt.tls.enabled)")
    return connack_failure(result["rc"], cfg.protocol) if result["rc"].is_failure else None


class MqttLink:
    """The daemon's connection to the broker.

    Parameters
    ----------
    cfg : MqttConfig
    client_id : str
        Stable across restarts (the broker keeps the session under it).
    status_topic : str
        ``{prefix}/status``.
    status_payload : callable
        ``status_payload(state, cause, will=False) -> dict`` (``status.json``).
    db_path : Path
        The ledger database (the outbox table is read from it).
    on_message : callable
        ``on_message(InboundMessage)``, called on the network thread: must only enqueue; the
        daemon calls :meth:`ack` after handling it.
    metrics : DaemonMetrics, optional
    """

    def __init__(self, cfg: MqttConfig, *, client_id: str, status_topic: str,
                 status_payload: Callable[..., dict], db_path: Path,
                 on_message: Callable[[InboundMessage], None], metrics=None):
        self.cfg = cfg
        self.status_topic = status_topic
        self.status_payload = status_payload
        self.db_path = Path(db_path)
        self.on_message_cb = on_message
        self.metrics = metrics
        self.where = f"{cfg.host}:{cfg.port}"
        self._subs: dict[str, int] = {}
        self._subs_lock = threading.Lock()
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._closing = threading.Event()
        self._wake = threading.Event()
        self._acks: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        self._inflight: dict[int, int] = {}  # mid -> outbox row id (publisher thread only)
        self._pending: dict[int, int] = {}  # inbound mid -> session number, until acknowledged
        self._pending_lock = threading.Lock()
        self._session = 0
        self._connack = None  # None: no CONNACK yet on this attempt; else True / False
        self._last_id = 0
        self._idle = threading.Event()  # outbox empty and nothing in flight
        self._threads: list[threading.Thread] = []
        self._failure_log: dict[str, float] = {}
        self.last_connect_error: str | None = None
        self.published = 0
        will = json.dumps(status_payload("offline", "connection-lost", will=True)).encode()
        self.client = build_client(cfg, client_id, will=will, will_topic=status_topic, manual_ack=True, clean=False)
        c = self.client
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self._props = _publish_props() if cfg.v5 else None

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
        session: dict = {}  # 3.1.1: clean_session=False was set on the client
        if self.cfg.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = int(self.cfg.session_expiry_s)
            session = {"clean_start": False, "properties": props}
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s, **session)
        for target, name in ((self._network, "qcloop-mqtt"), (self._publisher, "qcloop-publisher")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    def notify(self) -> None:
        """New rows are in the outbox."""
        self._idle.clear()
        self._wake.set()

    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def flush(self, timeout: float) -> bool:
        """Wait until the outbox is empty and nothing is in flight (or ``timeout`` s)."""
        self._wake.set()
        return self._idle.wait(timeout) if timeout > 0 else self._idle.is_set()

    def ack(self, msg: InboundMessage) -> None:
        """Acknowledge an inbound QoS 1 message to the broker (after the ledger commit)."""
        if msg.qos == 0:
            return
        with self._pending_lock:
            session = self._pending.pop(msg.mid, None)
            current = self._session
        if session == current and self.connected:
            self.client.ack(msg.mid, msg.qos)
        # else: delivered in a session the broker no longer has; it was redelivered (or not) there

    def stop(self, timeout: float = 3.0) -> None:
        """Publish ``offline`` (retained), disconnect cleanly (no Last Will), stop threads."""
        self._closing.set()
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            if t.name == "qcloop-publisher":
                t.join(timeout)
        if self.connected:
            try:
                info = self.client.publish(self.status_topic, json.dumps(self.status_payload("offline", "stopped")),
                                           qos=1, retain=True, properties=self._props)
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
            self.client.disconnect()
        for t in self._threads:
            t.join(timeout)
        self._connected.clear()
        if self.metrics is not None:
            self.metrics.mqtt_connected.set(0)

    # ------------------------------------------------------------------ network thread
    def _network(self) -> None:
        delay = self.cfg.reconnect_min_s
        while not self._closing.is_set():
            self._connack = None
            try:
                self.client.reconnect()
            except Exception as exc:  # noqa: BLE001 - every connect failure is reported, then retried
                label, text = classify(exc, self.where, tls=self.cfg.tls.active)
                self._failed(label, text)
                self._back_off(delay, probe=label in _PROBED)
                delay = min(2 * delay, self.cfg.reconnect_max_s)
                continue
            self._serve()
            if self._connack is True:
                delay = self.cfg.reconnect_min_s
                self._back_off(min(delay, 0.5), probe=True)
                continue
            if self._connack is None and not self._closing.is_set():
                self._failed("no-connack", f"{self.where} closed the connection before CONNACK "
                                           f"(a TLS listener spoken to without TLS? mqtt.tls.enabled)")
            self._back_off(delay, probe=False)
            delay = min(2 * delay, self.cfg.reconnect_max_s)

    def _serve(self) -> None:
        """Run paho's loop until the connection ends (or no CONNACK comes in time)."""
        t0 = time.monotonic()
        while True:
            rc = self.client.loop(timeout=0.1)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
            if self._connack is None and time.monotonic() - t0 > self.cfg.connect_timeout_s:
                self._failed("timeout", f"no CONNACK from {self.where} within {self.cfg.connect_timeout_s} s")
                self._connack = False
                self.client.disconnect()

    def _back_off(self, delay: float, *, probe: bool) -> None:
        """Wait ``delay`` s; with ``probe``, stop waiting as soon as the broker's port accepts."""
        deadline = time.monotonic() + delay
        while not self._closing.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._closing.wait(min(left, self.cfg.probe_interval_s))
            if probe and _port_open(self.cfg.host, self.cfg.port, min(1.0, self.cfg.probe_interval_s * 4)):
                return

    def _failed(self, label: str, text: str) -> None:
        self.last_connect_error = text
        if self.metrics is not None:
            self.metrics.mqtt_connect_failures.labels(reason=label).inc()
        now = time.monotonic()
        if now - self._failure_log.get(text, -1e9) >= 60.0:
            self._failure_log = {k: v for k, v in self._failure_log.items() if now - v < 60.0}
            self._failure_log[text] = now
            log.warning("mqtt: cannot connect: %s", text)

    # ------------------------------------------------------------------ paho callbacks
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._connack = False
            self._failed(*connack_failure(reason_code, self.cfg.protocol))
            return
        self._connack = True
        self.last_connect_error = None
        if not flags.session_present:
            with self._pending_lock:
                self._session += 1
                self._pending.clear()
        log.info("mqtt: connected to %s (session %s)", self.where,
                 "resumed" if flags.session_present else "new")
        with self._subs_lock:
            subs = list(self._subs.items())
        for topic, qos in subs:
            client.subscribe(topic, qos=qos)
        self._publish_status("connected")
        self._connected.set()
        if self.metrics is not None:
            self.metrics.mqtt_connected.set(1)
        self._wake.set()

    def _publish_status(self, cause: str) -> None:
        self.client.publish(self.status_topic, json.dumps(self.status_payload("online", cause)), qos=1,
                            retain=True, properties=self._props)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._connected.is_set() and not self._closing.is_set():
            log.warning("mqtt: disconnected from %s: %s", self.where, reason_code)
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

    def _subscribed(self, topic: str) -> bool:
        with self._subs_lock:
            subs = list(self._subs)
        return any(mqtt.topic_matches_sub(_plain_filter(s), topic) for s in subs)

    def _on_message(self, client, userdata, message) -> None:
        try:
            if not self._subscribed(message.topic):
                log.debug("mqtt: dropped a message on %s (not subscribed)", message.topic)
                if message.qos > 0:
                    client.ack(message.mid, message.qos)
                return
            props = message.properties  # None in 3.1.1
            corr = getattr(props, "CorrelationData", None)
            msg = InboundMessage(topic=message.topic, payload=bytes(message.payload), qos=int(message.qos),
                                 retain=bool(message.retain), mid=int(message.mid), dup=bool(message.dup),
                                 response_topic=getattr(props, "ResponseTopic", None),
                                 correlation_data=None if corr is None else bytes(corr))
            if msg.qos > 0:
                with self._pending_lock:
                    if msg.mid in self._pending:
                        return  # a redelivery of a message the worker has not finished yet
                    self._pending[msg.mid] = self._session
            self.on_message_cb(msg)
        except Exception:  # noqa: BLE001 - never kill the network thread
            log.exception("mqtt: inbound handler failed")

    # ------------------------------------------------------------------ publisher thread
    def _publisher(self) -> None:
        outbox = Outbox(self.db_path)
        last_count_t = last_status_t = time.monotonic()
        try:
            while not self._stop.is_set():
                self._wake.wait(0.5)
                self._wake.clear()
                self._drain_acks(outbox)
                now = time.monotonic()
                if self.connected:
                    free = self.cfg.max_inflight - len(self._inflight)
                    if free > 0:
                        for row in outbox.fetch(self._last_id, free):
                            if not self._send(outbox, row):
                                break
                    if now - last_status_t >= self.cfg.status_interval_s:
                        last_status_t = now
                        self._publish_status("heartbeat")
                if now - last_count_t > 1.0 or not self._inflight:
                    n = outbox.count()
                    last_count_t = now
                    if self.metrics is not None:
                        self.metrics.outbox.set(n)
                    (self._idle.set if n == 0 and not self._inflight else self._idle.clear)()
            self._drain_acks(outbox)
        except Exception:  # noqa: BLE001
            log.exception("mqtt: publisher thread died")
            raise
        finally:
            outbox.close()

    def _send(self, outbox: Outbox, row: OutboxRow) -> bool:
        """Hand one row to paho; False when it must be tried again later."""
        if row.expires_at is not None and row.expires_at <= time.time():  # expired while it waited
            log.info("mqtt: %s (%s) expired before it could be sent; dropped", row.msg_id, row.topic)
            if self.metrics is not None:
                self.metrics.mqtt_expired.inc()
            outbox.delete([row.id])
            self._last_id = row.id
            return True
        props = _publish_props(row) if self.cfg.v5 else None
        try:
            info = self.client.publish(row.topic, row.payload, qos=row.qos, retain=row.retain, properties=props)
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
                log.error("mqtt: broker refused outbox message %d (reason code 0x%02x); dropped", row_id, rc)
                if self.metrics is not None:
                    self.metrics.mqtt_rejected.inc()
            else:
                self.published += 1
                if self.metrics is not None:
                    self.metrics.mqtt_published.inc()
            done.append(row_id)
        outbox.delete(done)


def _publish_props(row: OutboxRow | None = None) -> Properties:
    """MQTT v5 PUBLISH properties: content type, plus the row's expiry (the time left, at least
    1 s) / response topic / correlation data."""
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = CONTENT_TYPE
    if row is None:
        return props
    if row.expires_at is not None:
        props.MessageExpiryInterval = max(1, int(math.ceil(row.expires_at - time.time())))
    extra = row.props or {}
    if extra.get("response_topic"):
        props.ResponseTopic = extra["response_topic"]
    if extra.get("correlation_data"):
        props.CorrelationData = bytes.fromhex(extra["correlation_data"])
    return props


def _plain_filter(sub: str) -> str:
    """A subscription's topic filter without a ``$share/<group>/`` prefix."""
    return sub.split("/", 2)[2] if sub.startswith("$share/") and sub.count("/") >= 2 else sub


def _port_open(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
