"""Issue 12 item 5: inbound commands are acknowledged only after the ledger commit, in a
persistent session, so five kill -9 while 3 000 commands flow lose none the broker accepted."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from daemon_helpers import (Broker, Recorder, inbox_handled, start_daemon, stop_process, wait_until, write_config,
                            write_image)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

N_COMMANDS = 3000
N_KILLS = 5


class Sender(threading.Thread):
    """Publishes the commands one by one (QoS 1); ``acked`` holds those the broker acknowledged."""

    def __init__(self, host: str, port: int, topic: str):
        super().__init__(daemon=True)
        self.topic = topic
        self.acked: list[str] = []
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"cmd-{uuid.uuid4().hex[:6]}",
                             protocol=MQTTProtocolVersion.MQTTv5)
        self.c.connect(host, port)
        self.c.loop_start()

    def run(self) -> None:
        for i in range(N_COMMANDS):
            msg_id = f"cmd-{i:05d}"
            info = self.c.publish(self.topic, json.dumps({"batch": "A", "msg_id": msg_id}), qos=1)
            info.wait_for_publish(30)
            if info.is_published():
                self.acked.append(msg_id)
            if i % 50 == 0:
                time.sleep(0.05)  # a steady flow, not one burst

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_item5_kill_9_five_times_while_3000_commands_flow_loses_none(tmp_path: Path, prefix: str) -> None:
    broker = Broker(tmp_path / "broker", extra=["max_queued_messages 100000", "max_inflight_messages 100"]).start()
    watch, state = tmp_path / "export", tmp_path / "state"
    watch.mkdir()
    cfg = write_config(tmp_path / "qcloop.yaml", watch_dir=watch, state=state, port=broker.port, prefix=prefix,
                       mqtt={"host": "127.0.0.1", "port": broker.port, "topic_prefix": prefix,
                             "reconnect_min_s": 0.5, "reconnect_max_s": 1, "session_expiry_s": 600})
    topic = f"{prefix}/commands/close-batch"
    log = tmp_path / "daemon.log"
    rec = Recorder(broker.host, broker.port, prefix)
    sender = Sender(broker.host, broker.port, topic)
    rng = random.Random(12)
    try:
        write_image(watch / "A_000.tif", 0)  # batch A exists: every command names it
        proc = start_daemon(cfg, log=log)
        assert rec.wait_for(lambda r: r.on("images/result"), 60), log.read_text()[-3000:]
        sender.start()
        kills = 0
        while kills < N_KILLS:
            before = len(inbox_handled(state, topic))
            # kill at a random moment once this run has handled some commands
            assert wait_until(lambda: len(inbox_handled(state, topic)) > before + 20, 60), log.read_text()[-3000:]
            time.sleep(rng.uniform(0.0, 0.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            kills += 1
            time.sleep(rng.uniform(0.0, 1.0))  # commands keep coming while it is down
            proc = start_daemon(cfg, log=log)
        sender.join(300)
        assert not sender.is_alive()
        acked = set(sender.acked)
        assert len(acked) == N_COMMANDS, "the broker acknowledged every command"
        assert wait_until(lambda: inbox_handled(state, topic) >= acked, 180), \
            f"{len(acked - inbox_handled(state, topic))} acknowledged commands lost"
        assert wait_until(lambda: log.read_text().count("qcloop.daemon.service: ready") == N_KILLS + 1, 60)
        assert stop_process(proc) == 0
        handled = inbox_handled(state, topic)
        assert handled == acked
        batches = rec.on("batches/result")
        assert len({b["msg_id"] for b in batches}) == 1, "batch A closed once, by the first command"
        assert "Traceback" not in log.read_text()
    finally:
        sender.close()
        rec.close()
        broker.stop()
