"""``qcloop files [PATH]``: where the example configs, deployment files and docs are installed.

Without PATH, lists every shipped file with its full path. With PATH (``configs/default.yaml``,
``deploy/qcloop.service``, ``deploy/prometheus``, ...), prints that one path, for scripts::

    qcloop check-config "$(qcloop files configs/default.yaml)"
    cp -r "$(qcloop files deploy)" /tmp/qcloop-deploy

``--copy DIR`` copies PATH (default: everything) into DIR instead, keeping the sub-folders.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from qcloop.errors import QcloopError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("files", help="paths of the installed example configs, deploy files and docs",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="?", metavar="PATH", help="e.g. configs/default.yaml or deploy/prometheus")
    p.add_argument("--copy", type=Path, metavar="DIR", help="copy PATH (default: all) into DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qcloop.share import FOLDERS, list_shared, shared_path

    if args.copy is not None:
        targets = [args.path] if args.path else list(FOLDERS)
        for t in targets:
            src = shared_path(t)
            dst = args.copy / t
            if dst.exists():
                raise QcloopError(f"{dst} exists; not overwriting")
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(src, dst)
            print(dst)
        return 0
    if args.path:
        print(shared_path(args.path))
        return 0
    root = shared_path()
    for rel in list_shared():
        print(root / rel)
    return 0
