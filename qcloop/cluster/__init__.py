"""Run qcloop's per-image analysis on a Dask cluster (the optional ``cluster`` extra).

* :mod:`qcloop.cluster.spec` -- what travels to the workers (configuration, classifier bytes,
  one job per image) and the content hash; no Dask.
* :mod:`qcloop.cluster.worker` -- the worker plugin that builds the pipeline once per worker
  thread, and the task.
* :mod:`qcloop.cluster.client` -- ``--cluster`` values, connecting, the windowed task loop.
* :mod:`qcloop.cluster.manifest` and :mod:`qcloop.cluster.archive` -- ``qcloop archive``:
  exactly-once, resumable re-analysis of a whole archive into a Parquet data set.

Dask is imported only when a cluster is used: ``import qcloop.cluster`` works on the core
install, and ``--cluster`` without Dask fails with an install hint. See docs/archive.md.
"""

from qcloop.cluster.client import add_cluster_argument, map_images, open_client, parse_cluster, run_jobs
from qcloop.cluster.spec import ImageJob, WorkSpec, content_sha256

__all__ = ["add_cluster_argument", "map_images", "open_client", "parse_cluster", "run_jobs",
           "ImageJob", "WorkSpec", "content_sha256"]
