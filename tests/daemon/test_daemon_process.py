"""The daemon as a real process (``python -m qcloop run --config ...``): kill -9, SIGTERM,
systemd notify protocol, a read-only export folder."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from daemon_helpers import (Broker, Recorder, by_msg_id, clear_retained, ledger_rows, malformed_files,
                            outbox_count, start_daemon, stop_process, wait_until, write_config,
                            write_image)

pytestmark = [pytest.mark.broker, pytest.mark.slow]


class NotifySocket:
    """What systemd does for Type=notify: a datagram socket the service writes to (read by a
    thread, as systemd reads it promptly)."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._reader, daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.extend(self.sock.recv(4096).decode().splitlines())
            except (socket.timeout, BlockingIOError):
                pass
            except OSError:
                return

    def read(self) -> list[str]:
        return list(self.messages)

    def wait_for(self, line: str, timeout: float) -> bool:
        return wait_until(lambda: line in self.messages, timeout, interval=0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def _config(tmp_path: Path, port: int, prefix: str, **sections) -> tuple[Path, Path, Path]:
    watch, state = tmp_path / "export", tmp_path / "state"
    watch.mkdir(exist_ok=True)
    cfg = write_config(tmp_path / "qcloop.yaml", watch_dir=watch, state=state, port=port, prefix=prefix,
                       **sections)
    return cfg, watch, state


def test_kill_9_five_times_then_every_image_exactly_once(tmp_path: Path, machine_broker, prefix: str) -> None:
    host, port = machine_broker
    max_inflight = 5
    cfg, watch, state = _config(tmp_path, port, prefix,
                                watch={"directory": str(tmp_path / "export"), "settle_seconds": 0.2,
                                       "max_attempts": 10},
                                mqtt={"host": host, "port": port, "topic_prefix": prefix,
                                      "max_inflight": max_inflight, "reconnect_min_s": 1, "reconnect_max_s": 1})
    n_start, n_later = 40, 10
    for i in range(n_start):
        write_image(watch / f"{'A' if i < 20 else 'B'}_{i:03d}.tif", i)
    notify = NotifySocket(tmp_path / "notify.sock")
    rec = Recorder(host, port, prefix)
    rng = random.Random(7)
    log = tmp_path / "daemon.log"
    progress = []
    try:
        for k in range(5):
            notify.messages.clear()
            proc = start_daemon(cfg, env={"NOTIFY_SOCKET": str(notify.path)}, log=log)
            assert notify.wait_for("READY=1", 60), log.read_text()[-3000:]
            for j in range(2):  # more images arrive between the crashes
                write_image(watch / f"B_{100 + 2 * k + j:03d}.tif", 100 + 2 * k + j)
            # kill at a random moment once this run has done some work (on a slow or loaded
            # machine a fixed delay may end every run before its first image)
            before = sum(r["status"] == "done" for r in ledger_rows(state))
            wait_until(lambda: sum(r["status"] == "done" for r in ledger_rows(state)) > before, 60)
            time.sleep(rng.uniform(0.0, 0.8))
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            done = sum(r["status"] == "done" for r in ledger_rows(state))
            progress.append(done)
            if k == 0:  # the Last Will: the broker publishes "offline" for the killed client
                assert rec.wait_for(lambda r: bool(r.on("status")) and r.on("status")[-1]["state"] == "offline", 10)
        n_total = n_start + n_later
        assert any(0 < p < n_total for p in progress), f"no kill landed mid-run: {progress}"
        notify.messages.clear()
        proc = start_daemon(cfg, env={"NOTIFY_SOCKET": str(notify.path)}, log=log)
        assert notify.wait_for("READY=1", 60), log.read_text()[-3000:]
        assert wait_until(lambda: sum(r["status"] == "done" for r in ledger_rows(state)) == n_total, 120), \
            log.read_text()[-3000:]
        assert rec.wait_for(lambda r: len(by_msg_id(r.on("images/result"))) == n_total, 60)
        assert wait_until(lambda: outbox_count(state) == 0, 30)
        assert stop_process(proc) == 0

        rows = ledger_rows(state)
        assert len(rows) == n_total, "one ledger row per image"
        assert Counter(r["path"] for r in rows).most_common(1)[0][1] == 1
        assert all(r["status"] == "done" and not r["in_progress"] for r in rows)
        assert sum(r["crashes"] for r in rows) <= 5
        images = rec.on("images/result")
        copies = by_msg_id(images)
        assert len(copies) == n_total and {m["path"] for m in images} == {r["path"] for r in rows}
        for msg_id, msgs in copies.items():  # a re-sent message is the same message
            assert all(m == msgs[0] for m in msgs), msg_id
        resent = len(images) - n_total
        # only messages the broker had not acknowledged (at most max_inflight per kill) come again
        assert resent <= 5 * max_inflight, resent
        batches = by_msg_id(rec.on("batches/result"))
        assert {m[0]["batch"] for m in batches.values()} == {"A"}  # B is still open
        assert len(batches) == 1 and next(iter(batches.values()))[0]["n_images"] == 20
    finally:
        notify.close()
        rec.close()
        clear_retained(host, port, prefix)


def test_sigterm_is_graceful_and_systemd_is_notified(tmp_path: Path, own_broker: Broker, prefix: str) -> None:
    b = own_broker
    cfg, watch, state = _config(tmp_path, b.port, prefix)
    notify = NotifySocket(tmp_path / "notify.sock")
    rec = Recorder(b.host, b.port, prefix)
    log = tmp_path / "daemon.log"
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "600000"}
    try:
        # READY=1 only once MQTT is up: hold the broker back first
        b.stop()
        proc = start_daemon(cfg, env=env, log=log)
        assert not notify.wait_for("READY=1", 6), "READY before the broker answered"
        assert any(m.startswith("STATUS=") for m in notify.messages)
        b.start()
        rec.close()
        rec = Recorder(b.host, b.port, prefix)
        assert notify.wait_for("READY=1", 30), log.read_text()[-3000:]
        for i in range(15):
            write_image(watch / f"A_{i:03d}.tif", i)
        assert rec.wait_for(lambda r: len(r.on("images/result")) >= 2, 60)
        assert notify.wait_for("WATCHDOG=1", 5)
        assert stop_process(proc, signal.SIGTERM, timeout=60) == 0, log.read_text()[-3000:]
        assert notify.wait_for("STOPPING=1", 5)
        assert rec.wait_for(lambda r: r.on("status")[-1]["state"] == "offline", 10)
        rows = ledger_rows(state)
        assert not any(r["in_progress"] for r in rows), "the current image was finished, not left half-done"
        done_before = {r["path"] for r in rows if r["status"] == "done"}
        assert outbox_count(state) == 0, "outbox flushed before exit"
        assert len(by_msg_id(rec.on("images/result"))) == len(done_before)
        # a restart finishes the rest, nothing twice
        notify.messages.clear()
        proc = start_daemon(cfg, env=env, log=log)
        assert notify.wait_for("READY=1", 60), log.read_text()[-3000:]
        assert rec.wait_for(lambda r: len(r.on("images/result")) >= 15, 90), log.read_text()[-3000:]
        assert stop_process(proc) == 0
        images = rec.on("images/result")
        assert len(images) == 15 and len(by_msg_id(images)) == 15
    finally:
        notify.close()
        rec.close()


def _can_bind_mount_read_only(tmp_path: Path) -> str | None:
    if not shutil.which("unshare") or not shutil.which("mount"):
        return "unshare/mount not available"
    src, dst = tmp_path / "probe_src", tmp_path / "probe_dst"
    src.mkdir()
    dst.mkdir()
    r = subprocess.run(["unshare", "-m", "sh", "-c",
                        f"mount --bind {src} {dst} && mount -o remount,bind,ro {dst} && ! touch {dst}/x"],
                       capture_output=True, text=True)
    return None if r.returncode == 0 else f"cannot make a read-only bind mount here: {r.stderr.strip()}"


def test_read_only_export_folder_quarantine_copies(tmp_path: Path, machine_broker, prefix: str) -> None:
    """As under the systemd unit (ReadOnlyPaths=): files cannot be moved, so they are copied to the
    quarantine and recorded; a restart does not touch them again."""
    why = _can_bind_mount_read_only(tmp_path)
    if why:
        pytest.skip(why)
    host, port = machine_broker
    src, ro = tmp_path / "share", tmp_path / "export"
    src.mkdir()
    cfg, _, state = _config(tmp_path, port, prefix)  # watches tmp_path/export (the read-only view)
    mount = ["unshare", "-m", "sh", "-c",
             f'mount --bind {src} {ro} && mount -o remount,bind,ro {ro} && exec "$@"', "sh"]
    bad = [malformed_files(1)[i] for i in (0, 1, 2, 3)]
    for name, data in bad:
        (src / name).write_bytes(data)
    write_image(src / "A_000.tif", 0)
    rec = Recorder(host, port, prefix)
    log = tmp_path / "daemon.log"
    try:
        proc = start_daemon(cfg, log=log, prefix_cmd=mount)
        assert rec.wait_for(lambda r: len(r.on("events/error")) >= 4 and len(r.on("images/result")) >= 1, 60), \
            log.read_text()[-3000:]
        errors = rec.on("events/error")
        assert {e["action"] for e in errors} == {"copied"}
        for e in errors:
            assert Path(e["quarantine_path"]).read_bytes() == (src / Path(e["path"]).name).read_bytes()
        assert sorted(p.name for p in src.iterdir()) == sorted([n for n, _ in bad] + ["A_000.tif"])
        assert stop_process(proc) == 0
        n_err = len(rec.on("events/error"))
        proc = start_daemon(cfg, log=log, prefix_cmd=mount)
        write_image(src / "A_001.tif", 1)
        assert rec.wait_for(lambda r: len(r.on("images/result")) >= 2, 60)
        time.sleep(1.0)
        assert stop_process(proc) == 0
        assert len(rec.on("events/error")) == n_err, "copied files are not quarantined again"
        assert len(rec.on("images/result")) == 2
        rows = ledger_rows(state)
        assert sum(r["status"] == "quarantined" for r in rows) == 4
    finally:
        rec.close()
        clear_retained(host, port, prefix)
