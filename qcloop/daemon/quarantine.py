"""The quarantine folder (``state_dir/quarantine``): bad files and why they are there.

For image row ``id`` the daemon keeps

* ``<id>.reason.json`` -- named by the id alone, so no file name can make it too long:
  ``image_id``, ``path`` (text form, :func:`qcloop.daemon.names.display`), ``reason``,
  ``content_sha256``, ``batch``, ``time``, ``action``, ``file`` (the quarantined copy's name);
* ``<id>_<name>`` -- the file itself, its name shortened to fit 255 bytes.

The file is **moved** there, or **copied** when the watched folder is read-only (the original then
stays and the ledger keeps it from being looked at again), or only **recorded** when it cannot even
be read. :meth:`Quarantine.prune` applies ``retention.quarantine_days`` / ``quarantine_max_mb``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from qcloop.daemon.names import fit_name
from qcloop.daemon.outbox import iso_time

log = logging.getLogger(__name__)

REASON_SUFFIX = ".reason.json"


class Quarantine:
    """Files of the quarantine folder (created on first use)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def reason_file(self, image_id: int) -> Path:
        return self.folder / f"{image_id:06d}{REASON_SUFFIX}"

    def target(self, image_id: int, name: str) -> Path:
        return self.folder / fit_name(f"{image_id:06d}_", name)

    def put(self, image_id: int, src: Path, info: dict[str, Any]) -> tuple[str, Path | None]:
        """Move (or copy) ``src`` in and write its reason file; returns ``(action, path or None)``.

        ``info`` must hold ``path`` (text) and ``reason``; never raises for file-system trouble
        (the worst outcome is action ``recorded`` with a logged warning).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        dst = self.target(image_id, Path(info["path"]).name)
        info = {**info, "image_id": image_id, "time": iso_time(), "file": dst.name, "action": "pending"}
        self._write_reason(image_id, info)  # first, so a crash right after the move can be recovered
        action = _move_or_copy(src, dst)
        info["action"] = action
        self._write_reason(image_id, info)
        return action, (dst if action != "recorded" else None)

    def find(self, image_id: int) -> tuple[Path, str] | None:
        """``(quarantined file, reason)`` when the file was moved in before a crash, else None."""
        try:
            info = json.loads(self.reason_file(image_id).read_text(encoding="utf-8"))
            path = self.folder / str(info["file"])
            return (path, str(info["reason"])) if path.exists() else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_reason(self, image_id: int, info: dict[str, Any]) -> None:
        tmp = self.reason_file(image_id).with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(info, indent=2), encoding="utf-8")
            os.replace(tmp, self.reason_file(image_id))
        except OSError as exc:
            log.warning("cannot write the quarantine reason of image %d: %s", image_id, exc)

    def prune(self, *, max_age_s: float, max_bytes: float, now: float | None = None) -> int:
        """Delete quarantined files (with their reason files) older than ``max_age_s``, then the
        oldest until the folder holds at most ``max_bytes``. Returns the number of files deleted."""
        now = time.time() if now is None else now
        entries = []
        try:
            for p in self.folder.iterdir():
                try:
                    st = p.stat()
                except OSError:
                    continue
                entries.append((st.st_mtime, st.st_size, p))
        except OSError:
            return 0
        entries.sort()
        total = sum(e[1] for e in entries)
        deleted = 0
        for mtime, size, p in entries:
            if now - mtime < max_age_s and total <= max_bytes:
                break
            try:
                p.unlink()
                deleted += 1
                total -= size
            except OSError as exc:
                log.warning("retention: cannot delete %s: %s", p, exc)
        return deleted


def _move_or_copy(src: Path, dst: Path) -> str:
    try:
        os.replace(src, dst)
        return "moved"
    except OSError as exc:
        try:
            shutil.copy2(src, dst)
        except OSError as exc2:
            log.warning("cannot copy %s to quarantine: %s", src, exc2)
            return "recorded"
        if exc.errno == errno.EXDEV:  # another file system: copy + delete is a move
            try:
                os.unlink(src)
                return "moved"
            except OSError:
                pass
        return "copied"
