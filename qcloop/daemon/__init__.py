"""The qcloop daemon (``qcloop run --config FILE``): watch the export folder, analyse every image
once, score each batch, publish everything over MQTT, expose Prometheus metrics.

Follow one image (read in this order)
-------------------------------------
1. :mod:`~qcloop.daemon.watcher` -- a file appears, settles, its *path* is queued
   (links followed only inside the tree; loops, dangling links, FIFOs reported once).
2. :mod:`~qcloop.daemon.service` (``Daemon._handle_file`` -> ``_analyse`` -> ``_record_result``)
   -- ledger row, :mod:`qcloop.imaging` (header checks + memory budget before decoding),
   :mod:`qcloop.pipeline`, batch switch.
3. :mod:`~qcloop.daemon.messages` -- the ``images/result`` payload, built by schema name
   (:mod:`~qcloop.daemon.contracts` gives topic, QoS, retain from ``qcloop/schemas``).
4. :mod:`~qcloop.daemon.ledger` / :mod:`~qcloop.daemon.outbox` -- result, particle table and the
   message committed in one transaction.
5. :mod:`~qcloop.daemon.mqtt` -- the publisher sends the row, deletes it on PUBACK.
A bad file goes to :mod:`~qcloop.daemon.quarantine` instead of 3-4; a closed batch goes through
:mod:`~qcloop.daemon.batches` (``compute_batch``) and ``messages.batch_result``.

Who owns what (threads)
-----------------------
watcher (:mod:`qcloop.daemon.watcher`)
    The watchdog observer thread and one *settle* thread. They only look at file names, sizes
    and mtimes; when a file has been stable for ``watch.settle_seconds`` its path (never its
    pixels) is put on the worker queue. Duplicate events for one file collapse into one entry.
worker (:class:`qcloop.daemon.service.Daemon`, the main thread)
    The only thread that decodes and analyses images, computes batch metrics, runs the
    control hooks and the inbound-message handlers (:mod:`qcloop.daemon.inbound`: one handler
    table, size / nesting / schema checks first), runs retention, and writes the ledger. Every
    state change and the MQTT message announcing it are committed in one SQLite transaction
    (the outbox lives in the ledger database), so a ``kill -9`` at any moment loses or
    duplicates nothing. It exits with status 1 when another thread died.
MQTT network + publisher (:mod:`qcloop.daemon.mqtt`)
    The network thread owns the connection (every failed connect logged with its reason, the
    port probed during outages) and queues inbound messages to the worker, which acknowledges
    them only after its commit (persistent session). The publisher drains the outbox in id
    order (at most ``mqtt.max_inflight`` unacknowledged) and deletes a row only after the
    broker's PUBACK.
metrics (:mod:`qcloop.daemon.http`)
    One accept thread plus ``metrics.threads`` workers serve the counters and gauges of
    :mod:`qcloop.daemon.metrics` that the other threads update.
systemd watchdog (:mod:`qcloop.daemon.systemd`)
    Feeds ``WATCHDOG=1`` while :meth:`Daemon.healthy`.

Modules: :mod:`~qcloop.daemon.ledger` (SQLite WAL: images, batches, inbox, key/value state),
:mod:`~qcloop.daemon.outbox` (message records and the durable outbox table),
:mod:`~qcloop.daemon.contracts` (the schemas and their topics), :mod:`~qcloop.daemon.messages`
(every outbound payload), :mod:`~qcloop.daemon.inbound` (every inbound one),
:mod:`~qcloop.daemon.batches` (batch keys and batch results), :mod:`~qcloop.daemon.quarantine`,
:mod:`~qcloop.daemon.names` (file names that are not UTF-8), :mod:`~qcloop.daemon.mqtt`,
:mod:`~qcloop.daemon.metrics`, :mod:`~qcloop.daemon.http`, :mod:`~qcloop.daemon.systemd`,
:mod:`~qcloop.daemon.watcher`, :mod:`~qcloop.daemon.service`.
"""

from __future__ import annotations

__all__ = ["Daemon", "BatchClosed", "OutMessage", "InboundMessage", "WorkerContext"]


def __getattr__(name: str):  # lazy: importing the package must not start anything heavy
    if name in ("Daemon", "BatchClosed", "WorkerContext"):
        from qcloop.daemon import service

        return getattr(service, name)
    if name in ("OutMessage", "InboundMessage"):
        from qcloop.daemon import outbox

        return getattr(outbox, name)
    raise AttributeError(name)
