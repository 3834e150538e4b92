"""Prometheus metrics of the daemon, all in one :class:`prometheus_client.CollectorRegistry`.

Labels are bounded: stage names, particle classes, batch-metric names, error kinds. File
names and batch ids are never labels (they are in the MQTT messages instead).

Metric names (the Grafana dashboard in ``deploy/grafana`` queries these; a test checks that
every name it uses exists on the live endpoint):

=========================================  ==========================================
qcloop_info{version, config_hash, line_id}  build/config info (value 1)
qcloop_up                                   1 while the worker loop runs
qcloop_images_processed_total               images analysed and recorded
qcloop_images_failed_total                  analysis raised an unexpected error
qcloop_images_quarantined_total             unreadable / corrupt / poison images
qcloop_images_duplicate_total               events for files already in the ledger
qcloop_particles_total{class}               particles found, by class
qcloop_stage_seconds{stage}                 histogram: load, segment, lobes, measure, ...
qcloop_image_seconds                        histogram: whole analysis of one image
qcloop_queue_wait_seconds                   histogram: settled → analysis starts
qcloop_queue_depth                          files settling + queued for the worker
qcloop_batches_closed_total{verdict}        pass / fail / insufficient / error
qcloop_batch_metric{metric, class}          latest closed batch (see split_metric_name)
qcloop_batch_passed                         latest closed batch verdict (1 pass, 0 fail)
qcloop_batch_particles                      particles in the latest closed batch
qcloop_batch_images                         images in the latest closed batch
qcloop_batch_closed_timestamp_seconds       when the latest batch closed
qcloop_mqtt_connected                       1 after CONNACK success, 0 otherwise
qcloop_mqtt_published_total                 messages acknowledged by the broker
qcloop_mqtt_rejected_total                  messages the broker refused (PUBACK >= 0x80)
qcloop_outbox_messages                      messages waiting for a PUBACK
qcloop_errors_total{kind}                   error events, by kind
qcloop_healthy                              1 while every thread lives and nothing stalls
qcloop_mqtt_connect_failures_total{reason}  failed connects (refused, tls-verify, auth, ...)
qcloop_mqtt_expired_total                   outbox messages dropped unsent: expired
qcloop_inbound_messages_total{topic}        inbound messages handled, by topic
qcloop_inbound_rejected_total{topic,reason} refused at the edge (too-large, too-deep, ...)
qcloop_inbound_duplicates_total             redeliveries of messages already handled
qcloop_watch_last_file_timestamp_seconds    when the watcher last saw a new file
qcloop_watch_problems_total{kind}           links the watcher will not follow, by kind
qcloop_retention_pruned_total{kind}         particles, rows, inbox, quarantine, seen
=========================================  ==========================================

Every label set the daemon can produce is created at start (value 0), so ``increase()`` counts
the first event too. The HTTP endpoint (:mod:`qcloop.daemon.http`) adds ``line="<line_id>"`` to
every series, from the same setting as ``qcloop_info{line_id}``.
"""

from __future__ import annotations

import math
from typing import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from qcloop.batch import parse_metric_name

#: pipeline stages timed in ``qcloop_stage_seconds{stage}`` (``qcloop.pipeline.Pipeline.analyze``)
STAGES = ("load", "segment", "lobes", "measure", "embed", "classify")
WATCH_PROBLEMS = ("symlink-loop", "dangling-link", "outside-link", "not-a-file", "unreadable")
RETENTION_KINDS = ("particles", "rows", "inbox", "quarantine", "seen")

# stage latencies from 50 ms (tiny image, classical) to 10 min (SAM auto mode on CPU)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
                   600.0, float("inf"))
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                float("inf"))



class DaemonMetrics:
    """Every metric the daemon exports, registered in ``registry``.

    Parameters
    ----------
    registry : CollectorRegistry
        Tests pass a fresh one; the daemon builds its own (never the global default).
    """

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        r = registry
        self.info = Gauge("qcloop_info", "qcloop version and configuration hash",
                          ["version", "config_hash", "line_id"], registry=r)
        self.up = Gauge("qcloop_up", "1 while the daemon's worker loop runs", registry=r)
        self.images_processed = Counter("qcloop_images_processed", "Images analysed and recorded",
                                        registry=r)
        self.images_failed = Counter("qcloop_images_failed",
                                     "Images whose analysis raised an unexpected error", registry=r)
        self.images_quarantined = Counter("qcloop_images_quarantined",
                                          "Unreadable, corrupt or poison images moved to quarantine",
                                          registry=r)
        self.images_duplicate = Counter("qcloop_images_duplicate",
                                        "File events for images already in the ledger", registry=r)
        self.particles = Counter("qcloop_particles", "Particles found, by class", ["class"], registry=r)
        self.stage_seconds = Histogram("qcloop_stage_seconds", "Time per pipeline stage", ["stage"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.image_seconds = Histogram("qcloop_image_seconds", "Whole analysis of one image",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("qcloop_queue_wait_seconds",
                                    "From file settled to the start of its analysis",
                                    buckets=WAIT_BUCKETS, registry=r)
        self.queue_depth = Gauge("qcloop_queue_depth", "Files settling or queued for analysis",
                                 registry=r)
        self.batches_closed = Counter("qcloop_batches_closed", "Batches closed, by verdict",
                                      ["verdict"], registry=r)
        self.batch_metric = Gauge("qcloop_batch_metric",
                                  "Metrics of the latest closed batch (class='' when not per class)",
                                  ["metric", "class"], registry=r)
        self.batch_passed = Gauge("qcloop_batch_passed",
                                  "Verdict of the latest closed batch (1 pass, 0 fail)", registry=r)
        self.batch_particles = Gauge("qcloop_batch_particles", "Particles in the latest closed batch",
                                     registry=r)
        self.batch_images = Gauge("qcloop_batch_images", "Images in the latest closed batch", registry=r)
        self.batch_closed_ts = Gauge("qcloop_batch_closed_timestamp_seconds",
                                     "Unix time the latest batch closed", registry=r)
        self.mqtt_connected = Gauge("qcloop_mqtt_connected", "1 while connected to the broker",
                                    registry=r)
        self.mqtt_published = Counter("qcloop_mqtt_published",
                                      "Messages acknowledged by the broker", registry=r)
        self.mqtt_rejected = Counter("qcloop_mqtt_rejected",
                                     "Messages the broker refused (reason code >= 0x80)", registry=r)
        self.outbox = Gauge("qcloop_outbox_messages", "Messages stored and not yet acknowledged",
                            registry=r)
        self.errors = Counter("qcloop_errors", "Error events, by kind", ["kind"], registry=r)
        self.healthy = Gauge("qcloop_healthy", "1 while every daemon thread lives and the worker is not stalled",
                             registry=r)
        self.mqtt_connect_failures = Counter("qcloop_mqtt_connect_failures", "Failed connects to the broker, by reason",
                                             ["reason"], registry=r)
        self.mqtt_expired = Counter("qcloop_mqtt_expired", "Outbox messages dropped unsent because they expired",
                                    registry=r)
        self.inbound = Counter("qcloop_inbound_messages", "Inbound MQTT messages handled, by topic", ["topic"],
                               registry=r)
        self.inbound_rejected = Counter("qcloop_inbound_rejected", "Inbound messages refused at the edge",
                                        ["topic", "reason"], registry=r)
        self.inbound_duplicates = Counter("qcloop_inbound_duplicates",
                                          "Redelivered inbound messages that were already handled", registry=r)
        self.watch_last_file = Gauge("qcloop_watch_last_file_timestamp_seconds",
                                     "Unix time the watcher last saw a new file", registry=r)
        self.watch_problems = Counter("qcloop_watch_problems", "Links the watcher will not follow, by kind",
                                      ["kind"], registry=r)
        self.retention = Counter("qcloop_retention_pruned", "Items removed by retention, by kind", ["kind"],
                                 registry=r)
        self._precreate()

    def _precreate(self) -> None:
        """Every label set that can occur, at 0 from the first scrape."""
        from qcloop.daemon.contracts import contracts
        from qcloop.daemon.inbound import REJECT_REASONS
        from qcloop.daemon.messages import ERROR_KINDS
        from qcloop.daemon.mqtt import CONNECT_FAILURES

        table = [(self.errors, "kind", ERROR_KINDS + ("mqtt-rejected",)),
                 (self.batches_closed, "verdict", ("pass", "fail", "insufficient", "error")),
                 (self.stage_seconds, "stage", STAGES),
                 (self.mqtt_connect_failures, "reason", CONNECT_FAILURES),
                 (self.watch_problems, "kind", WATCH_PROBLEMS),
                 (self.retention, "kind", RETENTION_KINDS)]
        for metric, label, values in table:
            for v in values:
                metric.labels(**{label: v})
        inbound = [c.topic for c in contracts().values() if c.direction == "in"]
        for topic in inbound:
            self.inbound.labels(topic=topic)
            for reason in REJECT_REASONS:
                self.inbound_rejected.labels(topic=topic, reason=reason)

    def precreate_classes(self, classes) -> None:
        """``qcloop_particles_total{class}`` for every class the pipeline can report."""
        for cls in classes:
            self.particles.labels(**{"class": str(cls)})

    def restore_batch(self, result: Mapping | None) -> None:
        """Last-batch gauges from the stored result of the batch closed last (at start)."""
        if not result:
            return
        from datetime import datetime

        checks = result.get("checks")
        closed = datetime.fromisoformat(str(result["closed_at"])).timestamp()
        self.set_batch(result.get("flat") or {}, passed=None if not checks else bool(checks.get("passed")),
                       n_particles=int(result.get("n_particles") or 0), n_images=int(result.get("n_images") or 0),
                       closed_at=closed)

    def set_batch(self, flat: Mapping[str, float], *, passed: bool | None, n_particles: int,
                  n_images: int, closed_at: float) -> None:
        """Expose the latest closed batch (``flat`` = :meth:`qcloop.batch.BatchMetrics.flat`)."""
        self.batch_metric.clear()
        for key, value in flat.items():
            # undefined metrics (a one-class batch has no silhouette) arrive as None from the
            # JSON payload: exported as NaN, so the series exists and a panel shows "no value"
            try:
                v = float("nan") if value is None else float(value)
            except (TypeError, ValueError):
                continue
            metric, cls = split_metric_name(key)
            self.batch_metric.labels(metric=metric, **{"class": cls}).set(
                v if math.isfinite(v) else float("nan"))
        self.batch_passed.set(float("nan") if passed is None else float(bool(passed)))
        self.batch_particles.set(n_particles)
        self.batch_images.set(n_images)
        self.batch_closed_ts.set(closed_at)


def split_metric_name(key: str) -> tuple[str, str]:
    """``(metric, class)`` labels of a flat batch-metric name (families: :data:`qcloop.batch.METRIC_FAMILIES`).

    ``class_fraction.rod`` → (``class_fraction``, ``rod``); ``ecd_nm.rod.cv`` →
    (``ecd_nm.cv``, ``rod``); ``orientation_deg.rod.mean`` → (``orientation_deg.mean``, ``rod``);
    anything else (``ecd_nm.mean``, ``silhouette``, ``pca.silhouette``) → (key, ``""``).
    """
    parsed = parse_metric_name(key)
    if parsed is None or parsed[1] is None:
        return key, ""
    fam, cls, stat = parsed
    return fam.name(None, stat), cls
