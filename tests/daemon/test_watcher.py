"""The watcher: settled files only, once each, scan on start, moves, polling, exclusions."""

from __future__ import annotations

import os
import queue
import shutil
import threading
import time
from pathlib import Path

import pytest

from daemon_helpers import tiff_bytes, write_slowly
from qcloop.config import WatchConfig
from qcloop.daemon.watcher import ReadyFile, Watcher


def _watch(tmp_path: Path, **kw) -> tuple[Watcher, "queue.Queue[ReadyFile]"]:
    q: queue.Queue[ReadyFile] = queue.Queue()
    cfg = WatchConfig(directory=tmp_path / "in", settle_seconds=kw.pop("settle", 0.4), **kw)
    (tmp_path / "in").mkdir(exist_ok=True)
    w = Watcher(cfg, q.put, exclude=kw.pop("exclude", [tmp_path / "in" / "state"]))
    return w, q


def _drain(q: queue.Queue, wait: float, expect: int | None = None) -> list[ReadyFile]:
    """Items arriving within ``wait`` s; once ``expect`` arrived, only 0.3 s more (duplicates)."""
    out: list[ReadyFile] = []
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if expect is not None and len(out) >= expect:
            deadline = min(deadline, time.monotonic() + 0.3)
            expect = None
        try:
            out.append(q.get(timeout=0.05))
        except queue.Empty:
            pass
    return out


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_chunked_copy_is_handed_over_once_complete(tmp_path: Path, polling: bool) -> None:
    w, q = _watch(tmp_path, polling=polling, polling_interval_s=0.1)
    w.start()
    try:
        data = tiff_bytes(1)
        target = tmp_path / "in" / "B1_slow.tif"
        writer = threading.Thread(target=write_slowly, args=(target, data), kwargs={"pause": 0.2})
        writer.start()
        writer.join()
        got = _drain(q, 3.0, expect=1)
        assert [g.path for g in got] == [target]
        assert got[0].size == len(data)  # only the complete file
        # touching events without a change do not hand it over again
        os.utime(target, ns=(got[0].mtime_ns, got[0].mtime_ns))
        assert _drain(q, 0.6) == []
    finally:
        w.stop()


def test_scan_on_start_moves_patterns_and_exclusions(tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    (inbox / "sub").mkdir(parents=True)
    (inbox / "state").mkdir()
    (inbox / "early.TIF").write_bytes(b"x" * 10)  # present before start; pattern case-insensitive
    (inbox / "sub" / "deep.png").write_bytes(b"y" * 10)
    (inbox / "notes.txt").write_text("no")
    (inbox / ".hidden.tif").write_bytes(b"z")
    (inbox / "state" / "q.tif").write_bytes(b"z")  # the excluded state folder
    w, q = _watch(tmp_path, settle=0.2)
    w.start()
    try:
        got = {g.path.name: g for g in _drain(q, 3.0, expect=2)}
        assert set(got) == {"early.TIF", "deep.png"}
        assert all(g.from_scan for g in got.values())
        # a rename into the folder counts; so does a folder moved in
        outside = tmp_path / "outside.tif"
        outside.write_bytes(b"m" * 5)
        os.rename(outside, inbox / "moved.tif")
        folder = tmp_path / "fold"
        folder.mkdir()
        (folder / "a.tif").write_bytes(b"a")
        (folder / "b.tif").write_bytes(b"b")
        shutil.move(str(folder), str(inbox / "fold"))
        names = sorted(g.path.name for g in _drain(q, 3.0, expect=3))
        assert names == ["a.tif", "b.tif", "moved.tif"]
    finally:
        w.stop()


def test_duplicate_events_collapse_and_requeue(tmp_path: Path) -> None:
    w, q = _watch(tmp_path, settle=0.3)
    w.start()
    try:
        p = tmp_path / "in" / "x.tif"
        p.write_bytes(b"1")
        for _ in range(20):  # event storm on one file
            w.notice(p)
        got = _drain(q, 3.0, expect=1)
        assert len(got) == 1
        w.requeue(p, decode_attempt=1)  # decode retry: handed over again, same state
        again = _drain(q, 3.0, expect=1)
        assert len(again) == 1 and again[0].decode_attempt == 1
    finally:
        w.stop()
