"""The daemon: one worker loop that owns the pipeline and the ledger.

Life of an image
----------------
1. The watcher hands over a settled path (:class:`~qcloop.daemon.watcher.ReadyFile`).
2. The worker skips it when the ledger already has this (path, size, mtime) or (path, content
   SHA-256) as done or quarantined -- duplicate events never cause double processing.
3. It decodes the image. A stable file that does not decode is re-checked
   ``watch.decode_retries`` times, ``watch.settle_seconds`` apart, then quarantined.
4. Batch: the image's batch key; an image of a new batch first closes the open batch.
5. The ledger row goes to ``pending, in_progress`` (committed), the pipeline runs, and one
   transaction stores the result + particle table, marks the row ``done`` and puts the
   ``images/result`` message in the outbox. A crash before that commit leaves the row
   ``in_progress``: it is redone after the restart (and counted as a crash: an image that
   kills the daemon ``watch.max_attempts`` times is quarantined). A crash after it leaves a
   message the publisher sends after the restart.

Extension points (used by :mod:`qcloop.control`)
------------------------------------------------
``daemon.add_batch_closed_hook(hook)``
    ``hook(event: BatchClosed, ctx: WorkerContext) -> iterable of OutMessage | None``, called
    on the worker thread inside the transaction that closes the batch (its own SAVEPOINT:
    a hook that raises is rolled back alone, logged and reported on ``events/error``; the
    batch still closes). Returned messages go to the outbox in that transaction, so "batch
    closed" and "suggestion sent" are committed together or not at all.
``daemon.subscribe(topic, handler, qos=1)``
    ``handler(msg: InboundMessage, ctx: WorkerContext) -> iterable of OutMessage | None``.
    paho's thread only queues the message; the handler runs on the worker thread in a
    transaction (with its returned messages). ``topic`` may be relative to the prefix
    (``"reactor/setpoints"``) or absolute (starting with the prefix); wildcards allowed.
``daemon.every(interval_s, fn)`` / ``daemon.call_soon(fn)``
    Periodic / one-off calls on the worker thread (between images).
``ctx.ledger.get_state(key) / ctx.ledger.set_state(key, json_text)``
    Persistent key/value state (inside the current transaction).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import queue
import shutil
import signal
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pandas as pd
from paho.mqtt.client import topic_matches_sub
from prometheus_client import CollectorRegistry

from qcloop import __version__
from qcloop.config import Settings
from qcloop.daemon.batches import (TIMELINE_STATE_KEY, BatchKeyer, BatchOutcome, MessageBatches,
                                   compute_batch)
from qcloop.daemon.ledger import ImageRow, Ledger, pack_particles
from qcloop.daemon.metrics import DaemonMetrics
from qcloop.daemon.outbox import InboundMessage, OutMessage, iso_time, jsonable
from qcloop.daemon.watcher import ReadyFile, Watcher
from qcloop.errors import ConfigError, InputImageError

log = logging.getLogger(__name__)

QUARANTINE_DIR = "quarantine"
SCHEMA_VERSION = 1


# ----------------------------------------------------------------------------- sd_notify
def sd_notify(message: str) -> bool:
    """Send one ``sd_notify`` datagram (``READY=1``, ``WATCHDOG=1``, ``STATUS=...``).

    Does nothing (returns False) when ``$NOTIFY_SOCKET`` is unset, i.e. not run by systemd
    with ``Type=notify``. Abstract sockets (``@name``) are supported. Never blocks: when the
    receiver's queue is full the datagram is dropped (a blocked STOPPING=1 would hang shutdown).
    """
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.setblocking(False)
            s.connect(addr)
            s.send(message.encode())
        return True
    except OSError as exc:
        log.debug("sd_notify(%r) failed: %s", message, exc)
        return False


def watchdog_interval() -> float | None:
    """Half of systemd's ``WatchdogSec`` (from ``$WATCHDOG_USEC``), or None when not enabled."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.1, int(usec) / 2e6)
    except ValueError:
        return None


# ----------------------------------------------------------------------------- hook records
@dataclass(frozen=True)
class BatchClosed:
    """A closed batch, as the batch-closed hooks see it.

    Attributes
    ----------
    batch : str
    revision : int
        1 the first time; +1 each time a late image re-closes the batch.
    reason : str
        ``new-batch``, ``idle``, ``command`` or ``late-image``.
    closed_at : float
        Unix time.
    n_images : int
        Images analysed (``done``) in the batch.
    metrics : qcloop.batch.BatchMetrics or None
        None when the metrics could not be computed (``error``).
    flat : dict of str to float
        ``metrics.flat()``.
    uncertainty : dict of str to float
        ``metrics.uncertainty()`` (95 % half-widths).
    verdict : qcloop.targets.Verdict or None
    sufficient : bool
        At least ``batch.min_particles`` interior particles. Controllers should hold on an
        insufficient batch.
    error : str or None
    """

    batch: str
    revision: int
    reason: str
    closed_at: float
    n_images: int
    metrics: Any
    flat: Mapping[str, float]
    uncertainty: Mapping[str, float]
    verdict: Any
    sufficient: bool
    error: str | None = None


@dataclass
class WorkerContext:
    """What hooks and message handlers get (valid on the worker thread only).

    Attributes
    ----------
    ledger : Ledger
        ``get_state(key)`` / ``set_state(key, json_text)``; writes join the current transaction.
    settings : Settings
    prefix : str
        The topic prefix (``qcloop/line1``).
    metrics : DaemonMetrics
        Hooks may register their own metrics in ``metrics.registry``.
    """

    ledger: Ledger
    settings: Settings
    prefix: str
    metrics: DaemonMetrics

    def topic(self, suffix: str) -> str:
        return f"{self.prefix}/{suffix.strip('/')}"


BatchClosedHook = Callable[[BatchClosed, WorkerContext], "Iterable[OutMessage] | None"]
MessageHandler = Callable[[InboundMessage, WorkerContext], "Iterable[OutMessage] | None"]


class _Abandon(BaseException):
    """Raised by the second SIGTERM/SIGINT: stop now, leave the current image for next time."""


@dataclass(order=True)
class _Item:
    priority: int
    seq: int
    kind: str = field(compare=False)
    data: Any = field(compare=False)


# ----------------------------------------------------------------------------- the daemon
class Daemon:
    """The long-running service behind ``qcloop run``.

    Parameters
    ----------
    settings : Settings
    registry : CollectorRegistry, optional
        Prometheus registry (a fresh one by default).
    pipeline : object with ``load(path)`` and ``analyze(image)``, optional
        Default: ``qcloop.pipeline.Pipeline.from_settings(settings)``.
    """

    def __init__(self, settings: Settings, *, registry: CollectorRegistry | None = None,
                 pipeline: Any = None):
        if settings.watch.directory is None:
            raise ConfigError("watch.directory: required to run the daemon")
        self.settings = settings
        self.prefix = settings.topic_prefix
        self.state_dir = Path(settings.state_dir).resolve()
        self.quarantine_dir = self.state_dir / QUARANTINE_DIR
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = DaemonMetrics(self.registry)
        self.metrics.info.labels(version=__version__, config_hash=settings.config_hash(),
                                 line_id=settings.line_id).set(1)
        self._pipeline = pipeline
        self._queue: queue.PriorityQueue[_Item] = queue.PriorityQueue()
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._stop = threading.Event()
        self._stopping_signals = 0
        self._hooks: list[BatchClosedHook] = []
        self._handlers: list[tuple[str, int, MessageHandler]] = []
        self._periodic: list[list[Any]] = []
        self._worker_thread: threading.Thread | None = None
        self._ready = False
        self._heartbeat = time.monotonic()
        self._busy_since: float | None = None
        self._current_image: int | None = None
        self.ledger: Ledger | None = None
        self.watcher: Watcher | None = None
        self.mqtt = None
        self.http_server = None
        self.metrics_port: int | None = None
        self.keyer: BatchKeyer | None = None
        self._watchdog_thread: threading.Thread | None = None
        self.started = threading.Event()

    # ------------------------------------------------------------------ extension API
    def topic(self, suffix: str) -> str:
        """Full topic for ``suffix`` under the configured prefix."""
        return f"{self.prefix}/{suffix.strip('/')}"

    def add_batch_closed_hook(self, hook: BatchClosedHook) -> None:
        """Call ``hook`` on the worker thread for every closed batch (see module docstring)."""
        self._hooks.append(hook)

    def subscribe(self, topic: str, handler: MessageHandler, qos: int = 1) -> None:
        """Run ``handler`` on the worker thread for messages on ``topic`` (see module docstring)."""
        full = topic if topic.startswith(self.prefix + "/") else self.topic(topic)
        self._handlers.append((full, qos, handler))
        if self.mqtt is not None:
            self.mqtt.subscribe(full, qos)

    def context(self) -> WorkerContext:
        if self.ledger is None:
            raise RuntimeError("the ledger is not open (daemon not started)")
        return WorkerContext(self.ledger, self.settings, self.prefix, self.metrics)

    def request_stop(self) -> None:
        """Graceful stop (SIGTERM): finish the current image, flush, publish ``offline``.

        A second call while stopping abandons the current image at once (raises in the worker
        when called from a signal handler on the main thread); the image is redone next start.
        """
        self._stopping_signals += 1
        self._stop.set()
        if self._stopping_signals >= 2 and threading.current_thread() is self._worker_thread \
                and self._busy_since is not None:
            raise _Abandon()  # from a signal handler interrupting the worker's analysis

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.request_stop())

    # ------------------------------------------------------------------ queue
    def _put(self, priority: int, kind: str, data: Any) -> None:
        with self._seq_lock:
            self._seq += 1
            seq = self._seq
        self._queue.put(_Item(priority, seq, kind, data))

    def _on_ready_file(self, rf: ReadyFile) -> None:
        self._put(10, "file", rf)

    def _on_mqtt_message(self, msg: InboundMessage) -> None:
        self._put(0, "mqtt", msg)

    def queue_depth(self) -> int:
        n = self._queue.qsize()
        if self.watcher is not None:
            n += self.watcher.pending_count
        return n

    # ------------------------------------------------------------------ start / run / stop
    def start(self) -> None:
        """Open the ledger, recover, start metrics, MQTT and the watcher (no blocking wait)."""
        s = self.settings
        try:
            self.quarantine_dir.mkdir(parents=True, exist_ok=True)
            self.ledger = Ledger(self.state_dir, outbox=s.mqtt.enabled)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"state_dir: cannot open the ledger in {self.state_dir}: {exc}") from None
        timeline = MessageBatches.from_json(self.ledger.get_state(TIMELINE_STATE_KEY))
        self.keyer = BatchKeyer(s.batch, Path(s.watch.directory), timeline)
        self._recover()
        if self._pipeline is None:
            from qcloop.pipeline import Pipeline

            self._pipeline = Pipeline.from_settings(s)
        if s.metrics.enabled:
            from prometheus_client import start_http_server

            try:
                self.http_server, _ = start_http_server(s.metrics.port, addr=s.metrics.host,
                                                        registry=self.registry)
            except OSError as exc:
                raise ConfigError(f"metrics.port: cannot listen on {s.metrics.host}:{s.metrics.port}: "
                                  f"{exc.strerror or exc}") from None
            self.metrics_port = int(self.http_server.server_port)
            log.info("metrics on http://%s:%d/metrics", s.metrics.host, self.metrics_port)
        self._install_control()
        if s.mqtt.enabled:
            from qcloop.daemon.mqtt import MqttLink

            client_id = s.mqtt.client_id or f"qcloop-{s.line_id}-{uuid.uuid4().hex[:8]}"
            self.mqtt = MqttLink(s.mqtt, client_id=client_id, status_topic=self.topic("status"),
                                 status_payload=self._status_payload, db_path=self.ledger.path,
                                 on_message=self._on_mqtt_message, metrics=self.metrics)
            for suffix in ("commands/close-batch", "reactor/batch"):
                self.mqtt.subscribe(self.topic(suffix), 1)
            for topic, qos, _ in self._handlers:
                self.mqtt.subscribe(topic, qos)
            self.mqtt.start()
        exclude = [self.state_dir]
        self.watcher = Watcher(s.watch, self._on_ready_file, exclude=exclude)
        self.watcher.start()
        self.metrics.up.set(1)
        self.metrics.outbox.set(self.ledger.outbox_count())
        iv = watchdog_interval()
        if iv is not None:
            self._watchdog_thread = threading.Thread(target=self._watchdog, args=(iv,),
                                                     name="qcloop-watchdog", daemon=True)
            self._watchdog_thread.start()
        sd_notify("STATUS=started; waiting for the MQTT broker" if self.mqtt else "STATUS=started")
        self.started.set()

    def run(self) -> int:
        """Start, process until :meth:`request_stop`, shut down. Returns the exit code (0)."""
        self._worker_thread = threading.current_thread()
        try:
            self.start()
            self._loop()
        except _Abandon:
            log.warning("second stop request: abandoning image %s (it is redone next start)",
                        self._current_image)
            if self._current_image is not None and self.ledger is not None:
                try:
                    self.ledger.release_image(self._current_image)
                except Exception:  # noqa: BLE001
                    log.exception("could not release the abandoned image")
        finally:
            self.shutdown()
        return 0

    def shutdown(self) -> None:
        sd_notify("STOPPING=1")
        self._stop.set()
        self.metrics.up.set(0)
        if self.watcher is not None:
            self.watcher.stop()
        if self.mqtt is not None:
            flushed = self.mqtt.flush(self.settings.mqtt.flush_timeout_s if self.mqtt.connected else 0)
            if not flushed:
                log.warning("stopping with messages not yet acknowledged; they stay in the outbox")
            self.mqtt.stop()
        if self.http_server is not None:
            self.http_server.shutdown()
            self.http_server.server_close()
        if self.ledger is not None:
            self.ledger.close()
        log.info("stopped")

    def _loop(self) -> None:
        idle_check = 0.0
        while not self._stop.is_set():
            self._heartbeat = time.monotonic()
            if not self._ready and (self.mqtt is None or self.mqtt.connected) and \
                    self.watcher is not None and not self.watcher.scanning():
                self._ready = True
                sd_notify("READY=1\nSTATUS=processing")
                log.info("ready")
            try:
                item = self._queue.get(timeout=0.25)
            except queue.Empty:
                item = None
            if item is not None:
                if item.kind == "file":
                    self._handle_file(item.data)
                elif item.kind == "mqtt":
                    self._handle_message(item.data)
                elif item.kind == "call":
                    try:
                        item.data()
                    except Exception:  # noqa: BLE001
                        log.exception("call_soon task %r failed", item.data)
                        self.metrics.errors.labels(kind="hook-failed").inc()
            now = time.monotonic()
            if now - idle_check > 0.5:
                idle_check = now
                self._close_idle_batches()
                self.metrics.queue_depth.set(self.queue_depth())
            self._run_periodic(now)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the worker thread (thread-safe)."""
        self._put(0, "call", fn)

    def every(self, interval_s: float, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the worker thread about every ``interval_s`` seconds (between images).

        Exceptions are logged and counted (``qcloop_errors_total{kind="hook-failed"}``); ``fn``
        opens its own ledger transaction if it writes.
        """
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self._periodic.append([float(interval_s), fn, time.monotonic() + interval_s])

    def _run_periodic(self, now: float) -> None:
        for entry in self._periodic:
            interval, fn, due = entry
            if now < due:
                continue
            entry[2] = now + interval
            try:
                fn()
            except Exception:  # noqa: BLE001
                log.exception("periodic task %r failed", fn)
                self.metrics.errors.labels(kind="hook-failed").inc()

    def _watchdog(self, interval: float) -> None:
        while not self._stop.wait(interval):
            if self.healthy():
                sd_notify("WATCHDOG=1")
            else:
                log.error("unhealthy: not feeding the systemd watchdog")

    def healthy(self) -> bool:
        """Watcher and publisher threads alive; worker loop not stuck on one image too long."""
        now = time.monotonic()
        if self.watcher is None or not self.watcher.alive():
            return False
        if self.mqtt is not None and not self.mqtt.alive():
            return False
        if self._busy_since is not None:
            return now - self._busy_since < self.settings.watch.stall_timeout_s
        return now - self._heartbeat < 30.0

    # ------------------------------------------------------------------ recovery
    def _recover(self) -> None:
        led = self.ledger
        assert led is not None
        for row in led.recover_interrupted():
            log.warning("image %s (%s) was interrupted (crash %d)", row.id, row.path, row.crashes + 1)
        for row in led.pending_images():
            if os.path.exists(row.path):
                continue  # the start-up scan hands it over again
            qpath = self._quarantine_target(row.id, Path(row.path))
            if qpath.exists():  # moved to quarantine just before a crash
                reason = "quarantined before a restart"
                rfile = qpath.with_name(qpath.name + ".reason.json")
                if rfile.exists():
                    try:
                        reason = json.loads(rfile.read_text())["reason"]
                    except (ValueError, KeyError, OSError):
                        pass
                self._record_quarantine(row, reason, qpath, "moved")
            else:
                led.finish_image(row.id, "failed", reason="file vanished before it was analysed",
                                 messages=[self._error_msg("analysis-failed",
                                                           "file vanished before it was analysed",
                                                           path=row.path, image_id=row.id,
                                                           batch=row.batch)])

    # ------------------------------------------------------------------ images
    def _handle_file(self, rf: ReadyFile) -> None:
        led = self.ledger
        assert led is not None and self.watcher is not None and self.keyer is not None
        path = rf.path
        spath = str(path)
        try:
            st = os.stat(path)
        except OSError:
            log.info("%s disappeared before it was analysed", path)
            return
        if (st.st_size, st.st_mtime_ns) != (rf.size, rf.mtime_ns):
            self.watcher.forget(path)
            self.watcher.notice(path)  # changed since it settled: settle again
            return
        if led.find_by_stat(spath, st.st_size, st.st_mtime_ns) is not None:
            self.metrics.images_duplicate.inc()
            return
        try:
            digest = file_sha256(path)
        except OSError as exc:
            digest = f"unreadable-{st.st_size}-{st.st_mtime_ns}"
            row = led.find_image(spath, digest)
            if row is not None and row.status in ("done", "quarantined"):
                return
            batch = self.keyer.key_for(path, seen_at=self._seen_at(rf, st))
            row = led.begin_image(spath, digest, st.st_size, st.st_mtime_ns, batch)
            self._quarantine(row, f"cannot read file: {exc.strerror or exc}")
            return
        row = led.find_image(spath, digest)
        if row is not None and row.status in ("done", "quarantined"):
            self.metrics.images_duplicate.inc()
            return
        batch = self.keyer.key_for(path, seen_at=self._seen_at(rf, st))
        if row is not None and row.crashes >= self.settings.watch.max_attempts:
            row = led.begin_image(spath, digest, st.st_size, st.st_mtime_ns, batch)
            self._quarantine(row, f"the daemon died {row.crashes} times while analysing this image "
                                  f"(watch.max_attempts={self.settings.watch.max_attempts})")
            return
        row = led.begin_image(spath, digest, st.st_size, st.st_mtime_ns, batch)
        self._current_image = row.id
        self._busy_since = time.monotonic()
        t_start = time.monotonic()
        queue_wait = max(0.0, t_start - rf.settled_mono)
        self.metrics.queue_wait.observe(queue_wait)
        try:
            try:
                image = self._pipeline.load(path)
            except Exception as exc:  # noqa: BLE001 - InputImageError, or a reader bug
                reason = exc.reason if isinstance(exc, InputImageError) else f"{type(exc).__name__}: {exc}"
                if rf.decode_attempt < self.settings.watch.decode_retries:
                    log.info("%s does not decode yet (%s); checking again", path, reason)
                    led.release_image(row.id)
                    self.watcher.requeue(path, decode_attempt=rf.decode_attempt + 1,
                                         first_seen=rf.first_seen, from_scan=rf.from_scan)
                    return
                self._quarantine(row, reason)
                return
            load_s = time.monotonic() - t_start
            # only an image that decodes may open a new batch (and so close the current one)
            self._switch_batch(batch)
            try:
                result = self._pipeline.analyze(image)
            except InputImageError as exc:
                self._quarantine(row, exc.reason)
                return
            except Exception as exc:  # noqa: BLE001 - a bug in a stage must not stop the daemon
                log.exception("analysis of %s failed", path)
                reason = f"{type(exc).__name__}: {exc}"
                self.metrics.images_failed.inc()
                self.metrics.errors.labels(kind="analysis-failed").inc()
                led.finish_image(row.id, "failed", batch=batch, reason=reason,
                                 messages=[self._error_msg("analysis-failed", reason, path=spath,
                                                           image_id=row.id, batch=batch)])
                self._notify_mqtt()
                return
            self._record_result(row, rf, batch, digest, result, load_s, queue_wait)
        finally:
            self._busy_since = None
            self._current_image = None

    def _seen_at(self, rf: ReadyFile, st: os.stat_result) -> float:
        return st.st_mtime if rf.from_scan else rf.first_seen

    def _record_result(self, row: ImageRow, rf: ReadyFile, batch: str, digest: str, result: Any,
                       load_s: float, queue_wait: float) -> None:
        led = self.ledger
        assert led is not None
        stages = dict(result.stage_seconds)
        stages.setdefault("load", load_s)
        analysis_s = float(sum(stages.values()))
        particles = result.particles.copy()
        if "image_id" not in particles.columns:
            particles.insert(0, "image_id", row.id)
        if "image" not in particles.columns:
            particles.insert(0, "image", result.image.name)
        counts = class_counts(result.particles)
        payload = {
            "schema_version": SCHEMA_VERSION,
            "msg_id": image_msg_id(row.path, digest),
            "line_id": self.settings.line_id,
            "image_id": row.id,
            "path": row.path,
            "name": Path(row.path).name,
            "content_sha256": digest,
            "batch": batch,
            "width_px": result.image.width_px,
            "height_px": result.image.height_px,
            "analysed_height_px": result.image.analysed_height_px,
            "pixel_size_nm": result.image.pixel_size.nm,
            "pixel_size_source": result.image.pixel_size.source,
            "n_particles": int(len(result.particles)),
            "n_border": int(result.particles["touches_border"].sum())
            if "touches_border" in result.particles.columns else 0,
            "class_counts": counts,
            "size": size_stats(result.particles),
            "timing": {
                "stages_s": stages,
                "analysis_s": analysis_s,
                "queue_wait_s": queue_wait,
                "settled_at": iso_time(rf.settled_at),
                "first_seen_at": iso_time(rf.first_seen),
                "processed_at": iso_time(),
            },
        }
        blob = pack_particles(particles, result.embeddings)
        msg = OutMessage(self.topic("images/result"), payload, qos=1, retain=False)
        with led.transaction():
            led.finish_image(row.id, "done", batch=batch, result=jsonable(payload), particles=blob,
                             messages=[msg])
            led.touch_batch(batch, time.time())
        self._notify_mqtt()
        m = self.metrics
        m.images_processed.inc()
        for cls, n in counts.items():
            m.particles.labels(**{"class": cls}).inc(n)
        for stage, sec in stages.items():
            m.stage_seconds.labels(stage=stage).observe(sec)
        m.image_seconds.observe(analysis_s)
        batch_row = led.get_batch(batch)
        if batch_row is not None and batch_row.status == "closed":
            # a late image of a batch that already closed: score the batch again
            self._close_batch(batch, "late-image")

    # ------------------------------------------------------------------ quarantine
    def _quarantine_target(self, image_id: int, path: Path) -> Path:
        return self.quarantine_dir / f"{image_id:06d}_{path.name}"

    def _quarantine(self, row: ImageRow, reason: str) -> None:
        """Move (or copy, when the watch folder is read-only) the file to the quarantine folder
        with a reason file, then record it (with its error event) in one transaction."""
        src = Path(row.path)
        dst = self._quarantine_target(row.id, src)
        info = {"path": row.path, "reason": reason, "content_sha256": row.content_hash,
                "image_id": row.id, "batch": row.batch, "time": iso_time()}
        rfile = dst.with_name(dst.name + ".reason.json")
        rfile.write_text(json.dumps(info, indent=2))
        action = "moved"
        try:
            os.replace(src, dst)
        except OSError as exc:
            try:
                shutil.copy2(src, dst)
                action = "copied"
                if exc.errno == errno.EXDEV:
                    try:
                        os.unlink(src)
                        action = "moved"
                    except OSError:
                        pass
            except OSError as exc2:
                action = "recorded"
                log.warning("cannot copy %s to quarantine: %s", src, exc2)
        info["action"] = action
        rfile.write_text(json.dumps(info, indent=2))
        self._record_quarantine(row, reason, dst if action != "recorded" else None, action)

    def _record_quarantine(self, row: ImageRow, reason: str, qpath: Path | None, action: str) -> None:
        led = self.ledger
        assert led is not None
        log.warning("quarantined %s (%s): %s", row.path, action, reason)
        msg = self._error_msg("quarantined", reason, path=row.path, image_id=row.id, batch=row.batch,
                              quarantine_path=None if qpath is None else str(qpath), action=action)
        led.finish_image(row.id, "quarantined", reason=reason,
                         quarantine_path=None if qpath is None else str(qpath), messages=[msg])
        self.metrics.images_quarantined.inc()
        self.metrics.errors.labels(kind="quarantined").inc()
        self._notify_mqtt()

    def _error_msg(self, kind: str, message: str, **fields: Any) -> OutMessage:
        payload = {"schema_version": SCHEMA_VERSION, "msg_id": uuid.uuid4().hex,
                   "line_id": self.settings.line_id, "time": iso_time(), "kind": kind,
                   "message": message}
        payload.update({k: v for k, v in fields.items() if v is not None})
        return OutMessage(self.topic("events/error"), payload, qos=1, retain=False)

    def _publish_error(self, kind: str, message: str, **fields: Any) -> None:
        assert self.ledger is not None
        self.metrics.errors.labels(kind=kind).inc()
        self.ledger.add_message(self._error_msg(kind, message, **fields))
        self._notify_mqtt()

    def _notify_mqtt(self) -> None:
        if self.mqtt is not None:
            self.mqtt.notify()
            self.metrics.outbox.set(self.ledger.outbox_count() if self.ledger else 0)

    # ------------------------------------------------------------------ batches
    def _switch_batch(self, batch: str) -> None:
        """An image of ``batch`` arrives: close every other open batch, open this one."""
        led = self.ledger
        assert led is not None
        row = led.get_batch(batch)
        if row is not None and row.status == "closed":
            return  # a late image: its batch is scored again after it, the open one stays open
        for b in led.open_batches():
            if b.batch != batch:
                self._close_batch(b.batch, "new-batch")
        if row is None:
            led.touch_batch(batch, time.time())

    def _close_idle_batches(self) -> None:
        led = self.ledger
        assert led is not None
        limit = self.settings.batch.close_after_idle_s
        now = time.time()
        for b in led.open_batches():
            if now - b.last_image_at >= limit and led.batch_counts(b.batch)["pending"] == 0:
                self._close_batch(b.batch, "idle")

    def close_batch(self, batch: str | None = None, reason: str = "command") -> list[str]:
        """Close ``batch`` (default: every open batch) now; worker thread only."""
        led = self.ledger
        assert led is not None
        names = [batch] if batch else [b.batch for b in led.open_batches()]
        closed = []
        for name in names:
            row = led.get_batch(name)
            if row is None:
                log.warning("close-batch: unknown batch %r", name)
                continue
            if row.status == "closed" and reason == "command":
                log.info("close-batch: %s is already closed", name)
                continue
            self._close_batch(name, reason)
            closed.append(name)
        return closed

    def _close_batch(self, batch: str, reason: str) -> None:
        led = self.ledger
        assert led is not None
        row = led.get_batch(batch)
        if row is None:
            return
        tables, embs, ids = led.batch_particles(batch)
        counts = led.batch_counts(batch)
        outcome = compute_batch(tables, embs, n_images=len(ids), targets=self.settings.targets,
                                min_particles=self.settings.batch.min_particles)
        revision = row.revision + 1
        closed_at = time.time()
        payload = batch_payload(self.settings.line_id, batch, revision, reason, row.opened_at,
                                closed_at, counts, outcome)
        event = BatchClosed(batch=batch, revision=revision, reason=reason, closed_at=closed_at,
                            n_images=counts["done"], metrics=outcome.metrics, flat=outcome.flat,
                            uncertainty=outcome.uncertainty, verdict=outcome.verdict,
                            sufficient=outcome.sufficient, error=outcome.error)
        ctx = self.context()
        hook_errors: list[str] = []
        with led.transaction():
            led.close_batch(batch, revision, reason, jsonable(payload), closed_at)
            led.add_message(OutMessage(self.topic("batches/result"), payload, qos=1, retain=True))
            if outcome.error is not None:
                led.add_message(self._error_msg("batch-metrics-failed", outcome.error, batch=batch))
            for hook in self._hooks:
                try:
                    with led.transaction():  # SAVEPOINT: a failing hook is rolled back alone
                        led.add_message(*list(hook(event, ctx) or ()))
                except Exception as exc:  # noqa: BLE001
                    log.exception("batch-closed hook %r failed", hook)
                    text = f"batch-closed hook {getattr(hook, '__name__', hook)!r} failed: " \
                           f"{type(exc).__name__}: {exc}"
                    hook_errors.append(text)
                    led.add_message(self._error_msg("hook-failed", text, batch=batch))
        for _ in hook_errors:
            self.metrics.errors.labels(kind="hook-failed").inc()
        if outcome.error is not None:
            self.metrics.errors.labels(kind="batch-metrics-failed").inc()
        self.metrics.batches_closed.labels(verdict=outcome.verdict_label).inc()
        self.metrics.set_batch(outcome.flat,
                               passed=None if outcome.verdict is None else bool(outcome.verdict.passed),
                               n_particles=outcome.n_particles, n_images=counts["done"],
                               closed_at=closed_at)
        log.info("batch %s closed (%s, revision %d): %s", batch, reason, revision,
                 outcome.verdict_label)
        self._notify_mqtt()

    # ------------------------------------------------------------------ inbound messages
    def _handle_message(self, msg: InboundMessage) -> None:
        if topic_matches_sub(self.topic("commands/close-batch"), msg.topic):
            self._on_close_command(msg)
        if topic_matches_sub(self.topic("reactor/batch"), msg.topic):
            self._on_reactor_batch(msg)
        for topic, _, handler in self._handlers:
            if topic_matches_sub(topic, msg.topic):
                led = self.ledger
                assert led is not None
                try:
                    with led.transaction():
                        led.add_message(*list(handler(msg, self.context()) or ()))
                except Exception as exc:  # noqa: BLE001
                    log.exception("handler for %s failed", msg.topic)
                    self._publish_error("hook-failed", f"handler for {msg.topic} failed: "
                                                       f"{type(exc).__name__}: {exc}")
                self._notify_mqtt()

    def _on_close_command(self, msg: InboundMessage) -> None:
        if msg.retain:
            return  # a retained command is stale by definition
        try:
            body = msg.json() if msg.payload.strip() else {}
            if not isinstance(body, dict):
                raise ValueError("payload must be a JSON object")
            batch = body.get("batch")
            if batch is not None and not isinstance(batch, str):
                raise ValueError("'batch' must be a string")
        except ValueError as exc:
            self._publish_error("command-rejected", f"close-batch: {exc}", topic=msg.topic)
            return
        closed = self.close_batch(batch, "command")
        log.info("close-batch command: closed %s", closed or "nothing")

    def _on_reactor_batch(self, msg: InboundMessage) -> None:
        try:
            body = msg.json()
            if not isinstance(body, dict) or not isinstance(body.get("batch"), str) or not body["batch"]:
                raise ValueError("payload must be a JSON object with a non-empty string 'batch'")
        except ValueError as exc:
            self._publish_error("command-rejected", f"reactor/batch: {exc}", topic=msg.topic)
            return
        if self.settings.batch.key != "message":
            log.debug("reactor/batch ignored (batch.key is %s)", self.settings.batch.key)
            return
        assert self.keyer is not None and self.ledger is not None
        if self.keyer.timeline.start(body["batch"], msg.received_at):
            self.ledger.set_state(TIMELINE_STATE_KEY, self.keyer.timeline.to_json())
            log.info("reactor started batch %s", body["batch"])

    # ------------------------------------------------------------------ status / control
    def _status_payload(self, state: str) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "state": state, "line_id": self.settings.line_id,
                "version": __version__, "config_hash": self.settings.config_hash(),
                "time": iso_time()}

    def _install_control(self) -> None:
        """Let :mod:`qcloop.control` register its hooks when ``control.enabled``."""
        if not self.settings.control.enabled:
            return
        try:
            from qcloop.control.hook import install
        except ImportError as exc:
            raise ConfigError(f"control.enabled: the controller cannot be loaded ({exc})") from None
        install(self)


# ----------------------------------------------------------------------------- helpers
def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def image_msg_id(path: str, digest: str) -> str:
    """Stable message id of an image result: the same file always gets the same id."""
    return "img-" + hashlib.sha256(f"{path}\0{digest}".encode()).hexdigest()[:24]


def class_counts(particles: pd.DataFrame) -> dict[str, int]:
    """Particles per class (all particles, border ones included)."""
    if len(particles) == 0:
        return {}
    if "class" not in particles.columns:
        return {"particle": int(len(particles))}
    return {str(k): int(v) for k, v in particles["class"].astype(str).value_counts().items()}


def size_stats(particles: pd.DataFrame) -> dict[str, Any]:
    """ECD statistics over the particles not cut by the border (nm when known, and px)."""
    p = particles
    if "touches_border" in p.columns and len(p):
        p = p[~p["touches_border"].astype(bool)]
    out: dict[str, Any] = {"n": int(len(p))}
    for unit in ("nm", "px"):
        col = f"ecd_{unit}"
        if col not in p.columns:
            continue
        x = pd.to_numeric(p[col], errors="coerce").to_numpy(dtype=float)
        x = x[np.isfinite(x)]
        if x.size == 0:
            out[col] = None
            continue
        out[col] = {
            "mean": float(x.mean()),
            "sd": float(x.std(ddof=1)) if x.size > 1 else None,
            "d10": float(np.percentile(x, 10)),
            "d50": float(np.percentile(x, 50)),
            "d90": float(np.percentile(x, 90)),
        }
    return out


def batch_payload(line_id: str, batch: str, revision: int, reason: str, opened_at: float,
                  closed_at: float, counts: Mapping[str, int], outcome: BatchOutcome) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "msg_id": f"batch-{hashlib.sha256(batch.encode()).hexdigest()[:16]}-r{revision}",
        "line_id": line_id,
        "batch": batch,
        "revision": revision,
        "close_reason": reason,
        "opened_at": iso_time(opened_at),
        "closed_at": iso_time(closed_at),
        "n_images": int(counts.get("done", 0)),
        "n_failed": int(counts.get("failed", 0)),
        "n_quarantined": int(counts.get("quarantined", 0)),
        "n_particles": outcome.n_particles,
        "sufficient": outcome.sufficient,
        "verdict": outcome.verdict_label,
        "metrics": None if outcome.metrics is None else outcome.metrics.to_dict(),
        "flat": outcome.flat,
        "uncertainty": outcome.uncertainty,
        "checks": None if outcome.verdict is None else outcome.verdict.to_dict(),
        "error": outcome.error,
    }
