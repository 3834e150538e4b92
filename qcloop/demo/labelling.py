"""The demo's few-shot classifier, trained the way a chemist trains one, and its score.

1. The simulated line makes a *labelling batch* at known setpoints: its SEM images go to
   ``OUT/labelling/images``, the generator's ground truth to ``OUT/labelling/truth`` (apart).
2. ``qcloop crops export`` (the CLI's own code path, :func:`qcloop.cli.main`) writes one crop
   per particle to ``OUT/labelling/crops``.
3. The chemist sorts :data:`PER_CLASS` crops per class into ``crops/<class>/``. Here the
   generator's truth plays the chemist: a crop goes into the folder of the true particle its
   centroid matches. This is the only use of the truth before training; the daemon's
   predictions never see it.
4. ``qcloop train --kind rf`` (again the CLI's code path) fits the classifier on those crops and writes
   the model the daemon loads through ``pipeline.classifier``.

:func:`score_tables` scores what the daemon predicted on the demo's own images against the
generator's truth (macro-F1, particles matched by centroid).
"""

from __future__ import annotations

import contextlib
import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from qcloop.demo.broker import DemoError

#: crops the "chemist" sorts per class (the labelling workflow asks for 5-10)
PER_CLASS = 10
#: the classifier ``qcloop train --kind`` fits. Random forest: on the demo's line (40 crops from the
#: ill-defined labelling batch, 6 seeds' campaigns) logistic regression labelled 5-9 % of the sharp
#: late spheres "cube" (its linear boundary is drawn between rounded seeds), which wrecks the
#: silhouette of a 93 %-sphere batch; the forest 1-2 % (macro-F1 0.995 vs 0.93 on seed 1's campaign)
KIND = "rf"
#: a detected particle is the true one when their centroids are within this share of its ECD
MATCH_ECD_FRACTION = 0.25


def truth_classes(detected: pd.DataFrame, truth: pd.DataFrame) -> pd.Series:
    """True class of each detected particle (NaN where no interior true particle matches).

    ``detected`` has ``centroid_x_px`` / ``centroid_y_px``; ``truth`` is a generator truth table
    (:data:`qcloop.synth.TRUTH_COLUMNS`). Matching: :func:`qcloop.synth.match_centroids`
    (mutual nearest neighbours within :data:`MATCH_ECD_FRACTION` of the true ECD).
    """
    from qcloop.synth import match_centroids

    out = pd.Series(np.nan, index=detected.index, dtype=object)
    pairs = match_centroids(detected[["centroid_x_px", "centroid_y_px"]].to_numpy(float),
                            truth[["visible_centroid_x_px", "visible_centroid_y_px"]].to_numpy(float),
                            MATCH_ECD_FRACTION * truth["ecd_px"].to_numpy(float))
    for i, j in pairs:
        if not bool(truth["touches_border"].iloc[j]):
            out.iloc[i] = truth["class"].iloc[j]
    return out


def _run_cli(argv: list[str], what: str) -> str:
    """Run one ``qcloop`` sub-command in this process; its stdout (DemoError when it fails)."""
    from qcloop.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    if rc != 0:
        raise DemoError(f"{what} failed (exit {rc}):\n{buf.getvalue()}")
    return buf.getvalue()


def sort_crops(crops: Path, truth_dir: Path, *, per_class: int = PER_CLASS, seed: int = 0) -> dict[str, int]:
    """Move ``per_class`` exported crops per true class into ``crops/<class>/``; the counts."""
    index = pd.read_csv(crops / "crops.csv")
    labels = pd.Series(np.nan, index=index.index, dtype=object)
    for image, rows in index.groupby("image"):
        truth = pd.read_csv(truth_dir / f"{Path(str(image)).stem}.csv")
        labels.loc[rows.index] = truth_classes(rows, truth).to_numpy()
    rng = np.random.default_rng(seed)
    counts = {}
    for cls in sorted(labels.dropna().unique()):
        names = index.loc[labels == cls, "crop"].to_numpy()
        pick = rng.choice(names, min(per_class, len(names)), replace=False)
        (crops / cls).mkdir(exist_ok=True)
        for name in pick:
            shutil.move(str(crops / name), crops / cls / name)
        counts[str(cls)] = len(pick)
    return counts


def train_classifier(images: Iterable[Path], truth_dir: Path, work: Path, config: Path, model: Path, *,
                     per_class: int = PER_CLASS, seed: int = 0, kind: str = KIND,
                     echo: Callable[[str], None] = print) -> dict[str, int]:
    """Crops export, sorting by truth, training (steps 2-4 of the module docstring).

    Returns the number of crops sorted per class. Raises DemoError when a step fails or a
    class has fewer than 5 crops (too few for the chemist's labelling).
    """
    crops = work / "crops"
    shutil.rmtree(crops, ignore_errors=True)
    images = [str(p) for p in images]
    out = _run_cli(["crops", "export", *images, "--out", str(crops), "--config", str(config)], "crops export")
    echo("  " + out.strip().splitlines()[0])
    counts = sort_crops(crops, truth_dir, per_class=per_class, seed=seed)
    few = {c: n for c, n in counts.items() if n < 5}
    if few or len(counts) < 2:
        raise DemoError(f"the labelling batch has too few crops of some class: {counts}")
    echo("  sorted by the chemist (played by the generator's truth): "
         + ", ".join(f"{c} {n}" for c, n in counts.items()) + f" crops into {crops}/<class>/")
    out = _run_cli(["train", str(crops), "--out", str(model), "--config", str(config), "--seed", str(seed),
                    "--kind", kind], "train")
    echo("  " + " | ".join(line.strip() for line in out.strip().splitlines()[:2]))
    return counts


@dataclass(frozen=True)
class ClassifierScore:
    """Predicted vs true classes of the matched interior particles of a set of images."""

    macro_f1: float
    per_class_f1: dict[str, float] = field(default_factory=dict)
    n_matched: int = 0
    n_detected: int = 0


def score_tables(tables: Iterable[pd.DataFrame], truth_dir: Path) -> ClassifierScore:
    """Macro-F1 of the ``class`` column of particle tables (one per image, column ``image`` = the
    file stem) against ``truth_dir/<stem>.csv``; particles cut by the border are left out, a
    particle predicted ``unknown`` counts as wrong."""
    from sklearn.metrics import f1_score

    y_true: list[str] = []
    y_pred: list[str] = []
    n_detected = 0
    for p in tables:
        if p.empty:
            continue
        p = p[~p["touches_border"].astype(bool)]
        n_detected += len(p)
        truth = pd.read_csv(truth_dir / f"{p['image'].iloc[0]}.csv")
        cls = truth_classes(p, truth)
        keep = cls.notna().to_numpy()
        y_true += [str(c) for c in cls[keep]]
        y_pred += [str(c) for c in p.loc[keep, "class"]]
    if not y_true:
        raise DemoError(f"no predicted particle matches a true particle in {truth_dir}")
    labels = sorted(set(y_true))
    per = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return ClassifierScore(float(np.mean(per)), {c: float(f) for c, f in zip(labels, per)}, len(y_true), n_detected)
