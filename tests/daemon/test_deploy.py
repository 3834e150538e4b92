"""deploy/: the systemd unit verifies, the Mosquitto config runs with TLS + ACL, the Prometheus
and Grafana files are consistent. (That every metric the dashboard queries exists on the live
endpoint is checked in test_daemon_e2e.py, on a daemon that has processed images.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from daemon_helpers import REPO, Broker, Recorder, free_port, wait_until
from qcloop.config import MetricsConfig, MqttConfig
from qcloop.control.hook import ControlMetrics
from qcloop.daemon.ledger import Ledger
from qcloop.daemon.metrics import DaemonMetrics
from qcloop.daemon.mqtt import MqttLink
from qcloop.daemon.outbox import OutMessage

DEPLOY = REPO / "deploy"


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    if not Path(exe).exists():
        pytest.skip("systemd-analyze not installed")
    text = (DEPLOY / "qcloop.service").read_text()
    for key in ("Type=notify", "WatchdogSec=", "NoNewPrivileges=true", "ProtectSystem=strict",
                "ReadWritePaths=/var/lib/qcloop", "ReadOnlyPaths=/srv/sem-export", "User=qcloop"):
        assert key in text, key
    # the unit names the installed entry point; point it at this checkout's for the check
    qcloop_bin = Path(sys.executable).parent / "qcloop"
    unit = tmp_path / "qcloop.service"
    unit.write_text(text.replace("/opt/qcloop/venv/bin/qcloop", str(qcloop_bin)))
    r = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and ("Failed to" in r.stderr and "bus" in r.stderr.lower()):
        pytest.skip(f"systemd-analyze cannot run in this container: {r.stderr.strip()[:200]}")
    # unknown keys and bad values are only warnings: any output is a failure
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stderr + r.stdout
    # the verifier does catch mistakes (so a clean pass means something)
    bad = tmp_path / "bad.service"
    bad.write_text(unit.read_text().replace("Type=notify", "Type=notifyy"))
    r = subprocess.run([exe, "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert "notifyy" in r.stderr


def test_prometheus_and_grafana_files_agree() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "qcloop"]
    target = job["static_configs"][0]["targets"][0]
    assert target == f"{MetricsConfig().host}:{MetricsConfig().port}", "scrape target = default endpoint"
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    uid = ds["datasources"][0]["uid"]
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/qcloop.yaml").read_text())
    assert prov["providers"][0]["type"] == "file"
    dash = json.loads((DEPLOY / "grafana/dashboards/qcloop.json").read_text())
    assert dash["uid"] and dash["panels"]
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == uid, p["title"]
        for t in p["targets"]:
            assert "qcloop_" in t["expr"], t["expr"]
    # the metric names the dashboard uses are exported by DaemonMetrics (histograms/counters
    # with their exposition suffixes); the live check is in test_daemon_e2e.py
    exported = {m.name for m in DaemonMetrics(CollectorRegistry()).registry.collect()}
    control = CollectorRegistry()
    ControlMetrics(control)  # the control row's metrics (registered when control.enabled)
    exported |= {m.name for m in control.collect()}
    used = set(re.findall(r"\bqcloop_[A-Za-z0-9_]+", json.dumps(dash)))
    base = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert base <= exported, base - exported


def test_mosquitto_config_tls_password_and_acl(tmp_path: Path, certs: dict, prefix: str) -> None:
    """Run deploy/mosquitto/mosquitto.conf (paths and port rewritten) and check TLS, passwords
    and the ACL with real clients: the daemon may publish its results but not the reactor's
    acknowledgements; the monitor may read everything."""
    conf = (DEPLOY / "mosquitto/mosquitto.conf").read_text()
    port = free_port()
    work = tmp_path / "m"
    work.mkdir()
    passwd = work / "passwd"
    passwd.write_text("")
    for user, pw in (("qcloop", "q-pw"), ("reactor", "r-pw"), ("monitor", "m-pw")):
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, pw], check=True, capture_output=True)
    acl = (DEPLOY / "mosquitto/acl").read_text()
    (work / "acl").write_text(acl)
    conf = (conf.replace("listener 8883", f"listener {port} 127.0.0.1")
            .replace("/etc/mosquitto/certs/ca.crt", str(certs["ca"]))
            .replace("/etc/mosquitto/certs/server.crt", str(certs["cert"]))
            .replace("/etc/mosquitto/certs/server.key", str(certs["key"]))
            .replace("/etc/mosquitto/qcloop.passwd", str(passwd))
            .replace("/etc/mosquitto/qcloop.acl", str(work / "acl"))
            .replace("persistence_location /var/lib/mosquitto/", f"persistence_location {work}/"))
    settings = [ln for ln in conf.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert not any("/etc/" in ln or "/var/" in ln for ln in settings), settings
    import getpass

    conf += f"\nuser {getpass.getuser()}\nlog_dest stderr\n"
    b = Broker(work)
    b.port = port
    b.conf.write_text(conf)
    b.start()
    line = "qcloop/line1"
    try:
        mon = Recorder("localhost", port, line, username="monitor", password="m-pw", tls_ca=certs["ca"])
        pw = tmp_path / "pw"
        pw.write_text("q-pw\n")
        metrics = DaemonMetrics(CollectorRegistry())
        led = Ledger(tmp_path / "state")
        link = MqttLink(MqttConfig(host="localhost", port=port, username="qcloop", password_file=pw,
                                   tls={"ca": certs["ca"]}),
                        client_id=f"acl-{uuid.uuid4().hex[:6]}", status_topic=f"{line}/status",
                        status_payload=lambda s, c, will=False: {"state": s}, db_path=led.path,
                        on_message=lambda m: None,
                        metrics=metrics)
        led.add_message(OutMessage(f"{line}/suggestions/ack", {"msg_id": "denied"}),
                        OutMessage(f"{line}/images/result", {"msg_id": "allowed"}))
        link.start()
        assert link.wait_connected(10), link.last_connect_error
        link.notify()
        assert mon.wait_for(lambda r: len(r.on("images/result")) == 1, 10)
        assert wait_until(lambda: led.outbox_count() == 0, 10), "refused message is not retried forever"
        assert mon.on("suggestions/ack") == [], "the ACL keeps the daemon off the reactor's topics"
        # MQTT v5: Mosquitto answers the denied publish with PUBACK 0x87 (not authorised)
        assert metrics.mqtt_rejected._value.get() == 1 and metrics.mqtt_published._value.get() == 1
        assert mon.on("status")[-1] == {"state": "online"}
        link.stop()
        led.close()
        mon.close(check=False)  # placeholder payloads: this test is about the ACL, not the contracts
        # no anonymous access, no plain-text listener
        with pytest.raises(RuntimeError):
            Recorder("localhost", port, line, tls_ca=certs["ca"], timeout=3)
    finally:
        b.stop()
