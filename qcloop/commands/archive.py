"""``qcloop archive ROOT --out DIR [--config FILE] [--model MODEL] [--targets FILE] [--cluster SPEC]``.

Re-analyses every image under ROOT (all sub-folders) on a Dask cluster, one task per image,
groups the images into batches with the configuration's ``batch.key`` (as the daemon does) and
scores every batch exactly as ``qcloop batch`` does. Writes

* ``DIR/particles.parquet``: Parquet data set partitioned by batch (``batch=<name>/``): every
  particles.csv column, plus ``batch``; dtypes and units in docs/archive.md;
* ``DIR/batches.parquet`` (one row per batch: verdict and every metric) and
  ``DIR/batches/<batch>/batch.json`` (the ``qcloop batch`` document);
* ``DIR/images.parquet`` (one row per file: batch, path, content hash, status) and
  ``DIR/failed.csv`` (image, batch, path, reason, retried);
* ``DIR/manifest/``: one part file per analysed image, keyed by content hash and the
  configuration + model fingerprint.

Resumable: a re-run analyses only images that are new, changed, or analysed under another
configuration or model, and rebuilds the outputs (new targets: nothing is re-analysed).
Killing it (or a worker) loses at most the images in flight. ``--cluster`` defaults to
``local`` (one worker process per core on this machine). Exit code 1 when an image failed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qcloop.cluster import add_cluster_argument
from qcloop.commands._options import add_pixel_size_option


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("archive", help="re-analyse a whole SEM archive on a Dask cluster into Parquet (resumable)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, metavar="ROOT", help="archive folder (searched recursively)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (also the manifest)")
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration")
    p.add_argument("--model", type=Path, metavar="MODEL",
                   help="trained classifier (overrides pipeline.classifier of the config)")
    p.add_argument("--targets", type=Path, metavar="FILE",
                   help="YAML targets (instead of the config's targets: section)")
    add_pixel_size_option(p)
    add_cluster_argument(p, default="local")
    p.add_argument("--transfer", choices=("auto", "path", "bytes"), default="auto",
                   help="how workers get the images: open the path (shared file system), receive the bytes "
                        "from the client, or auto: path when every worker sees the client's files (default)")
    p.add_argument("--rehash", action="store_true",
                   help="re-read every file for its content hash (default: trust unchanged size + mtime)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qcloop.cluster.archive import run_archive
    from qcloop.commands.batch import settings_and_targets

    settings, targets = settings_and_targets(args)
    summary = run_archive(args.root, args.out, settings, targets=targets, cluster=args.cluster,
                          transfer=args.transfer, rehash=args.rehash)
    print(format_summary(summary))
    print(f"wrote {args.out / 'particles.parquet'}, {args.out / 'batches.parquet'}, {args.out / 'batches'}/, "
          f"{args.out / 'images.parquet'}, {args.out / 'failed.csv'}")
    return 1 if summary.n_failed else 0


def format_summary(summary) -> str:
    lines = [f"{summary.n_images} image(s) in {summary.n_batches} batch(es): {summary.n_analysed} analysed now, "
             f"{summary.n_reused} already done, {summary.n_failed} failed"]
    view = summary.batches[["batch", "n_images", "n_particles", "n_failed", "verdict", "failed_checks"]]
    lines.append(view.to_string(index=False))
    return "\n".join(lines)
