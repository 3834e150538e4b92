"""File names as the daemon stores and shows them, whatever bytes the share hands over.

Linux file names are bytes. Python gives names that are not valid UTF-8 (common on SMB shares
written by Windows tools in a legacy code page: ``G_bad\\xff\\xfe.tif``) as ``str`` with lone
surrogates (``surrogateescape``), which SQLite, JSON and UTF-8 logs refuse. So every path has

* its **bytes** (``os.fsencode``): lossless, stored in the ledger (``images.raw_path``) when they are
  not valid UTF-8, and used for every file-system call;
* its **text** (:func:`display`): the name itself when it is valid UTF-8, else the bytes that are
  not shown as ``\\xNN`` escapes. This is the ledger key, the name in MQTT messages and logs.
"""

from __future__ import annotations

import os
from pathlib import Path

#: longest file name (bytes) most Linux file systems accept
NAME_MAX = 255


def display(path: str | os.PathLike | bytes) -> str:
    """Text form of a path: valid UTF-8 as it is, other bytes as ``\\xNN`` escapes."""
    raw = path if isinstance(path, bytes) else os.fsencode(path)
    return raw.decode("utf-8", "backslashreplace")


def raw_bytes(path: str | os.PathLike) -> bytes | None:
    """The path's bytes when they are not valid UTF-8 (what the ledger must keep), else None."""
    raw = os.fsencode(path)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw
    return None


def fs_path(text: str, raw: bytes | None) -> Path:
    """The path to open: from the stored bytes when there are any, else from the text."""
    return Path(os.fsdecode(raw)) if raw is not None else Path(text)


def fit_name(prefix: str, name: str, suffix: str = "", limit: int = NAME_MAX) -> str:
    """``prefix + name + suffix`` shortened in the middle of ``name`` to at most ``limit`` bytes.

    ``name`` should already be text (:func:`display`); slashes and NUL become ``_``.
    """
    name = name.replace("/", "_").replace("\0", "_")
    budget = limit - len(prefix.encode()) - len(suffix.encode())
    if len(name.encode()) <= budget:
        return prefix + name + suffix
    stem, dot, ext = name.rpartition(".")
    ext = f".{ext}" if dot and len(ext.encode()) <= 16 else ""
    keep = name[: len(name) - len(ext)] if ext else name
    room = budget - len(ext.encode()) - 1  # one byte for the ellipsis marker "~"
    out = keep.encode()[:max(room, 0)].decode("utf-8", "ignore")
    return f"{prefix}{out}~{ext}{suffix}"
