"""``qcloop embed select-preprocessing DIR``: choose the DINOv2 crop preprocessing.

DIR holds labelled particles in one sub-folder per class, in either form:

* sorted crops from ``qcloop crops export`` (``DIR/<class>/<image>__p<id>.png`` with the
  ``crops.csv`` index in DIR or its parent): each source image is segmented again with the
  configured pipeline and the labelled particles' masks are cut from it (the same check as
  ``qcloop train``: a particle that moved means the segmentation changed → error);
* or plain pairs ``DIR/<class>/<name>.png`` (grey crop) + ``<name>.mask.png`` (non-zero =
  particle), when there is no ``crops.csv``.

Every candidate preprocessing (input masked with background 0, 0.5 or 1, or the mask itself;
CLS or CLS + mean patch token) embeds every particle with the configured DINOv2 model; the one
with the largest mean distance between class centroids (L2-normalised embeddings) wins. The
ranking is printed with the YAML lines to put under ``pipeline.dinov2``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qcloop.config import load_settings
from qcloop.errors import QcloopError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embedding utilities (DINOv2 preprocessing choice)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    esub = p.add_subparsers(dest="embed_command", metavar="ACTION", required=True)
    s = esub.add_parser("select-preprocessing", help="rank DINOv2 crop preprocessings on labelled particles",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("dir", type=Path, metavar="DIR", help="folder with one sub-folder of crops per class")
    s.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration (model, segmentation)")
    s.add_argument("--out", type=Path, metavar="CSV", help="also write the ranking as CSV")
    s.set_defaults(func=run_select)


def load_mask_pairs(folder: Path) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[str]]:
    """``<class>/<name>.png`` + ``<class>/<name>.mask.png`` pairs → (grey, mask) crops, classes."""
    from PIL import Image

    crops, classes = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        for f in sorted(sub.glob("*.png")):
            if f.name.endswith(".mask.png"):
                continue
            mpath = f.with_name(f.stem + ".mask.png")
            if not mpath.is_file():
                raise QcloopError(f"{f}: no mask {mpath.name} beside it (and no crops.csv in "
                                  f"{folder} or its parent)")
            grey = np.asarray(Image.open(f).convert("L"), np.float32) / 255.0
            mask = np.asarray(Image.open(mpath).convert("L")) > 0
            if grey.shape != mask.shape:
                raise QcloopError(f"{mpath}: size {mask.shape} differs from {f.name} {grey.shape}")
            if not mask.any():
                raise QcloopError(f"{mpath}: empty mask")
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
            crops.append((grey[sl], mask[sl]))
            classes.append(sub.name)
    return crops, classes


def load_exported(folder: Path, settings) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[str]]:
    """Sorted crops of ``qcloop crops export``: re-segment their images, cut their masks."""
    from dataclasses import replace

    from qcloop.crops import build_training_set, collect_labelled, read_index
    from qcloop.embed.dinov2 import particle_crops
    from qcloop.embed.morphology import particle_ids
    from qcloop.pipeline import Pipeline

    labelled = collect_labelled(folder)
    index = read_index([folder.parent, folder])
    pipeline = Pipeline(settings.imaging, settings.pipeline.model_copy(update={"classifier": None}),
                        embed=False)
    crops: list[tuple[np.ndarray, np.ndarray]] = []

    def analyze(path: Path):
        # The training-set builder matches labelled crops to particles (with its moved-centroid
        # check) and returns result.embeddings rows; here each "embedding" is the index of the
        # particle's (grey, mask) crop in `crops`.
        result = pipeline.analyze(path)
        ids = [int(i) for i in particle_ids(result.particles, result.masks)]
        start = len(crops)
        crops.extend(particle_crops(result.image, result.masks, ids))
        return replace(result, embeddings=np.arange(start, len(crops), dtype=np.float64)[:, None])

    ts = build_training_set(labelled, index, analyze,
                            progress=lambda it: tqdm(it, desc="segmenting", unit="image"))
    picked = [crops[int(i)] for i in ts.X[:, 0]]
    return picked, list(ts.y)


def run_select(args: argparse.Namespace) -> int:
    from qcloop.crops import INDEX_NAME
    from qcloop.embed.dinov2 import select_preprocessing, spec_for

    folder: Path = args.dir
    if not folder.is_dir():
        raise QcloopError(f"no such folder: {folder}")
    settings = load_settings(args.config)
    if (folder / INDEX_NAME).is_file() or (folder.parent / INDEX_NAME).is_file():
        crops, classes = load_exported(folder, settings)
    else:
        crops, classes = load_mask_pairs(folder)
    if len(set(classes)) < 2:
        raise QcloopError(f"{folder}: need labelled particles of at least two classes, found "
                          f"{sorted(set(classes)) or 'none'}")
    res = select_preprocessing(crops, classes, settings.pipeline.dinov2)
    counts = {c: classes.count(c) for c in sorted(set(classes))}
    print(f"{len(crops)} particles: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    print(res.table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    b = res.best
    print(f"\nbest: {spec_for(b)}\npipeline:\n  dinov2:\n    mode: crop\n    input: {b.input}\n"
          f"    background_value: {b.background_value:g}\n    token: {b.token}")
    if args.out:
        res.table.to_csv(args.out, index=False)
    return 0
