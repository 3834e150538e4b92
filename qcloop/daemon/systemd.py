"""systemd's notify protocol (``Type=notify``) and watchdog, for ``qcloop run``.

* ``READY=1`` once the ledger is open, the start-up scan is done and MQTT is connected;
* ``WATCHDOG=1`` every ``WatchdogSec / 2`` while :meth:`~qcloop.daemon.service.Daemon.healthy`
  (watcher, settle and publisher threads alive, worker loop turning, no image in analysis for
  longer than ``watch.stall_timeout_s``). An unhealthy daemon is not fed: systemd kills and
  restarts it. A dead thread also makes the worker exit with status 1 (see ``Daemon._loop``),
  so the unit restarts it even without ``WatchdogSec``.
* ``STOPPING=1`` on the way out.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Callable

log = logging.getLogger(__name__)


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


class Watchdog:
    """Feeds systemd's watchdog from its own thread while ``healthy()`` says so."""

    def __init__(self, healthy: Callable[[], bool], interval: float):
        self.healthy = healthy
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qcloop-watchdog", daemon=True)

    @classmethod
    def from_environment(cls, healthy: Callable[[], bool]) -> "Watchdog | None":
        iv = watchdog_interval()
        return None if iv is None else cls(healthy, iv)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.healthy():
                sd_notify("WATCHDOG=1")
            else:
                log.error("unhealthy: not feeding the systemd watchdog")
