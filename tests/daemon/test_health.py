"""A dead daemon thread is a dead daemon: ``qcloop_healthy`` 0, the watchdog no longer fed, and
the worker exits with status 1 so that systemd's ``Restart=on-failure`` starts it again."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from daemon_helpers import free_port, write_config
from qcloop.config import load_settings
from qcloop.daemon.service import Daemon


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death is the point
def test_a_dead_watcher_thread_stops_the_daemon_with_status_1(tmp_path: Path) -> None:
    (tmp_path / "export").mkdir()
    cfg = write_config(tmp_path / "q.yaml", watch_dir=tmp_path / "export", state=tmp_path / "state",
                       port=free_port(), prefix="qchealth/x", mqtt={"enabled": False})
    d = Daemon(load_settings(cfg, use_env=False), registry=CollectorRegistry())
    codes: list[int] = []
    t = threading.Thread(target=lambda: codes.append(d.run()), daemon=True)
    t.start()
    assert d.started.wait(30)
    assert d.healthy()

    def die() -> None:
        raise SystemExit("simulated death of the settle thread")  # not an Exception: ends the thread

    d.watcher._check = die
    d.watcher._wake.set()
    t0 = time.monotonic()
    while d.watcher.alive() and time.monotonic() - t0 < 5:
        time.sleep(0.05)
    assert not d.healthy()
    assert d.registry.get_sample_value("qcloop_healthy") == 0
    t.join(10)
    assert not t.is_alive() and codes == [1], codes
    assert time.monotonic() - t0 < 5
