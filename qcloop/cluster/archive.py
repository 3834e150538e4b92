"""``qcloop archive``: re-analyse a whole SEM archive on a Dask cluster, resumable, into Parquet.

Steps of :func:`run_archive`:

1. **Walk** ROOT (recursively; the output folder is skipped) and give every image its batch
   with the daemon's ``batch.key`` rules (:class:`qcloop.daemon.batches.BatchKeyer`: regex on
   the file name, or the first sub-folder below ROOT; ``message`` needs the live reactor
   messages and is refused).
2. **Hash** every image (:func:`~qcloop.cluster.spec.content_sha256`; re-read only when its
   size or mtime changed, :class:`~qcloop.cluster.manifest.HashCache`).
3. **Analyse** each image whose ``(content hash, fingerprint)`` part is not in the manifest
   yet, one Dask task per image (identical files once), with the pipeline of ``qcloop batch``
   (:func:`qcloop.commands.batch.analyse_for_batch`); the client writes each result as its
   part file the moment it arrives.
4. **Assemble** everything from the manifest: per batch, in file order, the metrics and the
   verdict of :func:`qcloop.commands.batch.score_batch` -- the function ``qcloop batch`` uses --
   and write ``particles.parquet``, ``batches.parquet``, ``batches/<batch>/batch.json``,
   ``images.parquet`` and ``failed.csv``, each replaced whole.

Because the outputs are rebuilt from the manifest, every image of ROOT is in them exactly once,
whatever was killed before; a re-run analyses only what is missing or changed, and re-scores
(new targets) without analysing anything.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from qcloop.cluster import dataset
from qcloop.cluster.manifest import UNREADABLE, HashCache, Manifest, writer_lock
from qcloop.errors import QcloopError

MANIFEST = "manifest"


@dataclass(frozen=True)
class ArchiveImage:
    """One image file of the archive: its path, batch and content hash."""

    path: Path
    batch: str
    sha256: str = ""


@dataclass(frozen=True)
class ArchiveSummary:
    """What :func:`run_archive` did.

    Attributes
    ----------
    n_images, n_batches : int
        Images found under ROOT and the batches they form.
    n_analysed : int
        Images analysed by this run (tasks that returned, successful or not).
    n_reused : int
        Images whose part was already in the manifest.
    n_failed : int
        Images in failed.csv (bad files and images whose task failed in this run).
    batches : DataFrame
        The batches.parquet table.
    """

    n_images: int
    n_batches: int
    n_analysed: int
    n_reused: int
    n_failed: int
    batches: pd.DataFrame


def find_images(root: Path, batch_cfg: Any, *, skip: Path | None = None) -> list[ArchiveImage]:
    """Every image file under ``root`` (sorted by path) with its batch key."""
    from qcloop.commands.analyze import collect_images
    from qcloop.daemon.batches import BatchKeyer

    if batch_cfg.key == "message":
        raise QcloopError("batch.key 'message' takes the batch from live reactor messages, which an archive "
                          "does not have: use 'regex:<pattern>' or 'subfolder' for qcloop archive")
    keyer = BatchKeyer(batch_cfg, root)
    skip = skip.resolve() if skip is not None else None
    found = []
    for path in collect_images([root], recursive=True):
        if skip is not None and path.resolve().is_relative_to(skip):
            continue
        found.append(ArchiveImage(path, keyer.key_for(path, seen_at=path.stat().st_mtime)))
    return found


def run_archive(root: Path, out: Path, settings: Any, *, targets: Mapping[str, Any] | None = None,
                cluster: str = "local", transfer: str = "auto", rehash: bool = False) -> ArchiveSummary:
    """Analyse every image under ``root`` into ``out`` (see the module docstring).

    ``targets`` default to the configuration's; ``cluster`` is a ``--cluster`` value
    (:func:`qcloop.cluster.client.parse_cluster`); ``transfer`` ``auto | path | bytes`` (how
    workers get the files); ``rehash`` re-reads every file instead of trusting size + mtime.
    """
    from qcloop.cluster.client import parse_cluster, require_dask
    from qcloop.cluster.spec import WorkSpec
    from qcloop.pipeline import Pipeline

    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise QcloopError(f"archive root is not a folder: {root}")
    parse_cluster(cluster)
    require_dask(("distributed", "pyarrow"))
    targets = dict(settings.targets) if targets is None else dict(targets)
    images = find_images(root, settings.batch, skip=out)
    if not images:
        raise QcloopError(f"no images found under {root}")
    pipeline = Pipeline.from_settings(settings, embed=True)  # a bad model or config fails here, at once
    spec = WorkSpec.of(settings, embed=True)
    with writer_lock(out / MANIFEST):
        manifest = Manifest(out / MANIFEST, spec.fingerprint)
        manifest.remove_temporaries()
        cache = HashCache(out / MANIFEST / "files.sqlite")
        try:
            hashes = cache.hashes([im.path for im in images], rehash=rehash)
        finally:
            cache.close()
        images = [replace(im, sha256=h) for im, h in zip(images, hashes)]
        reused = sum(1 for im in images if im.sha256 != UNREADABLE and manifest.has(im.sha256))
        todo = _todo(images, manifest)
        transient = _analyse(todo, manifest, spec, cluster, transfer)
        batches, failed = _write_outputs(root, out, images, manifest, transient, settings=settings,
                                         targets=targets, embedder_spec=getattr(pipeline.embedder, "spec", None))
    return ArchiveSummary(n_images=len(images), n_batches=len(batches), n_analysed=len(todo),
                          n_reused=reused,
                          n_failed=failed, batches=batches)


def _todo(images: list[ArchiveImage], manifest: Manifest) -> list[ArchiveImage]:
    """Images without a part, one per content hash (unreadable files: each, every run)."""
    seen: set[str] = set()
    todo = []
    for im in images:
        if im.sha256 == UNREADABLE:
            todo.append(im)
        elif im.sha256 not in seen and not manifest.has(im.sha256):
            seen.add(im.sha256)
            todo.append(im)
    return todo


def _analyse(todo: list[ArchiveImage], manifest: Manifest, spec: Any, cluster: str,
             transfer: str) -> dict[Path, str]:
    """Run the missing images; write each part as it arrives. Returns path -> reason of tasks that failed."""
    from tqdm import tqdm

    from qcloop.cluster.client import open_client, run_jobs
    from qcloop.commands.batch import analyse_for_batch

    failed: dict[Path, str] = {}
    if not todo:
        return failed
    work = [(im.path, False) for im in todo]
    with open_client(cluster) as client:
        for i, result in run_jobs(client, spec, analyse_for_batch, work, desc="archive", transfer=transfer):
            im = todo[i]
            if "error" in result:
                tqdm.write(f"qcloop: failed {im.path}: {result['error']}", file=sys.stderr)
            if result.get("transient") or im.sha256 == UNREADABLE:
                failed[im.path] = result.get("error", "file unreadable")
            else:
                manifest.write(im.sha256, result)
    return failed


def _outcome(im: ArchiveImage, manifest: Manifest, transient: Mapping[Path, str]) -> dict[str, Any]:
    """The image's outcome as analyse_for_batch returned it, named after this file."""
    stored = manifest.read(im.sha256) if im.sha256 != UNREADABLE else None
    if stored is None:
        return {"path": im.path, "error": transient.get(im.path, "not analysed (task failed)"), "transient": True}
    if "error" in stored:
        return {"path": im.path, **stored}
    name = im.path.stem  # identical files under two names: each keeps its own name
    particles = stored["particles"]
    if len(particles) and (particles["image"] != name).any():
        particles = particles.assign(image=name)
    summary = {**(stored["summary"] or {}), "image": name}
    return {**stored, "path": im.path, "name": name, "particles": particles, "summary": summary}


def _write_outputs(root: Path, out: Path, images: list[ArchiveImage], manifest: Manifest,
                   transient: Mapping[Path, str], *, settings: Any, targets: Mapping[str, Any],
                   embedder_spec: str | None) -> tuple[pd.DataFrame, int]:
    """Score every batch and write all outputs; the batches table and the failure count."""
    import pyarrow.parquet as pq

    from qcloop.commands.batch import score_batch

    groups: dict[str, list[ArchiveImage]] = defaultdict(list)
    for im in images:
        groups[im.batch].append(im)
    stage = dataset.Staging(out)
    rows, image_rows, failures = [], [], []
    for batch in sorted(groups):
        outcomes = [_outcome(im, manifest, transient) for im in groups[batch]]
        score = score_batch(outcomes, settings=settings, targets=targets, embedder_spec=embedder_spec)
        part = stage.path("particles.parquet") / dataset.partition_dir(batch)
        part.mkdir(parents=True)
        pq.write_table(dataset.particles_table(score.particles), part / "part-0.parquet")
        folder = stage.path("batches") / dataset.batch_dir(batch)
        folder.mkdir(parents=True)
        (folder / "batch.json").write_text(json.dumps(score.doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        rows.append(_batch_row(batch, score, bool(targets)))
        for im, r in zip(groups[batch], outcomes):
            image_rows.append(_image_row(root, im, r))
            if "error" in r:
                failures.append({"image": im.path.stem, "batch": batch, "path": str(im.path), "reason": r["error"],
                                 "retried": bool(r.get("transient"))})
    batches = dataset.batches_frame(rows)
    batches.to_parquet(stage.path("batches.parquet"), index=False)
    dataset.images_frame(image_rows).to_parquet(stage.path("images.parquet"), index=False)
    pd.DataFrame(failures, columns=["image", "batch", "path", "reason", "retried"]).to_csv(
        stage.path("failed.csv"), index=False)
    stage.commit()
    return batches, len(failures)


def _batch_row(batch: str, score: Any, has_targets: bool) -> dict[str, Any]:
    verdict = score.verdict
    flat = score.doc["flat"]
    row: dict[str, Any] = {
        "batch": batch,
        "n_images": score.metrics.n_images,
        "n_particles": score.metrics.n_particles,
        "n_border": score.metrics.n_border,
        "n_failed": len(score.failures),
        "verdict": ("pass" if verdict.passed else "fail") if has_targets else "none",
        "passed": verdict.passed if has_targets else None,
        "confident": verdict.confident if has_targets else None,
        "failed_checks": ";".join(verdict.failed),
    }
    for k, v in flat.items():
        if k not in row:
            row[k] = float("nan") if v is None else float(v)
    return row


def _image_row(root: Path, im: ArchiveImage, outcome: Mapping[str, Any]) -> dict[str, Any]:
    try:
        rel = im.path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        rel = str(im.path)
    status = "failed" if "error" in outcome else "done"
    row: dict[str, Any] = {"image": im.path.stem, "batch": im.batch, "path": rel, "sha256": im.sha256,
                           "status": status, "reason": outcome.get("error", "")}
    summary = outcome.get("summary") or {}
    for key in dataset.IMAGE_SUMMARY_COLUMNS:
        row[key] = summary.get(key)
    return row
