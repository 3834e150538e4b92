"""The MQTT contracts: one schema per message in and out, the docs' topic table generated from
them, and the validating recorder the end-to-end tests use."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from daemon_helpers import REPO, Recorder, publish
from qcloop.daemon import contracts, messages
from qcloop.daemon.outbox import OutMessage


def test_every_schema_is_valid_and_names_a_distinct_topic() -> None:
    cs = contracts.contracts()
    assert {c.name for c in cs.values() if c.direction == "out"} == {
        "status", "image_result", "batch_result", "error_event", "suggestion", "control_decision"}
    assert {c.name for c in cs.values() if c.direction == "in"} == {
        "close_batch", "reactor_batch", "reactor_setpoints", "suggestion_ack"}
    assert len({c.topic for c in cs.values()}) == len(cs)
    for c in cs.values():
        jsonschema.Draft202012Validator.check_schema(c.schema)
    files = {p.stem for p in (REPO / "qcloop" / "schemas").glob("*.json")}
    assert files == set(cs), "every schema file is a contract"


@pytest.mark.parametrize("doc", ["docs/daemon.md", "docs/control.md"])
def test_docs_hold_the_generated_topic_table(doc: str) -> None:
    text = (REPO / doc).read_text()
    assert contracts.rewrite_table(text) == text, f"run: python -m qcloop.daemon.contracts --write-docs ({doc})"


def test_builders_take_topic_and_flags_from_the_schema() -> None:
    msg = messages.error_event("qcloop/l1", "l1", "command-rejected", "bad", topic="qcloop/l1/x", reason="schema")
    assert (msg.topic, msg.qos, msg.retain, msg.schema) == ("qcloop/l1/events/error", 1, False, "error_event")
    assert contracts.contract("error_event").errors(json.loads(msg.encoded()[1])) == []
    status = messages.status_payload("l1", "0123456789ab", "offline", "connection-lost", will=True)
    assert status["time"] is None and contracts.contract("status").errors(status) == []
    assert contracts.contract("batch_result").retained and not contracts.contract("image_result").retained
    with pytest.raises(ValueError):
        messages.out("qcloop/l1", "close_batch", {})  # an inbound contract


def test_inbound_contracts_refuse_the_payloads_of_issue_12() -> None:
    close = contracts.contract("close_batch")
    assert close.errors({}) == [] and close.errors({"batch": "B42"}) == []
    for bad in ({"batch": ""}, {"batch": None}, {"bacth": "B42"}, [], "B42"):
        assert close.errors(bad), bad
    sp = contracts.contract("reactor_setpoints")
    assert sp.errors({"setpoints": {"temperature": 80.0}}) == [] and sp.errors({"temperature": 80.0}) == []
    assert sp.errors({"setpoints": {"temperature": 1e300}}) and sp.errors({"temperature": "hot"})
    rb = contracts.contract("reactor_batch")
    assert rb.errors({"batch": "B1", "event": "end"}) == [] and rb.errors({"batch": "B1", "event": "stop"})


@pytest.mark.broker
def test_recorder_fails_on_a_topic_without_schema_and_on_a_bad_payload(machine_broker, prefix: str) -> None:
    host, port = machine_broker
    rec = Recorder(host, port, prefix)
    try:
        publish(host, port, f"{prefix}/no/such/topic", {"msg_id": "x"})
        publish(host, port, f"{prefix}/images/result", {"msg_id": "not an image result"})
        publish(host, port, f"{prefix}/commands/close-batch", {"batch": ""})  # inbound: recorded only
        assert rec.wait_for(lambda r: len(r.received) == 3, 10)
        assert len(rec.problems) == 2 and "no schema" in rec.problems[0]
        with pytest.raises(AssertionError):
            rec.assert_valid()
    finally:
        rec.close(check=False)
