"""Lobe grouping: which segmented regions are lobes of one fused particle (dumbbell, trimer).

A segmenter's region may be a whole particle, one lobe of a fused particle, or several fused
lobes in one piece. Each lobe of a fused particle is close to a disc, and the part of its
outline facing the background is a circular arc. The grouping runs in two steps:

1. **Split regions into lobes** (:func:`decompose_lobes`). One circle is fitted to the part of
   each region's outline that faces the background (vertices next to a cut or the image edge
   left out). Where it fits badly, 2 or 3 circles are fitted (:func:`fit_circles`, a k-means on
   the outline points); they replace the single circle when they fit much better and make
   plausible lobes (arc support, size, centres inside and apart). The region is then split
   along the circles' radical lines: the chord through the intersections of two overlapping
   circles, i.e. the neck. Split-off parts are examined again (chains of lobes).
2. **Fuse touching lobes** (:func:`lobe_pair_features`, :func:`fuse_logit`). For every pair of
   lobes sharing a boundary:

   * ``neck``: widest point of the common boundary (distance map of the two lobes together,
     taken on the boundary) over the smaller lobe's inscribed radius; about 0.9 across a fused
     neck, 0.5 at the contact of two touching particles;
   * ``contrast``: how much darker the common boundary is than the lobes, over the grey range
     of all lobes; a fused neck shows a faint line (about 0.2), touching particles a gap (0.5);
   * ``line_contrast``: the same for the darkest point between the lobe centroids;
   * ``overlap``: distance of the lobes' fitted circle centres over the sum of their radii;
     about 0.6 for fused lobes, 1 for touching spheres.

   These enter a logistic model (:data:`FUSE_MODEL`); pairs whose log-odds reach
   ``LobesConfig.fuse_score`` and whose neck is at least ``min_neck`` fuse, best first, and no
   particle grows beyond ``max_lobes``.

:func:`exterior_circle` and :func:`fit_circle` are also useful on their own (circles fitted to
lobe outlines).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage import filters, measure, segmentation

from qcloop.config import LobesConfig
from qcloop.records import ParticleMasks, Segmentation, SemImage

__all__ = [
    "FUSE_MODEL",
    "Circle",
    "Outline",
    "border_flags",
    "decompose_lobes",
    "exterior_circle",
    "fit_circle",
    "fit_circles",
    "group_lobes",
    "fuse_logit",
    "lobe_circles",
    "lobe_pair_features",
    "outline",
    "split_by_circles",
]

#: An arc needs this many contour vertices to get a circle of its own.
_MIN_ARC_POINTS = 8
#: A circle needs this much angular support (radians) to count as a lobe.
_MIN_COVERAGE = np.deg2rad(110.0)


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


def fit_circle(y: np.ndarray, x: np.ndarray, iterations: int = 4) -> Circle | None:
    """Least-squares circle through points (algebraic fit refined geometrically).

    The algebraic (Kasa) fit starts; ``iterations`` Gauss-Newton steps on the radial residual
    remove its bias towards small circles on short arcs.

    Parameters
    ----------
    y, x : ndarray of float, shape (n,)
        Point rows and columns, px; n >= 3.
    iterations : int
        Gauss-Newton steps after the algebraic start.

    Returns
    -------
    Circle or None
        None when the points are (nearly) collinear.
    """
    y = np.asarray(y, float)
    x = np.asarray(x, float)
    if y.size < 3:
        return None
    my, mx = y.mean(), x.mean()
    u, v = x - mx, y - my
    # Kasa: minimise sum (u^2 + v^2 + D u + E v + F)^2 via the 3x3 normal equations
    z = u * u + v * v
    suu, svv, suv = u @ u, v @ v, u @ v
    n = float(u.size)
    mat = np.array([[suu, suv, 0.0], [suv, svv, 0.0], [0.0, 0.0, n]])
    rhs = -np.array([u @ z, v @ z, z.sum()])
    try:
        dd, ee, ff = np.linalg.solve(mat, rhs)
    except np.linalg.LinAlgError:
        return None
    cu, cv = -dd / 2.0, -ee / 2.0
    r2 = cu * cu + cv * cv - ff
    if not np.isfinite(r2) or r2 <= 0:
        return None
    r = float(np.sqrt(r2))
    for _ in range(iterations):
        du, dv = u - cu, v - cv
        dist = np.maximum(np.hypot(du, dv), 1e-9)
        res = dist - r
        ju, jv = -du / dist, -dv / dist
        suv_, su_, sv_ = ju @ jv, ju.sum(), jv.sum()
        jtj = np.array([[ju @ ju, suv_, su_], [suv_, jv @ jv, sv_], [su_, sv_, n]])
        jtr = -np.array([ju @ res, jv @ res, res.sum()])
        try:
            step = np.linalg.solve(jtj, jtr)
        except np.linalg.LinAlgError:
            break
        cu, cv, r = cu + step[0], cv + step[1], r - step[2]
        if not (np.isfinite(cu) and np.isfinite(cv) and np.isfinite(r)) or r <= 0:
            return None
        if np.abs(step).max() < 1e-3:
            break
    res = np.hypot(u - cu, v - cv) - r
    scale = max(float(u.max() - u.min()), float(v.max() - v.min()), 1.0)
    if r > 50.0 * scale:  # a straight line, not an arc
        return None
    ang = np.arctan2(v - cv, u - cu)
    return Circle(cy=float(cv + my), cx=float(cu + mx), r=float(r), rms=float(np.sqrt(np.mean(res**2))),
                  coverage=_coverage(ang))


def _coverage(angles: np.ndarray) -> float:
    """Angle (rad) spanned by directions: 2 pi minus the largest gap between sorted angles."""
    if angles.size < 2:
        return 0.0
    a = np.sort(np.mod(angles, 2 * np.pi))
    gaps = np.diff(np.concatenate([a, a[:1] + 2 * np.pi]))
    return float(2 * np.pi - gaps.max())


@dataclass(frozen=True)
class Outline:
    """Outer contour of one region, with what lies beyond each vertex.

    Attributes
    ----------
    y, x : ndarray of float, shape (n,)
        Contour vertices (rows, columns; px, image coordinates), on the pixel edges between
        the region and its outside, in order around the region (closed: not repeated).
    outside : ndarray of int, shape (n,)
        Label (in the label image passed to :func:`outline`) of the pixel just outside each
        vertex: 0 background, > 0 another region, -1 beyond the image edge.
    """

    y: np.ndarray
    x: np.ndarray
    outside: np.ndarray

    @property
    def exterior(self) -> np.ndarray:
        """Vertices facing the background (not another region, not the image edge)."""
        return self.outside == 0


def outline(mask: np.ndarray, offset: tuple[int, int], labels: np.ndarray) -> Outline | None:
    """Outer contour of a single region.

    Parameters
    ----------
    mask : ndarray of bool, shape (h, w)
        The region, cropped (its bounding box).
    offset : (int, int)
        Row and column of ``mask[0, 0]`` in the full label image.
    labels : ndarray of int, shape (H, W)
        Full label image, to tell background from neighbouring regions beyond the contour.

    Returns
    -------
    Outline or None
        None for regions too small to have a contour.
    """
    padded = np.pad(mask, 1).astype(np.float32)
    contours = measure.find_contours(padded, 0.5)
    if not contours:
        return None
    c = max(contours, key=len)
    if len(c) < 4:
        return None
    c = c[:-1] if _same_point(c[0], c[-1]) else c
    yy, xx = c[:, 0], c[:, 1]
    # the two pixels each vertex sits between; the one outside the mask is "beyond"
    y0, y1 = np.floor(yy).astype(int), np.ceil(yy).astype(int)
    x0, x1 = np.floor(xx).astype(int), np.ceil(xx).astype(int)
    in0 = padded[y0, x0] > 0.5
    oy = np.where(in0, y1, y0)
    ox = np.where(in0, x1, x0)
    gy = oy - 1 + offset[0]
    gx = ox - 1 + offset[1]
    height, width = labels.shape
    inside_img = (gy >= 0) & (gy < height) & (gx >= 0) & (gx < width)
    beyond = np.full(yy.shape, -1, np.int64)
    beyond[inside_img] = labels[gy[inside_img], gx[inside_img]]
    y = yy - 1 + offset[0]
    x = xx - 1 + offset[1]
    return Outline(y=y, x=x, outside=beyond)


def _same_point(a: np.ndarray, b: np.ndarray) -> bool:
    """``np.allclose(a, b)`` for two finite 2-vectors, without its overhead."""
    return (abs(float(a[0]) - float(b[0])) <= 1e-8 + 1e-5 * abs(float(b[0]))
            and abs(float(a[1]) - float(b[1])) <= 1e-8 + 1e-5 * abs(float(b[1])))


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
        non-zero, so only background-facing vertices are used.

    Returns
    -------
    Circle or None
        None when less than about 110 degrees of the outline faces the background.
    """
    ol = outline(lobe_mask, offset, labels)
    if ol is None:
        return None
    ext = ol.exterior
    if ext.sum() < _MIN_ARC_POINTS:
        return None
    c = fit_circle(ol.y[ext], ol.x[ext])
    if c is None or c.coverage < _MIN_COVERAGE:
        return None
    r_eq = np.sqrt(lobe_mask.sum() / np.pi)
    if c.r > 2.0 * r_eq:
        return None
    return c


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


def fit_circles(y: np.ndarray, x: np.ndarray, k: int, iterations: int = 6) -> list[Circle] | None:
    """Fit ``k`` circles to outline points (k-means-like: assign each point to the circle it
    lies closest to, refit, repeat), starting from ``k`` slices along the points' major axis.

    Parameters
    ----------
    y, x : ndarray of float, shape (n,)
        Outline points (rows, columns), px.
    k : int
        Number of circles.

    Returns
    -------
    list of Circle or None
        None when a group gets too few points or a fit degenerates. ``rms`` of each circle is
        over its own points.
    """
    n = y.size
    if n < k * _MIN_ARC_POINTS:
        return None
    pts = np.column_stack([y - y.mean(), x - x.mean()])
    _, vec = np.linalg.eigh(np.cov(pts.T))
    t = pts @ vec[:, 1]
    edges = np.quantile(t, np.linspace(0, 1, k + 1)[1:-1])
    group = np.searchsorted(edges, t)
    uu, vv = x - x.mean(), y - y.mean()
    zz = uu * uu + vv * vv
    for _ in range(iterations):
        # algebraic (Kasa) fit of every group at once: per-group sums, k 3x3 systems
        cnt = np.bincount(group, minlength=k).astype(float)
        if cnt.min() < _MIN_ARC_POINTS:
            return None

        def gsum(w: np.ndarray) -> np.ndarray:
            return np.bincount(group, weights=w, minlength=k)

        su, sv = gsum(uu), gsum(vv)
        mat = np.empty((k, 3, 3))
        mat[:, 0, 0], mat[:, 0, 1], mat[:, 0, 2] = gsum(uu * uu), gsum(uu * vv), su
        mat[:, 1, 0], mat[:, 1, 1], mat[:, 1, 2] = mat[:, 0, 1], gsum(vv * vv), sv
        mat[:, 2, 0], mat[:, 2, 1], mat[:, 2, 2] = su, sv, cnt
        rhs = -np.stack([gsum(uu * zz), gsum(vv * zz), gsum(zz)], axis=1)
        try:
            sol = np.linalg.solve(mat, rhs[..., None])[..., 0]
        except np.linalg.LinAlgError:
            return None
        cu, cv = -sol[:, 0] / 2.0, -sol[:, 1] / 2.0
        r2 = cu * cu + cv * cv - sol[:, 2]
        if not np.all(np.isfinite(r2)) or np.any(r2 <= 0):
            return None
        resid = np.abs(np.hypot(uu[None, :] - cu[:, None], vv[None, :] - cv[:, None]) - np.sqrt(r2)[:, None])
        new = np.argmin(resid, axis=0)
        if np.array_equal(new, group):
            break
        group = new
    out = []
    for j in range(k):
        sel = group == j
        if sel.sum() < _MIN_ARC_POINTS:
            return None
        c = fit_circle(y[sel], x[sel])
        if c is None:
            return None
        out.append(c)
    return out


def _clear_exterior(ol: Outline, clearance: float) -> np.ndarray:
    """Exterior vertices farther than ``clearance`` (px) from any non-exterior vertex.

    Near a cut or neck the outline bends into the corner; those vertices are not on the lobe's
    circle.
    """
    ext = ol.exterior
    if ext.all() or not ext.any():
        return ext.copy()
    other = np.column_stack([ol.y[~ext], ol.x[~ext]])
    pts = np.column_stack([ol.y[ext], ol.x[ext]])
    d2 = ((pts[:, None, :] - other[None, :, :]) ** 2).sum(-1).min(axis=1)
    out = ext.copy()
    out[np.flatnonzero(ext)] = d2 > clearance * clearance
    return out


def _valid_lobes(cs: list[Circle], mask: np.ndarray, offset: tuple[int, int], yy: np.ndarray,
                 xx: np.ndarray, r_eq: float) -> bool:
    """Circles make plausible lobes of a region: well supported by arcs, sized like lobes,
    centres inside the region and apart, each owning a fair share of the region's pixels."""
    for c in cs:
        if c.coverage < np.deg2rad(70) or not 0.3 * r_eq <= c.r <= 1.5 * r_eq:
            return False
        iy, ix = int(round(c.cy)) - offset[0], int(round(c.cx)) - offset[1]
        if not (0 <= iy < mask.shape[0] and 0 <= ix < mask.shape[1] and mask[iy, ix]):
            return False
    for i in range(len(cs)):
        for j in range(i + 1, len(cs)):
            if np.hypot(cs[i].cy - cs[j].cy, cs[i].cx - cs[j].cx) < 0.5 * min(cs[i].r, cs[j].r):
                return False
    power = np.stack([(yy - c.cy) ** 2 + (xx - c.cx) ** 2 - c.r**2 for c in cs])
    share = np.bincount(np.argmin(power, axis=0), minlength=len(cs)) / max(yy.size, 1)
    return bool(share.min() >= 0.08)


def _circle_split(mask: np.ndarray, offset: tuple[int, int], lobes: np.ndarray, max_k: int) -> list[Circle]:
    """Circles of the lobes in one region, judged on its background-facing outline.

    Returns one circle per lobe when two or more fit the outline clearly better than one,
    else an empty list (leave the region whole).
    """
    ol = outline(mask, offset, lobes)
    if ol is None:
        return []
    r_eq = np.sqrt(mask.sum() / np.pi)
    ext = _clear_exterior(ol, max(2.0, 0.15 * r_eq))
    if ext.sum() < 2 * _MIN_ARC_POINTS:
        return []
    y, x = ol.y[ext], ol.x[ext]
    one = fit_circle(y, x)
    if one is not None and one.rms <= max(0.8, 0.04 * one.r):
        return []
    best: list[Circle] = []
    best_rms = one.rms if one is not None else np.inf
    rr, cc = np.nonzero(mask)
    yy, xx = rr + offset[0], cc + offset[1]
    for k in range(2, max_k + 1):
        cs = fit_circles(y, x, k)
        if cs is None or not _valid_lobes(cs, mask, offset, yy, xx, r_eq):
            continue
        rms = float(np.sqrt(np.mean(np.min(np.stack(
            [(np.hypot(y - c.cy, x - c.cx) - c.r) ** 2 for c in cs]), axis=0))))
        if rms < 0.6 * best_rms:
            best, best_rms = cs, rms
    return best


def split_by_circles(lobes: np.ndarray, max_k: int = 3, candidates: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Split lobes whose background-facing outline is two or more circles, not one.

    A wide, barely concave neck leaves the distance map without a second maximum, but the
    outline still shows two circular arcs. Each lobe's
    outline facing the background gets one circle fitted; where that fits badly, ``k = 2..max_k``
    circles are fitted (:func:`fit_circles`) and kept when they fit much better (RMS below
    0.6 x the best fewer circles'), each is supported by at least 70 degrees of arc, sized
    like a lobe of the region, centred inside it and apart from the others. The lobe is then
    split along the circles' radical lines (power diagram: the chord through the
    intersections of two overlapping circles).

    Parameters
    ----------
    lobes : ndarray of int, shape (H, W)
    max_k : int
        Most circles tried per lobe.
    candidates : ndarray of int, optional
        Only these lobe labels are examined (default: all).

    Returns
    -------
    lobes : ndarray of int32, shape (H, W)
        Split lobes; a split lobe keeps its label for one part, the others get new labels
        above the previous maximum (labels are not made sequential).
    changed : ndarray of int
        Labels of every part of every lobe that was split.
    """
    out = lobes.astype(np.int32, copy=True)
    nxt = int(out.max()) + 1
    changed: list[int] = []
    slices = ndi.find_objects(lobes)
    todo = np.arange(1, len(slices) + 1) if candidates is None else np.asarray(candidates, int)
    if todo.size:
        # a region no larger than ~1.2 x its largest inscribed disc is one disc (a sphere, a
        # packed hexagonal cell): skip the outline fits
        fg = lobes > 0
        cut = np.zeros_like(fg)
        h = (lobes[:, :-1] != lobes[:, 1:]) & fg[:, :-1] & fg[:, 1:]
        v = (lobes[:-1, :] != lobes[1:, :]) & fg[:-1, :] & fg[1:, :]
        cut[:, :-1] |= h
        cut[:, 1:] |= h
        cut[:-1, :] |= v
        cut[1:, :] |= v
        core = fg & ~cut
        n_lab = len(slices)
        cand = np.unique(todo)
        crop_px = 0
        for k in cand:
            sl = slices[k - 1] if 0 < k <= n_lab else None
            if sl is not None:
                crop_px += 9 * (max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) + 2) ** 2
        if candidates is None or crop_px > lobes.size // 4:
            dist = ndi.distance_transform_edt(core)
            lab_fg = lobes[fg]
            best = np.zeros(n_lab + 1)
            np.maximum.at(best, lab_fg, dist[fg])
            counts = np.bincount(lab_fg, minlength=n_lab + 1).astype(float)
        else:
            best, counts = _crop_max_dist(lobes, core, slices, todo)
        ok = (todo >= 1) & (todo <= n_lab)
        r_in = np.where(ok, best[np.where(ok, todo, 0)], 0.0) + 1.0  # + the removed cut pixel
        area = np.where(ok, counts[np.where(ok, todo, 0)], 0.0)
        todo = todo[area > 1.2 * np.pi * r_in**2]
    for k in todo:
        k = int(k)
        if k < 1 or k > len(slices) or slices[k - 1] is None:
            continue
        sl = slices[k - 1]
        mask = lobes[sl] == k
        if mask.sum() < 4 * _MIN_ARC_POINTS:
            continue
        offset = (sl[0].start, sl[1].start)
        circles = _circle_split(mask, offset, lobes, max_k)
        if len(circles) < 2:
            continue
        rr, cc = np.nonzero(mask)
        yy, xx = rr + offset[0], cc + offset[1]
        power = np.stack([(yy - c.cy) ** 2 + (xx - c.cx) ** 2 - c.r**2 for c in circles])
        owner = np.argmin(power, axis=0)
        view = out[sl]
        changed.append(k)
        for j in range(1, len(circles)):
            sel = owner == j
            view[rr[sel], cc[sel]] = nxt
            changed.append(nxt)
            nxt += 1
    return out, np.array(changed, dtype=np.int64)


def _crop_max_dist(lobes: np.ndarray, core: np.ndarray, slices: list, which: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per-label maximum of ``distance_transform_edt(core)`` and pixel count, for the labels
    ``which`` only, each from a crop around the label (same values as the full-image
    transform: the nearest zero of ``core`` to any pixel of a label lies within the label's
    bounding box grown by its larger side, or the crop reaches the image edge)."""
    n_lab = len(slices)
    best = np.zeros(n_lab + 1)
    counts = np.zeros(n_lab + 1)
    height, width = lobes.shape
    for k in np.unique(which):
        k = int(k)
        if k < 1 or k > n_lab or slices[k - 1] is None:
            continue
        sl = slices[k - 1]
        m = max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) + 2
        r0, r1 = max(0, sl[0].start - m), min(height, sl[0].stop + m)
        c0, c1 = max(0, sl[1].start - m), min(width, sl[1].stop + m)
        own = lobes[r0:r1, c0:c1] == k
        counts[k] = float(own.sum())
        if counts[k]:
            best[k] = float(ndi.distance_transform_edt(core[r0:r1, c0:c1])[own].max())
    return best, counts


def _label_medians(values: np.ndarray, labels: np.ndarray, m: int) -> np.ndarray:
    """Median of ``values`` over each label 1..m (as ``ndi.median``), index 0 = 0; shape (m + 1,)."""
    fg = labels > 0
    lab = labels[fg].astype(np.intp)
    val = values[fg]
    order = np.argsort(val)
    order = order[np.argsort(lab[order], kind="stable")]  # by label, values ascending within
    lab, val = lab[order], val[order]
    counts = np.bincount(lab, minlength=m + 1)[: m + 1]
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = np.zeros(m + 1)
    has = counts > 0
    has[0] = False
    lo = start[has] + (counts[has] - 1) // 2
    hi = start[has] + counts[has] // 2
    out[has] = (val[lo] + val[hi]) / 2.0
    return out


def _label_centroids(labels: np.ndarray, m: int) -> np.ndarray:
    """Centroid (row, column) of each label 1..m, shape (m + 1, 2), row 0 = 0."""
    flat = labels.ravel()
    rows = np.repeat(np.arange(labels.shape[0], dtype=float), labels.shape[1])
    cols = np.tile(np.arange(labels.shape[1], dtype=float), labels.shape[0])
    n = np.bincount(flat, minlength=m + 1)[: m + 1].astype(float)
    out = np.zeros((m + 1, 2))
    safe = np.where(n > 0, n, 1.0)
    out[:, 0] = np.bincount(flat, weights=rows, minlength=m + 1)[: m + 1] / safe
    out[:, 1] = np.bincount(flat, weights=cols, minlength=m + 1)[: m + 1] / safe
    out[0] = 0.0
    return out


def _pair_edges(lobes: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Adjacent lobe pairs (a < b), number of shared pixel edges, mean of ``values`` across them."""
    la = np.concatenate([lobes[:, :-1].ravel(), lobes[:-1, :].ravel()])
    lb = np.concatenate([lobes[:, 1:].ravel(), lobes[1:, :].ravel()])
    va = np.concatenate([values[:, :-1].ravel(), values[:-1, :].ravel()])
    vb = np.concatenate([values[:, 1:].ravel(), values[1:, :].ravel()])
    sel = (la != lb) & (la > 0) & (lb > 0)
    la, lb, v = la[sel], lb[sel], 0.5 * (va[sel] + vb[sel])
    lo, hi = np.minimum(la, lb).astype(np.int64), np.maximum(la, lb).astype(np.int64)
    m = int(lobes.max()) + 1
    key = lo * m + hi
    uniq, inv, counts = np.unique(key, return_inverse=True, return_counts=True)
    mean_v = np.bincount(inv, weights=v) / counts
    return np.column_stack([uniq // m, uniq % m]), counts, mean_v


#: Fuse model: logit = sum(weight * feature) + bias; touching lobes fuse when the logit is at
#: least ``LobesConfig.fuse_score``. Weights from a logistic regression on touching-lobe pairs
#: of the Konstanz images GM_59_20..22, GM_116_20..22 and GM_124_00..02 (pairs labelled fused /
#: separate by the grouping of the reference SAM masks); on the held-out images (_23, _24,
#: _03, _04) it misclassified 4 of 173 fused and 0 of 98 separate dumbbell-lobe pairs.
FUSE_MODEL: dict[str, float] = {
    "neck": 3.6,
    "contrast": -10.0,
    "line_contrast": -11.5,
    "overlap": -7.3,
    "bias": 10.2,
}
#: ``overlap`` used for a pair where a lobe has too little background-facing outline for a circle.
_NEUTRAL_OVERLAP = 0.85
#: Bounds used to skip pairs that cannot fuse (``neck`` hardly exceeds 1.07; circles of fused
#: lobes overlap at most down to about 0.4 of the sum of their radii).
_MAX_NECK = 1.1
_MIN_OVERLAP = 0.4


def lobe_circles(lobes: np.ndarray, which: np.ndarray | None = None) -> np.ndarray:
    """Circle fitted to each lobe's background-facing outline (see :func:`exterior_circle`).

    Parameters
    ----------
    lobes : ndarray of int, shape (H, W)
    which : ndarray of int, optional
        Only these lobe labels get a circle (the others stay NaN).

    Returns
    -------
    ndarray of float, shape (m + 1, 3)
        Row k: centre row, centre column, radius (px) of lobe k; NaN where the lobe's outline
        facing the background spans less than about 110 degrees.
    """
    m = int(lobes.max())
    out = np.full((m + 1, 3), np.nan)
    slices = ndi.find_objects(lobes)
    for k in (range(1, m + 1) if which is None else np.unique(which)):
        k = int(k)
        sl = slices[k - 1] if 0 < k <= len(slices) else None
        if sl is None:
            continue
        c = exterior_circle(lobes[sl] == k, (sl[0].start, sl[1].start), lobes)
        if c is not None:
            out[k] = (c.cy, c.cx, c.r)
    return out


def lobe_pair_features(lobes: np.ndarray, intensity: np.ndarray, *, min_logit: float | None = None
                       ) -> pd.DataFrame:
    """Features of every pair of touching lobes (see the module docstring).

    Parameters
    ----------
    lobes : ndarray of int, shape (H, W)
        Lobe labels, 0 = background.
    intensity : ndarray of float, shape (H, W)
        Denoised grey image, bright particles.
    min_logit : float, optional
        Skip the costly ``neck`` and ``overlap`` (left NaN) for pairs whose log-odds under
        :data:`FUSE_MODEL` cannot reach this value whatever those two turn out to be.

    Returns
    -------
    pandas.DataFrame
        One row per pair: ``a, b`` (lobe labels, a < b), ``shared_px`` (shared pixel edges),
        ``neck`` (widest point of the common boundary over the smaller inscribed radius),
        ``contrast`` (common boundary's darkness below the lobes' median grey, over the grey
        range of all lobes), ``line_contrast`` (same for the darkest point on the middle 60 %
        of the segment joining the lobe centroids), ``overlap`` (distance of the lobes'
        fitted circle centres over the sum of their radii; NaN without circles). All
        dimensionless.
    """
    cols = ["a", "b", "shared_px", "neck", "contrast", "line_contrast", "overlap"]
    m = int(lobes.max())
    if m < 2:
        return pd.DataFrame({c: [] for c in cols})
    pairs, shared, edge_mean = _pair_edges(lobes, intensity)
    if len(pairs) == 0:
        return pd.DataFrame({c: [] for c in cols})
    lo, hi = np.percentile(intensity[lobes > 0], [5, 95])
    span = max(float(hi - lo), 1e-6)
    idx = np.arange(1, m + 1)
    level = _label_medians(intensity, lobes, m)
    com = _label_centroids(lobes, m)
    a, b = pairs[:, 0], pairs[:, 1]
    mid_level = 0.5 * (level[a] + level[b])
    contrast = (mid_level - edge_mean) / span
    # darkest point between the two centroids (middle 60 % of the segment)
    t = np.linspace(0.2, 0.8, 13)
    py = com[a, 0][:, None] + t[None, :] * (com[b, 0] - com[a, 0])[:, None]
    px = com[a, 1][:, None] + t[None, :] * (com[b, 1] - com[a, 1])[:, None]
    prof = ndi.map_coordinates(intensity, [py.ravel(), px.ravel()], order=1, mode="nearest").reshape(py.shape)
    line_contrast = (mid_level - prof.min(axis=1)) / span
    todo = np.arange(len(pairs))
    if min_logit is not None:
        best = (FUSE_MODEL["neck"] * _MAX_NECK + FUSE_MODEL["contrast"] * contrast
                + FUSE_MODEL["line_contrast"] * line_contrast + FUSE_MODEL["overlap"] * _MIN_OVERLAP
                + FUSE_MODEL["bias"])
        todo = np.flatnonzero(best >= min_logit)
    circ = lobe_circles(lobes, np.concatenate([a[todo], b[todo]]))
    overlap = np.hypot(circ[a, 0] - circ[b, 0], circ[a, 1] - circ[b, 1]) / (circ[a, 2] + circ[b, 2])
    neck = np.full(len(pairs), np.nan)
    slices = ndi.find_objects(lobes)
    for k in todo:
        sa, sb = slices[a[k] - 1], slices[b[k] - 1]
        r0, r1 = min(sa[0].start, sb[0].start), max(sa[0].stop, sb[0].stop)
        c0, c1 = min(sa[1].start, sb[1].start), max(sa[1].stop, sb[1].stop)
        sub = lobes[r0:r1, c0:c1]
        ma, mb = sub == a[k], sub == b[k]
        d = ndi.distance_transform_edt(np.pad(ma | mb, 1))[1:-1, 1:-1]
        # the common boundary: pixels of a with a 4-neighbour in b and vice versa
        bd = np.zeros_like(ma)
        hh = (ma[:, :-1] & mb[:, 1:]) | (mb[:, :-1] & ma[:, 1:])
        vv = (ma[:-1, :] & mb[1:, :]) | (mb[:-1, :] & ma[1:, :])
        bd[:, :-1] |= hh
        bd[:, 1:] |= hh
        bd[:-1, :] |= vv
        bd[1:, :] |= vv
        ra, rb = d[ma].max(), d[mb].max()
        neck[k] = float(d[bd].max() / max(min(ra, rb), 1e-6))
    return pd.DataFrame({"a": a, "b": b, "shared_px": shared, "neck": neck, "contrast": contrast,
                         "line_contrast": line_contrast, "overlap": overlap})


def fuse_logit(features: pd.DataFrame, model: dict[str, float] | None = None) -> np.ndarray:
    """Log-odds that each touching pair is one particle (see :data:`FUSE_MODEL`)."""
    model = FUSE_MODEL if model is None else model
    ov = features["overlap"].to_numpy(float)
    ov = np.where(np.isfinite(ov), ov, _NEUTRAL_OVERLAP)
    logit = (model["neck"] * features["neck"].to_numpy(float)
             + model["contrast"] * features["contrast"].to_numpy(float)
             + model["line_contrast"] * features["line_contrast"].to_numpy(float)
             + model["overlap"] * ov + model["bias"])
    return np.where(np.isfinite(logit), logit, -np.inf)


def decompose_lobes(labels: np.ndarray, max_lobes: int = 6) -> np.ndarray:
    """Split every region into its lobes (repeated :func:`split_by_circles`).

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)
        Regions 1..n, 0 = background.
    max_lobes : int
        At most this many lobes come out of one region.

    Returns
    -------
    ndarray of int32, shape (H, W)
        Lobes 1..m (sequential); every lobe lies inside one region.
    """
    k = max(1, min(3, max_lobes))
    if k < 2:
        return segmentation.relabel_sequential(labels.astype(np.int32))[0]
    lobes, changed = split_by_circles(labels, k)
    for _ in range(max(0, max_lobes - 2)):  # a split-off part may itself hold several lobes
        if changed.size == 0:
            break
        lobes, changed = split_by_circles(lobes, k, changed)
    lobes, _, _ = segmentation.relabel_sequential(lobes)
    return lobes.astype(np.int32, copy=False)


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
    labels, _, _ = segmentation.relabel_sequential(labels.astype(np.int32, copy=False))
    n = int(labels.max())
    if n == 0:
        z = np.zeros(labels.shape, np.int32)
        return ParticleMasks(z, z.copy(), np.zeros(1, np.int32), np.zeros(1, bool))
    if not cfg.enabled:
        return ParticleMasks(labels, labels.copy(), np.arange(n + 1, dtype=np.int32), border_flags(labels))

    lobes = decompose_lobes(labels, cfg.max_lobes)
    m = int(lobes.max())
    smoothed = filters.gaussian(image.intensity(), sigma=1.0, preserve_range=True)
    feats = lobe_pair_features(lobes, smoothed, min_logit=cfg.fuse_score)
    uf = _UnionFind(m + 1)
    if len(feats):
        score = fuse_logit(feats)
        score[~(feats["neck"].to_numpy(float) >= cfg.min_neck)] = -np.inf
        a = feats["a"].to_numpy()
        b = feats["b"].to_numpy()
        for k in np.argsort(-score):
            if not score[k] >= cfg.fuse_score:
                break
            ra, rb = uf.find(int(a[k])), uf.find(int(b[k]))
            if ra != rb and uf.size[ra] + uf.size[rb] <= cfg.max_lobes:
                uf.union(ra, rb)
    roots = np.array([uf.find(k) for k in range(m + 1)])
    _, particle_of_lobe = np.unique(roots, return_inverse=True)  # root 0 -> 0
    particle_of_lobe = particle_of_lobe.astype(np.int32)
    particles = particle_of_lobe[lobes]
    return ParticleMasks(
        labels=particles.astype(np.int32),
        lobe_labels=lobes,
        lobe_parent=particle_of_lobe,
        touches_border=border_flags(particles),
    )
