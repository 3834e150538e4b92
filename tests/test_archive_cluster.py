"""qcloop archive / batch --cluster / analyze --cluster on a real distributed.LocalCluster of 2
worker processes, on the 15 real Konstanz images: identical to the serial run; a worker killed
mid-run; the client killed mid-run and resumed; changed files, targets and configuration."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from qcloop.cli import main
from qcloop.cluster import dataset
from qcloop.cluster.archive import run_archive
from qcloop.cluster.manifest import Manifest
from qcloop.cluster.spec import WorkSpec
from qcloop.config import load_settings

distributed = pytest.importorskip("distributed")
pytest.importorskip("pyarrow")

pytestmark = [pytest.mark.real_data, pytest.mark.slow]

SERIES = ("GM_116", "GM_124", "GM_59")
CONFIG = 'batch:\n  key: "regex:^(?P<batch>GM_\\\\d+)_"\n'
TARGETS = "targets:\n  ecd_nm.mean: {min: 150}\n  class_fraction.cube: {max: 0.9}\n"
SUBSET = ("GM_116_20", "GM_116_23", "GM_124_01", "GM_124_04", "GM_59_21", "GM_59_22")


@pytest.fixture(scope="module")
def konstanz(sem_data):
    return sem_data / "konstanz"


@pytest.fixture(scope="module")
def setup_files(tmp_path_factory):
    """Config (batch = the GM series), targets and a classifier (trained on synthetic shapes:
    its classes are meaningless here, but it makes the workers load a model from bytes)."""
    from test_batch_cli import train_cube_triangle_model

    d = tmp_path_factory.mktemp("setup")
    (d / "qcloop.yaml").write_text(CONFIG)
    (d / "targets.yaml").write_text(TARGETS)
    return {"config": d / "qcloop.yaml", "targets": d / "targets.yaml",
            "model": train_cube_triangle_model(d / "model.json")}


def settings_of(files, **overrides):
    settings = load_settings(files["config"], use_env=False, **overrides)
    settings.pipeline.classifier = files["model"]
    return settings


def batch_args(files, images, out, *extra):
    return ["batch", *map(str, images), "--out", str(out), "--config", str(files["config"]),
            "--model", str(files["model"]), "--targets", str(files["targets"]), "--max-overlays", "0", *extra]


@pytest.fixture(scope="module")
def serial(konstanz, setup_files, tmp_path_factory):
    """``qcloop batch --jobs 1`` on each series: {series: (batch.json, particles.csv text)}."""
    d = tmp_path_factory.mktemp("serial")
    ref = {}
    for s in SERIES:
        out = d / s
        assert main(batch_args(setup_files, sorted(konstanz.glob(f"{s}_*.tif")), out, "--jobs", "1")) == 0
        ref[s] = (json.loads((out / "batch.json").read_text()), (out / "particles.csv").read_text())
    return ref


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as c:
        yield c


def comparable(doc):
    return {k: v for k, v in doc.items() if k not in ("created", "seconds")}


def reference_rows(serial):
    """Every image's particle rows of the serial run, as CSV text without header."""
    rows = {}
    for _, text in serial.values():
        frame = pd.read_csv(pd.io.common.StringIO(text))
        for image, part in frame.groupby("image", sort=False):
            rows[image] = part.reset_index(drop=True)
    return rows


def image_csv(frame, image):
    part = frame[frame["image"] == image].drop(columns="batch", errors="ignore").reset_index(drop=True)
    return part.to_csv(index=False)


def assert_rows_match(particles, serial, images):
    ref = reference_rows(serial)
    assert sorted(particles["image"].unique()) == sorted(images)  # every image, and no other
    for image in images:
        expected = ref[image].to_csv(index=False)
        assert image_csv(particles, image) == expected, image  # once: no duplicated rows


def link_subset(konstanz, root, names=SUBSET):
    root.mkdir()
    for n in names:
        (root / f"{n}.tif").symlink_to(konstanz / f"{n}.tif")
    return root


# --------------------------------------------------------------------------- identical to serial
def test_archive_of_all_15_images_is_identical_to_serial_batch(konstanz, setup_files, serial, cluster, tmp_path):
    from qcloop.targets import load_targets

    out = tmp_path / "archive"
    summary = run_archive(konstanz, out, settings_of(setup_files), targets=load_targets(setup_files["targets"]),
                          cluster=cluster.scheduler_address)
    assert (summary.n_images, summary.n_batches, summary.n_analysed, summary.n_reused, summary.n_failed) == (15, 3, 15, 0, 0)
    particles = pd.read_parquet(out / "particles.parquet")
    for s in SERIES:
        doc, csv = serial[s]
        got = json.loads((out / "batches" / s / "batch.json").read_text())
        assert comparable(got) == comparable(doc), s
        rows = particles[particles["batch"] == s].drop(columns="batch").reset_index(drop=True)
        assert rows.to_csv(index=False) == csv, s  # byte-identical to qcloop batch's particles.csv
    # dtypes as documented
    expected = dataset.column_table().set_index("column")["dtype"]
    for col, dt in particles.dtypes.items():
        assert expected[col] == ("str" if pd.api.types.is_string_dtype(dt) and col != "batch" else str(dt)), col
    batches = pd.read_parquet(out / "batches.parquet").set_index("batch")
    for s in SERIES:
        flat = serial[s][0]["flat"]
        assert batches.loc[s, "ecd_nm.mean"] == flat["ecd_nm.mean"]
        assert batches.loc[s, "n_particles"] == flat["n_particles"]
        assert batches.loc[s, "verdict"] == ("pass" if serial[s][0]["verdict"]["passed"] else "fail")
    assert batches.loc["GM_59", "verdict"] == "fail" and "ecd_nm.mean" in batches.loc["GM_59", "failed_checks"]
    images = pd.read_parquet(out / "images.parquet")
    assert len(images) == 15 and (images["status"] == "done").all() and images["sha256"].str.len().eq(64).all()
    assert pd.read_csv(out / "failed.csv").empty


def test_batch_and_analyze_with_cluster_match_the_local_run(konstanz, setup_files, serial, cluster, tmp_path):
    images = sorted(konstanz.glob("GM_124_*.tif"))
    out = tmp_path / "batch"
    assert main(batch_args(setup_files, images, out, "--cluster", cluster.scheduler_address)) == 0
    doc, csv = serial["GM_124"]
    assert (out / "particles.csv").read_text() == csv
    assert comparable(json.loads((out / "batch.json").read_text())) == comparable(doc)
    # analyze: particles, images.csv (but the timings) and overlay PNGs byte for byte
    two = [konstanz / "GM_59_20.tif", konstanz / "GM_116_22.tif"]
    outs = {}
    for mode, extra in (("local", []), ("cluster", ["--cluster", cluster.scheduler_address])):
        outs[mode] = tmp_path / f"analyze-{mode}"
        assert main(["analyze", *map(str, two), "--out", str(outs[mode]), "--overlays", *extra]) == 0
    local, remote = outs["local"], outs["cluster"]
    assert (local / "particles.csv").read_text() == (remote / "particles.csv").read_text()
    pd.testing.assert_frame_equal(pd.read_csv(local / "images.csv").drop(columns="seconds"),
                                  pd.read_csv(remote / "images.csv").drop(columns="seconds"))
    for p in two:
        assert (local / "overlays" / f"{p.stem}.png").read_bytes() == (remote / "overlays" / f"{p.stem}.png").read_bytes()


def test_bytes_transfer_and_a_bad_file(konstanz, setup_files, serial, cluster, tmp_path):
    three = ("GM_116_20", "GM_124_01", "GM_59_21")
    root = link_subset(konstanz, tmp_path / "root", three)
    (root / "GM_59_99.tif").write_bytes((konstanz / "GM_59_20.tif").read_bytes()[:3000])  # truncated
    out = tmp_path / "out"
    settings = settings_of(setup_files)
    summary = run_archive(root, out, settings, cluster=cluster.scheduler_address, transfer="bytes")
    assert (summary.n_analysed, summary.n_failed) == (4, 1)
    assert_rows_match(pd.read_parquet(out / "particles.parquet"), serial, three)
    failed = pd.read_csv(out / "failed.csv")
    assert failed[["image", "batch", "retried"]].values.tolist() == [["GM_59_99", "GM_59", False]]
    assert failed["reason"].iloc[0]
    doc = json.loads((out / "batches" / "GM_59" / "batch.json").read_text())
    assert [f["image"] for f in doc["failed"]] == ["GM_59_99"] and doc["images"] == ["GM_59_21"]
    images = pd.read_parquet(out / "images.parquet").set_index("image")
    assert images.loc["GM_59_99", "status"] == "failed" and pd.isna(images.loc["GM_59_99", "n_particles"])
    # the same bad bytes are not tried again; the CLI says so with exit code 1
    again = run_archive(root, out, settings, cluster=cluster.scheduler_address)
    assert (again.n_analysed, again.n_reused, again.n_failed) == (0, 4, 1)


# --------------------------------------------------------------------------- failures
def test_worker_killed_mid_run_every_image_exactly_once(konstanz, setup_files, serial, tmp_path):
    root = link_subset(konstanz, tmp_path / "root")
    out = tmp_path / "out"
    settings = settings_of(setup_files)
    parts = Manifest(out / "manifest", WorkSpec.of(settings, embed=True).fingerprint).parts
    killed = {}
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c, \
            distributed.Client(c) as client:
        pids = client.run(os.getpid)

        def kill_one_worker_when_an_image_is_done():
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not list(parts.glob("*/*.parquet")):
                time.sleep(0.02)
            killed["parts_at_kill"] = len(list(parts.glob("*/*.parquet")))
            victim = next(iter(pids.values()))
            os.kill(victim, signal.SIGKILL)
            killed["pid"] = victim

        killer = threading.Thread(target=kill_one_worker_when_an_image_is_done)
        killer.start()
        summary = run_archive(root, out, settings, cluster=c.scheduler_address)
        killer.join()
        after = client.run(os.getpid)
    assert killed["pid"] not in after.values()  # the nanny started a new worker process
    assert killed["parts_at_kill"] < len(SUBSET)  # killed mid-run, with images in flight
    assert summary.n_failed == 0 and summary.n_analysed == len(SUBSET)
    assert_rows_match(pd.read_parquet(out / "particles.parquet"), serial, SUBSET)
    assert len(list(parts.glob("*/*.parquet"))) == len(SUBSET)


def test_client_killed_then_resume_redoes_only_what_is_missing(konstanz, setup_files, serial, cluster, tmp_path):
    from qcloop.targets import load_targets

    root = link_subset(konstanz, tmp_path / "root")
    out = tmp_path / "out"
    settings = settings_of(setup_files)
    parts = Manifest(out / "manifest", WorkSpec.of(settings, embed=True).fingerprint).parts
    cmd = [sys.executable, "-m", "qcloop", "archive", str(root), "--out", str(out), "--config",
           str(setup_files["config"]), "--model", str(setup_files["model"]), "--cluster", "local:2"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not list(parts.glob("*/*.parquet")):
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the client and its local cluster, mid-run
        proc.wait()
    done = len(list(parts.glob("*/*.parquet")))
    assert 1 <= done < len(SUBSET) and not (out / "particles.parquet").exists()

    summary = run_archive(root, out, settings, cluster=cluster.scheduler_address)
    assert (summary.n_analysed, summary.n_reused, summary.n_failed) == (len(SUBSET) - done, done, 0)
    assert_rows_match(pd.read_parquet(out / "particles.parquet"), serial, SUBSET)

    # nothing changed: nothing analysed; new targets: re-scored, nothing analysed
    assert run_archive(root, out, settings, cluster=cluster.scheduler_address).n_analysed == 0
    before = pd.read_parquet(out / "batches.parquet").set_index("batch")
    assert (before["verdict"] == "none").all()
    summary = run_archive(root, out, settings, targets=load_targets(setup_files["targets"]),
                          cluster=cluster.scheduler_address)
    assert summary.n_analysed == 0 and set(summary.batches["verdict"]) <= {"pass", "fail"}
    assert summary.batches.set_index("batch").loc["GM_59", "verdict"] == "fail"

    # one file replaced by another image's content: that one is analysed again
    (root / "GM_59_21.tif").unlink()
    (root / "GM_59_21.tif").symlink_to(konstanz / "GM_59_23.tif")
    summary = run_archive(root, out, settings, cluster=cluster.scheduler_address)
    assert (summary.n_analysed, summary.n_reused) == (1, len(SUBSET) - 1)
    particles = pd.read_parquet(out / "particles.parquet")
    expected = reference_rows(serial)["GM_59_23"].assign(image="GM_59_21").to_csv(index=False)
    assert image_csv(particles, "GM_59_21") == expected

    # a changed analysis configuration: everything again, under a new fingerprint
    changed = settings_of(setup_files, pipeline={"unknown_below": 0.9})
    summary = run_archive(root, out, changed, cluster=cluster.scheduler_address)
    assert (summary.n_analysed, summary.n_reused) == (len(SUBSET), 0)
    particles = pd.read_parquet(out / "particles.parquet")
    assert len(particles) == sum(len(reference_rows(serial)[n]) for n in SUBSET if n != "GM_59_21") + \
        len(reference_rows(serial)["GM_59_23"])
    assert (particles["class"] == "unknown").sum() > 0
