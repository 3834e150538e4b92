"""Retention (issue 12 item 10): ledger particle data, image rows, the inbox, quarantine files and
the watcher's seen-set are pruned by age / size / count, a bounded amount per run."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from qcloop.config import WatchConfig
from qcloop.daemon.ledger import Ledger, pack_particles
from qcloop.daemon.quarantine import Quarantine
from qcloop.daemon.watcher import Watcher


def test_ledger_prune_particles_rows_and_inbox(tmp_path: Path) -> None:
    led = Ledger(tmp_path)
    blob = pack_particles(pd.DataFrame({"ecd_nm": np.arange(1000.0)}), None)
    for i in range(10):
        row = led.begin_image(f"/gone/{i}.tif", f"h{i}", 1, 1, "B1")
        led.finish_image(row.id, "done", particles=blob)
    led.touch_batch("B1", time.time())
    led.close_batch("B1", 1, "idle", {}, time.time() - 10)
    for i in range(300):
        led.inbox_add("t", f"k{i}", "handled", time.time() - (100 if i < 50 else 0))
    exists = tmp_path / "still_here.tif"
    exists.write_bytes(b"x")
    keep = led.begin_image(str(exists), "hk", 1, 1, "B1")
    led.finish_image(keep.id, "done")
    now = time.time() + 1
    done = led.prune(particles_before=now, rows_before=now, inbox_before=now - 50, inbox_max_rows=200,
                     limit=4, file_exists=lambda r: os.path.lexists(r.fs_path))
    assert done == {"particles": 4, "rows": 4, "inbox": 4}, "at most `limit` of each kind per run"
    for _ in range(10):
        done = led.prune(particles_before=now, rows_before=now, inbox_before=now - 50, inbox_max_rows=200,
                         limit=100, file_exists=lambda r: os.path.lexists(r.fs_path))
    assert [r.path for r in (led.get_image(keep.id),)] == [str(exists)], "a file still present keeps its row"
    assert led.conn.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 1
    assert led.conn.execute("SELECT COUNT(*) FROM inbox").fetchone()[0] == 200
    led.close()


def test_quarantine_prune_by_age_then_size(tmp_path: Path) -> None:
    q = Quarantine(tmp_path / "q")
    now = time.time()
    for i in range(6):
        src = tmp_path / f"bad{i}.tif"
        src.write_bytes(b"x" * 1000)
        q.put(i + 1, src, {"path": str(src), "reason": "test"})
        for p in q.folder.glob(f"{i + 1:06d}*"):
            os.utime(p, (now - 1000 * (6 - i), now - 1000 * (6 - i)))
    assert len(list(q.folder.iterdir())) == 12
    assert q.prune(max_age_s=2500, max_bytes=1e9, now=now) == 8  # files 1-4 and their reasons
    assert q.prune(max_age_s=1e9, max_bytes=1500, now=now) >= 2
    assert sum(p.stat().st_size for p in q.folder.iterdir()) <= 1500


def test_watcher_forgets_the_least_recently_seen_beyond_seen_max(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    got = []
    w = Watcher(WatchConfig(directory=tmp_path / "in", settle_seconds=0), got.append, seen_max=100)
    for i in range(150):
        w._remember(tmp_path / "in" / f"{i}.tif", (1, 1))
    assert len(w._emitted) == 100 and w.forgotten == 50
    assert tmp_path / "in" / "149.tif" in w._emitted and tmp_path / "in" / "0.tif" not in w._emitted
