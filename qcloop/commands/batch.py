"""``qcloop batch IMAGES... --out DIR [--model MODEL] [--config FILE] [--targets FILE]``.

Analyses the images as one synthesis batch (segment, measure, embed, classify), then computes
the batch QC metrics and checks them against the targets. Writes

* ``DIR/particles.csv``: one row per particle, every measurement column plus ``class`` and
  ``class_probability`` (without a classifier every particle is of class ``particle``);
* ``DIR/batch.json``: all metrics (nested and flat), their 95 % uncertainties, the targets and
  the verdict;
* ``DIR/report.html``: self-contained report (overlays coloured by class, PCA of the
  embeddings, size histograms, checks and class tables with ECD and lobe diameters); each
  overlay thumbnail links to
* ``DIR/overlays/<image>.png``: the full-size overlay (the first ``--max-overlays`` images).

Images whose file carries no pixel size are measured in px unless ``--pixel-size-nm NM`` (or
``imaging.pixel_size_nm``) gives one; batch.json (``warnings``, ``images_without_pixel_size``),
the report and stderr then say so.

Targets come from ``--targets FILE`` (YAML: ``{metric: {min/max/target/tolerance}}``, optionally
under a top-level ``targets:`` key) or else from the configuration's ``targets:`` section.
A bad image is reported and skipped; the exit code is 1 when any image failed, 0 otherwise
(also when the verdict fails: read it from batch.json / the output; ``--fail-on-verdict``
makes a failing verdict exit 3). ``--jobs N`` analyses N images at a time in worker processes
(default: one per core for the classical segmenter and the morphology embedder); the
``seconds`` in batch.json are then summed over the workers, ``total`` is the wall time.
``--cluster SPEC`` analyses the images on a Dask cluster instead (``--jobs`` is then unused;
same output; docs/archive.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd
from tqdm import tqdm

from qcloop.cluster import add_cluster_argument
from qcloop.commands._options import add_pixel_size_option, apply_pixel_size, pixel_size_warning
from qcloop.errors import InputImageError, QcloopError

SCHEMA = "qcloop.batch/1"
OVERLAY_FOLDER = "overlays"
EXIT_VERDICT_FAILED = 3


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="analyse images as one batch: QC metrics, verdict, HTML report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, metavar="IMAGE", help="image files or folders")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument("--model", type=Path, metavar="MODEL",
                   help="trained classifier (overrides pipeline.classifier of the config)")
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration")
    p.add_argument("--targets", type=Path, metavar="FILE",
                   help="YAML targets (instead of the config's targets: section)")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    p.add_argument("--title", help="report title (default: the output folder's name)")
    p.add_argument("--max-overlays", type=int, default=24, metavar="N",
                   help="overlays embedded in the report (default 24; 0: none)")
    p.add_argument("--jobs", "-j", type=int, default=None, metavar="N",
                   help="images analysed in parallel processes (default: one per CPU core, at most 8, "
                        "for the classical segmenter and morphology embedder; 1 with SAM or DINOv2)")
    add_pixel_size_option(p)
    p.add_argument("--fail-on-verdict", action="store_true",
                   help=f"exit {EXIT_VERDICT_FAILED} when a QC check fails")
    add_cluster_argument(p)
    p.set_defaults(func=run)


def settings_and_targets(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """``--config`` with ``--model`` applied, and ``--targets`` (else the config's); also for ``archive``.

    The targets are checked here, before any image is analysed: a typo fails at once.
    """
    from qcloop.config import load_settings
    from qcloop.targets import load_targets, validate_target_names

    settings = load_settings(args.config)
    apply_pixel_size(settings, args)
    if args.model is not None:
        if not args.model.is_file():
            raise QcloopError(f"model file not found: {args.model}")
        settings.pipeline.classifier = args.model.resolve()
    if args.targets is not None:
        targets = load_targets(args.targets)
    else:
        targets = dict(settings.targets)
        validate_target_names(targets)
    return settings, targets


def run(args: argparse.Namespace) -> int:
    from qcloop.commands.analyze import collect_images
    from qcloop.pipeline import Pipeline
    from qcloop.report import write_report

    t_start = time.perf_counter()
    settings, targets = settings_and_targets(args)
    if args.max_overlays < 0:
        raise QcloopError("--max-overlays must be >= 0")

    images = collect_images(args.paths, args.recursive)
    if not images:
        raise QcloopError("no images found in " + ", ".join(str(p) for p in args.paths))
    # loaded here even when workers do the work: a bad model fails at once, with a clear message
    pipeline = Pipeline.from_settings(settings, embed=True)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    jobs = _default_jobs(settings, len(images)) if args.jobs is None else args.jobs
    if jobs < 1:
        raise QcloopError("--jobs must be >= 1")
    jobs = min(jobs, len(images))

    if args.max_overlays:
        (out / OVERLAY_FOLDER).mkdir(exist_ok=True)
    work = [(path, i < args.max_overlays) for i, path in enumerate(images)]
    progress = dict(desc="batch", unit="img", file=sys.stderr, disable=None, total=len(work))
    pool = source = None
    if args.cluster:
        from qcloop.cluster import map_images

        source = map_images(args.cluster, settings, analyse_for_batch, work, embed=True, desc="batch")
        outcomes = source
    elif jobs == 1:
        outcomes = tqdm((analyse_for_batch(pipeline, *w) for w in work), **progress)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(settings,))
        outcomes = tqdm(pool.map(_analyse_one, work), **progress)
    try:
        score = score_batch(_announce_failures(outcomes), settings=settings, targets=targets,
                            embedder_spec=getattr(pipeline.embedder, "spec", None))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if source is not None:
            source.close()
    particles, metrics, verdict, doc = score.particles, score.metrics, score.verdict, score.doc
    failures, model = score.failures, doc["model"]

    for w in score.warnings:
        tqdm.write(f"qcloop: warning: {w}", file=sys.stderr)
    for name, png in score.full_overlays:
        (out / OVERLAY_FOLDER / f"{name}.png").write_bytes(png)
    particles.to_csv(out / "particles.csv", index=False)
    t0 = time.perf_counter()
    write_report(out / "report.html", metrics, verdict if targets else None, particles=particles,
                 embeddings=score.embeddings, overlays=score.overlays, failures=failures,
                 title=args.title or f"Batch {out.resolve().name}",
                 meta={"model": Path(model).name if model else "none (one class)",
                       "segmenter": settings.pipeline.segmenter,
                       "embedder": settings.pipeline.embedder},
                 uncertainty=score.uncertainty, warnings=score.warnings)
    doc["seconds"]["report"] = round(time.perf_counter() - t0, 4)
    doc["seconds"]["total"] = round(time.perf_counter() - t_start, 4)
    (out / "batch.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")

    print(format_summary(metrics, verdict if targets else None))
    print(f"wrote {out / 'particles.csv'} ({len(particles)} particles), {out / 'batch.json'}, "
          f"{out / 'report.html'}" + (f"; {len(failures)} image(s) failed" if failures else ""))
    if failures:
        return 1
    if args.fail_on_verdict and targets and not verdict.passed:
        return EXIT_VERDICT_FAILED
    return 0


# --------------------------------------------------------------------------- the batch's figures
@dataclass(frozen=True)
class BatchScore:
    """What :func:`score_batch` computed: the content of particles.csv, batch.json and the report.

    ``doc`` is batch.json without the ``report`` and ``total`` entries of ``seconds`` (the
    command adds them); ``overlays`` are the report's ``(image name, JPEG thumbnail, link to the
    full-size overlay)``, ``full_overlays`` ``(image name, full-size PNG)`` for
    ``overlays/<image>.png``; ``failures`` are ``{"image", "path", "reason"}``; ``warnings``
    (images measured in px) are also in ``doc``.
    """

    particles: pd.DataFrame
    embeddings: np.ndarray | None
    metrics: Any
    verdict: Any
    uncertainty: dict[str, float]
    overlays: list[tuple[str, bytes, str]]
    full_overlays: list[tuple[str, bytes]]
    failures: list[dict[str, str]]
    warnings: list[str]
    doc: dict[str, Any]


def score_batch(outcomes: Iterable[dict[str, Any]], *, settings: Any, targets: Mapping[str, Any],
                embedder_spec: str | None) -> BatchScore:
    """Batch metrics, verdict and the batch.json document from per-image outcomes.

    ``outcomes`` are the dicts of :func:`analyse_for_batch`, in image order (``qcloop batch``
    and ``qcloop archive`` both score their batches here, so their figures are identical).
    """
    from qcloop.batch import batch_metrics
    from qcloop.targets import evaluate_targets

    tables: list[pd.DataFrame] = []
    embeddings: list[np.ndarray] = []
    overlays: list[tuple[str, bytes, str]] = []
    full_overlays: list[tuple[str, bytes]] = []
    no_pixel_size: list[str] = []
    failures: list[dict[str, str]] = []
    analysed: list[str] = []
    stage_seconds: dict[str, float] = {}
    for r in outcomes:
        if "error" in r:
            failures.append({"image": r["path"].stem, "path": str(r["path"]), "reason": r["error"]})
            continue
        for k, v in r["seconds"].items():
            stage_seconds[k] = stage_seconds.get(k, 0.0) + v
        tables.append(r["particles"])
        analysed.append(r["name"])
        if (r.get("summary") or {}).get("pixel_size_nm") is None:
            no_pixel_size.append(r["name"])
        if r["embeddings"] is not None:
            embeddings.append(r["embeddings"])
        if r["overlay"] is not None:
            overlays.append((r["name"], r["overlay"], f"{OVERLAY_FOLDER}/{r['name']}.png"))
            full_overlays.append((r["name"], r["overlay_png"]))

    particles = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(
        columns=["image", "particle_id", "touches_border", "class", "class_probability"])
    emb = _stack(embeddings, len(particles)) if len(embeddings) == len(tables) else None
    metrics = batch_metrics(particles, emb, n_images=len(analysed))
    flat, unc = metrics.flat(), metrics.uncertainty()
    verdict = evaluate_targets(flat, targets, unc)
    warnings = [w for w in (pixel_size_warning(no_pixel_size, len(analysed)),) if w]
    model = str(settings.pipeline.classifier) if settings.pipeline.classifier else None
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config_hash": settings.config_hash(),
        "model": model,
        "segmenter": settings.pipeline.segmenter,
        "embedder": embedder_spec,
        "images": analysed,
        "failed": failures,
        "warnings": warnings,
        "images_without_pixel_size": no_pixel_size,
        "metrics": metrics.to_dict(),
        "flat": {k: _num(v) for k, v in flat.items()},
        "uncertainty": {k: _num(v) for k, v in unc.items()},
        "targets": {k: v.model_dump(exclude_none=True) for k, v in targets.items()},
        "verdict": verdict.to_dict(),
        "seconds": {k: round(v, 4) for k, v in stage_seconds.items()},
    }
    return BatchScore(particles, emb, metrics, verdict, unc, overlays, full_overlays, failures, warnings, doc)


def _announce_failures(outcomes: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for r in outcomes:
        if "error" in r:
            tqdm.write(f"qcloop: skipped {r['path']}: {r['error']}", file=sys.stderr)
        yield r


# --------------------------------------------------------------------------- per-image work
_PIPELINE: Any = None  # the Pipeline of a --jobs worker process


def _init_worker(settings: Any) -> None:
    global _PIPELINE
    from qcloop.pipeline import Pipeline

    _PIPELINE = Pipeline.from_settings(settings, embed=True)


def _analyse_one(job: tuple[Path, bool]) -> dict[str, Any]:
    return analyse_for_batch(_PIPELINE, *job)


def analyse_for_batch(pipeline: Any, path: Path, want_overlay: bool) -> dict[str, Any]:
    """Analyse one image with ``pipeline``; plain picklable results.

    Returns ``{"path", "error"}`` for a bad image (InputImageError), else ``{"path", "name",
    "particles", "embeddings", "overlay" (report thumbnail, JPEG bytes, or None), "overlay_png"
    (the full-size overlay, PNG bytes, or None), "seconds", "summary"}`` (``summary``: the
    image's row of ``images.csv``, :meth:`ImageResult.summary`, with its ``pixel_size_nm``).
    The overlay comes back as bytes, so workers on other machines need no shared output folder.
    """
    import io

    from qcloop.report import thumbnail_jpeg

    try:
        result = pipeline.analyze(path)
    except InputImageError as exc:
        return {"path": path, "error": exc.reason}
    seconds = dict(result.stage_seconds)
    particles = result.particles
    if "class" not in particles.columns:
        particles = particles.assign(**{"class": "particle", "class_probability": np.nan})
    overlay = overlay_png = None
    if want_overlay:
        from qcloop.overlay import draw_overlay

        t0 = time.perf_counter()
        from PIL import Image

        rgb = draw_overlay(result.image, result.masks, particles, color_by="class")
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG")
        overlay, overlay_png = thumbnail_jpeg(rgb), buf.getvalue()
        seconds["overlay"] = time.perf_counter() - t0
    emb = None if result.embeddings is None else np.asarray(result.embeddings, dtype=np.float64)
    return {"path": path, "name": result.image.name, "particles": particles, "embeddings": emb,
            "overlay": overlay, "overlay_png": overlay_png, "seconds": seconds, "summary": result.summary()}


def _default_jobs(settings: Any, n_images: int) -> int:
    """One process per core (at most 8) for the CPU pipeline; 1 when a big model is loaded."""
    import os

    if settings.pipeline.segmenter == "sam" or settings.pipeline.embedder == "dinov2":
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    # spawning workers costs ~1-2 s each: not worth it for a couple of images
    return max(1, min(8, cores, n_images // 2 or 1))


def _stack(blocks: list[np.ndarray], n_rows: int) -> np.ndarray | None:
    """Stack per-image embeddings; None when they are missing or of different widths."""
    if not blocks:
        return None if n_rows else np.zeros((0, 0))
    widths = {b.shape[1] for b in blocks if b.ndim == 2 and b.shape[0] > 0}
    if len(widths) > 1:
        raise QcloopError(f"embeddings of different widths in one batch: {sorted(widths)}")
    d = widths.pop() if widths else 0
    emb = np.vstack([b.reshape(-1, d) if b.size else np.zeros((0, d)) for b in blocks])
    return emb if emb.shape[0] == n_rows else None


def format_summary(metrics: Any, verdict: Any) -> str:
    """Terminal summary: classes, sizes, separation, verdict."""
    unit = "nm" if metrics.size["nm"]["all"].n > 0 else "px"
    lines = [f"{metrics.n_images} image(s), {metrics.n_particles} particles counted "
             f"({metrics.n_border} cut by the border, excluded)"]
    n = metrics.n_particles
    for c in metrics.classes:
        s = metrics.size[unit]["by_class"][c]
        k = metrics.class_count[c]
        lines.append(f"  {c:<20} {k:>6}  {100 * k / n:5.1f} %   ECD {_fmt(s.mean)} ± {_fmt(s.sd)} {unit}")
    sep = metrics.separation
    lines.append(f"separation: inter {_fmt(sep.inter_class_variance)}, intra {_fmt(sep.intra_class_variance)}, "
                 f"silhouette {_fmt(sep.silhouette)}")
    if verdict is None:
        lines.append("verdict: no targets")
    else:
        lines.append(f"verdict: {'PASS' if verdict.passed else 'FAIL'}"
                     + ("" if verdict.confident else f" (not confident: {', '.join(verdict.not_confident)})"))
        for c in verdict.checks:
            lines.append(f"  [{'ok' if c.passed else 'FAIL'}] {c.message}")
    return "\n".join(lines)


def _fmt(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.4g}"


def _num(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None
