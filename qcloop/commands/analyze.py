"""``qcloop analyze PATH... --out DIR [--config FILE] [--overlays] [--labels]``.

Segments and measures every particle of every image; writes ``particles.csv``, ``images.csv``
(and ``failed.csv`` when some file could not be read) and, with ``--overlays``,
``overlays/<image>.png``. With ``--labels``: ``labels/<image>.tif``, a two-page uint16 TIFF
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

from qcloop.config import load_settings
from qcloop.errors import InputImageError, QcloopError

IMAGE_SUFFIXES = {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="segment and measure every particle in SEM images",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration")
    p.add_argument("--overlays", action="store_true", help="write overlays/<image>.png")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
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
    from qcloop.pipeline import Pipeline

    settings = load_settings(args.config)
    images = collect_images(args.paths, args.recursive)
    if not images:
        raise QcloopError("no images found in " + ", ".join(str(p) for p in args.paths))
    pipeline = Pipeline.from_settings(settings, embed=False)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.overlays:
        (out / "overlays").mkdir(exist_ok=True)

    tables, summaries, failures = [], [], []
    for path in tqdm(images, desc="analyze", unit="img", file=sys.stderr, disable=None):
        try:
            result = pipeline.analyze(path)
        except InputImageError as exc:
            failures.append({"image": path.stem, "path": str(path), "reason": exc.reason})
            tqdm.write(f"qcloop: skipped {path}: {exc.reason}", file=sys.stderr)
            continue
        tables.append(result.particles)
        summaries.append(result.summary())
        if args.overlays:
            from qcloop.overlay import draw_overlay

            draw_overlay(result.image, result.masks, result.particles, color_by="lobes",
                         path=out / "overlays" / f"{result.image.name}.png")
        if args.labels:
            from qcloop.labels_io import write_result_labels

            write_result_labels(out / "labels", result)

    particles = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    particles.to_csv(out / "particles.csv", index=False)
    summary = pd.DataFrame(summaries)
    summary.to_csv(out / "images.csv", index=False)
    if failures:
        pd.DataFrame(failures).to_csv(out / "failed.csv", index=False)

    print(format_summary(summary))
    if (summary.get("pixel_size_source") == "none").any() if len(summary) else False:
        print("note: some images carry no pixel size (source 'none'): their sizes are in pixels "
              "(the *_px columns); set imaging.pixel_size_nm in the config to convert.")
    print(f"wrote {out / 'particles.csv'} ({len(particles)} particles), {out / 'images.csv'}"
          + (f", {len(failures)} failed (see {out / 'failed.csv'})" if failures else ""))
    return 1 if failures else 0


def format_summary(summary: pd.DataFrame) -> str:
    """Human-readable per-image table for the terminal."""
    if summary.empty:
        return "(no image analysed)"
    cols = ["image", "pixel_size_nm", "pixel_size_source", "n_particles", "ecd_nm_mean", "ecd_nm_sd", "seconds"]
    view = summary[[c for c in cols if c in summary]].copy()
    return view.to_string(index=False, float_format=lambda v: f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}")
