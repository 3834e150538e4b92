"""The daemon: one worker loop that owns the pipeline and the ledger.

Life of an image
----------------
1. The watcher hands over a settled path (:class:`~qcloop.daemon.watcher.ReadyFile`).
2. The worker skips it when the ledger already has this (path, size, mtime) or (path, content
   SHA-256) as done or quarantined -- duplicate events never cause double processing (and
   the start-up scan of already-done files is not counted as duplicates).
3. It decodes the image (:mod:`qcloop.imaging`: header checks and the memory budget before any
   pixel is decoded). A stable file that does not decode is re-checked
   ``watch.decode_retries`` times, ``watch.settle_seconds`` apart, then quarantined
   (:mod:`qcloop.daemon.quarantine`).
4. Batch: the image's batch key; an image of a new batch first closes the open batch.
5. The ledger row goes to ``pending, in_progress`` (committed), the pipeline runs, and one
   transaction stores the result + particle table, marks the row ``done`` and puts the
   ``images/result`` message (:mod:`qcloop.daemon.messages`) in the outbox.

Poison pills: a row left ``in_progress`` by a dead process counts against its image only when
it alone was in analysis and the process was not stopping cleanly (a SIGTERM/SIGINT writes the
``state_dir/stopping`` marker first); an image that killed the daemon ``watch.max_attempts``
times is quarantined.

Inbound messages: :mod:`qcloop.daemon.inbound` (one handler table, limits and schemas first);
handled in one transaction with their messages and an ``inbox`` row, acknowledged to the
broker only after the commit.

Extension points (used by :mod:`qcloop.control`)
------------------------------------------------
``daemon.add_batch_closed_hook(hook)``
    ``hook(event: BatchClosed, ctx: WorkerContext) -> iterable of OutMessage | None``, called
    on the worker thread inside the transaction that closes the batch (its own SAVEPOINT:
    a hook that raises is rolled back alone, logged and reported on ``events/error``; the
    batch still closes).
``daemon.subscribe(topic, handler, qos=1)``
    ``handler(msg: InboundMessage, ctx: WorkerContext) -> iterable of OutMessage | None``,
    run on the worker thread after the payload passed the limits and the topic's schema; it
    may raise :class:`qcloop.daemon.inbound.Rejected` to refuse a message.
``daemon.every(interval_s, fn)`` / ``daemon.call_soon(fn)``
    Periodic / one-off calls on the worker thread (between images).
``ctx.ledger.get_state(key) / ctx.ledger.set_state(key, json_text)``
    Persistent key/value state (inside the current transaction).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import signal
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry

from qcloop import __version__
from qcloop.config import Settings
from qcloop.daemon import messages
from qcloop.daemon.contracts import contract
from qcloop.daemon.batches import TIMELINE_STATE_KEY, BatchKeyer, MessageBatches, compute_batch
from qcloop.daemon.inbound import MessageHandler, Rejected, Router, install_builtin, msg_key
from qcloop.daemon.ledger import ImageRow, Ledger, pack_particles
from qcloop.daemon.metrics import DaemonMetrics
from qcloop.daemon.names import display
from qcloop.daemon.outbox import InboundMessage, OutMessage, iso_time, jsonable
from qcloop.daemon.quarantine import Quarantine
from qcloop.daemon.systemd import Watchdog, sd_notify
from qcloop.daemon.watcher import ReadyFile, Watcher
from qcloop.errors import ConfigError, InputImageError

log = logging.getLogger(__name__)

QUARANTINE_DIR = "quarantine"
STOP_MARKER = "stopping"
CLIENT_ID_KEY = "daemon.mqtt_client_id"
MESSAGES_PER_TRANSACTION = 50


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


class _Abandon(BaseException):
    """Raised by the second SIGTERM/SIGINT: stop now, leave the current image for next time."""


class _ThreadDied(Exception):
    """A daemon thread (watcher, settle, MQTT network or publisher) is dead."""


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
        self.quarantine = Quarantine(self.state_dir / QUARANTINE_DIR)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = DaemonMetrics(self.registry)
        self.metrics.info.labels(version=__version__, config_hash=settings.config_hash(),
                                 line_id=settings.line_id).set(1)
        self.metrics.healthy.set_function(lambda: float(self.healthy()))
        self.router = Router(self.prefix)
        self._pipeline = pipeline
        self._queue: queue.PriorityQueue[_Item] = queue.PriorityQueue()
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._stop = threading.Event()
        self._stopping_signals = 0
        self._hooks: list[BatchClosedHook] = []
        self._periodic: list[list[Any]] = []
        self._worker_thread: threading.Thread | None = None
        self._ready = False
        self._heartbeat = time.monotonic()
        self._busy_since: float | None = None
        self._current_image: int | None = None
        self._forgotten = 0
        self.ledger: Ledger | None = None
        self.watcher: Watcher | None = None
        self.mqtt = None
        self.http_server = None
        self.metrics_port: int | None = None
        self.keyer: BatchKeyer | None = None
        self._watchdog: Watchdog | None = None
        self.started = threading.Event()
        install_builtin(self)

    # ------------------------------------------------------------------ extension API
    def topic(self, suffix: str) -> str:
        """Full topic for ``suffix`` under the configured prefix."""
        return f"{self.prefix}/{suffix.strip('/')}"

    def add_batch_closed_hook(self, hook: BatchClosedHook) -> None:
        """Call ``hook`` on the worker thread for every closed batch (see module docstring)."""
        self._hooks.append(hook)

    def subscribe(self, topic: str, handler: MessageHandler, qos: int = 1) -> None:
        """Run ``handler`` on the worker thread for messages on ``topic`` (see module docstring)."""
        route = self.router.add(topic, handler, qos)
        if self.mqtt is not None:
            self.mqtt.subscribe(route.topic, qos)

    def context(self) -> WorkerContext:
        if self.ledger is None:
            raise RuntimeError("the ledger is not open (daemon not started)")
        return WorkerContext(self.ledger, self.settings, self.prefix, self.metrics)

    def request_stop(self) -> None:
        """Graceful stop (SIGTERM): finish the current image, flush, publish ``offline``.

        Writes the ``stopping`` marker first (an image interrupted from now on is not blamed).
        A second call while stopping abandons the current image at once (raises in the worker
        when called from a signal handler on the main thread); the image is redone next start.
        """
        self._stopping_signals += 1
        try:
            (self.state_dir / STOP_MARKER).write_text(f"{os.getpid()} {time.time()}\n")
        except OSError as exc:
            log.warning("cannot write the stop marker: %s", exc)
        self._stop.set()
        if self._stopping_signals >= 2 and threading.current_thread() is self._worker_thread \
                and self._busy_since is not None:
            raise _Abandon()  # from a signal handler interrupting the worker's analysis

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.request_stop())

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

    # ------------------------------------------------------------------ queue
    def _put(self, priority: int, kind: str, data: Any) -> None:
        with self._seq_lock:
            self._seq += 1
            seq = self._seq
        self._queue.put(_Item(priority, seq, kind, data))

    def queue_depth(self) -> int:
        n = self._queue.qsize()
        if self.watcher is not None:
            n += self.watcher.pending_count
        return n

    # ------------------------------------------------------------------ start / run / stop
    def start(self) -> None:
        """Open the ledger, recover, start metrics, MQTT and the watcher (no blocking wait)."""
        s = self.settings
        self._check_folders()
        try:
            self.ledger = Ledger(self.state_dir, outbox=s.mqtt.enabled)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"state_dir: cannot open the ledger in {self.state_dir}: {exc}") from None
        timeline = MessageBatches.from_json(self.ledger.get_state(TIMELINE_STATE_KEY))
        self.keyer = BatchKeyer(s.batch, Path(s.watch.directory), timeline)
        self._recover()
        if self._pipeline is None:
            from qcloop.pipeline import Pipeline

            self._pipeline = Pipeline.from_settings(s)
        self._restore_metrics()
        self._start_http()
        self._install_control()
        if s.mqtt.enabled:
            self._start_mqtt()
        self.watcher = Watcher(s.watch, lambda rf: self._put(10, "file", rf), exclude=[self.state_dir],
                               on_problem=self._on_watch_problem, seen_max=s.retention.seen_max,
                               on_seen=lambda: self.metrics.watch_last_file.set(time.time()))
        self.watcher.start()
        self.every(s.retention.interval_s, self._retention)
        self.metrics.up.set(1)
        self.metrics.outbox.set(self.ledger.outbox_count())
        self._watchdog = Watchdog.from_environment(self.healthy)
        if self._watchdog is not None:
            self._watchdog.start()
        sd_notify("STATUS=started; waiting for the MQTT broker" if self.mqtt else "STATUS=started")
        self.started.set()

    def _check_folders(self) -> None:
        from qcloop.commands.check_config import state_dir_problem

        problem = state_dir_problem(self.settings)
        if problem:
            raise ConfigError(problem)

    def _start_http(self) -> None:
        m = self.settings.metrics
        if not m.enabled:
            return
        from qcloop.daemon.http import MetricsServer

        try:
            self.http_server = MetricsServer(self.registry, m.host, m.port, line_id=self.settings.line_id,
                                             threads=m.threads, idle_timeout_s=m.idle_timeout_s,
                                             max_connections=m.max_connections)
        except OSError as exc:
            raise ConfigError(f"metrics.port: cannot listen on {m.host}:{m.port}: {exc.strerror or exc}") from None
        self.metrics_port = self.http_server.port
        log.info("metrics on http://%s:%d/metrics", m.host, self.metrics_port)

    def _start_mqtt(self) -> None:
        from qcloop.daemon.mqtt import MqttLink

        s = self.settings
        assert self.ledger is not None
        client_id = s.mqtt.client_id or self._stored_client_id()
        self.mqtt = MqttLink(s.mqtt, client_id=client_id, status_topic=self.topic(contract("status").topic),
                             status_payload=self._status_payload, db_path=self.ledger.path,
                             on_message=lambda msg: self._put(0, "mqtt", msg), metrics=self.metrics)
        for route in self.router.routes:
            self.mqtt.subscribe(route.topic, route.qos)
        self.mqtt.start()

    def _stored_client_id(self) -> str:
        """The client id kept in the ledger (the broker keeps this daemon's session under it)."""
        assert self.ledger is not None
        stored = self.ledger.get_state(CLIENT_ID_KEY)
        if stored:
            return str(json.loads(stored))
        cid = f"qcloop-{self.settings.line_id}-{uuid.uuid4().hex[:8]}"
        self.ledger.set_state(CLIENT_ID_KEY, json.dumps(cid))
        return cid

    def _status_payload(self, state: str, cause: str, will: bool = False) -> dict[str, Any]:
        return messages.status_payload(self.settings.line_id, self.settings.config_hash(), state, cause,
                                       will=will)

    def _restore_metrics(self) -> None:
        assert self.ledger is not None
        self.metrics.restore_batch(self.ledger.latest_closed_batch())
        last = self.ledger.last_image_time()
        if last is not None:
            self.metrics.watch_last_file.set(last)
        classifier = getattr(self._pipeline, "classifier", None)
        classes = list(getattr(classifier, "classes", None) or []) + ["unknown"] if classifier else ["particle"]
        self.metrics.precreate_classes(classes)

    def run(self) -> int:
        """Start, process until :meth:`request_stop`, shut down. Returns the exit code (0, or 1
        when a daemon thread died: systemd's ``Restart=on-failure`` starts it again)."""
        self._worker_thread = threading.current_thread()
        code = 0
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
        except _ThreadDied as exc:
            log.error("%s: stopping with exit code 1 (to be restarted)", exc)
            code = 1
        finally:
            self.shutdown(clean=code == 0)
        return code

    def shutdown(self, clean: bool = True) -> None:
        sd_notify("STOPPING=1")
        self._stop.set()
        self.metrics.up.set(0)
        if self._watchdog is not None:
            self._watchdog.stop()
        if self.watcher is not None:
            self.watcher.stop()
        if self.mqtt is not None:
            flushed = self.mqtt.flush(self.settings.mqtt.flush_timeout_s if self.mqtt.connected else 0)
            if not flushed:
                log.warning("stopping with messages not yet acknowledged; they stay in the outbox")
            self.mqtt.stop()
        if self.http_server is not None:
            self.http_server.shutdown()
        if self.ledger is not None:
            self.ledger.close()
        if clean:
            (self.state_dir / STOP_MARKER).unlink(missing_ok=True)
        log.info("stopped")

    def _loop(self) -> None:
        handlers = {"file": self._handle_file, "mqtt": self._handle_messages, "call": self._run_call}
        checked = 0.0
        while not self._stop.is_set():
            self._heartbeat = time.monotonic()
            self._check_ready()
            try:
                item = self._queue.get(timeout=0.25)
            except queue.Empty:
                item = None
            if item is not None:
                handlers[item.kind](item.data)
            now = time.monotonic()
            if now - checked > 0.5:
                checked = now
                self._close_idle_batches()
                self.metrics.queue_depth.set(self.queue_depth())
                dead = self._dead_threads()
                if dead:
                    raise _ThreadDied(f"daemon thread(s) died: {', '.join(dead)}")
            self._run_periodic(now)

    def _check_ready(self) -> None:
        if not self._ready and (self.mqtt is None or self.mqtt.connected) and \
                self.watcher is not None and not self.watcher.scanning():
            self._ready = True
            sd_notify("READY=1\nSTATUS=processing")
            log.info("ready")

    def _run_call(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001
            log.exception("call_soon task %r failed", fn)
            self.metrics.errors.labels(kind="hook-failed").inc()

    def _run_periodic(self, now: float) -> None:
        for entry in self._periodic:
            interval, fn, due = entry
            if now < due:
                continue
            entry[2] = now + interval
            self._run_call(fn)

    def _dead_threads(self) -> list[str]:
        dead = []
        if self.watcher is not None and not self.watcher.alive():
            dead.append("watcher")
        if self.mqtt is not None and not self.mqtt.alive():
            dead.append("mqtt")
        return dead

    def healthy(self) -> bool:
        """Watcher and MQTT threads alive; worker loop not stuck on one image too long."""
        if self._dead_threads() or self.watcher is None:
            return False
        now = time.monotonic()
        if self._busy_since is not None:
            return now - self._busy_since < self.settings.watch.stall_timeout_s
        return now - self._heartbeat < 30.0

    # ------------------------------------------------------------------ recovery
    def _recover(self) -> None:
        led = self.ledger
        assert led is not None
        marker = self.state_dir / STOP_MARKER
        clean = marker.exists()
        for row in led.recover_interrupted(clean_stop=clean):
            log.warning("image %s (%s) was interrupted%s", row.id, row.path,
                        " during a clean stop (not counted)" if clean else f" (crash {row.crashes + 1})")
        marker.unlink(missing_ok=True)
        for row in led.pending_images():
            if os.path.lexists(row.fs_path):
                continue  # the start-up scan hands it over again
            found = self.quarantine.find(row.id)
            if found is not None:  # moved to quarantine just before a crash
                self._record_quarantine(row, found[1], found[0], "moved")
            else:
                self._fail(row, row.batch, "file vanished before it was analysed")

    # ------------------------------------------------------------------ images
    def _handle_file(self, rf: ReadyFile) -> None:
        led = self.ledger
        assert led is not None and self.watcher is not None and self.keyer is not None
        path = rf.path
        try:
            st = os.stat(path)
        except OSError:
            log.info("%s disappeared before it was analysed", display(path))
            return
        if (st.st_size, st.st_mtime_ns) != (rf.size, rf.mtime_ns):
            self.watcher.forget(path)
            self.watcher.notice(path)  # changed since it settled: settle again
            return
        if led.find_by_stat(path, st.st_size, st.st_mtime_ns) is not None:
            self._duplicate(rf)
            return
        try:
            digest = file_sha256(path)
        except OSError as exc:
            self._unreadable(rf, st, exc)
            return
        row = led.find_image(path, digest)
        if row is not None and row.status in ("done", "quarantined"):
            self._duplicate(rf)
            return
        batch = self.keyer.key_for(path, seen_at=self._seen_at(rf, st))
        poisoned = row is not None and row.crashes >= self.settings.watch.max_attempts
        row = led.begin_image(path, digest, st.st_size, st.st_mtime_ns, batch)
        if poisoned:
            self._quarantine(row, f"the daemon died {row.crashes} times while analysing this image "
                                  f"(watch.max_attempts={self.settings.watch.max_attempts})")
            return
        self._current_image, self._busy_since = row.id, time.monotonic()
        try:
            self._analyse(row, rf, batch, digest)
        finally:
            self._busy_since = self._current_image = None

    def _duplicate(self, rf: ReadyFile) -> None:
        if not rf.from_scan:  # the start-up scan finds every done file again: not a duplicate event
            self.metrics.images_duplicate.inc()

    def _unreadable(self, rf: ReadyFile, st: os.stat_result, exc: OSError) -> None:
        led = self.ledger
        assert led is not None and self.keyer is not None
        digest = f"unreadable-{st.st_size}-{st.st_mtime_ns}"
        row = led.find_image(rf.path, digest)
        if row is not None and row.status in ("done", "quarantined"):
            return
        batch = self.keyer.key_for(rf.path, seen_at=self._seen_at(rf, st))
        row = led.begin_image(rf.path, digest, st.st_size, st.st_mtime_ns, batch)
        self._quarantine(row, f"cannot read file: {exc.strerror or exc}")

    def _analyse(self, row: ImageRow, rf: ReadyFile, batch: str, digest: str) -> None:
        t_start = time.monotonic()
        queue_wait = max(0.0, t_start - rf.settled_mono)
        self.metrics.queue_wait.observe(queue_wait)
        try:
            image = self._pipeline.load(rf.path)
        except Exception as exc:  # noqa: BLE001 - InputImageError, or a reader bug
            reason = exc.reason if isinstance(exc, InputImageError) else f"{type(exc).__name__}: {exc}"
            if rf.decode_attempt < self.settings.watch.decode_retries:
                log.info("%s does not decode yet (%s); checking again", row.path, reason)
                self.ledger.release_image(row.id)
                self.watcher.requeue(rf.path, decode_attempt=rf.decode_attempt + 1,
                                     first_seen=rf.first_seen, from_scan=rf.from_scan)
            else:
                self._quarantine(row, reason)
            return
        load_s = time.monotonic() - t_start
        self._switch_batch(batch)  # only an image that decodes may open (and close) a batch
        try:
            result = self._pipeline.analyze(image)
        except InputImageError as exc:
            self._quarantine(row, exc.reason)
            return
        except Exception as exc:  # noqa: BLE001 - a bug in a stage must not stop the daemon
            log.exception("analysis of %s failed", row.path)
            self._fail(row, batch, f"{type(exc).__name__}: {exc}")
            return
        self._record_result(row, rf, batch, digest, result, load_s, queue_wait)

    def _fail(self, row: ImageRow, batch: str | None, reason: str) -> None:
        assert self.ledger is not None
        self.metrics.images_failed.inc()
        self.metrics.errors.labels(kind="analysis-failed").inc()
        self.ledger.finish_image(row.id, "failed", batch=batch, reason=reason,
                                 messages=[self._error("analysis-failed", reason, path=row.path,
                                                       image_id=row.id, batch=batch)])
        self._notify_mqtt()

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
            particles.insert(0, "image", display(result.image.name))
        timing = {"stages_s": stages, "analysis_s": analysis_s, "queue_wait_s": queue_wait,
                  "settled_at": iso_time(rf.settled_at), "first_seen_at": iso_time(rf.first_seen),
                  "processed_at": iso_time()}
        msg = messages.image_result(self.prefix, self.settings.line_id, image_id=row.id, path=row.path,
                                    name=Path(row.path).name, digest=digest, batch=batch, result=result,
                                    timing=timing)
        with led.transaction():
            led.finish_image(row.id, "done", batch=batch, result=jsonable(msg.payload),
                             particles=pack_particles(particles, result.embeddings), messages=[msg])
            led.touch_batch(batch, time.time())
        self._notify_mqtt()
        m = self.metrics
        m.images_processed.inc()
        for cls, n in msg.payload["class_counts"].items():
            m.particles.labels(**{"class": cls}).inc(n)
        for stage, sec in stages.items():
            m.stage_seconds.labels(stage=stage).observe(sec)
        m.image_seconds.observe(analysis_s)
        batch_row = led.get_batch(batch)
        if batch_row is not None and batch_row.status == "closed":
            self._close_batch(batch, "late-image")  # a late image of a closed batch: score it again

    # ------------------------------------------------------------------ quarantine / errors
    def _quarantine(self, row: ImageRow, reason: str) -> None:
        """Move (or copy) the file to the quarantine folder with a reason file, then record it
        (with its error event) in one transaction."""
        info = {"path": row.path, "reason": reason, "content_sha256": row.content_hash, "batch": row.batch}
        action, qpath = self.quarantine.put(row.id, row.fs_path, info)
        self._record_quarantine(row, reason, qpath, action)

    def _record_quarantine(self, row: ImageRow, reason: str, qpath: Path | None, action: str) -> None:
        assert self.ledger is not None
        log.warning("quarantined %s (%s): %s", row.path, action, reason)
        where = None if qpath is None else str(qpath)
        msg = self._error("quarantined", reason, path=row.path, image_id=row.id, batch=row.batch,
                          quarantine_path=where, action=action)
        self.ledger.finish_image(row.id, "quarantined", reason=reason, quarantine_path=where, messages=[msg])
        self.metrics.images_quarantined.inc()
        self.metrics.errors.labels(kind="quarantined").inc()
        self._notify_mqtt()

    def _error(self, kind: str, message: str, **fields: Any) -> OutMessage:
        return messages.error_event(self.prefix, self.settings.line_id, kind, message, **fields)

    def _publish_error(self, kind: str, message: str, **fields: Any) -> None:
        assert self.ledger is not None
        self.metrics.errors.labels(kind=kind).inc()
        self.ledger.add_message(self._error(kind, message, **fields))
        self._notify_mqtt()

    def _on_watch_problem(self, kind: str, path: str, message: str) -> None:
        """From a watcher thread: count now, publish from the worker."""
        self.metrics.watch_problems.labels(kind=kind).inc()
        self.call_soon(lambda: self._publish_error("watch-problem", f"{kind}: {message}", path=path))

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
        revision, closed_at = row.revision + 1, time.time()
        event = BatchClosed(batch=batch, revision=revision, reason=reason, closed_at=closed_at,
                            n_images=counts["done"], metrics=outcome.metrics, flat=outcome.flat,
                            uncertainty=outcome.uncertainty, verdict=outcome.verdict,
                            sufficient=outcome.sufficient, error=outcome.error)
        msg = messages.batch_result(self.prefix, self.settings.line_id, batch, revision, reason, row.opened_at,
                                    closed_at, counts, outcome)
        with led.transaction():
            led.close_batch(batch, revision, reason, jsonable(msg.payload), closed_at)
            led.add_message(msg)
            if outcome.error is not None:
                led.add_message(self._error("batch-metrics-failed", outcome.error, batch=batch))
            hook_errors = self._run_hooks(event)
        for _ in hook_errors:
            self.metrics.errors.labels(kind="hook-failed").inc()
        if outcome.error is not None:
            self.metrics.errors.labels(kind="batch-metrics-failed").inc()
        self.metrics.batches_closed.labels(verdict=outcome.verdict_label).inc()
        self.metrics.restore_batch(jsonable(msg.payload))
        log.info("batch %s closed (%s, revision %d): %s", batch, reason, revision, outcome.verdict_label)
        self._notify_mqtt()

    def _run_hooks(self, event: BatchClosed) -> list[str]:
        """The batch-closed hooks, each in its own savepoint; the error texts of those that failed."""
        led, ctx, errors = self.ledger, self.context(), []
        assert led is not None
        for hook in self._hooks:
            try:
                with led.transaction():  # SAVEPOINT: a failing hook is rolled back alone
                    led.add_message(*list(hook(event, ctx) or ()))
            except Exception as exc:  # noqa: BLE001
                log.exception("batch-closed hook %r failed", hook)
                text = f"batch-closed hook {getattr(hook, '__name__', hook)!r} failed: {type(exc).__name__}: {exc}"
                errors.append(text)
                led.add_message(self._error("hook-failed", text, batch=event.batch))
        return errors

    # ------------------------------------------------------------------ inbound messages
    def _handle_messages(self, first: InboundMessage) -> None:
        """``first`` and the inbound messages queued behind it: handled in one transaction, then
        acknowledged to the broker in arrival order."""
        batch = [first]
        while len(batch) < MESSAGES_PER_TRANSACTION:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item.kind != "mqtt":
                self._queue.put(item)  # keeps its place (same priority and sequence number)
                break
            batch.append(item.data)
        led = self.ledger
        assert led is not None
        counted: list[tuple[str, str | None]] = []
        with led.transaction():
            for msg in batch:
                counted.append((msg.topic, self._handle_message(msg)))
        for msg, (topic, rejected) in zip(batch, counted):
            if self.mqtt is not None:
                self.mqtt.ack(msg)
            suffix = self.router.suffix(topic)
            if rejected == "duplicate":
                self.metrics.inbound_duplicates.inc()
            elif rejected:
                self.metrics.inbound_rejected.labels(topic=suffix, reason=rejected).inc()
                self.metrics.errors.labels(kind="command-rejected").inc()
            else:
                self.metrics.inbound.labels(topic=suffix).inc()
        self._notify_mqtt()

    def _handle_message(self, msg: InboundMessage) -> str | None:
        """One message inside the caller's transaction: limits and schema, redelivery check, every
        matching handler in its own savepoint. Returns the rejection reason, ``duplicate`` or None."""
        led = self.ledger
        assert led is not None
        cfg = self.settings.mqtt
        try:
            body = self.router.parse(msg, max_bytes=cfg.max_payload_bytes, max_depth=cfg.max_json_depth)
        except Rejected as exc:
            return self._reject(msg, exc, None)
        key = msg_key(msg.topic, body, msg.payload)
        if key is not None and led.inbox_seen(key):
            log.info("inbound: %s redelivered (already handled); acknowledged again", key.split("\0")[:2])
            return "duplicate"
        outcome = None
        for route in self.router.matching(msg.topic):
            try:
                with led.transaction():
                    led.add_message(*list(route.handler(msg, self.context()) or ()))
            except Rejected as exc:
                outcome = self._reject(msg, exc, key)
            except Exception as exc:  # noqa: BLE001 - a handler bug must not stop the daemon
                log.exception("handler for %s failed", msg.topic)
                self._publish_error("hook-failed", f"handler for {msg.topic} failed: {type(exc).__name__}: {exc}",
                                    topic=msg.topic)
        led.inbox_add(msg.topic, key, outcome or "handled", msg.received_at)
        return outcome

    def _reject(self, msg: InboundMessage, exc: Rejected, key: str | None) -> str:
        assert self.ledger is not None
        text = f"{self.router.suffix(msg.topic)}: {exc}"
        log.warning("inbound message rejected: %s", text)
        self.ledger.add_message(self._error("command-rejected", text, topic=msg.topic, reason=exc.reason))
        return exc.reason

    # ------------------------------------------------------------------ retention / control
    def _retention(self) -> None:
        """One bounded pass of :class:`qcloop.config.RetentionConfig` (worker thread)."""
        r, now, day = self.settings.retention, time.time(), 86400.0
        assert self.ledger is not None
        done = self.ledger.prune(particles_before=now - r.particles_days * day, rows_before=now - r.rows_days * day,
                                 inbox_before=now - r.inbox_days * day, inbox_max_rows=r.inbox_max_rows,
                                 limit=r.batch_rows, file_exists=lambda row: os.path.lexists(row.fs_path))
        done["quarantine"] = self.quarantine.prune(max_age_s=r.quarantine_days * day,
                                                   max_bytes=r.quarantine_max_mb * 2**20, now=now)
        forgotten = self.watcher.forgotten if self.watcher is not None else 0
        done["seen"], self._forgotten = forgotten - self._forgotten, forgotten
        for kind, n in done.items():
            self.metrics.retention.labels(kind=kind).inc(n)
        if any(done.values()):
            log.info("retention: %s", ", ".join(f"{n} {k}" for k, n in done.items() if n))

    def _install_control(self) -> None:
        """Let :mod:`qcloop.control` register its hooks when ``control.enabled``."""
        if not self.settings.control.enabled:
            return
        try:
            from qcloop.control.hook import install
        except ImportError as exc:
            raise ConfigError(f"control.enabled: the controller cannot be loaded ({exc})") from None
        install(self)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()
