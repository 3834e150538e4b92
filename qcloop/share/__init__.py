"""Where the example configurations, deployment files and operator docs are.

In the repository they are the top-level folders ``configs/``, ``deploy/`` and ``docs/``; an
installed wheel carries them as package data in this package (``qcloop/share/configs``,
``qcloop/share/deploy``, ``qcloop/share/docs``; see ``setup.py``). :func:`shared_path` finds
them in either place, ``qcloop files`` prints the paths::

    qcloop check-config "$(qcloop files configs/default.yaml)"
    sudo install -m 0644 "$(qcloop files deploy/qcloop.service)" /etc/systemd/system/
"""

from __future__ import annotations

from pathlib import Path

from qcloop.errors import QcloopError

#: the shared folders, by the name they have in the repository and under this package
FOLDERS = ("configs", "deploy", "docs")
_INSTALLED = Path(__file__).resolve().parent
_CHECKOUT = _INSTALLED.parents[1]  # the repository root when running from a source checkout


def shared_root(folder: str) -> Path:
    """The directory holding ``folder`` (one of :data:`FOLDERS`): installed copy, else checkout."""
    if folder not in FOLDERS:
        raise QcloopError(f"unknown shared folder {folder!r}; known: {', '.join(FOLDERS)}")
    for base in (_INSTALLED, _CHECKOUT):
        if (base / folder).is_dir():
            return base / folder
    raise QcloopError(f"the {folder}/ files are not installed (looked in {_INSTALLED} and {_CHECKOUT})")


def shared_path(relative: str | Path = "") -> Path:
    """Path of a shared file or folder, e.g. ``configs/default.yaml`` or ``deploy/prometheus``.

    Raises QcloopError when it does not exist, listing what there is.
    """
    parts = Path(relative).parts
    if not parts:
        return shared_root(FOLDERS[0]).parent
    root = shared_root(parts[0])
    path = root.joinpath(*parts[1:])
    if not path.exists():
        have = ", ".join(str(p) for p in list_shared(parts[0]))
        raise QcloopError(f"no shared file {relative!s} (there are: {have})")
    return path


def list_shared(folder: str | None = None) -> list[Path]:
    """Every shared file, relative to the shared root (``configs/default.yaml``, ...), sorted."""
    out: list[Path] = []
    for name in ([folder] if folder else FOLDERS):
        root = shared_root(name)
        out += sorted(Path(name) / p.relative_to(root) for p in root.rglob("*")
                      if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    return out
