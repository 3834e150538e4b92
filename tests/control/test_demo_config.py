"""The demo's embedded configuration, configs/demo.yaml and the generated file agree and load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qcloop.config import load_settings
from qcloop.control import Controller
from qcloop.demo import DEMO_CONFIG, write_config
from qcloop.demo.broker import parse_address
from qcloop.demo.display import format_row

REPO = Path(__file__).resolve().parents[2]


def test_configs_demo_yaml_matches_the_embedded_defaults():
    on_disk = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    on_disk.pop("state_dir")
    on_disk["watch"].pop("directory")
    assert on_disk["pipeline"].pop("classifier").endswith(DEMO_CONFIG["pipeline"]["classifier"])
    embedded = yaml.safe_load(yaml.safe_dump(DEMO_CONFIG))
    embedded["watch"].pop("directory")
    embedded["pipeline"].pop("classifier")
    assert on_disk == embedded
    s = load_settings(REPO / "configs" / "demo.yaml", use_env=False)
    assert set(s.targets) == {"class_fraction.sphere", "ecd_nm.sphere.mean", "silhouette"}
    Controller(s)  # every rule has a target


@pytest.mark.parametrize("planner", ["pi", "bayes"])
def test_generated_config_loads_with_absolute_paths(tmp_path, planner):
    path = write_config(tmp_path, mqtt_host="127.0.0.1", mqtt_port=1999, metrics_port=0, planner=planner,
                        mode="command")
    s = load_settings(path, use_env=False)
    assert s.watch.directory == tmp_path / "watch" and s.state_dir == tmp_path / "state"
    assert s.pipeline.classifier == tmp_path / "model" / "shape-classifier.json"
    assert s.control.planner == planner and s.control.mode == "command" and s.mqtt.port == 1999
    ctl = Controller(s)
    assert {t.metric for t in ctl.terms} == {"ecd_nm.sphere.mean", "class_fraction.sphere", "silhouette"}


def test_table_row_formatting_handles_missing_values():
    row = {"batch": "B0001", "n_particles": None, "class_fractions": {}, "ecd_nm": {}, "ecd_sphere_ci95_nm": None,
           "silhouette": float("nan"), "verdict": None, "suggestion": "hold: too_few_particles"}
    text = format_row(row)
    assert text.startswith("B0001") and "hold: too_few_particles" in text and " nan" not in text


@pytest.mark.parametrize("text, want", [("127.0.0.1:1884", ("127.0.0.1", 1884)), ("broker.lab", ("broker.lab", 1883)),
                                        (":1999", ("127.0.0.1", 1999)), ("[::1]:1883", ("::1", 1883))])
def test_broker_address_parsing(text, want):
    assert parse_address(text) == want


@pytest.mark.parametrize("bad", ["host:", "host:port", "host:70000"])
def test_broker_address_parsing_refuses_garbage(bad):
    with pytest.raises(ValueError):
        parse_address(bad)
