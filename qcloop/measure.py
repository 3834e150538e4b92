"""Per-particle measurements, in nanometres where the pixel size is known.

:func:`measure_particles` turns :class:`~qcloop.records.ParticleMasks` into one table row per
particle. Every column is listed, with its unit, in :data:`PARTICLE_COLUMNS`. When the image has
no pixel size (source ``none``) the ``*_nm`` / ``*_nm2`` columns are NaN and the ``*_px``
columns carry the sizes.

Area, centroid, mean intensity and the second-moment ellipse come from pixel sums over all
labels at once (they match scikit-image's ``regionprops``). Perimeter, solidity, Feret diameters
and corners come from each particle's outer outline, the 0.5 iso-contour of its mask as
:func:`skimage.measure.find_contours` traces it; :mod:`qcloop._geometry` traces and measures the
outlines of all particles together. Lobe diameters are the major axes of each lobe of a fused
particle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from qcloop import _geometry
from qcloop.records import ParticleMasks, SemImage

#: Every column of the particle table, with its unit and meaning.
PARTICLE_COLUMNS: dict[str, str] = {
    "image": "file stem of the image",
    "particle_id": "label of the particle in ParticleMasks.labels (1..n)",
    "centroid_x_px": "centroid column (px, from the left edge)",
    "centroid_y_px": "centroid row (px, from the top edge)",
    "bbox_r0": "bounding box first row (px, inclusive)",
    "bbox_c0": "bounding box first column (px, inclusive)",
    "bbox_r1": "bounding box last row + 1 (px, exclusive)",
    "bbox_c1": "bounding box last column + 1 (px, exclusive)",
    "area_px": "area (px^2)",
    "area_nm2": "area (nm^2)",
    "ecd_px": "equivalent circular diameter sqrt(4 area / pi) (px)",
    "ecd_nm": "equivalent circular diameter (nm)",
    "perimeter_px": "perimeter of the outline (px)",
    "perimeter_nm": "perimeter (nm)",
    "feret_max_px": "maximum Feret (caliper) diameter (px)",
    "feret_max_nm": "maximum Feret diameter (nm)",
    "feret_min_px": "minimum Feret (caliper) diameter, rotating calipers on the hull (px)",
    "feret_min_nm": "minimum Feret diameter (nm)",
    "circularity": "4 pi area / perimeter^2, clipped to [0, 1]; 1 for a disk",
    "solidity": "area / convex hull area, in (0, 1]",
    "eccentricity": "eccentricity of the ellipse with the same second moments, in [0, 1)",
    "aspect_ratio": "major / minor axis of that ellipse (>= 1)",
    "orientation_deg": "major axis angle, degrees counter-clockwise from the x axis, in [0, 180)",
    "mean_intensity": "mean grey value inside the particle, on the [0, 1] scale of SemImage.intensity()",
    "corners": "number of corners of the outline (0 for a disk, 3 triangle, 4 cube/square)",
    "corner_sharpness": "1 - corner radius / inscribed radius, mean over corners; 0 without corners",
    "lobes": "number of fused lobes (1 sphere, 2 dumbbell, 3 trimer, ...)",
    "lobe_diameter_px": "mean lobe diameter (px): major axis of each lobe (ECD for one-lobe particles)",
    "lobe_diameter_nm": "mean lobe diameter (nm)",
    "lobe_diameters_nm": "every lobe diameter (nm, ';'-joined; px when no pixel size)",
    "touches_border": "True when the particle is cut by the image edge or the info banner",
}

#: Size columns in px and their nm counterparts (exponent 1 for lengths, 2 for areas).
_NM_OF_PX = {
    "area_px": ("area_nm2", 2),
    "ecd_px": ("ecd_nm", 1),
    "perimeter_px": ("perimeter_nm", 1),
    "feret_max_px": ("feret_max_nm", 1),
    "feret_min_px": ("feret_min_nm", 1),
    "lobe_diameter_px": ("lobe_diameter_nm", 1),
}


def measure_particles(image: SemImage, masks: ParticleMasks) -> pd.DataFrame:
    """Measure every particle of one image.

    Parameters
    ----------
    image : SemImage
        The image the masks belong to (gives intensity and pixel size).
    masks : ParticleMasks
        Particle and lobe labels over the analysed region.

    Returns
    -------
    pandas.DataFrame
        One row per particle (labels 1..n that are present, in label order), columns exactly
        :data:`PARTICLE_COLUMNS` in that order.
    """
    labels = masks.labels
    intensity = image.intensity()
    if labels.shape != intensity.shape:
        raise ValueError(f"mask shape {labels.shape} differs from the analysed region {intensity.shape}")
    n = masks.n_particles
    if n == 0:
        return pd.DataFrame({c: pd.Series(dtype=_dtype(c)) for c in PARTICLE_COLUMNS})
    runs = _RowRuns.of(labels)
    moments = _moments(runs, labels, intensity, n)
    pids = np.flatnonzero(moments["area"] > 0)
    box = runs.bounding_boxes(n)
    shapes = _outline_shapes(labels, n, box)
    area = moments["area"][pids].astype(np.float64)
    ecd = np.sqrt(4.0 * area / np.pi)
    perimeter = shapes["perimeter"][pids]
    with np.errstate(divide="ignore", invalid="ignore"):
        circularity = np.where(perimeter > 0, np.minimum(1.0, 4.0 * np.pi * area / perimeter**2), 0.0)
    diams = [[d] for d in ecd.tolist()]
    lobe_diameter = ecd.copy()
    for pid, ds in _lobe_diameters_px(masks).items():
        i = int(np.searchsorted(pids, pid))
        if i == len(pids) or pids[i] != pid:
            continue
        diams[i] = ds
        lobe_diameter[i] = np.mean(ds)
    border = np.zeros(len(pids), bool)
    tb = np.asarray(masks.touches_border, bool)
    inside = pids < len(tb)
    border[inside] = tb[pids[inside]]
    nm = image.pixel_size.nm
    scale = nm if nm is not None else 1.0
    table = pd.DataFrame({
        "image": [image.name] * len(pids),
        "particle_id": pids,
        "centroid_x_px": moments["cx"][pids],
        "centroid_y_px": moments["cy"][pids],
        "bbox_r0": box[pids, 0], "bbox_c0": box[pids, 1], "bbox_r1": box[pids, 2], "bbox_c1": box[pids, 3],
        "area_px": area,
        "ecd_px": ecd,
        "perimeter_px": perimeter,
        "feret_max_px": shapes["feret_max"][pids],
        "feret_min_px": shapes["feret_min"][pids],
        "circularity": circularity,
        "solidity": shapes["solidity"][pids],
        "eccentricity": moments["eccentricity"][pids],
        "aspect_ratio": moments["aspect_ratio"][pids],
        "orientation_deg": moments["orientation_deg"][pids],
        "mean_intensity": moments["mean_intensity"][pids],
        "corners": shapes["corners"][pids],
        "corner_sharpness": shapes["corner_sharpness"][pids],
        "lobes": np.array([len(ds) for ds in diams], np.int64),
        "lobe_diameter_px": lobe_diameter,
        "touches_border": border,
        "lobe_diameters_nm": [";".join(f"{d * scale:.2f}" for d in ds) for ds in diams],
    })
    for px_col, (nm_col, power) in _NM_OF_PX.items():
        table[nm_col] = table[px_col] * nm**power if nm is not None else np.nan
    return table[list(PARTICLE_COLUMNS)]


def _dtype(column: str) -> str:
    if column in ("image", "lobe_diameters_nm"):
        return "object"
    if column == "touches_border":
        return "bool"
    if column in ("particle_id", "corners", "lobes", "bbox_r0", "bbox_c0", "bbox_r1", "bbox_c1"):
        return "int64"
    return "float64"


def _moments(runs: _RowRuns, labels: np.ndarray, intensity: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Area, centroid, mean intensity and second-moment ellipse of every label at once.

    Arrays are indexed by label (index 0 = background). The ellipse matches scikit-image's
    regionprops (eigenvalues of the central second moments): eccentricity sqrt(1 - l2/l1),
    aspect ratio sqrt(l1/l2), orientation of the major axis in degrees counter-clockwise from
    the x axis (rows point down, so y = -row), in [0, 180). ``runs`` are the row runs of
    ``labels``.
    """
    area, s_r, s_c, s_rr, s_cc, s_rc = runs.pixel_sums(n)
    safe = np.where(area > 0, area, 1).astype(np.float64)
    cy, cx = s_r / safe, s_c / safe
    mi = np.bincount(labels.ravel(), weights=intensity.ravel().astype(np.float64), minlength=n + 1)[: n + 1] / safe
    drr = s_rr / safe - cy**2
    dcc = s_cc / safe - cx**2
    drc = s_rc / safe - cy * cx
    half_trace = (drr + dcc) / 2
    root = np.sqrt(np.maximum(((drr - dcc) / 2) ** 2 + drc**2, 0.0))
    l1, l2 = half_trace + root, np.maximum(half_trace - root, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ecc = np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / l1, 0, 1)), 0.0)
        aspect = np.where(l2 > 0, np.sqrt(l1 / np.where(l2 > 0, l2, 1)), np.inf)
    # major-axis direction (dr, dc): eigenvector of [[drr, drc], [drc, dcc]] for l1
    dr = np.where(np.abs(drc) > 1e-12, drc, np.where(drr >= dcc, 1.0, 0.0))
    dc = np.where(np.abs(drc) > 1e-12, l1 - drr, np.where(drr >= dcc, 0.0, 1.0))
    orient = np.mod(np.degrees(np.arctan2(-dr, dc)), 180.0)
    return {"area": area, "cy": cy, "cx": cx, "mean_intensity": mi, "eccentricity": ecc,
            "aspect_ratio": aspect, "orientation_deg": orient}


def _outline_shapes(labels: np.ndarray, n: int, box: np.ndarray) -> dict[str, np.ndarray]:
    """Perimeter, solidity, Feret diameters and corners of every label (arrays indexed by label).

    See :func:`outline_shape` for the definitions. ``box`` holds every label's bounding box
    (r0, c0, r1, c1); outline coordinates are taken from its corner (r0, c0).
    """
    ol = _geometry.trace_outlines(labels, n, box[:, :2])
    fig = _geometry.outline_figures(ol)
    with np.errstate(divide="ignore", invalid="ignore"):
        solidity = np.where(fig.hull_area > 0, np.minimum(1.0, fig.area / fig.hull_area), 1.0)
    corners, sharpness = _geometry.corner_figures(
        ol, fig.perimeter, lambda ids: _geometry.inscribed_radii(labels, box, ids))
    return {"perimeter": fig.perimeter, "solidity": solidity, "feret_max": fig.feret_max,
            "feret_min": fig.feret_min, "corners": corners, "corner_sharpness": sharpness}


@dataclass(frozen=True)
class OutlineShape:
    """Shape figures of one binary mask from its outline (px)."""

    perimeter: float
    solidity: float
    feret_max: float
    feret_min: float
    corners: int
    corner_sharpness: float


def outline_shape(mask: np.ndarray) -> OutlineShape:
    """Perimeter, solidity, Feret diameters and corners of a mask, from one traced outline.

    The outline is the 0.5 iso-contour of the mask (marching squares, as
    :func:`skimage.measure.find_contours`; the longest one if there are several), i.e. the
    boundary between pixel centres inside and outside. Perimeter = its length; solidity = the
    area it encloses over the area of its convex hull (1 for any convex shape); Feret max = the
    largest distance between hull vertices; Feret min = rotating calipers (smallest width over
    the hull's edge directions). Corners: see :func:`corner_features`. An empty mask gives
    zeros (solidity 1).
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        return OutlineShape(0.0, 1.0, 0.0, 0.0, 0, 0.0)
    labels = mask.astype(np.int32)
    s = _outline_shapes(labels, 1, _mask_box(mask))
    return OutlineShape(float(s["perimeter"][1]), float(s["solidity"][1]), float(s["feret_max"][1]),
                        float(s["feret_min"][1]), int(s["corners"][1]), float(s["corner_sharpness"][1]))


def _mask_box(mask: np.ndarray) -> np.ndarray:
    """Boxes (r0, c0, r1, c1) of labels 0 and 1 for a single mask: label 1 gets the whole
    array, so outline coordinates are mask coordinates."""
    return np.array([[0, 0, 0, 0], [0, 0, mask.shape[0], mask.shape[1]]], np.int64)


def feret_diameters(mask: np.ndarray) -> tuple[float, float]:
    """Maximum and minimum Feret (caliper) diameters of a mask (px), from its outline's hull.

    The outline runs on the boundary between pixel centres, so a w × h block of pixels has
    minimum Feret min(w, h); the maximum is the hull's longest chord (its corners are cut by
    half a pixel, so slightly under hypot(w, h)).
    """
    s = outline_shape(mask)
    return s.feret_max, s.feret_min


def corner_features(mask: np.ndarray, inscribed_radius: float | None = None) -> tuple[int, float]:
    """Number of corners of a mask's outline and their sharpness.

    The outline is resampled at 1 px arc-length steps and lightly smoothed (removes the pixel
    staircase); the turning angle per step is smoothed with a Gaussian (sigma 1.5 % of the
    perimeter, at least 1 px) into a curvature. A corner is a curvature peak (above 1.8 × the
    curvature of a circle of the same perimeter, peaks at least 8 % of the perimeter apart)
    that turns the outline by at least 25° more than such a circle would over the stretch where
    the curvature stays above 1.2 × a circle's (at most a quarter of the perimeter either side).
    Sharpness is ``1 - r_corner / r_inscribed`` (``r_corner = 1 / peak curvature``), averaged
    over the corners: near 1 for sharp cube or triangle vertices, lower as they round off; 0
    without corners. Outlines shorter than 12 px have no corners. Limitation: the ends of
    elongated ellipses (aspect ratio above about 1.4) also count as corners.

    Parameters
    ----------
    mask : ndarray of bool
    inscribed_radius : float, optional
        Radius of the largest disc inside the mask (px); by default the maximum of the
        mask's Euclidean distance transform.

    Returns
    -------
    corners : int
    sharpness : float
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        return 0, 0.0
    labels = mask.astype(np.int32)
    ol = _geometry.trace_outlines(labels, 1, np.zeros((2, 2), np.int64))
    fig = _geometry.outline_figures(ol)
    if inscribed_radius is None:
        r_in = lambda ids: _geometry.inscribed_radii(labels, _mask_box(mask), ids)  # noqa: E731
    else:
        r_in = lambda ids: np.full(len(ids), float(inscribed_radius))  # noqa: E731
    corners, sharpness = _geometry.corner_figures(ol, fig.perimeter, r_in)
    return int(corners[1]), float(sharpness[1])


def _lobe_diameters_px(masks: ParticleMasks) -> dict[int, list[float]]:
    """Lobe diameters (px) of every multi-lobe particle: the major axis length of each lobe's
    second-moment ellipse. A lobe cut from a fused particle is a disc truncated at the neck; its
    long axis runs parallel to the neck and spans the lobe's full diameter (this is also how
    the NanoparticlesSAM reference defines lobe size). Single-lobe particles are left out
    (their lobe diameter is the ECD)."""
    parent = masks.lobe_parent
    n_lobes = np.bincount(parent[1:], minlength=masks.n_particles + 1) if len(parent) > 1 else np.zeros(1, int)
    out: dict[int, list[float]] = {}
    lobes = masks.lobe_labels
    m = len(parent) - 1
    if m < 1:
        return out
    multi = np.zeros(m + 1, bool)
    multi[1:] = (parent[1:] > 0) & (n_lobes[parent[1:]] >= 2)
    if not multi.any():
        return out
    # central second moments of the lobes of multi-lobe particles, from exact integer pixel
    # sums (n * sum(x^2) - sum(x)^2 over n^2), as regionprops' axis_major_length = 4 sqrt(largest
    # eigenvalue)
    area, s_r, s_c, s_rr, s_cc, s_rc = _RowRuns.of(lobes).pixel_sums(m, keep=multi)
    a2 = np.where(area > 0, area * area, 1).astype(np.float64)
    srr = (area * s_rr - s_r * s_r) / a2
    scc = (area * s_cc - s_c * s_c) / a2
    src = (area * s_rc - s_r * s_c) / a2
    l1 = (srr + scc) / 2 + np.sqrt(((srr - scc) / 2) ** 2 + src**2)
    for k in np.flatnonzero(multi):
        if area[k] == 0:
            continue
        d = float(4.0 * np.sqrt(l1[k])) if area[k] > 2 else float(np.sqrt(4.0 * area[k] / np.pi))
        out.setdefault(int(parent[k]), []).append(d)
    return out


@dataclass(frozen=True)
class _RowRuns:
    """Runs of equal non-zero label along the rows of a label image."""

    label: np.ndarray  # int64, per run
    row: np.ndarray
    col0: np.ndarray  # first column
    count: np.ndarray  # length (px)

    @classmethod
    def of(cls, labels: np.ndarray) -> _RowRuns:
        h, w = labels.shape
        new_run = np.ones((h, w), bool)
        new_run[:, 1:] = labels[:, 1:] != labels[:, :-1]
        start = np.flatnonzero(new_run)
        stop = np.append(start[1:], labels.size)  # exclusive; runs never cross a row end
        lab = labels.ravel()[start].astype(np.int64)
        fg = lab > 0
        start, stop, lab = start[fg], stop[fg], lab[fg]
        row, col0 = np.divmod(start, w)
        return cls(lab, row, col0, stop - start)

    def pixel_sums(self, n: int, keep: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """Pixel count and sums of row, column, row², column², row x column of every label.

        Closed forms per run, in exact integer arithmetic. Arrays are indexed by label 0..n;
        ``keep`` (bool per label) limits the sums to some labels (the others get 0).
        """
        sel = slice(None) if keep is None else keep[self.label]
        lab, r, c0, count = self.label[sel], self.row[sel], self.col0[sel], self.count[sel]
        c1 = c0 + count - 1
        sum_c = (c0 + c1) * count // 2
        sum_cc = (c1 * (c1 + 1) * (2 * c1 + 1) - (c0 - 1) * c0 * (2 * c0 - 1)) // 6

        def total(values: np.ndarray) -> np.ndarray:
            # float64 sums of integers below 2**53 are exact
            return np.rint(np.bincount(lab, weights=values, minlength=n + 1)[: n + 1]).astype(np.int64)

        return total(count), total(r * count), total(sum_c), total(r * r * count), total(sum_cc), total(r * sum_c)

    def bounding_boxes(self, n: int) -> np.ndarray:
        """(r0, c0, r1, c1) of every label 0..n, ends exclusive (zeros for absent labels)."""
        box = np.zeros((n + 1, 4), np.int64)
        big = np.iinfo(np.int64).max
        lo_r, lo_c = np.full(n + 1, big), np.full(n + 1, big)
        np.minimum.at(lo_r, self.label, self.row)
        np.minimum.at(lo_c, self.label, self.col0)
        np.maximum.at(box[:, 2], self.label, self.row + 1)
        np.maximum.at(box[:, 3], self.label, self.col0 + self.count)
        present = box[:, 2] > 0
        box[present, 0], box[present, 1] = lo_r[present], lo_c[present]
        return box
