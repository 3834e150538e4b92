"""Labelling workflow: particle crops for the chemist, and training sets from sorted crops.

1. ``qcloop crops export IMAGES... --out DIR`` runs the pipeline (segment, group lobes,
   measure) on every image and writes one PNG per particle, ``DIR/<image stem>__p<id>.png``
   (``id`` = the particle's label, zero-padded to 4 digits), plus the index ``DIR/crops.csv``
   (:data:`INDEX_COLUMNS`: crop file name, source image path, particle id, centroid, bounding
   box) and ``DIR/crops.json`` (the segmentation settings used).
2. The chemist sorts 5-10 crops per class into sub-folders named by class
   (``DIR/sphere/``, ``DIR/dumbbell/``, ...). Folders whose name starts with ``_`` or ``.``
   are ignored (``_junk/``), as are the crops left at the top level.
3. ``qcloop train DIR --out MODEL`` finds every sorted crop's row in ``crops.csv`` (by file
   name), re-runs the pipeline on each source image once — with the configured segmenter and
   embedder, exactly as at prediction time — and takes that particle's embedding. A particle
   whose centroid moved by more than :data:`CENTROID_TOLERANCE_PX` since the export means the
   segmentation changed (another config or qcloop version): training stops with an error
   naming the crop instead of silently learning from the wrong particle.

Crop images: the particle's bounding box grown by ``margin`` × its longer side (at least 4 px)
on every side, clipped to the analysed region, 8-bit grey from :meth:`SemImage.intensity`; the
pixels outside the particle's mask are dimmed to half brightness so the particle meant stands
out from touching neighbours.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from qcloop.errors import QcloopError
from qcloop.records import ImageResult

INDEX_NAME = "crops.csv"
SETTINGS_NAME = "crops.json"
INDEX_COLUMNS = ("crop", "image", "particle_id", "centroid_x_px", "centroid_y_px",
                 "bbox_r0", "bbox_c0", "bbox_r1", "bbox_c1", "touches_border", "area_px")
CENTROID_TOLERANCE_PX = 1.5
DIM_OUTSIDE = 0.5


class LabellingError(QcloopError):
    """Sorted crops cannot be turned into a training set (missing index, moved image, changed
    segmentation, too few examples...)."""


def crop_name(stem: str, particle_id: int) -> str:
    """``GM_59_20`` and 42 → ``GM_59_20__p0042.png``."""
    return f"{stem}__p{int(particle_id):04d}.png"


def parse_crop_name(name: str) -> tuple[str, int] | None:
    """Inverse of :func:`crop_name`; None for another file name."""
    stem = Path(name).stem
    head, sep, tail = stem.rpartition("__p")
    if not sep or not tail.isdigit():
        return None
    return head, int(tail)


def segmentation_fingerprint(settings) -> dict[str, object]:
    """The settings that decide particle ids (imaging + segmentation + lobe grouping)."""
    p = settings.pipeline
    seg = {"imaging": settings.imaging.model_dump(mode="json"), "segmenter": p.segmenter,
           "classical": p.classical.model_dump(mode="json"), "lobes": p.lobes.model_dump(mode="json")}
    if p.segmenter == "sam":
        seg["sam"] = p.sam.model_dump(mode="json")
    blob = json.dumps(seg, sort_keys=True).encode()
    return {"segmentation_hash": hashlib.sha256(blob).hexdigest()[:12], "settings": seg}


def _centroids(result: ImageResult, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = result.particles
    if {"centroid_x_px", "centroid_y_px"} <= set(p.columns):
        return p["centroid_x_px"].to_numpy(float), p["centroid_y_px"].to_numpy(float)
    cy, cx = np.asarray(ndi.center_of_mass(np.ones_like(result.masks.labels), result.masks.labels, ids),
                        float).reshape(-1, 2).T
    return cx, cy


def _ids(result: ImageResult) -> np.ndarray:
    from qcloop.embed.morphology import particle_ids

    return particle_ids(result.particles, result.masks)


def crop_pixels(result: ImageResult, particle_id: int, bbox: tuple[int, int, int, int], margin: float) -> np.ndarray:
    """8-bit grey crop around one particle (outside-mask pixels dimmed), shape (h, w)."""
    grey = result.image.intensity()
    labels = result.masks.labels
    r0, c0, r1, c1 = bbox
    pad = max(4, int(round(margin * max(r1 - r0, c1 - c0))))
    R0, C0 = max(r0 - pad, 0), max(c0 - pad, 0)
    R1, C1 = min(r1 + pad, labels.shape[0]), min(c1 + pad, labels.shape[1])
    g = grey[R0:R1, C0:C1].astype(np.float32)
    own = labels[R0:R1, C0:C1] == particle_id
    g = np.where(own, g, g * DIM_OUTSIDE)
    return np.clip(np.round(g * 255), 0, 255).astype(np.uint8)


def export_crops(
    result: ImageResult,
    out_dir: str | Path,
    *,
    stem: str | None = None,
    margin: float = 0.25,
    include_border: bool = False,
) -> list[dict[str, object]]:
    """Write one PNG crop per particle of an analysed image; return their index rows.

    Parameters
    ----------
    result : ImageResult
        The pipeline's output for one image (its ``image.path`` must be the source file).
    out_dir : path
    stem : str, optional
        Name prefix of the crops (default: the image's stem).
    margin : float
        Context around the bounding box, as a fraction of its longer side.
    include_border : bool
        Also export particles cut by the image edge or the banner (default: skip them; they
        make poor training examples).

    Returns
    -------
    list of dict
        Rows with :data:`INDEX_COLUMNS`.
    """
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or result.image.name
    ids = _ids(result)
    labels = result.masks.labels
    slices = ndi.find_objects(labels, max_label=int(ids.max(initial=0)))
    cx, cy = _centroids(result, ids)
    touches = result.masks.touches_border
    rows: list[dict[str, object]] = []
    src = str(Path(result.image.path).resolve())
    for k, pid in enumerate(ids):
        pid = int(pid)
        sl = slices[pid - 1] if 0 < pid <= len(slices) else None
        if sl is None:
            continue
        border = bool(touches[pid]) if pid < len(touches) else False
        if border and not include_border:
            continue
        bbox = (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
        crop = crop_pixels(result, pid, bbox, margin)
        name = crop_name(stem, pid)
        Image.fromarray(crop).save(out / name)
        rows.append({"crop": name, "image": src, "particle_id": pid,
                     "centroid_x_px": round(float(cx[k]), 3), "centroid_y_px": round(float(cy[k]), 3),
                     "bbox_r0": bbox[0], "bbox_c0": bbox[1], "bbox_r1": bbox[2], "bbox_c1": bbox[3],
                     "touches_border": border, "area_px": int(np.count_nonzero(labels[sl] == pid))})
    return rows


def write_index(rows: Iterable[dict[str, object]], out_dir: str | Path, fingerprint: dict[str, object] | None = None) -> Path:
    """Write (or merge into) ``out_dir/crops.csv``; rows of the same crop name are replaced."""
    out = Path(out_dir)
    new = pd.DataFrame(list(rows), columns=list(INDEX_COLUMNS))
    path = out / INDEX_NAME
    if path.is_file():
        old = pd.read_csv(path)
        new = pd.concat([old[~old["crop"].isin(new["crop"])], new], ignore_index=True)
    new.to_csv(path, index=False)
    if fingerprint is not None:
        (out / SETTINGS_NAME).write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_index(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Union of every ``crops.csv`` found at the given files/folders (later ones win)."""
    frames = []
    for p in paths:
        p = Path(p)
        f = p / INDEX_NAME if p.is_dir() else p
        if f.is_file():
            df = pd.read_csv(f)
            missing = {"crop", "image", "particle_id"} - set(df.columns)
            if missing:
                raise LabellingError(f"{f}: not a crops index (missing columns {sorted(missing)})")
            df["index_file"] = str(f)
            frames.append(df)
    if not frames:
        return pd.DataFrame(columns=list(INDEX_COLUMNS) + ["index_file"])
    out = pd.concat(frames, ignore_index=True)
    return out.drop_duplicates("crop", keep="last").reset_index(drop=True)


def collect_labelled(folder: str | Path) -> pd.DataFrame:
    """Sorted crops: one row per ``folder/<class>/<crop>.png`` with columns crop, class, path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LabellingError(f"no such folder: {folder}")
    rows = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sub.name.startswith(("_", ".")):
            continue
        if sub.name == "unknown":
            raise LabellingError(f"{sub}: 'unknown' is reserved for low-confidence predictions; rename the folder")
        for f in sorted(sub.iterdir()):
            if f.suffix.lower() == ".png" and f.is_file():
                rows.append({"crop": f.name, "class": sub.name, "path": str(f)})
    df = pd.DataFrame(rows, columns=["crop", "class", "path"])
    dup = df[df["crop"].duplicated(keep=False)]
    if len(dup):
        first = dup.iloc[0]["crop"]
        where = ", ".join(sorted(dup[dup["crop"] == first]["class"]))
        raise LabellingError(f"crop {first} is sorted into more than one class ({where})")
    return df


@dataclass
class TrainingSet:
    """Embeddings of sorted crops.

    Attributes
    ----------
    X : ndarray of float64, shape (n, d)
    y : list of str
    crops : DataFrame
        The labelled crops with their index rows (image, particle_id, ...), aligned with X.
    """

    X: np.ndarray
    y: list[str]
    crops: pd.DataFrame

    @property
    def counts(self) -> dict[str, int]:
        return {c: self.y.count(c) for c in sorted(set(self.y))}


def build_training_set(
    labelled: pd.DataFrame,
    index: pd.DataFrame,
    analyze: Callable[[Path], ImageResult],
    *,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> TrainingSet:
    """Embedding of every labelled crop, each source image analysed once.

    Parameters
    ----------
    labelled : DataFrame
        From :func:`collect_labelled` (crop, class).
    index : DataFrame
        From :func:`read_index` (crop, image, particle_id, centroid_x_px, centroid_y_px).
    analyze : callable
        ``analyze(image_path) -> ImageResult`` with embeddings (the configured pipeline).
    progress : callable, optional
        Wraps the iterable of images (e.g. tqdm).

    Raises
    ------
    LabellingError
        A crop missing from the index, a source image gone, a particle id no longer present or
        its centroid moved (segmentation changed since the export), no embeddings.
    """
    if labelled.empty:
        raise LabellingError("no sorted crops found: put crop PNGs into one sub-folder per class")
    merged = labelled.merge(index.drop(columns=[c for c in ("class",) if c in index.columns]), on="crop", how="left")
    missing = merged[merged["image"].isna()]
    if len(missing):
        names = ", ".join(missing["crop"].head(5))
        raise LabellingError(f"{len(missing)} sorted crop(s) are not in any {INDEX_NAME} ({names}...); "
                             f"keep {INDEX_NAME} from 'qcloop crops export' in the folder or its parent")
    X_parts: list[np.ndarray] = []
    order: list[int] = []
    groups = list(merged.groupby("image", sort=True))
    it = progress(groups) if progress else groups
    for image, grp in it:
        path = Path(str(image))
        if not path.is_file():
            raise LabellingError(f"source image {path} of crop {grp['crop'].iloc[0]} no longer exists")
        result = analyze(path)
        if result.embeddings is None:
            raise LabellingError("the pipeline computed no embeddings (embedder disabled?)")
        ids = _ids(result)
        row_of = {int(pid): i for i, pid in enumerate(ids)}
        cx, cy = _centroids(result, ids)
        for idx, r in grp.iterrows():
            pid = int(r["particle_id"])
            k = row_of.get(pid)
            if k is None:
                raise LabellingError(f"crop {r['crop']}: particle {pid} not found in {path.name} any more; the "
                                     "segmentation differs from the export (config or version changed): re-export")
            if "centroid_x_px" in r and pd.notna(r["centroid_x_px"]):
                d = math.hypot(cx[k] - float(r["centroid_x_px"]), cy[k] - float(r["centroid_y_px"]))
                if d > CENTROID_TOLERANCE_PX:
                    raise LabellingError(
                        f"crop {r['crop']}: particle {pid} of {path.name} moved by {d:.1f} px since the export; "
                        "the segmentation differs (config or version changed): re-export the crops")
            X_parts.append(result.embeddings[k])
            order.append(idx)
    X = np.vstack(X_parts).astype(np.float64)
    crops = merged.loc[order].reset_index(drop=True)
    return TrainingSet(X=X, y=[str(c) for c in crops["class"]], crops=crops)
