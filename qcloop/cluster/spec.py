"""What travels to the workers: the pipeline's configuration, the classifier's bytes, one job per image.

Nothing here imports Dask: these are plain picklable records the client builds and the workers
read (:mod:`qcloop.cluster.worker`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcloop.errors import QcloopError

FINGERPRINT_SCHEMA = "qcloop.analysis-fingerprint/1"


@dataclass(frozen=True)
class WorkSpec:
    """Everything a worker needs to build the same :class:`~qcloop.pipeline.Pipeline` as the client.

    Attributes
    ----------
    imaging, pipeline : dict
        The ``imaging`` and ``pipeline`` config sections as JSON (``pipeline.classifier`` is
        None here: the classifier travels as bytes, so workers need no shared path for it).
    model_files : tuple of (file name, bytes)
        The classifier JSON first, then its ``.npz`` arrays; empty without a classifier.
    embed : bool
        Compute embeddings even without a classifier (``qcloop batch`` and ``archive``: yes).
    fingerprint : str
        SHA-256 (hex) over the above and the qcloop version: the "configuration + model" half of
        the archive manifest's key. Other sections (targets, batch, mqtt, ...) do not change what
        an image's analysis gives and are left out, so a new target re-scores without
        re-analysing.
    """

    imaging: dict[str, Any]
    pipeline: dict[str, Any]
    model_files: tuple[tuple[str, bytes], ...]
    embed: bool
    fingerprint: str

    @classmethod
    def of(cls, settings: Any, *, embed: bool) -> "WorkSpec":
        from qcloop import __version__

        pipeline = settings.pipeline.model_dump(mode="json")
        pipeline["classifier"] = None
        files = _model_files(settings.pipeline.classifier)
        blob = json.dumps({
            "schema": FINGERPRINT_SCHEMA,
            "qcloop": __version__,
            "imaging": settings.imaging.model_dump(mode="json"),
            "pipeline": pipeline,
            "model": [hashlib.sha256(data).hexdigest() for _, data in files],
            "embed": embed,
        }, sort_keys=True).encode()
        return cls(imaging=settings.imaging.model_dump(mode="json"), pipeline=pipeline,
                   model_files=files, embed=embed, fingerprint=hashlib.sha256(blob).hexdigest())

    def write_model(self, folder: Path) -> Path | None:
        """Write the classifier files into ``folder``; the JSON's path (None without a model)."""
        if not self.model_files:
            return None
        for name, data in self.model_files:
            (folder / name).write_bytes(data)
        return folder / self.model_files[0][0]

    def build(self, model_path: Path | None) -> Any:
        """The pipeline (``model_path``: where :meth:`write_model` put the classifier)."""
        from qcloop.config import ImagingConfig, PipelineConfig
        from qcloop.pipeline import Pipeline

        pipeline = PipelineConfig(**{**self.pipeline, "classifier": model_path})
        return Pipeline(ImagingConfig(**self.imaging), pipeline, embed=self.embed)


def _model_files(classifier: Path | None) -> tuple[tuple[str, bytes], ...]:
    """The classifier JSON and its arrays file (named in the JSON, as Classifier.load reads it)."""
    if classifier is None:
        return ()
    path = Path(classifier)
    if path.suffix.lower() == ".npz":
        path = path.with_suffix(".json")
    try:
        raw = path.read_bytes()
        arrays = json.loads(raw.decode("utf-8")).get("arrays_file") or path.with_suffix(".npz").name
        npz = path.with_name(Path(str(arrays)).name)
        return ((path.name, raw), (npz.name, npz.read_bytes()))
    except (OSError, ValueError, AttributeError) as exc:
        raise QcloopError(f"cannot read classifier {path} for the workers: {exc}") from None


@dataclass(frozen=True)
class ImageJob:
    """One image for one task.

    Attributes
    ----------
    path : str
        The image as the client names it; results carry ``Path(path)``.
    location : str
        Absolute path the workers open when they share the client's file system.
    args : tuple
        Extra arguments of the per-image function.
    data : bytes or None
        The file's bytes when the workers do not share the file system (``location`` unused).
    sidecars : tuple of (file name, bytes)
        Metadata files beside the image that the microscope readers look at (JEOL/Hitachi
        ``.txt``, TESCAN ``.hdr``), sent with ``data``.
    """

    path: str
    location: str
    args: tuple[Any, ...] = ()
    data: bytes | None = None
    sidecars: tuple[tuple[str, bytes], ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, path: Path, args: tuple[Any, ...] = (), *, send_bytes: bool = False) -> "ImageJob":
        location = str(Path(path).resolve())
        if not send_bytes:
            return cls(str(path), location, tuple(args))
        try:
            data = Path(path).read_bytes()
        except OSError:  # the worker's loader then reports the file as it would locally
            return cls(str(path), location, tuple(args))
        sidecars = tuple((s.name, s.read_bytes()) for s in sidecar_files(Path(path)))
        return cls(str(path), location, tuple(args), data, sidecars)

    def materialise(self, folder: Path) -> Path:
        """The file to analyse: ``location``, or the sent bytes written into ``folder``."""
        if self.data is None:
            return Path(self.location)
        target = folder / Path(self.path).name
        target.write_bytes(self.data)
        for name, data in self.sidecars:
            (folder / name).write_bytes(data)
        return target


def sidecar_files(path: Path) -> list[Path]:
    """Existing metadata files beside ``path`` that a microscope reader may open."""
    from qcloop_adapters.microscopes import VENDORS
    from qcloop_adapters.microscopes._units import sidecar_candidates

    suffixes = tuple(s for v in VENDORS for s in getattr(v, "SIDECAR_SUFFIXES", ()))
    return sidecar_candidates(Path(path), suffixes)


def content_sha256(path: Path) -> str:
    """SHA-256 (hex) of the image file, or of the image and its sidecar files when it has any.

    Without sidecars this is the plain file hash (the ``content_sha256`` the daemon publishes);
    with them it is the hash of ``image hash, then name and hash of each sidecar``, so an
    edited sidecar (a pixel size) counts as a changed image.
    """
    from qcloop.models import sha256_file

    digest = sha256_file(Path(path))
    extra = sidecar_files(Path(path))
    if not extra:
        return digest
    h = hashlib.sha256(digest.encode())
    for s in extra:
        h.update(b"\0" + s.name.encode() + b"\0" + sha256_file(s).encode())
    return h.hexdigest()
