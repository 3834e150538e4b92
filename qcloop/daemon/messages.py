"""Every message qcloop publishes is built here, by the name of its schema.

One builder per outbound contract (:mod:`qcloop.daemon.contracts`); each returns an
:class:`~qcloop.daemon.outbox.OutMessage` whose topic, QoS and retain flag come from the
schema's ``x-topic`` and whose ``schema`` names it, so a test can validate whatever the daemon
queued. Builders are plain functions of records (no ledger, no clock unless given).
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any, Mapping

import numpy as np
import pandas as pd

from qcloop import __version__
from qcloop.daemon.contracts import contract
from qcloop.daemon.outbox import SCHEMA_VERSION, OutMessage, iso_time

ERROR_KINDS = ("quarantined", "analysis-failed", "hook-failed", "command-rejected",
               "batch-metrics-failed", "watch-problem")


def out(prefix: str, schema: str, payload: Mapping[str, Any], **props: Any) -> OutMessage:
    """An OutMessage on the contract's topic under ``prefix`` with its QoS and retain flag."""
    c = contract(schema)
    if c.direction != "out":
        raise ValueError(f"{schema} is an inbound contract")
    return OutMessage(f"{prefix}/{c.topic}", payload, qos=c.qos, retain=c.retained, schema=schema, **props)


# ----------------------------------------------------------------------------- status
def status_payload(line_id: str, config_hash: str, state: str, cause: str, *,
                   at: float | None = None, will: bool = False) -> dict[str, Any]:
    """``status.json`` (``time`` is null in the Last Will: registered at connect, sent at death)."""
    return {"schema_version": SCHEMA_VERSION, "msg_id": uuid.uuid4().hex, "state": state,
            "cause": cause, "line_id": line_id, "version": __version__, "config_hash": config_hash,
            "time": None if will else iso_time(at)}


# ----------------------------------------------------------------------------- errors
def error_event(prefix: str, line_id: str, kind: str, message: str, **fields: Any) -> OutMessage:
    """``error_event.json``; ``fields`` with value None are left out."""
    if kind not in ERROR_KINDS:
        raise ValueError(f"unknown error kind {kind!r}")
    payload = {"schema_version": SCHEMA_VERSION, "msg_id": uuid.uuid4().hex, "line_id": line_id,
               "time": iso_time(), "kind": kind, "message": message}
    payload.update({k: v for k, v in fields.items() if v is not None})
    return out(prefix, "error_event", payload)


# ----------------------------------------------------------------------------- images
def image_msg_id(path: str, digest: str) -> str:
    """Stable message id of an image result: the same file always gets the same id."""
    return "img-" + hashlib.sha256(f"{path}\0{digest}".encode()).hexdigest()[:24]


def class_counts(particles: pd.DataFrame) -> dict[str, int]:
    """Particles per class (all particles, border ones included)."""
    if len(particles) == 0:
        return {}
    if "class" not in particles.columns:
        return {"particle": int(len(particles))}
    return {str(k): int(v) for k, v in particles["class"].astype(str).value_counts().items()}


def size_stats(particles: pd.DataFrame) -> dict[str, Any]:
    """ECD statistics over the particles not cut by the border (nm when known, and px)."""
    p = particles
    if "touches_border" in p.columns and len(p):
        p = p[~p["touches_border"].astype(bool)]
    out_: dict[str, Any] = {"n": int(len(p))}
    for unit in ("nm", "px"):
        col = f"ecd_{unit}"
        if col not in p.columns:
            continue
        x = pd.to_numeric(p[col], errors="coerce").to_numpy(dtype=float)
        x = x[np.isfinite(x)]
        out_[col] = None if x.size == 0 else {
            "mean": float(x.mean()), "sd": float(x.std(ddof=1)) if x.size > 1 else None,
            "d10": float(np.percentile(x, 10)), "d50": float(np.percentile(x, 50)),
            "d90": float(np.percentile(x, 90))}
    return out_


def image_result(prefix: str, line_id: str, *, image_id: int, path: str, name: str, digest: str,
                 batch: str, result: Any, timing: Mapping[str, Any]) -> OutMessage:
    """``image_result.json`` for one analysed image (``result``: an ImageResult)."""
    parts = result.particles
    payload = {
        "schema_version": SCHEMA_VERSION, "msg_id": image_msg_id(path, digest), "line_id": line_id,
        "image_id": image_id, "path": path, "name": name, "content_sha256": digest, "batch": batch,
        "width_px": result.image.width_px, "height_px": result.image.height_px,
        "analysed_height_px": result.image.analysed_height_px,
        "pixel_size_nm": result.image.pixel_size.nm,
        "pixel_size_source": result.image.pixel_size.source,
        "n_particles": int(len(parts)),
        "n_border": int(parts["touches_border"].sum()) if "touches_border" in parts.columns else 0,
        "class_counts": class_counts(parts), "size": size_stats(parts), "timing": dict(timing),
    }
    return out(prefix, "image_result", payload)


# ----------------------------------------------------------------------------- batches
def batch_msg_id(batch: str, revision: int) -> str:
    return f"batch-{hashlib.sha256(batch.encode()).hexdigest()[:16]}-r{revision}"


def batch_result(prefix: str, line_id: str, batch: str, revision: int, reason: str, opened_at: float,
                 closed_at: float, counts: Mapping[str, int], outcome: Any) -> OutMessage:
    """``batch_result.json`` (``outcome``: a :class:`qcloop.daemon.batches.BatchOutcome`)."""
    payload = {
        "schema_version": SCHEMA_VERSION, "msg_id": batch_msg_id(batch, revision), "line_id": line_id,
        "batch": batch, "revision": revision, "close_reason": reason,
        "opened_at": iso_time(opened_at), "closed_at": iso_time(closed_at),
        "n_images": int(counts.get("done", 0)), "n_failed": int(counts.get("failed", 0)),
        "n_quarantined": int(counts.get("quarantined", 0)), "n_particles": outcome.n_particles,
        "sufficient": outcome.sufficient, "verdict": outcome.verdict_label,
        "metrics": None if outcome.metrics is None else outcome.metrics.to_dict(),
        "flat": outcome.flat, "uncertainty": outcome.uncertainty,
        "checks": None if outcome.verdict is None else outcome.verdict.to_dict(),
        "error": outcome.error,
    }
    return out(prefix, "batch_result", payload)


# ----------------------------------------------------------------------------- control
def suggestion(prefix: str, sugg: Any) -> OutMessage:
    """``suggestion.json`` with MQTT v5 message expiry = its TTL, response topic = the ack topic
    and correlation data = its ``msg_id`` (``sugg``: a :class:`qcloop.control.suggestions.Suggestion`).
    With ``mqtt.protocol: "3.1.1"`` the link sends none of these properties (the payload's
    ``expires_at`` and ``msg_id`` say the same; the outbox still drops it once expired)."""
    ack_topic = f"{prefix}/{contract('suggestion_ack').topic}"
    return out(prefix, "suggestion", sugg.message(), expires_at=float(sugg.expires_at),
               response_topic=ack_topic, correlation_data=str(sugg.msg_id).encode())


def control_decision(prefix: str, line_id: str, decision: Any, *, verdict_passed: bool,
                     n_particles: int) -> OutMessage:
    """``control_decision.json`` (``decision``: a :class:`qcloop.control.controller.Decision`)."""
    body = decision.to_dict()
    body["suggestion_msg_id"] = body.pop("msg_id")
    body.update(line_id=line_id, verdict_passed=bool(verdict_passed), n_particles=int(n_particles))
    return out(prefix, "control_decision", body)
