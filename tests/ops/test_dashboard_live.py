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
BATCHES = 2  # the line starts 20 % off target: a suggestion follows, the reactor acks it


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
    from qcloop.demo import DEMO_CONFIG

    cfg = json.loads(json.dumps(DEMO_CONFIG))
    cfg.update(line_id=line_id, state_dir=str(tmp / "state"))
    cfg["watch"]["directory"] = str(tmp / "watch")
    (tmp / "watch").mkdir(parents=True, exist_ok=True)
    cfg["mqtt"].update(host="127.0.0.1", port=mqtt_port, topic_prefix="qctest/{line_id}",
                       reconnect_min_s=0.2, reconnect_max_s=1.0)
    cfg["metrics"]["port"] = metrics_port
    path = tmp / "qcloop.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _temperature_for(ecd_nm: float) -> float:
    """Reactor temperature at which the simulated line makes particles of ``ecd_nm`` (bisection)."""
    from qcloop_adapters.controllers.simulated_reactor import ReactorModel

    m, lo, hi = ReactorModel(), 60.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if m.response({"temperature": mid, "reagent_ratio": 1.2}).mean_ecd_nm > ecd_nm else (lo, mid)
    return (lo + hi) / 2


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
    from qcloop.demo import _wait_online
    from qcloop_adapters.controllers.simulated_reactor import SimulatedReactor

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

        since = time.time()
        log = open(tmp_path / "daemon.log", "wb")
        daemon = subprocess.Popen([sys.executable, "-m", "qcloop", "run", "--config", str(cfg)],
                                  stdout=log, stderr=subprocess.STDOUT)
        _wait_online("127.0.0.1", mqtt_port, f"qctest/{line_id}", since, daemon, timeout=120)
        prom.wait('up{job="qcloop"}', lambda r: values(r) == [1.0])
        reactor = SimulatedReactor(host="127.0.0.1", port=mqtt_port, prefix=f"qctest/{line_id}",
                                   watch_dir=tmp_path / "watch", staging_dir=tmp_path / ".staging",
                                   start={"temperature": _temperature_for(60.0), "reagent_ratio": 1.2}, images_per_batch=2,
                                   width_px=448, height_px=352, seed=5).connect()
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
