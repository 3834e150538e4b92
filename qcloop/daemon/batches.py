"""Batch keys and batch results.

Batch key (``batch.key``)
-------------------------
``regex:<pattern>``
    ``re.search`` on the file name; the named group ``batch`` is the key.
``subfolder``
    The first folder below ``watch.directory`` (``export/B42/img_001.tif`` → ``B42``).
``message``
    The batch named by the latest ``{prefix}/reactor/batch`` start message (``{"batch": "B42"}``
    or ``{"batch": "B42", "event": "start"}``) *at the time the file was first seen* (files found
    by the start-up scan: at their mtime), so files exported just before a batch change still
    count for the old batch. ``"event": "end"`` never starts or re-opens a batch.

Files without a key go to ``batch.default_batch``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from qcloop.config import BatchConfig, TargetSpec

log = logging.getLogger(__name__)

TIMELINE_STATE_KEY = "daemon.message_batches"
TIMELINE_KEEP = 64


class MessageBatches:
    """Timeline of reactor batch-start messages: ``[(unix time, batch), ...]``, oldest first."""

    def __init__(self, entries: list[tuple[float, str]] | None = None):
        self.entries: list[tuple[float, str]] = sorted(entries or [])

    @classmethod
    def from_json(cls, text: str | None) -> "MessageBatches":
        if not text:
            return cls()
        try:
            return cls([(float(t), str(b)) for t, b in json.loads(text)])
        except (ValueError, TypeError):
            log.warning("unreadable batch timeline in the ledger state; starting a new one")
            return cls()

    def to_json(self) -> str:
        return json.dumps([[t, b] for t, b in self.entries[-TIMELINE_KEEP:]])

    @property
    def current(self) -> str | None:
        return self.entries[-1][1] if self.entries else None

    def start(self, batch: str, t: float) -> bool:
        """Record that ``batch`` started at ``t``; False when it is already the current one."""
        if self.current == batch:
            return False
        self.entries.append((t, batch))
        self.entries.sort()
        return True

    def end(self, batch: str, t: float) -> bool:
        """A batch ended (``event: end``): never a start, so always False. Images seen after it
        still belong to it until the next start (a batch's SEM images are often taken after
        its synthesis ended); an end of any other batch changes nothing either."""
        log.info("reactor: batch %s ended%s", batch, "" if batch == self.current else
                 f" (the current batch is {self.current!r})")
        return False

    def batch_at(self, t: float) -> str | None:
        found = None
        for start, batch in self.entries:
            if start <= t:
                found = batch
            else:
                break
        return found


class BatchKeyer:
    """The batch an image belongs to (see the module docstring)."""

    def __init__(self, cfg: BatchConfig, root: Path, timeline: MessageBatches | None = None):
        self.cfg = cfg
        self.root = Path(root).resolve()
        self.timeline = timeline or MessageBatches()
        if cfg.key.startswith("regex:"):
            self.mode = "regex"
            self.regex: re.Pattern[str] | None = re.compile(cfg.key[len("regex:"):])
        else:
            self.mode = cfg.key
            self.regex = None

    def key_for(self, path: Path, *, seen_at: float) -> str:
        if self.regex is not None:
            m = self.regex.search(Path(path).name)
            key = m.group("batch") if m else None
        elif self.mode == "subfolder":
            try:
                rel = Path(path).resolve().relative_to(self.root)
            except ValueError:
                rel = Path(Path(path).name)
            key = rel.parts[0] if len(rel.parts) > 1 else None
        else:
            key = self.timeline.batch_at(seen_at)
        return key if key else self.cfg.default_batch


@dataclass(frozen=True)
class BatchOutcome:
    """What closing a batch computed.

    Attributes
    ----------
    metrics : qcloop.batch.BatchMetrics or None
        None when the metrics could not be computed (``error`` says why).
    flat : dict of str to float
        ``metrics.flat()`` (empty when ``metrics`` is None).
    uncertainty : dict of str to float
        ``metrics.uncertainty()``.
    verdict : qcloop.targets.Verdict or None
    n_particles : int
        Interior particles (the denominator of every fraction).
    sufficient : bool
        ``n_particles >= batch.min_particles``.
    error : str or None
    """

    metrics: Any
    flat: dict[str, float]
    uncertainty: dict[str, float]
    verdict: Any
    n_particles: int
    sufficient: bool
    error: str | None = None

    @property
    def verdict_label(self) -> str:
        if self.error is not None or self.verdict is None:
            return "error"
        if not self.sufficient:
            return "insufficient"
        return "pass" if self.verdict.passed else "fail"


def compute_batch(tables: list[pd.DataFrame], embeddings: list[np.ndarray | None], *,
                  n_images: int, targets: Mapping[str, TargetSpec],
                  min_particles: int) -> BatchOutcome:
    """Batch metrics and verdict from the stored per-image particle tables.

    Parameters
    ----------
    tables : list of DataFrame
        One per analysed image (rows = particles).
    embeddings : list of ndarray (n_i, d) or None
        Aligned with ``tables``; when any is missing or the widths differ, the batch is scored
        without embeddings (separation metrics NaN).
    n_images : int
    targets : mapping of metric name to TargetSpec
    min_particles : int
    """
    from qcloop.batch import batch_metrics
    from qcloop.targets import evaluate_targets

    particles = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    emb: np.ndarray | None = None
    if tables and all(e is not None for e in embeddings):
        widths = {e.shape[1] for e in embeddings if e is not None and e.ndim == 2}
        if len(widths) <= 1 and all(e is not None and e.ndim == 2 for e in embeddings):
            emb = (np.concatenate(embeddings, axis=0) if widths
                   else np.zeros((len(particles), 0)))
        else:
            log.warning("embeddings of different widths in one batch: scoring without them")
    if emb is not None and emb.shape[0] != len(particles):
        emb = None
    try:
        metrics = batch_metrics(particles, emb, n_images=n_images)
        flat = metrics.flat()
        unc = metrics.uncertainty()
        verdict = evaluate_targets(flat, targets, unc)
    except Exception as exc:  # noqa: BLE001 - a batch must close even if its metrics fail
        log.exception("batch metrics failed")
        return BatchOutcome(None, {}, {}, None, 0, False, error=f"{type(exc).__name__}: {exc}")
    n = int(metrics.n_particles)
    return BatchOutcome(metrics, flat, unc, verdict, n, n >= min_particles)
