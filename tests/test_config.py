"""Configuration: every shipped YAML example validates; typos fail with the field path."""

from __future__ import annotations

from pathlib import Path

import pytest

from qcloop.config import load_settings
from qcloop.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    settings = load_settings(path, use_env=False)
    assert settings.line_id


def test_typo_names_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pipeline:\n  classical:\n    treshold: otsu\n")
    with pytest.raises(ConfigError, match=r"pipeline\.classical\.treshold"):
        load_settings(cfg, use_env=False)


def test_bad_value_names_the_field_and_value(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mqtt:\n  port: 99999\n")
    with pytest.raises(ConfigError, match=r"mqtt\.port.*99999"):
        load_settings(cfg, use_env=False)


def test_env_overrides_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mqtt:\n  host: from-file\n  port: 1884\n")
    monkeypatch.setenv("QCLOOP_MQTT__HOST", "from-env")
    s = load_settings(cfg)
    assert s.mqtt.host == "from-env"
    assert s.mqtt.port == 1884


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "sub" / "c.yaml"
    cfg.parent.mkdir()
    cfg.write_text("state_dir: state\nbatch:\n  key: 'regex:^(?P<batch>[^_]+)_'\n")
    s = load_settings(cfg, use_env=False)
    assert s.state_dir == tmp_path / "sub" / "state"
    assert s.batch.key.startswith("regex:")


def test_not_a_mapping(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(cfg, use_env=False)


def test_unsafe_yaml_tag_is_rejected(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("line_id: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(cfg, use_env=False)


def test_unknown_target_metric_fails_at_load(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("targets:\n  ecd_nm.maen: {target: 130, tolerance: 5}\n")
    with pytest.raises(ConfigError, match=r"targets\.ecd_nm\.maen: unknown metric"):
        load_settings(cfg, use_env=False)
