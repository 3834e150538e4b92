"""Circles fitted to lobe outlines: one circle, ``k`` circles, every region at once.

Each lobe of a fused particle is close to a disc; the part of its outline facing the background
is a circular arc. :func:`fit_circle` fits one circle to points (the algebraic Kasa fit refined
by Gauss-Newton steps on the radial residual), :func:`fit_circles` fits ``k`` (k-means on the
points from three starts, one of them the circle through most of the points: a big lobe with a
small one beside it). The private batched versions fit every region of an image in a few array
passes (one group of points per region); :mod:`qcloop.lobes.split` uses them.
:func:`lobe_circles` and :func:`exterior_circle` fit the circle of a lobe in a label image,
from its outline facing the background only (points near a neighbour or the image edge left
out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcloop.lobes.labels import _clearance, _label_set, _outline_points, lobe_radius_px

# Tuned constants: see "Where the numbers come from" in the package docstring.
#: An arc needs this many outline points to get a circle of its own. Konstanz, by hand (e996b90).
_MIN_ARC_POINTS = 8
#: A circle needs this much angular support (radians) to describe a lobe's outline. Konstanz, by
#: hand (e996b90).
_MIN_COVERAGE = np.deg2rad(110.0)
#: A lobe's circle is at most this many times the lobe's equivalent radius (else the arc is
#: nearly straight: a cut, not a lobe). Konstanz, by hand (e996b90).
_MAX_R_OVER_EQ = 2.0
#: Gauss-Newton steps after the algebraic start in the batched fits (a short arc's Kasa circle is
#: biased small). By hand (cebfcf5).
_GN_STEPS = 3
#: Most k-means rounds of the multi-circle fits (a region stops once its partition no longer
#: changes). By hand (e996b90).
_KMEANS_ROUNDS = 6
#: Trimmed fit of the circle through most of an outline (:func:`_trimmed_inliers`): refitted
#: ``_TRIM_ROUNDS`` times to the fraction ``_TRIM_KEEP`` of points nearest it, with
#: ``_TRIM_GN_STEPS`` Gauss-Newton steps each; inliers lie within ``_INLIER_PX`` px or
#: ``_INLIER_RMS`` x its RMS residual. Konstanz trimers (a big lobe with a small one), by hand
#: (cebfcf5).
_TRIM_KEEP = 0.6
_TRIM_ROUNDS = 2
_TRIM_GN_STEPS = 2
_INLIER_PX = 1.5
_INLIER_RMS = 2.0
#: A circle larger than this many times the RMS distance of its points from their mean is a
#: straight line (numerical guard, not tuned).
_MAX_R_OVER_SPREAD = 100.0
#: A 3 x 3 system counts as singular when ``|det|`` is at most this times the cube of its largest
#: entry (relative round-off of float64 with room to spare; not tuned).
_SINGULAR = 1e-12


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


def _solve3(mat: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve many 3 x 3 linear systems (batched :func:`numpy.linalg.solve`); rows of NaN where a
    system is singular (``|det| <= 1e-12 x`` the cube of its largest entry).

    Parameters
    ----------
    mat : ndarray, shape (n, 3, 3)
    rhs : ndarray, shape (n, 3)

    Returns
    -------
    ndarray, shape (n, 3)
    """
    n = len(mat)
    if n == 0:
        return np.zeros((0, 3))
    scale = np.abs(mat).reshape(n, -1).max(axis=1)
    ok = np.abs(np.linalg.det(mat)) > _SINGULAR * np.maximum(scale, 1e-300) ** 3
    out = np.linalg.solve(np.where(ok[:, None, None], mat, np.eye(3)), rhs[..., None])[..., 0]
    out[~ok] = np.nan
    return out


def _fit_circle_groups(group: np.ndarray, y: np.ndarray, x: np.ndarray, n: int, iterations: int = _GN_STEPS,
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
    ok &= r <= _MAX_R_OVER_SPREAD * np.maximum(spread, 0.5)  # else a straight line, not an arc
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


def _kmeans_starts(region: np.ndarray, y: np.ndarray, x: np.ndarray, n: int, k: int,
                   iterations: int = _KMEANS_ROUNDS, dominant: np.ndarray | None = None
                   ) -> list[tuple[np.ndarray, ...]]:
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


def _kmeans_circles(region: np.ndarray, y: np.ndarray, x: np.ndarray, n: int, k: int,
                    iterations: int = _KMEANS_ROUNDS
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


def _trimmed_inliers(region: np.ndarray, y: np.ndarray, x: np.ndarray, n: int) -> np.ndarray:
    """Points on the circle that fits most of each region's outline: a circle is fitted to all
    points, then refitted ``_TRIM_ROUNDS`` times to the fraction ``_TRIM_KEEP`` of points closest
    to it; points within ``_INLIER_PX`` px (or ``_INLIER_RMS`` x the last fit's RMS) of it are
    returned True."""
    region = np.asarray(region, np.intp)
    cnt = np.bincount(region, minlength=n)
    use = np.ones(region.size, bool)
    res = np.zeros(region.size)
    rms = np.zeros(n)
    for _ in range(_TRIM_ROUNDS + 1):
        grp = np.where(use, region, n)  # group n: left out
        cy, cx, r, rms = (a[:n] for a in _fit_circle_groups(grp, y, x, n + 1, iterations=_TRIM_GN_STEPS))
        res = np.abs(np.hypot(y - cy[region], x - cx[region]) - r[region])
        res = np.where(np.isfinite(res), res, np.inf)
        use = _group_rank(region, res, cnt) < _TRIM_KEEP * cnt[region]
    return res <= np.maximum(_INLIER_PX, _INLIER_RMS * np.nan_to_num(rms, nan=0.0))[region]


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
    cy, cx, r, _ = _fit_circle_groups(grp, y, x, n * k, with_rms=False)
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


def fit_circles(y: np.ndarray, x: np.ndarray, k: int, iterations: int = _KMEANS_ROUNDS) -> list[Circle] | None:
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
        None when a circle gets fewer than ``_MIN_ARC_POINTS`` (8) points or a fit degenerates. ``rms`` of each
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
    sel = None if which is None else _label_set(which, m)
    lab, y, x = _outline_points(lobes, _clearance(r_typ), sel)
    if lab.size == 0:
        return out
    cy, cx, r, _ = _fit_circle_groups(lab, y, x, m + 1, with_rms=False)
    cov = _group_coverage(lab, np.arctan2(y - cy[lab], x - cx[lab]), m + 1)
    npts = np.bincount(lab, minlength=m + 1)
    area = np.bincount(lobes.ravel(), minlength=m + 1)[: m + 1]
    ok = (npts >= _MIN_ARC_POINTS) & (cov >= _MIN_COVERAGE) & np.isfinite(r)
    ok &= r <= _MAX_R_OVER_EQ * np.sqrt(area / np.pi)
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
    pad = int(np.ceil(max(h, w) / 2)) + 4  # the lobe's neighbours within its clearance
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
    if c is None or c.coverage < _MIN_COVERAGE or c.r > _MAX_R_OVER_EQ * r_eq:
        return None
    return c
