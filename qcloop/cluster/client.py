"""Client side: connect to a Dask cluster and run one task per image, a bounded window at a time.

``--cluster`` values (:func:`parse_cluster`):

======================  =====================================================================
``local``               a ``distributed.LocalCluster`` of one worker process per CPU core
``local:N``             the same with N worker processes (one thread each)
``tcp://HOST:PORT``     an existing scheduler (``dask scheduler``; also ``tls://``, ``ws://``,
                        ``wss://``, ``ucx://``)
``scheduler-file:PATH`` an existing scheduler that wrote ``PATH`` (``dask scheduler
                        --scheduler-file PATH``; the usual way on HPC clusters)
======================  =====================================================================

Files: workers open the images themselves when they see the client's files (same path, size
and mtime of the first image on every worker connected at the start: shared file system or
same machine); otherwise the client sends each image's bytes (and its sidecar metadata files)
with its task. ``transfer="path"`` or ``"bytes"`` forces one way. Workers that join later are
assumed to be like the ones probed.

At most ``WINDOW_PER_THREAD`` tasks per worker thread are in flight (at least
``MIN_WINDOW``), so the scheduler never holds the whole archive, nor its bytes.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from qcloop.cluster.spec import ImageJob, WorkSpec
from qcloop.errors import QcloopError

#: tasks in flight per worker thread: enough that no worker waits between two images
WINDOW_PER_THREAD = 4
MIN_WINDOW = 8
#: seconds to wait for the first worker of an external cluster (a batch queue can be slow)
WORKER_WAIT_S = 300.0
#: seconds to reach an external scheduler
CONNECT_TIMEOUT_S = 30.0
TRANSFERS = ("auto", "path", "bytes")
_ADDRESS_SCHEMES = ("tcp://", "tls://", "ws://", "wss://", "ucx://", "inproc://")
_CLUSTER_HELP = ("run the images on a Dask cluster: local, local:N (N worker processes here), "
                 "tcp://HOST:PORT (a running 'dask scheduler') or scheduler-file:PATH; "
                 "needs the cluster extra (pip install 'qcloop[cluster]'); see docs/archive.md")

log = logging.getLogger(__name__)


def add_cluster_argument(parser: argparse.ArgumentParser, *, default: str | None = None) -> None:
    """Add ``--cluster SPEC`` to a command's parser."""
    parser.add_argument("--cluster", metavar="SPEC", default=default, type=_cluster_value, help=_CLUSTER_HELP)


def _cluster_value(text: str) -> str:
    try:
        parse_cluster(text)
    except QcloopError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--cluster {text!r}: ")) from None
    return text


def parse_cluster(text: str) -> tuple[str, Any]:
    """``("local", N or None)``, ``("address", text)`` or ``("scheduler_file", path)``."""
    t = str(text).strip()
    if t == "local":
        return "local", None
    if t.startswith("local:"):
        n = t[len("local:"):]
        if not n.isdigit() or int(n) < 1:
            raise QcloopError(f"--cluster {text!r}: local:N needs a whole number of workers >= 1")
        return "local", int(n)
    if t.startswith(_ADDRESS_SCHEMES):
        return "address", t
    if t.startswith("scheduler-file:") and len(t) > len("scheduler-file:"):
        return "scheduler_file", t[len("scheduler-file:"):]
    raise QcloopError(f"--cluster {text!r}: expected local, local:N, tcp://HOST:PORT or scheduler-file:PATH")


def require_dask(modules: tuple[str, ...] = ("distributed",)) -> None:
    """Fail with an install hint unless the ``cluster`` extra's ``modules`` are installed."""
    import importlib.util

    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except ValueError:  # a module set to None in sys.modules (tests)
            found = False
        if not found:
            raise QcloopError(f"--cluster and qcloop archive need {name}: pip install 'qcloop[cluster]'")


def local_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def open_client(text: str) -> Iterator[Any]:
    """A ``distributed.Client`` for ``--cluster text``; a local cluster is closed with it."""
    require_dask()
    from distributed import Client, LocalCluster

    kind, value = parse_cluster(text)
    # distributed logs every worker start at INFO; follow the command's -v instead
    root = logging.getLogger().getEffectiveLevel()
    logging.getLogger("distributed").setLevel(logging.WARNING if root >= logging.WARNING else root)
    cluster = None
    try:
        if kind == "local":
            cluster = LocalCluster(n_workers=value or local_workers(), threads_per_worker=1,
                                   processes=True, dashboard_address=":0", silence_logs=logging.ERROR)
            client = Client(cluster)
        elif kind == "address":
            client = Client(value, timeout=CONNECT_TIMEOUT_S)
        else:
            client = Client(scheduler_file=value, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        if cluster is not None:
            cluster.close()
        raise QcloopError(f"--cluster {text}: cannot reach the Dask scheduler ({type(exc).__name__}: {exc})") from None
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def workers_share_files(client: Any, probe: Path) -> bool:
    """True when every connected worker sees ``probe`` with the client's size and mtime."""
    st = Path(probe).stat()
    seen = client.run(_stat, str(Path(probe).resolve()))
    return bool(seen) and all(v == (st.st_size, st.st_mtime_ns) for v in seen.values())


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def run_jobs(client: Any, spec: WorkSpec, func: Callable[..., dict[str, Any]],
             work: Sequence[tuple[Any, ...]], *, desc: str, transfer: str = "auto") -> Iterator[tuple[int, dict[str, Any]]]:
    """Run ``func(pipeline, path, *rest)`` for every ``(path, *rest)`` of ``work`` on the cluster.

    Yields ``(index in work, result)`` as tasks finish, with a progress bar. A task that raised,
    or whose worker died ``distributed.scheduler.allowed-failures`` times, gives
    ``{"path", "error", "transient": True}`` (the image itself may be fine).
    """
    from distributed import as_completed
    from tqdm import tqdm

    from qcloop.cluster.worker import PipelinePlugin, run_job

    if transfer not in TRANSFERS:
        raise QcloopError(f"transfer must be one of {', '.join(TRANSFERS)}, got {transfer!r}")
    if not work:
        return
    _wait_for_workers(client)
    send = transfer == "bytes" or (transfer == "auto" and not workers_share_files(client, Path(work[0][0])))
    plugin = PipelinePlugin(spec, f"qcloop-pipeline-{spec.fingerprint[:12]}-{uuid.uuid4().hex[:8]}")
    client.register_plugin(plugin)
    todo = iter(enumerate(work))
    index: dict[Any, int] = {}
    running = as_completed()

    def submit(n: int) -> None:
        for i, (path, *rest) in _take(todo, n):
            job = ImageJob.of(Path(path), tuple(rest), send_bytes=send)
            fut = client.submit(run_job, spec.fingerprint, func, job, pure=False, key=f"qcloop-image-{uuid.uuid4().hex}")
            index[fut] = i
            running.add(fut)

    bar = tqdm(total=len(work), desc=desc, unit="img", file=sys.stderr, disable=None)
    window = _Window(client)
    try:
        submit(window.size())
        for fut in running:
            i = index.pop(fut)
            yield i, _result(fut, Path(work[i][0]))
            fut.release()
            bar.update(1)
            submit(max(0, window.size() - len(index)))
    finally:
        bar.close()
        for fut in list(index):
            fut.cancel()
        try:
            client.unregister_worker_plugin(plugin.name)
        except Exception as exc:  # noqa: BLE001 - the cluster may be gone already
            log.debug("could not unregister %s: %s", plugin.name, exc)


def map_images(cluster: str, settings: Any, func: Callable[..., dict[str, Any]],
               work: Sequence[tuple[Any, ...]], *, embed: bool, desc: str,
               transfer: str = "auto") -> Iterator[dict[str, Any]]:
    """:func:`run_jobs` on the ``--cluster`` cluster, results in the order of ``work``."""
    spec = WorkSpec.of(settings, embed=embed)
    with open_client(cluster) as client:
        done: dict[int, dict[str, Any]] = {}
        nxt = 0
        for i, result in run_jobs(client, spec, func, work, desc=desc, transfer=transfer):
            done[i] = result
            while nxt in done:
                yield done.pop(nxt)
                nxt += 1


def _result(fut: Any, path: Path) -> dict[str, Any]:
    from distributed import KilledWorker

    if fut.status == "finished":
        return fut.result()
    if fut.status == "cancelled":
        return {"path": path, "error": "task cancelled (the scheduler lost it)", "transient": True}
    exc = fut.exception()
    if isinstance(exc, KilledWorker):
        reason = "the Dask worker died every time it analysed this image (out of memory?)"
    else:
        reason = f"{type(exc).__name__}: {exc}"
    return {"path": path, "error": reason, "transient": True}


class _Window:
    """Tasks to keep in flight: WINDOW_PER_THREAD per worker thread, re-counted every few seconds."""

    def __init__(self, client: Any, every_s: float = 2.0):
        self.client, self.every_s, self.at, self.n = client, every_s, -math.inf, MIN_WINDOW

    def size(self) -> int:
        if time.monotonic() - self.at > self.every_s:
            self.n = max(MIN_WINDOW, WINDOW_PER_THREAD * sum(self.client.nthreads().values()))
            self.at = time.monotonic()
        return self.n


def _wait_for_workers(client: Any) -> None:
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except TimeoutError:
        raise QcloopError(f"no Dask worker joined the scheduler within {WORKER_WAIT_S:.0f} s") from None


def _take(it: Iterator[Any], n: int) -> Iterable[Any]:
    for _ in range(n):
        try:
            yield next(it)
        except StopIteration:
            return
