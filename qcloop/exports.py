"""Particle masks in the formats other tools open: ImageJ/Fiji ROI sets and COCO JSON.

``qcloop analyze --export roi`` writes ``DIR/rois/<image>.zip`` per image: one polygon ROI per
particle, named by its zero-padded ``particle_id`` (the ``particle_id`` of ``particles.csv``),
readable by Fiji's ROI Manager (*More > Open...*) and by :func:`roifile.roiread`. The polygon
is the particle's outer outline as :mod:`qcloop.measure` measures it: the 0.5 iso-contour of its
mask (:func:`qcloop._geometry.trace_outlines`), in ImageJ's pixel coordinates (the top-left
corner of the top-left pixel is (0, 0), so the centre of pixel (row r, column c) is
(c + 0.5, r + 0.5)); sub-pixel vertices are stored with ImageJ's sub-pixel resolution. A
polygon has no holes, and of a particle made of diagonally touching pieces it keeps the largest
outline, so a rasterised ROI can differ from the mask by those pixels.

``qcloop analyze --export coco`` writes ``DIR/coco.json``: COCO "instances" with one annotation
per particle, its mask as compressed RLE over the full frame (``pycocotools.mask.decode`` gives
the mask back exactly), ``bbox`` [x, y, width, height] and ``area`` in pixels, and
``particle_id``, ``touches_border`` and ``lobes`` as extra keys. Categories are the particle
classes (``class`` column), or the single category ``particle`` without a classifier.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qcloop import __version__
from qcloop._geometry import trace_outlines
from qcloop.records import ImageResult

EXPORT_FORMATS = ("roi", "coco")
COCO_NAME = "coco.json"
ROI_FOLDER = "rois"


# --------------------------------------------------------------------------- ImageJ ROI
def particle_polygons(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Outer outline of every particle as ImageJ (x, y) vertices.

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)
        0 = background, 1..n = particles.

    Returns
    -------
    dict of particle label to ndarray of float, shape (m, 2)
        Vertices in ImageJ pixel coordinates (see module docstring), in tracing order.
    """
    labels = np.asarray(labels)
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return {}
    ol = trace_outlines(labels, n, np.zeros((n + 1, 2), np.int64))
    out: dict[int, np.ndarray] = {}
    for k in np.flatnonzero(ol.lengths):
        s, e = ol.start[k], ol.start[k + 1]
        out[int(k)] = np.column_stack([ol.cols2[s:e] / 2 + 0.5, ol.rows2[s:e] / 2 + 0.5])
    return out


def roi_set(result: ImageResult) -> list[Any]:
    """One :class:`roifile.ImagejRoi` polygon per particle of ``result``, named by particle id."""
    import roifile

    polygons = particle_polygons(result.masks.labels)
    width = max(4, len(str(max(polygons, default=0))))
    rois = []
    for pid, xy in polygons.items():
        roi = roifile.ImagejRoi.frompoints(xy, name=str(pid).zfill(width))
        roi.roitype = roifile.ROI_TYPE.POLYGON
        rois.append(roi)
    return rois


def write_roi_zip(result: ImageResult, path: str | Path) -> Path:
    """Write the image's particle ROIs as an ImageJ ROI set (zip). Returns the path."""
    import roifile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    rois = roi_set(result)
    if rois:
        roifile.roiwrite(path, rois, mode="w")
    else:  # an empty ROI set: an empty zip
        import zipfile

        zipfile.ZipFile(path, "w").close()
    return path


# --------------------------------------------------------------------------- COCO
def label_rles(labels: np.ndarray, height: int | None = None) -> dict[int, dict[str, Any]]:
    """Compressed COCO RLE of every label's mask, all labels in one pass.

    Parameters
    ----------
    labels : ndarray of int, shape (h, W)
        The analysed region (rows below it, the banner, are background).
    height : int, optional
        Height of the full frame (>= h); default h.

    Returns
    -------
    dict of label to ``{"size": [height, W], "counts": str}``
    """
    from pycocotools import mask as mask_utils

    labels = np.asarray(labels)
    h, w = labels.shape
    height = h if height is None else int(height)
    if height < h:
        raise ValueError(f"frame height {height} is smaller than the label image's {h}")
    # column-major (COCO order) runs of equal labels over the full frame
    col_major = np.zeros((w, height), labels.dtype)
    col_major[:, :h] = labels.T
    flat = col_major.ravel()
    edges = np.flatnonzero(np.diff(flat)) + 1
    starts = np.concatenate([[0], edges])
    lengths = np.diff(np.concatenate([starts, [flat.size]]))
    values = flat[starts]
    fg = values != 0
    if not fg.any():
        return {}
    order = np.argsort(values[fg], kind="stable")  # runs grouped by label, in frame order
    run_start, run_len, run_val = starts[fg][order], lengths[fg][order], values[fg][order]
    bounds = np.flatnonzero(np.diff(run_val)) + 1
    out: dict[int, dict[str, Any]] = {}
    for s, ln, v in zip(np.split(run_start, bounds), np.split(run_len, bounds), run_val[np.r_[0, bounds]]):
        ends = s + ln
        gaps = s - np.concatenate([[0], ends[:-1]])  # zeros before each run of ones
        counts = np.empty(2 * len(s) + 1, np.int64)
        counts[0:-1:2], counts[1::2] = gaps, ln
        counts[-1] = flat.size - ends[-1]
        rle = mask_utils.frPyObjects({"size": [height, w], "counts": counts.tolist()}, height, w)
        out[int(v)] = {"size": [height, w], "counts": rle["counts"].decode("ascii")}
    return out


class CocoDocument:
    """A COCO instances document built one image at a time."""

    def __init__(self) -> None:
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.categories: dict[str, int] = {}

    def add(self, result: ImageResult) -> None:
        image_id = len(self.images) + 1
        img = result.image
        self.images.append({"id": image_id, "file_name": img.path.name, "width": img.width_px,
                            "height": img.height_px, "analysed_height_px": img.analysed_height_px,
                            "pixel_size_nm": img.pixel_size.nm})
        rles = label_rles(result.masks.labels, img.height_px)
        p = result.particles
        classes = p["class"].astype(str).tolist() if "class" in p.columns else ["particle"] * len(p)
        for row, cls in zip(p.itertuples(index=False), classes):
            pid = int(row.particle_id)
            if pid not in rles:
                continue
            cat = self.categories.setdefault(cls, len(self.categories) + 1)
            self.annotations.append({
                "id": len(self.annotations) + 1, "image_id": image_id, "category_id": cat,
                "segmentation": rles[pid], "area": float(row.area_px),
                "bbox": [float(row.bbox_c0), float(row.bbox_r0), float(row.bbox_c1 - row.bbox_c0),
                         float(row.bbox_r1 - row.bbox_r0)],
                "iscrowd": 0, "particle_id": pid, "touches_border": bool(row.touches_border),
                "lobes": int(getattr(row, "lobes", 1)),
            })

    def to_dict(self) -> dict[str, Any]:
        return {
            "info": {"description": "qcloop particle masks", "version": __version__,
                     "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
            "images": self.images,
            "annotations": self.annotations,
            "categories": [{"id": i, "name": c, "supercategory": "particle"}
                           for c, i in self.categories.items()],
        }


# --------------------------------------------------------------------------- the CLI's collector
class Exports:
    """What ``qcloop analyze --export FORMAT`` writes, fed one :class:`ImageResult` at a time."""

    def __init__(self, out: str | Path, formats: Sequence[str]):
        unknown = set(formats) - set(EXPORT_FORMATS)
        if unknown:
            raise ValueError(f"unknown export format(s) {sorted(unknown)}; known: {EXPORT_FORMATS}")
        self.out = Path(out)
        self.formats = tuple(dict.fromkeys(formats))
        self.coco = CocoDocument() if "coco" in self.formats else None
        self.written: list[Path] = []

    def add(self, result: ImageResult) -> None:
        if "roi" in self.formats:
            self.written.append(write_roi_zip(result, self.out / ROI_FOLDER / f"{result.image.name}.zip"))
        if self.coco is not None:
            self.coco.add(result)

    def finish(self) -> list[Path]:
        """Write the collected documents; every file written, in order."""
        if self.coco is not None:
            path = self.out / COCO_NAME
            path.write_text(json.dumps(self.coco.to_dict()) + "\n", encoding="utf-8")
            self.written.append(path)
        return self.written
