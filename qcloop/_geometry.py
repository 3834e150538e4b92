"""Outline geometry of every particle of a label image at once (vectorised).

The per-particle figures of :mod:`qcloop.measure` (perimeter, solidity, Feret diameters, corners)
come from the outer outline of each particle mask. Tracing it with
:func:`skimage.measure.find_contours` and measuring it particle by particle costs a few ms per
particle in Python overhead; here the same outlines are traced for all labels together and every
step after that runs on flat arrays holding all outlines one after the other (``start[k]`` to
``start[k + 1]`` for label ``k``).

The results are those of the per-particle code they replace, up to floating-point rounding
(sums taken in a different order):

* :func:`trace_outlines` gives, for every label, exactly the contour
  ``find_contours(np.pad(labels[bbox] == k, 1), 0.5)`` returns (longest contour, same start point
  and direction, closing point dropped), in the label's bounding-box frame;
* :func:`outline_figures` gives perimeter, enclosed area, convex hull area and Feret diameters;
* :func:`corner_figures` gives the corner count and sharpness of
  :func:`qcloop.measure.corner_features`, with :func:`numpy.interp`,
  :func:`scipy.ndimage.gaussian_filter1d` (``mode="wrap"``) and :func:`scipy.signal.find_peaks`
  reproduced on the flat arrays;
* :func:`inscribed_radii` gives ``distance_transform_edt(np.pad(mask, 1)).max()`` per label.

Outline points lie half way between pixel centres, so they are stored as integers in doubled
coordinates (``2 * row``, ``2 * col``); areas and distances computed from them are exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage as ndi

#: Length of a diagonal outline step (half a pixel along both axes).
_DIAG = float(np.hypot(0.5, 0.5))

# Marching squares as in skimage.measure.find_contours (fully_connected="low"): square case
# bits 1 upper-left, 2 upper-right, 4 lower-left, 8 lower-right corner inside; every case gives
# one or two (from, to) segments between the edge midpoints top, bottom, left, right.
_T, _B, _L, _R = 0, 1, 2, 3
_EDGE_OFFSET = np.array([[0, 1], [2, 1], [1, 0], [1, 2]], np.int64)  # (2 dr, 2 dc) from the square's corner
_CASE_SEGMENTS = {
    1: [(_T, _L)], 2: [(_R, _T)], 3: [(_R, _L)], 4: [(_L, _B)], 5: [(_T, _B)],
    6: [(_R, _T), (_L, _B)], 7: [(_R, _B)], 8: [(_B, _R)], 9: [(_T, _L), (_B, _R)],
    10: [(_B, _T)], 11: [(_B, _L)], 12: [(_L, _R)], 13: [(_T, _R)], 14: [(_L, _T)],
}
_N_SEG = np.zeros(16, np.int64)
_FROM = np.zeros((16, 2), np.int64)
_TO = np.zeros((16, 2), np.int64)
for _case, _segs in _CASE_SEGMENTS.items():
    _N_SEG[_case] = len(_segs)
    for _k, (_f, _t) in enumerate(_segs):
        _FROM[_case, _k], _TO[_case, _k] = _f, _t


@dataclass(frozen=True)
class Outlines:
    """Outer outlines of labels 0..n, one after the other.

    Attributes
    ----------
    rows2, cols2 : ndarray of int64
        Doubled coordinates (2 x row, 2 x column, in the frame of the label's origin) of every
        outline point, in tracing order, without repeating the first point at the end.
    start : ndarray of int64, shape (n + 2,)
        The outline of label ``k`` is ``rows2[start[k]:start[k + 1]]`` (empty for absent labels
        and for the background, 0).
    """

    rows2: np.ndarray
    cols2: np.ndarray
    start: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        """Number of points of every label's outline (index 0 = background, 0)."""
        return np.diff(self.start)

    @property
    def owner(self) -> np.ndarray:
        """Label of every outline point."""
        return np.repeat(np.arange(len(self.start) - 1), self.lengths)

    def next_index(self) -> np.ndarray:
        """Index of the following point of every point along its (closed) outline."""
        nxt = np.arange(1, len(self.rows2) + 1)
        ends = self.start[1:][self.lengths > 0] - 1
        nxt[ends] = self.start[:-1][self.lengths > 0]
        return nxt


def trace_outlines(labels: np.ndarray, n: int, origins: np.ndarray) -> Outlines:
    """Outer outline of every label 1..n, as ``skimage.measure.find_contours`` traces it.

    For label ``k`` the outline is the longest 0.5 iso-contour of the zero-padded mask
    ``labels == k`` (ties: the one met first in raster order), starting where
    ``find_contours`` starts it (the end point of the contour's last segment in raster order)
    and running in its direction.

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)
        0 = background, 1..n = labels.
    n : int
        Largest label.
    origins : ndarray of int, shape (n + 1, 2)
        (row, col) of every label's frame (its bounding-box corner); outline coordinates are
        relative to it.

    Returns
    -------
    Outlines
    """
    h, w = labels.shape
    padded = np.pad(labels, 1)
    corners = (padded[:-1, :-1], padded[:-1, 1:], padded[1:, :-1], padded[1:, 1:])
    mixed = (corners[0] != corners[1]) | (corners[0] != corners[2]) | (corners[0] != corners[3])
    square = np.flatnonzero(mixed)  # raster index of the square (padded coordinates)
    values = [c[mixed] for c in corners]
    # one (square, label) pair for every distinct non-zero label among a square's corners
    which, lab = [], []
    for k, v in enumerate(values):
        ok = v != 0
        for prev in values[:k]:
            ok &= v != prev
        which.append(np.flatnonzero(ok))
        lab.append(v[ok])
    pair = np.concatenate(which)
    pair_lab = np.concatenate(lab).astype(np.int64)
    case = np.zeros(len(pair), np.int64)
    for k, v in enumerate(values):
        case |= (v[pair] == pair_lab).astype(np.int64) << k
    pair_sq = square[pair]
    # segments: first of every pair, then the second of the two-segment (saddle) cases
    two = np.flatnonzero(_N_SEG[case] == 2)
    seg_pair = np.concatenate([np.arange(len(pair)), two])
    seg_k = np.concatenate([np.zeros(len(pair), np.int64), np.ones(len(two), np.int64)])
    seg_case = case[seg_pair]
    seg_lab = pair_lab[seg_pair]
    # processing order of find_contours: by label, then square raster order, then segment
    n_squares = (h + 1) * (w + 1)
    order = np.argsort(seg_lab * (2 * n_squares) + pair_sq[seg_pair] * 2 + seg_k)
    seg_lab, seg_case, seg_k = seg_lab[order], seg_case[order], seg_k[order]
    sq = pair_sq[seg_pair][order]
    r0, c0 = np.divmod(sq, w + 1)
    fe, te = _FROM[seg_case, seg_k], _TO[seg_case, seg_k]
    fr, fc = 2 * r0 + _EDGE_OFFSET[fe, 0], 2 * c0 + _EDGE_OFFSET[fe, 1]
    tr, tc = 2 * r0 + _EDGE_OFFSET[te, 0], 2 * c0 + _EDGE_OFFSET[te, 1]
    span_r, span_c = 2 * h + 3, 2 * w + 3
    from_key = (seg_lab * span_r + fr) * span_c + fc
    to_key = (seg_lab * span_r + tr) * span_c + tc
    by_from = np.argsort(from_key)
    succ = by_from[np.searchsorted(from_key, to_key, sorter=by_from)]
    m = len(succ)
    idx = np.arange(m)
    # contours are the cycles of succ; root = the cycle's first segment in processing order
    root, jump = idx.copy(), succ.copy()
    while True:
        new = np.minimum(root, root[jump])
        if np.array_equal(new, root):
            break
        root, jump = new, jump[jump]
    size = np.bincount(root, minlength=m)
    roots = np.flatnonzero(size)
    # longest contour of every label; ties: the first created (smallest root)
    pick = np.lexsort((roots, -size[roots], seg_lab[roots]))
    first = np.ones(len(pick), bool)
    first[1:] = seg_lab[roots[pick[1:]]] != seg_lab[roots[pick[:-1]]]
    chosen = roots[pick[first]]
    keep = np.zeros(m, bool)
    keep[chosen] = True
    sel = np.flatnonzero(keep[root])
    # find_contours closes a contour with its last segment (in processing order): the contour
    # starts at that segment's end point. Rank every segment by its distance to that segment.
    grp = root[sel]
    is_last = np.ones(len(sel), bool)
    by_root = np.argsort(grp, kind="stable")
    is_last[by_root[:-1]] = grp[by_root[1:]] != grp[by_root[:-1]]
    local = np.full(m, -1, np.int64)
    local[sel] = np.arange(len(sel))
    nxt = local[succ[sel]]
    nxt[is_last] = np.flatnonzero(is_last)
    dist = (~is_last).astype(np.int64)
    while True:
        dist = dist + dist[nxt]
        new = nxt[nxt]
        if np.array_equal(new, nxt):
            break
        nxt = new
    lab_sel = seg_lab[sel]
    counts = np.bincount(lab_sel, minlength=n + 1)[: n + 1]
    start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    # position along the contour: the segment after the last one comes first (its start point
    # is the contour's first point), the last one ends the contour
    pos = start[lab_sel] + (counts[lab_sel] - 1 - dist)
    rows2 = np.empty(len(sel), np.int64)
    cols2 = np.empty(len(sel), np.int64)
    origins = np.asarray(origins, np.int64)
    # padded image coordinates -> image -> the label's frame
    rows2[pos] = fr[sel] - 2 - 2 * origins[lab_sel, 0]
    cols2[pos] = fc[sel] - 2 - 2 * origins[lab_sel, 1]
    return Outlines(rows2, cols2, start)


@dataclass(frozen=True)
class OutlineFigures:
    """Size figures of every label's outline (arrays indexed by label, px)."""

    perimeter: np.ndarray
    area: np.ndarray
    hull_area: np.ndarray
    feret_max: np.ndarray
    feret_min: np.ndarray


def outline_figures(ol: Outlines) -> OutlineFigures:
    """Perimeter, enclosed area, convex hull area and Feret diameters of every outline.

    Perimeter: length of the closed outline. Area: shoelace area of the outline. Hull: the
    convex hull of the outline points; Feret max = its longest chord, Feret min = the smallest
    width over its edge directions (rotating calipers). Labels without an outline get 0.
    """
    k = len(ol.start) - 1
    owner = ol.owner
    nxt = ol.next_index()
    dr, dc = ol.rows2[nxt] - ol.rows2, ol.cols2[nxt] - ol.cols2
    diag = np.bincount(owner, weights=(dr != 0) & (dc != 0), minlength=k)
    axis = ol.lengths - diag
    perimeter = axis + diag * _DIAG
    cross = ol.cols2 * ol.rows2[nxt] - ol.rows2 * ol.cols2[nxt]
    area = np.abs(np.bincount(owner, weights=cross, minlength=k)) / 8.0
    hr, hc, hstart = _convex_hulls(ol.rows2, ol.cols2, owner, k)
    hull_area, fmax, fmin = _hull_figures(hr, hc, hstart)
    return OutlineFigures(perimeter, area, hull_area, fmax, fmin)


def _convex_hulls(rows2: np.ndarray, cols2: np.ndarray, owner: np.ndarray, k: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertices (no collinear points) of the convex hull of every label's points, in order.

    Andrew's monotone chain run on all labels together: points sorted by (label, col, row);
    each of the two chains drops, round after round, every point that does not turn the
    chain's way, until none is left (a point dropped this way is never a hull vertex).

    Returns
    -------
    rows2, cols2 : ndarray of int64
        Hull vertices, label after label, going round each hull.
    start : ndarray of int64, shape (k + 1,)
        Hull of label j: ``rows2[start[j]:start[j + 1]]``.
    """
    if len(rows2) == 0:
        return rows2, cols2, np.zeros(k + 1, np.int64)
    # a hull vertex is the first or the last point of its row and of its column; rows (columns)
    # of all labels numbered one after the other
    r, c = rows2 - rows2.min(), cols2 - cols2.min()
    row_base = np.concatenate([[0], np.cumsum(_span_per_label(r, owner, k))])
    col_base = np.concatenate([[0], np.cumsum(_span_per_label(c, owner, k))])
    row_key, col_key = row_base[owner] + r, col_base[owner] + c
    cand = np.ones(len(r), bool)
    for key, other, size in ((row_key, c, row_base[-1]), (col_key, r, col_base[-1])):
        lo = np.full(size, np.iinfo(np.int64).max)
        hi = np.full(size, -1)
        np.minimum.at(lo, key, other)
        np.maximum.at(hi, key, other)
        cand &= (other == lo[key]) | (other == hi[key])
    idx = np.flatnonzero(cand)
    idx = idx[np.argsort(col_key[idx] * (int(r.max()) + 1) + r[idx])]
    chains = []
    for sign in (1, -1):
        keep = idx
        while True:
            x, y, g = cols2[keep], rows2[keep], owner[keep]
            cross = (x[1:-1] - x[:-2]) * (y[2:] - y[:-2]) - (y[1:-1] - y[:-2]) * (x[2:] - x[:-2])
            drop = np.zeros(len(keep), bool)
            drop[1:-1] = (g[:-2] == g[1:-1]) & (g[2:] == g[1:-1]) & (sign * cross >= 0)
            if not drop.any():
                break
            keep = keep[~drop]
        chains.append(keep)
    first, second = chains
    # hull: the first chain, then the second one backwards without its two end points
    g = owner[second]
    inner = np.ones(len(second), bool)
    inner[1:] &= g[1:] == g[:-1]
    inner[:-1] &= g[:-1] == g[1:]
    verts = np.concatenate([first, second[inner][::-1]])
    verts = verts[np.argsort(owner[verts], kind="stable")]
    start = np.concatenate([[0], np.cumsum(np.bincount(owner[verts], minlength=k))]).astype(np.int64)
    return rows2[verts], cols2[verts], start


def _span_per_label(v: np.ndarray, owner: np.ndarray, k: int) -> np.ndarray:
    """``max(v) + 1`` over the points of every label 0..k-1 (0 for labels without points)."""
    span = np.zeros(k, np.int64)
    np.maximum.at(span, owner, v + 1)
    return span


def _hull_figures(hr: np.ndarray, hc: np.ndarray, hstart: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area, longest chord and smallest caliper width of every hull (doubled coordinates in)."""
    k = len(hstart) - 1
    counts = np.diff(hstart)
    owner = np.repeat(np.arange(k), counts)
    nv = len(hr)
    nxt = np.arange(1, nv + 1)
    has = counts > 0
    nxt[hstart[1:][has] - 1] = hstart[:-1][has]
    cross = hc * hr[nxt] - hr * hc[nxt]
    hull_area = np.abs(np.bincount(owner, weights=cross, minlength=k)) / 8.0
    # all (a, b) vertex pairs of every hull
    a, first, loc = _segments(counts[owner])
    b = hstart[owner[a]] + loc
    d2 = (hr[a] - hr[b]) ** 2 + (hc[a] - hc[b]) ** 2
    fmax = np.zeros(k)
    if nv:
        chord = np.sqrt(np.maximum.reduceat(d2, first) / 4.0)  # longest chord from every vertex
        np.maximum.at(fmax, owner, chord)
    # calipers: width of the hull across every edge's normal
    y, x = hr / 2.0, hc / 2.0
    ey, ex = y[nxt] - y, x[nxt] - x
    length = np.hypot(ey, ex)
    ok = length > 0
    ny = np.where(ok, -ex / np.where(ok, length, 1.0), 0.0)
    nx = np.where(ok, ey / np.where(ok, length, 1.0), 0.0)
    proj = y[b] * ny[a] + x[b] * nx[a]
    fmin = np.full(k, np.inf)
    if nv:
        width = np.maximum.reduceat(proj, first) - np.minimum.reduceat(proj, first)
        width = np.where(ok, width, np.inf)
        np.minimum.at(fmin, owner, width)
    fmin[~np.isfinite(fmin)] = 0.0
    return hull_area, fmax, fmin


def inscribed_radii(labels: np.ndarray, box: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``distance_transform_edt(np.pad(labels[bbox] == k, 1)).max()`` for every label k in ``ids``.

    The background pixel nearest to a mask pixel always borders the mask, so the padded crops
    can be packed side by side into one mosaic (their zero margins keep them apart) and one
    distance transform serves them all.

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)
    box : ndarray of int, shape (n + 1, 4)
        Bounding box (r0, c0, r1, c1), ends exclusive, of every label.
    ids : ndarray of int
        The labels to measure.

    Returns
    -------
    ndarray of float64, one radius per entry of ``ids``.
    """
    if len(ids) == 0:
        return np.zeros(0)
    boxes = [(slice(r0, r1), slice(c0, c1)) for r0, c0, r1, c1 in box[ids].tolist()]
    hs = [s[0].stop - s[0].start + 2 for s in boxes]
    ws = [s[1].stop - s[1].start + 2 for s in boxes]
    # shelf packing, tallest crops first, into a roughly square mosaic
    width = max(max(ws), int(np.sqrt(np.dot(hs, ws))) + 1)
    at = [(0, 0)] * len(ids)
    y = x = shelf = 0
    for i in np.argsort(-np.asarray(hs), kind="stable").tolist():
        if x + ws[i] > width:
            y, x, shelf = y + shelf, 0, 0
        at[i] = (y, x)
        x += ws[i]
        shelf = max(shelf, hs[i])
    mosaic = np.zeros((y + shelf, width), bool)
    for (r, c), j, s, h, w in zip(at, ids.tolist(), boxes, hs, ws):
        mosaic[r + 1: r + h - 1, c + 1: c + w - 1] = labels[s] == j
    edt = ndi.distance_transform_edt(mosaic)
    return np.array([edt[r: r + h, c: c + w].max() for (r, c), h, w in zip(at, hs, ws)], np.float64)


def wrap_gaussian(values: np.ndarray, lengths: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """``gaussian_filter1d(v, sigma, mode="wrap")`` of every segment ``v`` of ``values``.

    Segments lie one after the other (``lengths``), each with its own ``sigma``. The kernel
    (radius ``int(4 sigma + 0.5)``) and the order of the sums are scipy's, so the results are
    the same to the last bit.
    """
    lengths = np.asarray(lengths, np.int64)
    sigmas = np.asarray(sigmas, np.float64)
    off = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    radius = (4.0 * sigmas + 0.5).astype(np.int64)
    # scipy's kernel: half of it, centre first, per distinct (sigma, radius)
    half = {}
    for sd, r in set(zip(sigmas.tolist(), radius.tolist())):
        xr = np.arange(-r, r + 1)
        phi = np.exp(-0.5 / (sd * sd) * xr**2)
        half[sd, r] = (phi / phi.sum())[r:]
    out = np.empty(len(values))
    # segments in groups of similar radius; within a group every segment is extended on both
    # sides by the group's largest radius (wrapping round), and its kernel padded with zeros
    # (adding 0.0 leaves a sum unchanged, so the sums stay scipy's)
    group = np.ceil(np.log2(np.maximum(radius, 1))).astype(np.int64)
    for g in np.unique(group):
        segs = np.flatnonzero(group == g)
        pad = int(radius[segs].max())
        n = lengths[segs]
        ext = n + 2 * pad
        eseg, _, eloc = _segments(ext)
        eloc = eloc - pad
        v = values[off[segs][eseg] + eloc % n[eseg]]
        w = np.zeros((len(segs), pad + 1))
        for i, j in enumerate(segs.tolist()):
            h = half[float(sigmas[j]), int(radius[j])]
            w[i, : len(h)] = h
        m = len(v) - 2 * pad
        w = w.T[:, eseg[pad: pad + m]]  # w[k, i]: weight at offset k for output sample i
        acc = v[pad: pad + m] * w[0]
        for k in range(pad, 0, -1):
            acc += (v[pad - k: pad - k + m] + v[pad + k: pad + k + m]) * w[k]
        centre = (eloc[pad: pad + m] >= 0) & (eloc[pad: pad + m] < n[eseg[pad: pad + m]])
        out[_ranges(off[segs], n)] = acc[centre]
    return out


def corner_figures(ol: Outlines, perimeter: np.ndarray, r_in: Callable[[np.ndarray], np.ndarray]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Corner count and sharpness of every outline (arrays indexed by label).

    The algorithm of :func:`qcloop.measure.corner_features`, run on all outlines at once.

    Parameters
    ----------
    ol : Outlines
    perimeter : ndarray
        Outline length per label (from :func:`outline_figures`).
    r_in : callable
        Gets the labels that have corners, returns their inscribed radii (px).

    Returns
    -------
    corners : ndarray of int64
    sharpness : ndarray of float64
    """
    k = len(ol.start) - 1
    corners = np.zeros(k, np.int64)
    sharpness = np.zeros(k)
    ids = np.flatnonzero((ol.lengths > 0) & (perimeter >= 12))
    if len(ids) == 0:
        return corners, sharpness
    # --- resample every closed outline at 1 px arc-length steps (as np.interp) ---
    lens = ol.lengths[ids]
    per = perimeter[ids]
    n = np.rint(per).astype(np.int64)  # half to even, as round()
    # the closed outline: every point, then the first one again
    cseg, cstart, cloc = _segments(lens + 1)
    src = ol.start[ids][cseg] + np.where(cloc < lens[cseg], cloc, 0)
    fy, fx = ol.rows2[src] / 2.0, ol.cols2[src] / 2.0
    # arc length s at every point: axis steps are 1 px long, diagonal ones _DIAG
    diag = np.zeros(len(cseg), np.int64)
    diag[:-1] = (ol.rows2[src[1:]] != ol.rows2[src[:-1]]) & (ol.cols2[src[1:]] != ol.cols2[src[:-1]])
    diag[cstart + lens] = 0
    n_diag = np.cumsum(diag) - diag
    n_diag -= n_diag[cstart][cseg]
    s = (cloc - n_diag) + n_diag * _DIAG
    # samples t = linspace(0, perimeter, n, endpoint=False), bracketed s[j] <= t < s[j + 1]
    tseg, toff, tloc = _segments(n)
    t = tloc * (per / n)[tseg] + 0.0
    shift = np.concatenate([[0.0], np.cumsum(np.ceil(per) + 4.0)[:-1]])
    j = np.searchsorted(s + shift[cseg], t + shift[tseg], side="right") - 1
    lo, hi = cstart[tseg], cstart[tseg] + lens[tseg] - 1
    j = np.clip(j, lo, hi)
    j = np.where((t < s[j]) & (j > lo), j - 1, j)  # fix brackets the shift rounded off
    j = np.where((j < hi) & (t >= s[np.minimum(j + 1, hi)]), j + 1, j)
    ds = t - s[j]
    yi = np.where(ds == 0, fy[j], (fy[j + 1] - fy[j]) / (s[j + 1] - s[j]) * ds + fy[j])
    xi = np.where(ds == 0, fx[j], (fx[j + 1] - fx[j]) / (s[j + 1] - s[j]) * ds + fx[j])
    ones = np.ones(len(ids))
    y = wrap_gaussian(yi, n, ones)
    x = wrap_gaussian(xi, n, ones)
    # --- turning angle per step, smoothed into a curvature ---
    nxt = np.arange(1, len(t) + 1)
    nxt[toff + n - 1] = toff
    theta = np.arctan2(y[nxt] - y, x[nxt] - x)
    turn = np.mod(theta[nxt] - theta + np.pi, 2 * np.pi) - np.pi
    kappa = wrap_gaussian(turn, n, np.maximum(1.0, 0.015 * n))
    flip = np.bincount(tseg, weights=kappa, minlength=len(ids)) < 0
    kappa = np.where(flip[tseg], -kappa, kappa)
    base = 2 * np.pi / n
    # --- curvature peaks: find_peaks(tile(kappa, 3), height, distance), middle copy ---
    height = 1.8 * base
    cand = np.flatnonzero(np.maximum.reduceat(kappa, toff) >= height)
    seg, p = _tiled_peaks(kappa, toff, n, cand, height, np.maximum(2, (0.08 * n).astype(np.int64)))
    if len(seg) == 0:
        return corners, sharpness
    # --- curvature in excess of a circle's over the stretch above 1.2 x a circle's ---
    nn = n[seg]
    quarter = nn // 4
    above = kappa > 1.2 * base[tseg]
    useg, seg_u = np.unique(seg, return_inverse=True)
    left, right = _runs_beside(above, toff[useg], n[useg], seg_u, p)
    left, right = np.minimum(left, quarter), np.minimum(right, quarter)
    width = left + right + 1
    peak_of = np.repeat(np.arange(len(p)), width)
    idx = toff[seg][peak_of] + (_ranges(p - left, width) % nn[peak_of])
    excess = np.add.reduceat(kappa[idx] - base[seg][peak_of], np.concatenate([[0], np.cumsum(width)[:-1]]))
    ok = excess >= np.radians(25.0)
    if not ok.any():
        return corners, sharpness
    seg = seg[ok]
    r_corner = 1.0 / kappa[toff[seg] + p[ok]]
    radii = np.zeros(len(ids))
    has = np.unique(seg)
    radii[has] = r_in(ids[has])
    rin = radii[seg]
    sharp = np.where(rin > 0, np.clip(1.0 - r_corner / np.where(rin > 0, rin, 1.0), 0.0, 1.0), 0.0)
    count = np.bincount(seg, minlength=len(ids))
    total = np.bincount(seg, weights=sharp, minlength=len(ids))
    corners[ids] = count
    sharpness[ids] = total / np.maximum(count, 1)
    return corners, sharpness


def _segments(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index arrays of consecutive segments of the given ``lengths``: for every element, its
    segment ``seg`` and position ``loc`` within it, and every segment's ``start``."""
    lengths = np.asarray(lengths, np.int64)
    seg = np.repeat(np.arange(len(lengths)), lengths)
    start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return seg, start, np.arange(len(seg)) - start[seg]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for every (start, length)."""
    lengths = np.asarray(lengths, np.int64)
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.arange(int(lengths.sum())) - np.repeat(first - np.asarray(starts, np.int64), lengths)


def _runs_beside(flags: np.ndarray, off: np.ndarray, n: np.ndarray, seg: np.ndarray, p: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Number of consecutive True ``flags`` just before and just after sample ``p`` of segment
    ``seg`` (segments: ``flags[off[j]:off[j] + n[j]]``, circular). Runs longer than the segment
    are reported as at least its length."""
    # every segment twice in a row, so that runs can wrap around
    dseg, dstart, dloc = _segments(2 * n)
    f = flags[off[dseg] + dloc % n[dseg]]
    i = np.arange(len(f))
    last_false = np.maximum(np.maximum.accumulate(np.where(f, -1, i)), dstart[dseg] - 1)
    next_false = np.minimum(np.minimum.accumulate(np.where(f, len(f), i)[::-1])[::-1], (dstart + 2 * n)[dseg])
    before = dstart[seg] + n[seg] + p - 1  # sample p - 1, in the second copy
    after = dstart[seg] + p + 1  # sample p + 1, in the first copy (p + 1 <= n)
    return before - last_false[before], next_false[after] - after


def _tiled_peaks(kappa: np.ndarray, toff: np.ndarray, n: np.ndarray, cand: np.ndarray, height: np.ndarray,
                 distance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``find_peaks(np.tile(kappa_j, 3), height=height[j], distance=distance[j])`` for every
    segment j in ``cand``, keeping peaks in the middle copy (returned as segment, position)."""
    if len(cand) == 0:
        return cand, cand
    nc = n[cand]
    tl = 3 * nc
    tseg, tstart, tloc = _segments(tl)
    x = kappa[toff[cand][tseg] + tloc % nc[tseg]]
    # plateau-aware local maxima (scipy's _local_maxima_1d) within every tiled segment
    m = len(x)
    run_start = np.ones(m, bool)
    run_start[1:] = (x[1:] != x[:-1]) | (tseg[1:] != tseg[:-1])
    starts = np.flatnonzero(run_start)
    ends = np.append(starts[1:], m) - 1
    sseg = tseg[starts]
    ok = (tloc[starts] >= 1) & (tloc[ends] <= tl[sseg] - 2)
    a, b, sseg = starts[ok], ends[ok], sseg[ok]
    ok = (x[a - 1] < x[a]) & (x[b + 1] < x[a])
    a, b, sseg = a[ok], b[ok], sseg[ok]
    mid = (a + b) // 2
    ok = x[mid] >= height[cand][sseg]
    mid, sseg = mid[ok], sseg[ok]
    # distance condition: greedy by height (scipy's _select_by_peak_distance)
    keep = np.ones(len(mid), bool)
    dist = distance[cand][sseg]
    close = np.zeros(len(mid), bool)
    close[1:] = (sseg[1:] == sseg[:-1]) & (mid[1:] - mid[:-1] < dist[1:])
    if close.any():
        # only peaks closer than the distance to a neighbour take part (an isolated peak
        # neither goes nor removes any other); the greedy order is scipy's, by height over
        # all the segment's peaks
        near = close.copy()
        near[:-1] |= close[1:]
        bounds = np.searchsorted(sseg, np.unique(sseg[close]))
        ends = np.searchsorted(sseg, sseg[bounds], side="right")
        for lo0, hi0 in zip(bounds.tolist(), ends.tolist()):
            pk = mid[lo0:hi0].tolist()
            d = int(dist[lo0])
            kp = [True] * len(pk)
            order = np.argsort(x[mid[lo0:hi0]])[::-1]
            for i in order[near[lo0:hi0][order]].tolist():
                if not kp[i]:
                    continue
                j = i - 1
                while j >= 0 and pk[i] - pk[j] < d:
                    kp[j] = False
                    j -= 1
                j = i + 1
                while j < len(pk) and pk[j] - pk[i] < d:
                    kp[j] = False
                    j += 1
            keep[lo0:hi0] = kp
    mid, sseg = mid[keep], sseg[keep]
    loc = mid - tstart[sseg]
    nn = nc[sseg]
    mid_copy = (loc >= nn) & (loc < 2 * nn)
    return cand[sseg[mid_copy]], loc[mid_copy] - nn[mid_copy]
