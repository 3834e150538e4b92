"""The qcloop daemon (``qcloop run --config FILE``): watch the export folder, analyse every image
once, score each batch, publish everything over MQTT, expose Prometheus metrics.

Who owns what (threads)
-----------------------
watcher (:mod:`qcloop.daemon.watcher`)
    The watchdog observer thread and one *settle* thread. They only look at file names, sizes
    and mtimes; when a file has been stable for ``watch.settle_seconds`` its path (never its
    pixels) is put on the worker queue. Duplicate events for one file collapse into one entry.
worker (:class:`qcloop.daemon.service.Daemon`, the main thread)
    The only thread that decodes and analyses images, computes batch metrics, runs the
    control hooks and MQTT command handlers, and writes the ledger. Every state change and
    the MQTT message announcing it are committed in one SQLite transaction (the outbox lives
    in the ledger database), so a ``kill -9`` at any moment loses or duplicates nothing.
publisher (:mod:`qcloop.daemon.mqtt`)
    One thread that drains the outbox in id order into paho-mqtt (at most
    ``mqtt.max_inflight`` unacknowledged) and deletes a row only after the broker's PUBACK;
    paho's network thread only hands acknowledgements and inbound messages over through
    queues. Inbound messages (commands, reactor batch starts, control topics) are queued to
    the worker, never handled on the network thread.
metrics (:mod:`qcloop.daemon.metrics`)
    prometheus-client's HTTP thread reads counters/gauges the other threads update.

Modules: :mod:`~qcloop.daemon.ledger` (SQLite WAL: images, batches, key/value state),
:mod:`~qcloop.daemon.outbox` (message records and the durable outbox table),
:mod:`~qcloop.daemon.batches` (batch keys and batch results), :mod:`~qcloop.daemon.mqtt`,
:mod:`~qcloop.daemon.metrics`, :mod:`~qcloop.daemon.watcher`, :mod:`~qcloop.daemon.service`.
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
