"""The ledger: atomic image+outbox transactions, crash accounting, state, particle blobs."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qcloop.daemon.ledger import Ledger, pack_particles, unpack_particles
from qcloop.daemon.outbox import OutMessage, Outbox


def test_particles_round_trip_without_pickle() -> None:
    df = pd.DataFrame({"particle_id": np.arange(1, 4, dtype=np.int32),
                       "ecd_nm": [10.5, 11.0, np.nan],
                       "touches_border": [False, True, False],
                       "class": ["sphere", "rod", "unknown"]})
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    back, emb2 = unpack_particles(pack_particles(df, emb))
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    assert back["touches_border"].dtype == bool
    np.testing.assert_array_equal(emb2, emb)
    # an object column would need pickle: the blob must load with allow_pickle=False (it does above)
    back, none = unpack_particles(pack_particles(df.iloc[:0], None))
    assert len(back) == 0 and none is None


def test_done_and_its_message_commit_together(tmp_path: Path) -> None:
    led = Ledger(tmp_path)
    row = led.begin_image("/x/a.tif", "h1", 10, 1, "B1")
    assert row.status == "pending" and row.in_progress
    msg = OutMessage("p/images/result", {"msg_id": "m1", "v": 1})
    with pytest.raises(RuntimeError):
        with led.transaction():
            led.finish_image(row.id, "done", result={"a": 1}, messages=[msg])
            raise RuntimeError("crash between the two writes")
    assert led.get_image(row.id).status == "pending"
    assert led.outbox_count() == 0
    led.finish_image(row.id, "done", result={"a": 1}, messages=[msg])
    assert led.get_image(row.id).status == "done"
    assert led.outbox_count() == 1
    # the same msg_id is never queued twice
    led.add_message(msg)
    assert led.outbox_count() == 1
    led.close()


def test_interrupted_images_count_crashes(tmp_path: Path) -> None:
    led = Ledger(tmp_path)
    a = led.begin_image("/x/a.tif", "h1", 10, 1, "B1")
    led.close()  # "kill -9": the row stays in_progress
    led = Ledger(tmp_path)
    rows = led.recover_interrupted(clean_stop=False)
    assert [r.id for r in rows] == [a.id]
    again = led.get_image(a.id)
    assert again.crashes == 1 and not again.in_progress and again.status == "pending"
    assert led.recover_interrupted(clean_stop=False) == []
    # interrupted while the daemon was stopping cleanly (SIGTERM): not the image's fault
    led.begin_image("/x/a.tif", "h1", 10, 1, "B1")
    assert [r.id for r in led.recover_interrupted(clean_stop=True)] == [a.id]
    assert led.get_image(a.id).crashes == 1
    led.close()


def test_names_that_are_not_utf8_are_stored_losslessly(tmp_path: Path) -> None:
    import os

    raw = b"/x/G_bad\xff\xfe.tif"
    path = os.fsdecode(raw)  # what os.listdir hands over: str with lone surrogates
    led = Ledger(tmp_path)
    row = led.begin_image(path, "h1", 10, 1, "G")
    assert row.path == "/x/G_bad\\xff\\xfe.tif" and row.raw_path == raw
    assert os.fsencode(row.fs_path) == raw
    assert led.find_image(path, "h1").id == row.id
    led.finish_image(row.id, "done")
    assert led.find_by_stat(path, 10, 1).id == row.id
    led.close()


def test_state_is_persistent_json(tmp_path: Path) -> None:
    led = Ledger(tmp_path)
    assert led.get_state("control") is None
    led.set_state("control", json.dumps({"k": [1, 2]}))
    with pytest.raises(ValueError):
        led.set_state("control", "{not json")
    with pytest.raises(RuntimeError):
        with led.transaction():
            led.set_state("control", json.dumps({"k": "rolled back"}))
            raise RuntimeError
    led.close()
    led = Ledger(tmp_path)
    assert json.loads(led.get_state("control")) == {"k": [1, 2]}
    led.close()


def test_savepoint_rolls_back_only_the_inner_block(tmp_path: Path) -> None:
    led = Ledger(tmp_path)
    with led.transaction():
        led.add_message(OutMessage("p/a", {"msg_id": "outer"}))
        with pytest.raises(ValueError):
            with led.transaction():
                led.add_message(OutMessage("p/b", {"msg_id": "inner"}))
                raise ValueError
    ob = Outbox(led.path)
    assert [r.msg_id for r in ob.fetch(0, 10)] == ["outer"]
    ob.close()
    led.close()


def test_outbox_payload_is_strict_json(tmp_path: Path) -> None:
    led = Ledger(tmp_path)
    led.add_message(OutMessage("p/a", {"x": float("nan"), "y": np.float32(1.5), "z": np.arange(2)}))
    ob = Outbox(led.path)
    (row,) = ob.fetch(0, 10)
    body = json.loads(row.payload)
    assert body["x"] is None and body["y"] == 1.5 and body["z"] == [0, 1]
    assert body["schema_version"] == 1 and body["msg_id"] == row.msg_id
    ob.delete([row.id])
    assert ob.count() == 0
    ob.close()
    led.close()


def test_ledger_refuses_other_threads(tmp_path: Path) -> None:
    import threading

    led = Ledger(tmp_path)
    errors = []

    def other() -> None:
        try:
            led.get_state("x")
        except sqlite3.ProgrammingError as exc:
            errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert errors, "the ledger connection must only be used by the worker thread"
    led.close()
