"""A minimal MQTT broker in pure Python -- a fallback for ``qcloop demo`` only.

``qcloop demo`` uses a broker that already answers on localhost:1883, else starts ``mosquitto``
when it is on the PATH, else this one. It is meant for a demo on a fresh machine, **not for
production** (use Mosquitto): no authentication, no TLS, no persistence, clean sessions only.

Supported (MQTT 3.1.1 and 5.0, enough for paho-mqtt clients):

* CONNECT / CONNACK (a persistent-session request is accepted as a clean session,
  ``session present = 0``; MQTT 5 properties are read and ignored),
* PUBLISH QoS 0 and 1 with PUBACK, both directions (QoS 2 from a publisher is acknowledged
  with PUBREC / PUBCOMP and delivered at QoS 1; deliveries are at ``min(publish, subscription)``
  QoS, at most 1),
* SUBSCRIBE / SUBACK with ``+`` and ``#`` wildcards (``$``-topics are not matched by a leading
  wildcard), UNSUBSCRIBE / UNSUBACK,
* retained messages (an empty retained payload clears the topic),
* PINGREQ / PINGRESP, keep-alive timeout (1.5 x the client's keep-alive),
* DISCONNECT, and the will message on an abnormal disconnect.

Run it alone with ``python -m qcloop.mqtt_broker --port 1883``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import struct
import threading
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = 8, 9, 10, 11, 12, 13, 14, 15


class ProtocolError(Exception):
    pass


def topic_matches(filt: str, topic: str) -> bool:
    """MQTT topic filter match with ``+`` (one level) and ``#`` (the rest, parent included)."""
    if topic.startswith("$") and filt[:1] in ("+", "#"):
        return False
    f_parts = filt.split("/")
    t_parts = topic.split("/")
    for i, fp in enumerate(f_parts):
        if fp == "#":
            return True
        if i >= len(t_parts):
            return False
        if fp != "+" and fp != t_parts[i]:
            return False
    return len(f_parts) == len(t_parts)


def valid_filter(filt: str) -> bool:
    if not filt:
        return False
    parts = filt.split("/")
    for i, p in enumerate(parts):
        if "#" in p and (p != "#" or i != len(parts) - 1):
            return False
        if "+" in p and p != "+":
            return False
    return True


# --------------------------------------------------------------------------- encoding helpers
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(ptype: int, flags: int, body: bytes) -> bytes:
    return bytes([(ptype << 4) | flags]) + _varint(len(body)) + body


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def u8(self) -> int:
        if self.pos >= len(self.data):
            raise ProtocolError("truncated packet")
        v = self.data[self.pos]
        self.pos += 1
        return v

    def u16(self) -> int:
        if self.pos + 2 > len(self.data):
            raise ProtocolError("truncated packet")
        v = struct.unpack_from("!H", self.data, self.pos)[0]
        self.pos += 2
        return v

    def binary(self) -> bytes:
        n = self.u16()
        if self.pos + n > len(self.data):
            raise ProtocolError("truncated string")
        v = self.data[self.pos:self.pos + n]
        self.pos += n
        return v

    def string(self) -> str:
        try:
            return self.binary().decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("invalid UTF-8") from None

    def varint(self) -> int:
        mult, value = 1, 0
        for _ in range(4):
            b = self.u8()
            value += (b & 0x7F) * mult
            if not b & 0x80:
                return value
            mult *= 128
        raise ProtocolError("malformed variable integer")

    def skip_properties(self) -> None:
        n = self.varint()
        if self.pos + n > len(self.data):
            raise ProtocolError("truncated properties")
        self.pos += n

    def rest(self) -> bytes:
        v = self.data[self.pos:]
        self.pos = len(self.data)
        return v


@dataclass
class _Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool = False


@dataclass(eq=False)
class _Session:
    client_id: str
    writer: asyncio.StreamWriter
    version: int
    keepalive: int
    will: _Message | None = None
    subs: dict[str, int] = field(default_factory=dict)
    next_id: int = 0
    inflight: dict[int, _Message] = field(default_factory=dict)
    closed: bool = False

    def packet_id(self) -> int:
        self.next_id = self.next_id % 65535 + 1
        return self.next_id


class Broker:
    """The broker; :meth:`start` runs it on a background thread (port 0 = a free port)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883):
        self.host = host
        self.port = port
        self.sessions: dict[str, _Session] = {}
        self.retained: dict[str, _Message] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # ------------------------------------------------------------------ life cycle
    def start(self, timeout: float = 10.0) -> "Broker":
        self._thread = threading.Thread(target=self._run, name="qcloop-mqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("MQTT broker did not start")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(asyncio.start_server(self._handle, self.host, self.port))
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        log.info("MQTT broker listening on %s:%d", self.host, self.port)
        try:
            loop.run_forever()
        finally:
            self._server.close()
            for s in list(self.sessions.values()):
                s.writer.close()
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in tasks:
                t.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "Broker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ connection
    async def _read_packet(self, reader: asyncio.StreamReader, timeout: float | None) -> tuple[int, int, bytes]:
        first = await asyncio.wait_for(reader.readexactly(1), timeout)
        mult, length = 1, 0
        for _ in range(4):
            b = (await reader.readexactly(1))[0]
            length += (b & 0x7F) * mult
            if not b & 0x80:
                break
            mult *= 128
        else:
            raise ProtocolError("malformed remaining length")
        body = await reader.readexactly(length) if length else b""
        return first[0] >> 4, first[0] & 0x0F, body

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session: _Session | None = None
        clean_exit = False
        try:
            ptype, _flags, body = await self._read_packet(reader, 10.0)
            if ptype != CONNECT:
                raise ProtocolError("first packet must be CONNECT")
            session = self._connect(body, writer)
            if session is None:
                return
            timeout = session.keepalive * 1.5 if session.keepalive else None
            while True:
                ptype, flags, body = await self._read_packet(reader, timeout)
                if ptype == DISCONNECT:
                    clean_exit = True
                    break
                self._dispatch(session, ptype, flags, body)
                await writer.drain()
        except asyncio.CancelledError:
            clean_exit = True  # broker shutting down: no will, no noise
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, ProtocolError) as exc:
            if isinstance(exc, ProtocolError):
                log.warning("MQTT protocol error from %s: %s", session.client_id if session else "?", exc)
        finally:
            if session is not None and not session.closed:
                session.closed = True
                if self.sessions.get(session.client_id) is session:
                    del self.sessions[session.client_id]
                if not clean_exit and session.will is not None:
                    self._route(session.will)
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass

    def _connect(self, body: bytes, writer: asyncio.StreamWriter) -> _Session | None:
        r = _Reader(body)
        proto = r.string()
        level = r.u8()
        if proto not in ("MQTT", "MQIsdp") or level not in (3, 4, 5):
            writer.write(_packet(CONNACK, 0, bytes([0, 1])))  # unacceptable protocol version
            writer.close()
            return None
        flags = r.u8()
        keepalive = r.u16()
        if level == 5:
            r.skip_properties()
        client_id = r.string() or f"auto-{id(writer):x}"
        will = None
        if flags & 0x04:
            if level == 5:
                r.skip_properties()
            wt = r.string()
            wp = r.binary()
            will = _Message(wt, wp, min((flags >> 3) & 0x03, 1), bool(flags & 0x20))
        if flags & 0x80:
            r.string()  # user name (no authentication)
        if flags & 0x40:
            r.binary()  # password
        old = self.sessions.get(client_id)
        if old is not None:  # session take-over
            old.closed = True
            old.writer.close()
        s = _Session(client_id, writer, level, keepalive, will)
        self.sessions[client_id] = s
        if level == 5:
            writer.write(_packet(CONNACK, 0, bytes([0, 0]) + _varint(0)))
        else:
            writer.write(_packet(CONNACK, 0, bytes([0, 0])))
        return s

    # ------------------------------------------------------------------ packets
    def _dispatch(self, s: _Session, ptype: int, flags: int, body: bytes) -> None:
        r = _Reader(body)
        if ptype == PUBLISH:
            qos = (flags >> 1) & 0x03
            retain = bool(flags & 0x01)
            topic = r.string()
            pid = r.u16() if qos else 0
            if s.version == 5:
                r.skip_properties()
            msg = _Message(topic, r.rest(), min(qos, 1), retain)
            if not topic or "+" in topic or "#" in topic:
                raise ProtocolError(f"invalid publish topic {topic!r}")
            if qos == 1:
                s.writer.write(_packet(PUBACK, 0, struct.pack("!H", pid)))
            elif qos == 2:
                s.writer.write(_packet(PUBREC, 0, struct.pack("!H", pid)))
            self._route(msg)
        elif ptype == PUBREL:
            s.writer.write(_packet(PUBCOMP, 0, struct.pack("!H", r.u16())))
        elif ptype == PUBACK:
            s.inflight.pop(r.u16(), None)
        elif ptype in (PUBREC, PUBCOMP):
            pass  # we never send QoS 2
        elif ptype == SUBSCRIBE:
            pid = r.u16()
            if s.version == 5:
                r.skip_properties()
            codes = []
            new_filters = []
            while r.pos < len(body):
                filt = r.string()
                opts = r.u8()
                if not valid_filter(filt):
                    codes.append(0x80)
                    continue
                q = min(opts & 0x03, 1)
                s.subs[filt] = q
                codes.append(q)
                new_filters.append((filt, q))
            props = _varint(0) if s.version == 5 else b""
            s.writer.write(_packet(SUBACK, 0, struct.pack("!H", pid) + props + bytes(codes)))
            for filt, q in new_filters:
                for topic, msg in list(self.retained.items()):
                    if topic_matches(filt, topic):
                        self._deliver(s, msg, q, retain=True)
        elif ptype == UNSUBSCRIBE:
            pid = r.u16()
            if s.version == 5:
                r.skip_properties()
            codes = []
            while r.pos < len(body):
                filt = r.string()
                codes.append(0x00 if s.subs.pop(filt, None) is not None else 0x11)
            tail = _varint(0) + bytes(codes) if s.version == 5 else b""
            s.writer.write(_packet(UNSUBACK, 0, struct.pack("!H", pid) + tail))
        elif ptype == PINGREQ:
            s.writer.write(_packet(PINGRESP, 0, b""))
        else:
            raise ProtocolError(f"unsupported packet type {ptype}")

    def _route(self, msg: _Message) -> None:
        if msg.retain:
            if msg.payload:
                self.retained[msg.topic] = _Message(msg.topic, msg.payload, msg.qos, True)
            else:
                self.retained.pop(msg.topic, None)
        for s in list(self.sessions.values()):
            granted = [q for f, q in s.subs.items() if topic_matches(f, msg.topic)]
            if granted:
                self._deliver(s, msg, min(msg.qos, max(granted)), retain=False)

    def _deliver(self, s: _Session, msg: _Message, qos: int, *, retain: bool) -> None:
        if s.closed:
            return
        flags = (qos << 1) | (1 if retain else 0)
        head = _str(msg.topic)
        if qos:
            pid = s.packet_id()
            s.inflight[pid] = msg
            head += struct.pack("!H", pid)
        if s.version == 5:
            head += _varint(0)
        try:
            s.writer.write(_packet(PUBLISH, flags, head + msg.payload))
        except Exception:  # noqa: BLE001 - the reader side cleans up
            s.closed = True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Minimal MQTT broker (qcloop demo fallback; not for production)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    broker = Broker(args.host, args.port).start()
    print(f"listening on {args.host}:{broker.port}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    broker.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
