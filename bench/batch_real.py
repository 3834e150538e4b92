"""Benchmark: ``qcloop batch`` on the 15 real Konstanz SEM images with the morphology embedder.

Steps
-----
1. Train a small classifier (logistic regression on morphology embeddings) from a few labelled
   particles: up to ``--per-class`` interior particles per class from one image of each series
   (GM_59_20, GM_116_20, GM_124_00). There are no human labels for these images, so a particle
   is labelled by the number of lobes the lobe grouping found (1 sphere, 2 dumbbell, 3 trimer).
   The point is the run time of a realistic batch with a real classifier, not its accuracy.
2. Run ``python -m qcloop batch <15 images> --model M --out DIR`` as a subprocess (so the figure
   includes interpreter start-up, imports, model loading, the report) and print its wall time,
   the per-stage seconds from batch.json and the class fractions.

Usage: ``python bench/batch_real.py [--out DIR] [--per-class N] [--jobs N]``. Acceptance:
< 30 s wall. Also printed: the CPU seconds of the batch (all processes) and the machine's load
average, since on a shared machine the wall time depends on what else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def train_model(konstanz: Path, model_path: Path, per_class: int) -> dict[str, int]:
    from qcloop.classify import Classifier
    from qcloop.config import load_settings
    from qcloop.pipeline import Pipeline

    settings = load_settings(use_env=False)
    pipe = Pipeline.from_settings(settings, embed=True)
    names = {1: "sphere", 2: "dumbbell", 3: "trimer"}
    X, y = [], []
    counts = {c: 0 for c in names.values()}
    for stem in ("GM_59_20", "GM_116_20", "GM_124_00"):
        res = pipe.analyze(konstanz / f"{stem}.tif")
        p = res.particles.reset_index(drop=True)
        for i in np.flatnonzero(~p["touches_border"].to_numpy(bool)):
            cls = names.get(int(p.loc[i, "lobes"]))
            if cls is None or counts[cls] >= per_class:
                continue
            X.append(res.embeddings[i])
            y.append(cls)
            counts[cls] += 1
    model = Classifier.fit(np.asarray(X), y, kind="logreg", embedder_spec=pipe.embedder.spec)
    model.save(model_path)
    return counts


def main(argv: list[str] | None = None) -> int:
    from qcloop.data import sem_data_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="output folder (default: a temporary one)")
    ap.add_argument("--per-class", type=int, default=10, help="labelled particles per class (default 10)")
    ap.add_argument("--jobs", type=int, help="passed to qcloop batch --jobs (default: its own default)")
    args = ap.parse_args(argv)

    data = sem_data_dir()
    if data is None:
        print("real SEM images not found (set QCLOOP_SEM_DATA)", file=sys.stderr)
        return 2
    konstanz = data / "konstanz"
    images = sorted(konstanz.glob("*.tif"))
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "batch"
        model = Path(tmp) / "model.json"
        t0 = time.perf_counter()
        counts = train_model(konstanz, model, args.per_class)
        t_train = time.perf_counter() - t0
        print(f"trained classifier on {counts} in {t_train:.1f} s")

        cmd = [sys.executable, "-m", "qcloop", "batch", *map(str, images), "--model", str(model), "--out", str(out)]
        if args.jobs is not None:
            cmd += ["--jobs", str(args.jobs)]
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        print(proc.stdout)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            print(f"qcloop batch exited {proc.returncode}", file=sys.stderr)
            return 1
        doc = json.loads((out / "batch.json").read_text())
        print(f"images: {len(doc['images'])}, particles: {doc['metrics']['n_particles']} "
              f"(+{doc['metrics']['n_border']} cut by the border)")
        print("seconds by stage (summed over images): "
              + ", ".join(f"{k}={v:.2f}" for k, v in doc["seconds"].items()))
        print(f"report.html: {(out / 'report.html').stat().st_size / 1e6:.1f} MB")
        print(f"CPU time of qcloop batch and its workers: {cpu:.1f} s; machine load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (wall time depends on it)")
        print(f"WALL TIME qcloop batch (15 images, subprocess incl. start-up): {wall:.2f} s "
              f"({'PASS' if wall < 30 else 'FAIL'}: target < 30 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
