"""``qcloop models check|download``: the foundation-model files (see docs/foundation.md).

``qcloop models check [--config FILE] [--all] [--no-load]`` verifies the files the
configuration uses: a SAM checkpoint against the SHA-256 prefix in its official name
(``sam_vit_b_01ec64.pth`` …) and, unless ``--no-load``, its parameter names and shapes against
the configured ``model_type``; a DINOv2 directory (or cached model id) for ``config.json`` and
weights. Exit code 0 when every check passes, 1 otherwise.

``qcloop models download NAME [--dest DIR] [--url URL]`` fetches an official SAM checkpoint
(``vit_b``, ``vit_l``, ``vit_h`` or the file name) from dl.fbaipublicfiles.com with a progress
bar, resumes an interrupted download (``NAME.part``, HTTP Range) and verifies the checksum.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qcloop.config import load_settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="check or download foundation-model files",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    c = msub.add_parser("check", help="verify the configured SAM / DINOv2 files")
    c.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration")
    c.add_argument("--all", action="store_true",
                   help="check SAM and DINOv2 even when the config does not select them")
    c.add_argument("--no-load", action="store_true",
                   help="skip reading the SAM checkpoint's tensors (checksum only)")
    c.set_defaults(func=run_check)

    d = msub.add_parser("download", help="fetch an official SAM checkpoint (resumable, verified)")
    d.add_argument("name", metavar="NAME",
                   help="vit_b, vit_l, vit_h or an official file name (sam_vit_b_01ec64.pth)")
    d.add_argument("--dest", type=Path, default=Path("."), metavar="DIR",
                   help="folder to write into (default: current folder)")
    d.add_argument("--url", metavar="URL", help="download from this URL instead (a mirror)")
    d.set_defaults(func=run_download)


def run_check(args: argparse.Namespace) -> int:
    from qcloop.models import check_models

    settings = load_settings(args.config)
    results = check_models(settings, load=not args.no_load, progress=sys.stderr.isatty(),
                           everything=args.all)
    if not results:
        print("nothing to check: the configuration uses no foundation model "
              "(pipeline.segmenter: classical, pipeline.embedder: morphology); use --all")
        return 0
    for r in results:
        print(f"{'OK  ' if r.ok else 'FAIL'} {r.what:<10} {r.path}\n     {r.detail}")
    return 0 if all(r.ok for r in results) else 1


def run_download(args: argparse.Namespace) -> int:
    from qcloop.models import download

    path = download(args.name, args.dest, url=args.url, progress=True)
    print(path)
    return 0
