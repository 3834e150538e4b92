"""Safety layer: no suggestion ever leaves the bounds or exceeds max_step (property tests)."""

from __future__ import annotations

import math

import numpy as np

from qcloop.config import SetpointSpec, load_settings
from qcloop.control import Controller
from qcloop.control.safety import apply_safety, safe_value, too_few_particles, uncertain, violations


def _random_spec(rng: np.random.Generator, name: str = "x") -> SetpointSpec:
    lo = float(rng.uniform(-1e3, 1e3)) * 10.0 ** int(rng.integers(-3, 3))
    span = float(rng.uniform(1e-3, 1e3)) * 10.0 ** int(rng.integers(-2, 2))
    step = span * float(rng.choice([1e-3, 0.01, 0.1, 0.5, 1.0, 3.0])) * float(rng.uniform(0.1, 1))
    res = None if rng.random() < 0.6 else span * float(rng.choice([1e-3, 0.01, 0.1, 0.7]))
    return SetpointSpec(name=name, min=lo, max=lo + span, max_step=step, resolution=res)


def test_safe_value_property_random_inputs():
    rng = np.random.default_rng(12345)
    n_moves = 0
    for _ in range(20000):
        spec = _random_spec(rng)
        span = spec.max - spec.min
        # current anywhere, including outside the bounds; proposals wild, including inf/nan
        cur = spec.min + span * float(rng.uniform(-0.5, 1.5))
        kind = rng.random()
        if kind < 0.02:
            want = float(rng.choice([math.inf, -math.inf, math.nan]))
        else:
            want = cur + span * float(rng.normal(0, 3)) * 10.0 ** int(rng.integers(-4, 3))
        v = safe_value(cur, want, spec)
        if v is None:  # only for non-finite wishes or a current value beyond reach of the bounds
            assert not math.isfinite(want) or cur - spec.max_step > spec.max or cur + spec.max_step < spec.min
            continue
        n_moves += 1
        assert spec.min <= v <= spec.max, (spec, cur, want, v)
        assert abs(v - cur) <= spec.max_step, (spec, cur, want, v)
    assert n_moves > 10000  # most cases are reachable: the property is exercised, not skipped


def test_apply_safety_drops_unreachable_and_unknown():
    spec = SetpointSpec(name="t", unit="degC", min=60, max=100, max_step=2)
    out = apply_safety({"t": 110.0}, {"t": 95.0}, [spec])  # 10 above max, one step cannot fix it
    assert out.empty and "outside" in out.notes[0]
    out = apply_safety({"t": 101.0}, {"t": 50.0}, [spec])  # within one step of the bounds: moved inside
    assert [m.suggested for m in out.moves] == [99.0]
    out = apply_safety({}, {"t": 70.0}, [spec])
    assert out.empty and "unknown" in out.notes[0]
    out = apply_safety({"t": 80.0}, {"t": 90.0}, [spec])
    assert out.moves[0].suggested == 82.0 and out.limited == ["t"]
    assert violations(out.moves[0].to_dict(), spec) == []
    assert violations({"current": 80.0, "suggested": 83.0}, spec)  # the checker itself can fail


def test_resolution_rounding_stays_legal():
    spec = SetpointSpec(name="r", min=0.5, max=2.5, max_step=0.2, resolution=0.05)
    v = safe_value(1.01, 1.5, spec)  # 1.21 is the step limit; the largest legal 0.05 multiple is 1.20
    assert v is not None and abs(v - 1.2) < 1e-9
    assert abs(v - 1.01) <= 0.2


def test_hold_predicates():
    assert too_few_particles(10, 30) and too_few_particles(None, 1) and not too_few_particles(30, 30)
    assert uncertain(3.0, 2.5) and not uncertain(2.0, 2.5) and uncertain(math.inf, 2.5)
    assert not uncertain(None, 2.5) and not uncertain(3.0, None)


def test_controller_suggestions_never_leave_bounds_random_campaigns():
    """Random metrics, acks, reactor overrides: every suggestion stays inside bounds and max_step."""
    rng = np.random.default_rng(7)
    n_suggestions = 0
    for trial in range(60):
        planner = "pi" if trial % 6 else "bayes"
        sp = [
            {"name": "a", "min": 0.0, "max": 10.0, "max_step": float(rng.uniform(0.05, 3)), "initial": 5.0},
            {"name": "b", "min": -1.0, "max": 1.0, "max_step": float(rng.uniform(0.01, 0.5)), "initial": 0.0},
        ]
        s = load_settings(use_env=False,
                          targets={"ecd_nm.mean": {"target": 50, "tolerance": 2}, "ecd_nm.cv": {"max": 0.1}},
                          control={"enabled": True, "planner": planner, "cooldown_batches": int(rng.integers(0, 2)),
                                   "setpoints": sp,
                                   "rules": [{"metric": "ecd_nm.mean", "setpoint": "a",
                                              "gain": float(rng.normal(0, 5)), "kp": float(rng.normal(0, 2))},
                                             {"metric": "ecd_nm.cv", "setpoint": "b", "gain": float(rng.normal(0, 50))},
                                             {"metric": "ecd_nm.mean", "setpoint": "b", "gain": float(rng.normal(0, 1))}],
                                   "bayes": {"candidates": 64}})
        specs = {x.name: x for x in s.control.setpoints}
        ctl = Controller(s)
        for k in range(12 if planner == "pi" else 6):
            if rng.random() < 0.2:  # an operator moves a knob, sometimes outside qcloop's bounds
                ctl.on_setpoints({"a": float(rng.uniform(-2, 12)), "b": float(rng.uniform(-1.5, 1.5))}, now=k)
            f = {"n_particles": float(rng.integers(0, 400)), "ecd_nm.mean": float(rng.normal(50, 30)),
                 "ecd_nm.cv": float(abs(rng.normal(0.1, 0.1)))}
            u = {"ecd_nm.mean": float(abs(rng.normal(1, 2))), "ecd_nm.cv": 0.01}
            sugg = ctl.on_batch_closed(f"B{k}", f, u, bool(rng.random() < 0.1), int(f["n_particles"]), now=100.0 * k)
            if sugg is None:
                continue
            n_suggestions += 1
            for m in sugg.message()["setpoints"]:
                assert violations(m, specs[m["name"]]) == [], (m, specs[m["name"]])
                assert m["current"] == ctl.state["pending"]["previous"][m["name"]]
            r = rng.random()
            if r < 0.5:
                ctl.on_ack(sugg.msg_id, "applied", now=100.0 * k + 1)
            elif r < 0.7:
                ctl.on_ack(sugg.msg_id, "rejected", now=100.0 * k + 1)
    assert n_suggestions > 150
