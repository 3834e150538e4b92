"""Worker side: one pipeline per worker thread, built once, and the task that analyses one image.

The client registers a :class:`PipelinePlugin` (a Dask worker plugin; the scheduler hands it to
every worker, also to workers that join or restart later). Its ``setup`` writes the classifier
bytes to a private temporary folder and records the :class:`~qcloop.cluster.spec.WorkSpec` under
its fingerprint; the first task on each worker thread builds the pipeline from it and keeps it
(a Dask worker may run several threads; ``qcloop`` recommends one thread per worker process, the
pipeline is single-core NumPy). ``teardown`` (when the client unregisters the plugin) drops the
pipelines and the temporary files.

This module imports ``distributed``: import it only in cluster code paths.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from distributed import WorkerPlugin

from qcloop.cluster.spec import ImageJob, WorkSpec

_LOCK = threading.Lock()
_SPECS: dict[str, tuple[WorkSpec, Path | None, Path]] = {}  # fingerprint -> (spec, model path, temp dir)
_USERS: dict[str, int] = {}  # fingerprint -> registered plugins using it
_PIPELINES: dict[tuple[str, int], Any] = {}  # (fingerprint, thread id) -> Pipeline


class PipelinePlugin(WorkerPlugin):
    """Makes the pipeline of ``spec`` available to :func:`run_job` on every worker.

    ``name`` is unique per registration, so two clients with the same configuration on one
    cluster do not replace each other's plugin.
    """

    def __init__(self, spec: WorkSpec, name: str):
        self.spec = spec
        self.name = name

    def setup(self, worker: Any = None) -> None:
        fp = self.spec.fingerprint
        with _LOCK:
            _USERS[fp] = _USERS.get(fp, 0) + 1
            if fp in _SPECS:
                return
            folder = Path(tempfile.mkdtemp(prefix="qcloop-model-"))
            _SPECS[fp] = (self.spec, self.spec.write_model(folder), folder)

    def teardown(self, worker: Any = None) -> None:
        fp = self.spec.fingerprint
        with _LOCK:
            _USERS[fp] = _USERS.get(fp, 1) - 1
            if _USERS[fp] > 0:
                return
            _USERS.pop(fp, None)
            entry = _SPECS.pop(fp, None)
            for key in [k for k in _PIPELINES if k[0] == fp]:
                del _PIPELINES[key]
        if entry is not None:
            shutil.rmtree(entry[2], ignore_errors=True)


def pipeline_for(fingerprint: str) -> Any:
    """This thread's pipeline for ``fingerprint`` (built on first use)."""
    key = (fingerprint, threading.get_ident())
    with _LOCK:
        pipeline = _PIPELINES.get(key)
        entry = _SPECS.get(fingerprint)
    if pipeline is not None:
        return pipeline
    if entry is None:
        raise RuntimeError(f"no qcloop pipeline {fingerprint[:12]} on this worker: the client's "
                           "PipelinePlugin was not set up here (is qcloop installed on the worker?)")
    spec, model_path, _ = entry
    pipeline = spec.build(model_path)
    with _LOCK:
        return _PIPELINES.setdefault(key, pipeline)


def run_job(fingerprint: str, func: Callable[..., dict[str, Any]], job: ImageJob) -> dict[str, Any]:
    """The Dask task: ``func(pipeline, file, *job.args)`` with ``"path"`` set to the client's name."""
    pipeline = pipeline_for(fingerprint)
    with tempfile.TemporaryDirectory(prefix="qcloop-image-") as folder:
        out = func(pipeline, job.materialise(Path(folder)), *job.args)
    out["path"] = Path(job.path)
    return out
