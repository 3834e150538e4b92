"""The demo's embedded configuration, configs/demo.yaml and the generated file agree and load."""

from __future__ import annotations

from pathlib import Path

import yaml

from qcloop.config import load_settings
from qcloop.control import Controller
from qcloop.demo import DEMO_CONFIG, format_row, write_config

REPO = Path(__file__).resolve().parents[2]


def test_configs_demo_yaml_matches_the_embedded_defaults():
    on_disk = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    for key in ("state_dir",):
        on_disk.pop(key)
    on_disk["watch"].pop("directory")
    embedded = {k: v for k, v in DEMO_CONFIG.items()}
    embedded = yaml.safe_load(yaml.safe_dump(embedded))
    embedded["watch"].pop("directory")
    assert on_disk == embedded
    s = load_settings(REPO / "configs" / "demo.yaml", use_env=False)
    Controller(s)  # every rule has a target


def test_generated_config_loads_with_absolute_paths(tmp_path):
    path = write_config(tmp_path, mqtt_host="127.0.0.1", mqtt_port=1999, metrics_port=0, planner="bayes",
                        mode="command")
    s = load_settings(path, use_env=False)
    assert s.watch.directory == tmp_path / "watch" and s.state_dir == tmp_path / "state"
    assert s.control.planner == "bayes" and s.control.mode == "command" and s.mqtt.port == 1999
    Controller(s)


def test_table_row_formatting_handles_missing_values():
    row = {"batch": "B0001", "n_particles": None, "ecd_mean_nm": None, "ecd_ci95_nm": None, "class_fractions": {},
           "silhouette": float("nan"), "verdict": None, "suggestion": "hold: too_few_particles"}
    text = format_row(row)
    assert text.startswith("B0001") and "hold: too_few_particles" in text
