"""Labelling workflow end to end on synthetic TIFFs: crops export → sort → train → analyze.

Everything goes through the real CLI and the real pipeline (classical segmentation, lobe
grouping, measurement, morphology embedding); the "chemist" sorting crops is played by the
ground truth: a crop goes into the folder of the true particle whose centroid it matches.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from qcloop.classify import Classifier, macro_f1
from qcloop.cli import main
from qcloop.synth import SynthSpec, generate_image, match_centroids, write_image

SIX = ("sphere", "cube", "triangle", "truncated_triangle", "rod", "dumbbell")
SPEC = SynthSpec(class_mix={c: 1.0 for c in SIX}, width_px=512, height_px=400, pixel_size_nm=2.0,
                 mean_ecd_nm=50.0, size_cv=0.08, coverage=0.3, touching_fraction=0.3, overlap_fraction=0.05,
                 banner=True)


def truth_of(image_path) -> pd.DataFrame:
    return pd.read_csv(str(image_path).rsplit(".", 1)[0] + ".csv")


def crop_classes(index: pd.DataFrame) -> pd.Series:
    """True class of each exported crop (NaN when it matches no true particle)."""
    out = pd.Series(np.nan, index=index.index, dtype=object)
    for image, grp in index.groupby("image"):
        t = truth_of(image)
        pairs = match_centroids(grp[["centroid_x_px", "centroid_y_px"]].to_numpy(float),
                                t[["visible_centroid_x_px", "visible_centroid_y_px"]].to_numpy(float),
                                0.25 * t["ecd_px"].to_numpy(float))
        for i, j in pairs:
            if not t.loc[j, "touches_border"]:
                out.loc[grp.index[i]] = t.loc[j, "class"]
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelling")
    imgs = root / "images"
    train, test = [], []
    for i in range(3):
        train.append(write_image(imgs / f"train_{i}.tif", generate_image(SPEC, 100 + i))[0])
    for i in range(2):
        test.append(write_image(imgs / f"test_{i}.tif", generate_image(SPEC, 200 + i))[0])
    cfg = root / "qcloop.yaml"
    cfg.write_text("pipeline:\n  segmenter: classical\n  embedder: morphology\n")
    return root, train, test, cfg


@pytest.fixture(scope="module")
def exported(workspace):
    root, train, _, cfg = workspace
    crops = root / "crops"
    rc = main(["crops", "export", *map(str, train), "--out", str(crops), "--config", str(cfg)])
    assert rc == 0
    return crops


def test_export_writes_one_named_crop_per_particle_and_an_index(exported, workspace):
    root, train, _, _ = workspace
    index = pd.read_csv(exported / "crops.csv")
    pngs = sorted(p.name for p in exported.glob("*.png"))
    assert sorted(index["crop"]) == pngs and len(pngs) > 100
    assert index["crop"].str.match(r"^train_[012]__p\d{4}\.png$").all()
    assert set(index["image"]) == {str(p.resolve()) for p in train}
    assert not index["touches_border"].any()  # border particles are skipped by default
    row = index.iloc[0]
    assert row["crop"] == f"{row['crop'].split('__p')[0]}__p{int(row['particle_id']):04d}.png"
    from PIL import Image

    im = Image.open(exported / row["crop"])
    assert im.mode == "L"
    h, w = row["bbox_r1"] - row["bbox_r0"], row["bbox_c1"] - row["bbox_c0"]
    assert im.size[0] >= w and im.size[1] >= h  # bbox plus a margin
    settings = json.loads((exported / "crops.json").read_text())
    assert settings["settings"]["segmenter"] == "classical"


@pytest.fixture(scope="module")
def sorted_crops(exported):
    """10 crops per class into <class>/, 6 more per class into _val/<class>/ (ignored by training)."""
    index = pd.read_csv(exported / "crops.csv")
    cls = crop_classes(index)
    rng = np.random.default_rng(0)
    for c in SIX:
        names = index["crop"][cls == c].to_numpy()
        assert len(names) >= 16, f"only {len(names)} matched crops of {c}"
        pick = rng.choice(names, 16, replace=False)
        for k, name in enumerate(pick):
            dest = exported / (c if k < 10 else f"_val/{c}")
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(exported / name, dest / name)
    return exported


def test_train_then_analyze_classifies_held_out_images(sorted_crops, workspace, capsys):
    root, _, test, cfg = workspace
    model_path = root / "model.json"
    # logistic regression, its C chosen on the validation crops (the grid over all four kinds,
    # --kind auto, is exercised in test_classify.py)
    rc = main(["train", str(sorted_crops), "--out", str(model_path), "--config", str(cfg),
               "--validation", str(sorted_crops / "_val"), "--kind", "logreg"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "training counts: " in out and all(f"{c}=10" in out for c in SIX)
    assert "validation (36 particles)" in out and "selected" in out
    model = Classifier.load(model_path)
    assert model.kind == "logreg"
    assert model.training_counts == {c: 10 for c in sorted(SIX)}
    assert model.embedder_spec == "morphology-v1"
    assert model.validation_scores["validation_counts"] == {c: 6 for c in sorted(SIX)}
    assert model.validation_scores["selected_macro_f1"] >= 0.8

    cfg2 = root / "with_model.yaml"
    cfg2.write_text(f"pipeline:\n  classifier: {model_path.name}\n  unknown_below: 0.0\n")
    res = root / "analysis"
    assert main(["analyze", *map(str, test), "--out", str(res), "--config", str(cfg2)]) == 0
    particles = pd.read_csv(res / "particles.csv")
    assert {"class", "class_probability"} <= set(particles.columns)
    truth_all, pred_all = [], []
    for path in test:
        t = truth_of(path)
        p = particles[particles["image"] == path.stem].reset_index(drop=True)
        pairs = match_centroids(p[["centroid_x_px", "centroid_y_px"]].to_numpy(float),
                                t[["visible_centroid_x_px", "visible_centroid_y_px"]].to_numpy(float),
                                0.25 * t["ecd_px"].to_numpy(float))
        for i, j in pairs:
            if not (p.loc[i, "touches_border"] or t.loc[j, "touches_border"]):
                truth_all.append(t.loc[j, "class"])
                pred_all.append(p.loc[i, "class"])
    assert len(truth_all) >= 100
    f1 = macro_f1(truth_all, pred_all, SIX)
    print(f"held-out macro-F1 {f1:.3f} on {len(truth_all)} particles")
    assert f1 >= 0.85


def test_training_errors_are_clear(sorted_crops, workspace, tmp_path, capsys):
    root, _, _, cfg = workspace
    # crops without their index
    lonely = tmp_path / "lonely"
    shutil.copytree(sorted_crops / "sphere", lonely / "sphere")
    shutil.copytree(sorted_crops / "cube", lonely / "cube")
    assert main(["train", str(lonely), "--out", str(tmp_path / "m.json"), "--config", str(cfg)]) == 2
    assert "crops.csv" in capsys.readouterr().err
    # the index says the particle was elsewhere: segmentation changed since the export
    moved = tmp_path / "moved"
    shutil.copytree(sorted_crops / "sphere", moved / "sphere")
    shutil.copytree(sorted_crops / "cube", moved / "cube")
    index = pd.read_csv(sorted_crops / "crops.csv")
    index["centroid_x_px"] += 7.0
    index.to_csv(moved / "crops.csv", index=False)
    assert main(["train", str(moved), "--out", str(tmp_path / "m.json"), "--config", str(cfg)]) == 2
    assert "moved" in capsys.readouterr().err
    # a reserved class name
    (moved / "unknown").mkdir()
    assert main(["train", str(moved), "--out", str(tmp_path / "m.json"), "--config", str(cfg)]) == 2
    assert "reserved" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()
