"""Typed records passed between pipeline stages.

One image's way through the pipeline::

    load_image(path)            -> SemImage        (qcloop.imaging)
    segment(image)              -> Segmentation    (qcloop.segment.*)
    group_lobes(seg, image)     -> ParticleMasks   (qcloop.lobes)
    measure_particles(image, m) -> pandas.DataFrame, columns measure.PARTICLE_COLUMNS
    embed(image, masks, table)  -> numpy array (n_particles, d)   (qcloop.embed.*)
    classify(embeddings)        -> class, class_probability columns (qcloop.classify)

All arrays are NumPy; label images are int32 with 0 = background. Coordinates: x = column,
y = row, origin at the top-left pixel of the full frame.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

PIXEL_SIZE_SOURCES = ("zeiss", "jeol", "fei", "hitachi", "tescan", "config", "none")


@dataclass(frozen=True, eq=False)
class PixelSize:
    """Physical size of one pixel and where that figure came from."""

    nm: float | None
    source: str  # one of PIXEL_SIZE_SOURCES

    def __post_init__(self) -> None:
        if self.source not in PIXEL_SIZE_SOURCES:
            raise ValueError(f"pixel size source {self.source!r} not in {PIXEL_SIZE_SOURCES}")
        if self.nm is not None and not (self.nm > 0 and np.isfinite(self.nm)):
            raise ValueError(f"pixel size must be a positive finite number, got {self.nm!r}")


@dataclass(frozen=True, eq=False)
class SemImage:
    """One SEM image, decoded, with the region to analyse and its pixel size.

    Attributes
    ----------
    path : Path
        File it came from (``Path("<array>")`` for in-memory images).
    pixels : ndarray, shape (H, W)
        Grey values in the file's own dtype (uint8, uint16, float32); colour and palette images
        are converted to grey. Full frame, banner included.
    analysed_height_px : int
        Rows ``[0, analysed_height_px)`` are analysed; rows below are the info banner.
    pixel_size : PixelSize
    metadata : mapping of str to str
        Vendor metadata worth keeping (magnification, kV, ...); informative only.
    """

    path: Path
    pixels: np.ndarray
    analysed_height_px: int
    pixel_size: PixelSize
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The file's stem as text: bytes that are not UTF-8 (names from SMB shares written in a
        legacy code page) shown as ``\\xNN`` escapes, as :func:`qcloop.daemon.names.display`
        does, so tables, CSV, Parquet and JSON can hold it."""
        return os.fsencode(self.path.stem).decode("utf-8", "backslashreplace")

    @property
    def height_px(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width_px(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def pixel_size_nm(self) -> float | None:
        return self.pixel_size.nm

    def intensity(self) -> np.ndarray:
        """Analysed region as float32 in [0, 1], scaled by the region's own range.

        16-bit data keep their full dynamic range (no truncation to 8 bits).
        """
        region = self.pixels[: self.analysed_height_px].astype(np.float32, copy=False)
        lo, hi = float(region.min()), float(region.max())
        if hi <= lo:
            return np.zeros(region.shape, np.float32)
        return ((region - lo) / (hi - lo)).astype(np.float32, copy=False)


@dataclass(frozen=True, eq=False)
class Segmentation:
    """Output of any segmenter, before lobe grouping.

    Attributes
    ----------
    labels : ndarray of int32, shape (analysed_height_px, W)
        0 = background; 1..n = regions. A region is a whole particle or one lobe of a fused
        particle (dumbbell, trimer); :func:`qcloop.lobes.group_lobes` decides which.
    method : str
        ``"classical"``, ``"sam-auto"``, ``"sam-prompted"``.
    scores : ndarray of float32, shape (n,), optional
        Per-region quality score where the segmenter has one (SAM's predicted IoU).
    """

    labels: np.ndarray
    method: str
    scores: np.ndarray | None = None

    @property
    def n_regions(self) -> int:
        return int(self.labels.max()) if self.labels.size else 0


@dataclass(frozen=True, eq=False)
class ParticleMasks:
    """Particles after lobe grouping.

    Attributes
    ----------
    labels : ndarray of int32, shape (analysed_height_px, W)
        0 = background; 1..n = particles (particle_id = label).
    lobe_labels : ndarray of int32, same shape
        0 = background; 1..m = lobes. Every lobe pixel belongs to exactly one particle.
    lobe_parent : ndarray of int32, shape (m + 1,)
        ``lobe_parent[k]`` is the particle label of lobe k (index 0 unused, 0).
    touches_border : ndarray of bool, shape (n + 1,)
        ``touches_border[p]`` is True when particle p is cut by the image edge or the banner.
    """

    labels: np.ndarray
    lobe_labels: np.ndarray
    lobe_parent: np.ndarray
    touches_border: np.ndarray

    @property
    def n_particles(self) -> int:
        return int(self.labels.max()) if self.labels.size else 0


@dataclass(frozen=True, eq=False)
class ImageResult:
    """Everything the pipeline learnt about one image.

    ``particles`` has one row per particle with the columns of
    :data:`qcloop.measure.PARTICLE_COLUMNS` (plus ``class`` and ``class_probability`` once
    classified); ``embeddings`` rows align with ``particles`` rows.
    """

    image: SemImage
    masks: ParticleMasks
    particles: pd.DataFrame
    embeddings: np.ndarray | None
    stage_seconds: Mapping[str, float]

    @property
    def seconds(self) -> float:
        return float(sum(self.stage_seconds.values()))

    @property
    def area_fraction(self) -> float:
        """Particle area / analysed area: the share of the analysed region's pixels (banner
        excluded) covered by a particle, particles cut by the border included."""
        labels = np.asarray(self.masks.labels)
        return float(np.count_nonzero(labels) / labels.size) if labels.size else float("nan")

    def summary(self) -> dict[str, object]:
        """One row of ``images.csv`` (``area_fraction``: see :attr:`area_fraction`)."""
        p = self.particles
        inner = p[~p["touches_border"]] if len(p) else p
        ecd = inner["ecd_nm"] if len(inner) else pd.Series(dtype=float)
        return {
            "image": self.image.name,
            "width_px": self.image.width_px,
            "height_px": self.image.height_px,
            "analysed_height_px": self.image.analysed_height_px,
            "pixel_size_nm": self.image.pixel_size.nm,
            "pixel_size_source": self.image.pixel_size.source,
            "n_particles": int(len(p)),
            "ecd_nm_mean": float(ecd.mean()) if len(ecd) else float("nan"),
            "ecd_nm_sd": float(ecd.std(ddof=1)) if len(ecd) > 1 else float("nan"),
            "area_fraction": self.area_fraction,
            "seconds": round(self.seconds, 4),
        }
