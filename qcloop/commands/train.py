"""``qcloop train DIR --out MODEL [--validation DIR2] [--config FILE] [--kind KIND]``.

Fits the particle-shape classifier from crops sorted into ``DIR/<class>/`` (exported by
``qcloop crops export``; the ``crops.csv`` index must be in DIR or its parent). Each source
image is analysed again with the configured segmenter and embedder, so training embeddings are
computed exactly as at prediction time. Writes ``MODEL`` (JSON) and ``MODEL`` with ``.npz``
(arrays; no pickle). Without ``--validation`` the kind defaults to logistic regression; with it,
to ``auto``: a grid search over logistic regression, SVM, random forest and naive Bayes scored
by macro-F1 on the validation crops. Then set ``pipeline.classifier: MODEL`` in the config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from qcloop.errors import QcloopError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the shape classifier from sorted crops", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, metavar="DIR", help="folder with one sub-folder of crops per class")
    p.add_argument("--out", required=True, type=Path, metavar="MODEL", help="model file to write (.json)")
    p.add_argument("--validation", type=Path, metavar="DIR2", help="sorted validation crops (same layout)")
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration")
    p.add_argument("--kind", choices=["logreg", "svm", "rf", "nb", "auto"], default=None,
                   help="classifier (default: logreg; auto with --validation)")
    p.add_argument("--index", type=Path, action="append", default=[], metavar="CSV",
                   help="extra crops.csv index (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="random state for svm / rf (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qcloop.classify import Classifier
    from qcloop.config import load_settings
    from qcloop.crops import (SETTINGS_NAME, build_training_set, collect_labelled, read_index,
                              segmentation_fingerprint)
    from qcloop.pipeline import Pipeline

    settings = load_settings(args.config)
    pipeline_cfg = settings.pipeline.model_copy(update={"classifier": None})
    pipeline = Pipeline(settings.imaging, pipeline_cfg, embed=True)
    cache: dict[Path, object] = {}

    def analyze(path: Path):
        key = path.resolve()
        if key not in cache:
            cache[key] = pipeline.analyze(key)
        return cache[key]

    current = segmentation_fingerprint(settings)["segmentation_hash"]

    def load_set(folder: Path, what: str):
        labelled = collect_labelled(folder)
        index = read_index([folder.parent, folder, *args.index])
        for f in sorted(set(index.get("index_file", []))):
            saved = Path(f).with_name(SETTINGS_NAME)
            try:
                exported = json.loads(saved.read_text(encoding="utf-8")).get("segmentation_hash")
            except (OSError, ValueError):
                continue
            if exported and exported != current:
                print(f"qcloop: warning: the crops in {Path(f).parent} were exported with other segmentation "
                      "settings; particles that moved will be reported", file=sys.stderr)
        progress = lambda it: tqdm(it, desc=f"{what} images", unit="img", file=sys.stderr, disable=None)  # noqa: E731
        return build_training_set(labelled, index, analyze, progress=progress)

    train = load_set(args.folder, "training")
    validation = load_set(args.validation, "validation") if args.validation else None
    kind = args.kind or ("auto" if validation is not None else "logreg")
    if kind == "auto" and validation is None:
        raise QcloopError("--kind auto needs --validation DIR2")
    model = Classifier.fit(train.X, train.y, kind, embedder_spec=pipeline.embedder.spec,
                           validation=(validation.X, validation.y) if validation is not None else None,
                           seed=args.seed)
    path = model.save(args.out)
    print(model.summary())
    print(f"wrote {path} and {path.with_suffix('.npz').name}")
    return 0
