"""Per-particle measurements, in nanometres where the pixel size is known.

:func:`measure_particles` turns :class:`~qcloop.records.ParticleMasks` into one table row per
particle. Every column is listed, with its unit, in :data:`PARTICLE_COLUMNS`. When the image has
no pixel size (source ``none``) the ``*_nm`` / ``*_nm2`` columns are NaN and the ``*_px``
columns carry the sizes.

Shape descriptors are computed on the particle mask with scikit-image's ``regionprops``; what no
library offers is written here: minimum Feret diameter (rotating calipers on the convex hull of
the pixel corners), corner count and corner sharpness (from the curvature of the outline) and
lobe diameters (major axis of each lobe of a fused particle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.signal import find_peaks
from scipy.spatial import ConvexHull, QhullError
from skimage import measure

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
        One row per particle, columns exactly :data:`PARTICLE_COLUMNS` in that order.
    """
    labels = masks.labels
    intensity = image.intensity()
    if labels.shape != intensity.shape:
        raise ValueError(f"mask shape {labels.shape} differs from the analysed region {intensity.shape}")
    n = masks.n_particles
    if n == 0:
        return pd.DataFrame({c: pd.Series(dtype=_dtype(c)) for c in PARTICLE_COLUMNS})
    moments = _moments(labels, intensity, n)
    lobe_diams = _lobe_diameters_px(masks)
    rows = []
    for pid, sl in enumerate(ndi.find_objects(labels, max_label=n), start=1):
        if sl is None:
            continue
        crop = labels[sl] == pid
        r0, c0, r1, c1 = sl[0].start, sl[1].start, sl[0].stop, sl[1].stop
        area = float(moments["area"][pid])
        ecd = float(np.sqrt(4.0 * area / np.pi))
        shape = outline_shape(crop)
        diams = lobe_diams.get(pid) or [ecd]
        rows.append({
            "image": image.name,
            "particle_id": pid,
            "centroid_x_px": float(moments["cx"][pid]),
            "centroid_y_px": float(moments["cy"][pid]),
            "bbox_r0": r0, "bbox_c0": c0, "bbox_r1": r1, "bbox_c1": c1,
            "area_px": area,
            "ecd_px": ecd,
            "perimeter_px": shape.perimeter,
            "feret_max_px": shape.feret_max,
            "feret_min_px": shape.feret_min,
            "circularity": float(min(1.0, 4.0 * np.pi * area / shape.perimeter**2)) if shape.perimeter > 0 else 0.0,
            "solidity": shape.solidity,
            "eccentricity": float(moments["eccentricity"][pid]),
            "aspect_ratio": float(moments["aspect_ratio"][pid]),
            "orientation_deg": float(moments["orientation_deg"][pid]),
            "mean_intensity": float(moments["mean_intensity"][pid]),
            "corners": shape.corners,
            "corner_sharpness": shape.corner_sharpness,
            "lobes": len(diams),
            "lobe_diameter_px": float(np.mean(diams)),
            "_lobe_diams_px": diams,
            "touches_border": bool(masks.touches_border[pid]) if pid < len(masks.touches_border) else False,
        })
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame({c: pd.Series(dtype=_dtype(c)) for c in PARTICLE_COLUMNS})
    nm = image.pixel_size.nm
    for px_col, (nm_col, power) in _NM_OF_PX.items():
        table[nm_col] = table[px_col] * nm**power if nm is not None else np.nan
    scale = nm if nm is not None else 1.0
    table["lobe_diameters_nm"] = [";".join(f"{d * scale:.2f}" for d in ds) for ds in table["_lobe_diams_px"]]
    return table[list(PARTICLE_COLUMNS)]


def _dtype(column: str) -> str:
    if column in ("image", "lobe_diameters_nm"):
        return "object"
    if column == "touches_border":
        return "bool"
    if column in ("particle_id", "corners", "lobes", "bbox_r0", "bbox_c0", "bbox_r1", "bbox_c1"):
        return "int64"
    return "float64"


def _moments(labels: np.ndarray, intensity: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Area, centroid, mean intensity and second-moment ellipse of every label at once.

    Arrays are indexed by label (index 0 = background). The ellipse matches scikit-image's
    regionprops (eigenvalues of the central second moments): eccentricity sqrt(1 - l2/l1),
    aspect ratio sqrt(l1/l2), orientation of the major axis in degrees counter-clockwise from
    the x axis (rows point down, so y = -row), in [0, 180).
    """
    flat = labels.ravel()
    rr, cc = np.indices(labels.shape, dtype=np.float64)
    rr, cc = rr.ravel(), cc.ravel()

    def total(w: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(flat, weights=w, minlength=n + 1)[: n + 1]

    area = total()
    safe = np.where(area > 0, area, 1.0)
    cy, cx = total(rr) / safe, total(cc) / safe
    mi = total(intensity.ravel().astype(np.float64)) / safe
    drr = total(rr * rr) / safe - cy**2
    dcc = total(cc * cc) / safe - cx**2
    drc = total(rr * cc) / safe - cy * cx
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


@dataclass(frozen=True)
class OutlineShape:
    """Shape figures of one binary mask from its outline (px)."""

    perimeter: float
    solidity: float
    feret_max: float
    feret_min: float
    corners: int
    corner_sharpness: float


def _polygon_area(y: np.ndarray, x: np.ndarray) -> float:
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def outline_shape(mask: np.ndarray) -> OutlineShape:
    """Perimeter, solidity, Feret diameters and corners of a mask, from one traced outline.

    The outline is the 0.5 iso-contour of the mask (marching squares), i.e. the boundary
    between pixel centres inside and outside. Perimeter = its length; solidity = the area it
    encloses over the area of its convex hull (1 for any convex shape); Feret max = the largest
    distance between hull vertices; Feret min = rotating calipers (smallest width over the
    hull's edge directions). Corners: see :func:`corner_features`.
    """
    contour = _outer_contour(mask)
    if contour is None:
        side = float(np.sqrt(mask.sum()))
        return OutlineShape(4 * side, 1.0, side * np.sqrt(2), side, 0, 0.0)
    y, x = contour[:, 0], contour[:, 1]
    perimeter = float(np.hypot(np.diff(y, append=y[0]), np.diff(x, append=x[0])).sum())
    pts = np.stack([y, x], 1)
    try:
        hull = pts[ConvexHull(pts).vertices]
    except (QhullError, ValueError):
        ext = pts.max(0) - pts.min(0)
        return OutlineShape(perimeter, 1.0, float(np.hypot(*ext)), float(ext.min()), 0, 0.0)
    hull_area = _polygon_area(hull[:, 0], hull[:, 1])
    solidity = float(min(1.0, _polygon_area(y, x) / hull_area)) if hull_area > 0 else 1.0
    fmax, fmin = _calipers(hull)
    corners, sharpness = _corners_from_contour(contour, lambda: _inscribed_radius(mask))
    return OutlineShape(perimeter, solidity, fmax, fmin, corners, sharpness)


def _outer_contour(mask: np.ndarray) -> np.ndarray | None:
    """Longest 0.5 iso-contour of the mask (rows, cols in mask coordinates), open (no repeat)."""
    contours = measure.find_contours(np.pad(mask, 1).astype(np.float32), 0.5)
    if not contours:
        return None
    c = max(contours, key=len)
    if len(c) < 4:
        return None
    return (c[:-1] if _same_point(c[0], c[-1]) else c) - 1.0


def _same_point(a: np.ndarray, b: np.ndarray) -> bool:
    """``np.allclose(a, b)`` for two finite 2-vectors, without its overhead."""
    return (abs(float(a[0]) - float(b[0])) <= 1e-8 + 1e-5 * abs(float(b[0]))
            and abs(float(a[1]) - float(b[1])) <= 1e-8 + 1e-5 * abs(float(b[1])))


def _calipers(hull: np.ndarray) -> tuple[float, float]:
    d = hull[:, None, :] - hull[None, :, :]
    fmax = float(np.sqrt((d**2).sum(-1)).max())
    edges = np.roll(hull, -1, axis=0) - hull
    lengths = np.hypot(edges[:, 0], edges[:, 1])
    ok = lengths > 0
    if not ok.any():
        return fmax, 0.0
    normals = np.stack([-edges[ok, 1], edges[ok, 0]], 1) / lengths[ok, None]
    proj = hull @ normals.T  # (n_vertices, n_edges)
    return fmax, float((proj.max(0) - proj.min(0)).min())


def feret_diameters(mask: np.ndarray) -> tuple[float, float]:
    """Maximum and minimum Feret (caliper) diameters of a mask (px), from its outline's hull.

    The outline runs on the boundary between pixel centres, so a w × h block of pixels has
    minimum Feret min(w, h); the maximum is the hull's longest chord (its corners are cut by
    half a pixel, so slightly under hypot(w, h)).
    """
    s = outline_shape(mask)
    return s.feret_max, s.feret_min


def _inscribed_radius(mask: np.ndarray) -> float:
    return float(ndi.distance_transform_edt(np.pad(mask, 1)).max())


def corner_features(mask: np.ndarray, inscribed_radius: float | None = None) -> tuple[int, float]:
    """Number of corners of a mask's outline and their sharpness (see :func:`_corners_from_contour`)."""
    contour = _outer_contour(mask)
    if contour is None:
        return 0, 0.0
    r_in = inscribed_radius if inscribed_radius is not None else _inscribed_radius(mask)
    return _corners_from_contour(contour, r_in)


def _corners_from_contour(contour: np.ndarray, r_in: float | Callable[[], float]) -> tuple[int, float]:
    """Corners from the curvature along the outline.

    The outline is resampled at 1 px arc-length steps and lightly smoothed (removes the pixel
    staircase); the turning angle per step is smoothed with a Gaussian (sigma 1.5 % of the
    perimeter, at least 1 px) into a curvature. A corner is a curvature peak (above 1.8 × the
    curvature of a circle of the same perimeter) that turns the outline by at least 25° more than
    such a circle would over the stretch where the curvature stays above 1.2 × a circle's.
    Sharpness is ``1 - r_corner / r_inscribed`` (``r_corner = 1 / peak curvature``), averaged
    over the corners: near 1 for sharp cube or triangle vertices, lower as they round off; 0
    without corners. ``r_in`` (the inscribed radius, px) may be a callable returning it; it
    is then only called when the outline has curvature peaks. Limitation: the ends of elongated ellipses (aspect ratio above about 1.4)
    also count as corners.
    """
    closed = np.vstack([contour, contour[:1]])
    seg = np.hypot(*np.diff(closed, axis=0).T)
    perimeter = float(seg.sum())
    if perimeter < 12:
        return 0, 0.0
    s = np.concatenate([[0.0], np.cumsum(seg)])
    n = int(round(perimeter))
    t = np.linspace(0, perimeter, n, endpoint=False)
    y = ndi.gaussian_filter1d(np.interp(t, s, closed[:, 0]), 1.0, mode="wrap")
    x = ndi.gaussian_filter1d(np.interp(t, s, closed[:, 1]), 1.0, mode="wrap")
    theta = np.arctan2(np.roll(y, -1) - y, np.roll(x, -1) - x)
    turn = np.mod(np.diff(np.concatenate([theta, theta[:1]])) + np.pi, 2 * np.pi) - np.pi
    kappa = ndi.gaussian_filter1d(turn, max(1.0, 0.015 * n), mode="wrap")  # rad per px of arc
    if kappa.sum() < 0:
        kappa = -kappa
    base = 2 * np.pi / n
    # peaks on the circular signal: tile three times and keep those in the middle copy
    tiled = np.concatenate([kappa, kappa, kappa])
    peaks, _ = find_peaks(tiled, height=1.8 * base, distance=max(2, int(0.08 * n)))
    peaks = peaks[(peaks >= n) & (peaks < 2 * n)] - n
    sharp = []
    if peaks.size and callable(r_in):  # the inscribed radius is only needed for corners
        r_in = r_in()
    for p in peaks:
        lo = p
        while kappa[(lo - 1) % n] > 1.2 * base and (p - lo) < n // 4:
            lo -= 1
        hi = p
        while kappa[(hi + 1) % n] > 1.2 * base and (hi - p) < n // 4:
            hi += 1
        excess = float((kappa[np.arange(lo, hi + 1) % n] - base).sum())
        if excess >= np.radians(25.0):
            r_corner = 1.0 / float(kappa[p])
            sharp.append(float(np.clip(1.0 - r_corner / r_in, 0.0, 1.0)) if r_in > 0 else 0.0)
    if not sharp:
        return 0, 0.0
    return len(sharp), float(np.mean(sharp))


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
    # second moments of the lobes of multi-lobe particles only (two passes: centroid, then
    # central moments), as regionprops' axis_major_length = 4 sqrt(largest eigenvalue)
    rr, cc = np.nonzero(multi[lobes])
    lab = lobes[rr, cc]
    rr, cc = rr.astype(float), cc.astype(float)
    area = np.bincount(lab, minlength=m + 1).astype(float)
    safe = np.where(area > 0, area, 1.0)
    cy = np.bincount(lab, weights=rr, minlength=m + 1) / safe
    cx = np.bincount(lab, weights=cc, minlength=m + 1) / safe
    dr, dc = rr - cy[lab], cc - cx[lab]
    srr = np.bincount(lab, weights=dr * dr, minlength=m + 1) / safe
    scc = np.bincount(lab, weights=dc * dc, minlength=m + 1) / safe
    src = np.bincount(lab, weights=dr * dc, minlength=m + 1) / safe
    l1 = (srr + scc) / 2 + np.sqrt(((srr - scc) / 2) ** 2 + src**2)
    for k in np.flatnonzero(multi):
        if area[k] == 0:
            continue
        d = float(4.0 * np.sqrt(l1[k])) if area[k] > 2 else float(np.sqrt(4.0 * area[k] / np.pi))
        out.setdefault(int(parent[k]), []).append(d)
    return out
