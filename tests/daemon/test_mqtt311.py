"""``mqtt.protocol: "3.1.1"``: the daemon against the machine's Mosquitto speaking MQTT 3.1.1
(and against amqtt, the demo's last-resort broker, which speaks nothing else).

Image and batch results, the online / offline status and an inbound command, each validated
against its schema by a 3.1.1 Recorder, while a v5 Recorder on the same topics checks that no v5
property arrives (Mosquitto); the Last Will on ``kill -9`` (both brokers); messages amqtt sends on
topics the daemon never subscribed to are dropped; commands sent while the daemon is killed and
restarted are all handled (persistent session, ``clean_session=False``, manual acks after the
ledger commit); ``check-config --connect`` in 3.1.1 with the CONNACK return code of a refused login.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from daemon_helpers import (REPO, Broker, Recorder, clear_retained, forget_session, inbox_handled, paho_client,
                            publish, start_daemon, stop_process, wait_until, write_config, write_image)
from qcloop.config import load_settings
from qcloop.errors import ConfigError

pytestmark = [pytest.mark.broker, pytest.mark.slow]
V311 = "3.1.1"


@pytest.fixture(scope="module")
def amqtt(tmp_path_factory):
    """amqtt started as the demo starts it (MQTT 3.1.1, anonymous clients), for this module."""
    from qcloop.demo.broker import ensure_broker, find_amqtt, free_port

    if not find_amqtt():
        pytest.skip("amqtt not installed (pip install 'qcloop[broker]')")
    handle = ensure_broker("127.0.0.1", free_port(), start="amqtt", workdir=tmp_path_factory.mktemp("amqtt"))
    yield handle
    handle.stop()


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker311(request) -> tuple[str, int, str]:
    """(host, port, kind): the machine's Mosquitto, or amqtt."""
    if request.param == "mosquitto":
        return (*request.getfixturevalue("machine_broker"), "mosquitto")
    h = request.getfixturevalue("amqtt")
    return h.host, h.port, "amqtt"


def _config(tmp: Path, port: int, prefix: str, **mqtt) -> tuple[Path, str]:
    """A 3.1.1 daemon config with a known client id (its session is removed after the test)."""
    watch = tmp / "export"
    watch.mkdir(parents=True, exist_ok=True)
    cid = f"qctest-{uuid.uuid4().hex[:10]}"
    cfg = write_config(tmp / "qcloop.yaml", watch_dir=watch, state=tmp / "state", port=port, prefix=prefix,
                       mqtt={"host": "127.0.0.1", "port": port, "topic_prefix": prefix, "protocol": V311,
                             "client_id": cid, "reconnect_min_s": 0.5, "reconnect_max_s": 1, **mqtt})
    return cfg, cid


def _log(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def test_protocol_setting_is_validated() -> None:
    assert load_settings(use_env=False).mqtt.protocol == "5"
    assert load_settings(use_env=False, mqtt={"protocol": 5}).mqtt.protocol == "5"  # YAML's `protocol: 5`
    assert load_settings(use_env=False, mqtt={"protocol": "3.1.1"}).mqtt.v5 is False
    with pytest.raises(ConfigError, match=r"mqtt\.protocol"):
        load_settings(use_env=False, mqtt={"protocol": "3.1"})


def test_v311_results_status_and_commands_carry_no_v5_properties(tmp_path: Path, broker311, prefix: str) -> None:
    host, port, kind = broker311
    cfg, cid = _config(tmp_path, port, prefix)
    rec = Recorder(host, port, prefix, protocol=V311)  # validates every message against its schema
    # a v5 subscriber must see no content type, expiry, response topic, correlation data (amqtt: no v5 at all)
    rec5 = Recorder(host, port, prefix, content_type=None) if kind == "mosquitto" else None
    log = tmp_path / "daemon.log"
    try:
        write_image(tmp_path / "export" / "A_000.tif", 1)
        proc = start_daemon(cfg, log=log)
        assert rec.wait_for(lambda r: r.on("images/result"), 60), _log(log)
        publish(host, port, f"{prefix}/commands/close-batch", {"batch": "A"}, protocol=V311)
        assert rec.wait_for(lambda r: r.on("batches/result"), 30), _log(log)
        assert stop_process(proc) == 0
        assert rec.wait_for(lambda r: r.on("status") and r.on("status")[-1]["state"] == "offline", 10)
        assert rec.on("images/result")[0]["name"] == "A_000.tif" and rec.on("images/result")[0]["n_particles"] >= 5
        assert rec.on("batches/result")[0]["close_reason"] == "command"
        assert [s["state"] for s in rec.on("status")][-2:] == ["online", "offline"]
        if rec5 is not None:
            assert rec5.wait_for(lambda r: r.on("status") and r.on("status")[-1]["state"] == "offline", 10)
            outbound = [m for m in rec5.received if not m.topic.endswith("close-batch")]
            assert {m.topic.rsplit("/", 1)[-1] for m in outbound} >= {"result", "status"}
            assert all(m.content_type is None and m.expiry is None and m.response_topic is None
                       and m.correlation_data is None for m in outbound), outbound
        text = log.read_text()
        assert f"connected to 127.0.0.1:{port} (session new)" in text and "Traceback" not in text
    finally:
        rec.close()
        if rec5 is not None:
            rec5.close()
        clear_retained(host, port, prefix, protocol=V311)
        forget_session(host, port, cid)


def test_v311_last_will_on_kill_9(tmp_path: Path, broker311, prefix: str) -> None:
    host, port, _ = broker311
    cfg, cid = _config(tmp_path, port, prefix, keepalive_s=5)
    rec = Recorder(host, port, prefix, protocol=V311)
    log = tmp_path / "daemon.log"
    try:
        proc = start_daemon(cfg, log=log)
        assert rec.wait_for(lambda r: any(s["state"] == "online" for s in r.on("status")), 60), _log(log)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert rec.wait_for(lambda r: r.on("status")[-1]["state"] == "offline", 15), rec.on("status")
        will = rec.full("status")[-1]
        assert will.body["cause"] == "connection-lost" and will.body["time"] is None
        # retained: a client that subscribes later learns that the daemon is gone
        late = Recorder(host, port, prefix, protocol=V311)
        try:
            assert late.wait_for(lambda r: r.on("status"), 5)
            assert late.full("status")[-1].retain and late.on("status")[-1]["cause"] == "connection-lost"
        finally:
            late.close()
    finally:
        rec.close()
        clear_retained(host, port, prefix, protocol=V311)
        forget_session(host, port, cid)


def test_messages_on_topics_never_subscribed_to_are_dropped(tmp_path: Path, amqtt, prefix: str) -> None:
    """amqtt 0.12 sends a connecting client every retained message that matches *any* client's
    subscription; the link hands the daemon only what it subscribed to."""
    from prometheus_client import CollectorRegistry

    from qcloop.config import MqttConfig
    from qcloop.daemon.ledger import Ledger
    from qcloop.daemon.metrics import DaemonMetrics
    from qcloop.daemon.mqtt import MqttLink

    rec = Recorder(amqtt.host, amqtt.port, prefix, protocol=V311)  # a subscription on {prefix}/#
    publish(amqtt.host, amqtt.port, f"{prefix}/batches/result", b"{}", retain=True, protocol=V311)
    raw = paho_client(f"raw-{uuid.uuid4().hex[:6]}", V311)
    got_raw: list[str] = []
    raw.on_message = lambda c, u, m: got_raw.append(m.topic)
    raw.on_connect = lambda c, *a: c.subscribe(f"{prefix}/commands/close-batch", qos=1)
    raw.connect(amqtt.host, amqtt.port)
    raw.loop_start()
    led = Ledger(tmp_path / "state")
    got: list = []
    cfg = MqttConfig(host=amqtt.host, port=amqtt.port, protocol=V311)
    link = MqttLink(cfg, client_id=f"t-{uuid.uuid4().hex[:6]}", status_topic=f"{prefix}/status",
                    status_payload=lambda state, cause, will=False: {"state": state},
                    db_path=led.path, on_message=got.append, metrics=DaemonMetrics(CollectorRegistry()))
    link.subscribe(f"{prefix}/commands/close-batch")
    try:
        assert wait_until(lambda: f"{prefix}/batches/result" in got_raw, 10), \
            "amqtt no longer sends unsubscribed retained messages: update qcloop/daemon/mqtt.py's docstring"
        link.start()
        assert link.wait_connected(10)
        publish(amqtt.host, amqtt.port, f"{prefix}/commands/close-batch", b"{}", protocol=V311)
        assert wait_until(lambda: got, 10)
        time.sleep(0.5)
        assert [m.topic for m in got] == [f"{prefix}/commands/close-batch"]
    finally:
        link.stop()
        led.close()
        raw.disconnect()
        raw.loop_stop()
        rec.close(check=False)
        publish(amqtt.host, amqtt.port, f"{prefix}/batches/result", b"", retain=True, protocol=V311)


def test_v311_commands_survive_kill_9(tmp_path: Path, machine_broker, prefix: str) -> None:
    """A persistent 3.1.1 session: 400 close-batch commands flow while the daemon is killed twice;
    the broker redelivers the unacknowledged ones and queues those sent while it is down."""
    host, port = machine_broker
    cfg, cid = _config(tmp_path, port, prefix)
    topic = f"{prefix}/commands/close-batch"
    state, log = tmp_path / "state", tmp_path / "daemon.log"
    acked: list[str] = []
    sender = paho_client(f"cmd-{uuid.uuid4().hex[:6]}", V311)
    sender.connect(host, port)
    sender.loop_start()

    def send() -> None:
        for i in range(400):
            info = sender.publish(topic, json.dumps({"batch": "A", "msg_id": f"c{i:04d}"}), qos=1)
            info.wait_for_publish(30)
            if info.is_published():
                acked.append(f"c{i:04d}")
            time.sleep(0.01)

    try:
        write_image(tmp_path / "export" / "A_000.tif", 2)  # batch A exists: every command names it
        proc = start_daemon(cfg, log=log)
        assert wait_until(lambda: "qcloop.daemon.service: ready" in _log(log), 60), _log(log)
        flow = threading.Thread(target=send, daemon=True)
        flow.start()
        for _ in range(2):
            before = len(inbox_handled(state, topic))
            assert wait_until(lambda: len(inbox_handled(state, topic)) > before + 20, 60), _log(log)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            time.sleep(1.0)  # commands keep coming while it is down
            proc = start_daemon(cfg, log=log)
        flow.join(120)
        assert len(acked) == 400, "the broker acknowledged every command"
        assert wait_until(lambda: inbox_handled(state, topic) >= set(acked), 90), \
            f"{len(set(acked) - inbox_handled(state, topic))} acknowledged commands lost"
        assert stop_process(proc) == 0
        text = log.read_text()
        assert text.count("(session resumed)") >= 2, "the restarts resumed the broker's session"
        assert "Traceback" not in text
    finally:
        sender.disconnect()
        sender.loop_stop()
        clear_retained(host, port, prefix, protocol=V311)
        forget_session(host, port, cid)


def _check(cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qcloop", "check-config", str(cfg), "--no-env", "--connect"],
                          capture_output=True, text=True, timeout=60, cwd=str(REPO))


def test_v311_check_config_connect(tmp_path: Path, machine_broker) -> None:
    cfg, _ = _config(tmp_path / "ok", machine_broker[1], "qctest/x")
    r = _check(cfg)
    assert r.returncode == 0 and "connected and logged in" in r.stdout, r.stderr
    assert "(MQTT 3.1.1)" in r.stdout, r.stdout
    b = Broker(tmp_path / "auth", passwords={"qcloop": "right"}).start()
    try:
        pw = tmp_path / "badpw"
        pw.write_text("wrong\n")
        cfg, _ = _config(tmp_path / "bad", b.port, "qctest/x", username="qcloop", password_file=str(pw))
        r = _check(cfg)
        assert r.returncode == 2, r.stdout
        assert "mqtt (auth): broker refused the connection" in r.stderr, r.stderr
        assert "MQTT 3.1.1 CONNACK return code" in r.stderr and "mqtt.username" in r.stderr, r.stderr
    finally:
        b.stop()
