"""The archive's memory: one Parquet part file per analysed image, written once, atomically.

Layout of ``DIR/manifest/``::

    lock                          held (flock) by the running ``qcloop archive``: one writer per DIR
    files.sqlite                  stat cache: image path, size + mtime (image and sidecars) -> content hash
    <fingerprint[:16]>/<h[:2]>/<h>.parquet
                                  the analysis of the image with content hash h under that
                                  configuration + model fingerprint (:class:`~qcloop.cluster.spec.WorkSpec`)

A part holds the image's particle rows (every particles.csv column), its embeddings (column
``embedding``, fixed-size lists of float64) and, in the Parquet key-value metadata under
``qcloop``, the image's name, ``images.csv`` row and stage seconds -- or, for a file the
pipeline refused (InputImageError), no rows and the reason. A part is written to a temporary
name, fsync'ed and renamed into place, so it is either complete or absent: killing the client or
a worker never leaves half an image, and writing the same part twice (a task re-run after a
worker died) gives the same file. ``(content hash, fingerprint)`` is the key: a re-run skips
every image whose part exists, and a changed file or configuration has another key.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from qcloop.cluster.spec import content_sha256, sidecar_files
from qcloop.errors import QcloopError

PART_SCHEMA = "qcloop.archive-part/1"
META_KEY = b"qcloop"
EMBEDDING_COLUMN = "embedding"
#: hex digits of the fingerprint in the folder name (the full one is in every part's metadata)
FINGERPRINT_DIGITS = 16
#: threads hashing files (hashlib releases the GIL; the files are read from disk or a share)
HASH_THREADS = 4


class Manifest:
    """Part files of one fingerprint under ``folder`` (``DIR/manifest``)."""

    def __init__(self, folder: Path, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.parts = self.folder / fingerprint[:FINGERPRINT_DIGITS]

    def path(self, sha: str) -> Path:
        return self.parts / sha[:2] / f"{sha}.parquet"

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def write(self, sha: str, outcome: dict[str, Any]) -> None:
        """Store one result of :func:`qcloop.commands.batch.analyse_for_batch` (atomically)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        meta: dict[str, Any] = {"schema": PART_SCHEMA, "sha256": sha, "fingerprint": self.fingerprint}
        if "error" in outcome:
            table = pa.table({})
            meta["error"] = outcome["error"]
        else:
            table = pa.Table.from_pandas(outcome["particles"], preserve_index=False)
            emb = outcome["embeddings"]
            if emb is not None:
                emb = np.asarray(emb, dtype=np.float64).reshape(len(outcome["particles"]), -1)
                values = pa.array(emb.ravel(), type=pa.float64())
                table = table.append_column(EMBEDDING_COLUMN, pa.FixedSizeListArray.from_arrays(values, emb.shape[1]))
            meta.update(name=outcome["name"], summary=outcome.get("summary"), seconds=outcome["seconds"],
                        embedding_dim=None if emb is None else int(emb.shape[1]))
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               META_KEY: json.dumps(meta, default=_plain).encode()})
        final = self.path(sha)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)

    def read(self, sha: str) -> dict[str, Any] | None:
        """The stored outcome (as written, without ``path``), or None when there is no part."""
        import pyarrow.parquet as pq

        p = self.path(sha)
        if not p.is_file():
            return None
        table = pq.read_table(p)
        meta = json.loads(table.schema.metadata[META_KEY])
        if "error" in meta:
            return {"error": meta["error"]}
        emb = None
        if meta.get("embedding_dim") is not None:
            col = table.column(EMBEDDING_COLUMN).combine_chunks()
            emb = np.asarray(col.flatten(), dtype=np.float64).reshape(len(table), meta["embedding_dim"])
            table = table.drop_columns([EMBEDDING_COLUMN])
        particles = table.to_pandas()
        return {"name": meta["name"], "particles": particles, "embeddings": emb, "overlay": None,
                "seconds": meta["seconds"], "summary": meta.get("summary")}

    def remove_temporaries(self) -> int:
        """Delete the temporary files a killed run left behind; their count."""
        n = 0
        for tmp in self.folder.glob("*/*/.*.tmp"):
            tmp.unlink(missing_ok=True)
            n += 1
        return n


@contextmanager
def writer_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder/lock`` for the run: a second ``qcloop archive`` on the same DIR fails at once."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lock", "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise QcloopError(f"another qcloop archive is writing {folder.parent} "
                              f"(pid {f.read().strip() or '?'}); wait for it or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class HashCache:
    """Content hashes of image files, re-read only when the file's size or mtime changed."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(str(path))
        self.db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, stat TEXT NOT NULL, "
                        "sha256 TEXT NOT NULL)")

    def hashes(self, paths: Sequence[Path], *, rehash: bool = False) -> list[str]:
        """The :func:`~qcloop.cluster.spec.content_sha256` of every path, in order."""
        from tqdm import tqdm

        keys = [str(Path(p).resolve()) for p in paths]
        stats = [_stat_key(Path(p)) for p in paths]
        known = dict(((k, s), h) for k, s, h in self.db.execute("SELECT path, stat, sha256 FROM files"))
        out = [None if rehash else known.get((k, s)) for k, s in zip(keys, stats)]
        todo = [i for i, h in enumerate(out) if h is None]
        with ThreadPoolExecutor(HASH_THREADS) as pool:
            found = pool.map(_hash_or_none, [paths[i] for i in todo])
            for i, h in zip(todo, tqdm(found, total=len(todo), desc="hash", unit="img", disable=None)):
                out[i] = h
        rows = [(keys[i], stats[i], out[i]) for i in todo if out[i] != UNREADABLE]
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO files (path, stat, sha256) VALUES (?, ?, ?)", rows)
        return [str(h) for h in out]

    def close(self) -> None:
        self.db.close()


#: stands in for the hash of a file that cannot be read; such a file is analysed (and fails) every run
UNREADABLE = "unreadable"


def _hash_or_none(path: Path) -> str:
    try:
        return content_sha256(path)
    except OSError:
        return UNREADABLE


def _stat_key(path: Path) -> str:
    def one(p: Path) -> str:
        try:
            st = p.stat()
        except OSError:
            return f"{p.name}:missing"
        return f"{p.name}:{st.st_size}:{st.st_mtime_ns}"

    return ";".join(one(p) for p in [path, *sidecar_files(path)])


def _plain(v: Any) -> Any:
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return v.item()
    if isinstance(v, pd.Timestamp):
        return v.isoformat()
    return str(v)
