"""Issue 12 item 9: misconfiguration is loud. ``check-config --connect`` exits 2 with the reason
(OpenSSL's for TLS) for six broken broker set-ups, the daemon logs each failed connect with its
reason and counts it, and after a long broker outage results flow within 2 s of its return."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from daemon_helpers import (REPO, Broker, Recorder, free_port, make_certs, outbox_count, start_daemon, stop_process,
                            wait_until, write_config, write_image)

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture(scope="module")
def brokers(tmp_path_factory):
    d = tmp_path_factory.mktemp("tlsbrokers")
    good = make_certs(d / "good")
    other = make_certs(d / "other")  # a CA the daemon does not trust
    wrong_name = make_certs(d / "wrongname", san="DNS:broker.elsewhere.invalid")
    tls = Broker(d / "tls", tls=good, passwords={"qcloop": "right"}).start()
    misnamed = Broker(d / "misnamed", tls=wrong_name).start()
    plain = Broker(d / "plain").start()
    yield {"good": good, "other": other, "wrong_name": wrong_name, "tls": tls, "misnamed": misnamed,
           "plain": plain, "dir": d}
    for b in (tls, misnamed, plain):
        b.stop()


def _cases(b: dict) -> dict[str, tuple[dict, str]]:
    pw = b["dir"] / "pw"
    pw.write_text("right\n")
    bad = b["dir"] / "badpw"
    bad.write_text("wrong\n")
    auth = {"username": "qcloop", "password_file": str(pw)}
    closed = free_port()
    return {
        "no TLS against a TLS port": ({"host": "localhost", "port": b["tls"].port, **auth},
                                      r"closed the connection before CONNACK.*mqtt\.tls"),
        "untrusted CA": ({"host": "localhost", "port": b["tls"].port, "tls": {"ca": str(b["other"]["ca"])}, **auth},
                         r"certificate verify failed: (self[- ]signed|unable to get local issuer)"),
        "host-name mismatch": ({"host": "localhost", "port": b["misnamed"].port,
                                "tls": {"ca": str(b["wrong_name"]["ca"])}},
                               r"certificate verify failed: [Hh]ostname mismatch"),
        "TLS against a plain port": ({"host": "localhost", "port": b["plain"].port, "tls": {"ca": str(b["good"]["ca"])}},
                                     r"TLS to localhost:\d+: .*(plain listener|handshake)"),
        "no listener": ({"host": "127.0.0.1", "port": closed}, r"refused \(no broker listening there"),
        "wrong password": ({"host": "localhost", "port": b["tls"].port, "tls": {"ca": str(b["good"]["ca"])},
                            "username": "qcloop", "password_file": str(bad)},
                           r"(Bad user name or password|Not authorized).*mqtt\.username"),
    }


def _config(tmp: Path, mqtt: dict) -> Path:
    (tmp / "export").mkdir(parents=True, exist_ok=True)
    cfg = write_config(tmp / "qcloop.yaml", watch_dir=tmp / "export", state=tmp / "state", port=1, prefix="qctest/x",
                       mqtt={"reconnect_min_s": 1, "reconnect_max_s": 2, "connect_timeout_s": 3, **mqtt})
    return cfg


def _check(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qcloop", "check-config", str(cfg), "--no-env", *args],
                          capture_output=True, text=True, timeout=60, cwd=str(REPO))


def test_check_config_connect_reports_six_broken_setups(tmp_path: Path, brokers) -> None:
    for name, (mqtt, reason) in _cases(brokers).items():
        cfg = _config(tmp_path / re.sub(r"\W+", "_", name), mqtt)
        r = _check(cfg, "--connect")
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        assert re.search(reason, r.stderr), (name, r.stderr)
    ok = _config(tmp_path / "ok", {"host": "localhost", "port": brokers["tls"].port, "username": "qcloop",
                                   "password_file": str(brokers["dir"] / "pw"), "tls": {"ca": str(brokers["good"]["ca"])}})
    r = _check(ok, "--connect")
    assert r.returncode == 0 and "connected and logged in" in r.stdout, r.stderr


def test_daemon_logs_and_counts_every_failed_connect(tmp_path: Path, brokers) -> None:
    for name, (mqtt, reason) in _cases(brokers).items():
        d = tmp_path / re.sub(r"\W+", "_", name)
        cfg = _config(d, mqtt)
        log = d / "daemon.log"
        proc = start_daemon(cfg, log=log)
        try:
            assert wait_until(lambda: "mqtt: cannot connect:" in log.read_text(), 30), (name, log.read_text()[-2000:])
            line = next(ln for ln in log.read_text().splitlines() if "mqtt: cannot connect:" in ln)
            assert re.search(reason, line), (name, line)
            port = int(re.search(r"metrics on http://127\.0\.0\.1:(\d+)/", log.read_text()).group(1))
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            failures = sum(float(v) for v in re.findall(r"^qcloop_mqtt_connect_failures_total\{[^}]*\} (\S+)$",
                                                        text, re.M))
            assert failures >= 1 and re.search(r"^qcloop_mqtt_connected\{[^}]*\} 0\.0$", text, re.M), name
        finally:
            assert stop_process(proc) == 0, (name, log.read_text()[-2000:])


def test_results_flow_within_2_s_after_a_long_outage(tmp_path: Path, prefix: str) -> None:
    """20 s outage: with doubling back-off alone (1, 2, 4, 8, 16 s) the next attempt would come
    about 11 s after the broker's return; probing the port, the daemon is back at once."""
    broker = Broker(tmp_path / "broker", persistence=True).start()
    watch, state = tmp_path / "export", tmp_path / "state"
    watch.mkdir()
    cfg = write_config(tmp_path / "qcloop.yaml", watch_dir=watch, state=state, port=broker.port, prefix=prefix,
                       mqtt={"host": "127.0.0.1", "port": broker.port, "topic_prefix": prefix,
                             "reconnect_min_s": 1, "reconnect_max_s": 30})
    log = tmp_path / "daemon.log"
    proc = start_daemon(cfg, log=log)
    rec = Recorder(broker.host, broker.port, prefix, persistent=True)  # the broker queues for it meanwhile
    try:
        write_image(watch / "A_000.tif", 0)
        assert rec.wait_for(lambda r: len(r.on("images/result")) == 1, 60), log.read_text()[-3000:]
        broker.stop()
        write_image(watch / "A_001.tif", 1)  # analysed during the outage; its result waits in the outbox
        assert wait_until(lambda: outbox_count(state) >= 1, 30), log.read_text()[-3000:]
        time.sleep(20)
        broker.start()
        t_back = time.monotonic()
        assert wait_until(lambda: outbox_count(state) == 0, 30, interval=0.02), log.read_text()[-3000:]
        took = time.monotonic() - t_back
        print(f"outbox drained (broker acknowledged the result) {took:.2f} s after the broker's return")
        assert took < 2.0, f"{took:.1f} s after the broker returned"
        assert rec.wait_for(lambda r: any(m["name"] == "A_001.tif" for m in r.on("images/result")), 30)
        assert "mqtt: cannot connect: connection to 127.0.0.1" in log.read_text()
        assert stop_process(proc) == 0
    finally:
        rec.close()
        stop_process(proc)
        broker.stop()
