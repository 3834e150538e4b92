"""Every query of the Grafana dashboard against a real Prometheus (Debian's) that scrapes a real
daemon (``python -m qcloop run``, control loop on, a simulated reactor exporting SEM images):
each returns data while the daemon runs, the health row shows DOWN after it stops, and the
alert rules of deploy/prometheus are loaded and evaluate (QcloopDown goes pending).

The queries are read from deploy/grafana/dashboards/qcloop.json, so panels added later are
covered without touching this test."""

from __future__ import annotations

import getpass
import json
import math
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from prom_helpers import (HEALTH_ROW, Prometheus, binary, dashboard, free_port, port_open, queries,
                          substitute, value_text, values)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
BATCHES = 2  # the line starts where the shape target fails: a suggestion follows, the reactor acks it


def _mosquitto(tmp: Path) -> tuple[subprocess.Popen, int]:
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto not installed")
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while not port_open("127.0.0.1", port):
        assert proc.poll() is None and time.time() < deadline, "mosquitto did not start"
        time.sleep(0.05)
    return proc, port


def _daemon_config(tmp: Path, mqtt_port: int, metrics_port: int, line_id: str) -> Path:
    """The demo's configuration (shape targets, both setpoints), with this run's folders and ports."""
    from qcloop.demo.config import MODEL_FILE, demo_config

    cfg = demo_config(tmp, mqtt_host="127.0.0.1", mqtt_port=mqtt_port, metrics_port=metrics_port)
    cfg.update(line_id=line_id)
    (tmp / "watch").mkdir(parents=True, exist_ok=True)
    cfg["mqtt"].update(topic_prefix="qctest/{line_id}", reconnect_min_s=0.2, reconnect_max_s=1.0)
    assert cfg["pipeline"]["classifier"] == str((tmp / MODEL_FILE).resolve())
    path = tmp / "qcloop.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _reactor(tmp: Path, mqtt_port: int, line_id: str):
    """The demo's simulated line (start setpoints off target: a suggestion follows), 2 images a batch."""
    from qcloop.demo.config import IMAGE_SETTINGS, START_SETPOINTS
    from qcloop_adapters.controllers.simulated_reactor import SimulatedReactor

    return SimulatedReactor(host="127.0.0.1", port=mqtt_port, prefix=f"qctest/{line_id}",
                            watch_dir=tmp / "watch", staging_dir=tmp / ".staging", start=START_SETPOINTS,
                            images_per_batch=2, seed=5, **IMAGE_SETTINGS)


def _train_classifier(tmp: Path, reactor, cfg: Path) -> None:
    """The demo's labelling batch -> crops -> qcloop train, so class and separation panels have data."""
    from qcloop.demo.config import LABELLING_IMAGES, MODEL_FILE, START_SETPOINTS
    from qcloop.demo.labelling import train_classifier

    truth = tmp / "labelling" / "truth"
    images = reactor.export_images(reactor.model.batch(START_SETPOINTS, reactor.rng), "LAB",
                                   tmp / "labelling" / "images", seed=99991, n_images=LABELLING_IMAGES,
                                   truth_dir=truth)
    train_classifier(images, truth, tmp / "labelling", cfg, tmp / MODEL_FILE, echo=lambda line: None)


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(400)
def test_every_dashboard_query_returns_data_and_health_shows_down_after_stop(tmp_path: Path):
    binary("prometheus")
    from qcloop.demo.run import wait_online

    mosq, mqtt_port = _mosquitto(tmp_path)
    metrics_port = free_port()
    line_id = f"t{uuid.uuid4().hex[:8]}"
    cfg = _daemon_config(tmp_path, mqtt_port, metrics_port, line_id)
    prom = Prometheus(tmp_path / "prom", f"127.0.0.1:{metrics_port}").start()
    daemon = reactor = None
    try:
        # the rules of deploy/prometheus/alerts.yml are loaded by the shipped prometheus.yml
        loaded = {r["name"] for g in prom.api("rules")["groups"] for r in g["rules"]}
        assert {"QcloopDown", "QcloopBrokerDisconnected", "QcloopOutboxBacklog"} <= loaded, loaded

        reactor = _reactor(tmp_path, mqtt_port, line_id)
        _train_classifier(tmp_path, reactor, cfg)
        since = time.time()
        log = open(tmp_path / "daemon.log", "wb")
        daemon = subprocess.Popen([sys.executable, "-m", "qcloop", "run", "--config", str(cfg)],
                                  stdout=log, stderr=subprocess.STDOUT)
        wait_online("127.0.0.1", mqtt_port, f"qctest/{line_id}", since, daemon, timeout=120)
        prom.wait('up{job="qcloop"}', lambda r: values(r) == [1.0])
        reactor.connect()
        records = [reactor.run_batch(timeout=120) for _ in range(BATCHES)]
        assert all(r.decision is not None for r in records), (tmp_path / "daemon.log").read_text()[-3000:]
        assert any(r.suggestion is not None and r.ack for r in records), "no suggestion was acknowledged"
        # let Prometheus scrape the latest values a few times (rate()/increase() need two samples)
        prom.wait("count(count_over_time(qcloop_control_pending[1m]) >= 3)", lambda r: bool(r))
        time.sleep(3)

        lines = [v for v in prom.api("label/line/values", **{"match[]": "qcloop_info"})]
        selections = [".*"] + [re.escape(v) for v in lines]  # "All", then each line the daemon exports
        empty, no_finite = [], []
        for q in queries():
            for sel in selections:
                res = prom.query(substitute(q.expr, sel))
                name = f"{q.row} / {q.panel} [{q.ref}] line=~{sel!r}: {q.expr}"
                if not res:
                    empty.append(name)
                elif not any(math.isfinite(v) for v in values(res)):
                    no_finite.append(f"{name} -> {values(res)}")
        assert not empty, "dashboard queries without data while the daemon runs:\n" + "\n".join(empty)
        assert not no_finite, "dashboard queries with only NaN/inf values:\n" + "\n".join(no_finite)
        assert len(queries()) >= 25
        # the template variable's own query (label_values(qcloop_info, line)): the line label, when
        # the daemon exports one, is the configured line_id
        assert set(lines) <= {line_id}, lines

        health = [q for q in queries() if q.row == HEALTH_ROW]
        stats = [q for q in health if q.panel_json["type"] == "stat"]
        assert len(stats) >= 4
        for q in stats:  # while it runs: no DOWN anywhere
            texts = [value_text(q.panel_json, v) for v in values(prom.query(substitute(q.expr, ".*")))]
            assert texts and "DOWN" not in texts, (q.panel, texts)
        up_panel = next(q for q in stats if q.panel == "Daemon up")
        assert [value_text(up_panel.panel_json, v) for v in values(prom.query(up_panel.expr))] == ["UP"]

        _stop(daemon)
        prom.wait('up{job="qcloop"}', lambda r: values(r) == [0.0])
        for q in stats:  # stopped: every health stat shows DOWN, none is "No data"
            res = prom.query(substitute(q.expr, ".*"))
            texts = [value_text(q.panel_json, v) for v in values(res)]
            assert texts == ["DOWN"], (q.panel, q.expr, res)
        for q in health:  # the version/config table keeps the last known values
            assert prom.query(substitute(q.expr, ".*")), q.panel
        # the rule engine sees it too: QcloopDown is pending (it fires after its 2 minutes)
        alerts = prom.wait("ALERTS{alertname=\"QcloopDown\"}", lambda r: bool(r), timeout=15)
        assert alerts[0]["metric"]["alertstate"] in ("pending", "firing")
        assert alerts[0]["metric"]["severity"] == "critical"
    finally:
        if reactor is not None:
            reactor.close()
        _stop(daemon)
        prom.stop()
        mosq.terminate()
        mosq.wait(10)


def test_health_panels_are_built_on_up():
    """The health row cannot say "No data" when the daemon is down: every stat there falls back
    to up{job="qcloop"}, and maps the fallback to DOWN."""
    health = [q for q in queries(dashboard()) if q.row == HEALTH_ROW and q.panel_json["type"] == "stat"]
    assert len(health) >= 4
    for q in health:
        assert 'up{job="qcloop"}' in q.expr, q.panel
        texts = {opt.get("text") for m in q.panel_json["fieldConfig"]["defaults"]["mappings"]
                 for opt in m.get("options", {}).values()}
        assert "DOWN" in texts, q.panel
