"""Few-shot classification of real SEM particles: spheres, dumbbells, trimers (Konstanz images).

Ground truth (issue): the NanoparticlesSAM reference masks (``reference_sam_vith.csv``). A
particle found by the pipeline is labelled

* ``sphere``   in GM_59_*  when its centroid is within 10 px of a reference sphere mask;
* ``dumbbell`` in GM_116_* when within 10 px of the mean lobe centroid of a 2-mask group;
* ``trimer``   in GM_124_* when within 10 px of the mean lobe centroid of a 3-mask group.

(One-to-one: mutual nearest neighbours.) Unmatched particles are left out. The classifier is
trained through the labelling workflow on 10 crops per class from GM_59_20, GM_116_20 and
GM_124_00 (crops exported, sorted into class folders, ``build_training_set`` re-embeds them)
and tested on the matched particles of the other 12 images: macro-F1 >= 0.9.

Each image is analysed once (results are cached for the export, the training and the test).
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qcloop.classify import Classifier, macro_f1
from qcloop.config import load_settings
from qcloop.crops import build_training_set, collect_labelled, export_crops, read_index, write_index
from qcloop.pipeline import Pipeline
from qcloop.synth import match_centroids

pytestmark = [pytest.mark.real_data, pytest.mark.slow]

SERIES = {"GM_59": "sphere", "GM_116": "dumbbell", "GM_124": "trimer"}
TRAIN_IMAGES = ("GM_59_20", "GM_116_20", "GM_124_00")
MATCH_PX = 10.0


def reference_targets(csv: Path) -> dict[str, tuple[str, np.ndarray]]:
    """image -> (class, (k, 2) reference particle centres as x, y px)."""
    ref = pd.read_csv(csv)
    rc = np.array([ast.literal_eval(v) for v in ref["centroid_rc"]], float)
    ref["x"], ref["y"] = rc[:, 1], rc[:, 0]
    out = {}
    for image, grp in ref.groupby("image"):
        series = image.rsplit("_", 1)[0]
        cls = SERIES[series]
        if cls == "sphere":
            xy = grp[["x", "y"]].to_numpy()
        else:
            want = 2 if cls == "dumbbell" else 3
            g = grp.dropna(subset=["group_id"]).groupby("group_id")
            xy = np.array([[m["x"].mean(), m["y"].mean()] for _, m in g if len(m) == want]).reshape(-1, 2)
        out[image] = (cls, xy)
    return out


@pytest.fixture(scope="module")
def analysed(sem_data):
    folder = sem_data / "konstanz"
    targets = reference_targets(folder / "reference_sam_vith.csv")
    pipe = Pipeline.from_settings(load_settings(use_env=False), embed=True)
    results, labels = {}, {}
    for path in sorted(folder.glob("GM_*.tif")):
        res = pipe.analyze(path)
        results[path.resolve()] = res
        cls, xy = targets[path.stem]
        p = res.particles.reset_index(drop=True)
        pairs = match_centroids(p[["centroid_x_px", "centroid_y_px"]].to_numpy(float), xy, MATCH_PX)
        lab = pd.Series(np.nan, index=p.index, dtype=object)
        for i, _ in pairs:
            lab.iloc[i] = cls
        labels[path.stem] = (p["particle_id"].to_numpy(), lab.to_numpy())
    return pipe, results, labels


def test_ten_crops_per_class_classify_the_other_twelve_images(analysed, tmp_path):
    pipe, results, labels = analysed
    by_stem = {p.stem: (p, r) for p, r in results.items()}
    crops_dir = tmp_path / "crops"
    rng = np.random.default_rng(0)
    rows = []
    for stem in TRAIN_IMAGES:
        path, res = by_stem[stem]
        rows += export_crops(res, crops_dir)
        ids, lab = labels[stem]
        cls = SERIES[stem.rsplit("_", 1)[0]]
        exported = {int(r["particle_id"]) for r in rows if r["crop"].startswith(stem + "__")}
        candidates = [int(i) for i, c in zip(ids, lab) if c == cls and int(i) in exported]
        assert len(candidates) >= 10, f"{stem}: only {len(candidates)} matched {cls} particles"
        (crops_dir / cls).mkdir(exist_ok=True)
        for pid in rng.choice(candidates, 10, replace=False):
            name = f"{stem}__p{int(pid):04d}.png"
            shutil.move(str(crops_dir / name), crops_dir / cls / name)
    write_index(rows, crops_dir)

    def analyze(path: Path):
        return results[Path(path).resolve()]

    train = build_training_set(collect_labelled(crops_dir), read_index([crops_dir]), analyze)
    assert train.counts == {"dumbbell": 10, "sphere": 10, "trimer": 10}
    model = Classifier.fit(train.X, train.y, embedder_spec=pipe.embedder.spec)
    model = Classifier.load(model.save(tmp_path / "model.json"))

    truth, pred, per_image = [], [], []
    for path, res in sorted(results.items()):
        if path.stem in TRAIN_IMAGES:
            continue
        ids, lab = labels[path.stem]
        keep = pd.notna(lab)
        annotated = model.annotate(res.particles.reset_index(drop=True), res.embeddings, unknown_below=0.0)
        truth += list(lab[keep])
        pred += list(annotated["class"].to_numpy()[keep])
        per_image.append((path.stem, int(keep.sum())))
    assert len(per_image) == 12
    assert all(n >= 10 for _, n in per_image), per_image
    f1 = macro_f1(truth, pred, ["sphere", "dumbbell", "trimer"])
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(truth, pred, labels=["sphere", "dumbbell", "trimer"])
    print(f"\nreal images: macro-F1 {f1:.3f} on {len(truth)} matched particles of 12 images\n{cm}")
    assert f1 >= 0.9

