"""The Prometheus endpoint: a bounded HTTP server that no client can exhaust.

prometheus-client's own server starts one thread per connection, so idle connections pile up
threads (the unit's ``TasksMax`` is 256). Here one thread accepts and watches every open
connection with a selector; a connection is handed to one of ``metrics.threads`` workers only
once its request has arrived, idle connections are closed after ``metrics.idle_timeout_s``, and
beyond ``metrics.max_connections`` the oldest is closed. Every series gets ``line="<line_id>"``
(:class:`LineLabel`), so the line id has one source: the daemon's configuration.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8192


class LineLabel:
    """A collector view of ``registry`` with ``line=<line_id>`` added to every sample."""

    def __init__(self, registry: CollectorRegistry, line_id: str):
        self.registry = registry
        self.line_id = line_id

    def collect(self):
        for fam in self.registry.collect():
            out = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                out.add_sample(s.name, {**s.labels, "line": self.line_id}, s.value, s.timestamp, s.exemplar)
            yield out


class MetricsServer:
    """``GET /metrics`` (or ``/``) on ``host:port`` (``port`` 0: a free one, see :attr:`port`)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, *, line_id: str, threads: int = 4,
                 idle_timeout_s: float = 10.0, max_connections: int = 64):
        view = CollectorRegistry(auto_describe=False)
        view.register(LineLabel(registry, line_id))
        self._view = view
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self._sock = socket.create_server((host, port), reuse_port=False)
        self._sock.setblocking(False)
        self.port = int(self._sock.getsockname()[1])
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="qcloop-metrics")
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._sock, selectors.EVENT_READ, None)
        self._open: dict[socket.socket, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qcloop-metrics-accept", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in list(self._open):
            self._close(conn)
        self._sel.close()
        self._sock.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(timeout=0.25):
                try:
                    if key.fileobj is self._sock:
                        self._accept()
                    else:
                        conn = key.fileobj
                        self._sel.unregister(conn)
                        self._open.pop(conn, None)
                        self._pool.submit(self._serve, conn)
                except OSError as exc:
                    log.debug("metrics: %s", exc)
            self._close_idle()

    def _accept(self) -> None:
        conn, _ = self._sock.accept()
        conn.setblocking(False)
        if len(self._open) >= self.max_connections:
            self._close(min(self._open, key=self._open.__getitem__))
        self._open[conn] = time.monotonic()
        self._sel.register(conn, selectors.EVENT_READ, None)

    def _close_idle(self) -> None:
        limit = time.monotonic() - self.idle_timeout_s
        for conn in [c for c, t in self._open.items() if t < limit]:
            self._close(conn)

    def _close(self, conn: socket.socket) -> None:
        self._open.pop(conn, None)
        try:
            self._sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(2.0)
            data = b""
            while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < MAX_REQUEST_BYTES:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            conn.sendall(self._response(data))
        except OSError:
            pass
        finally:
            conn.close()

    def _response(self, request: bytes) -> bytes:
        parts = request.split(b"\r\n", 1)[0].split()
        if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
            return _http(405, b"text/plain", b"only GET\n")
        path = parts[1].split(b"?", 1)[0]
        if path not in (b"/", b"/metrics"):
            return _http(404, b"text/plain", b"not found\n")
        body = generate_latest(self._view)
        return _http(200, CONTENT_TYPE_LATEST.encode(), b"" if parts[0] == b"HEAD" else body, len(body))


def _http(code: int, ctype: bytes, body: bytes, length: int | None = None) -> bytes:
    reason = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed"}[code]
    head = (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (code, reason, ctype, len(body) if length is None else length))
    return head + body
