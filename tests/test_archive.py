"""qcloop archive building blocks without a cluster: --cluster values, fingerprint, manifest parts,
hash cache, lock, batch grouping, Parquet schema (dtypes and units) and names."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pandas as pd
import pytest

from qcloop.cluster import dataset
from qcloop.cluster.archive import find_images
from qcloop.cluster.client import parse_cluster, require_dask
from qcloop.cluster.manifest import HashCache, Manifest, writer_lock
from qcloop.cluster.spec import ImageJob, WorkSpec, content_sha256
from qcloop.config import BatchConfig, load_settings
from qcloop.errors import QcloopError
from qcloop.measure import PARTICLE_COLUMNS

pytest.importorskip("pyarrow")


@pytest.mark.parametrize("text, expected", [
    ("local", ("local", None)), ("local:3", ("local", 3)),
    ("tcp://10.0.0.5:8786", ("address", "tcp://10.0.0.5:8786")),
    ("tls://sched:8786", ("address", "tls://sched:8786")),
    ("scheduler-file:/shared/sched.json", ("scheduler_file", "/shared/sched.json")),
])
def test_parse_cluster(text, expected):
    assert parse_cluster(text) == expected


@pytest.mark.parametrize("text", ["local:0", "local:x", "sched:8786", "http://sched:8786", "scheduler-file:"])
def test_parse_cluster_refuses_bad_values(text):
    with pytest.raises(QcloopError, match="--cluster"):
        parse_cluster(text)


def test_cluster_without_dask_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with pytest.raises(QcloopError, match=r"need distributed: pip install 'qcloop\[cluster\]'"):
        require_dask()
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(QcloopError, match="need pyarrow"):
        require_dask(("pyarrow",))


def write_model(tmp_path):
    from test_batch_cli import train_cube_triangle_model

    return train_cube_triangle_model(tmp_path / "model.json")


def test_fingerprint_follows_analysis_config_and_model_bytes(tmp_path):
    base = load_settings(use_env=False)
    fp = WorkSpec.of(base, embed=True).fingerprint
    assert WorkSpec.of(load_settings(use_env=False), embed=True).fingerprint == fp  # stable
    assert WorkSpec.of(base, embed=False).fingerprint != fp
    # targets, batch grouping and MQTT do not change an image's analysis
    other = load_settings(use_env=False, targets={"ecd_nm.mean": {"max": 3}}, batch={"key": "subfolder"},
                          mqtt={"host": "elsewhere"})
    assert WorkSpec.of(other, embed=True).fingerprint == fp
    changed = load_settings(use_env=False, pipeline={"unknown_below": 0.7})
    assert WorkSpec.of(changed, embed=True).fingerprint != fp
    changed = load_settings(use_env=False, imaging={"pixel_size_nm": 2.0})
    assert WorkSpec.of(changed, embed=True).fingerprint != fp
    # the classifier travels as bytes; its content (not its path) is in the fingerprint
    model = write_model(tmp_path)
    with_model = load_settings(use_env=False, pipeline={"classifier": str(model)})
    spec = WorkSpec.of(with_model, embed=True)
    assert spec.fingerprint != fp and spec.pipeline["classifier"] is None
    assert [n for n, _ in spec.model_files] == ["model.json", "model.npz"]
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for name, data in spec.model_files:
        (moved / name).write_bytes(data)
    assert WorkSpec.of(load_settings(use_env=False, pipeline={"classifier": str(moved / "model.json")}),
                       embed=True).fingerprint == spec.fingerprint
    # a worker rebuilds the same pipeline from the spec alone
    folder = tmp_path / "worker"
    folder.mkdir()
    pipeline = spec.build(spec.write_model(folder))
    assert pipeline.classifier is not None and pipeline.classifier.classes == ["cube", "triangle"]


def test_image_job_sends_bytes_and_sidecars(tmp_path):
    img = tmp_path / "S1_001.tif"
    img.write_bytes(b"II*\0fake")
    (tmp_path / "S1_001.txt").write_text("$CM_FORMAT JEOL/FE\n")
    by_path = ImageJob.of(img, (True,))
    assert by_path.data is None and by_path.location == str(img.resolve()) and by_path.args == (True,)
    sent = ImageJob.of(img, (True,), send_bytes=True)
    assert sent.data == b"II*\0fake" and sent.sidecars == (("S1_001.txt", b"$CM_FORMAT JEOL/FE\n"),)
    there = tmp_path / "worker"
    there.mkdir()
    copy = sent.materialise(there)
    assert copy == there / "S1_001.tif" and copy.read_bytes() == img.read_bytes()
    assert (there / "S1_001.txt").read_text() == "$CM_FORMAT JEOL/FE\n"


def test_content_hash_covers_sidecars(tmp_path):
    import hashlib

    img = tmp_path / "a.tif"
    img.write_bytes(b"pixels")
    plain = content_sha256(img)
    assert plain == hashlib.sha256(b"pixels").hexdigest()  # the daemon's content_sha256
    (tmp_path / "a.txt").write_text("PixelSize=2.0")
    with_sidecar = content_sha256(img)
    (tmp_path / "a.txt").write_text("PixelSize=3.0")
    assert len({plain, with_sidecar, content_sha256(img)}) == 3


def small_outcome(n=3, d=4, name="B1_01"):
    rng = np.random.default_rng(0)
    particles = pd.DataFrame({
        "image": [name] * n, "particle_id": np.arange(1, n + 1), "ecd_nm": rng.random(n) * 100,
        "lobe_diameters_nm": ["1.5;2.25", "3", "4"][:n], "touches_border": [False, True, False][:n],
        "class": ["cube", "unknown", "cube"][:n], "class_probability": [0.9, 0.4, np.nan][:n],
    })
    return {"path": "x", "name": name, "particles": particles, "embeddings": rng.random((n, d)),
            "overlay": None, "seconds": {"segment": 0.5}, "summary": {"image": name, "n_particles": n,
                                                                       "pixel_size_nm": None}}


def test_manifest_part_round_trip_is_exact(tmp_path):
    m = Manifest(tmp_path / "manifest", "f" * 64)
    sha = "ab" + "0" * 62
    assert not m.has(sha) and m.read(sha) is None
    out = small_outcome()
    m.write(sha, out)
    assert m.has(sha) and m.path(sha).parent.name == "ab"
    assert m.path(sha).parent.parent.name == "f" * 16
    back = m.read(sha)
    pd.testing.assert_frame_equal(back["particles"], out["particles"], check_dtype=False)
    assert back["particles"].to_csv(index=False) == out["particles"].to_csv(index=False)
    assert np.array_equal(back["embeddings"], out["embeddings"])
    assert back["seconds"] == {"segment": 0.5} and back["summary"]["n_particles"] == 3
    # no particles, no embeddings, and a refused file
    empty = small_outcome(n=0)
    empty["embeddings"] = None
    m.write("cd" + "0" * 62, empty)
    got = m.read("cd" + "0" * 62)
    assert len(got["particles"]) == 0 and got["embeddings"] is None
    m.write("ef" + "0" * 62, {"path": "x", "error": "truncated TIFF"})
    assert m.read("ef" + "0" * 62) == {"error": "truncated TIFF"}
    # no temporary file is left; a killed writer's leftover is removed
    assert not list((tmp_path / "manifest").rglob("*.tmp"))
    (m.path(sha).parent / f".{sha}.parquet.999.tmp").write_bytes(b"half")
    assert m.remove_temporaries() == 1 and m.has(sha)


def test_hash_cache_rereads_only_changed_files(tmp_path, monkeypatch):
    import qcloop.cluster.manifest as manifest

    files = []
    for i in range(3):
        f = tmp_path / f"img{i}.png"
        f.write_bytes(bytes([i]) * 100)
        files.append(f)
    calls = []
    monkeypatch.setattr(manifest, "content_sha256", lambda p: calls.append(p.name) or content_sha256(p))
    cache = HashCache(tmp_path / "files.sqlite")
    first = cache.hashes(files)
    assert first == [content_sha256(f) for f in files] and len(calls) == 3
    calls.clear()
    assert cache.hashes(files) == first and calls == []
    files[1].write_bytes(b"changed")
    os.utime(files[1], ns=(time.time_ns(), time.time_ns() + 10**9))
    again = cache.hashes(files)
    assert calls == ["img1.png"] and again[1] == content_sha256(files[1]) != first[1]
    calls.clear()
    assert cache.hashes(files, rehash=True) == again and len(calls) == 3
    cache.close()


def test_second_writer_is_refused(tmp_path):
    with writer_lock(tmp_path / "manifest"):
        with pytest.raises(QcloopError, match=f"another qcloop archive is writing .*pid {os.getpid()}"):
            with writer_lock(tmp_path / "manifest"):
                pass
    with writer_lock(tmp_path / "manifest"):  # released
        pass


def test_find_images_uses_the_daemon_batch_keys(tmp_path):
    for rel in ("B1/x_01.tif", "B1/x_02.png", "B2/deep/y_01.tif", "loose_03.tif", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    out = tmp_path / "B1" / "out"
    out.mkdir()
    (out / "overlay.png").write_bytes(b"x")  # outputs inside ROOT are not images of the archive
    got = find_images(tmp_path, BatchConfig(key="subfolder"), skip=out)
    assert [(im.path.relative_to(tmp_path).as_posix(), im.batch) for im in got] == [
        ("B1/x_01.tif", "B1"), ("B1/x_02.png", "B1"), ("B2/deep/y_01.tif", "B2"), ("loose_03.tif", "unassigned")]
    got = find_images(tmp_path, BatchConfig(key="regex:^(?P<batch>[^_]+)_"), skip=out)
    assert [im.batch for im in got] == ["x", "x", "y", "loose"]
    with pytest.raises(QcloopError, match="batch.key 'message'"):
        find_images(tmp_path, BatchConfig(key="message"))


def test_particle_columns_have_dtypes_and_units():
    table = dataset.column_table().set_index("column")
    assert list(table.index) == [*PARTICLE_COLUMNS, "class", "class_probability", "batch"]
    assert table.loc["ecd_nm", "unit"] == "nm" and table.loc["ecd_px", "unit"] == "px"
    assert table.loc["area_nm2", "unit"] == "nm^2" and table.loc["area_px", "unit"] == "px^2"
    assert table.loc["orientation_deg", "unit"] == "deg" and table.loc["circularity", "unit"] == "1"
    assert table.loc["touches_border", "dtype"] == "bool" and table.loc["lobes", "dtype"] == "int64"
    assert table.loc["class", "dtype"] == "str" and table.loc["class_probability", "dtype"] == "float64"
    schema = dataset.particle_schema()
    assert schema.field("ecd_nm").metadata[b"unit"] == b"nm"
    assert (table["description"].str.len() > 5).all()


def test_docs_list_every_column_with_its_unit():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "archive.md").read_text(encoding="utf-8")
    for row in dataset.column_table().itertuples():
        assert f"| `{row.column}` | {row.dtype} | {row.unit or '–'} |" in doc, row.column


def test_batch_names_are_safe_folder_names_and_read_back_as_strings(tmp_path):
    import pyarrow.parquet as pq

    assert dataset.batch_dir("..") == "%2E%2E" and dataset.batch_dir("a/b") == "a%2Fb"
    assert dataset.batch_dir("B 7") == "B 7"
    root = tmp_path / "particles.parquet"
    for name in ("42", "0042"):  # numbers: pyarrow alone would read them back as integers
        part = root / dataset.partition_dir(name)
        part.mkdir(parents=True)
        frame = small_outcome(name=f"{name}_01")["particles"]
        pq.write_table(dataset.particles_table(frame), part / "part-0.parquet")
    back = dataset.read_particles(root)
    assert back["batch"].dtype == "category" and sorted(back["batch"].unique()) == ["0042", "42"]
    assert back["particle_id"].dtype == "int64" and back["touches_border"].dtype == bool
    assert back["corners"].isna().all()  # columns a table lacks are written empty, typed


def test_archive_command_refuses_bad_input_before_any_work(tmp_path, capsys):
    from qcloop.cli import main

    (tmp_path / "root").mkdir()
    with pytest.raises(SystemExit) as exc:  # argparse: exit 2 with the reason
        main(["archive", str(tmp_path / "root"), "--out", str(tmp_path / "o"), "--cluster", "sched:8786"])
    assert exc.value.code == 2 and "expected local, local:N" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["batch", str(tmp_path), "--out", str(tmp_path / "o"), "--cluster", "local:0"])
    assert "whole number of workers" in capsys.readouterr().err
    assert main(["archive", str(tmp_path / "root"), "--out", str(tmp_path / "o")]) == 2
    assert "no images found" in capsys.readouterr().err
    assert main(["archive", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["archive", str(tmp_path / "root"), "--out", str(tmp_path / "o"),
                 "--model", str(tmp_path / "m.json")]) == 2
    assert "model file not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
