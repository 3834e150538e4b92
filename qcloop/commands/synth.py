"""``qcloop synth --out DIR --n-images N --seed S [--classes ...] [--pixel-size-nm ...] [--banner]``.

Writes synthetic SEM images (``synth_<seed>_<i>.tif``, Zeiss CZ_SEM pixel-size metadata) and a
ground-truth CSV beside each one (see :mod:`qcloop.synth`). ``--classes`` takes class names,
optionally weighted: ``--classes sphere:0.7 rod:0.3``.

``--contrast dark`` draws transmission-like images (dark particles on a bright substrate),
``--halo 0.15`` a bright fringe just outside every particle, ``--labels`` a label image
``<name>_labels.tif`` beside each image (uint16, 0 = background, value = the CSV's ``particle``).
Mixed sizes: ``--population CLASSES:ECD_NM:COVERAGE`` adds another population (repeatable;
classes joined by ``+``), e.g. 300 px triangles with 10 px dots at 2 nm/px::

    qcloop synth --out mixed --classes triangle --mean-ecd-nm 600 --coverage 0.3 \
        --population sphere:20:0.02 --contrast dark --labels
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from qcloop.errors import QcloopError


def register(sub: argparse._SubParsersAction) -> None:
    from qcloop.synth import CLASSES, CONTRASTS

    p = sub.add_parser("synth", help="write synthetic SEM images with ground truth",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument("--n-images", type=int, default=1, metavar="N", help="number of images (default 1)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--classes", nargs="+", metavar="CLASS[:WEIGHT]", default=["sphere"],
                   help=f"particle classes, optionally weighted ({', '.join(CLASSES)})")
    p.add_argument("--pixel-size-nm", type=float, default=2.0, metavar="NM", help="pixel size (default 2.0)")
    p.add_argument("--mean-ecd-nm", type=float, default=60.0, metavar="NM", help="mean particle ECD (default 60)")
    p.add_argument("--size-cv", type=float, default=0.08, help="coefficient of variation of the ECD (default 0.08)")
    p.add_argument("--rounding", type=float, default=0.15,
                   help="corner rounding of faceted shapes: 0 sharp .. 1 round (default 0.15)")
    p.add_argument("--n-particles", type=int, default=None, metavar="N", help="particles per image (default: by coverage)")
    p.add_argument("--coverage", type=float, default=0.25, help="area fraction covered (default 0.25)")
    p.add_argument("--touching", type=float, default=0.2, help="fraction placed touching another (default 0.2)")
    p.add_argument("--overlap", type=float, default=0.05, help="fraction partly overlapping another (default 0.05)")
    p.add_argument("--width", type=int, default=1024, help="image width in px (default 1024)")
    p.add_argument("--height", type=int, default=768, help="image height in px (default 768)")
    p.add_argument("--banner", action="store_true", help="draw an info banner at the bottom")
    p.add_argument("--uint16", action="store_true", help="write 16-bit images")
    p.add_argument("--labels", action="store_true", help="also write <name>_labels.tif (visible-particle labels)")
    p.add_argument("--contrast", choices=CONTRASTS, default="bright",
                   help="bright: SE image (default); dark: transmission-like, dark particles on bright")
    p.add_argument("--halo", type=float, default=0.0, metavar="A",
                   help="bright fringe just outside every particle, intensity 0..1 (default 0: none)")
    p.add_argument("--population", action="append", default=[], metavar="CLASSES:ECD_NM:COVERAGE",
                   help="add a population of other classes/size, e.g. sphere:20:0.02 (repeatable)")
    p.set_defaults(func=run)


def parse_classes(items: list[str]) -> dict[str, float]:
    """``["sphere:0.7", "rod"]`` → ``{"sphere": 0.7, "rod": 1.0}``."""
    mix: dict[str, float] = {}
    for item in items:
        name, _, weight = item.partition(":")
        try:
            mix[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise QcloopError(f"--classes: bad weight in {item!r} (expected CLASS or CLASS:NUMBER)") from None
    return mix


def parse_population(text: str):
    """``"sphere+cube:20:0.02"`` → ``Population({"sphere": 1, "cube": 1}, 20.0, coverage=0.02)``."""
    from qcloop.synth import Population

    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        classes, ecd, coverage = parts[0].split("+"), float(parts[1]), float(parts[2])
    except ValueError:
        raise QcloopError(f"--population: bad value {text!r} (expected CLASSES:ECD_NM:COVERAGE, "
                          "e.g. sphere:20:0.02)") from None
    try:
        return Population({c.strip(): 1.0 for c in classes}, ecd, coverage=coverage)
    except ValueError as exc:
        raise QcloopError(f"--population {text!r}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    from qcloop.synth import SynthSpec, generate_images, write_image

    if args.n_images < 1:
        raise QcloopError("--n-images must be at least 1")
    try:
        spec = SynthSpec(width_px=args.width, height_px=args.height, pixel_size_nm=args.pixel_size_nm,
                         class_mix=parse_classes(args.classes), mean_ecd_nm=args.mean_ecd_nm,
                         size_cv=args.size_cv, rounding=args.rounding, n_particles=args.n_particles,
                         coverage=args.coverage, touching_fraction=args.touching,
                         overlap_fraction=args.overlap, banner=args.banner,
                         dtype="uint16" if args.uint16 else "uint8", contrast=args.contrast, halo=args.halo,
                         populations=tuple(parse_population(t) for t in args.population))
    except ValueError as exc:
        raise QcloopError(f"synth: {exc}") from None
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    images = generate_images(spec, args.n_images, args.seed)
    for i, synth in enumerate(tqdm(images, total=args.n_images, desc="synth", unit="img", file=sys.stderr,
                                   disable=None)):
        write_image(out / f"synth_{args.seed}_{i:03d}.tif", synth, write_labels=args.labels)
        total += len(synth.truth)
    print(f"wrote {args.n_images} image(s) with {total} particles to {out}")
    return 0
