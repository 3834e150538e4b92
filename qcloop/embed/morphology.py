"""Morphology embedder: a fixed-length vector of shape and texture descriptors per particle.

No weights, no training: every number is a plain function of the particle's mask (and the grey
values under it). The vector (:data:`FEATURE_NAMES`, ``DIM`` = 49 values, float64) is

* **size**: ``log_ecd`` = natural log of the equivalent circular diameter in nm (in px when the
  image has no pixel size — a classifier trained at one unit must not be used at the other);
* **scale-free shape**: circularity ``4 pi A / L**2`` (A, L: area and length of the sub-pixel
  outline — marching squares, resampled, smoothed along its length with sigma = 1 px so that
  the pixel staircase does not depend on the particle's orientation), solidity (outline area /
  convex hull area), log aspect ratio (major / minor axis of the inertia ellipse),
  eccentricity, rectangularity (area / minimum-area bounding rectangle);
* **corners**: on that outline (128 points at equal arc length) the turning angle per point,
  lightly smoothed, summed over a window of 1/16 of the perimeter has one peak per corner. ``corners`` = number of peaks above 0.9 rad (≈ 52°), ``turn_1..4`` = the four largest
  peaks / (pi / 2), ``corner_sharpness`` = turning within 1/32 of the perimeter around the three
  largest peaks divided by the turning within 1/8 (→ 1 for knife-sharp corners, ≈ 0.3 for a
  circle);
* **lobes**: number of lobes the lobe grouping assigned to the particle (from
  :class:`~qcloop.records.ParticleMasks`, capped at 6) and smallest / largest lobe area;
* **Hu moments** of the mask's pixels, log-scaled: ``log10(|h_i|)`` (sign dropped: mirror images are the
  same particle shape), i = 1..7;
* **contour Fourier descriptors**: magnitudes of the outline's complex Fourier coefficients
  ``|Z_k| / |Z_1|`` for k = 2..8 and k = -1..-8 (invariant to translation, rotation, scale and
  start point; the traversal direction is fixed so that ``|Z_1| >= |Z_-1|``);
* **radial Fourier descriptors**: the distance from the mask centroid to the outline, divided
  by its mean, as a function of arc length: its relative standard deviation and the magnitudes
  of harmonics 1..8 (an n-fold symmetric shape peaks at harmonic n);
* **intensity texture** from :meth:`SemImage.intensity` (the analysed region scaled to [0, 1]):
  mean and standard deviation inside the particle, edge minus interior mean (the SE edge
  effect; the edge is the band from 1.5 px to ``max(3, 0.25 r)`` px inside the outline,
  r = ECD / 2 — the outermost pixel, blurred into the substrate or a contact crevice, is left
  out) and particle minus local-substrate mean (substrate: pixels within ``max(2, 0.3 r)`` px
  outside the outline that belong to no particle).

The values are *not* standardised here: :class:`qcloop.classify.Classifier` stores the training
mean and standard deviation of every column and standardises inside ``predict``. Degenerate
particles (a few pixels, no closed outline) get finite default values, never NaN.

The embedder's ``spec`` is ``"morphology-v1"``; any change of a definition above must bump it,
so that a classifier trained on the old vectors is refused (:meth:`Classifier.check_embedder`).
The figures are computed here from the masks rather than read from the particle table so that
the vector depends on nothing but this module (the table gives the row order only).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError
from skimage import measure

from qcloop.records import ParticleMasks, SemImage

N_CONTOUR = 128
"""Points of the resampled outline."""

N_FOURIER = 8
"""Harmonics kept by the contour and radial Fourier descriptors."""

MAX_LOBES = 6

SMOOTH_PX = 1.0
"""Gaussian smoothing of the outline along its arc length (px) before any outline feature."""

FEATURE_NAMES: tuple[str, ...] = (
    ("log_ecd", "circularity", "solidity", "log_aspect_ratio", "eccentricity", "rectangularity",
     "corners", "corner_sharpness", "turn_1", "turn_2", "turn_3", "turn_4",
     "lobes", "lobe_area_ratio")
    + tuple(f"hu_{i}" for i in range(1, 8))
    + tuple(f"cfd_{k}" for k in range(2, N_FOURIER + 1))
    + tuple(f"cfd_m{k}" for k in range(1, N_FOURIER + 1))
    + ("radial_sd",)
    + tuple(f"radial_{k}" for k in range(1, N_FOURIER + 1))
    + ("intensity_mean", "intensity_sd", "edge_contrast", "background_contrast")
)
DIM = len(FEATURE_NAMES)

# defaults for a particle without a usable outline: a disc
_DISC_DEFAULTS = dict(circularity=1.0, solidity=1.0, log_aspect_ratio=0.0, eccentricity=0.0,
                      rectangularity=math.pi / 4, corners=0.0, corner_sharpness=0.25,
                      turn_1=0.25, turn_2=0.25, turn_3=0.25, turn_4=0.25, lobes=1.0,
                      lobe_area_ratio=1.0, radial_sd=0.0)


def particle_ids(particles: pd.DataFrame, masks: ParticleMasks) -> np.ndarray:
    """Label of each particle-table row: the ``particle_id`` (or ``label``) column, else 1..n."""
    for col in ("particle_id", "label"):
        if col in particles.columns:
            return particles[col].to_numpy(dtype=np.int64)
    n = len(particles)
    if n != masks.n_particles:
        raise ValueError(f"particle table has {n} rows but the masks hold {masks.n_particles} particles "
                         "and the table has no particle_id column")
    return np.arange(1, n + 1, dtype=np.int64)


def _resample_closed(rc: np.ndarray, n: int) -> tuple[np.ndarray, float]:
    """Closed outline (k, 2) in (row, col) → n points (x, y) at equal arc length, and its length."""
    pts = rc[:, ::-1].astype(float)  # x = col, y = row
    if np.allclose(pts[0], pts[-1]):
        pts = pts[:-1]
    closed = np.vstack([pts, pts[:1]])
    seg = np.hypot(*np.diff(closed, axis=0).T)
    length = float(seg.sum())
    s = np.r_[0.0, np.cumsum(seg)]
    t = np.linspace(0.0, length, n, endpoint=False)
    x = np.interp(t, s, closed[:, 0])
    y = np.interp(t, s, closed[:, 1])
    return np.stack([x, y], axis=1), length


def _circular_window_sum(v: np.ndarray, half: int) -> np.ndarray:
    """Sum of ``v`` over a circular window of 2*half+1 samples centred on each sample."""
    c = np.cumsum(np.r_[v[-half:], v, v[: half + 1]])
    w = 2 * half + 1
    return c[w - 1:w - 1 + len(v)] - np.r_[0.0, c[: len(v) - 1]]


def _turning(xy: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Corners count, sharpness and the 4 largest windowed turning peaks / (pi/2)."""
    n = len(xy)
    d = np.roll(xy, -1, axis=0) - xy
    ang = np.arctan2(d[:, 1], d[:, 0])
    # turning at each vertex, wrapped into [-pi, pi); sums to ±2 pi for a simple closed outline
    dtheta = (np.roll(ang, -1) - ang + np.pi) % (2 * np.pi) - np.pi
    # light circular smoothing against pixel staircases
    dtheta = ndi.gaussian_filter1d(dtheta, 1.0, mode="wrap")
    if dtheta.sum() < 0:  # orient counter-clockwise
        dtheta = -dtheta
    mid = _circular_window_sum(dtheta, n // 32)      # window 1/16 of the perimeter
    short = _circular_window_sum(dtheta, n // 64)    # window 1/32
    long_ = _circular_window_sum(dtheta, n // 16)    # window 1/8
    # peaks with non-maximum suppression over half a window
    order = np.argsort(mid)[::-1]
    taken = np.zeros(n, bool)
    peaks: list[int] = []
    sep = n // 16  # one corner gives one peak
    for i in order:
        if taken[i]:
            continue
        peaks.append(int(i))
        idx = (np.arange(i - sep, i + sep + 1)) % n
        taken[idx] = True
        if len(peaks) >= 8:
            break
    pv = mid[peaks]
    corners = float(np.count_nonzero(pv > 0.9))
    top3 = peaks[:3]
    denom = long_[top3].sum()
    sharp = float(short[top3].sum() / denom) if denom > 1e-9 else 0.25
    top4 = np.zeros(4)
    top4[: min(4, len(pv))] = pv[:4] / (np.pi / 2)
    return corners, float(np.clip(sharp, 0.0, 1.5)), top4


def _polygon_area(xy: np.ndarray) -> float:
    return 0.5 * abs(float(np.dot(xy[:, 0], np.roll(xy[:, 1], -1)) - np.dot(xy[:, 1], np.roll(xy[:, 0], -1))))


def _hull_and_rect(xy: np.ndarray) -> tuple[float, float]:
    """Convex-hull area and minimum-area bounding rectangle (rotating calipers) of points."""
    try:
        hull = xy[ConvexHull(xy).vertices]  # counter-clockwise
    except (QhullError, ValueError):
        return 0.0, 0.0
    e = np.roll(hull, -1, axis=0) - hull
    ang = np.arctan2(e[:, 1], e[:, 0])
    c, s = np.cos(ang), np.sin(ang)
    # project hull onto every edge direction and its normal
    u = hull[:, 0][None, :] * c[:, None] + hull[:, 1][None, :] * s[:, None]
    v = -hull[:, 0][None, :] * s[:, None] + hull[:, 1][None, :] * c[:, None]
    areas = (u.max(1) - u.min(1)) * (v.max(1) - v.min(1))
    return _polygon_area(hull), float(areas.min())


def _moment_features(mask: np.ndarray) -> dict[str, float]:
    """Inertia-ellipse and Hu-moment features from the mask's pixel moments."""
    rr, cc = np.nonzero(mask)
    m00 = float(len(rr))
    x = cc - cc.mean()
    y = rr - rr.mean()
    x2, y2 = x * x, y * y
    mu20, mu02, mu11 = float(x2.sum()), float(y2.sum()), float((x * y).sum())
    mu30, mu03 = float((x2 * x).sum()), float((y2 * y).sum())
    mu21, mu12 = float((x2 * y).sum()), float((x * y2).sum())
    # inertia ellipse (as skimage.measure.regionprops: axis = 4 sqrt(eigenvalue of covariance))
    a, b, c = mu20 / m00, mu02 / m00, mu11 / m00
    root = math.sqrt(max((a - b) ** 2 / 4 + c * c, 0.0))
    l1, l2 = (a + b) / 2 + root, max((a + b) / 2 - root, 0.0)
    f: dict[str, float] = {}
    if l1 > 0:
        major, minor = 4 * math.sqrt(l1), 4 * math.sqrt(l2)
        f["log_aspect_ratio"] = min(math.log(major / minor), 3.0) if minor > 0 else 3.0
        f["eccentricity"] = math.sqrt(max(1 - l2 / l1, 0.0))
    # Hu moments of the normalised central moments
    def eta(mu: float, order: int) -> float:
        return mu / m00 ** (1 + order / 2)

    n20, n02, n11 = eta(mu20, 2), eta(mu02, 2), eta(mu11, 2)
    n30, n03, n21, n12 = eta(mu30, 3), eta(mu03, 3), eta(mu21, 3), eta(mu12, 3)
    p, q = n30 + n12, n21 + n03
    hu = (
        n20 + n02,
        (n20 - n02) ** 2 + 4 * n11 ** 2,
        (n30 - 3 * n12) ** 2 + (3 * n21 - n03) ** 2,
        p ** 2 + q ** 2,
        (n30 - 3 * n12) * p * (p ** 2 - 3 * q ** 2) + (3 * n21 - n03) * q * (3 * p ** 2 - q ** 2),
        (n20 - n02) * (p ** 2 - q ** 2) + 4 * n11 * p * q,
        (3 * n21 - n03) * p * (p ** 2 - 3 * q ** 2) - (n30 - 3 * n12) * q * (3 * p ** 2 - q ** 2),
    )
    f.update({f"hu_{i + 1}": float(np.log10(max(abs(h), 1e-30))) for i, h in enumerate(hu)})
    return f


def _shape_features(mask: np.ndarray) -> dict[str, float]:
    """Outline-based features of one particle mask (bool crop, particle not touching the crop edge)."""
    f = _moment_features(mask)

    contours = measure.find_contours(np.pad(mask, 1).astype(np.float32), 0.5)
    if not contours:
        return f
    rc = max(contours, key=len)
    if len(rc) < 5:
        return f
    xy, length = _resample_closed(rc, N_CONTOUR)
    if length <= 0:
        return f
    # smooth along the outline (sigma = 1 px of arc length) against the pixel staircase, whose
    # length depends on the particle's orientation
    sig = N_CONTOUR / length * SMOOTH_PX
    xy = np.stack([ndi.gaussian_filter1d(xy[:, i], sig, mode="wrap") for i in (0, 1)], axis=1)
    length = float(np.hypot(*np.diff(np.vstack([xy, xy[:1]]), axis=0).T).sum())
    poly_area = _polygon_area(xy)
    if length <= 0 or poly_area <= 0:
        return f
    f["circularity"] = float(min(4 * math.pi * poly_area / length ** 2, 1.2))
    hull, rect = _hull_and_rect(xy)
    f["solidity"] = float(min(poly_area / hull, 1.0)) if hull > 0 else 1.0
    f["rectangularity"] = float(min(poly_area / rect, 1.0)) if rect > 0 else math.pi / 4
    corners, sharp, top4 = _turning(xy)
    f["corners"] = corners
    f["corner_sharpness"] = sharp
    for i in range(4):
        f[f"turn_{i + 1}"] = float(top4[i])

    z = xy[:, 0] + 1j * xy[:, 1]
    Z = np.fft.fft(z) / len(z)
    if abs(Z[-1]) > abs(Z[1]):  # traverse so that the +1 harmonic dominates
        Z = np.fft.fft(z[::-1]) / len(z)
    z1 = abs(Z[1])
    if z1 > 0:
        for k in range(2, N_FOURIER + 1):
            f[f"cfd_{k}"] = float(abs(Z[k]) / z1)
        for k in range(1, N_FOURIER + 1):
            f[f"cfd_m{k}"] = float(abs(Z[-k]) / z1)

    rr, cc = np.nonzero(np.pad(mask, 1))
    cy, cx = rr.mean(), cc.mean()  # same padded frame as the contour
    r = np.hypot(xy[:, 0] - cx, xy[:, 1] - cy)
    rm = r.mean()
    if rm > 0:
        rn = r / rm
        f["radial_sd"] = float(rn.std())
        R = np.abs(np.fft.rfft(rn)) / len(rn) * 2
        for k in range(1, N_FOURIER + 1):
            f[f"radial_{k}"] = float(R[k])
    return f


class MorphologyEmbedder:
    """Shape and texture descriptors per particle (no weights).

    Call ``embedder(image, masks, particles) -> ndarray (n_particles, DIM)``, float64, rows in
    the order of ``particles`` (its ``particle_id`` column names the label in ``masks.labels``).
    See the module docstring for the definition of every column (:data:`FEATURE_NAMES`).
    """

    spec = "morphology-v1"
    feature_names = FEATURE_NAMES
    dim = DIM

    def __call__(self, image: SemImage, masks: ParticleMasks, particles: pd.DataFrame) -> np.ndarray:
        ids = particle_ids(particles, masks)
        out = np.zeros((len(ids), DIM), np.float64)
        if len(ids) == 0:
            return out
        labels = masks.labels
        n_lab = int(labels.max()) if labels.size else 0
        slices = ndi.find_objects(labels, max_label=max(n_lab, int(ids.max(initial=0))))
        intensity = image.intensity()
        if intensity.shape != labels.shape:
            intensity = intensity[: labels.shape[0], : labels.shape[1]]
        px_nm = image.pixel_size_nm
        # lobes per particle and lobe areas
        lobe_parent = np.asarray(masks.lobe_parent, np.int64)
        lobe_area = np.bincount(masks.lobe_labels.ravel(), minlength=len(lobe_parent))[: len(lobe_parent)]
        h, w = labels.shape
        for row, pid in enumerate(ids):
            f: dict[str, float] = dict(_DISC_DEFAULTS)
            sl = slices[pid - 1] if 0 < pid <= len(slices) else None
            if sl is None:
                out[row] = [f.get(name, 0.0) for name in FEATURE_NAMES]
                continue
            r0, r1 = sl[0].start, sl[0].stop
            c0, c1 = sl[1].start, sl[1].stop
            mask = labels[r0:r1, c0:c1] == pid
            area_px = float(mask.sum())
            ecd_px = math.sqrt(4 * area_px / math.pi)
            ecd = ecd_px * px_nm if px_nm else ecd_px
            f["log_ecd"] = math.log(max(ecd, 1e-6))
            if area_px >= 4:
                f.update(_shape_features(mask))
            # lobes
            mine = np.nonzero(lobe_parent == pid)[0]
            mine = mine[mine > 0]
            if len(mine):
                f["lobes"] = float(min(len(mine), MAX_LOBES))
                la = lobe_area[mine].astype(float)
                f["lobe_area_ratio"] = float(la.min() / la.max()) if la.max() > 0 else 1.0
            # intensity texture, on a crop with a margin for the substrate ring
            r_eq = ecd_px / 2
            ring = max(2.0, 0.3 * r_eq)
            m = int(math.ceil(ring)) + 1
            R0, R1, C0, C1 = max(r0 - m, 0), min(r1 + m, h), max(c0 - m, 0), min(c1 + m, w)
            lab = labels[R0:R1, C0:C1]
            inten = intensity[R0:R1, C0:C1].astype(np.float64)
            own = lab == pid
            vals = inten[own]
            f["intensity_mean"] = float(vals.mean())
            f["intensity_sd"] = float(vals.std())
            d_in = ndi.distance_transform_edt(np.pad(own, 1))[1:-1, 1:-1]
            edge_w = max(3.0, 0.25 * r_eq)
            edge = own & (d_in > 1.5) & (d_in <= edge_w)
            inner = own & (d_in > edge_w)
            if edge.any() and inner.any():
                f["edge_contrast"] = float(inten[edge].mean() - inten[inner].mean())
            d_out = ndi.distance_transform_edt(~own)
            bg = (lab == 0) & (d_out <= ring)
            if bg.any():
                f["background_contrast"] = float(vals.mean() - inten[bg].mean())
            vec = np.array([f.get(name, 0.0) for name in FEATURE_NAMES], np.float64)
            out[row] = vec
        # belt and braces: a descriptor must never be NaN/inf
        np.nan_to_num(out, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        return out
