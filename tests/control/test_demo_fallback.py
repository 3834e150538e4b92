"""``qcloop demo``'s last-resort broker for real: no broker answers, mosquitto is hidden from the
PATH, so the demo starts amqtt on that port and runs the daemon and the simulated line in MQTT
3.1.1 -- two batches round trip (images -> results -> decision -> suggestion -> ack -> new
setpoints), and the broker is stopped afterwards."""

from __future__ import annotations

import pytest
import yaml

from qcloop.demo import broker as demo_broker
from qcloop.demo.broker import free_port, mqtt_answers

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.mark.skipif(not demo_broker.find_amqtt(), reason="amqtt not installed (pip install 'qcloop[broker]')")
@pytest.mark.timeout(600)
def test_demo_falls_back_to_amqtt_and_runs_the_loop_in_mqtt_311(tmp_path, monkeypatch):
    from qcloop.demo.run import run_demo

    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no mosquitto on the PATH
    monkeypatch.setattr(demo_broker, "SBIN_DIRS", "")
    port = free_port()  # nothing answers there
    out = tmp_path / "demo"
    lines: list[str] = []
    res = run_demo(out=out, batches=2, hold=5, images_per_batch=2, mqtt_port=port, start_broker="auto",
                   metrics_port=free_port(), echo=lines.append, progress=False)
    assert res.broker == f"amqtt at 127.0.0.1:{port} (MQTT 3.1.1)" and lines[0] == f"MQTT broker: {res.broker}"
    cfg = yaml.safe_load((out / "qcloop-demo.yaml").read_text())
    assert cfg["mqtt"]["protocol"] == "3.1.1" and cfg["mqtt"]["port"] == port
    assert [r["batch"] for r in res.rows] == ["B0001", "B0002"]
    first, second = res.rows
    assert first["decision"] and second["decision"] and first["n_particles"] > 0
    assert first["suggestion"].endswith("(applied)"), first  # acked by payload msg_id, in 3.1.1
    assert second["setpoints"] != first["setpoints"]  # the line made B0002 with the suggested setpoints
    assert res.violations == []
    log = (out / "daemon.log").read_text()
    assert f"connected to 127.0.0.1:{port}" in log and "Traceback" not in log
    assert (out / "broker" / "amqtt.log").is_file()
    assert not mqtt_answers("127.0.0.1", port, timeout=0.5), "the demo stopped the broker it started"
