"""Segmentation benchmark: one table over real and synthetic data, default config, issue 11 targets.

Runs the real :class:`qcloop.pipeline.Pipeline` (segmentation + lobes + measurement, no embedding)
with the default configuration (no per-data-set setting) and scores it with
:mod:`qcloop.evaluate`. Data sets and what is scored:

``konstanz``
    The 15 shared Konstanz images against ``reference_sam_vith.csv`` (SAM ViT-H masks, filtered
    by its authors: not a full count, and no masks on disk, only area, centroid and box). Scored:
    *reference particles found* (recall; a reference particle is a mask, or for dumbbells and
    trimers a ``group_id``; found = one-to-one centroid match with one of ours,
    ``qcloop.synth.match_centroids``, within 0.3 x the reference particle's equivalent diameter)
    and the *mean box IoU* of those pairs (bounding boxes: mask IoU cannot be computed without
    masks); precision and F1 are not defined against a filtered reference. Then the issue's
    Konstanz figures, computed by ``bench/analyze.py``'s ``accuracy`` (spheres found within 5 px,
    mean ECD, dumbbells as ``lobes = 2``, lobe diameter, trimers as ``lobes = 3``) and the ECD SD
    of our spheres that match a reference sphere.
``bam-sem``
    BAM TiO2 SE images against the hand-drawn masks (4-connected components,
    :func:`qcloop.evaluate.truth_from_binary`), cut to the analysed rows, ``min_area`` 100 px.
``bam-tsem``
    The same fields seen by the TSEM detector (dark particles), against the same masks shifted
    by :func:`qcloop.evaluate.align_truth` (phase correlation with the thresholded TSEM image).
``inverted``
    An inverted copy of every shared image (the analysed rows only: the banner is kept as the
    microscope wrote it) against the pipeline's own result on the original (``min_area`` 0).
``synth-bright`` / ``synth-dark``
    Synthetic images of the 8 classes of :data:`qcloop.synth.BENCH_CLASSES`, half of them placed
    touching another, bright SE look (``synth-bright``) or transmission look with Fresnel-like
    fringes (``synth-dark``); F1@0.5 per class (:func:`qcloop.evaluate.score_groups`) and, of the
    convex particles found (at least one piece, :func:`qcloop.evaluate.pieces_per_truth`), the
    fraction cut in two or more pieces (no figure when none is found).
``synth-mixed``
    300 px triangles with 10 px dots (30x apart) in one image, bright and dark; recall per size
    population (an unmatched prediction on the background counts for the population whose mean
    area is nearer, in log scale).

Synthetic truths drop objects below ``SYNTH_MIN_AREA`` px (slivers cut by the frame). s/image
is the median of the pipeline's own stage timings (segment + lobes + measure, image loading not
counted). Timings on a loaded machine are noisy: compare them only within one run.

Usage::

    .venv/bin/python bench/segmentation.py [--quick] [--data DIR] [--csv FILE] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
from tqdm import tqdm

from qcloop.config import load_settings
from qcloop.data import sem_data_dir
from qcloop.evaluate import (ImageScore, Matching, align_truth, crop_truth, match_labels, pieces_per_truth,
                             pool_scores, score_groups, score_matching, truth_from_binary)
from qcloop.pipeline import Pipeline
from qcloop.records import ImageResult, SemImage
from qcloop.synth import BENCH_CLASSES, Population, SynthSpec, generate_images, match_centroids

BAM_MIN_AREA = 100
"""Drawn BAM particles below this many px are slivers of the drawing (bam_tio2 README)."""
SYNTH_MIN_AREA = 20
"""Synthetic truth objects below this many px (frame-cut slivers) are dropped."""
CONVEX = ("sphere", "cube", "triangle", "truncated_triangle", "rod", "bipyramid")
"""Classes of :data:`BENCH_CLASSES` that are convex (must never be cut)."""
KONSTANZ_MATCH = 0.3
"""Konstanz detection: centroid distance limit as a fraction of the reference particle's ECD."""
SYNTH_8 = dict(class_mix={c: 1.0 for c in BENCH_CLASSES}, mean_ecd_nm=80.0, pixel_size_nm=2.0, size_cv=0.15,
               coverage=0.3, touching_fraction=0.5, overlap_fraction=0.0, banner=True)
"""The 8-class synthetic images: ~40 px particles, half placed touching another, 1024x768 with banner."""
SYNTH_DARK = dict(contrast="dark", halo=0.12)
"""Dark variant: transmission look with a bright Fresnel-like fringe outside every particle."""
SYNTH_MIXED = dict(class_mix={"triangle": 1.0}, mean_ecd_nm=600.0, pixel_size_nm=2.0, size_cv=0.1, coverage=0.3,
                   touching_fraction=0.3, overlap_fraction=0.0, banner=True,
                   populations=(Population({"sphere": 1.0}, 20.0, size_cv=0.1, coverage=0.02),))
"""Mixed sizes: triangles of ~300 px ECD with dots of ~10 px (30x apart)."""


@dataclass
class Row:
    """One line of the table. ``target`` is text; ``passed`` None when there is no target."""

    dataset: str
    figure: str
    n: float = float("nan")
    precision: float = float("nan")
    recall: float = float("nan")
    f1: float = float("nan")
    mean_iou: float = float("nan")
    value: float = float("nan")
    s_per_image: float = float("nan")
    target: str = "-"
    passed: bool | None = None


def score_row(dataset: str, figure: str, s: ImageScore, seconds: float = float("nan"), target: str = "-",
              check: Callable[[ImageScore], bool] | None = None) -> Row:
    return Row(dataset, figure, s.n_truth, s.precision, s.recall, s.f1, s.mean_iou, float("nan"), seconds, target,
               None if check is None else bool(check(s)))


@dataclass
class Run:
    """One analysed image and the pipeline's result on it."""

    image: SemImage
    result: ImageResult

    @property
    def labels(self) -> np.ndarray:
        return self.result.masks.labels

    @property
    def seconds(self) -> float:
        return self.result.seconds


def analyse(pipeline: Pipeline, images: Iterable[SemImage], desc: str) -> list[Run]:
    images = list(images)
    return [Run(im, pipeline.analyze(im)) for im in tqdm(images, desc=desc, unit="img", file=sys.stderr,
                                                        disable=None, leave=False)]


def median_seconds(runs: list[Run]) -> float:
    return float(np.median([r.seconds for r in runs])) if runs else float("nan")


# ============================================================================ Konstanz
def _load_analyze_bench():
    spec = importlib.util.spec_from_file_location("bench_analyze", Path(__file__).with_name("analyze.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _reference_particles(ref: pd.DataFrame, name: str) -> pd.DataFrame:
    """Reference particles of one image: masks, or groups of masks (centroid, box, area)."""
    r = ref[ref.image == name]
    key = r.group_id.fillna(pd.Series(-1 - np.arange(len(r)), index=r.index))  # spheres: one mask each
    g = r.assign(key=key, wr=r.row * r.area_px, wc=r.col * r.area_px).groupby("key")
    out = g.agg(area=("area_px", "sum"), wr=("wr", "sum"), wc=("wc", "sum"), r0=("r0", "min"), c0=("c0", "min"),
                r1=("r1", "max"), c1=("c1", "max"))
    return out.assign(row=out.wr / out.area, col=out.wc / out.area)


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes (r0, c0, r1, c1), end exclusive, row by row."""
    h = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    w = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = h * w
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def konstanz(pipeline: Pipeline, data: Path, quick: bool) -> tuple[list[Row], list[Run]]:
    ab = _load_analyze_bench()
    series = {k: v[:1] if quick else v for k, v in ab.SERIES.items()}
    names = [n for v in series.values() for n in v]
    runs = analyse(pipeline, (pipeline.load(data / "konstanz" / f"{n}.tif") for n in names), "konstanz")
    ref = pd.read_csv(data / "konstanz" / "reference_sam_vith.csv")
    rc = np.array([ast.literal_eval(v) for v in ref.centroid_rc], float)
    box = np.array([ast.literal_eval(v) for v in ref.bbox_rc], float)
    ref = ref.assign(row=rc[:, 0], col=rc[:, 1], r0=box[:, 0], c0=box[:, 1], r1=box[:, 2], c1=box[:, 3])
    found = total = 0
    ious = []
    for run in runs:
        rp, t = _reference_particles(ref, run.image.name), run.result.particles
        ecd = 2 * np.sqrt(rp.area.to_numpy() / np.pi)
        pairs = match_centroids(t[["centroid_x_px", "centroid_y_px"]].to_numpy(), rp[["col", "row"]].to_numpy(),
                                KONSTANZ_MATCH * ecd)
        found, total = found + len(pairs), total + len(rp)
        if pairs:
            i, j = map(list, zip(*pairs))
            ours = t[["bbox_r0", "bbox_c0", "bbox_r1", "bbox_c1"]].to_numpy(float)[i]
            ious.append(_box_iou(ours, rp[["r0", "c0", "r1", "c1"]].to_numpy()[j]))
    rows = [Row("konstanz", "reference particles found (centroid, 1:1); IoU of boxes", total, recall=found / total,
                mean_iou=float(np.concatenate(ious).mean()) if ious else float("nan"),
                s_per_image=median_seconds(runs))]
    rows += konstanz_figures(ab, {r.image.name: r.result.particles for r in runs}, ref, series)
    return rows, runs


def konstanz_figures(ab, tables: dict[str, pd.DataFrame], ref: pd.DataFrame, series: dict) -> list[Row]:
    """The issue's Konstanz figures, as ``bench/analyze.py`` computes them."""
    old = ab.SERIES
    ab.SERIES = series  # --quick: one image per series
    try:
        acc = ab.accuracy(tables, ref)
    finally:
        ab.SERIES = old
    rows = []
    for fig, value, target, ok in acc.itertuples(index=False):
        if fig.startswith("spheres: ECD SD of those matching a reference sphere"):
            fig, target, ok = "spheres: ECD SD over the spheres the reference also measured (nm)", "<= 5.25", value <= 5.25
        elif "(information)" in fig or fig.startswith("spheres: ECD standard deviation"):
            continue  # the all-spheres SD is replaced by the figure above (issue 11)
        rows.append(Row("konstanz", fig, value=float(value), target=str(target),
                        passed=None if ok is None or (isinstance(ok, float) and math.isnan(ok)) else bool(ok)))
    return rows


# ============================================================================ BAM TiO2
def _bam_pairs(data: Path, quick: bool) -> list[tuple[str, Path, Path, Path]]:
    root = data / "bam_tio2"
    masks = sorted((root / "masks").glob("*_m.tif"))[: 3 if quick else None]
    out = []
    for m in masks:
        sid = m.name[: -len("_m.tif")]
        out.append((sid, m, root / "sem" / f"{sid}.tif", root / "tsem" / f"{int(sid) + 1}.tif"))
    return out


def bam(pipeline: Pipeline, data: Path, quick: bool) -> tuple[list[Row], list[Run], list[Run]]:
    import tifffile

    pairs = _bam_pairs(data, quick)
    sem = analyse(pipeline, (pipeline.load(p[2]) for p in pairs), "bam sem")
    tsem = analyse(pipeline, (pipeline.load(p[3]) for p in pairs), "bam tsem")
    sem_scores, tsem_scores, shifts = [], [], []
    for (sid, mask, _, _), a, b in zip(pairs, sem, tsem):
        truth = truth_from_binary(tifffile.imread(mask))
        sem_scores.append(score_matching(match_labels(crop_truth(truth, a.labels.shape), a.labels,
                                                      min_area=BAM_MIN_AREA), sid))
        t_cut = crop_truth(truth, b.labels.shape)
        al = align_truth(t_cut, b.image.pixels[: b.labels.shape[0]], max_shift=20, contrast="dark")
        shifts.append(max(abs(v) for v in al.shift))
        tsem_scores.append(score_matching(match_labels(al.truth, b.labels, min_area=BAM_MIN_AREA), sid))
    s, t = pool_scores(sem_scores), pool_scores(tsem_scores)
    rows = [score_row("bam-sem", f"{len(pairs)} images, drawn particles >= {BAM_MIN_AREA} px", s,
                      median_seconds(sem), "F1 >= 0.70, IoU >= 0.78", lambda x: x.f1 >= 0.70 and x.mean_iou >= 0.78),
            score_row("bam-tsem", f"same fields, TSEM; truth shifted {min(shifts)}-{max(shifts)} px", t,
                      median_seconds(tsem), "F1 >= 0.60", lambda x: x.f1 >= 0.60)]
    return rows, sem, tsem


# ============================================================================ inverted copies
def invert(image: SemImage) -> SemImage:
    """The image with its analysed rows inverted (the banner is left as the microscope wrote it)."""
    px = image.pixels.copy()
    top = image.analysed_height_px
    region = px[:top]
    if np.issubdtype(px.dtype, np.integer):
        px[:top] = np.iinfo(px.dtype).max - region
    else:
        px[:top] = region.max() + region.min() - region
    return replace(image, pixels=px, path=image.path.with_name(image.path.stem + "_inverted" + image.path.suffix))


def inverted(pipeline: Pipeline, groups: dict[str, list[Run]]) -> list[Row]:
    rows, scores_all, runs_all = [], [], []
    for name, runs in groups.items():
        inv = analyse(pipeline, (invert(r.image) for r in runs), f"inverted {name}")
        scores = [score_matching(match_labels(r.labels, i.labels), r.image.name) for r, i in zip(runs, inv)]
        scores_all += scores
        runs_all += inv
        rows.append(score_row("inverted", f"{name}: {len(runs)} images vs result on the original",
                              pool_scores(scores), median_seconds(inv)))
    rows.append(score_row("inverted", "all shared images, pooled", pool_scores(scores_all), median_seconds(runs_all),
                          "F1 >= 0.95", lambda x: x.f1 >= 0.95))
    return rows


# ============================================================================ synthetic
def _synth_runs(pipeline: Pipeline, spec: SynthSpec, n: int, seed: int, desc: str):
    synths = list(generate_images(spec, n, seed))
    runs = analyse(pipeline, (s.to_sem_image(f"{desc}_{i}") for i, s in enumerate(synths)), desc)
    return synths, runs


def _matching(synth, run: Run) -> tuple[Matching, pd.DataFrame]:
    m = match_labels(synth.labels, run.labels, min_area=SYNTH_MIN_AREA)
    truth = synth.truth.set_index("particle").loc[m.truth_ids]
    return m, truth


def synthetic_classes(pipeline: Pipeline, contrast: str, n: int, seed: int) -> list[Row]:
    spec = SynthSpec(**SYNTH_8, **(SYNTH_DARK if contrast == "dark" else {}))
    synths, runs = _synth_runs(pipeline, spec, n, seed, f"synth {contrast}")
    name = f"synth-{contrast}"
    overall, per_class, cut, convex = [], {c: [] for c in BENCH_CLASSES}, 0, 0
    for synth, run in zip(synths, runs):
        m, truth = _matching(synth, run)
        overall.append(score_matching(m, run.image.name))
        for c, s in score_groups(m, truth["class"].to_numpy()).items():
            per_class[c].append(s)
        is_convex = truth["class"].isin(CONVEX).to_numpy()
        pieces = pieces_per_truth(m)
        cut += int(np.count_nonzero(is_convex & (pieces >= 2)))
        convex += int(np.count_nonzero(is_convex & (pieces >= 1)))
    secs = median_seconds(runs)
    rows = [score_row(name, f"{n} images, 8 classes, all particles", pool_scores(overall), secs)]
    for c, scores in per_class.items():
        if scores:
            rows.append(score_row(name, f"class {c}", pool_scores(scores), target="F1 >= 0.90",
                                  check=lambda x: x.f1 >= 0.90))
    frac = cut / convex if convex else float("nan")
    rows.append(Row(name, f"convex particles found, cut in two or more ({cut} of {convex})", convex, value=frac,
                    target="<= 0.02", passed=None if math.isnan(frac) else bool(frac <= 0.02)))
    return rows


def synthetic_mixed(pipeline: Pipeline, n: int, seed: int) -> list[Row]:
    rows = []
    for contrast in ("bright", "dark"):
        spec = SynthSpec(**SYNTH_MIXED, **({"contrast": "dark"} if contrast == "dark" else {}))
        synths, runs = _synth_runs(pipeline, spec, n, seed, f"mixed {contrast}")
        means = {"triangles ~300 px": spec.mean_ecd_px, "dots ~10 px": spec.populations[0].mean_ecd_nm / spec.pixel_size_nm}
        names = list(means)
        log_area = np.log(np.pi / 4 * np.array(list(means.values())) ** 2)
        per_pop: dict[str, list[ImageScore]] = {k: [] for k in names}
        for synth, run in zip(synths, runs):
            m, truth = _matching(synth, run)
            nearest = np.abs(np.log(np.maximum(m.pred_area, 1))[:, None] - log_area[None, :]).argmin(axis=1)
            groups = score_groups(m, np.array(names, dtype=object)[truth["population"].to_numpy()],
                                  np.array(names, dtype=object)[nearest])
            for k, s in groups.items():
                per_pop[k].append(s)
        for k in names:
            rows.append(score_row("synth-mixed", f"{contrast}, {n} images: {k}", pool_scores(per_pop[k]),
                                  median_seconds(runs), "recall >= 0.90", lambda x: x.recall >= 0.90))
    return rows


# ============================================================================ table
def format_table(rows: list[Row]) -> str:
    """Fixed-width text table: text columns left-aligned, numbers right-aligned."""
    def num(v: float, digits: int = 3) -> str:
        return "-" if math.isnan(v) else f"{v:.{digits}f}"

    header = ["data set", "figure", "n", "precision", "recall", "F1@0.5", "mean IoU", "value", "s/image",
              "target", "pass"]
    body = [[r.dataset, r.figure, num(r.n, 0), num(r.precision), num(r.recall), num(r.f1), num(r.mean_iou),
             num(r.value), num(r.s_per_image, 2), r.target, {True: "PASS", False: "FAIL"}.get(r.passed, "-")]
            for r in rows]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    left = {0, 1, 9, 10}

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header)] + [line(b) for b in body])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer images per data set (a few minutes)")
    ap.add_argument("--data", type=Path, default=None, help="folder with konstanz/, jeol/ and bam_tio2/")
    ap.add_argument("--csv", type=Path, default=None, help="also write the table as CSV")
    ap.add_argument("--only", nargs="+", default=None,
                    choices=["konstanz", "bam", "inverted", "synth", "mixed"], help="run only these parts")
    ap.add_argument("--seed", type=int, default=11, help="seed of the synthetic images (default 11)")
    args = ap.parse_args(argv)
    parts = set(args.only or ["konstanz", "bam", "inverted", "synth", "mixed"])
    data = args.data or sem_data_dir()
    if data is None and parts & {"konstanz", "bam", "inverted"}:
        print("real SEM images not found: set QCLOOP_SEM_DATA or pass --data (or use --only synth mixed)",
              file=sys.stderr)
        return 2
    pipeline = Pipeline.from_settings(load_settings(use_env=False), embed=False)
    t0 = time.perf_counter()
    rows: list[Row] = []
    originals: dict[str, list[Run]] = {}
    if "konstanz" in parts or "inverted" in parts:
        k_rows, k_runs = konstanz(pipeline, data, args.quick)
        rows += k_rows if "konstanz" in parts else []
        originals["konstanz"] = k_runs
    if "bam" in parts or "inverted" in parts:
        b_rows, sem, tsem = bam(pipeline, data, args.quick)
        rows += b_rows if "bam" in parts else []
        originals.update({"bam sem": sem, "bam tsem": tsem})
    if "inverted" in parts:
        originals["jeol"] = analyse(pipeline, [pipeline.load(data / "jeol" / "A2h_01.tif")], "jeol")
        rows += inverted(pipeline, originals)
    n_synth = 1 if args.quick else 4
    if "synth" in parts:
        rows += synthetic_classes(pipeline, "bright", n_synth, args.seed)
        rows += synthetic_classes(pipeline, "dark", n_synth, args.seed + 1)
    if "mixed" in parts:
        rows += synthetic_mixed(pipeline, 1 if args.quick else 4, args.seed + 2)
    real = [r for name, runs in originals.items() if name != "jeol" for r in runs
            if (r.image.width_px, r.image.height_px) == (1024, 768)]
    if real:
        med = median_seconds(real)
        rows.append(Row("speed", f"median over {len(real)} real 1024x768 images (segment + lobes + measure)",
                        len(real), value=med, s_per_image=med, target="<= 1.0 s", passed=bool(med <= 1.0)))
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (1 min); "
          f"{'quick' if args.quick else 'full'} run, {time.perf_counter() - t0:.0f} s; default config")
    print(format_table(rows))
    if args.csv:
        pd.DataFrame([r.__dict__ for r in rows]).to_csv(args.csv, index=False)
    failed = [r for r in rows if r.passed is False]
    print(f"\n{sum(r.passed is True for r in rows)} targets pass, {len(failed)} fail")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
