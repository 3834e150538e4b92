"""Reliability suite: the real daemon process, a real Mosquitto, an operator's worst day.

One test per failure of issue 12 (items 1-4, 6-8, 10 here; 5 in test_inbound_durability.py,
9 in test_connect_failures.py) and one run with every hostile kind of file at once."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

import hostile
from daemon_helpers import (REPO, Broker, Recorder, by_msg_id, clear_retained, ledger_rows, publish,
                            start_daemon, stop_process, tiff_bytes, wait_until, write_config, write_image)


def display(name: bytes) -> str:
    """How qcloop shows a file name (bytes that are not UTF-8 as \\xNN escapes)."""
    return name.decode("utf-8", "backslashreplace")

pytestmark = [pytest.mark.broker, pytest.mark.slow]


class Run:
    """A daemon process on ``tmp_path/export`` with a validating recorder on its prefix."""

    def __init__(self, tmp_path: Path, host: str, port: int, prefix: str, **sections):
        self.tmp, self.host, self.port, self.prefix = tmp_path, host, port, prefix
        self.watch, self.state = tmp_path / "export", tmp_path / "state"
        self.watch.mkdir(exist_ok=True)
        self.cfg = write_config(tmp_path / "qcloop.yaml", watch_dir=self.watch, state=self.state, port=port,
                                prefix=prefix, **sections)
        self.log = tmp_path / "daemon.log"
        self.rec = Recorder(host, port, prefix)
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, prefix_cmd: list[str] | None = None, wait: bool = True) -> "Run":
        n = len([s for s in self.rec.on("status") if isinstance(s, dict) and s.get("state") == "online"])
        self.proc = start_daemon(self.cfg, log=self.log, prefix_cmd=prefix_cmd)
        self.starts += 1
        if wait:
            assert self.rec.wait_for(lambda r: sum(1 for s in r.on("status") if isinstance(s, dict)
                                                   and s.get("state") == "online") > n, 60), self.tail()
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        return stop_process(self.proc, sig)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def errors(self, kind: str | None = None) -> list[dict]:
        return [e for e in self.rec.on("events/error") if kind is None or e["kind"] == kind]

    def names(self, suffix: str = "images/result") -> list[str]:
        return [m["name"] for m in self.rec.on(suffix)]

    def close(self) -> None:
        try:
            self.rec.close()
        finally:
            clear_retained(self.host, self.port, self.prefix)


@pytest.fixture
def run(tmp_path: Path, machine_broker, prefix: str):
    runs: list[Run] = []

    def make(**sections) -> Run:
        r = Run(tmp_path, *machine_broker, prefix, **sections)
        runs.append(r)
        return r

    yield make
    for r in runs:
        if r.alive():
            r.stop()
        r.close()


def _file_name(path_text: str) -> str:
    return path_text.rsplit("/", 1)[-1]


# ----------------------------------------------------------------------------- all kinds at once
def test_forty_kinds_of_hostile_file_in_one_run(run) -> None:
    """Half the kinds wait in the folder before the start (start-up scan), half arrive while it
    runs (events); then duplicates, a restart, and one more image. Nothing crashes or stalls,
    every bad file is quarantined or reported once with a reason, every good image comes once."""
    r = run(watch={"directory": "export", "settle_seconds": 0.3, "decode_retries": 1})
    kinds = hostile.kinds()
    made: dict[str, list[str]] = {}
    for k in kinds[::2]:
        made[k.name] = [_file_name(display(n)) for n in k.make(r.watch)]
    r.start()
    for k in kinds[1::2]:
        made[k.name] = [_file_name(display(n)) for n in k.make(r.watch)]
    expect = Counter()
    by_outcome: dict[str, set[str]] = {o: set() for o in (hostile.GOOD, hostile.QUARANTINED, hostile.REPORTED)}
    for k in kinds:
        expect[k.expect] += 1
        if k.expect in by_outcome:
            by_outcome[k.expect] |= set(made[k.name])
    n_bad_kinds = sum(n for o, n in expect.items() if o != hostile.GOOD)

    def settled(rec: Recorder) -> bool:
        quarantined = {_file_name(e["path"]) for e in rec.on("events/error") if e["kind"] == "quarantined"}
        reported = {_file_name(e["path"]) for e in rec.on("events/error") if e["kind"] == "watch-problem"}
        return by_outcome[hostile.GOOD] <= {m["name"] for m in rec.on("images/result")} and \
            by_outcome[hostile.QUARANTINED] <= quarantined and by_outcome[hostile.REPORTED] <= reported

    assert r.rec.wait_for(settled, 180), r.tail()
    # tricks with files already done: touch, identical rewrite, move out and back in
    os.utime(r.watch / "G_upper.TIFF")
    (r.watch / "G_fine.png").write_bytes((r.watch / "G_fine.png").read_bytes())
    os.rename(r.watch / "G_upper.TIFF", r.tmp / "away.TIFF")
    os.rename(r.tmp / "away.TIFF", r.watch / "G_upper.TIFF")
    write_image(r.watch / "G_after_tricks.tif", 40)
    assert r.rec.wait_for(lambda rec: "G_after_tricks.tif" in r.names(), 60), r.tail()
    assert r.alive(), r.tail()
    # a restart: the start-up scan walks past every hostile name (loops included) to new files
    assert r.stop() == 0, r.tail()
    write_image(r.watch / "zz_after_restart.tif", 41)
    r.start()
    assert r.rec.wait_for(lambda rec: "zz_after_restart.tif" in r.names(), 60), r.tail()
    time.sleep(1.5)  # room for any (wrong) repeat
    assert r.alive(), r.tail()
    assert r.stop() == 0, r.tail()

    names = Counter(r.names())
    goods = by_outcome[hostile.GOOD] | {"G_after_tricks.tif", "zz_after_restart.tif"}
    assert set(names) == goods, f"missing {goods - set(names)}, unexpected {set(names) - goods}"
    assert max(names.values()) == 1, f"delivered twice: {[n for n, c in names.items() if c > 1]}"
    quarantined = Counter(_file_name(e["path"]) for e in r.errors("quarantined"))
    assert set(quarantined) == by_outcome[hostile.QUARANTINED] and max(quarantined.values()) == 1
    assert all(e["message"] for e in r.errors("quarantined"))
    reported = Counter(_file_name(e["path"]) for e in r.errors("watch-problem"))
    assert by_outcome[hostile.REPORTED] <= set(reported)
    assert max(reported.values()) <= r.starts, "a link is reported once per daemon start"
    assert "Traceback" not in r.tail(10**7), r.tail()
    rows = ledger_rows(r.state)
    assert not any(row["in_progress"] for row in rows)
    assert n_bad_kinds + 3 >= 40, n_bad_kinds  # + touch, identical rewrite, move out and back
    r.rec.assert_valid()


# ----------------------------------------------------------------------------- items 1-3
def test_item1_names_that_are_not_utf8(run) -> None:
    """``G_bad\\xff\\xfe.tif`` (Windows tools on SMB) crashed the daemon at every start."""
    r = run()
    raw = os.fsencode(r.watch)
    for name, data in ((b"G_bad\xff\xfe.tif", tiff_bytes(1)), (b"bad_\xe9\xe8.tif", b"garbage" * 40)):
        with open(raw + b"/" + name, "wb") as f:
            f.write(data)
    write_image(r.watch / "H_after.tif", 2)  # sorts after the bad names
    r.start()
    assert r.rec.wait_for(lambda rec: len(rec.on("images/result")) >= 2 and r.errors("quarantined"), 60), r.tail()
    assert sorted(r.names()) == ["G_bad\\xff\\xfe.tif", "H_after.tif"]
    q = r.errors("quarantined")[0]
    assert q["path"].endswith("bad_\\xe9\\xe8.tif") and Path(q["quarantine_path"]).exists()
    assert r.stop() == 0, r.tail()
    r.start()  # no crash loop, nothing twice
    write_image(r.watch / "I_next.tif", 3)
    assert r.rec.wait_for(lambda rec: "I_next.tif" in r.names(), 60), r.tail()
    assert r.stop() == 0
    assert Counter(r.names()) == Counter({"G_bad\\xff\\xfe.tif": 1, "H_after.tif": 1, "I_next.tif": 1})
    rows = {row["path"].rsplit("/", 1)[-1]: row for row in ledger_rows(r.state)}
    assert rows["G_bad\\xff\\xfe.tif"]["status"] == "done"


def test_item2_bad_file_with_a_very_long_name(run) -> None:
    """A bad file with a name of 237+ characters: the reason file name was too long -> crash loop."""
    r = run()
    r.start()
    long_name = "bad_" + "n" * 247 + ".tif"  # 255 bytes, the longest name Linux allows
    (r.watch / long_name).write_bytes(b"not an image" * 30)
    write_image(r.watch / ("G_" + "m" * 240 + ".tif"), 4)
    assert r.rec.wait_for(lambda rec: r.errors("quarantined") and rec.on("images/result"), 60), r.tail()
    q = r.errors("quarantined")[0]
    qpath = Path(q["quarantine_path"])
    assert qpath.exists() and len(qpath.name.encode()) <= 255
    info = json.loads((qpath.parent / f"{q['image_id']:06d}.reason.json").read_text())
    assert info["path"].endswith(long_name) and info["action"] == "moved"
    write_image(r.watch / "G_next.tif", 5)
    assert r.rec.wait_for(lambda rec: "G_next.tif" in r.names(), 60), r.tail()
    assert r.alive()


def test_item3_symlink_loops_neither_kill_the_watcher_nor_stop_the_scan(run) -> None:
    r = run()
    for i in range(4):
        write_image(r.watch / f"A_{i:03d}.tif", i)
    r.start()
    assert r.rec.wait_for(lambda rec: len(rec.on("images/result")) >= 4, 60), r.tail()
    os.symlink("B.tif", r.watch / "A.tif")  # a loop appears while the daemon runs
    os.symlink("A.tif", r.watch / "B.tif")
    for i in range(4, 8):
        write_image(r.watch / f"C_{i:03d}.tif", i)
    assert r.rec.wait_for(lambda rec: len(rec.on("images/result")) >= 8, 60), \
        f"new files no longer picked up after a symlink loop\n{r.tail()}"
    loops = [e for e in r.errors("watch-problem") if "symlink-loop" in e["message"]]
    assert {_file_name(e["path"]) for e in loops} == {"A.tif", "B.tif"} and len(loops) == 2
    assert r.stop() == 0
    for i in range(8, 12):  # after a restart the scan passes the loop (A.tif, B.tif sort first)
        write_image(r.watch / f"C_{i:03d}.tif", i)
    r.start()
    assert r.rec.wait_for(lambda rec: len(rec.on("images/result")) >= 12, 60), r.tail()
    assert len(by_msg_id(r.rec.on("images/result"))) == 12 == len(r.rec.on("images/result"))


# ----------------------------------------------------------------------------- item 4
def test_item4_deeply_nested_json_is_rejected_not_fatal(run) -> None:
    r = run(batch={"key": "message", "close_after_idle_s": 3600, "min_particles": 5})
    deep = b"[" * 5000 + b"]" * 5000
    publish(r.host, r.port, f"{r.prefix}/reactor/batch", deep, retain=True)  # waits for every start
    r.start()
    publish(r.host, r.port, f"{r.prefix}/commands/close-batch", deep)
    publish(r.host, r.port, f"{r.prefix}/commands/close-batch", b'{"batch": ' + b"{" * 3000)
    assert r.rec.wait_for(lambda rec: len(r.errors("command-rejected")) >= 3, 30), r.tail()
    reasons = Counter(e["reason"] for e in r.errors("command-rejected"))
    assert reasons["too-deep"] >= 3, reasons
    assert r.stop() == 0 and r.proc.returncode == 0
    r.start()  # the retained message again: still alive
    write_image(r.watch / "x_001.tif", 6)
    assert r.rec.wait_for(lambda rec: rec.on("images/result"), 60), r.tail()
    assert r.alive()


# ----------------------------------------------------------------------------- item 6
def test_item6_close_batch_needs_all_or_an_existing_batch_and_batch_end_is_no_start(run) -> None:
    r = run(batch={"key": "message", "close_after_idle_s": 3600, "min_particles": 1})
    r.start()
    publish(r.host, r.port, f"{r.prefix}/reactor/batch", {"batch": "A", "event": "start"})
    time.sleep(0.5)
    write_image(r.watch / "img_a1.tif", 1)
    assert r.rec.wait_for(lambda rec: len(rec.on("images/result")) == 1, 60), r.tail()
    bad = [{"batch": ""}, {"batch": None}, {"bacth": "A"}, {"batch": "nope"}, [], "A"]
    for body in bad:
        publish(r.host, r.port, f"{r.prefix}/commands/close-batch", body)
    assert r.rec.wait_for(lambda rec: len(r.errors("command-rejected")) == len(bad), 30), r.tail()
    time.sleep(0.5)
    assert r.rec.on("batches/result") == [], "a malformed close-batch closed a batch"
    publish(r.host, r.port, f"{r.prefix}/reactor/batch", {"batch": "B", "event": "start"})
    time.sleep(0.3)
    write_image(r.watch / "img_b1.tif", 2)
    assert r.rec.wait_for(lambda rec: [b["batch"] for b in rec.on("batches/result")] == ["A"], 60), r.tail()
    publish(r.host, r.port, f"{r.prefix}/reactor/batch", {"batch": "A", "event": "end"})  # late end of A
    time.sleep(0.5)
    write_image(r.watch / "img_b2.tif", 3)
    assert r.rec.wait_for(lambda rec: len(rec.on("images/result")) == 3, 60), r.tail()
    assert [m["batch"] for m in r.rec.on("images/result")] == ["A", "B", "B"], "an end started a batch"
    publish(r.host, r.port, f"{r.prefix}/commands/close-batch", b"")  # empty: close all
    assert r.rec.wait_for(lambda rec: [b["batch"] for b in rec.on("batches/result")] == ["A", "B"], 30), r.tail()
    batches = r.rec.on("batches/result")
    assert batches[0]["revision"] == 1 and batches[1]["close_reason"] == "command"
    publish(r.host, r.port, f"{r.prefix}/commands/close-batch", {"batch": "B"})  # exists, already closed
    time.sleep(1.0)
    assert len(r.rec.on("batches/result")) == 2 and len(r.errors("command-rejected")) == len(bad)


# ----------------------------------------------------------------------------- item 7
def _vmhwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_item7_a_15000_px_montage_is_refused_before_decoding(run) -> None:
    """15 000 x 15 000 px passes max_side_px and needed > 8 GiB. Under an address-space limit
    of 6 GB (so that a regression cannot exhaust the machine) the daemon must refuse it with a
    clear reason and stay far below 2 GiB."""
    r = run()
    limit = ["prlimit", "--as=6000000000", "--"] if shutil.which("prlimit") else None
    r.start(prefix_cmd=limit)
    hostile._big_sparse(r.watch, b"M_montage.tif")
    write_image(r.watch / "M_small.tif", 7)
    assert r.rec.wait_for(lambda rec: r.errors("quarantined") and rec.on("images/result"), 120), r.tail()
    q = r.errors("quarantined")[0]
    assert q["path"].endswith("M_montage.tif")
    assert "15000x15000" in q["message"] and "imaging.memory_budget_mb" in q["message"]
    peak = _vmhwm(r.proc.pid)
    assert peak < 2 * 2**30, f"peak RSS {peak / 2**20:.0f} MiB"
    assert r.alive()


# ----------------------------------------------------------------------------- item 8
def test_item8_clean_stops_mid_analysis_do_not_make_a_poison_pill(run) -> None:
    """Interrupted three times mid-analysis by stops that were not its fault (SIGTERM, then a kill
    when the stop takes too long, as a machine restart does), an image is still analysed; three
    plain kill -9 while it alone is in analysis do make it a poison pill."""
    r = run(watch={"directory": "export", "settle_seconds": 0.2, "max_attempts": 3})
    from daemon_helpers import tiff_bytes as tb

    (r.watch / "P_big.tif").write_bytes(tb(9, size=1400, n=400, radius=12))
    for k in range(3):
        r.start()
        assert wait_until(lambda: any(row["in_progress"] for row in ledger_rows(r.state)), 60), r.tail()
        r.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        r.proc.send_signal(signal.SIGKILL)  # the stop "timed out"
        r.proc.wait(10)
        if any(row["status"] == "done" for row in ledger_rows(r.state)):
            pytest.skip("the image finished before the kill (machine too fast for this test)")
    r.start()
    assert r.rec.wait_for(lambda rec: rec.on("images/result"), 120), r.tail()
    assert r.errors("quarantined") == [] and r.rec.on("images/result")[0]["name"] == "P_big.tif"
    row = ledger_rows(r.state)[0]
    assert row["crashes"] == 0 and row["status"] == "done"


# ----------------------------------------------------------------------------- item 10
def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_item10_growth_is_bounded(run) -> None:
    """1 MB acks, absurd setpoints, idle HTTP connections: nothing grows without bound."""
    control = {"enabled": True, "setpoints": [{"name": "temperature", "unit": "degC", "min": 60, "max": 100,
                                               "max_step": 2}],
               "rules": [{"metric": "ecd_nm.mean", "setpoint": "temperature", "gain": 0.4}]}
    r = run(control=control, targets={"ecd_nm.mean": {"target": 50, "tolerance": 2}})
    r.start()
    url = None
    for line in r.log.read_text().splitlines():
        m = re.search(r"metrics on (http://\S+/metrics)", line)
        if m:
            url = m.group(1)
    assert url, r.tail()
    ledger = r.state / "ledger.sqlite3"
    size0 = ledger.stat().st_size + (r.state / "ledger.sqlite3-wal").stat().st_size
    detail = "x" * 1_000_000
    for i in range(20):
        publish(r.host, r.port, f"{r.prefix}/suggestions/ack", {"msg_id": f"s{i}", "status": "applied",
                                                                 "detail": detail})
    for value in (1e300, -1e6, 150.0):
        publish(r.host, r.port, f"{r.prefix}/reactor/setpoints", {"setpoints": {"temperature": value}})
    publish(r.host, r.port, f"{r.prefix}/reactor/setpoints", {"setpoints": {"temperature": 80.0}})
    assert r.rec.wait_for(lambda rec: len(r.errors("command-rejected")) >= 23, 60), r.tail()
    reasons = Counter(e["reason"] for e in r.errors("command-rejected"))
    assert reasons["too-large"] == 20 and reasons["schema"] + reasons["invalid"] == 3, reasons
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert re.search(r'qcloop_setpoint\{[^}]*name="temperature"[^}]*\} 80\.0', text), "the good value is current"
    size1 = ledger.stat().st_size + (r.state / "ledger.sqlite3-wal").stat().st_size
    assert size1 - size0 < 2_000_000, f"ledger grew by {size1 - size0} bytes for 20 MB of rejected acks"
    # 200 idle connections to the metrics port: no thread each, and a scrape still answers
    base = _threads(r.proc.pid)
    host, port = url.split("//")[1].split("/")[0].split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(200)]
    try:
        time.sleep(1.0)
        assert _threads(r.proc.pid) <= base + 4
        t0 = time.monotonic()
        assert "qcloop_up" in urllib.request.urlopen(url, timeout=10).read().decode()
        assert time.monotonic() - t0 < 5
    finally:
        for s in idle:
            s.close()
    assert r.alive()
