"""Batch keys, the message-batch timeline, batch metrics from stored tables, sd_notify."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qcloop.config import BatchConfig, TargetSpec
from qcloop.daemon.batches import BatchKeyer, MessageBatches, compute_batch
from qcloop.daemon.metrics import split_metric_name
from qcloop.daemon.systemd import sd_notify, watchdog_interval


def test_batch_keys(tmp_path: Path) -> None:
    root = tmp_path / "export"
    k = BatchKeyer(BatchConfig(key="regex:^(?P<batch>B\\d+)-"), root)
    assert k.key_for(root / "B42-001.tif", seen_at=0) == "B42"
    assert k.key_for(root / "misc.tif", seen_at=0) == "unassigned"
    k = BatchKeyer(BatchConfig(key="subfolder", default_batch="loose"), root)
    assert k.key_for(root / "B7" / "deep" / "x.tif", seen_at=0) == "B7"
    assert k.key_for(root / "x.tif", seen_at=0) == "loose"
    tl = MessageBatches()
    assert tl.start("L1", 100.0) and not tl.start("L1", 150.0)  # a repeated (retained) message
    assert tl.start("L2", 200.0)
    k = BatchKeyer(BatchConfig(key="message"), root, MessageBatches.from_json(tl.to_json()))
    assert k.key_for(root / "a.tif", seen_at=50) == "unassigned"
    assert k.key_for(root / "a.tif", seen_at=199.9) == "L1"
    assert k.key_for(root / "a.tif", seen_at=200.0) == "L2"
    assert MessageBatches.from_json("garbage").entries == []


def test_compute_batch_from_stored_tables() -> None:
    rng = np.random.default_rng(0)
    tables, embs = [], []
    for i in range(3):
        n = 20
        tables.append(pd.DataFrame({"image": f"im{i}", "touches_border": np.arange(n) < 2,
                                    "ecd_nm": rng.normal(100, 5, n), "ecd_px": rng.normal(20, 1, n),
                                    "class": np.where(np.arange(n) % 2, "rod", "sphere")}))
        embs.append(rng.normal(size=(n, 4)))
    out = compute_batch(tables, embs, n_images=3, targets={"ecd_nm.mean": TargetSpec(target=100, tolerance=10)},
                        min_particles=30)
    assert out.error is None and out.n_particles == 54 and out.sufficient
    assert out.flat["n_images"] == 3 and out.verdict.passed and out.verdict_label == "pass"
    # embeddings of mixed widths: scored without them, not an error
    out2 = compute_batch(tables, [embs[0], embs[1][:, :2], embs[2]], n_images=3, targets={}, min_particles=100)
    assert out2.error is None and np.isnan(out2.flat["silhouette"]) and out2.verdict_label == "insufficient"
    empty = compute_batch([], [], n_images=0, targets={}, min_particles=1)
    assert empty.error is None and empty.n_particles == 0 and not empty.sufficient


def test_metric_labels_are_bounded() -> None:
    assert split_metric_name("class_fraction.rod") == ("class_fraction", "rod")
    assert split_metric_name("ecd_nm.rod.d90") == ("ecd_nm.d90", "rod")
    assert split_metric_name("orientation_deg.rod.circular_sd") == ("orientation_deg.circular_sd", "rod")
    assert split_metric_name("pca.silhouette") == ("pca.silhouette", "")
    assert split_metric_name("ecd_nm.mean") == ("ecd_nm.mean", "")


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify_datagram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, abstract: bool) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    addr = f"\0qcloop-test-{os.getpid()}" if abstract else str(tmp_path / "n.sock")
    s.bind(addr)
    s.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + addr[1:] if abstract else addr)
    assert sd_notify("READY=1\nSTATUS=ok")
    assert s.recv(100) == b"READY=1\nSTATUS=ok"
    s.close()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sd_notify("READY=1") is False
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    assert watchdog_interval() == 2.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # for another process
    assert watchdog_interval() is None
