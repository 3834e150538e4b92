"""Label images on disk: one TIFF per image, particles on page 1, lobes on page 2.

Format written by ``qcloop analyze --labels`` (``DIR/labels/<image>.tif``) and ``qcloop synth
--labels`` (``<name>_labels.tif``):

* page 1: particle labels over the analysed region (banner rows excluded), 0 = background,
  value = ``particle_id`` of ``particles.csv`` (synthetic: the truth CSV's ``particle``);
* page 2 (when there are lobes): lobe labels, same shape, 0 = background, 1..m = lobes; every
  lobe lies inside one particle of page 1;
* dtype uint16, or uint32 when a page holds labels above 65535; zlib-compressed, grey
  (``minisblack``); the ImageDescription is ``{"qcloop": "labels", "pages": [...]}`` so
  ``qcloop eval`` recognises the file as a label image.

Fiji opens the file as a two-slice stack, napari as a (2, H, W) label layer; page 1 alone is what
most tools read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MARKER = "labels"
"""Value of the ``qcloop`` key in the ImageDescription of label TIFFs written here."""


@dataclass(frozen=True, eq=False)
class LabelImage:
    """A label TIFF read back: particle labels and, when stored, lobe labels (same shape)."""

    labels: np.ndarray
    lobe_labels: np.ndarray | None


def label_dtype(max_label: int) -> np.dtype:
    """uint16 when every label fits, else uint32 (ValueError beyond 2**32 - 1)."""
    if max_label <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if max_label <= np.iinfo(np.uint32).max:
        return np.dtype(np.uint32)
    raise ValueError(f"label {max_label} does not fit in a uint32 label image")


def write_label_tiff(path: str | Path, labels: np.ndarray, lobe_labels: np.ndarray | None = None) -> Path:
    """Write particle labels (page 1) and optional lobe labels (page 2) as one TIFF.

    Parameters
    ----------
    path : path
        Output file; its folder is created.
    labels : ndarray of int, shape (H, W)
        0 = background; negative values are rejected.
    lobe_labels : ndarray of int, shape (H, W), optional

    Returns
    -------
    Path
    """
    import tifffile

    pages = [("particles", np.asarray(labels))]
    if lobe_labels is not None:
        pages.append(("lobes", np.asarray(lobe_labels)))
    for name, page in pages:
        if page.ndim != 2 or not np.issubdtype(page.dtype, np.integer):
            raise ValueError(f"{name} must be a 2-D integer label image, got {page.dtype} {page.shape}")
        if page.size and page.min() < 0:
            raise ValueError(f"{name} labels must be >= 0, got {page.min()}")
    if len(pages) == 2 and pages[0][1].shape != pages[1][1].shape:
        raise ValueError(f"lobe labels {pages[1][1].shape} and particle labels {pages[0][1].shape} differ in shape")
    dtype = label_dtype(max(int(p.max(initial=0)) for _, p in pages))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    description = json.dumps({"qcloop": MARKER, "pages": [name for name, _ in pages]})
    with tifffile.TiffWriter(path) as tif:
        for i, (_, page) in enumerate(pages):
            tif.write(page.astype(dtype), photometric="minisblack", compression="zlib", metadata=None,
                      software=False, description=description if i == 0 else None)
    return path


def is_label_tiff(path: str | Path) -> bool:
    """True for a TIFF written by :func:`write_label_tiff` (its ImageDescription marker)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            text = tif.pages[0].description
    except (OSError, ValueError, tifffile.TiffFileError):
        return False
    try:
        return json.loads(text).get("qcloop") == MARKER
    except (ValueError, AttributeError):
        return False


def read_label_tiff(path: str | Path) -> LabelImage:
    """Particle labels (page 1) and lobe labels (page 2, None if absent) of a label TIFF.

    Any single- or multi-page integer TIFF is accepted (page 1 = particles).
    """
    import tifffile

    with tifffile.TiffFile(path) as tif:
        pages = [p.asarray() for p in tif.pages[:2]]
    for page in pages:
        if page.ndim != 2 or not np.issubdtype(page.dtype, np.integer):
            raise ValueError(f"{path}: not a label image (page of dtype {page.dtype}, shape {page.shape})")
    return LabelImage(labels=pages[0], lobe_labels=pages[1] if len(pages) > 1 else None)


def read_label_image(path: str | Path) -> np.ndarray:
    """First page of any 2-D integer image (TIFF, PNG, ...): a label image or a drawn mask.

    Raises ``ValueError`` for colour or floating-point images.
    """
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        return read_label_tiff(path).labels
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim != 2 or (not np.issubdtype(arr.dtype, np.integer) and arr.dtype != bool):
        raise ValueError(f"{path}: not a label image or mask (dtype {arr.dtype}, shape {arr.shape})")
    return arr


def write_result_labels(folder: str | Path, result) -> Path:
    """``folder/<image>.tif`` of one :class:`qcloop.records.ImageResult`: particles, then lobes.

    Page 1 values are the ``particle_id`` of ``particles.csv``; page 2 the lobe labels.
    """
    masks = result.masks
    return write_label_tiff(Path(folder) / f"{result.image.name}.tif", masks.labels, masks.lobe_labels)
