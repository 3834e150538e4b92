"""The daemon end to end, in this process (worker on a thread), with the real pipeline, real
folders, real TIFFs and real Mosquitto brokers."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from daemon_helpers import (REPO, Broker, Recorder, by_msg_id, clear_retained, ledger_rows,
                            malformed_files, outbox_count, publish, tiff_bytes,
                            wait_until, write_config, write_image, write_slowly)
from qcloop.config import load_settings
from qcloop.control.hook import ControlMetrics
from qcloop.daemon.outbox import OutMessage
from qcloop.daemon.service import Daemon

pytestmark = [pytest.mark.broker, pytest.mark.slow]


class Running:
    def __init__(self, daemon: Daemon, thread: threading.Thread):
        self.daemon = daemon
        self.thread = thread

    def stop(self, timeout: float = 30) -> None:
        self.daemon.request_stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "daemon did not stop"

    def metrics(self) -> dict[str, list]:
        """Scrape the live endpoint: sample name -> [(labels, value)]."""
        url = f"http://127.0.0.1:{self.daemon.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        out: dict[str, list] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out.setdefault(s.name, []).append((s.labels, s.value))
        return out

    def value(self, name: str, **labels: str) -> float:
        return sum(v for lab, v in self.metrics().get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


@pytest.fixture
def start_daemon(tmp_path: Path):
    running: list[Running] = []

    def _start(config: Path, *, hooks: Callable[[Daemon], None] | None = None, **overrides: Any) -> Running:
        settings = load_settings(config, use_env=False, **overrides)
        d = Daemon(settings, registry=CollectorRegistry())
        if hooks:
            hooks(d)
        t = threading.Thread(target=d.run, name="worker", daemon=True)
        t.start()
        assert d.started.wait(30), "daemon did not start"
        r = Running(d, t)
        running.append(r)
        return r

    yield _start
    for r in running:
        if r.thread.is_alive():
            r.stop()


def _dashboard_exprs() -> list[str]:
    dash = json.loads((REPO / "deploy/grafana/dashboards/qcloop.json").read_text())
    exprs = []

    def walk(panels: list) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


# ----------------------------------------------------------------------------- 50 images
def test_fifty_images_each_published_once_with_batch_results(tmp_path: Path, machine_broker, prefix: str,
                                                             start_daemon) -> None:
    host, port = machine_broker
    watch, state = tmp_path / "export", tmp_path / "state"
    watch.mkdir()
    cfg = write_config(tmp_path / "qcloop.yaml", watch_dir=watch, state=state, port=port, prefix=prefix)
    # five images were exported while the daemon was down
    for i in range(5):
        write_image(watch / f"A_{i:03d}.tif", i)
    rec = Recorder(host, port, prefix)
    try:
        run = start_daemon(cfg)
        for i in range(5, 25):  # the rest of batch A: renamed in, written directly, copied slowly
            if i % 5 == 0:
                write_slowly(watch / f"A_{i:03d}.tif", tiff_bytes(i), chunks=4, pause=0.1)
            elif i % 2:
                write_image(watch / f"A_{i:03d}.tif", i)
            else:
                (watch / f"A_{i:03d}.tif").write_bytes(tiff_bytes(i))
        assert rec.wait_for(lambda r: len(r.on("images/result")) >= 25, 90)
        sub = watch / "day2"  # batch B in a sub-folder, some slow copies
        sub.mkdir()
        for i in range(25, 50):
            if i % 6 == 0:
                write_slowly(sub / f"B_{i:03d}.tif", tiff_bytes(i), chunks=3, pause=0.1)
            else:
                write_image(sub / f"B_{i:03d}.tif", i)
        assert rec.wait_for(lambda r: len(r.on("images/result")) >= 50, 90)
        # duplicate events: touch, rewrite identical bytes, move a file away and back
        os.utime(watch / "A_001.tif")
        (watch / "A_002.tif").write_bytes((watch / "A_002.tif").read_bytes())
        os.rename(sub / "B_030.tif", tmp_path / "B_030.tif")
        os.rename(tmp_path / "B_030.tif", sub / "B_030.tif")
        publish(host, port, f"{prefix}/commands/close-batch", {"batch": "B"})
        assert rec.wait_for(lambda r: {b["batch"] for b in r.on("batches/result")} >= {"A", "B"}, 30)
        time.sleep(1.0)  # room for any (wrong) duplicate to show up

        images = rec.on("images/result")
        assert len(images) == 50, "each image exactly once"
        assert len(by_msg_id(images)) == 50 and len({m["path"] for m in images}) == 50
        assert {m["batch"] for m in images} == {"A", "B"}
        assert all(m["n_particles"] > 0 and m["size"]["ecd_nm"]["mean"] > 0 for m in images)
        batches = {b["batch"]: b for b in rec.on("batches/result")}
        assert batches["A"]["close_reason"] == "new-batch" and batches["A"]["n_images"] == 25
        assert batches["B"]["close_reason"] == "command" and batches["B"]["n_images"] == 25
        assert batches["A"]["n_particles"] == batches["A"]["flat"]["n_particles"] > 0
        assert sum(m["n_particles"] - m["n_border"] for m in images if m["batch"] == "A") \
            == batches["A"]["n_particles"], "batch metrics recomputed from the stored particle tables"
        rows = ledger_rows(state)
        assert len(rows) == 50 and all(r["status"] == "done" and not r["in_progress"] for r in rows)

        # a late image of batch A re-scores A (revision 2) and leaves B alone
        write_image(watch / "A_late.tif", 777)
        assert rec.wait_for(lambda r: any(b["batch"] == "A" and b["revision"] == 2 for b in r.on("batches/result")), 30)
        late = [b for b in rec.on("batches/result") if b["revision"] == 2][0]
        assert late["close_reason"] == "late-image" and late["n_images"] == 26

        # the latest batch result is retained for late subscribers
        rec2 = Recorder(host, port, prefix)
        assert rec2.wait_for(lambda r: len(r.on("batches/result")) >= 1, 5)
        retained = [(t, b, ret) for t, b, ret in rec2.messages if t.endswith("batches/result")]
        assert retained[0][2] is True and retained[0][1]["batch"] == "A" and retained[0][1]["revision"] == 2
        rec2.close()

        # Prometheus: counters match, and every metric the Grafana dashboard queries exists
        assert wait_until(lambda: run.value("qcloop_outbox_messages") == 0, 10)
        m = run.metrics()
        assert run.value("qcloop_images_processed_total") == 51
        assert run.value("qcloop_mqtt_connected") == 1
        assert run.value("qcloop_images_duplicate_total") >= 1
        assert run.value("qcloop_batch_passed") in (0.0, 1.0)
        assert any(lab.get("stage") == "segment" for lab, _ in m["qcloop_stage_seconds_bucket"])
        names = set()
        for expr in _dashboard_exprs():
            names |= set(re.findall(r"\bqcloop_[A-Za-z0-9_]+", expr))
            for label, value in re.findall(r'\b(metric|stage|kind|verdict)="([^"]+)"', expr):
                assert any(lab.get(label) == value for samples in m.values() for lab, _ in samples), \
                    f"dashboard selects {label}={value!r}, which the daemon does not export"
        # the control row's metrics exist only with control.enabled (checked live in
        # tests/control/test_loop_e2e.py); this daemon runs without the controller
        control = CollectorRegistry()
        ControlMetrics(control)
        control_names = {f.name + sfx for f in control.collect() for sfx in ("", "_total")}
        missing = sorted(n for n in names if n not in m and n not in control_names)
        assert not missing, f"dashboard queries metrics the daemon does not export: {missing}"
        assert len(names) >= 15
        run.stop()
        assert rec.wait_for(lambda r: r.on("status")[-1]["state"] == "offline", 10)
        rec.assert_valid()
    finally:
        rec.close()
        clear_retained(host, port, prefix)


# ----------------------------------------------------------------------------- malformed files
def test_malformed_files_are_quarantined_and_good_ones_processed(tmp_path: Path, machine_broker, prefix: str,
                                                                 start_daemon) -> None:
    host, port = machine_broker
    watch, state = tmp_path / "export", tmp_path / "state"
    watch.mkdir()
    cfg = write_config(tmp_path / "qcloop.yaml", watch_dir=watch, state=state, port=port, prefix=prefix,
                       # the polling observer, as on a network share
                       watch={"directory": str(watch), "settle_seconds": 0.2, "decode_retries": 1,
                              "polling": True, "polling_interval_s": 0.2})
    rec = Recorder(host, port, prefix)
    try:
        run = start_daemon(cfg)
        bad = malformed_files(8)[:30]  # 8 zero-byte, 8 truncated, 8 text, 6 absurd headers
        good = 0
        for k, (name, data) in enumerate(bad):
            (watch / name).write_bytes(data)
            if k % 3 == 0:
                write_image(watch / f"G_{k:03d}.tif", k)
                good += 1
        assert rec.wait_for(lambda r: len(r.on("events/error")) >= 30 and len(r.on("images/result")) >= good, 90)
        errors = rec.on("events/error")
        assert len(errors) == 30 and all(e["kind"] == "quarantined" and e["action"] == "moved" for e in errors)
        reasons = {e["path"].rsplit("/", 1)[-1]: e["message"] for e in errors}
        assert set(reasons) == {n for n, _ in bad}
        assert "empty" in reasons["bad_zero0.tif"]
        assert "truncated" in reasons["bad_trunc3.tif"] or "TIFF" in reasons["bad_trunc3.tif"]
        assert "not a recognised image format" in reasons["bad_text0.tif"]
        assert "max_side_px" in reasons["bad_huge0.tif"]
        qdir = state / "quarantine"
        for e in errors:
            q = Path(e["quarantine_path"])
            assert q.parent == qdir and q.exists()
            info = json.loads((qdir / f"{e['image_id']:06d}.reason.json").read_text())
            assert info["reason"] == e["message"] and info["action"] == "moved" and info["file"] == q.name
        assert sorted(p.name for p in watch.iterdir()) == sorted(f"G_{k:03d}.tif" for k in range(0, 30, 3))
        # still alive: one more good image goes through
        write_image(watch / "G_after.tif", 1234)
        assert rec.wait_for(lambda r: len(r.on("images/result")) >= good + 1, 30)
        assert run.thread.is_alive()
        assert run.value("qcloop_images_quarantined_total") == 30
        assert run.value("qcloop_errors_total", kind="quarantined") == 30
        rows = ledger_rows(state)
        assert sum(r["status"] == "quarantined" for r in rows) == 30
        assert sum(r["status"] == "done" for r in rows) == good + 1
        run.stop()
        rec.assert_valid()
    finally:
        rec.close()
        clear_retained(host, port, prefix)


# ----------------------------------------------------------------------------- broker outage
def test_broker_outage_while_images_arrive(tmp_path: Path, prefix: str, start_daemon) -> None:
    """20 images arrive while the broker is down (10 s here; bench/daemon.py --outage 60 runs the
    60 s case: nothing in the daemon depends on the outage's length, the rows wait on disk)."""
    broker = Broker(tmp_path / "broker", persistence=True).start()
    watch, state = tmp_path / "export", tmp_path / "state"
    watch.mkdir()
    cfg = write_config(tmp_path / "qcloop.yaml", watch_dir=watch, state=state, port=broker.port, prefix=prefix,
                       mqtt={"host": "127.0.0.1", "port": broker.port, "topic_prefix": prefix, "max_inflight": 5,
                             "reconnect_min_s": 1, "reconnect_max_s": 1, "keepalive_s": 5})
    rec = Recorder(broker.host, broker.port, prefix, persistent=True)
    try:
        run = start_daemon(cfg)
        for i in range(3):
            write_image(watch / f"A_{i:03d}.tif", i)
        assert rec.wait_for(lambda r: len(r.on("images/result")) >= 3, 60)
        t_down = time.monotonic()
        broker.stop()
        assert wait_until(lambda: run.value("qcloop_mqtt_connected") == 0, 15)
        for i in range(3, 23):
            write_image(watch / f"A_{i:03d}.tif", i)
        assert wait_until(lambda: sum(r["status"] == "done" for r in ledger_rows(state)) == 23, 60)
        assert outbox_count(state) >= 20, "results wait in the durable outbox"
        time.sleep(max(0.0, 10.0 - (time.monotonic() - t_down)))
        broker.start()
        assert rec.wait_for(lambda r: len(by_msg_id(r.on("images/result"))) >= 23, 60)
        images = rec.on("images/result")
        ids = [m["image_id"] for m in images]
        assert list(dict.fromkeys(ids)) == sorted(set(ids)), "backlog delivered in order"
        assert len(by_msg_id(images)) == 23
        assert wait_until(lambda: outbox_count(state) == 0, 15)
        assert run.value("qcloop_mqtt_connected") == 1
        run.stop()
    finally:
        rec.close()
        broker.stop()


# ----------------------------------------------------------------------------- batches by message, hooks
def test_message_batches_hooks_and_subscriptions(tmp_path: Path, machine_broker, prefix: str,
                                                 start_daemon) -> None:
    host, port = machine_broker
    watch, state = tmp_path / "export", tmp_path / "state"
    watch.mkdir()
    cfg = write_config(tmp_path / "qcloop.yaml", watch_dir=watch, state=state, port=port, prefix=prefix,
                       batch={"key": "message", "close_after_idle_s": 5, "min_particles": 5},
                       targets={"n_particles": {"min": 1}})
    seen: dict[str, Any] = {"threads": set(), "events": []}

    def hook(event, ctx):
        seen["threads"].add(threading.current_thread().name)
        seen["events"].append(event)
        n = json.loads(ctx.ledger.get_state("test.count") or "0") + 1
        ctx.ledger.set_state("test.count", json.dumps(n))
        return [OutMessage(ctx.topic("suggestions/test"),
                           {"batch": event.batch, "passed": event.verdict.passed, "n": n})]

    def broken_hook(event, ctx):
        ctx.ledger.set_state("test.broken", json.dumps("must be rolled back"))
        raise RuntimeError("controller bug")

    def on_setpoints(msg, ctx):
        seen["threads"].add(threading.current_thread().name)
        ctx.ledger.set_state("test.setpoints", json.dumps(msg.json()))
        return [OutMessage(ctx.topic("suggestions/echo"), {"got": msg.json()})]

    def install(d: Daemon) -> None:
        d.add_batch_closed_hook(hook)
        d.add_batch_closed_hook(broken_hook)
        d.subscribe("reactor/setpoints", on_setpoints)

    publish(host, port, f"{prefix}/reactor/setpoints", {"temperature_C": 80}, retain=True)
    test_topics = {"type": "object", "required": ["msg_id"]}  # this test's own extension topics
    rec = Recorder(host, port, prefix, extra_schemas={"suggestions/test": test_topics, "suggestions/echo": test_topics})
    try:
        run = start_daemon(cfg, hooks=install)
        assert rec.wait_for(lambda r: len(r.on("suggestions/echo")) == 1, 20), "retained setpoints handled"
        publish(host, port, f"{prefix}/reactor/batch", {"batch": "L1"}, retain=True)
        time.sleep(0.5)
        for i in range(3):
            write_image(watch / f"img_{i}.tif", i)
        assert rec.wait_for(lambda r: len(r.on("images/result")) >= 3, 60)
        publish(host, port, f"{prefix}/reactor/batch", {"batch": "L2"}, retain=True)
        time.sleep(0.5)
        for i in range(3, 6):
            write_image(watch / f"img_{i}.tif", i)
        # L1 closes when the first L2 image arrives; L2 closes after 5 s without images
        assert rec.wait_for(lambda r: [b["batch"] for b in r.on("batches/result")] == ["L1", "L2"], 60)
        b1, b2 = rec.on("batches/result")
        assert b1["close_reason"] == "new-batch" and b2["close_reason"] == "idle"
        assert b1["n_images"] == 3 and b2["n_images"] == 3
        assert [m["batch"] for m in rec.on("images/result")] == ["L1"] * 3 + ["L2"] * 3
        assert rec.wait_for(lambda r: len(r.on("suggestions/test")) == 2, 10)
        assert [s["n"] for s in rec.on("suggestions/test")] == [1, 2]
        assert seen["threads"] == {"worker"}, "hooks and handlers run on the worker thread"
        assert seen["events"][0].flat["n_particles"] > 0 and seen["events"][0].sufficient
        def hook_errors(r: Recorder) -> list:
            return [e for e in r.on("events/error") if e["kind"] == "hook-failed"]

        assert rec.wait_for(lambda r: len(hook_errors(r)) == 2, 10)
        assert "controller bug" in hook_errors(rec)[0]["message"]
        # bad commands are reported, not fatal
        publish(host, port, f"{prefix}/commands/close-batch", b"{not json")
        assert rec.wait_for(lambda r: any(e["kind"] == "command-rejected" for e in r.on("events/error")), 10)
        run.stop()
        from qcloop.daemon.ledger import Ledger

        led = Ledger(state)
        assert json.loads(led.get_state("test.count")) == 2
        assert led.get_state("test.broken") is None, "a failing hook's writes are rolled back"
        assert json.loads(led.get_state("test.setpoints")) == {"temperature_C": 80}
        led.close()
        rec.assert_valid()
    finally:
        rec.close()
        clear_retained(host, port, prefix)
        publish(host, port, f"{prefix}/reactor/setpoints", b"", retain=True)
