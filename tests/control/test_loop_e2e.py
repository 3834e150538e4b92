"""End to end: real broker, the real daemon (subprocess ``python -m qcloop run``) and the
simulated line writing synthetic SEM images into the watched folder.

The line here is steered on size alone (no classifier: every particle is of class
``particle``): ECD mean 50 +- 2.5 nm by temperature. The shape-aware demo campaign (classifier,
shape and separation targets, both setpoints) is tests/test_demo.py."""

from __future__ import annotations

import getpass
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from qcloop_adapters.controllers.simulated_reactor import ReactorModel, SimulatedReactor
from qcloop.config import load_settings
from qcloop.control.safety import violations
from qcloop.demo.run import wait_online

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.broker, pytest.mark.slow]

MACHINE = ("127.0.0.1", 1883)
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

#: a size-only line: batches close 1 s after their last image, ECD mean -> temperature
SIZE_LINE = {
    "watch": {"directory": "watch", "settle_seconds": 0.3, "polling": False},
    "batch": {"key": "regex:^(?P<batch>[^_]+)_", "close_after_idle_s": 1.0, "min_particles": 30},
    "targets": {"ecd_nm.mean": {"target": 50.0, "tolerance": 2.5}},
    "mqtt": {"host": "127.0.0.1", "port": 1883},
    "metrics": {"host": "127.0.0.1", "port": 9464},
    "control": {
        "enabled": True, "planner": "pi", "mode": "advisory", "cooldown_batches": 0, "suggestion_ttl_s": 120,
        "setpoints": [{"name": "temperature", "unit": "degC", "min": 60, "max": 100, "max_step": 2.0},
                      {"name": "reagent_ratio", "unit": "", "min": 0.5, "max": 2.5, "max_step": 0.2}],
        "rules": [{"metric": "ecd_nm.mean", "setpoint": "temperature", "gain": 0.4}],
    },
}


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def temperature_for(ecd: float) -> float:
    m, lo, hi = ReactorModel(), 60.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if m.response({"temperature": mid, "reagent_ratio": 1.2}).mean_ecd_nm > ecd else (lo, mid)
    return (lo + hi) / 2


class Line:
    """Daemon subprocess + simulated reactor in tmp_path, on a unique topic prefix."""

    def __init__(self, tmp: Path, host: str, port: int, *, operator: str = "accept", persistent: bool = False,
                 protocol: str = "5", **control):
        self.tmp, self.host, self.port, self.protocol = tmp, host, port, protocol
        self.line_id = f"t{uuid.uuid4().hex[:10]}"
        self.prefix = f"qctest/{self.line_id}"
        self.metrics_port = _free_port()
        cfg = json.loads(json.dumps(SIZE_LINE))
        cfg.update(line_id=self.line_id, state_dir=str(tmp / "state"))
        cfg["watch"]["directory"] = str(tmp / "watch")
        (tmp / "watch").mkdir(parents=True, exist_ok=True)
        cfg["mqtt"].update(host=host, port=port, topic_prefix="qctest/{line_id}", reconnect_min_s=0.2,
                           reconnect_max_s=1.0, protocol=protocol, client_id=f"qcloop-{self.line_id}")
        cfg["metrics"]["port"] = self.metrics_port
        cfg["control"].update(control)
        self.cfg = cfg
        self.cfg_path = tmp / "qcloop.yaml"
        self.cfg_path.write_text(yaml.safe_dump(cfg))
        self.settings = load_settings(self.cfg_path, use_env=False)
        limits = {s["name"]: (s["min"], s["max"]) for s in cfg["control"]["setpoints"]}
        self.reactor = SimulatedReactor(host=host, port=port, prefix=self.prefix, watch_dir=tmp / "watch",
                                        staging_dir=tmp / ".staging", start={"temperature": temperature_for(60.0),
                                                                             "reagent_ratio": 1.2},
                                        limits=limits, operator=operator, images_per_batch=3,
                                        width_px=448, height_px=352, seed=3, persistent_session=persistent,
                                        protocol=protocol)
        self.daemon: subprocess.Popen | None = None

    def start_daemon(self) -> None:
        since = time.time()
        self.log = open(self.tmp / f"daemon-{int(since)}.log", "w")
        self.daemon = subprocess.Popen([sys.executable, "-m", "qcloop", "run", "--config", str(self.cfg_path)],
                                       stdout=self.log, stderr=subprocess.STDOUT)
        wait_online(self.host, self.port, self.prefix, since, self.daemon, timeout=90)
        time.sleep(0.3)
        assert self.daemon.poll() is None, (self.tmp / f"daemon-{int(since)}.log").read_text()[-3000:]

    def stop_daemon(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        self.daemon = None

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def ledger_state(self, key: str):
        """A state value from the ledger, read-only (works while the daemon runs: SQLite WAL)."""
        import sqlite3

        from qcloop.daemon.ledger import LEDGER_FILE

        conn = sqlite3.connect(f"file:{self.tmp / 'state' / LEDGER_FILE}?mode=ro", uri=True, timeout=30)
        try:
            row = conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        finally:
            conn.close()
        return json.loads(row[0]) if row else None

    def wait_state(self, pred, timeout: float = 15.0):
        """Poll the controller state in the ledger until ``pred(state)`` (acks arrive asynchronously)."""
        deadline = time.time() + timeout
        while True:
            st = self.ledger_state("control.state")
            if st is not None and pred(st):
                return st
            assert time.time() < deadline, f"controller state never satisfied the condition: {st}"
            time.sleep(0.2)

    def close(self) -> None:
        self.stop_daemon()
        self.reactor.close()
        if self.protocol != "5":  # a 3.1.1 session never expires: remove the daemon's from the broker
            _forget_session(self.host, self.port, f"qcloop-{self.line_id}")


def _forget_session(host: str, port: int, client_id: str) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=True)
    try:
        c.connect(host, port)
        c.loop_start()
        deadline = time.time() + 5
        while not c.is_connected() and time.time() < deadline:
            time.sleep(0.02)
        c.disconnect()
        c.loop_stop()
    except OSError:
        pass  # the broker is gone, and the session with it


def _metric(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):  # every series also carries line="<line_id>"
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"{name}{labels} not in metrics")


@pytest.fixture()
def machine_broker():
    if not _port_open(*MACHINE):
        pytest.skip("no MQTT broker on 127.0.0.1:1883")
    return MACHINE


@pytest.mark.timeout(240)
def test_pi_loop_reaches_and_holds_target_with_restart_mid_campaign(tmp_path, machine_broker):
    line = Line(tmp_path, *machine_broker)
    specs = {s.name: s for s in line.settings.control.setpoints}
    try:
        line.reactor.connect()
        line.start_daemon()
        recs = []
        for k in range(1, 12):
            if k == 3:  # restart the daemon mid-campaign: the controller continues from the ledger
                # (Prometheus counters live in the process: read them before it goes)
                deadline = time.time() + 10
                while _metric(line.metrics(), "qcloop_suggestion_acks_total", status="applied") < 1:
                    assert time.time() < deadline, "applied acks not counted"
                    time.sleep(0.2)
                text = line.metrics()
                assert _metric(text, "qcloop_suggestions_total", planner="pi") >= 1
                assert _metric(text, "qcloop_suggestion_acks_total", status="accepted") >= 1
                line.stop_daemon()
                before = line.ledger_state("control.state")
                line.start_daemon()
            rec = line.reactor.run_batch(timeout=90)
            assert rec.decision is not None, f"no decision for {rec.batch}; see {tmp_path}"
            recs.append(rec)
            passed = [r.decision["verdict_passed"] for r in recs]
            if len(passed) >= 4 and all(passed[-4:]):
                break
        passed = [r.decision["verdict_passed"] for r in recs]
        first = passed.index(True) + 1
        assert first <= 8, passed
        assert all(passed[first - 1:first + 3]) and len(passed) >= first + 3, passed
        for r in recs:
            if r.decision["verdict_passed"]:
                assert r.suggestion is None and r.decision["action"] == "none"  # quiet on target
            if r.suggestion is not None:
                for sp in r.suggestion["setpoints"]:
                    assert violations(sp, specs[sp["name"]]) == []
        assert line.reactor.violations == []
        suggested = [r for r in recs if r.suggestion is not None]
        assert suggested, "the line started 20 % off target: at least one suggestion expected"
        # the restart kept the controller's memory: what it believed before is what the line used after
        assert before["pending"] is None
        assert before["setpoints"]["temperature"] == pytest.approx(recs[2].setpoints["temperature"])
        assert before["counts"]["suggestions"] >= 1 and "B0002" in before["closed"]
        text = line.metrics()
        assert _metric(text, "qcloop_control_decisions_total", action="none", reason="on_target") >= 3
        # every metric the dashboard's control row queries is on the live endpoint
        dash = json.loads((REPO / "deploy/grafana/dashboards/qcloop.json").read_text())
        rows_y = sorted(r["gridPos"]["y"] for r in dash["panels"] if r["type"] == "row")
        top = next(r["gridPos"]["y"] for r in dash["panels"] if r["type"] == "row" and r["title"].startswith("Control"))
        bottom = next((y for y in rows_y if y > top), float("inf"))
        row = [p for p in dash["panels"] if p["type"] != "row" and top <= p["gridPos"]["y"] < bottom]
        used = {n for p in row for t in p["targets"] for n in re.findall(r"\bqcloop_[A-Za-z0-9_]+", t["expr"])}
        exposed = {ln.split("{")[0].split(" ")[0] for ln in text.splitlines() if ln and not ln.startswith("#")}
        assert len(used) >= 5 and used <= exposed, used - exposed
        # acks travel asynchronously: let the last ones the reactor sent reach the ledger before stopping
        sent = {(m, s) for m, s in line.reactor.acks_sent}
        deadline = time.time() + 15
        while not {(a["msg_id"], a["status"]) for a in (line.ledger_state("control.acks") or [])} >= sent:
            assert time.time() < deadline, "acks the reactor sent never reached the ledger"
            time.sleep(0.2)
    finally:
        line.close()
    state = line.ledger_state("control.state")
    acks = line.ledger_state("control.acks")
    assert state["pending"] is None
    assert state["setpoints"]["temperature"] == pytest.approx(line.reactor.setpoints["temperature"])
    assert {a["status"] for a in acks} >= {"applied"}
    sent = {(m, s) for m, s in line.reactor.acks_sent}
    assert {(a["msg_id"], a["status"]) for a in acks} == sent  # every ack the line sent is in the ledger


@pytest.mark.timeout(300)
def test_reject_silence_expiry_and_broker_outage_keep_state_consistent(tmp_path):
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto not installed")
    port = _free_port()
    (tmp_path / "mosq").mkdir()
    conf = tmp_path / "mosquitto.conf"
    # persistence: the line's session (subscriptions, queued QoS 1 messages) survives the outage
    # started as root, mosquitto would switch to user 'mosquitto' and lose access to tmp_path
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                    f"persistence_location {tmp_path / 'mosq'}/\nuser {getpass.getuser()}\n")

    def broker() -> subprocess.Popen:
        p = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.time()
        while not _port_open("127.0.0.1", port):
            assert p.poll() is None and time.time() - t0 < 10, "mosquitto did not start"
            time.sleep(0.05)
        return p

    mosq = broker()
    line = Line(tmp_path, "127.0.0.1", port, operator="reject", persistent=True, suggestion_ttl_s=15)
    t_start = line.reactor.setpoints["temperature"]
    try:
        line.reactor.connect()
        line.start_daemon()
        # 1. the operator rejects: nothing changes, nothing stays pending
        r1 = line.reactor.run_batch(timeout=90)
        assert r1.suggestion is not None and r1.ack == "rejected"
        st = line.wait_state(lambda st: st["counts"]["acks"]["rejected"] == 1)
        assert st["pending"] is None and st["setpoints"]["temperature"] == pytest.approx(t_start)
        # 2. the operator never answers: the suggestion stays pending, the next batch holds
        line.reactor.operator = "silent"
        r2 = line.reactor.run_batch(timeout=90)
        assert r2.suggestion is not None and r2.ack is None
        r3 = line.reactor.run_batch(timeout=90)
        assert r3.decision["reason"] == "awaiting_ack" and r3.suggestion is None
        # 3. broker outage; meanwhile the silent suggestion expires and the line exports a batch
        mosq.terminate()
        mosq.wait(10)
        from qcloop.control.suggestions import parse_iso

        time.sleep(max(0.0, parse_iso(r2.suggestion["expires_at"]) - time.time()) + 0.5)
        line.reactor.operator = "accept"
        r4 = line.reactor.make_batch()  # images only; its MQTT announcements wait in paho's queue
        deadline = time.time() + 60
        while "B0004" not in (line.ledger_state("control.state") or {}).get("closed", []):
            assert time.time() < deadline, "batch B0004 not closed during the outage"
            time.sleep(0.3)
        st = line.ledger_state("control.state")
        assert st["counts"]["expired_local"] == 1  # the unanswered suggestion expired
        assert st["pending"] is not None and st["pending"]["batch_id"] == "B0004"  # new one, in the outbox
        assert (tmp_path / "mosq" / "mosquitto.db").exists()  # the line's session was saved
        mosq = broker()  # 4. the broker is back: the outbox delivers, the line applies and acks
        line.reactor.wait_for_decision(r4, timeout=60)
        assert r4.suggestion is not None and r4.ack == "applied", (r4.decision, r4.suggestion)
        line.wait_state(lambda st: st["counts"]["acks"]["applied"] >= 1)
        r5 = line.reactor.run_batch(timeout=90)
        assert r5.decision is not None
        assert r5.setpoints["temperature"] == pytest.approx(r4.suggestion["setpoints"][0]["suggested"])
        text = line.metrics()
        assert _metric(text, "qcloop_suggestion_acks_total", status="rejected") == 1
        assert _metric(text, "qcloop_suggestion_acks_total", status="applied") >= 1
    finally:
        line.close()
        if mosq.poll() is None:
            mosq.terminate()
            mosq.wait(10)
    st = line.ledger_state("control.state")
    assert st["counts"]["acks"]["rejected"] == 1 and st["counts"]["expired_local"] == 1
    assert st["pending"] is None or st["pending"]["batch_id"] == "B0005"
    assert st["setpoints"]["temperature"] == pytest.approx(line.reactor.setpoints["temperature"])
    assert line.reactor.setpoints["temperature"] != pytest.approx(t_start)
    assert line.reactor.violations == []


@pytest.mark.timeout(240)
def test_v311_line_acks_suggestions_by_payload_msg_id(tmp_path, machine_broker):
    """``mqtt.protocol: "3.1.1"``, the reactor in 3.1.1: suggestions go out without v5 properties
    (a v5 subscriber sees no expiry, response topic or correlation data), the reactor answers on
    ``{prefix}/suggestions/ack`` with the payload's ``msg_id``, the controller takes the acks."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    line = Line(tmp_path, *machine_broker, protocol="3.1.1")
    seen: list = []
    v5 = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"v5-{line.line_id}", protocol=mqtt.MQTTv5)
    v5.on_message = lambda c, u, m: seen.append(m)
    v5.on_connect = lambda c, *a: c.subscribe(f"{line.prefix}/suggestions", qos=1)
    v5.connect(*machine_broker)
    v5.loop_start()
    try:
        line.reactor.connect()
        line.start_daemon()
        recs = [line.reactor.run_batch(timeout=90) for _ in range(2)]
        assert all(r.decision is not None for r in recs), f"no decision; see {tmp_path}"
        first = recs[0]
        assert first.suggestion is not None and first.ack == "applied", first.decision
        assert recs[1].setpoints["temperature"] == pytest.approx(first.suggestion["setpoints"][0]["suggested"])
        assert line.reactor._reply_to[first.suggestion["msg_id"]] == (None, None)  # 3.1.1: no properties
        st = line.wait_state(lambda st: st["counts"]["acks"]["applied"] >= 1)
        assert st["pending"] is None or st["pending"]["batch_id"] == recs[1].batch
        sent = {(m, s) for m, s in line.reactor.acks_sent}
        deadline = time.time() + 15
        while not {(a["msg_id"], a["status"]) for a in (line.ledger_state("control.acks") or [])} >= sent:
            assert time.time() < deadline, "acks the 3.1.1 reactor sent never reached the ledger"
            time.sleep(0.2)
        assert {s for _, s in sent} >= {"accepted", "applied"}
        assert seen and all(m.properties is None or not any(
            hasattr(m.properties, k) for k in ("MessageExpiryInterval", "ResponseTopic", "CorrelationData",
                                               "ContentType")) for m in seen), [m.properties for m in seen]
        assert _metric(line.metrics(), "qcloop_suggestion_acks_total", status="applied") >= 1
    finally:
        v5.disconnect()
        v5.loop_stop()
        line.close()
    assert line.reactor.violations == []
