"""Test helpers for the daemon: synthetic TIFFs, a private Mosquitto, an MQTT recorder."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import paho.mqtt.client as mqtt
import tifffile
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "qcloop" / "schemas"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MACHINE_BROKER = ("127.0.0.1", 1883)
CONTENT_TYPE = "application/json"
PROTOCOLS = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311}


def paho_client(client_id: str, protocol: str = "5", *, clean: bool = True, **kw: Any) -> mqtt.Client:
    """A paho client of ``protocol`` ("5" or "3.1.1"); ``clean`` is 3.1.1's clean_session (v5
    sets clean start at connect: :func:`connect_args`)."""
    session = {} if protocol == "5" else {"clean_session": clean}
    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=PROTOCOLS[protocol],
                       **session, **kw)


def connect_args(protocol: str = "5", *, persistent: bool = False) -> dict[str, Any]:
    """``connect()`` keywords: v5 clean start and a one-hour session expiry when persistent."""
    if protocol != "5":
        return {}
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600 if persistent else 0
    return {"clean_start": not persistent, "properties": props}


# ----------------------------------------------------------------------------- images
def disk_image(seed: int, *, size: int = 192, n: int = 10, radius: float = 9.0) -> np.ndarray:
    """uint8 (size, size): bright disks (radius ± 15 %) on a dark, noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    img = np.full((size, size), 40.0, np.float32)
    centers: list[tuple[float, float, float]] = []
    tries = 0
    while len(centers) < n and tries < 500:
        tries += 1
        r = radius * rng.uniform(0.85, 1.15)
        cy, cx = rng.uniform(r + 3, size - r - 3, 2)
        if all((cy - y) ** 2 + (cx - x) ** 2 > (r + q + 4) ** 2 for y, x, q in centers):
            centers.append((cy, cx, r))
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 190.0
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def tiff_bytes(seed: int, **kw: Any) -> bytes:
    import io

    buf = io.BytesIO()
    tifffile.imwrite(buf, disk_image(seed, **kw))
    return buf.getvalue()


def write_image(path: Path, seed: int, **kw: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.part"
    tmp.write_bytes(tiff_bytes(seed, **kw))
    os.replace(tmp, path)  # appears complete, as a rename into the folder
    return path


def write_slowly(path: Path, data: bytes, *, chunks: int = 4, pause: float = 0.15) -> None:
    """Write ``data`` in chunks with pauses, as a copy over a slow network share."""
    step = max(1, len(data) // chunks + 1)
    with open(path, "wb") as f:
        for i in range(0, len(data), step):
            f.write(data[i:i + step])
            f.flush()
            os.fsync(f.fileno())
            time.sleep(pause)


# ----------------------------------------------------------------------------- broker
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class Broker:
    """A private Mosquitto on a free port (plain, or TLS + password file)."""

    def __init__(self, workdir: Path, *, port: int | None = None, tls: dict | None = None,
                 passwords: dict[str, str] | None = None, acl: str | None = None,
                 persistence: bool = False, extra: list[str] | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        lines = [f"listener {self.port} 127.0.0.1", "log_dest stderr",
                 "log_type error", "log_type warning",
                 # started as root, mosquitto would switch to user 'mosquitto' and lose access
                 # to the test's private temp folder
                 f"user {getpass.getuser()}"]
        if persistence:  # sessions and queued QoS 1 messages survive a broker restart
            lines += ["persistence true", f"persistence_location {self.workdir}/"]
        else:
            lines += ["persistence false"]
        if passwords:
            pw = self.workdir / "passwd"
            pw.write_text("")
            for user, password in passwords.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw), user, password], check=True,
                               capture_output=True)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines += ["allow_anonymous true"]
        if acl:
            (self.workdir / "acl").write_text(acl)
            lines += [f"acl_file {self.workdir / 'acl'}"]
        if tls:
            lines += [f"cafile {tls['ca']}", f"certfile {tls['cert']}", f"keyfile {tls['key']}",
                      "tls_version tlsv1.2"]
        lines += list(extra or [])
        self.conf = self.workdir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.log = self.workdir / "mosquitto.log"

    def start(self, timeout: float = 10.0) -> "Broker":
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "ab"))
        t0 = time.monotonic()
        while not port_open(self.host, self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError("mosquitto did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def make_certs(d: Path, *, san: str = "DNS:localhost,IP:127.0.0.1") -> dict[str, Path]:
    """A CA + a server certificate for ``san``, made with the openssl CLI at test time."""
    d.mkdir(parents=True, exist_ok=True)

    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=qcloop-test-ca",
         "-keyout", "ca.key", "-out", "ca.crt")
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=qcloop-test-server", "-keyout", "server.key",
         "-out", "server.csr")
    (d / "san.ext").write_text(f"subjectAltName={san}\n")
    ossl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
         "-days", "2", "-out", "server.crt", "-extfile", "san.ext")
    return {"ca": d / "ca.crt", "cert": d / "server.crt", "key": d / "server.key"}


# ----------------------------------------------------------------------------- recorder
@dataclass(frozen=True)
class Received:
    """One recorded message with its MQTT v5 properties."""

    topic: str
    body: Any
    retain: bool
    content_type: str | None = None
    expiry: int | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None


class Recorder:
    """Subscribes to ``{prefix}/#``, records every message and **validates** each one.

    Every message on a topic qcloop publishes must match its schema in ``qcloop/schemas`` (found
    by the schema's ``x-topic``) and carry the content type ``content_type`` (default
    ``application/json``; None: no content type, as a daemon in MQTT 3.1.1 sends -- a v5 recorder
    then checks that none arrives; a ``protocol="3.1.1"`` recorder sees no properties and checks
    none); a message on
    a topic that has no schema at all is a violation too, unless the test names a schema for it
    in ``extra_schemas`` (topic suffix -> JSON Schema; for test-only extension topics). Messages on
    inbound topics (commands the test sends, possibly malformed on purpose) and empty payloads
    (cleared retained messages) are recorded, not validated. :meth:`assert_valid` (also run by
    :meth:`close`) fails the test on any violation.
    """

    def __init__(self, host: str, port: int, prefix: str, *, username: str | None = None,
                 password: str | None = None, tls_ca: Path | None = None,
                 persistent: bool = False, timeout: float = 10.0,
                 extra_schemas: dict[str, dict] | None = None, protocol: str = "5",
                 content_type: str | None = CONTENT_TYPE):
        self.prefix = prefix
        self.protocol = protocol
        self.content_type = content_type
        self.received: list[Received] = []
        self.problems: list[str] = []
        self.extra = {k: _schema_validator(v) for k, v in (extra_schemas or {}).items()}
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self._subscribed = threading.Event()
        c = paho_client(f"rec-{uuid.uuid4().hex[:8]}", protocol, clean=not persistent, reconnect_on_failure=True)
        c.reconnect_delay_set(1, 1)
        if username:
            c.username_pw_set(username, password)
        if tls_ca:
            c.tls_set(ca_certs=str(tls_ca))
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(f"{prefix}/#", qos=1)
        c.on_subscribe = lambda *a: self._subscribed.set()
        c.on_message = self._on_message
        self.client = c
        # persistent: the broker keeps our subscription and queues QoS 1 messages while away
        c.connect_async(host, port, keepalive=10, **connect_args(protocol, persistent=persistent))
        c.loop_start()
        if not self._subscribed.wait(timeout):
            c.loop_stop()
            raise RuntimeError("recorder could not subscribe")

    @property
    def messages(self) -> list[tuple[str, Any, bool]]:
        with self.lock:
            return [(r.topic, r.body, r.retain) for r in self.received]

    def _on_message(self, client, userdata, msg) -> None:
        try:
            body = json.loads(msg.payload.decode())
        except (ValueError, RecursionError):  # the tests send malformed payloads on purpose
            body = msg.payload
        props = msg.properties
        corr = getattr(props, "CorrelationData", None)
        r = Received(msg.topic, body, bool(msg.retain), getattr(props, "ContentType", None),
                     getattr(props, "MessageExpiryInterval", None), getattr(props, "ResponseTopic", None),
                     None if corr is None else bytes(corr))
        problem = self._check(r, msg.payload)
        with self.cond:
            self.received.append(r)
            if problem:
                self.problems.append(problem)
            self.cond.notify_all()

    def _check(self, r: Received, raw: bytes) -> str | None:
        try:
            from qcloop.daemon import contracts
        except ImportError:  # an older qcloop (running a new test against it): record only
            return None

        suffix = r.topic[len(self.prefix) + 1:]
        if raw == b"":
            return None
        if suffix in self.extra:
            errors = [e.message for e in self.extra[suffix].iter_errors(r.body)]
            return f"{suffix}: {errors[:3]}" if errors else None
        c = contracts.for_topic(suffix)
        if c is None:
            return f"{suffix}: a topic with no schema in qcloop/schemas (payload {raw[:120]!r})"
        if c.direction == "in":
            return None
        if self.protocol == "5" and r.content_type != self.content_type:
            return f"{suffix}: content type {r.content_type!r}, not {self.content_type!r}"
        errors = c.errors(r.body)
        return f"{suffix} ({c.name}.json): {errors[:3]}" if errors else None

    def assert_valid(self) -> None:
        with self.lock:
            problems = list(self.problems)
        assert not problems, f"{len(problems)} published message(s) fail their contract: {problems[:5]}"

    def on(self, suffix: str) -> list[Any]:
        topic = f"{self.prefix}/{suffix}"
        with self.lock:
            return [r.body for r in self.received if r.topic == topic]

    def full(self, suffix: str) -> list[Received]:
        topic = f"{self.prefix}/{suffix}"
        with self.lock:
            return [r for r in self.received if r.topic == topic]

    def wait_for(self, pred: Callable[["Recorder"], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.5))
        return True

    def close(self, *, check: bool = True) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        if check:
            self.assert_valid()


def _schema_validator(schema: dict):
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def publish(host: str, port: int, topic: str, payload: Any, *, retain: bool = False,
            properties: Any = None, protocol: str = "5") -> None:
    c = paho_client(f"pub-{uuid.uuid4().hex[:8]}", protocol)
    c.connect(host, port)
    c.loop_start()
    data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    info = c.publish(topic, data, qos=1, retain=retain, properties=properties)
    info.wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


def forget_session(host: str, port: int, client_id: str) -> None:
    """End the persistent session a test left on a shared broker under ``client_id`` (MQTT 3.1.1
    sessions never expire): connect once with a clean session."""
    c = paho_client(client_id, "3.1.1", clean=True)
    c.connect(host, port)
    c.loop_start()
    try:
        wait_until(c.is_connected, 5, 0.02)
    finally:
        c.disconnect()
        c.loop_stop()


def clear_retained(host: str, port: int, prefix: str, protocol: str = "5") -> None:
    for suffix in ("status", "batches/result", "reactor/batch", "reactor/setpoints", "commands/close-batch"):
        publish(host, port, f"{prefix}/{suffix}", b"", retain=True, protocol=protocol)


# ----------------------------------------------------------------------------- schemas
def validator(name: str):
    import jsonschema

    schema = json.loads((SCHEMAS / name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


# ----------------------------------------------------------------------------- configs / processes
def write_config(path: Path, *, watch_dir: Path, state: Path, port: int, prefix: str,
                 **sections: dict) -> Path:
    cfg: dict[str, Any] = {
        "line_id": "t1",
        "state_dir": str(state),
        "imaging": {"banner": "none", "pixel_size_nm": 5.0},
        "watch": {"directory": str(watch_dir), "settle_seconds": 0.3, "polling": False},
        "batch": {"key": "regex:^(?P<batch>[A-Za-z0-9]+)_", "close_after_idle_s": 3600,
                  "min_particles": 5},
        "mqtt": {"host": "127.0.0.1", "port": port, "topic_prefix": prefix,
                 "reconnect_min_s": 1, "reconnect_max_s": 2, "keepalive_s": 5,
                 "session_expiry_s": 300},  # the shared broker forgets test sessions soon
        "metrics": {"host": "127.0.0.1", "port": 0},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def daemon_cmd(config: Path) -> list[str]:
    return [sys.executable, "-m", "qcloop", "run", "--config", str(config)]


def start_daemon(config: Path, *, env: dict[str, str] | None = None, log: Path | None = None,
                 prefix_cmd: list[str] | None = None) -> subprocess.Popen:
    e = dict(os.environ)
    e.pop("QCLOOP_CONFIG", None)
    e.update(env or {})
    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen((prefix_cmd or []) + daemon_cmd(config), env=e, stdout=out,
                            stderr=subprocess.STDOUT, cwd=str(REPO))
    STARTED.append(proc)
    return proc


STARTED: list[subprocess.Popen] = []


def reap() -> None:
    """Kill (by pid) every daemon process a test started and left running."""
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    return proc.returncode


def ledger_rows(state: Path) -> list[dict[str, Any]]:
    import sqlite3

    con = sqlite3.connect(f"file:{state / 'ledger.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        cur = con.execute("SELECT id, path, content_hash, status, batch, in_progress, crashes, reason, "
                          "quarantine_path FROM images ORDER BY id")
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r)) for r in cur]
    finally:
        con.close()


def inbox_handled(state: Path, topic: str) -> set[str]:
    """The ``msg_id`` of every message on ``topic`` the daemon recorded in its ledger's inbox."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{state / 'ledger.sqlite3'}?mode=ro", uri=True, timeout=10)
    except sqlite3.OperationalError:
        return set()
    try:
        rows = con.execute("SELECT msg_key FROM inbox WHERE topic = ?", (topic,)).fetchall()
    except sqlite3.OperationalError:  # no inbox table yet (or an older qcloop)
        return set()
    finally:
        con.close()
    return {r[0].split("\0")[1] for r in rows if r[0]}


def outbox_count(state: Path) -> int:
    import sqlite3

    con = sqlite3.connect(f"file:{state / 'ledger.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        return int(con.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
    finally:
        con.close()


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def by_msg_id(messages: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for m in messages:
        out[m["msg_id"]].append(m)
    return out


# ----------------------------------------------------------------------------- malformed files
def huge_tiff_header(side: int = 200_000) -> bytes:
    """A little-endian TIFF whose header claims ``side`` x ``side`` 8-bit pixels (data absent)."""
    import struct

    entries = [  # tag, type (3 SHORT, 4 LONG), count, value
        (256, 4, 1, side), (257, 4, 1, side), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
        (273, 4, 1, 8 + 2 + 12 * 9 + 4), (277, 3, 1, 1), (278, 4, 1, side),
        (279, 4, 1, 4_000_000_000),
    ]
    out = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        v = struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, typ, count) + v
    return out + struct.pack("<I", 0) + b"\x00" * 64


def malformed_files(n_each: int = 8) -> list[tuple[str, bytes]]:
    """(name, content) of corrupt 'images': zero bytes, truncated TIFF, text, absurd header."""
    good = tiff_bytes(99)
    out: list[tuple[str, bytes]] = []
    kinds = [("zero", lambda i: b""),
             ("trunc", lambda i: good[: 200 + 37 * i]),
             ("text", lambda i: f"this is not an image {i}\n".encode() * 20),
             ("huge", lambda i: huge_tiff_header(100_000 + i))]
    for kind, make in kinds:
        for i in range(n_each):
            out.append((f"bad_{kind}{i}.tif", make(i)))
    return out
