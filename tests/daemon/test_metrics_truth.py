"""Issue 14 item 1 (daemon side): metrics that tell the truth from the first scrape and across a
restart -- every label set pre-created, last-batch gauges restored from the ledger, no duplicate
counts from the start-up scan, one source for the line label."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from daemon_helpers import Recorder, clear_retained, publish, wait_until, write_config, write_image
from qcloop.config import load_settings
from qcloop.daemon.service import Daemon

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _scrape(d: Daemon) -> list:
    text = urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=10).read().decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def _value(samples: list, name: str, **labels: str) -> float | None:
    for s in samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def _start(cfg: Path) -> tuple[Daemon, threading.Thread]:
    d = Daemon(load_settings(cfg, use_env=False), registry=CollectorRegistry())
    t = threading.Thread(target=d.run, name="worker", daemon=True)
    t.start()
    assert d.started.wait(30)
    return d, t


def _stop(d: Daemon, t: threading.Thread) -> None:
    d.request_stop()
    t.join(30)
    assert not t.is_alive()


def test_metrics_are_true_from_the_first_scrape_and_after_a_restart(tmp_path: Path, machine_broker, prefix: str) -> None:
    host, port = machine_broker
    watch, state = tmp_path / "export", tmp_path / "state"
    watch.mkdir()
    cfg = write_config(tmp_path / "qcloop.yaml", watch_dir=watch, state=state, port=port, prefix=prefix,
                       targets={"n_particles": {"min": 1}})
    rec = Recorder(host, port, prefix)
    try:
        d, t = _start(cfg)
        first = _scrape(d)  # before any image
        for kind in ("quarantined", "analysis-failed", "hook-failed", "command-rejected", "batch-metrics-failed",
                     "watch-problem"):
            assert _value(first, "qcloop_errors_total", kind=kind) == 0, kind
        for stage in ("load", "segment", "lobes", "measure", "embed", "classify"):
            assert _value(first, "qcloop_stage_seconds_count", stage=stage) == 0, stage
        assert _value(first, "qcloop_particles_total", **{"class": "particle"}) == 0
        assert _value(first, "qcloop_mqtt_connect_failures_total", reason="tls-verify") == 0
        assert _value(first, "qcloop_inbound_rejected_total", topic="commands/close-batch", reason="too-deep") == 0
        line_ids = {s.labels.get("line") for s in first}
        assert line_ids == {"t1"}, f"every series carries line=<line_id>: {line_ids}"
        assert _value(first, "qcloop_info", line_id="t1") == 1
        for i in range(3):
            write_image(watch / f"A_{i:03d}.tif", i)
        assert rec.wait_for(lambda r: len(r.on("images/result")) == 3, 60)
        publish(host, port, f"{prefix}/commands/close-batch", {"batch": "A"})
        assert rec.wait_for(lambda r: len(r.on("batches/result")) == 1, 30)
        assert wait_until(lambda: _value(_scrape(d), "qcloop_batch_closed_timestamp_seconds") > 0, 10)
        before = {n: _value(_scrape(d), n) for n in ("qcloop_batch_passed", "qcloop_batch_particles",
                                                      "qcloop_batch_images", "qcloop_batch_closed_timestamp_seconds")}
        assert before["qcloop_batch_passed"] == 1 and before["qcloop_batch_images"] == 3
        _stop(d, t)

        d, t = _start(cfg)  # a restart: the scan finds the three done files again
        assert wait_until(lambda: d.watcher is not None and not d.watcher.scanning() and d.queue_depth() == 0, 30)
        time.sleep(1.5)
        after = _scrape(d)
        for name, value in before.items():
            assert _value(after, name) == pytest.approx(value), f"{name} not restored from the ledger"
        assert _value(after, "qcloop_batch_metric", metric="n_particles", **{"class": ""}) == before["qcloop_batch_particles"]
        assert _value(after, "qcloop_images_duplicate_total") == 0, "the start-up scan is not a duplicate event"
        assert _value(after, "qcloop_watch_last_file_timestamp_seconds") > time.time() - 3600
        _stop(d, t)
    finally:
        rec.close()
        clear_retained(host, port, prefix)
