"""The controller state machine, PI rules and messages, without MQTT (plain function calls)."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from qcloop_adapters.controllers.simulated_reactor import ReactorModel, simulate_campaign
from qcloop.config import load_settings
from qcloop.control import Controller, parse_ack
from qcloop.control.pi import evaluate_rules, outside_probability
from qcloop.control.suggestions import ack_message, load_schema
from qcloop.errors import ConfigError

from .helpers import flat, settings


def temperature_for(model: ReactorModel, ecd: float) -> float:
    lo, hi = 60.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if model.response({"temperature": mid}).mean_ecd_nm > ecd:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def close(ctl, k, ecd, *, n=200, hw=0.8, passed=None, now=None):
    f, u = flat(ecd, n, hw)
    if passed is None:
        passed = abs(ecd - 50.0) <= 2.5
    return ctl.on_batch_closed(f"B{k:03d}", f, u, passed, n, now=100.0 * k if now is None else now)


# ----------------------------------------------------------------------------- PI behaviour
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pi_brings_ecd_from_20_percent_off_into_tolerance(seed):
    s = settings("pi")
    model = ReactorModel()
    start = {"temperature": temperature_for(model, 60.0)}  # 20 % above the 50 nm target
    steps = simulate_campaign(s, model, start, 14, seed)
    ok = [st.passed for st in steps]
    first = ok.index(True) + 1
    assert first <= 8
    assert all(ok[first - 1:first + 3]), ok  # and held for 3 more batches
    for st in steps:
        if st.passed:
            assert st.suggested == {}  # suggestions stop while the target is met
    spec = s.control.setpoints[0]
    for a, b in zip(steps, steps[1:]):
        assert abs(b.setpoints["temperature"] - a.setpoints["temperature"]) <= spec.max_step
        assert spec.min <= b.setpoints["temperature"] <= spec.max


def test_rule_direction_deadband_and_gain():
    s = settings("pi", cooldown=0)
    ctl = Controller(s)
    sugg = close(ctl, 1, 53.0)  # 3 nm above target, outside ±2.5: +0.4 degC/nm -> +1.2 degC
    assert sugg is not None
    (m,) = sugg.moves
    assert m.name == "temperature" and m.current == 76.0 and m.suggested == pytest.approx(77.2)
    assert sugg.reason["metric"] == "ecd_nm.mean" and sugg.reason["observed"] == 53.0
    ctl.on_ack(sugg.msg_id, "applied", now=101)
    assert ctl.current["temperature"] == pytest.approx(77.2)
    assert close(ctl, 2, 52.4, passed=False) is None  # inside the deadband (tolerance) -> in_band
    assert ctl.last_decision.reason == "in_band" and ctl.last_decision.action == "none"
    sugg = close(ctl, 3, 40.0)  # 10 nm below: wants -4 degC, clipped to max_step 2
    assert sugg.moves[0].delta == pytest.approx(-2.0)
    assert "temperature" in sugg.details["limited_by_safety"]


def test_on_target_stops_suggestions_even_outside_a_rule_deadband():
    ctl = Controller(settings("pi", cooldown=0))
    assert close(ctl, 1, 49.0, passed=True) is None
    assert ctl.last_decision.reason == "on_target"
    assert ctl.state["on_target_streak"] == 1


def test_holds_too_few_particles_and_uncertain():
    ctl = Controller(settings("pi", cooldown=0))
    assert close(ctl, 1, 60.0, n=10) is None
    assert ctl.last_decision.reason == "too_few_particles"
    assert close(ctl, 2, 60.0, hw=3.0) is None  # 95 % half-width 3 nm > tolerance 2.5 nm
    assert ctl.last_decision.reason == "uncertain"
    assert close(ctl, 3, 60.0, hw=1.0) is not None
    assert ctl.state["counts"]["holds"] == {"too_few_particles": 1, "uncertain": 1}


def test_cooldown_counts_batches_after_a_change():
    ctl = Controller(settings("pi", cooldown=2))
    s1 = close(ctl, 1, 60.0)
    ctl.on_ack(s1.msg_id, "applied", now=101)
    assert close(ctl, 2, 60.0) is None and ctl.last_decision.reason == "cooldown"
    assert close(ctl, 3, 60.0) is None and ctl.last_decision.reason == "cooldown"
    assert close(ctl, 4, 60.0) is not None


def test_anti_windup_no_accumulation_while_saturated():
    ctl = Controller(settings("pi", cooldown=0))
    for k in range(1, 40):  # far too large for ever: temperature runs to max and stays there
        sugg = close(ctl, k, 90.0)
        if sugg is not None:
            ctl.on_ack(sugg.msg_id, "applied", now=100.0 * k + 1)
    assert ctl.current["temperature"] == 100.0
    assert ctl.last_decision.reason == "at_limit"
    sugg = close(ctl, 40, 44.0)  # error flips sign: the very next suggestion goes down
    assert sugg is not None and sugg.moves[0].delta < 0


def test_proportional_term_uses_change_of_error():
    s = settings("pi", cooldown=0, rules=[{"metric": "ecd_nm.mean", "setpoint": "temperature", "gain": 0.1,
                                           "kp": 0.5}])
    ctl = Controller(s)
    s1 = close(ctl, 1, 56.0)  # no previous error: 0.1 * 6
    assert s1.moves[0].delta == pytest.approx(0.6)
    ctl.on_ack(s1.msg_id, "rejected", now=101)
    s2 = close(ctl, 2, 58.0)  # 0.1 * 8 + 0.5 * (8 - 6)
    assert s2.moves[0].delta == pytest.approx(1.8)


def test_min_max_target_error_is_distance_to_violated_limit():
    s = load_settings(use_env=False, targets={"ecd_nm.cv": {"max": 0.10}},
                      control={"enabled": True, "cooldown_batches": 0,
                               "setpoints": [{"name": "r", "min": 0, "max": 2, "max_step": 0.5, "initial": 1}],
                               "rules": [{"metric": "ecd_nm.cv", "setpoint": "r", "gain": -2.0}]})
    (ev,) = evaluate_rules(s.control.rules, s.targets, {"ecd_nm.cv": 0.15}, {"ecd_nm.cv": 0.01}, {})
    assert ev.status == "act" and ev.error == pytest.approx(0.05) and ev.reference == 0.10
    assert ev.delta == pytest.approx(-0.1)
    (ev,) = evaluate_rules(s.control.rules, s.targets, {"ecd_nm.cv": 0.08}, {}, {})
    assert ev.status == "in_band" and ev.error == 0.0


def test_outside_probability():
    assert outside_probability(50.0, 0.0, 47.5, 52.5) == 0.0
    assert outside_probability(55.0, 1.96, 47.5, 52.5) == pytest.approx(0.9938, abs=1e-3)
    assert outside_probability(52.5, 1.0, 47.5, 52.5) == pytest.approx(0.5, abs=1e-6)
    assert outside_probability(50.0, None, 47.5, 52.5) is None


# ----------------------------------------------------------------------------- life cycle
def test_reject_leaves_setpoints_and_allows_a_new_suggestion():
    ctl = Controller(settings("pi", cooldown=1))
    s1 = close(ctl, 1, 60.0)
    assert close(ctl, 2, 60.0) is None and ctl.last_decision.reason == "awaiting_ack"
    assert ctl.on_ack(s1.msg_id, "rejected", now=201) == "matched"
    assert ctl.current["temperature"] == 76.0 and ctl.pending is None
    assert ctl.state["cooldown_left"] == 0  # nothing changed: no cooldown
    s3 = close(ctl, 3, 60.0)
    assert s3 is not None and s3.moves[0].current == 76.0
    assert ctl.state["counts"]["acks"]["rejected"] == 1


def test_never_acked_suggestion_expires_then_late_ack_is_harmless():
    ctl = Controller(settings("pi", cooldown=1, ttl=150.0))
    s1 = close(ctl, 1, 60.0, now=100.0)
    assert close(ctl, 2, 60.0, now=200.0) is None and ctl.last_decision.reason == "awaiting_ack"
    s3 = close(ctl, 3, 60.0, now=300.0)  # expired at 250: a fresh suggestion from the same current value
    assert s3 is not None and s3.moves[0].current == 76.0
    assert ctl.state["counts"]["expired_local"] == 1
    assert ctl.on_ack(s1.msg_id, "expired", now=310.0) == "late"
    assert ctl.pending["msg_id"] == s3.msg_id  # the late ack did not touch the new pending one
    assert ctl.on_ack("nonsense", "applied", now=311.0) == "unknown"
    assert ctl.current["temperature"] == 76.0


def test_late_applied_ack_updates_setpoints_and_starts_cooldown():
    ctl = Controller(settings("pi", cooldown=1, ttl=50.0))
    s1 = close(ctl, 1, 60.0, now=100.0)
    assert ctl.tick(now=151.0) and ctl.pending is None
    assert ctl.on_ack(s1.msg_id, "applied", now=160.0) == "late"
    assert ctl.current["temperature"] == s1.moves[0].suggested
    assert ctl.state["cooldown_left"] == 1


def test_setpoints_equal_to_pending_resolve_it_without_ack():
    ctl = Controller(settings("pi", cooldown=1))
    s1 = close(ctl, 1, 60.0)
    ctl.on_setpoints({"setpoints": {"temperature": s1.moves[0].suggested}}, now=150)
    assert ctl.pending is None and ctl.state["counts"]["implicit_applied"] == 1
    assert ctl.state["cooldown_left"] == 1


def test_first_reactor_values_do_not_start_cooldown_but_operator_changes_do():
    ctl = Controller(settings("pi", cooldown=2))
    ctl.on_setpoints({"setpoints": {"temperature": 70.0, "stirring": 300}}, now=1)
    assert ctl.current == {"temperature": 70.0} and ctl.state["cooldown_left"] == 0
    ctl.on_setpoints({"temperature": 71.0}, now=2)  # flat form; an operator turned the knob
    assert ctl.state["cooldown_left"] == 2 and ctl.state["last_change"]["msg_id"] is None


def test_stale_batch_made_with_old_setpoints_is_not_acted_on():
    ctl = Controller(settings("pi", cooldown=0))
    ctl.on_batch_started("B002", {"temperature": 76.0})  # already started when B001's suggestion came
    s1 = close(ctl, 1, 60.0)
    ctl.on_ack(s1.msg_id, "applied", now=101)
    assert close(ctl, 2, 60.0) is None and ctl.last_decision.reason == "stale_batch"
    ctl.on_batch_started("B003", {"temperature": ctl.current["temperature"]})
    assert close(ctl, 3, 57.0) is not None


def test_duplicate_close_is_ignored():
    ctl = Controller(settings("pi", cooldown=0))
    assert close(ctl, 1, 60.0) is not None
    n = ctl.state["counts"]["suggestions"]
    assert close(ctl, 1, 60.0) is None and ctl.last_decision.reason == "duplicate"
    assert ctl.state["counts"]["suggestions"] == n


def test_restart_mid_campaign_keeps_pending_cooldown_and_history():
    s = settings("pi", cooldown=1)
    a = Controller(s)
    s1 = close(a, 1, 60.0)
    saved = a.state_json()
    b = Controller(s, saved)  # the daemon restarted
    assert b.pending["msg_id"] == s1.msg_id
    assert close(b, 1, 60.0) is None and b.last_decision.reason == "duplicate"
    assert b.on_ack(s1.msg_id, "applied", now=150) == "matched"
    assert b.current["temperature"] == s1.moves[0].suggested
    c = Controller(s, b.state_json())
    assert close(c, 2, 58.0) is None and c.last_decision.reason == "cooldown"
    assert close(c, 3, 58.0) is not None
    assert json.loads(c.state_json()) == c.state


def test_corrupt_state_starts_fresh():
    ctl = Controller(settings("pi"), "{not json")
    assert ctl.pending is None and ctl.current == {"temperature": 76.0}
    ctl = Controller(settings("pi"), json.dumps({"version": 99}))
    assert ctl.state["version"] == 1


def test_rule_metric_without_target_is_a_config_error():
    s = load_settings(use_env=False, targets={},
                      control={"enabled": True, "setpoints": [{"name": "t", "min": 0, "max": 1, "max_step": 0.1}],
                               "rules": [{"metric": "ecd_nm.mean", "setpoint": "t", "gain": 1}]})
    with pytest.raises(ConfigError, match=r"control.rules.0.metric"):
        Controller(s)


def test_config_typos_and_bad_references_fail_with_field_name():
    with pytest.raises(ConfigError, match=r"control.rules.0.gian"):
        settings(rules=[{"metric": "ecd_nm.mean", "setpoint": "temperature", "gian": 1}])
    with pytest.raises(ConfigError, match=r"not a declared setpoint"):
        settings(rules=[{"metric": "ecd_nm.mean", "setpoint": "temp", "gain": 1}])
    with pytest.raises(ConfigError, match=r"min .* must be below max"):
        settings(setpoints=[{"name": "t", "min": 5, "max": 1, "max_step": 1}], rules=[])


# ----------------------------------------------------------------------------- messages
def test_suggestion_and_ack_messages_follow_the_schemas():
    ctl = Controller(settings("pi", cooldown=0, mode="command"))
    sugg = close(ctl, 1, 60.0)
    msg = json.loads(sugg.payload())
    jsonschema.validate(msg, load_schema("suggestion"))
    assert msg["mode"] == "command" and msg["schema_version"] == 1
    (sp,) = msg["setpoints"]
    assert set(sp) == {"name", "unit", "current", "suggested", "delta", "min", "max"}
    assert sp["delta"] == pytest.approx(sp["suggested"] - sp["current"])
    assert {"metric", "observed", "target", "tolerance", "n_particles", "confidence"} <= set(msg["reason"])
    assert 0.99 < msg["reason"]["confidence"] <= 1.0
    ack = ack_message(msg["msg_id"], "accepted", at=1.0, batch_id="B001")
    jsonschema.validate(ack, load_schema("suggestion_ack"))
    assert parse_ack(json.dumps(ack).encode()).status == "accepted"
    bad = dict(msg, setpoints=[dict(sp, extra=1)])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, load_schema("suggestion"))
    for payload in (b"nope", b"[]", b'{"msg_id": "x", "status": "maybe"}', b'{"status": "applied"}'):
        with pytest.raises(ValueError):
            parse_ack(payload)


def test_model_is_hidden_but_sane():
    m = ReactorModel()
    b = m.response({"temperature": 80.0, "reagent_ratio": 1.0})
    assert b.mean_ecd_nm == pytest.approx(50.0)
    hot = m.response({"temperature": 81.0, "reagent_ratio": 1.0})
    assert -2.7 < hot.mean_ecd_nm - b.mean_ecd_nm < -2.3  # about -2.5 nm per degC (gain 0.4 degC/nm)
    assert sum(b.class_fractions.values()) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    assert m.batch({"temperature": 80.0, "reagent_ratio": 1.0}, rng).mean_ecd_nm != b.mean_ecd_nm
