"""``qcloop analyze PATH... --out DIR [--config FILE] [--overlays] [--labels]``.

Segments and measures every particle of every image; writes ``particles.csv``, ``images.csv``
(and ``failed.csv`` when some file could not be read) and, with ``--overlays``,
``overlays/<image>.png``; ``--export roi`` / ``--export coco`` add ImageJ ROI sets
(``rois/<image>.zip``) / ``coco.json`` with RLE masks (see :mod:`qcloop.exports`).
``--pixel-size-nm NM`` gives the pixel size of images whose file has none (else their sizes are
in px, with a warning on stderr). ``--cluster`` analyses the images on a Dask cluster (same
output; docs/archive.md). With ``--labels``: ``labels/<image>.tif``, a two-page uint16 TIFF
(uint32 above 65535 labels) of the analysed rows: page 1 the particles (0 = background, value
= ``particle_id`` of particles.csv), page 2 their lobes (see :mod:`qcloop.labels_io`); it opens in
Fiji / napari and ``qcloop eval`` scores it. A bad file is reported and skipped; exit code 1 if
any failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from qcloop.cluster import add_cluster_argument
from qcloop.commands._options import add_pixel_size_option, apply_pixel_size, pixel_size_warning
from qcloop.config import load_settings
from qcloop.errors import InputImageError, QcloopError
from qcloop.exports import EXPORT_FORMATS

IMAGE_SUFFIXES = {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="segment and measure every particle in SEM images",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration")
    p.add_argument("--overlays", action="store_true", help="write overlays/<image>.png")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    add_pixel_size_option(p)
    p.add_argument("--export", action="append", default=[], choices=EXPORT_FORMATS, metavar="|".join(EXPORT_FORMATS),
                   help="also write rois/<image>.zip (ImageJ ROI sets) or coco.json (RLE masks); repeatable")
    add_cluster_argument(p)
    p.add_argument("--labels", action="store_true", help="write labels/<image>.tif (particles; lobes on page 2)")
    p.set_defaults(func=run)


def collect_images(paths: list[Path], recursive: bool = False) -> list[Path]:
    """Expand folders into their image files (sorted); files are kept as given."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            it = path.rglob("*") if recursive else path.iterdir()
            found.extend(sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.exists():
            found.append(path)
        else:
            raise QcloopError(f"no such file or folder: {path}")
    return found


def run(args: argparse.Namespace) -> int:
    from qcloop.exports import Exports
    from qcloop.pipeline import Pipeline

    settings = load_settings(args.config)
    apply_pixel_size(settings, args)
    images = collect_images(args.paths, args.recursive)
    if not images:
        raise QcloopError("no images found in " + ", ".join(str(p) for p in args.paths))
    pipeline = Pipeline.from_settings(settings, embed=False)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.overlays:
        (out / "overlays").mkdir(exist_ok=True)

    exports = Exports(out, args.export)
    work = [(path, args.overlays, bool(exports.formats) or args.labels) for path in images]
    if args.cluster:
        from qcloop.cluster import map_images

        outcomes = map_images(args.cluster, settings, analyse_for_table, work, embed=False, desc="analyze")
    else:
        outcomes = tqdm((analyse_for_table(pipeline, *w) for w in work), desc="analyze", unit="img",
                        file=sys.stderr, disable=None, total=len(work))
    tables, summaries, failures = [], [], []
    for r in outcomes:
        if "error" in r:
            failures.append({"image": r["path"].stem, "path": str(r["path"]), "reason": r["error"]})
            tqdm.write(f"qcloop: skipped {r['path']}: {r['error']}", file=sys.stderr)
            continue
        tables.append(r["particles"])
        summaries.append(r["summary"])
        if r["result"] is not None:
            exports.add(r["result"])
            if args.labels:
                from qcloop.labels_io import write_result_labels

                write_result_labels(out / "labels", r["result"])
        if r["overlay"] is not None:
            (out / "overlays" / f"{r['name']}.png").write_bytes(r["overlay"])

    particles = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    particles.to_csv(out / "particles.csv", index=False)
    summary = pd.DataFrame(summaries)
    summary.to_csv(out / "images.csv", index=False)
    if failures:
        pd.DataFrame(failures).to_csv(out / "failed.csv", index=False)
    written = exports.finish()

    print(format_summary(summary))
    warning = pixel_size_warning([r["image"] for r in summaries if r["pixel_size_nm"] is None], len(summaries))
    if warning:
        print(f"qcloop: warning: {warning}", file=sys.stderr)
    print(f"wrote {out / 'particles.csv'} ({len(particles)} particles), {out / 'images.csv'}"
          + (f", {len(written)} export file(s)" if written else "")
          + (f", {len(failures)} failed (see {out / 'failed.csv'})" if failures else ""))
    return 1 if failures else 0


def analyse_for_table(pipeline, path: Path, overlay: bool, keep_result: bool = False) -> dict:
    """One image's particles, ``images.csv`` row and (``overlay``) PNG overlay coloured by lobes.

    Returns ``{"path", "error"}`` for a bad image, else ``{"path", "name", "particles",
    "summary", "overlay" (PNG bytes or None), "result"}``: picklable results (``--cluster``
    workers); ``result`` is the whole :class:`~qcloop.records.ImageResult` with ``keep_result``
    (the exports need its masks), else None.
    """
    try:
        result = pipeline.analyze(path)
    except InputImageError as exc:
        return {"path": path, "error": exc.reason}
    png = None
    if overlay:
        import io

        from PIL import Image

        from qcloop.overlay import draw_overlay

        buf = io.BytesIO()
        Image.fromarray(draw_overlay(result.image, result.masks, result.particles, color_by="lobes"),
                        "RGB").save(buf, format="PNG")
        png = buf.getvalue()
    return {"path": path, "name": result.image.name, "particles": result.particles,
            "summary": result.summary(), "overlay": png,
            "result": result if keep_result else None}


def format_summary(summary: pd.DataFrame) -> str:
    """Human-readable per-image table for the terminal."""
    if summary.empty:
        return "(no image analysed)"
    cols = ["image", "pixel_size_nm", "pixel_size_source", "n_particles", "ecd_nm_mean", "ecd_nm_sd", "seconds"]
    view = summary[[c for c in cols if c in summary]].copy()
    return view.to_string(index=False, float_format=lambda v: f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}")
