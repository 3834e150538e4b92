"""The durable ledger: one SQLite database (WAL) in ``state_dir/ledger.sqlite3``.

Tables
------
images
    One row per (path, content hash): status ``pending`` → ``done`` | ``failed`` |
    ``quarantined``, batch, the published per-image result (JSON) and the particle table +
    embeddings (NumPy ``.npz``, no pickle) so a batch's metrics can be recomputed at close.
    ``in_progress`` is 1 while the worker analyses the image; a row still marked so at start-up
    was interrupted (crash, ``kill -9``, OOM) and its ``crashes`` counter goes up — an image that
    brings the daemon down ``watch.max_attempts`` times is quarantined instead of retried.
batches
    ``open`` / ``closed``, revision (a late image re-closes a batch with revision + 1), the
    published batch result.
outbox
    Messages waiting for the broker's acknowledgement (see :mod:`qcloop.daemon.outbox`).
state
    Small persistent key/value store (JSON strings) for the controller and the daemon itself.
inbox
    Inbound MQTT messages handled (topic, ``msg_id`` when the payload has one, outcome), written
    in the transaction that handled them, before the broker gets its PUBACK: a message the broker
    redelivers after a crash is recognised by its ``msg_id`` and not handled twice.

Paths are stored as text (:func:`qcloop.daemon.names.display`) and, when the name is not valid
UTF-8, also as bytes (``raw_path``) so the file can still be opened.

Only the worker thread uses a :class:`Ledger` (the connection refuses other threads); every
state change and the MQTT message announcing it are written in one transaction.
"""

from __future__ import annotations

import io
import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd

from qcloop.daemon.names import display, fs_path, raw_bytes
from qcloop.daemon.outbox import OUTBOX_SQL, OutMessage, insert_messages, migrate_outbox

LEDGER_FILE = "ledger.sqlite3"
STATUSES = ("pending", "done", "failed", "quarantined")
LEDGER_SCHEMA = 1

_SQL = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id              INTEGER PRIMARY KEY,
    path            TEXT    NOT NULL,
    content_hash    TEXT    NOT NULL,
    size            INTEGER NOT NULL,
    mtime_ns        INTEGER NOT NULL,
    status          TEXT    NOT NULL CHECK (status IN {STATUSES!r}),
    batch           TEXT,
    in_progress     INTEGER NOT NULL DEFAULT 0,
    crashes         INTEGER NOT NULL DEFAULT 0,
    reason          TEXT,
    result_json     TEXT,
    particles       BLOB,
    quarantine_path TEXT,
    created_at      REAL    NOT NULL,
    updated_at      REAL    NOT NULL,
    raw_path        BLOB,
    UNIQUE (path, content_hash)
);
CREATE INDEX IF NOT EXISTS images_by_path  ON images (path);
CREATE INDEX IF NOT EXISTS images_by_batch ON images (batch, status);
CREATE TABLE IF NOT EXISTS batches (
    batch         TEXT PRIMARY KEY,
    status        TEXT NOT NULL CHECK (status IN ('open', 'closed')),
    revision      INTEGER NOT NULL DEFAULT 0,
    opened_at     REAL NOT NULL,
    last_image_at REAL NOT NULL,
    closed_at     REAL,
    close_reason  TEXT,
    result_json   TEXT
);
CREATE TABLE IF NOT EXISTS state (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS inbox (
    id          INTEGER PRIMARY KEY,
    topic       TEXT NOT NULL,
    msg_key     TEXT UNIQUE,
    received_at REAL NOT NULL,
    outcome     TEXT NOT NULL
);
{OUTBOX_SQL}
"""


@dataclass(frozen=True)
class ImageRow:
    id: int
    path: str
    content_hash: str
    size: int
    mtime_ns: int
    status: str
    batch: str | None
    in_progress: bool
    crashes: int
    reason: str | None
    quarantine_path: str | None
    raw_path: bytes | None = None
    created_at: float = 0.0

    @property
    def fs_path(self) -> Path:
        """The path to open (from the stored bytes when the name is not valid UTF-8)."""
        return fs_path(self.path, self.raw_path)


@dataclass(frozen=True)
class BatchRow:
    batch: str
    status: str
    revision: int
    opened_at: float
    last_image_at: float
    closed_at: float | None
    close_reason: str | None


_IMAGE_COLS = ("id, path, content_hash, size, mtime_ns, status, batch, in_progress, crashes, "
               "reason, quarantine_path, raw_path, created_at")
_BATCH_COLS = "batch, status, revision, opened_at, last_image_at, closed_at, close_reason"


def _image(r: tuple | None) -> ImageRow | None:
    if r is None:
        return None
    return ImageRow(int(r[0]), r[1], r[2], int(r[3]), int(r[4]), r[5], r[6], bool(r[7]), int(r[8]),
                    r[9], r[10], None if r[11] is None else bytes(r[11]), float(r[12]))


def _batch(r: tuple | None) -> BatchRow | None:
    if r is None:
        return None
    return BatchRow(r[0], r[1], int(r[2]), float(r[3]), float(r[4]),
                    None if r[5] is None else float(r[5]), r[6])


# ----------------------------------------------------------------------------- particle blobs
def pack_particles(particles: pd.DataFrame, embeddings: np.ndarray | None) -> bytes:
    """Particle table (+ embeddings) as a compressed ``.npz`` (no object arrays, no pickle).

    Parameters
    ----------
    particles : DataFrame, n rows
        Numeric/bool columns are kept as they are; anything else is stored as unicode strings.
    embeddings : ndarray, shape (n, d), optional
    """
    arrays: dict[str, np.ndarray] = {}
    columns = [str(c) for c in particles.columns]
    for i, name in enumerate(columns):
        col = particles.iloc[:, i]
        values = col.to_numpy()
        if values.dtype.kind not in "biuf":
            values = np.asarray(col.astype(str).to_numpy(), dtype=str)
        arrays[f"c{i}"] = values
    arrays["__columns__"] = np.asarray(columns, dtype=str)
    if embeddings is not None:
        arrays["__embeddings__"] = np.asarray(embeddings)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def unpack_particles(blob: bytes) -> tuple[pd.DataFrame, np.ndarray | None]:
    """Inverse of :func:`pack_particles` (``allow_pickle=False``)."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        columns = [str(c) for c in z["__columns__"]]
        data = {name: z[f"c{i}"] for i, name in enumerate(columns)}
        emb = z["__embeddings__"] if "__embeddings__" in z.files else None
    return pd.DataFrame(data, columns=columns), emb


# ----------------------------------------------------------------------------- the ledger
class Ledger:
    """The worker's handle on the ledger database.

    Parameters
    ----------
    state_dir : path
        Created when missing; the database is ``state_dir/ledger.sqlite3``.
    outbox : bool
        Store MQTT messages (False when MQTT is disabled: :meth:`add_message` drops them).
    """

    def __init__(self, state_dir: str | Path, *, outbox: bool = True):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.state_dir / LEDGER_FILE
        self.outbox_enabled = outbox
        self._owner = threading.get_ident()
        self._depth = 0
        self.conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA busy_timeout=30000")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.executescript(_SQL)
        self._migrate()
        row = self.conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self.conn.execute("INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(LEDGER_SCHEMA),))
        elif int(row[0]) != LEDGER_SCHEMA:
            from qcloop.errors import QcloopError

            raise QcloopError(f"{self.path}: ledger schema {row[0]} is not the supported {LEDGER_SCHEMA}")

    def _migrate(self) -> None:
        """Columns added after the first release, for ledgers written by an older qcloop."""
        have = {r[1] for r in self.conn.execute("PRAGMA table_info(images)")}
        if "raw_path" not in have:
            self.conn.execute("ALTER TABLE images ADD COLUMN raw_path BLOB")
        migrate_outbox(self.conn)

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------------ transactions
    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``; nested use becomes a SAVEPOINT.

        Any exception (also KeyboardInterrupt/SystemExit) rolls the block back and propagates.
        """
        if self._depth == 0:
            self.conn.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield self.conn
            except BaseException:
                self._depth -= 1
                self.conn.execute("ROLLBACK")
                raise
            self._depth -= 1
            self.conn.execute("COMMIT")
        else:
            name = f"sp{self._depth}"
            self.conn.execute(f"SAVEPOINT {name}")
            self._depth += 1
            try:
                yield self.conn
            except BaseException:
                self._depth -= 1
                self.conn.execute(f"ROLLBACK TO {name}")
                self.conn.execute(f"RELEASE {name}")
                raise
            self._depth -= 1
            self.conn.execute(f"RELEASE {name}")

    @property
    def in_transaction(self) -> bool:
        return self._depth > 0

    def add_message(self, *messages: OutMessage) -> list[str]:
        """Queue messages in the outbox, in the current transaction (or a new one)."""
        if not self.outbox_enabled or not messages:
            return []
        with self.transaction() as conn:
            return insert_messages(conn, messages)

    # ------------------------------------------------------------------ key/value state
    def get_state(self, key: str) -> str | None:
        """The JSON string stored under ``key``, or None."""
        row = self.conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_state(self, key: str, value: str) -> None:
        """Store a JSON string under ``key`` (inside the current transaction, if any).

        Raises
        ------
        ValueError
            When ``value`` is not valid JSON text.
        """
        if not isinstance(value, str):
            raise ValueError("state values are JSON strings (use json.dumps)")
        json.loads(value)  # raises ValueError for anything that is not JSON
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO state (key, value, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (key, value, time.time()))

    # ------------------------------------------------------------------ images
    def find_image(self, path: str | Path, content_hash: str) -> ImageRow | None:
        return _image(self.conn.execute(
            f"SELECT {_IMAGE_COLS} FROM images WHERE path = ? AND content_hash = ?",
            (display(path), content_hash)).fetchone())

    def find_by_stat(self, path: str | Path, size: int, mtime_ns: int) -> ImageRow | None:
        """A finished row for this path with the same size and mtime (skips re-hashing)."""
        return _image(self.conn.execute(
            f"SELECT {_IMAGE_COLS} FROM images WHERE path = ? AND size = ? AND mtime_ns = ? "
            "AND status IN ('done', 'quarantined') ORDER BY id DESC LIMIT 1",
            (display(path), size, mtime_ns)).fetchone())

    def get_image(self, image_id: int) -> ImageRow | None:
        return _image(self.conn.execute(
            f"SELECT {_IMAGE_COLS} FROM images WHERE id = ?", (image_id,)).fetchone())

    def begin_image(self, path: str | Path, content_hash: str, size: int, mtime_ns: int,
                    batch: str | None) -> ImageRow:
        """Insert (or re-open) the image's row as ``pending`` and mark it in progress (commits).

        ``path`` may be a name that is not valid UTF-8: its text form is the key, its bytes are
        kept in ``raw_path``."""
        now = time.time()
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO images (path, content_hash, size, mtime_ns, status, batch, in_progress, "
                "created_at, updated_at, raw_path) VALUES (?, ?, ?, ?, 'pending', ?, 1, ?, ?, ?) "
                "ON CONFLICT(path, content_hash) DO UPDATE SET status = 'pending', in_progress = 1, "
                "size = excluded.size, mtime_ns = excluded.mtime_ns, batch = excluded.batch, "
                "updated_at = excluded.updated_at",
                (display(path), content_hash, size, mtime_ns, batch, now, now, raw_bytes(path)))
        row = self.find_image(path, content_hash)
        if row is None:  # pragma: no cover - just inserted in the same connection
            raise RuntimeError(f"ledger lost the row of {path}")
        return row

    def release_image(self, image_id: int) -> None:
        """Leave the image pending, not in progress (decode retry, or abandoned on shutdown)."""
        with self.transaction() as conn:
            conn.execute("UPDATE images SET in_progress = 0, updated_at = ? WHERE id = ?",
                         (time.time(), image_id))

    def finish_image(self, image_id: int, status: str, *, batch: str | None = None,
                     reason: str | None = None, result: dict[str, Any] | None = None,
                     particles: bytes | None = None, quarantine_path: str | None = None,
                     messages: Iterable[OutMessage] = ()) -> None:
        """Record the image's outcome and queue its messages, atomically."""
        if status not in ("done", "failed", "quarantined"):
            raise ValueError(f"bad final status {status!r}")
        with self.transaction() as conn:
            conn.execute(
                "UPDATE images SET status = ?, in_progress = 0, batch = COALESCE(?, batch), reason = ?, "
                "result_json = ?, particles = ?, quarantine_path = ?, updated_at = ? WHERE id = ?",
                (status, batch, reason, None if result is None else json.dumps(result),
                 particles, quarantine_path, time.time(), image_id))
            self.add_message(*messages)

    def recover_interrupted(self, *, clean_stop: bool) -> list[ImageRow]:
        """At start-up: rows left ``in_progress`` were interrupted; release and return them.

        The poison-pill rule: the interruption counts against an image (``crashes`` + 1) only
        when it alone was in analysis and the previous process was not stopping cleanly
        (``clean_stop``: it had received SIGTERM/SIGINT; a machine shutdown or a kill after
        ``TimeoutStopSec`` is not the image's fault).
        """
        with self.transaction() as conn:
            rows = [r for r in (_image(x) for x in conn.execute(
                f"SELECT {_IMAGE_COLS} FROM images WHERE in_progress = 1")) if r is not None]
            blame = len(rows) == 1 and not clean_stop
            conn.execute("UPDATE images SET in_progress = 0, crashes = crashes + ? WHERE in_progress = 1",
                         (int(blame),))
        return rows

    def pending_images(self) -> list[ImageRow]:
        return [r for r in (_image(x) for x in self.conn.execute(
            f"SELECT {_IMAGE_COLS} FROM images WHERE status = 'pending' ORDER BY id")) if r]

    def status_counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for status, n in self.conn.execute("SELECT status, COUNT(*) FROM images GROUP BY status"):
            out[status] = int(n)
        return out

    # ------------------------------------------------------------------ batches
    def get_batch(self, batch: str) -> BatchRow | None:
        return _batch(self.conn.execute(
            f"SELECT {_BATCH_COLS} FROM batches WHERE batch = ?", (batch,)).fetchone())

    def open_batches(self) -> list[BatchRow]:
        return [b for b in (_batch(r) for r in self.conn.execute(
            f"SELECT {_BATCH_COLS} FROM batches WHERE status = 'open' ORDER BY opened_at")) if b]

    def touch_batch(self, batch: str, t: float) -> BatchRow:
        """Create the batch (open) or move its last-image time; a closed batch stays closed."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO batches (batch, status, revision, opened_at, last_image_at) "
                "VALUES (?, 'open', 0, ?, ?) ON CONFLICT(batch) DO UPDATE SET "
                "last_image_at = MAX(last_image_at, excluded.last_image_at)", (batch, t, t))
        row = self.get_batch(batch)
        if row is None:  # pragma: no cover - just inserted in the same connection
            raise RuntimeError(f"ledger lost batch {batch}")
        return row

    def batch_particles(self, batch: str) -> tuple[list[pd.DataFrame], list[np.ndarray | None], list[int]]:
        """Particle tables, embeddings and image ids of every ``done`` image of the batch."""
        tables, embs, ids = [], [], []
        for image_id, blob in self.conn.execute(
                "SELECT id, particles FROM images WHERE batch = ? AND status = 'done' ORDER BY id",
                (batch,)):
            if blob is None:
                continue
            df, emb = unpack_particles(bytes(blob))
            tables.append(df)
            embs.append(emb)
            ids.append(int(image_id))
        return tables, embs, ids

    def batch_counts(self, batch: str) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for status, n in self.conn.execute(
                "SELECT status, COUNT(*) FROM images WHERE batch = ? GROUP BY status", (batch,)):
            out[status] = int(n)
        return out

    def close_batch(self, batch: str, revision: int, reason: str, result: dict[str, Any],
                    t: float) -> None:
        """Mark the batch closed at ``revision`` with its result (in the current transaction,
        if any)."""
        with self.transaction() as conn:
            conn.execute(
                "UPDATE batches SET status = 'closed', revision = ?, closed_at = ?, "
                "close_reason = ?, result_json = ? WHERE batch = ?",
                (revision, t, reason, json.dumps(result), batch))

    def batch_result(self, batch: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT result_json FROM batches WHERE batch = ?", (batch,)).fetchone()
        return None if row is None or row[0] is None else json.loads(row[0])

    def outbox_count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def latest_closed_batch(self) -> dict[str, Any] | None:
        """The published result of the batch closed last (to restore the last-batch gauges)."""
        row = self.conn.execute("SELECT result_json FROM batches WHERE status = 'closed' AND "
                                "result_json IS NOT NULL ORDER BY closed_at DESC LIMIT 1").fetchone()
        return None if row is None else json.loads(row[0])

    def last_image_time(self) -> float | None:
        row = self.conn.execute("SELECT MAX(created_at) FROM images").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    # ------------------------------------------------------------------ inbox
    def inbox_seen(self, msg_key: str) -> bool:
        return self.conn.execute("SELECT 1 FROM inbox WHERE msg_key = ?", (msg_key,)).fetchone() is not None

    def inbox_add(self, topic: str, msg_key: str | None, outcome: str, t: float) -> None:
        """Record a handled inbound message (in the current transaction)."""
        with self.transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO inbox (topic, msg_key, received_at, outcome) "
                         "VALUES (?, ?, ?, ?)", (topic, msg_key, t, outcome))

    # ------------------------------------------------------------------ retention
    def prune(self, *, particles_before: float, rows_before: float, inbox_before: float,
              inbox_max_rows: int, limit: int, file_exists) -> dict[str, int]:
        """One bounded retention pass (see :class:`qcloop.config.RetentionConfig`).

        Drops the particle tables of images in batches closed before ``particles_before``; deletes
        finished image rows created before ``rows_before`` whose file is gone
        (``file_exists(row) -> bool``); trims the inbox by age and count. At most ``limit`` rows
        of each kind per call. Returns what was done, by kind.
        """
        done = {"particles": 0, "rows": 0, "inbox": 0}
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE images SET particles = NULL WHERE id IN (SELECT i.id FROM images i JOIN batches b "
                "ON i.batch = b.batch WHERE i.particles IS NOT NULL AND b.status = 'closed' AND "
                "b.closed_at < ? LIMIT ?)", (particles_before, limit))
            done["particles"] = cur.rowcount
            old = [_image(r) for r in conn.execute(
                f"SELECT {_IMAGE_COLS} FROM images WHERE created_at < ? AND status != 'pending' "
                "ORDER BY id LIMIT ?", (rows_before, limit))]
            gone = [(r.id,) for r in old if r is not None and not file_exists(r)]
            conn.executemany("DELETE FROM images WHERE id = ?", gone)
            done["rows"] = len(gone)
            cur = conn.execute("DELETE FROM inbox WHERE id IN (SELECT id FROM inbox WHERE received_at < ? "
                               "OR id <= (SELECT MAX(id) FROM inbox) - ? ORDER BY id LIMIT ?)",
                               (inbox_before, inbox_max_rows, limit))
            done["inbox"] = cur.rowcount
        return done
