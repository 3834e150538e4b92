"""Watch the export folder and hand *settled* image paths to the worker.

inotify (watchdog's native observer) locally; ``watch.polling: true`` uses the polling observer
(NFS/SMB shares deliver no inotify events for writes made by other machines). Created,
modified, closed and moved-in files all count; a folder moved in is scanned. Files present at
start-up (including those that arrived while the daemon was down) are found by a scan.

A file is *settled* when its size and mtime have not changed for ``settle_seconds``
(observed, not inferred from the mtime: clocks of file servers drift). Many events for one
file collapse into one entry, and a file is handed over again only if its size or mtime
changed since it was last handed over (the watcher remembers at most ``retention.seen_max``
file states, least recently seen forgotten first; the ledger still keeps a forgotten file from
being analysed twice). Only paths travel (the queue never holds pixels); decoding and the
ledger check are the worker's job.

Nothing a share can hold stops the watcher: symbolic links are followed only when they end
inside the watched folder; loops, dangling links and links out of the tree are reported once
(``on_problem``) and skipped; a name that is not valid UTF-8 travels as Python's
surrogate-escaped ``str`` (see :mod:`qcloop.daemon.names`); an exception while looking at one
file is logged and the scan goes on with the next.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from watchdog.events import (DirCreatedEvent, DirMovedEvent, FileClosedEvent, FileCreatedEvent,
                             FileModifiedEvent, FileMovedEvent, FileSystemEvent,
                             FileSystemEventHandler)
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from qcloop.config import WatchConfig
from qcloop.daemon.names import display

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadyFile:
    """A settled file for the worker.

    Attributes
    ----------
    path : Path
    size : int
        Bytes, as observed when it settled.
    mtime_ns : int
    first_seen : float
        Unix time the watcher first saw this version of the file.
    settled_at : float
        Unix time it was found stable.
    settled_mono : float
        ``time.monotonic()`` at the same moment (for latency figures).
    from_scan : bool
        Found by the start-up / folder scan rather than by an event.
    decode_attempt : int
        0 the first time; n when handed back for the n-th decode retry.
    """

    path: Path
    size: int
    mtime_ns: int
    first_seen: float
    settled_at: float
    settled_mono: float
    from_scan: bool = False
    decode_attempt: int = 0


@dataclass
class _Entry:
    size: int
    mtime_ns: int
    stable_since: float  # monotonic
    first_seen: float  # wall
    from_scan: bool
    not_before: float = 0.0  # monotonic
    decode_attempt: int = 0
    force: bool = False


@dataclass
class _Stats:
    events: int = 0
    scanned: int = 0
    emitted: int = 0
    extra: dict = field(default_factory=dict)


class Watcher:
    """Settles files in ``cfg.directory`` and calls ``on_ready(ReadyFile)`` for each.

    Parameters
    ----------
    cfg : WatchConfig
    on_ready : callable
        Called from the settle thread; must be quick (the daemon puts the item on a queue).
    exclude : iterable of Path
        Folders never reported (the state directory when it lies inside the watched folder).
    on_problem : callable, optional
        ``on_problem(kind, path_text, message)`` once per path the watcher will not follow
        (``symlink-loop``, ``dangling-link``, ``outside-link``, ``not-a-file``, ``unreadable``); from the
        watcher's threads: must be quick.
    on_seen : callable, optional
        Called (no arguments) whenever a new file state is noticed.
    seen_max : int
        File states remembered (see the module docstring).
    """

    def __init__(self, cfg: WatchConfig, on_ready: Callable[[ReadyFile], None], *,
                 exclude: Iterable[Path] = (), on_problem: Callable[[str, str, str], None] | None = None,
                 on_seen: Callable[[], None] | None = None, seen_max: int = 100_000):
        if cfg.directory is None:
            from qcloop.errors import ConfigError

            raise ConfigError("watch.directory: required to run the daemon")
        self.cfg = cfg
        self.root = Path(cfg.directory).resolve()
        self.on_ready = on_ready
        self.exclude = [Path(p).resolve() for p in exclude]
        self._patterns = [p.lower() for p in cfg.patterns]
        self._lock = threading.Lock()
        self._pending: dict[Path, _Entry] = {}
        self._emitted: OrderedDict[Path, tuple[int, int]] = OrderedDict()
        self.seen_max = seen_max
        self.forgotten = 0
        self.on_problem = on_problem
        self.on_seen = on_seen
        self._reported: set[str] = set()
        self._scan_requests: list[Path] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer = None
        self.stats = _Stats()
        self.tick = min(0.5, max(0.05, cfg.settle_seconds / 4))

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        """Start the observer, then scan the folder (in the settle thread)."""
        if not self.root.is_dir():
            from qcloop.errors import ConfigError

            raise ConfigError(f"watch.directory: {self.root} is not a folder")
        observer = PollingObserver(timeout=self.cfg.polling_interval_s) if self.cfg.polling else Observer()
        observer.schedule(_Handler(self), str(self.root), recursive=self.cfg.recursive)
        observer.daemon = True
        observer.start()
        self._observer = observer
        with self._lock:
            self._scan_requests.append(self.root)
        self._thread = threading.Thread(target=self._run, name="qcloop-settle", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            # watchdog logs a spurious ERROR when an event races the emitter's shutdown
            emitter_log = logging.getLogger("watchdog.observers.inotify")
            level = emitter_log.level
            emitter_log.setLevel(logging.CRITICAL)
            try:
                self._observer.stop()
                self._observer.join(timeout)
            finally:
                emitter_log.setLevel(level)
        if self._thread is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        return bool(self._thread and self._thread.is_alive() and self._observer
                    and self._observer.is_alive())

    @property
    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending) + len(self._scan_requests)

    def scanning(self) -> bool:
        with self._lock:
            return bool(self._scan_requests)

    def requeue(self, path: Path, *, decode_attempt: int, first_seen: float | None = None,
                from_scan: bool = False) -> None:
        """Check ``path`` again after another ``settle_seconds`` (decode retry)."""
        try:
            st = os.stat(path)
        except OSError:
            return
        now = time.monotonic()
        with self._lock:
            self._pending[Path(path)] = _Entry(st.st_size, st.st_mtime_ns, now,
                                               time.time() if first_seen is None else first_seen,
                                               from_scan, decode_attempt=decode_attempt, force=True)
        self._wake.set()

    def forget(self, path: Path) -> None:
        """Drop the record of having handed ``path`` over (it may be handed over again)."""
        with self._lock:
            self._emitted.pop(Path(path), None)

    def matches(self, path: Path) -> bool:
        """A file the worker should see: pattern, not hidden, really inside the watched tree."""
        name = path.name
        if name.startswith("."):
            return False
        low = name.lower()
        if not any(fnmatch.fnmatchcase(low, p) for p in self._patterns):
            return False
        rp = self._resolve(path)
        if rp is None:
            return False
        if self.root not in rp.parents:
            self._problem("outside-link", path, f"link to {display(rp)}, outside the watched folder; not followed")
            return False
        return not any(rp == ex or ex in rp.parents for ex in self.exclude)

    def _resolve(self, path: Path) -> Path | None:
        """The real path (links followed), or None with the problem reported once."""
        try:
            return Path(os.path.realpath(path, strict=True))
        except FileNotFoundError:
            if os.path.islink(path):
                self._problem("dangling-link", path, "symbolic link to a file that does not exist")
            return None
        except OSError as exc:
            kind = "symlink-loop" if exc.errno == errno.ELOOP else "unreadable"
            self._problem(kind, path, "symbolic link loop" if kind == "symlink-loop" else
                          f"cannot resolve: {exc.strerror or exc}")
            return None
        except (RuntimeError, ValueError) as exc:  # RuntimeError: loop (older Pythons); ValueError: NUL
            self._problem("symlink-loop", path, f"cannot resolve: {exc}")
            return None

    def _problem(self, kind: str, path: Path, message: str) -> None:
        text = display(path)
        with self._lock:
            if text in self._reported:
                return
            if len(self._reported) >= self.seen_max:
                self._reported.clear()
            self._reported.add(text)
        log.warning("watcher: %s: %s", text, message)
        if self.on_problem is not None:
            try:
                self.on_problem(kind, text, message)
            except Exception:  # noqa: BLE001
                log.exception("watcher: problem callback failed")

    # ------------------------------------------------------------------ events
    def notice(self, path: Path, *, from_scan: bool = False) -> None:
        """A file event (or scan hit) for ``path``: (re)start its settle clock."""
        if not self.matches(path):
            return
        try:
            st = os.stat(path)
        except OSError:
            return
        if not os.path.isfile(path):
            if not os.path.isdir(path):  # a FIFO, socket or device named like an image
                self._problem("not-a-file", path, "not a regular file; not opened")
            return
        now = time.monotonic()
        key = Path(path)
        with self._lock:
            self.stats.events += not from_scan
            e = self._pending.get(key)
            if e is None:
                if self._emitted.get(key) == (st.st_size, st.st_mtime_ns):
                    self._emitted.move_to_end(key)
                    return  # already handed over in exactly this state
                self._pending[key] = _Entry(st.st_size, st.st_mtime_ns, now, time.time(), from_scan)
                if self.on_seen is not None:
                    self.on_seen()
            elif (e.size, e.mtime_ns) != (st.st_size, st.st_mtime_ns):
                e.size, e.mtime_ns, e.stable_since = st.st_size, st.st_mtime_ns, now
                e.decode_attempt, e.force = 0, False

    def request_scan(self, folder: Path) -> None:
        with self._lock:
            self._scan_requests.append(Path(folder))
        self._wake.set()

    # ------------------------------------------------------------------ settle thread
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._do_scans()
                self._check()
            except Exception:  # noqa: BLE001 - the thread must survive odd file systems
                log.exception("watcher: settle loop error")
            self._wake.wait(self.tick)
            self._wake.clear()

    def _do_scans(self) -> None:
        while True:
            with self._lock:
                if not self._scan_requests:
                    return
                folder = self._scan_requests[0]
            n = 0
            try:
                if self.cfg.recursive:
                    walker = os.walk(folder)
                else:
                    walker = iter([(str(folder), [], os.listdir(folder))])
                for dirpath, dirnames, filenames in walker:
                    if self._stop.is_set():
                        return
                    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                    for name in sorted(filenames):
                        self._notice_safely(Path(dirpath) / name)
                        n += 1
            except OSError as exc:
                log.warning("watcher: cannot scan %s: %s", folder, exc)
            finally:
                with self._lock:
                    if self._scan_requests and self._scan_requests[0] is folder:
                        self._scan_requests.pop(0)
                    self.stats.scanned += n
            log.info("watcher: scanned %s (%d files)", folder, n)

    def _notice_safely(self, path: Path) -> None:
        try:
            self.notice(path, from_scan=True)
        except Exception as exc:  # noqa: BLE001 - one odd file must not end the scan
            self._problem("unreadable", path, f"{type(exc).__name__}: {exc}")

    def _remember(self, path: Path, state: tuple[int, int]) -> None:
        """Record a hand-over (lock held); forget the least recently seen beyond ``seen_max``."""
        self._emitted[path] = state
        self._emitted.move_to_end(path)
        while len(self._emitted) > self.seen_max:
            self._emitted.popitem(last=False)
            self.forgotten += 1

    def _check(self) -> None:
        now = time.monotonic()
        settle = self.cfg.settle_seconds
        with self._lock:
            items = list(self._pending.items())
        # oldest first, so files are handed over in arrival order
        items.sort(key=lambda kv: kv[1].first_seen)
        for path, e in items:
            if e.not_before > now:
                continue
            try:
                st = os.stat(path)
            except OSError:
                with self._lock:
                    self._pending.pop(path, None)
                continue
            with self._lock:
                if self._pending.get(path) is not e:
                    continue
                if (st.st_size, st.st_mtime_ns) != (e.size, e.mtime_ns):
                    e.size, e.mtime_ns, e.stable_since = st.st_size, st.st_mtime_ns, now
                    e.decode_attempt, e.force = 0, False
                    continue
                if now - e.stable_since < settle:
                    continue
                del self._pending[path]
                if not e.force and self._emitted.get(path) == (e.size, e.mtime_ns):
                    continue
                self._remember(path, (e.size, e.mtime_ns))
                self.stats.emitted += 1
            self.on_ready(ReadyFile(path=path, size=e.size, mtime_ns=e.mtime_ns,
                                    first_seen=e.first_seen, settled_at=time.time(),
                                    settled_mono=time.monotonic(), from_scan=e.from_scan,
                                    decode_attempt=e.decode_attempt))


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher):
        self.w = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._dispatch(event)
        except Exception:  # noqa: BLE001 - an exception here would end the observer thread
            log.exception("watcher: cannot handle %r", event)

    def _dispatch(self, event: FileSystemEvent) -> None:
        w = self.w
        if isinstance(event, (FileMovedEvent, DirMovedEvent)):
            dest = Path(os.fsdecode(event.dest_path))
            if event.is_directory:
                if w.cfg.recursive:
                    w.request_scan(dest)
            else:
                w.notice(dest)
            return
        if isinstance(event, DirCreatedEvent):
            if w.cfg.recursive:
                w.request_scan(Path(os.fsdecode(event.src_path)))
            return
        if isinstance(event, (FileCreatedEvent, FileModifiedEvent, FileClosedEvent)):
            w.notice(Path(os.fsdecode(event.src_path)))
