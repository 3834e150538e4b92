"""Lobe grouping: which segmented regions are lobes of one fused particle (dumbbell, trimer).

A segmenter's region may be a whole particle, one lobe of a fused particle, several fused lobes
in one piece, or a piece of a lobe. Each lobe of a fused particle is close to a disc; the part
of its outline facing the background is a circular arc, and where two lobes meet the image
shows a faint, darker *seam*. The grouping runs in three steps, all relative to the typical
lobe radius ``r`` of the image (the median largest inscribed radius of the regions):

1. **Split regions into lobes**. Holes enclosed by one region are filled, and with
   ``LobesConfig.dim_lobes`` lobe-sized dim background blobs wedged between regions are added
   (:func:`recover_dim_lobes`). One circle is fitted to the part of every region's outline that
   faces the background (points near a pixel where two regions touch, or near the image edge,
   left out). Where it fits worse than a disc's outline does, 2 and 3 circles are
   fitted (k-means on the outline points from three starts, one of them the circle through most
   of the outline: a big lobe with a small one beside it); they replace the single circle when
   they fit much better and make plausible lobes (arc support, size, centres inside and apart,
   each owning a fair share of the pixels, the discs inside the region). The region is split
   along the circles' radical lines (the chord through the intersections of two overlapping
   circles: the neck); split-off parts are examined again (chains of lobes)
   (:func:`split_by_circles`). All regions are fitted at once (batched
   algebraic fits refined by Gauss-Newton steps), so the cost is a few array passes. Parts too
   large for one disc are then cut along a dark straight seam at a neck (:func:`split_by_seams`).
2. **Describe every pair of neighbouring lobes** (:func:`lobe_pair_features`): lobes that
   touch, or face each other across a gap of at most ``LobesConfig.max_gap`` x ``r`` (the
   segmenter often leaves a thin gap along a seam):

   * ``gap``: narrowest gap between the two over ``r`` (0 when they touch);
   * ``neck``: half the width of their contact (the stretch of the contact no more than 1 px
     wider than its narrowest point; where they touch, also a gap 1 px wide about as bright
     as the lobes: a seam the segmenter left partly open) over the smaller lobe's inscribed
     radius; about 0.9 across a fused neck, 0.5 at the contact of two touching particles;
   * ``contrast``: how much darker the contact (where the lobes are closest) is than the two
     lobes (their median grey), over the grey range of all lobes; a faint seam gives about
     0.1, touching particles 0.3;
   * ``line_contrast``: the same for the darkest point between the lobe centroids (seam or gap
     between two lobes: about 0.2 and more; two pieces of one lobe: about 0);
   * ``overlap``: distance of the lobes' fitted circle centres over the sum of their radii;
     about 0.6 for fused lobes, 1 for touching spheres;
   * ``same_region``: 1 when both lobes come from one segmented region.

3. **Decide** with a logistic model on these features, :data:`FUSE_MODEL` (are two lobes one
   particle?): lobes fuse where its log-odds (:func:`fuse_logit`) reach
   ``LobesConfig.fuse_score`` and the neck is at least ``min_neck``, best pair first, and no
   particle grows beyond ``max_lobes``. A third lobe joins a pair that is unmistakably one
   particle (fused across a neck of log-odds at least ``clear_pair_score``) at the lower
   ``third_lobe_score`` where it continues the chain (the angle at the lobe it joins between
   the other two lobes' centroids is at least ``third_lobe_angle``): a trimer's middle lobe
   often meets one end across a narrow, darker neck. A lobe beside the pair's neck (a
   neighbouring particle, or the other half of a lobe split along the particle's axis), lobes
   that are not yet part of a clear pair, and growth beyond three lobes still need
   ``fuse_score``. The gap between fused lobes becomes part of the particle; a recovered dim
   blob that fuses with nothing is dropped.

:func:`exterior_circle`, :func:`fit_circle` and :func:`fit_circles` are also useful on their
own (circles fitted to lobe outlines).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from qcloop._binary import cross_opening, cut_pixels, dilate_square
from qcloop.config import LobesConfig
from qcloop.records import ParticleMasks, Segmentation, SemImage

__all__ = [
    "FUSE_MODEL",
    "Circle",
    "border_flags",
    "exterior_circle",
    "fill_enclosed_holes",
    "fit_circle",
    "fit_circles",
    "fuse_logit",
    "group_lobes",
    "lobe_circles",
    "lobe_pair_features",
    "lobe_radius_px",
    "recover_dim_lobes",
    "split_by_circles",
    "split_by_seams",
]

#: An arc needs this many outline points to get a circle of its own.
_MIN_ARC_POINTS = 8
#: A circle needs this much angular support (radians) to describe a lobe's outline.
_MIN_COVERAGE = np.deg2rad(110.0)
#: ... and this much to count as one lobe of a split region.
_MIN_SPLIT_COVERAGE = np.deg2rad(70.0)
#: k circles replace fewer ones when their RMS residual is below this fraction of the best fewer.
_RMS_GAIN = 0.4
#: ... and 3 circles replace 2 when below this fraction of their RMS residual.
_RMS_GAIN_MORE = 0.6
#: A lobe has at least this fraction of the area of a disc of the typical lobe radius.
_MIN_LOBE_AREA = 0.3
#: Offsets closer than 2.5 px: a pixel is at least 2.5 px inside a mask where all of them are in it.
_INNER_2_5 = np.hypot(*np.mgrid[-2:3, -2:3]) < 2.5
#: One circle describes an outline whose RMS residual is at most this fraction of the typical lobe radius.
_ONE_CIRCLE_RMS = 0.05
#: The largest of a split's circles has at least this fraction of its disc inside the region.
_MIN_BIG_INSIDE = 0.75
#: A background gap pixel pair counts as part of a seam when it is at most this much (fraction
#: of the lobes' grey range) darker than the two lobes.
_OPEN_SEAM_DARKNESS = 0.2


@dataclass(frozen=True)
class Circle:
    """A circle in image coordinates (px): centre row ``cy``, column ``cx``, radius ``r``.

    ``rms`` is the fit's root-mean-square radial residual (px); ``coverage`` the angle (rad)
    of the outline that supports it (``2 pi`` for a full outline, 0 for an equivalent circle).
    """

    cy: float
    cx: float
    r: float
    rms: float = 0.0
    coverage: float = 0.0


# ============================================================================ circle fits
def _solve3(mat: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve many 3 x 3 linear systems (Cramer's rule); rows of NaN where a system is singular.

    Parameters
    ----------
    mat : ndarray, shape (n, 3, 3)
    rhs : ndarray, shape (n, 3)

    Returns
    -------
    ndarray, shape (n, 3)
    """
    a, b, c = mat[:, 0, 0], mat[:, 0, 1], mat[:, 0, 2]
    d, e, f = mat[:, 1, 0], mat[:, 1, 1], mat[:, 1, 2]
    g, h, i = mat[:, 2, 0], mat[:, 2, 1], mat[:, 2, 2]
    co_a, co_b, co_c = e * i - f * h, f * g - d * i, d * h - e * g
    det = a * co_a + b * co_b + c * co_c
    scale = np.abs(mat).reshape(len(mat), -1).max(axis=1) if len(mat) else np.zeros(0)
    ok = np.abs(det) > 1e-12 * np.maximum(scale, 1e-300) ** 3
    det = np.where(ok, det, 1.0)
    r0, r1, r2 = rhs[:, 0], rhs[:, 1], rhs[:, 2]
    x0 = (co_a * r0 + (c * h - b * i) * r1 + (b * f - c * e) * r2) / det
    x1 = (co_b * r0 + (a * i - c * g) * r1 + (c * d - a * f) * r2) / det
    x2 = (co_c * r0 + (b * g - a * h) * r1 + (a * e - b * d) * r2) / det
    out = np.stack([x0, x1, x2], axis=1)
    out[~ok] = np.nan
    return out


def _fit_circle_groups(group: np.ndarray, y: np.ndarray, x: np.ndarray, n: int, iterations: int = 3,
                       with_rms: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares circle through the points of each group ``0..n-1``, all groups at once.

    The algebraic (Kasa) fit, a linear least-squares problem, starts; ``iterations``
    Gauss-Newton steps on the radial residual remove its bias towards small circles on short
    arcs.

    Parameters
    ----------
    group : ndarray of int, shape (p,)
        Group of every point, in ``0..n-1``.
    y, x : ndarray of float, shape (p,)
        Point rows and columns, px.
    n : int
        Number of groups.
    iterations : int
        Gauss-Newton steps after the algebraic fit.
    with_rms : bool
        False: skip the residual (``rms`` all NaN).

    Returns
    -------
    cy, cx, r, rms : ndarray of float, shape (n,)
        Centre, radius and RMS radial residual (px); NaN for groups with fewer than 3 points,
        (nearly) collinear points or a failed fit.
    """
    group = np.asarray(group, np.intp)
    cnt = np.bincount(group, minlength=n).astype(float)
    safe = np.maximum(cnt, 1.0)
    my = np.bincount(group, y, n) / safe
    mx = np.bincount(group, x, n) / safe
    u = x - mx[group]
    v = y - my[group]
    z = u * u + v * v

    def gsum(w: np.ndarray) -> np.ndarray:
        return np.bincount(group, weights=w, minlength=n)

    su, sv = gsum(u), gsum(v)
    mat = np.empty((n, 3, 3))
    mat[:, 0, 0], mat[:, 0, 1], mat[:, 0, 2] = gsum(u * u), gsum(u * v), su
    mat[:, 1, 0], mat[:, 1, 1], mat[:, 1, 2] = mat[:, 0, 1], gsum(v * v), sv
    mat[:, 2, 0], mat[:, 2, 1], mat[:, 2, 2] = su, sv, cnt
    # Kasa: u^2 + v^2 + D u + E v + F = 0 in the least-squares sense
    sol = _solve3(mat, -np.stack([gsum(u * z), gsum(v * z), gsum(z)], axis=1))
    cu, cv = -sol[:, 0] / 2.0, -sol[:, 1] / 2.0
    r2 = cu * cu + cv * cv - sol[:, 2]
    ok = (cnt >= 3) & np.isfinite(r2) & (r2 > 0)
    r = np.sqrt(np.where(ok, r2, 1.0))
    cu, cv = np.where(ok, cu, 0.0), np.where(ok, cv, 0.0)
    for _ in range(iterations):
        du, dv = u - cu[group], v - cv[group]
        dist = np.maximum(np.hypot(du, dv), 1e-9)
        res = dist - r[group]
        ju, jv = -du / dist, -dv / dist  # d(dist)/d(cu), d(dist)/d(cv); d(res)/d(r) = -1
        sju, sjv = gsum(ju), gsum(jv)
        jtj = np.empty((n, 3, 3))
        jtj[:, 0, 0], jtj[:, 0, 1], jtj[:, 0, 2] = gsum(ju * ju), gsum(ju * jv), -sju
        jtj[:, 1, 0], jtj[:, 1, 1], jtj[:, 1, 2] = jtj[:, 0, 1], gsum(jv * jv), -sjv
        jtj[:, 2, 0], jtj[:, 2, 1], jtj[:, 2, 2] = -sju, -sjv, cnt
        step = _solve3(jtj, -np.stack([gsum(ju * res), gsum(jv * res), -gsum(res)], axis=1))
        good = ok & np.all(np.isfinite(step), axis=1)
        cu = np.where(good, cu + step[:, 0], cu)
        cv = np.where(good, cv + step[:, 1], cv)
        r = np.where(good, r + step[:, 2], r)
        ok &= r > 0
        r = np.where(ok, r, 1.0)
    if with_rms:
        res = np.hypot(u - cu[group], v - cv[group]) - r[group]
        rms = np.sqrt(gsum(res * res) / safe)
    else:
        rms = np.full(n, np.nan)
    spread = np.sqrt(gsum(z) / safe)  # RMS distance of the points from their mean
    ok &= r <= 100.0 * np.maximum(spread, 0.5)  # else a straight line, not an arc
    nan = np.full(n, np.nan)
    return (np.where(ok, cv + my, nan), np.where(ok, cu + mx, nan), np.where(ok, r, nan),
            np.where(ok, rms, nan))


def _group_coverage(group: np.ndarray, angles: np.ndarray, n: int) -> np.ndarray:
    """Per group: the angle (rad) its directions span, ``2 pi`` minus the largest gap between
    sorted angles (0 for groups with fewer than 2 points)."""
    group = np.asarray(group, np.intp)
    a = np.mod(np.nan_to_num(angles), 2 * np.pi)
    order = np.lexsort((a, group))
    g, a = group[order], a[order]
    cnt = np.bincount(g, minlength=n)
    start = np.concatenate([[0], np.cumsum(cnt)[:-1]])
    gap = np.zeros(n)
    if g.size > 1:
        same = g[1:] == g[:-1]
        np.maximum.at(gap, g[1:][same], np.diff(a)[same])
    has = cnt > 0
    wrap = a[start[has]] + 2 * np.pi - a[start[has] + cnt[has] - 1]
    gap[has] = np.maximum(gap[has], wrap)
    cov = 2 * np.pi - gap
    cov[cnt < 2] = 0.0
    return cov


def fit_circle(y: np.ndarray, x: np.ndarray, iterations: int = 4) -> Circle | None:
    """Least-squares circle through points (algebraic fit refined geometrically).

    Parameters
    ----------
    y, x : ndarray of float, shape (n,)
        Point rows and columns, px; n >= 3.
    iterations : int
        Gauss-Newton steps after the algebraic (Kasa) start.

    Returns
    -------
    Circle or None
        None when the points are (nearly) collinear.
    """
    y = np.asarray(y, float)
    x = np.asarray(x, float)
    if y.size < 3:
        return None
    cy, cx, r, rms = _fit_circle_groups(np.zeros(y.size, np.intp), y, x, 1, iterations)
    if not np.isfinite(r[0]):
        return None
    cov = _group_coverage(np.zeros(y.size, np.intp), np.arctan2(y - cy[0], x - cx[0]), 1)
    return Circle(cy=float(cy[0]), cx=float(cx[0]), r=float(r[0]), rms=float(rms[0]), coverage=float(cov[0]))


def _group_rank(region: np.ndarray, key: np.ndarray, cnt: np.ndarray) -> np.ndarray:
    """Rank (0, 1, ...) of every point within its region by ``key`` (ties in point order);
    ``cnt``: the number of points of every region (int)."""
    start = np.concatenate([[0], np.cumsum(cnt)[:-1]])
    order = np.lexsort((key, region))
    rank = np.empty(region.size, np.intp)
    rank[order] = np.arange(region.size) - start[region[order]]
    return rank


def _kmeans_starts(region: np.ndarray, y: np.ndarray, x: np.ndarray, n: int, k: int, iterations: int = 6,
                   dominant: np.ndarray | None = None) -> list[tuple[np.ndarray, ...]]:
    """``k`` circles per region fitted to its outline points, all regions at once, from three starts.

    k-means-like: start from a partition of each region's points, fit a circle to each part,
    give every point to the circle it lies closest to, refit, repeat. The starts: ``k`` slices
    of equal point counts along the major axis; slices of equal length (a small middle lobe
    has few outline points); the points on the circle that fits most of the outline (a trimmed
    fit: one big lobe) against the rest.

    Parameters
    ----------
    region : ndarray of int, shape (p,)
        Region (``0..n-1``) of every point.
    y, x : ndarray of float, shape (p,)
    n, k : int
        Number of regions, circles per region.
    iterations : int
        Most k-means rounds.
    dominant : ndarray of bool, shape (p,), optional
        :func:`_trimmed_inliers` of the points (computed when not given).

    Returns
    -------
    list of tuples, one per start, each:
    cy, cx, r, coverage : ndarray, shape (n * k,)
        Circle ``j`` of region ``i`` is entry ``i * k + j``; NaN where a fit failed.
    rms : ndarray, shape (n,)
        RMS over each region's points of the residual to their nearest circle.
    ok : ndarray of bool, shape (n,)
        Every circle of the region has at least ``_MIN_ARC_POINTS`` points and a finite fit.
    """
    region = np.asarray(region, np.intp)
    cnt = np.bincount(region, minlength=n).astype(float)
    safe = np.maximum(cnt, 1.0)
    dy = y - (np.bincount(region, y, n) / safe)[region]
    dx = x - (np.bincount(region, x, n) / safe)[region]
    syy = np.bincount(region, dy * dy, n)
    sxx = np.bincount(region, dx * dx, n)
    sxy = np.bincount(region, dx * dy, n)
    theta = 0.5 * np.arctan2(2 * sxy, sxx - syy)  # major axis of the points
    t = dx * np.cos(theta)[region] + dy * np.sin(theta)[region]
    # start 1: slices of equal point counts
    rank = _group_rank(region, t, cnt.astype(np.intp))
    by_count = np.minimum((rank * k) // np.maximum(cnt[region], 1).astype(np.intp), k - 1)
    # start 2: slices of equal length along the axis
    tmin = np.full(n, np.inf)
    tmax = np.full(n, -np.inf)
    np.minimum.at(tmin, region, t)
    np.maximum.at(tmax, region, t)
    frac = (t - tmin[region]) / np.maximum(tmax - tmin, 1e-9)[region]
    by_length = np.minimum((frac * k).astype(np.intp), k - 1)
    # start 3: one lobe's circle (trimmed fit to the points it fits best), the rest split
    # along the axis (a small lobe adds a short arc to a big lobe's outline)
    if dominant is None:
        dominant = _trimmed_inliers(region, y, x, n)
    rest = np.minimum((t > 0).astype(np.intp) * (k - 2), k - 2) + 1
    by_dominant = np.where(dominant, 0, rest)
    return [_kmeans_from(region, y, x, n, k, part, iterations) for part in (by_count, by_length, by_dominant)]


def _kmeans_circles(region: np.ndarray, y: np.ndarray, x: np.ndarray, n: int, k: int, iterations: int = 6
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The lowest-residual fit of :func:`_kmeans_starts` for every region (same arguments and
    results as one of its fits)."""
    best = None
    for fit in _kmeans_starts(region, y, x, n, k, iterations):
        if best is None:
            best = fit
            continue
        better = fit[5] & (~best[5] | (fit[4] < best[4]))
        sel = np.repeat(better, k)
        best = tuple(np.where(sel, f, b) for f, b in zip(fit[:4], best[:4])) + (
            np.where(better, fit[4], best[4]), best[5] | fit[5])
    return best


def _trimmed_inliers(region: np.ndarray, y: np.ndarray, x: np.ndarray, n: int, keep: float = 0.6,
                     rounds: int = 2) -> np.ndarray:
    """Points on the circle that fits most of each region's outline: a circle is fitted to all
    points, then refitted ``rounds`` times to the fraction ``keep`` of points closest to it;
    points within 1.5 px (or twice the last fit's RMS) of it are returned True."""
    region = np.asarray(region, np.intp)
    cnt = np.bincount(region, minlength=n)
    use = np.ones(region.size, bool)
    res = np.zeros(region.size)
    rms = np.zeros(n)
    for _ in range(rounds + 1):
        grp = np.where(use, region, n)  # group n: left out
        cy, cx, r, rms = (a[:n] for a in _fit_circle_groups(grp, y, x, n + 1, iterations=2))
        res = np.abs(np.hypot(y - cy[region], x - cx[region]) - r[region])
        res = np.where(np.isfinite(res), res, np.inf)
        use = _group_rank(region, res, cnt) < keep * cnt[region]
    return res <= np.maximum(1.5, 2.0 * np.nan_to_num(rms, nan=0.0))[region]


def _kmeans_from(region: np.ndarray, y: np.ndarray, x: np.ndarray, n: int, k: int, part: np.ndarray,
                 iterations: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """k-means circle fit from a given start (``part``: circle 0..k-1 of every point)."""
    base = region * k
    part = part.copy()
    act = np.arange(region.size)  # points of the regions whose partition still changes
    for _ in range(iterations):
        if act.size == 0:
            break
        ya, xa, ba = y[act], x[act], base[act]
        cy, cx, r, _ = _fit_circle_groups(ba + part[act], ya, xa, n * k, iterations=0, with_rms=False)
        res = np.stack([np.abs(np.hypot(ya - cy[ba + j], xa - cx[ba + j]) - r[ba + j]) for j in range(k)])
        new = np.argmin(np.where(np.isfinite(res), res, np.inf), axis=0)
        moved = np.zeros(n, bool)
        moved[region[act][new != part[act]]] = True
        part[act] = new
        act = act[moved[region[act]]]
    grp = base + part
    cy, cx, r, _ = _fit_circle_groups(grp, y, x, n * k, iterations=3, with_rms=False)
    res2 = np.stack([(np.hypot(y - cy[base + j], x - cx[base + j]) - r[base + j]) ** 2 for j in range(k)])
    res2 = np.where(np.isfinite(res2), res2, np.inf)
    best = res2.min(axis=0)
    safe = np.maximum(np.bincount(region, minlength=n), 1)
    rms = np.sqrt(np.bincount(region, np.where(np.isfinite(best), best, 0.0), n) / safe)
    own = np.bincount(grp, minlength=n * k).reshape(n, k)
    ok = (own.min(axis=1) >= _MIN_ARC_POINTS) & np.all(np.isfinite(r.reshape(n, k)), axis=1)
    rms = np.where(ok, rms, np.inf)
    cov = _group_coverage(grp, np.arctan2(y - cy[grp], x - cx[grp]), n * k)
    return cy, cx, r, cov, rms, ok


def fit_circles(y: np.ndarray, x: np.ndarray, k: int, iterations: int = 6) -> list[Circle] | None:
    """Fit ``k`` circles to outline points (k-means-like: assign each point to the circle it
    lies closest to, refit, repeat). Three starts are tried (slices of equal point counts and
    of equal length along the points' major axis; the circle through most of the points
    against the rest) and the fit with the lowest residual kept.

    Parameters
    ----------
    y, x : ndarray of float, shape (n,)
        Outline points (rows, columns), px.
    k : int
        Number of circles.

    Returns
    -------
    list of Circle or None
        None when a circle gets fewer than 8 points or a fit degenerates. ``rms`` of each
        circle is over its own points.
    """
    y = np.asarray(y, float)
    x = np.asarray(x, float)
    if y.size < k * _MIN_ARC_POINTS:
        return None
    cy, cx, r, cov, _, ok = _kmeans_circles(np.zeros(y.size, np.intp), y, x, 1, k, iterations)
    if not ok[0]:
        return None
    d = np.abs(np.hypot(y[None, :] - cy[:, None], x[None, :] - cx[:, None]) - r[:, None])
    owner = np.argmin(d, axis=0)
    rms = [float(np.sqrt(np.mean(d[j, owner == j] ** 2))) if np.any(owner == j) else 0.0 for j in range(k)]
    return [Circle(float(cy[j]), float(cx[j]), float(r[j]), rms[j], float(cov[j])) for j in range(k)]


# ============================================================================ label geometry
def _neighbour_diff(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal and vertical 4-neighbour pairs with different labels (bool, shapes
    (H, W-1) and (H-1, W))."""
    return labels[:, :-1] != labels[:, 1:], labels[:-1, :] != labels[1:, :]


def _boundary_mask(labels: np.ndarray) -> np.ndarray:
    """Region pixels with a 4-neighbour of another label (background included) or on the
    image edge."""
    fg = labels > 0
    h, v = _neighbour_diff(labels)
    out = np.zeros(labels.shape, bool)
    out[:, :-1] |= h
    out[:, 1:] |= h
    out[:-1, :] |= v
    out[1:, :] |= v
    out[0, :] = out[-1, :] = True
    out[:, 0] = out[:, -1] = True
    return out & fg


@dataclass(frozen=True)
class _Geometry:
    """Distances of one label image, from one Euclidean distance transform (:func:`_geometry`).

    Attributes
    ----------
    dist : ndarray of float, shape (H, W)
        Inside a region: distance (px) to the region's own outline (the nearest pixel of the
        region that touches another label or the image edge). In the background: distance to
        the nearest region pixel.
    dist_bg : ndarray of float, shape (H, W)
        ``dist`` in the background, 0 inside regions.
    nearest : ndarray of int, shape (H, W)
        Flat index of that nearest outline pixel: ``labels.ravel()[nearest]`` extends every
        label into the background (each background pixel gets the closest region's label).
    """

    dist: np.ndarray
    dist_bg: np.ndarray
    nearest: np.ndarray


def _geometry(labels: np.ndarray) -> _Geometry:
    """Distances of a label image (see :class:`_Geometry`)."""
    boundary = _boundary_mask(labels)
    if not boundary.any():
        dist = np.zeros(labels.shape)
        nearest = np.arange(labels.size).reshape(labels.shape)
    else:
        dist, ind = ndi.distance_transform_edt(~boundary, return_indices=True)
        nearest = ind[0] * labels.shape[1] + ind[1]
    return _Geometry(dist=dist, dist_bg=np.where(labels > 0, 0.0, dist), nearest=nearest)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..n in the order of their values (0 stays background), as int32."""
    labels = np.asarray(labels)
    top = int(labels.max()) if labels.size else 0
    if labels.size and int(labels.min()) < 0:
        raise ValueError("labels must not be negative")
    if top > 4 * labels.size + 1000:  # sparse huge values: not worth a lookup table
        uniq, inv = np.unique(labels, return_inverse=True)
        out = inv.reshape(labels.shape).astype(np.int32)
        return out if uniq[0] == 0 else out + 1
    present = np.bincount(labels.ravel(), minlength=top + 1) > 0
    present[0] = False
    lut = np.cumsum(present).astype(np.int32)
    lut[0] = 0
    return lut[labels]


def _extend(labels: np.ndarray, geo: _Geometry) -> np.ndarray:
    """Labels with every background pixel given the label of the nearest region pixel."""
    return np.where(labels > 0, labels, labels.ravel()[geo.nearest])


def _label_max(labels: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Largest non-negative ``values`` over the pixels of every label 0..n (0 for label 0 and
    labels without pixels)."""
    fg = labels > 0
    out = np.zeros(n + 1)
    np.maximum.at(out, labels[fg], values[fg])
    return out


def lobe_radius_px(labels: np.ndarray, dist: np.ndarray | None = None) -> float:
    """Typical lobe radius of an image: median over regions of the largest inscribed radius.

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)
        Regions (or lobes) 1..n, 0 = background.
    dist : ndarray of float, optional
        Distance of every region pixel to its region's outline (computed when not given).

    Returns
    -------
    float
        Radius in px (at least 1; 1 for an empty image).
    """
    fg = labels > 0
    if not fg.any():
        return 1.0
    if dist is None:
        dist = ndi.distance_transform_edt(~_boundary_mask(labels))
    best = _label_max(labels, dist, int(labels.max()))
    best = best[1:][np.bincount(labels[fg], minlength=len(best))[1:] > 0]
    return float(max(np.median(best) + 1.0, 1.0))


def fill_enclosed_holes(labels: np.ndarray, max_area: float) -> np.ndarray:
    """Fill background holes enclosed by a single region with that region's label.

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)
    max_area : float
        Larger holes (px) stay background.

    Returns
    -------
    ndarray, same shape and dtype
        A hole is a 4-connected background component that does not reach the image edge and
        whose 4-neighbours all belong to one region.
    """
    bg = labels == 0
    comp, n = ndi.label(bg)
    if n == 0:
        return labels
    size = np.bincount(comp.ravel(), minlength=n + 1)
    small = size <= max_area
    small[0] = False
    small[np.concatenate([comp[0], comp[-1], comp[:, 0], comp[:, -1]])] = False  # open to the edge
    if not small.any():
        return labels
    # the smallest and largest region label next to each small component: one region if equal
    lo = np.full(n + 1, np.iinfo(np.int64).max)
    hi = np.zeros(n + 1, np.int64)
    hole = small[comp]
    fg = labels > 0
    for sl_a, sl_b in (((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
                       ((slice(None, -1), slice(None)), (slice(1, None), slice(None)))):
        for s0, s1 in ((sl_a, sl_b), (sl_b, sl_a)):
            sel = hole[s0] & fg[s1]
            ca, cb = comp[s0][sel], labels[s1][sel]
            np.minimum.at(lo, ca, cb)
            np.maximum.at(hi, ca, cb)
    fill = small & (hi > 0) & (lo == hi)
    if not fill.any():
        return labels
    out = labels.copy()
    sel = hole & fill[comp]
    out[sel] = hi[comp[sel]]
    return out


def recover_dim_lobes(labels: np.ndarray, grey: np.ndarray, r_typ: float) -> np.ndarray:
    """Add lobes the segmenter left as background: dim blobs wedged between regions.

    The small middle lobe of a trimer can be as dim as the substrate, and a threshold then
    leaves it out. Where the substrate is visible (at least 2 % of the image lies farther than
    ``r_typ`` from every region), background at least about as bright as the substrate's median
    (less 15 % of the gap up to the regions' median grey) is opened by 2 px (thin links cut);
    its pieces of a lobe's size (0.3 to 1.5 x ``pi r_typ**2``) that touch two or more regions
    become new regions. The fuse step decides whether they belong to their neighbours.

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)
    grey : ndarray of float, shape (H, W)
        Denoised intensity, bright particles.
    r_typ : float
        Typical lobe radius (px).

    Returns
    -------
    ndarray
        ``labels`` with the new regions numbered after the existing ones.
    """
    fg = labels > 0
    reach = max(1, int(round(r_typ)))
    far = ~dilate_square(fg, reach)
    if far.mean() < 0.02 or not fg.any():
        return labels
    substrate = float(np.median(grey[far]))
    level = float(np.median(grey[fg]))
    cand = ~fg & (grey >= substrate - 0.15 * max(level - substrate, 0.0))
    cand = cross_opening(cand, 2)
    comp, n = ndi.label(cand)
    if n == 0:
        return labels
    area = np.bincount(comp.ravel(), minlength=n + 1)
    disc = np.pi * r_typ**2
    ok = (area >= 0.3 * disc) & (area <= 1.5 * disc)
    ok[0] = False
    if not ok.any():
        return labels
    # regions within 2 px of each candidate
    grown = ndi.maximum_filter(np.where(ok[comp], comp, 0), size=5)
    sel = fg & (grown > 0)
    pairs = np.unique(grown[sel].astype(np.int64) * (int(labels.max()) + 1) + labels[sel])
    n_nb = np.bincount(pairs // (int(labels.max()) + 1), minlength=n + 1)
    keep = ok & (n_nb >= 2)
    if not keep.any():
        return labels
    new_id = np.zeros(n + 1, labels.dtype)
    new_id[keep] = int(labels.max()) + 1 + np.arange(int(keep.sum()))
    out = labels.copy()
    add = keep[comp]
    out[add] = new_id[comp[add]]
    return out


def _contacts(ext: np.ndarray, geo: _Geometry, gap_px: float, intensity: np.ndarray) -> dict[str, np.ndarray]:
    """Every 4-neighbour pixel pair where two labels meet once each is extended into the
    background (``ext``: :func:`_extend` of the labels), with the gap width there: the pixels'
    distances to their regions added (0 where the labels touch). Pairs wider than ``gap_px``
    are left out.

    Returns a dict of arrays, one entry per contact: ``a < b`` (labels), ``w`` (gap, px),
    ``y, x`` (midpoint), and ``v`` (mean intensity of the two pixels).
    """
    dbg = geo.dist_bg
    out: dict[str, list[np.ndarray]] = {"a": [], "b": [], "w": [], "y": [], "x": [], "v": []}
    for axis in (1, 0):
        if axis == 1:
            e0, e1, d0, d1 = ext[:, :-1], ext[:, 1:], dbg[:, :-1], dbg[:, 1:]
        else:
            e0, e1, d0, d1 = ext[:-1, :], ext[1:, :], dbg[:-1, :], dbg[1:, :]
        w = d0 + d1
        sel = (e0 != e1) & (e0 > 0) & (e1 > 0) & (w <= gap_px)
        rr, cc = np.nonzero(sel)
        la, lb = e0[sel], e1[sel]
        out["a"].append(np.minimum(la, lb))
        out["b"].append(np.maximum(la, lb))
        out["w"].append(w[sel])
        if axis == 1:
            out["y"].append(rr.astype(float))
            out["x"].append(cc + 0.5)
            out["v"].append(0.5 * (intensity[rr, cc] + intensity[rr, cc + 1]))
        else:
            out["y"].append(rr + 0.5)
            out["x"].append(cc.astype(float))
            out["v"].append(0.5 * (intensity[rr, cc] + intensity[rr + 1, cc]))
    return {k: np.concatenate(v) for k, v in out.items()}


def _outline_points(labels: np.ndarray, clearance: float, which: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Outline points of regions that face the background away from any neighbour.

    A point sits on the pixel edge between a region pixel and a background pixel. Points
    within ``clearance`` px (Chebyshev) of a pixel where two regions touch or of the image
    edge are left out: near a cut or neck the outline bends into the corner and is not on the
    lobe's circle.

    Parameters
    ----------
    which : ndarray of bool, shape (n + 1,), optional
        Only regions with ``which[label]`` True.

    Returns
    -------
    label, y, x : ndarray
        Region label and position (px) of every point.
    """
    # region pixels touching another region, and the image edge: everything near them is "not clear"
    blocked = cut_pixels(labels)
    blocked[0, :] = blocked[-1, :] = True
    blocked[:, 0] = blocked[:, -1] = True
    reach = int(np.ceil(clearance))
    near = dilate_square(blocked, reach)
    h, v = _neighbour_diff(labels)
    labs, ys, xs = [], [], []
    for axis, diff in ((1, h), (0, v)):
        if axis == 1:
            l0, l1 = labels[:, :-1], labels[:, 1:]
        else:
            l0, l1 = labels[:-1, :], labels[1:, :]
        for inside, outside, side in ((l0, l1, 0), (l1, l0, 1)):
            sel = diff & (inside > 0) & (outside == 0)
            rr, cc = np.nonzero(sel)
            pr, pc = (rr, cc) if side == 0 else ((rr, cc + 1) if axis == 1 else (rr + 1, cc))
            keep = ~near[pr, pc]
            lab = inside[sel][keep]
            if which is not None:
                keep2 = which[lab]
                lab = lab[keep2]
            else:
                keep2 = slice(None)
            rr, cc = rr[keep][keep2], cc[keep][keep2]
            labs.append(lab)
            if axis == 1:
                ys.append(rr.astype(float))
                xs.append(cc + 0.5)
            else:
                ys.append(rr + 0.5)
                xs.append(cc.astype(float))
    return np.concatenate(labs), np.concatenate(ys), np.concatenate(xs)


def _clearance(r_typ: float) -> float:
    return max(2.0, 0.15 * r_typ)


def _gap_px(r_typ: float, max_gap: float) -> float:
    return max(1.0, max_gap * r_typ)


# ============================================================================ splitting
def _plausible_lobes(cy: np.ndarray, cx: np.ndarray, r: np.ndarray, r_eq: np.ndarray, labels_sub: np.ndarray,
                     lobes: np.ndarray, pr: np.ndarray, pc: np.ndarray, pix_reg: np.ndarray, px_area: float,
                     r_typ: float) -> np.ndarray:
    """Which regions' ``k`` circles (arrays of shape (n, k)) make plausible lobes.

    Each circle is sized like a lobe of the region (0.3 to 1.5 x its equivalent radius
    ``r_eq``), centred inside it and apart from the others (by half the smaller radius), owns
    (power diagram) at least ``_MIN_LOBE_AREA`` of a typical lobe's disc of the region's pixels
    (``pr, pc``, region index ``pix_reg``; a sample, each pixel standing for ``px_area``), and
    has at least half its disc inside the region, the largest at least ``_MIN_BIG_INSIDE`` of
    it (a lobe is not wider than its particle). ``labels_sub``: the regions' labels in
    ``lobes`` (the label image, same coordinates as the circles).
    """
    n, k = r.shape
    height, width = lobes.shape
    valid = np.all((r >= 0.3 * r_eq[:, None]) & (r <= 1.5 * r_eq[:, None]), axis=1)
    iy = np.clip(np.round(np.nan_to_num(cy)).astype(np.intp), 0, height - 1)
    ix = np.clip(np.round(np.nan_to_num(cx)).astype(np.intp), 0, width - 1)
    valid &= np.all((lobes[iy, ix] == labels_sub[:, None]) & np.isfinite(cy), axis=1)
    for i in range(k):
        for j in range(i + 1, k):
            sep = np.hypot(cy[:, i] - cy[:, j], cx[:, i] - cx[:, j])
            valid &= sep >= 0.5 * np.minimum(r[:, i], r[:, j])
    if not valid.any():
        return valid
    on = valid[pix_reg]
    pr, pc, pix_reg = pr[on], pc[on], pix_reg[on]
    power = np.stack([(pr - cy[pix_reg, j]) ** 2 + (pc - cx[pix_reg, j]) ** 2 - r[pix_reg, j] ** 2
                      for j in range(k)])
    owner = np.argmin(np.where(np.isfinite(power), power, np.inf), axis=0)
    owned = px_area * np.bincount(pix_reg * k + owner, minlength=n * k).reshape(n, k)
    valid &= owned.min(axis=1) >= _MIN_LOBE_AREA * np.pi * r_typ**2
    inside = px_area * np.stack([np.bincount(pix_reg, power[j] <= 0, n) for j in range(k)], axis=1) / (np.pi * r**2)
    big = np.argmax(np.nan_to_num(r), axis=1)
    valid &= (inside[np.arange(n), big] >= _MIN_BIG_INSIDE) & np.all(inside >= 0.5, axis=1)
    return valid


def split_by_circles(lobes: np.ndarray, max_k: int = 3, candidates: np.ndarray | None = None, *,
                     geometry: _Geometry | None = None, r_typ: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split lobes whose background-facing outline is two or more circles, not one.

    Each lobe's outline facing the background gets one circle fitted; where that fits worse
    than a disc's outline (RMS above ``max(0.8, 0.05 r)`` px, ``r`` the typical lobe radius),
    ``k = 2..max_k`` circles are fitted (k-means from three starts, see :func:`fit_circles`)
    and the best start kept that fits much better (RMS below 0.4 x the single circle's, 0.6 x
    the 2 circles' for 3) and makes plausible lobes: each circle supported by at least 70
    degrees of arc, sized like a lobe of the region (0.3 to 1.5 x its equivalent radius),
    centred inside it and apart from the others, owning at least 0.3 x a typical lobe's disc
    of its pixels and at least half its disc inside it (the largest circle 3/4). 3 circles are
    not tried where 2 fit like one disc. The lobe is then split along the circles' radical
    lines (power diagram: the chord through the intersections of two overlapping circles). A
    lobe no larger than 1.2 x its largest inscribed disc is one disc and is not examined.

    Parameters
    ----------
    lobes : ndarray of int, shape (H, W)
    max_k : int
        Most circles tried per lobe.
    candidates : ndarray of int, optional
        Only these lobe labels are examined (default: all).
    geometry, r_typ
        Precomputed distances (only ``dist`` is read) and typical lobe radius (internal use;
        computed from ``lobes`` when either is missing).

    Returns
    -------
    lobes : ndarray of int32, shape (H, W)
        Split lobes; a split lobe keeps its label for one part, the others get new labels
        above the previous maximum (labels are not made sequential).
    changed : ndarray of int
        Labels of every part of every lobe that was split.
    """
    out = lobes.astype(np.int32, copy=True)
    m = int(out.max())
    if m == 0 or max_k < 2:
        return out, np.zeros(0, np.int64)
    if geometry is None or r_typ is None:
        if r_typ is None:
            r_typ = lobe_radius_px(out)
        geometry = _geometry(out)
    area = np.bincount(out[out > 0], minlength=m + 1).astype(float)
    r_in = _label_max(out, geometry.dist, m) + 1.0
    cand = area > 1.2 * np.pi * r_in**2
    cand[0] = False
    if candidates is not None:
        sel = np.zeros(m + 1, bool)
        c = np.asarray(candidates, np.int64)
        sel[c[(c > 0) & (c <= m)]] = True
        cand &= sel
    if not cand.any():
        return out, np.zeros(0, np.int64)
    view = out
    if candidates is not None:  # a few parts: work in their bounding box (a view of out)
        on = cand[out]
        rows, cols = np.flatnonzero(on.any(axis=1)), np.flatnonzero(on.any(axis=0))
        pad = int(np.ceil(_clearance(r_typ))) + 2
        view = out[max(rows[0] - pad, 0): rows[-1] + pad + 1, max(cols[0] - pad, 0): cols[-1] + pad + 1]
    lab, y, x = _outline_points(view, _clearance(r_typ), cand)
    ids = np.flatnonzero(cand)  # candidate labels; index i in the batched fits
    index = np.full(m + 1, -1, np.intp)
    index[ids] = np.arange(ids.size)
    reg = index[lab]
    n = ids.size
    npts = np.bincount(reg, minlength=n)
    r_eq = np.sqrt(area[ids] / np.pi)
    rms1 = _fit_circle_groups(reg, y, x, n)[3]
    one_rms = max(0.8, _ONE_CIRCLE_RMS * r_typ)
    good_one = np.isfinite(rms1) & (rms1 <= one_rms)
    try_k = (npts >= 2 * _MIN_ARC_POINTS) & ~good_one
    if not try_k.any():
        return out, np.zeros(0, np.int64)
    # keep only the regions worth a multi-circle fit
    keep_pt = try_k[reg]
    sub = np.flatnonzero(try_k)
    reindex = np.full(n, -1, np.intp)
    reindex[sub] = np.arange(sub.size)
    reg2, y2, x2 = reindex[reg[keep_pt]], y[keep_pt], x[keep_pt]
    labels_sub = ids[sub]
    ns = sub.size
    best_rms = np.where(np.isfinite(rms1[sub]), rms1[sub], np.inf)
    best_k = np.ones(ns, int)
    best_circles: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    # every 4th pixel (2 x 2 grid) of the examined regions, for the pixel-share checks
    preg = np.full(m + 1, -1, np.intp)
    preg[labels_sub] = np.arange(ns)
    grid = preg[view[::2, ::2]]
    pr, pc = np.nonzero(grid >= 0)
    pix_reg = grid[pr, pc]
    pr, pc = 2 * pr, 2 * pc
    dominant = _trimmed_inliers(reg2, y2, x2, ns)
    need = np.ones(ns, bool)
    for k in range(2, max_k + 1):
        # regions that k - 1 circles describe as well as one circle a disc are done
        need &= ~((best_k >= 2) & (best_rms <= one_rms))
        if not need.any():
            break
        on = need[reg2]
        limit = np.where(best_k >= 2, _RMS_GAIN_MORE, _RMS_GAIN) * best_rms
        k_rms = np.full(ns, np.inf)
        for cy, cx, r, cov, rms, ok in _kmeans_starts(reg2[on], y2[on], x2[on], ns, k, dominant=dominant[on]):
            cy, cx, r, cov = (a.reshape(ns, k) for a in (cy, cx, r, cov))
            valid = need & ok & (rms < np.minimum(limit, k_rms)) & np.all(cov >= _MIN_SPLIT_COVERAGE, axis=1)
            valid &= _plausible_lobes(cy, cx, r, r_eq[sub], labels_sub, view, pr, pc, pix_reg, 4.0, r_typ)
            for i in np.flatnonzero(valid):
                best_circles[int(i)] = (cy[i], cx[i], r[i])
            k_rms = np.where(valid, rms, k_rms)
        found = np.isfinite(k_rms)
        best_rms = np.where(found, k_rms, best_rms)
        best_k = np.where(found, k, best_k)
    split = np.flatnonzero(best_k >= 2)
    if split.size == 0:
        return out, np.zeros(0, np.int64)
    kmax = int(best_k.max())
    ccy = np.full((ns, kmax), np.nan)
    ccx = np.full((ns, kmax), np.nan)
    crr = np.full((ns, kmax), np.nan)
    for i in split:
        c_y, c_x, c_r = best_circles[int(i)]
        ccy[i, : c_y.size], ccx[i, : c_x.size], crr[i, : c_r.size] = c_y, c_x, c_r
    full = np.full(m + 1, -1, np.intp)
    full[labels_sub[split]] = split
    pix_reg = full[view]
    pr, pc = np.nonzero(pix_reg >= 0)
    pix_reg = pix_reg[pr, pc]
    power = np.stack([(pr - ccy[pix_reg, j]) ** 2 + (pc - ccx[pix_reg, j]) ** 2 - crr[pix_reg, j] ** 2
                      for j in range(kmax)])
    owner = np.argmin(np.where(np.isfinite(power), power, np.inf), axis=0)
    # part 0 keeps the label; part j > 0 of split region i gets a new label
    new_label = m + 1 + np.arange(ns * kmax).reshape(ns, kmax)
    moved = owner > 0
    view[pr[moved], pc[moved]] = new_label[pix_reg[moved], owner[moved]]
    changed = [labels_sub[split]]
    for i in split:
        changed.append(new_label[i, 1: best_k[i]])
    changed_arr = np.concatenate(changed).astype(np.int64)
    return out, changed_arr


def _best_seam_chord(own: np.ndarray, grey: np.ndarray, r_typ: float, span: float,
                     min_area: float, max_chord: float, n_angles: int = 18) -> tuple[float, float, float] | None:
    """Straight chord across a piece (mask ``own``) along which the image is darkest relative
    to both sides.

    Only chords across a neck count (see the code). Every pixel of the piece at least 2.5 px
    inside its outline is binned by its signed
    distance to lines of ``n_angles`` directions (1 px bins); a chord's darkness is the mean
    grey 2 to 4 px to either side minus the mean grey on it, over ``span``. Chords leaving
    less than ``min_area`` px on one side are not considered.

    Returns
    -------
    (depth, angle, offset) or None
        ``depth`` over ``span``; the chord is ``x cos(angle) + y sin(angle) = offset`` in crop
        coordinates.
    """
    yy, xx = np.nonzero(own)
    ang = np.linspace(0.0, np.pi, n_angles, endpoint=False)
    proj = np.outer(np.cos(ang).astype(np.float32), xx.astype(np.float32))  # (A, N)
    proj += np.outer(np.sin(ang).astype(np.float32), yy.astype(np.float32))
    lo = np.floor(proj.min(axis=1))
    proj -= lo[:, None].astype(np.float32)
    key = proj.astype(np.intp)  # bin (>= 0, so truncation is floor) ...
    nb = int(key.max()) + 1
    key += (np.arange(n_angles) * nb)[:, None]  # ... of each angle
    area = np.bincount(key.ravel(), minlength=n_angles * nb).reshape(n_angles, nb)
    cum = np.cumsum(area, axis=1)
    ok_side = (cum >= min_area) & (cum[:, -1:] - cum >= min_area)
    # a neck: the chord (pixels of the piece on it) no longer than max_chord, and at least
    # 10 % narrower than the piece somewhere within 0.6 r_typ on either side
    w = max(2, int(round(0.6 * r_typ)))
    padded = np.pad(area, ((0, 0), (w, w)))
    left = padded[:, w - 1: w - 1 + nb].copy()
    right = padded[:, w + 1: w + 1 + nb].copy()
    for d in range(2, w + 1):
        np.maximum(left, padded[:, w - d: w - d + nb], out=left)
        np.maximum(right, padded[:, w + d: w + d + nb], out=right)
    valid = ok_side & (area <= 0.9 * np.minimum(left, right)) & (area <= max_chord)
    if not valid.any():
        return None
    inner = ndi.binary_erosion(own, _INNER_2_5, border_value=1)[yy, xx]  # >= 2.5 px from a zero of own
    if inner.sum() < 20:
        return None
    kin = key[:, inner]
    g = grey[yy[inner], xx[inner]]
    cnt = np.bincount(kin.ravel(), minlength=n_angles * nb).reshape(n_angles, nb).astype(float)
    tot = np.bincount(kin.ravel(), np.broadcast_to(g, kin.shape).ravel(), minlength=n_angles * nb).reshape(
        n_angles, nb)
    pad = 4
    cntp = np.pad(cnt, ((0, 0), (pad, pad)))
    totp = np.pad(tot, ((0, 0), (pad, pad)))
    side_c = sum(cntp[:, pad + d: pad + d + nb] + cntp[:, pad - d: pad - d + nb] for d in (2, 3, 4))
    side_t = sum(totp[:, pad + d: pad + d + nb] + totp[:, pad - d: pad - d + nb] for d in (2, 3, 4))
    valid &= (cnt >= 0.6 * r_typ) & (side_c >= 3.0 * r_typ)
    if not valid.any():
        return None
    depth = np.where(valid, side_t / np.maximum(side_c, 1) - tot / np.maximum(cnt, 1), -np.inf)
    i, j = np.unravel_index(np.argmax(depth), depth.shape)
    return float(depth[i, j] / span), float(ang[i]), float(lo[i] + j + 0.5)


def split_by_seams(lobes: np.ndarray, grey: np.ndarray, r_typ: float, span: float, min_depth: float = 0.05,
                   min_ratio: float = 1.4, max_chord: float = 2.4, candidates: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Cut lobes too large for one disc along the darkest straight seam across them.

    A lobe of at least ``min_ratio`` x a typical lobe's disc (``pi r_typ**2``) may hold two
    lobes whose outline barely shows it (the small middle lobe of a trimer, cut from its other
    neighbour by the segmenter). It is cut along the straight chord across a neck (no longer
    than ``max_chord`` x ``r_typ`` and 10 % narrower than the lobe within 0.6 ``r_typ`` on
    either side) that is darkest relative to the grey 2 to 4 px to either side
    (:func:`_best_seam_chord`), when that darkness reaches ``min_depth`` x ``span`` (the grey
    range of the lobes) and both parts are at least a third of a typical lobe's area.

    Parameters
    ----------
    lobes : ndarray of int, shape (H, W)
    grey : ndarray of float, shape (H, W)
        Denoised intensity, bright particles.
    r_typ, span : float
        Typical lobe radius (px); grey range of the lobes.
    candidates : ndarray of int, optional
        Only these lobe labels are examined (default: all).

    Returns
    -------
    lobes, changed : as :func:`split_by_circles`.
    """
    out = lobes.astype(np.int32, copy=True)
    slices = ndi.find_objects(out)
    nxt = int(out.max()) + 1
    changed: list[int] = []
    height, width = out.shape
    min_area = np.pi * r_typ**2 / 3.0
    area = np.bincount(out.ravel(), minlength=len(slices) + 1)
    big = np.flatnonzero(area >= min_ratio * np.pi * r_typ**2)
    if candidates is not None:
        big = np.intersect1d(big, candidates)
    for k in big[big > 0]:
        k = int(k)
        sl = slices[k - 1]
        if sl is None:
            continue
        r0, r1 = max(sl[0].start - 1, 0), min(sl[0].stop + 1, height)
        c0, c1 = max(sl[1].start - 1, 0), min(sl[1].stop + 1, width)
        own = out[r0:r1, c0:c1] == k
        best = _best_seam_chord(own, grey[r0:r1, c0:c1], r_typ, span, min_area, max_chord * r_typ)
        if best is None or best[0] < min_depth:
            continue
        _, angle, offset = best
        yy, xx = np.nonzero(own)
        far = xx * np.cos(angle) + yy * np.sin(angle) > offset
        view = out[r0:r1, c0:c1]
        view[yy[far], xx[far]] = nxt
        changed += [k, nxt]
        nxt += 1
    return out, np.array(changed, np.int64)


def _decompose(labels: np.ndarray, geo: _Geometry, r_typ: float, max_lobes: int) -> np.ndarray:
    k = max(1, min(3, max_lobes))
    if k < 2:
        return _relabel(labels)
    lobes, changed = split_by_circles(labels, k, geometry=geo, r_typ=r_typ)
    for _ in range(max(0, max_lobes - 2)):  # a split-off part may itself hold several lobes
        if changed.size == 0:
            break
        lobes, changed = split_by_circles(lobes, k, changed, geometry=geo, r_typ=r_typ)
    return _relabel(lobes)


# ============================================================================ pair features
#: Fuse model: log-odds that two neighbouring lobes are one particle,
#: ``sum(weight * feature) + bias``. See :func:`fuse_logit`.
FUSE_MODEL: dict[str, float] = {
    "neck": 5.1,
    "contrast": -4.37,
    "line_contrast": -7.36,
    "overlap": 1.19,
    "gap": 1.73,
    "same_region": 2.46,
    "bias": -0.56,
}
#: ``overlap`` used for a pair where a lobe has too little background-facing outline for a circle.
_NEUTRAL_OVERLAP = 0.85

_FEATURES = ("neck", "contrast", "line_contrast", "overlap", "gap", "same_region")


def _histogram_median(values: np.ndarray, labels: np.ndarray, m: int, bins: int = 256) -> np.ndarray:
    """Median of ``values`` (in [0, 1]) over each label 1..m, index 0 = 0.

    From a histogram per label: the mean of the values in the bin that holds the median (exact
    for flat regions, within 1/bins otherwise); much cheaper than sorting.
    """
    q = np.clip((values * bins).astype(np.intp), 0, bins - 1)
    idx = labels.astype(np.intp) * bins + q
    hist = np.bincount(idx, minlength=(m + 1) * bins).reshape(m + 1, bins)
    total = np.bincount(idx, weights=values, minlength=(m + 1) * bins).reshape(m + 1, bins)
    cum = np.cumsum(hist, axis=1)
    med = np.argmax(cum >= cum[:, -1:] / 2.0, axis=1)
    rows = np.arange(m + 1)
    out = total[rows, med] / np.maximum(hist[rows, med], 1)
    out[cum[:, -1] == 0] = 0.0
    out[0] = 0.0
    return out


def lobe_circles(lobes: np.ndarray, which: np.ndarray | None = None, *, r_typ: float | None = None) -> np.ndarray:
    """Circle fitted to each lobe's background-facing outline (see :func:`exterior_circle`).

    Parameters
    ----------
    lobes : ndarray of int, shape (H, W)
    which : ndarray of int, optional
        Only these lobe labels get a circle (the others stay NaN).
    r_typ : float, optional
        Typical lobe radius (px), which sets how far from touching pixels and the image edge
        outline points are left out; estimated from ``lobes`` when not given.

    Returns
    -------
    ndarray of float, shape (m + 1, 3)
        Row k: centre row, centre column, radius (px) of lobe k; NaN where the outline facing
        the background spans less than 110 degrees, has fewer than 8 points or the circle is
        more than twice the lobe's equivalent radius.
    """
    m = int(lobes.max())
    out = np.full((m + 1, 3), np.nan)
    if m == 0:
        return out
    if r_typ is None:
        r_typ = lobe_radius_px(lobes)
    sel = None
    if which is not None:
        sel = np.zeros(m + 1, bool)
        w = np.asarray(which, np.int64)
        sel[w[(w > 0) & (w <= m)]] = True
    lab, y, x = _outline_points(lobes, _clearance(r_typ), sel)
    if lab.size == 0:
        return out
    cy, cx, r, _ = _fit_circle_groups(lab, y, x, m + 1, with_rms=False)
    cov = _group_coverage(lab, np.arctan2(y - cy[lab], x - cx[lab]), m + 1)
    npts = np.bincount(lab, minlength=m + 1)
    area = np.bincount(lobes.ravel(), minlength=m + 1)[: m + 1]
    ok = (npts >= _MIN_ARC_POINTS) & (cov >= _MIN_COVERAGE) & np.isfinite(r)
    ok &= r <= 2.0 * np.sqrt(area / np.pi)
    ok[0] = False
    out[ok] = np.column_stack([cy, cx, r])[ok]
    return out


def exterior_circle(lobe_mask: np.ndarray, offset: tuple[int, int], labels: np.ndarray) -> Circle | None:
    """Circle fitted to the part of a lobe's outline that faces the background.

    Parameters
    ----------
    lobe_mask : ndarray of bool, shape (h, w)
        The lobe, cropped to its bounding box.
    offset : (int, int)
        Row, column of ``lobe_mask[0, 0]`` in ``labels``.
    labels : ndarray of int, shape (H, W)
        Label image in which the lobe's neighbours (sibling lobes, touching particles) are
        non-zero, so only outline facing the background is used (points near a pixel where the
        lobe touches a neighbour, or near the image edge, left out).

    Returns
    -------
    Circle or None
        None when less than 110 degrees of the outline faces the background.
    """
    h, w = lobe_mask.shape
    r0, c0 = offset
    pad = int(np.ceil(max(h, w) / 2)) + 4
    R0, C0 = max(0, r0 - pad), max(0, c0 - pad)
    R1, C1 = min(labels.shape[0], r0 + h + pad), min(labels.shape[1], c0 + w + pad)
    crop = labels[R0:R1, C0:C1].astype(np.int32, copy=True)
    crop[crop > 0] += 1  # free label 1 for the lobe
    crop[r0 - R0: r0 - R0 + h, c0 - C0: c0 - C0 + w][lobe_mask] = 1
    r_eq = float(np.sqrt(lobe_mask.sum() / np.pi))
    lab, y, x = _outline_points(crop, _clearance(r_eq), np.arange(int(crop.max()) + 1) == 1)
    if lab.size < _MIN_ARC_POINTS:
        return None
    c = fit_circle(y + R0, x + C0)
    if c is None or c.coverage < _MIN_COVERAGE or c.r > 2.0 * r_eq:
        return None
    return c


def lobe_pair_features(lobes: np.ndarray, intensity: np.ndarray, regions: np.ndarray | None = None, *,
                       r_typ: float | None = None, max_gap: float = 0.3) -> pd.DataFrame:
    """Features of every pair of neighbouring lobes (see the module docstring).

    Parameters
    ----------
    lobes : ndarray of int, shape (H, W)
        Lobe labels, 0 = background.
    intensity : ndarray of float, shape (H, W)
        Denoised grey image in [0, 1], bright particles.
    regions : ndarray of int, shape (H, W), optional
        The segmented regions the lobes come from (for ``same_region``; default: the lobes).
    r_typ : float, optional
        Typical lobe radius (px); estimated from ``lobes`` when not given.
    max_gap : float
        Lobes up to ``max_gap * r_typ`` px apart are neighbours.

    Returns
    -------
    pandas.DataFrame
        One row per pair: ``a, b`` (lobe labels, a < b), ``shared_px`` (pixel edges where they
        touch), ``gap`` (narrowest gap over ``r_typ``), ``neck``, ``contrast``,
        ``line_contrast``, ``overlap`` (NaN without circles), ``same_region`` (0/1). All
        dimensionless.
    """
    lobes = np.asarray(lobes)
    if int(lobes.max()) < 2:
        return _no_pairs()
    regions = lobes if regions is None else np.asarray(regions)
    if r_typ is None:
        r_typ = lobe_radius_px(lobes)
    return _pair_features(lobes, intensity, regions, r_typ, _geometry(regions), _gap_px(r_typ, max_gap))[0]


def _no_pairs() -> pd.DataFrame:
    """:func:`lobe_pair_features` of lobes without neighbours (no rows)."""
    return pd.DataFrame({c: [] for c in ("a", "b", "shared_px", "gap", "neck", "contrast", "line_contrast",
                                         "overlap", "same_region")})


def _grey_span(values: np.ndarray) -> float:
    """Grey range of lobe pixels: 5th to 95th percentile, at least 0.05 (flat images: no
    contrast to speak of)."""
    lo, hi = np.percentile(values, [5, 95])
    return max(float(hi - lo), 0.05)


@dataclass(frozen=True)
class _Pairs:
    """What :func:`_pair_features` finds besides the features, reused by the grouping.

    Attributes
    ----------
    contacts : dict of ndarray
        :func:`_contacts` of the lobes.
    pair : ndarray of int, shape (n_contacts,)
        Row of the features (pair of lobes) of every contact.
    ext : ndarray of int, shape (H, W)
        The lobes extended into the background (:func:`_extend`).
    gap_px : float
        Widest background gap (px) across which two lobes still count as neighbours.
    centres : ndarray of float, shape (m + 1, 2)
        Row, column of every lobe's centroid (row 0 unused).
    """

    contacts: dict[str, np.ndarray]
    pair: np.ndarray
    ext: np.ndarray
    gap_px: float
    centres: np.ndarray


def _pair_features(lobes: np.ndarray, intensity: np.ndarray, regions: np.ndarray, r_typ: float,
                   geometry: _Geometry, gap_px: float, span: float | None = None) -> tuple[pd.DataFrame, _Pairs]:
    """:func:`lobe_pair_features` of lobes ``1..m``, with ``geometry`` the distances of ``regions``,
    ``gap_px`` the widest gap of a contact and ``span`` the grey range of the lobes
    (:func:`_grey_span`, computed when not given); and what the grouping reuses."""
    m = int(lobes.max())
    fg = lobes > 0
    lab_fg = lobes[fg]
    cnt = np.bincount(lab_fg, minlength=m + 1).astype(float)
    rr, cc = np.nonzero(fg)
    com_y = np.bincount(lab_fg, rr, m + 1) / np.maximum(cnt, 1)
    com_x = np.bincount(lab_fg, cc, m + 1) / np.maximum(cnt, 1)
    ext = _extend(lobes, geometry)
    c = _contacts(ext, geometry, gap_px, intensity)
    key = c["a"].astype(np.int64) * (m + 1) + c["b"].astype(np.int64)
    uniq, inv = np.unique(key, return_inverse=True)
    pairs = _Pairs(contacts=c, pair=inv, ext=ext, gap_px=gap_px, centres=np.column_stack([com_y, com_x]))
    if uniq.size == 0:
        return _no_pairs(), pairs
    n = uniq.size
    a, b = uniq // (m + 1), uniq % (m + 1)
    w = c["w"]
    gap = np.full(n, np.inf)
    np.minimum.at(gap, inv, w)
    # where the lobes are closest: touching, or across the narrowest gap (and up to 1 px wider)
    closest = w <= gap[inv] + np.minimum(gap[inv], 1.0)
    shared = np.bincount(inv, w == 0, n)
    if span is None:
        span = _grey_span(intensity[fg])
    level = _histogram_median(np.clip(intensity[fg], 0, 1), lab_fg, m)
    mid_level = 0.5 * (level[a] + level[b])
    # the contact: where they are closest, and a gap up to 1 px wider that is about as bright as
    # the lobes (a seam the segmenter left open, not a dark crevice between touching spheres)
    bridge = closest | ((w <= gap[inv] + 1.0) & (mid_level[inv] - c["v"] <= _OPEN_SEAM_DARKNESS * span))
    nb = np.maximum(np.bincount(inv, closest, n), 1)
    contrast = (mid_level - np.bincount(inv, np.where(closest, c["v"], 0.0), n) / nb) / span
    # darkest point between the two centroids (middle 60 % of the segment)
    t = np.linspace(0.2, 0.8, 13)
    py = com_y[a][:, None] + t[None, :] * (com_y[b] - com_y[a])[:, None]
    px = com_x[a][:, None] + t[None, :] * (com_x[b] - com_x[a])[:, None]
    prof = ndi.map_coordinates(intensity, [py.ravel(), px.ravel()], order=1, mode="nearest").reshape(py.shape)
    line_contrast = (mid_level - prof.min(axis=1)) / span
    # neck: width of the contact across the line joining the centroids
    dy, dx = com_y[b] - com_y[a], com_x[b] - com_x[a]
    norm = np.maximum(np.hypot(dy, dx), 1e-9)
    ny, nx = -dx / norm, dy / norm
    proj = (c["y"] - com_y[a][inv]) * ny[inv] + (c["x"] - com_x[a][inv]) * nx[inv]
    pmax = np.full(n, -np.inf)
    pmin = np.full(n, np.inf)
    np.maximum.at(pmax, inv[bridge], proj[bridge])
    np.minimum.at(pmin, inv[bridge], proj[bridge])
    width = pmax - pmin + 1.0
    r_in = _label_max(lobes, geometry.dist, m) + 1.0
    neck = 0.5 * width / np.maximum(np.minimum(r_in[a], r_in[b]), 1e-6)
    circ = lobe_circles(lobes, np.concatenate([a, b]), r_typ=r_typ)
    overlap = np.hypot(circ[a, 0] - circ[b, 0], circ[a, 1] - circ[b, 1]) / (circ[a, 2] + circ[b, 2])
    region_of = np.zeros(m + 1, np.int64)
    region_of[lab_fg] = regions[fg]
    feats = pd.DataFrame({"a": a, "b": b, "shared_px": shared.astype(int), "gap": gap / r_typ, "neck": neck,
                          "contrast": contrast, "line_contrast": line_contrast, "overlap": overlap,
                          "same_region": (region_of[a] == region_of[b]).astype(float)})
    return feats, pairs


def _logit(features: pd.DataFrame, model: dict[str, float]) -> np.ndarray:
    ov = features["overlap"].to_numpy(float)
    ov = np.where(np.isfinite(ov), ov, _NEUTRAL_OVERLAP)
    logit = np.full(len(features), model["bias"])
    for name in _FEATURES:
        if model.get(name, 0.0) != 0.0:
            value = ov if name == "overlap" else features[name].to_numpy(float)
            logit = logit + model[name] * value
    return np.where(np.isfinite(logit), logit, -np.inf)


def fuse_logit(features: pd.DataFrame, model: dict[str, float] | None = None) -> np.ndarray:
    """Log-odds that each pair of neighbouring lobes is one particle (:data:`FUSE_MODEL`)."""
    return _logit(features, FUSE_MODEL if model is None else model)


# ============================================================================ grouping
class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)
        self.size = np.ones(n, int)

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def roots(self) -> np.ndarray:
        return np.array([self.find(k) for k in range(len(self.parent))])


def border_flags(labels: np.ndarray) -> np.ndarray:
    """``flags[k]`` is True when region k has a pixel on the outermost row or column.

    The last row of an analysed region is the banner line (or the image's bottom edge).

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)

    Returns
    -------
    ndarray of bool, shape (labels.max() + 1,)
    """
    n = int(labels.max())
    flags = np.zeros(n + 1, bool)
    if labels.size == 0:
        return flags
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    flags[np.unique(edge)] = True
    flags[0] = False
    return flags


def _bridge_gaps(lobes: np.ndarray, particle_of_lobe: np.ndarray, geo: _Geometry,
                 feats: pd.DataFrame, fused: np.ndarray, pairs: _Pairs) -> np.ndarray:
    """Lobe labels with the background gap between fused lobes that do not touch filled
    (each gap pixel gets the nearest lobe's label); ``feats`` and ``pairs`` from
    :func:`_pair_features` of the lobes with ``geo``."""
    sel = fused & (feats["shared_px"].to_numpy() == 0)
    if not sel.any():
        return lobes
    c = pairs.contacts
    on = sel[pairs.pair]
    height, width = lobes.shape
    marker = np.zeros(lobes.shape, np.int32)
    for dy, dx in ((0.0, 0.5), (0.0, -0.5), (0.5, 0.0), (-0.5, 0.0)):  # both pixels of a contact
        yy = np.round(c["y"][on] + dy).astype(np.intp)
        xx = np.round(c["x"][on] + dx).astype(np.intp)
        ok = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        marker[yy[ok], xx[ok]] = particle_of_lobe[c["a"][on][ok]]
    reach = int(np.ceil(pairs.gap_px / 2.0)) + 1
    near = ndi.maximum_filter(marker, size=2 * reach + 1)
    ext = pairs.ext
    fill = (lobes == 0) & (near > 0) & (geo.dist_bg <= pairs.gap_px / 2.0 + 1.0) & (particle_of_lobe[ext] == near)
    return np.where(fill, ext, lobes).astype(np.int32)


def _fuse_lobes(a: np.ndarray, b: np.ndarray, fuse: np.ndarray, centres: np.ndarray, cfg: LobesConfig
                ) -> tuple[np.ndarray, np.ndarray]:
    """Step 3 of the grouping: fuse lobes 1..m into particles, best pair first.

    Pair ``i`` joins lobes ``a[i]`` and ``b[i]`` at log-odds ``fuse[i]`` (-inf: never). Two
    particles merge where the log-odds reach ``cfg.fuse_score`` and the result has at most
    ``cfg.max_lobes`` lobes. A single lobe joins a two-lobe particle whose own neck reached
    ``cfg.clear_pair_score`` already at ``cfg.third_lobe_score`` when it continues the chain:
    the angle at the lobe it joins, between its centre and the pair's other lobe's centre, is at
    least ``cfg.third_lobe_angle`` (the narrow middle neck of a trimer).

    Parameters
    ----------
    centres : ndarray of float, shape (m + 1, 2)
        Row, column of every lobe's centroid (row 0 unused).

    Returns
    -------
    roots : ndarray of int, shape (m + 1,)
        Union-find root of every lobe (one per particle).
    fused : ndarray of bool, shape (len(a),)
        Pairs that are links of one particle: the pair that joined them, or a pair inside one
        particle with log-odds of at least ``fuse_score``.
    """
    m = len(centres) - 1
    uf = _UnionFind(m + 1)
    strongest = np.full(m + 1, -np.inf)  # strongest link inside each particle, at its root
    pair_of: dict[int, tuple[int, int]] = {}  # the lobes of each two-lobe particle, at its root
    fused = np.zeros(len(fuse), bool)
    floor = min(cfg.fuse_score, cfg.third_lobe_score)
    min_cos = np.cos(np.deg2rad(cfg.third_lobe_angle))
    for i in np.argsort(-fuse):
        if not fuse[i] >= floor:
            break
        ai, bi = int(a[i]), int(b[i])
        ra, rb = uf.find(ai), uf.find(bi)
        if ra == rb:
            fused[i] = fuse[i] >= cfg.fuse_score
            continue
        size = uf.size[ra] + uf.size[rb]
        need = cfg.fuse_score
        if size == 3 and fuse[i] >= cfg.third_lobe_score and max(strongest[ra], strongest[rb]) >= cfg.clear_pair_score:
            # a single lobe beside a clear pair: does it continue the chain beyond the lobe it joins?
            single, joined, pair_root = (ai, bi, rb) if uf.size[ra] == 1 else (bi, ai, ra)
            other = [k for k in pair_of[pair_root] if k != joined][0]
            u, v = centres[single] - centres[joined], centres[other] - centres[joined]
            cos = float(u @ v) / max(float(np.hypot(*u) * np.hypot(*v)), 1e-9)
            if cos <= min_cos:
                need = min(need, cfg.third_lobe_score)
        if size <= cfg.max_lobes and fuse[i] >= need:
            link = max(strongest[ra], strongest[rb], fuse[i])
            uf.union(ra, rb)
            root = uf.find(ra)
            strongest[root] = link
            if size == 2:
                pair_of[root] = (ai, bi)
            fused[i] = True
    return uf.roots(), fused


def _pieces_and_features(labels: np.ndarray, intensity: np.ndarray, cfg: LobesConfig
                         ) -> tuple[np.ndarray, int, _Geometry, _Pairs, np.ndarray, pd.DataFrame]:
    """Steps 1 and 2 of the grouping.

    Returns
    -------
    labels : ndarray of int32
        The regions, holes filled, recovered dim lobes added (labels above ``n_segmented``).
    n_segmented : int
        Number of regions from the segmenter.
    geometry : _Geometry
        Distances of ``labels``.
    pairs : _Pairs
        Contacts and centroids of the lobes (:func:`_pair_features`).
    lobes : ndarray of int32
        Lobes split from the regions (each inside one region).
    features : pandas.DataFrame
        :func:`lobe_pair_features` of the lobes.
    """
    n_segmented = int(labels.max())
    area = np.bincount(labels.ravel())[1:]
    r_area = float(np.sqrt(np.median(area[area > 0]) / np.pi))
    # holes inside one region belong to it (up to half a typical region's area)
    labels = fill_enclosed_holes(labels, 0.5 * np.pi * r_area**2)
    smoothed = ndi.gaussian_filter(np.asarray(intensity, np.float32), 1.0)
    if cfg.dim_lobes:
        labels = recover_dim_lobes(labels, smoothed, r_area)
    geo = _geometry(labels)
    r_typ = lobe_radius_px(labels, geo.dist)
    lobes = _decompose(labels, geo, r_typ, cfg.max_lobes)
    span = _grey_span(smoothed[labels > 0])  # the lobes cover the regions' pixels
    changed = None
    for _ in range(max(0, cfg.max_lobes - 1)):  # a part may hold a further seam (a chain)
        lobes, changed = split_by_seams(lobes, smoothed, r_typ, span, candidates=changed)
        if changed.size == 0:
            break
    lobes = _relabel(lobes)
    feats, pairs = _pair_features(lobes, smoothed, labels, r_typ, geo, _gap_px(r_typ, cfg.max_gap), span)
    return labels, n_segmented, geo, pairs, lobes, feats


def group_lobes(seg: Segmentation, image: SemImage, cfg: LobesConfig | None = None) -> ParticleMasks:
    """Group a segmentation's regions into particles made of one or more lobes.

    Parameters
    ----------
    seg : Segmentation
        Regions over the analysed part of ``image``.
    image : SemImage
        The image; its intensity gives the contrast across lobe boundaries.
    cfg : LobesConfig
        ``enabled=False`` makes every region one particle with one lobe.

    Returns
    -------
    ParticleMasks
        Particle and lobe label images (int32), ``lobe_parent`` and ``touches_border``.
    """
    cfg = cfg if cfg is not None else LobesConfig()
    labels = np.asarray(seg.labels)
    if labels.ndim != 2:
        raise ValueError(f"segmentation labels must be 2-D, got shape {labels.shape}")
    expected = (image.analysed_height_px, image.width_px)
    if labels.shape != expected:
        raise ValueError(f"segmentation labels have shape {labels.shape}, image analysed region is {expected}")
    labels = _relabel(labels)
    n = int(labels.max())
    if n == 0:
        z = np.zeros(labels.shape, np.int32)
        return ParticleMasks(z, z.copy(), np.zeros(1, np.int32), np.zeros(1, bool))
    if not cfg.enabled:
        return ParticleMasks(labels, labels.copy(), np.arange(n + 1, dtype=np.int32), border_flags(labels))

    labels, n_segmented, geo, pairs, lobes, feats = _pieces_and_features(labels, image.intensity(), cfg)
    m = int(lobes.max())
    recovered = np.zeros(m + 1, bool)  # lobes of dim blobs the segmenter had left out
    recovered[lobes[labels > n_segmented]] = True
    recovered[0] = False
    a = feats["a"].to_numpy()
    b = feats["b"].to_numpy()
    fuse = fuse_logit(feats)
    fuse[~(feats["neck"].to_numpy(float) >= cfg.min_neck)] = -np.inf
    roots, fused = _fuse_lobes(a, b, fuse, pairs.centres, cfg)
    # a recovered dim blob stays only as a lobe of a particle with other lobes
    alone = np.bincount(roots, weights=~recovered, minlength=m + 1) == 0
    roots = np.where(alone[roots], 0, roots)
    _, particle_of_piece = np.unique(roots, return_inverse=True)  # root 0 -> 0
    particle_of_piece = particle_of_piece.astype(np.int32)
    pieces = _bridge_gaps(lobes, particle_of_piece, geo, feats, fused, pairs)
    _, lobe_of_piece = np.unique(np.where(particle_of_piece > 0, np.arange(m + 1), 0), return_inverse=True)
    lobe_of_piece = lobe_of_piece.astype(np.int32)
    lobe_parent = np.zeros(int(lobe_of_piece.max()) + 1, np.int32)
    lobe_parent[lobe_of_piece] = particle_of_piece
    particles = particle_of_piece[pieces]
    return ParticleMasks(
        labels=particles.astype(np.int32),
        lobe_labels=lobe_of_piece[pieces],
        lobe_parent=lobe_parent,
        touches_border=border_flags(particles),
    )
