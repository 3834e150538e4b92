"""``qcloop eval PRED... --truth DIR [--min-area N] [--config FILE] [--out DIR] [--kind auto|labels|images]``.

Scores segmentations against ground-truth label masks (see :mod:`qcloop.evaluate` for the exact
rules): per image and overall precision, recall and F1 at IoU >= 0.5, mean F1 over IoU
0.50:0.95, mean IoU of the matched particles and the count ratio. The table is printed and
written to ``DIR/eval.csv`` (default: the current folder); images that could not be scored go
to ``DIR/eval_failed.csv`` (exit code 1).

PRED (files or folders) are label images or images to analyse. ``--kind auto`` (default): a
TIFF written by ``qcloop analyze --labels`` / ``qcloop synth --labels`` (it carries a qcloop
marker) is a label image, anything else is analysed with the configured pipeline; ``--kind
labels`` reads every PRED as a label image (first page, 0 = background), ``--kind images``
analyses every PRED.

Truth is matched by file stem: for PRED ``<stem>.*`` the first of ``<stem>_labels``,
``<stem>_m``, ``<stem>_mask``, ``<stem>`` with suffix ``.tif``, ``.tiff`` or ``.png`` found in
the truth folder (never PRED itself; a PRED that is another PRED's truth, e.g. the
``<stem>_labels.tif`` that ``qcloop synth --labels`` writes beside ``<stem>.tif``, is not scored
itself, so ``qcloop eval DIR --truth DIR`` works on such a folder). A truth with one non-zero value (a drawn binary mask, e.g.
0/255 with 1-px lines between touching particles) is split into 4-connected components; a label
image keeps its objects. A truth of the full frame is cut to the analysed rows (banner) of the
prediction. ``--min-area N`` drops truth objects under N px and ignores unmatched predictions
under N px or lying mostly on dropped truth.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from qcloop.errors import InputImageError, QcloopError

TRUTH_SUFFIXES = ("_labels", "_m", "_mask", "")
"""Truth file name = ``<stem><suffix><ext>``, tried in this order."""
TRUTH_EXTENSIONS = (".tif", ".tiff", ".png")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score segmentations against ground-truth label masks",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, metavar="PRED", help="label images or images to analyse")
    p.add_argument("--truth", required=True, type=Path, metavar="DIR", help="folder of ground-truth masks")
    p.add_argument("--min-area", type=int, default=0, metavar="N", help="sliver filter in px (default 0: off)")
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration (for images to analyse)")
    p.add_argument("--out", type=Path, default=Path("."), metavar="DIR", help="where eval.csv goes (default .)")
    p.add_argument("--kind", choices=("auto", "labels", "images"), default="auto",
                   help="what PRED files are (default auto: qcloop label TIFFs are labels, the rest images)")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders of PRED folders")
    p.set_defaults(func=run)


def find_truth(truth_dir: Path, stem: str, exclude: Path | None = None) -> Path | None:
    """The truth file of ``stem`` in ``truth_dir`` (naming rule in the module docstring), or None."""
    for suffix in TRUTH_SUFFIXES:
        for ext in TRUTH_EXTENSIONS:
            cand = truth_dir / f"{stem}{suffix}{ext}"
            if cand.is_file() and (exclude is None or not _same(cand, exclude)):
                return cand
    return None


def drop_truth_files(preds: list[Path], truth_dir: Path) -> list[Path]:
    """PRED files without those that are another PRED's truth (a folder holding both)."""
    truths = {find_truth(truth_dir, p.stem, exclude=p) for p in preds}
    return [p for p in preds if not any(t is not None and _same(p, t) for t in truths)]


def _same(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def run(args: argparse.Namespace) -> int:
    from qcloop.commands.analyze import collect_images
    from qcloop.evaluate import score_table

    if not args.truth.is_dir():
        raise QcloopError(f"--truth: no such folder: {args.truth}")
    if args.min_area < 0:
        raise QcloopError(f"--min-area must be >= 0, got {args.min_area}")
    preds = drop_truth_files(collect_images(args.paths, args.recursive), args.truth)
    if not preds:
        raise QcloopError("no images found in " + ", ".join(str(p) for p in args.paths))
    scorer = _Scorer(args)
    scores, failures = [], []
    for path in tqdm(preds, desc="eval", unit="img", file=sys.stderr, disable=None):
        try:
            scores.append(scorer.score(path))
        except (InputImageError, ValueError, OSError) as exc:
            reason = exc.reason if isinstance(exc, InputImageError) else str(exc)
            failures.append({"image": path.stem, "path": str(path), "reason": reason})
            tqdm.write(f"qcloop: skipped {path}: {reason}", file=sys.stderr)
    if not scores:
        raise QcloopError("no image could be scored: " + "; ".join(f["reason"] for f in failures[:3]))
    table = score_table(scores)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "eval.csv", index=False)
    if failures:
        pd.DataFrame(failures).to_csv(args.out / "eval_failed.csv", index=False)
    print(format_scores(table))
    print(f"wrote {args.out / 'eval.csv'} ({len(scores)} image(s), min_area {args.min_area} px)"
          + (f", {len(failures)} failed (see {args.out / 'eval_failed.csv'})" if failures else ""))
    return 1 if failures else 0


COUNT_COLUMNS = ("n_truth", "n_pred", "tp", "fp", "fn", "dropped_truth", "ignored_pred")


def format_scores(table: pd.DataFrame) -> str:
    """The score table for the terminal: counts as integers (one decimal in the mean row)."""
    def count(v: float) -> str:
        return f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}"

    formatters = {c: count for c in COUNT_COLUMNS}
    return table.to_string(index=False, formatters=formatters, float_format=lambda v: f"{v:.3f}", na_rep="-")


class _Scorer:
    """Reads or computes one prediction, finds and reads its truth, scores the pair."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self._pipeline = None

    @property
    def pipeline(self):
        if self._pipeline is None:
            from qcloop.config import load_settings
            from qcloop.pipeline import Pipeline

            self._pipeline = Pipeline.from_settings(load_settings(self.args.config), embed=False)
        return self._pipeline

    def prediction(self, path: Path):
        """(labels, seconds) of one PRED: read, or analysed with the pipeline."""
        from qcloop.labels_io import is_label_tiff, read_label_image

        kind = self.args.kind
        if kind == "labels" or (kind == "auto" and is_label_tiff(path)):
            return read_label_image(path), float("nan")
        result = self.pipeline.analyze(path)
        return result.masks.labels, result.seconds

    def score(self, path: Path):
        from qcloop.evaluate import crop_truth, evaluate_labels, truth_from_binary
        from qcloop.labels_io import read_label_image

        truth_path = find_truth(self.args.truth, path.stem, exclude=path)
        if truth_path is None:
            tried = ", ".join(f"{path.stem}{s}.tif" for s in TRUTH_SUFFIXES)
            raise ValueError(f"no truth for {path.stem} in {self.args.truth} (tried {tried}, also .tiff/.png)")
        pred, seconds = self.prediction(path)
        truth = crop_truth(truth_from_binary(read_label_image(truth_path)), pred.shape)
        return evaluate_labels(truth, pred, min_area=self.args.min_area, name=path.stem, seconds=seconds)
