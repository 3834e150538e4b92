"""Daemon configuration: check-config, field paths in errors, environment overrides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qcloop.cli import main
from qcloop.config import load_settings
from qcloop.errors import ConfigError


def _cfg(tmp_path: Path, text: str) -> Path:
    (tmp_path / "export").mkdir(exist_ok=True)
    p = tmp_path / "qcloop.yaml"
    p.write_text(f"watch:\n  directory: export\nstate_dir: state\n{text}")
    return p


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = _cfg(tmp_path, "batch:\n  key: subfolder\nmqtt:\n  topic_prefix: plant/{line_id}\n")
    assert main(["check-config", str(p), "--no-env"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "plant/line1" in out and "subfolder" in out


@pytest.mark.parametrize("text, path_and_reason", [
    ("watch:\n  setle_seconds: 2\n", r"watch\.setle_seconds: Extra inputs are not permitted"),
    ("watch:\n  settle_seconds: -1\n", r"watch\.settle_seconds: .*greater than or equal to 0"),
    ("batch:\n  key: 'regex:^(?P<lot>\\w+)_'\n", r"batch\.key: .*named group \(\?P<batch>"),
    ("batch:\n  key: 'regex:(['\n", r"batch\.key: .*invalid regular expression"),
    ("batch:\n  key: filename\n", r"batch\.key: .*'regex:<pattern>', 'subfolder' or 'message'"),
    ("mqtt:\n  topic_prefix: 'qcloop/#'\n", r"mqtt\.topic_prefix: .*wildcards"),
    ("mqtt:\n  tls:\n    ca: /nonexistent/ca.crt\n", r"mqtt\.tls\.ca: no such file"),
    ("mqtt:\n  max_inflight: 0\n", r"mqtt\.max_inflight"),
    ("metrics:\n  port: 70000\n", r"metrics\.port.*70000"),
])
def test_check_config_names_field_and_reason(tmp_path: Path, capsys: pytest.CaptureFixture,
                                             text: str, path_and_reason: str) -> None:
    import re

    p = _cfg(tmp_path, text)
    assert main(["check-config", str(p), "--no-env"]) == 2
    err = capsys.readouterr().err
    assert re.search(path_and_reason, err), err


def test_check_config_needs_an_existing_watch_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("watch:\n  directory: nowhere\n")
    assert main(["check-config", str(p), "--no-env"]) == 2
    assert "watch.directory" in capsys.readouterr().err


def test_environment_overrides_nested_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _cfg(tmp_path, "mqtt:\n  host: broker.local\n")
    monkeypatch.setenv("QCLOOP_MQTT__HOST", "10.0.0.5")
    monkeypatch.setenv("QCLOOP_WATCH__POLLING", "true")
    monkeypatch.setenv("QCLOOP_MQTT__PASSWORD", "pw-from-env")
    s = load_settings(p)
    assert s.mqtt.host == "10.0.0.5" and s.watch.polling is True
    assert s.mqtt.password.get_secret_value() == "pw-from-env"
    assert "pw-from-env" not in s.model_dump_json()  # never leaks into logs or the config hash
    monkeypatch.setenv("QCLOOP_MQTT__PORT", "not-a-port")
    with pytest.raises(ConfigError, match=r"mqtt\.port"):
        load_settings(p)


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    p = _cfg(tmp_path, "line_id: fromenv\n")
    monkeypatch.setenv("QCLOOP_CONFIG", str(p))
    assert main(["check-config"]) == 0
    assert "fromenv" in capsys.readouterr().out


@pytest.fixture
def keep_signal_handlers():
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_run_refuses_to_start_without_a_watch_folder(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch, keep_signal_handlers) -> None:
    monkeypatch.delenv("QCLOOP_CONFIG", raising=False)
    p = tmp_path / "c.yaml"
    p.write_text(f"state_dir: {tmp_path / 'state'}\nmqtt:\n  enabled: false\n")
    assert main(["run", "--config", str(p)]) == 2
    assert "watch.directory: required" in capsys.readouterr().err


def test_run_reports_a_busy_metrics_port(tmp_path: Path, capsys: pytest.CaptureFixture,
                                         keep_signal_handlers) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = _cfg(tmp_path, f"mqtt:\n  enabled: false\nmetrics:\n  port: {port}\n")
        assert main(["run", "--config", str(p)]) == 2
    assert re.search(rf"metrics\.port: cannot listen on 127\.0\.0\.1:{port}", capsys.readouterr().err)


@pytest.mark.parametrize("state", ["export", "export/state", "."], ids=["equal", "inside", "above"])
def test_state_dir_inside_or_above_the_watched_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                 keep_signal_handlers, state: str) -> None:
    """Issue 12 item 9: the daemon silently ignored every file; now check-config and start say why."""
    (tmp_path / "export").mkdir()
    p = tmp_path / "c.yaml"
    p.write_text(f"watch:\n  directory: export\nstate_dir: '{state}'\nmqtt:\n  enabled: false\nmetrics:\n  enabled: false\n")
    assert main(["check-config", str(p), "--no-env"]) == 2
    assert re.search(r"state_dir: .* (is|lies (inside|above)) the watched folder", capsys.readouterr().err)
    assert main(["run", "--config", str(p)]) == 2
    assert re.search(r"state_dir: .* (is|lies (inside|above)) the watched folder", capsys.readouterr().err)


def test_unloadable_tls_files_are_named_with_the_openssl_reason(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                keep_signal_handlers) -> None:
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    p = _cfg(tmp_path, "mqtt:\n  tls:\n    ca: ca.crt\nmetrics:\n  enabled: false\n")
    assert main(["check-config", str(p), "--no-env"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"mqtt\.tls\.ca: cannot load .*ca\.crt: .*(pem|base64|no certificate|asn1|nodata)", err, re.I), err
    (tmp_path / "ca.crt").write_text("")
    assert main(["run", "--config", str(p)]) == 2
    assert "mqtt.tls.ca: cannot load" in capsys.readouterr().err
