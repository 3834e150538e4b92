"""Benchmark: ``qcloop archive`` on a local Dask cluster of 1 and of 2 worker processes.

On the real Konstanz SEM images (15 by default; default configuration, batch key = the GM
series), for each worker count: start a ``distributed.LocalCluster`` (one thread per worker),
then time :func:`qcloop.cluster.archive.run_archive` into a fresh output folder (everything is
analysed), then once more into the same folder (everything is already done: hashing, the local
pipeline check and writing the outputs -- the fixed cost of a run). Printed per run:

* ``wall``: the whole first run; ``images/s`` = images / wall;
* ``fixed``: the second run's wall; ``analysis images/s`` = images / (wall - fixed);
* ``busy``: the pipeline's own seconds summed over the images (``images.parquet``) divided by
  (workers x (wall - fixed)): the share of the workers' time spent analysing;
* ``peak RSS``: the largest worker process's peak resident memory (``ru_maxrss``).

Then the ratio of the 2-worker to the 1-worker images/s (both from the same invocation), and
the scheduler overhead per task: the wall of 400 no-op tasks submitted at once on the 2-worker
cluster divided by 400, and the round trip of one no-op task at a time (median of 50).

Usage: ``python bench/archive.py [--images N] [--repeats R]``. The machine's load average is
printed before and after: on a shared machine the figures depend on what else runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

CONFIG = {"batch": {"key": "regex:^(?P<batch>GM_\\d+)_"}}


def _noop(x: int) -> int:
    return x


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def one_run(root: Path, workers: int, tmp: Path) -> dict[str, float]:
    import distributed
    import pandas as pd

    from qcloop.cluster.archive import run_archive
    from qcloop.config import load_settings

    settings = load_settings(use_env=False, **CONFIG)
    out = tmp / f"out-{workers}-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        t_start = time.perf_counter() - t0
        t0 = time.perf_counter()
        summary = run_archive(root, out, settings, cluster=cluster.scheduler_address)
        wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_archive(root, out, settings, cluster=cluster.scheduler_address)
        fixed = time.perf_counter() - t0
        rss = max(client.run(_peak_rss_mib).values())
        overhead = scheduler_overhead(client) if workers == 2 else {}
    n = summary.n_images
    busy = float(pd.read_parquet(out / "images.parquet")["seconds"].sum())
    return {"workers": workers, "images": n, "start": t_start, "wall": wall, "fixed": fixed,
            "images_per_s": n / wall, "analysis_images_per_s": n / max(wall - fixed, 1e-9),
            "busy": busy / (workers * max(wall - fixed, 1e-9)), "rss_mib": rss, **overhead}


def scheduler_overhead(client, n: int = 400, single: int = 50) -> dict[str, float]:
    client.gather(client.map(_noop, range(10), pure=False))  # warm up
    t0 = time.perf_counter()
    client.gather(client.map(_noop, range(n), pure=False))
    batch = (time.perf_counter() - t0) / n
    rtt = []
    for i in range(single):
        t0 = time.perf_counter()
        client.submit(_noop, i, pure=False).result()
        rtt.append(time.perf_counter() - t0)
    return {"overhead_batch_ms": 1000 * batch, "overhead_single_ms": 1000 * statistics.median(rtt)}


def main(argv: list[str] | None = None) -> int:
    from qcloop.data import sem_data_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=15, help="first N Konstanz images (default 15)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per worker count, alternating (default 1)")
    args = ap.parse_args(argv)
    data = sem_data_dir()
    if data is None:
        print("real SEM images not found (set QCLOOP_SEM_DATA)", file=sys.stderr)
        return 2
    images = sorted((data / "konstanz").glob("*.tif"))[: args.images]
    print(f"{len(images)} Konstanz images, {os.cpu_count()} CPU cores, load average before "
          + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    results: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = tmp / "root"
        root.mkdir()
        for p in images:
            (root / p.name).symlink_to(p)
        for _ in range(args.repeats):
            for workers in (1, 2):
                r = one_run(root, workers, tmp)
                results[workers].append(r)
                print(f"{workers} worker(s): cluster start {r['start']:.1f} s, wall {r['wall']:.1f} s "
                      f"({r['images_per_s']:.3f} images/s), fixed {r['fixed']:.1f} s, analysis "
                      f"{r['analysis_images_per_s']:.3f} images/s, busy {100 * r['busy']:.0f} %, "
                      f"worker peak RSS {r['rss_mib']:.0f} MiB")
    med = {w: {k: statistics.median(r[k] for r in rs) for k in ("images_per_s", "analysis_images_per_s")}
           for w, rs in results.items()}
    print(f"ratio 2 / 1 workers: {med[2]['images_per_s'] / med[1]['images_per_s']:.2f}x end to end, "
          f"{med[2]['analysis_images_per_s'] / med[1]['analysis_images_per_s']:.2f}x analysis phase")
    ov = results[2][-1]
    print(f"scheduler overhead per task: {ov['overhead_batch_ms']:.2f} ms (400 no-op tasks at once), "
          f"{ov['overhead_single_ms']:.2f} ms round trip of one no-op task")
    print("load average after " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
