"""Shared builders for the control tests."""

from __future__ import annotations

from typing import Any

from qcloop.config import Settings, load_settings


def settings(planner: str = "pi", *, cooldown: int = 0, mode: str = "advisory", ttl: float = 900.0,
             min_particles: int = 30, **control: Any) -> Settings:
    """One-setpoint line: ECD mean 50 ± 2.5 nm steered by temperature (0.4 degC per nm)."""
    cfg: dict[str, Any] = {
        "enabled": True, "planner": planner, "mode": mode, "cooldown_batches": cooldown,
        "suggestion_ttl_s": ttl, "min_particles": min_particles,
        "setpoints": [{"name": "temperature", "unit": "degC", "min": 60, "max": 100, "max_step": 2.0,
                       "initial": 76.0}],
        "rules": [{"metric": "ecd_nm.mean", "setpoint": "temperature", "gain": 0.4}],
    }
    cfg.update(control)
    return load_settings(use_env=False, targets={"ecd_nm.mean": {"target": 50.0, "tolerance": 2.5}}, control=cfg)


def two_setpoint_settings(planner: str = "bayes", **bayes: Any) -> Settings:
    """Two setpoints, ECD mean 40 ± 2 nm and sphere fraction >= 0.85 (the bench's problem)."""
    return load_settings(
        use_env=False,
        targets={"ecd_nm.mean": {"target": 40.0, "tolerance": 2.0}, "class_fraction.sphere": {"min": 0.85}},
        control={
            "enabled": True, "planner": planner, "cooldown_batches": 0,
            "setpoints": [{"name": "temperature", "unit": "degC", "min": 65, "max": 95, "max_step": 4.0},
                          {"name": "reagent_ratio", "unit": "", "min": 0.6, "max": 2.0, "max_step": 0.25}],
            "rules": [{"metric": "ecd_nm.mean", "setpoint": "temperature", "gain": 0.4}],
            "bayes": {"objective": {"ecd_nm.mean": 1.0, "class_fraction.sphere": 1.0}, **bayes},
        })


def flat(ecd: float, n: int = 200, hw: float = 0.8) -> tuple[dict[str, float], dict[str, float]]:
    return {"n_particles": float(n), "ecd_nm.mean": float(ecd)}, {"ecd_nm.mean": float(hw)}
