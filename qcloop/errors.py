"""The exceptions qcloop raises on purpose. Everything user-facing derives from QcloopError."""

from __future__ import annotations

from pathlib import Path


class QcloopError(Exception):
    """Base class of every error qcloop reports to a user."""


class ConfigError(QcloopError):
    """A configuration file or value is invalid; the message names the field path."""


class InputImageError(QcloopError):
    """An image cannot be analysed: unreadable, empty, truncated, absurd size, unsupported.

    Attributes
    ----------
    path : Path or None
        The offending file.
    reason : str
        Short human-readable reason (also used as the quarantine reason).
    """

    def __init__(self, path: str | Path | None, reason: str):
        self.path = Path(path) if path is not None else None
        self.reason = reason
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{reason}")


class ModelError(QcloopError):
    """A model checkpoint or classifier file is missing, corrupt or does not match the config."""
