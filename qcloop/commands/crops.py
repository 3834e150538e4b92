"""``qcloop crops export IMAGES... --out DIR [--config FILE]``: one PNG crop per particle.

Crops are named ``<image stem>__p<particle id>.png``; ``DIR/crops.csv`` maps each crop to its
source image and particle (``qcloop train`` needs it). Sort 5-10 crops per class into
sub-folders named by class, then run ``qcloop train DIR --out MODEL``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from qcloop.commands._options import add_pixel_size_option, apply_pixel_size
from qcloop.errors import InputImageError, QcloopError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("crops", help="particle crops for labelling", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    csub = p.add_subparsers(dest="crops_command", metavar="ACTION")
    e = csub.add_parser("export", help="write one PNG crop per particle", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("paths", nargs="+", type=Path, metavar="IMAGE", help="image files or folders")
    e.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    e.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration")
    e.add_argument("--margin", type=float, default=0.25,
                   help="context around the bounding box, fraction of its longer side (default 0.25)")
    e.add_argument("--include-border", action="store_true",
                   help="also export particles cut by the image edge or the banner")
    e.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    add_pixel_size_option(e)
    e.set_defaults(func=run_export)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_export(args: argparse.Namespace) -> int:
    from qcloop.commands.analyze import collect_images
    from qcloop.config import load_settings
    from qcloop.crops import export_crops, segmentation_fingerprint, write_index
    from qcloop.pipeline import Pipeline

    if args.margin < 0:
        raise QcloopError("--margin must not be negative")
    settings = load_settings(args.config)
    apply_pixel_size(settings, args)
    images = collect_images(args.paths, args.recursive)
    if not images:
        raise QcloopError("no images found in " + ", ".join(str(p) for p in args.paths))
    pipeline_cfg = settings.pipeline.model_copy(update={"classifier": None})
    pipeline = Pipeline(settings.imaging, pipeline_cfg, embed=False)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows, failed, stems = [], 0, set()
    for path in tqdm(images, desc="crops", unit="img", file=sys.stderr, disable=None):
        try:
            result = pipeline.analyze(path)
        except InputImageError as exc:
            failed += 1
            tqdm.write(f"qcloop: skipped {path}: {exc.reason}", file=sys.stderr)
            continue
        stem = path.stem
        if stem in stems:  # two images with one name in different folders
            stem = f"{path.parent.name}_{stem}"
        stems.add(stem)
        rows.extend(export_crops(result, out, stem=stem, margin=args.margin, include_border=args.include_border))
    index = write_index(rows, out, segmentation_fingerprint(settings))
    print(f"wrote {len(rows)} crops from {len(images) - failed} image(s) to {out} (index: {index.name})")
    print("next: sort 5-10 crops per class into sub-folders named by class, then 'qcloop train "
          f"{out} --out MODEL.json'")
    return 1 if failed else 0
