"""Step 1 of the grouping: split segmented regions into lobes, by circles and by seams.

A segmenter's region may be a whole particle, one lobe of a fused particle, several fused lobes
in one piece, or a piece of a lobe. One circle is fitted to the part of every region's outline
that faces the background (points near a pixel where two regions touch, or near the image edge,
left out). Where it fits worse than a disc's outline does, 2 and 3 circles are fitted (k-means
on the outline points from three starts, one of them the circle through most of the outline: a
big lobe with a small one beside it; :mod:`qcloop.lobes.circles`); they replace the single
circle when they fit much better and make plausible lobes (arc support, size, centres inside
and apart, each owning a fair share of the pixels, the discs inside the region). The region is
split along the circles' radical lines (the chord through the intersections of two overlapping
circles: the neck); split-off parts are examined again (chains of lobes)
(:func:`split_by_circles`). All regions are fitted at once (batched algebraic fits refined by
Gauss-Newton steps), so the cost is a few array passes. Parts too large for one disc are then
cut along a dark straight seam at a neck (:func:`split_by_seams`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from qcloop.config import LobesConfig
from qcloop.lobes.circles import _MIN_ARC_POINTS, _fit_circle_groups, _kmeans_starts, _trimmed_inliers
from qcloop.lobes.labels import (_MIN_LOBE_AREA, _clearance, _geometry, _Geometry, _label_max, _label_set,
                                 _outline_points, _relabel, lobe_radius_px)

# Tuned constants: see "Where the numbers come from" in the package docstring.
# --- split by circles (split_by_circles)
#: Most circles fitted to one region (chains of more lobes are split again part by part).
_MAX_CIRCLES = 3
#: A region no larger than this many times its largest inscribed disc is one disc: not examined.
#: Konstanz, by hand (e996b90).
_ONE_DISC_AREA = 1.2
#: One circle describes an outline whose RMS residual is at most this fraction of the typical lobe
#: radius, and at least ``_ONE_CIRCLE_RMS_PX`` px (a disc's pixelated outline). Konstanz, by hand
#: (e996b90 for the 0.8 px; cebfcf5 for the fraction).
_ONE_CIRCLE_RMS = 0.05
_ONE_CIRCLE_RMS_PX = 0.8
#: k circles replace fewer ones when their RMS residual is below this fraction of the best fewer.
#: Konstanz, by hand (cebfcf5).
_RMS_GAIN = 0.4
#: ... and 3 circles replace 2 when below this fraction of their RMS residual. Konstanz, by hand
#: (e996b90, for every k then).
_RMS_GAIN_MORE = 0.6
#: Each circle of a split has at least this much angular support (radians). Konstanz, by hand
#: (e996b90).
_MIN_SPLIT_COVERAGE = np.deg2rad(70.0)
#: Each circle of a split has a radius in this range times the region's equivalent radius.
#: Konstanz, by hand (e996b90).
_SPLIT_RADIUS = (0.3, 1.5)
#: Circle centres of a split are at least this fraction of the smaller radius apart. By hand
#: (cebfcf5).
_MIN_SEPARATION = 0.5
#: Each circle of a split has at least this fraction of its disc inside the region, the largest
#: at least ``_MIN_BIG_INSIDE`` (a lobe is not wider than its particle). Konstanz, by hand
#: (cebfcf5).
_MIN_INSIDE = 0.5
_MIN_BIG_INSIDE = 0.75
#: The pixel-share checks of a split use every this-many-th row and column (speed; not tuned).
_PIXEL_SAMPLE = 2
# --- split by seams (split_by_seams, _best_seam_chord); Konstanz trimers (GM_124_*), by hand (cebfcf5)
#: A lobe of at least this many times a typical lobe's disc may hold two lobes.
_SEAM_MIN_RATIO = 1.4
#: The seam's chord is at most this many typical lobe radii long ...
_SEAM_MAX_CHORD = 2.4
#: ... at least this much narrower (fraction of the width) than the lobe somewhere within
#: ``_NECK_WINDOW`` x ``r`` on either side (a neck) ...
_NECK_NARROWING = 0.9
_NECK_WINDOW = 0.6
#: ... leaves at least this fraction of a typical lobe's disc on each side ...
_SEAM_MIN_PART = 1.0 / 3.0
#: ... and its darkness is measured against the grey this many px to either side, over at least
#: ``_MIN_CHORD_INNER`` x ``r`` pixels on the chord and ``_MIN_SIDE_INNER`` x ``r`` beside it,
#: all at least 2.5 px inside the lobe (``_INNER_2_5``), at least ``_MIN_INNER_PX`` of them.
_SEAM_SIDE_PX = (2, 3, 4)
_MIN_CHORD_INNER = 0.6
_MIN_SIDE_INNER = 3.0
_MIN_INNER_PX = 20
#: Chord directions tried (every 10 degrees).
_SEAM_ANGLES = 18
#: Offsets closer than 2.5 px: a pixel is at least 2.5 px inside a mask where all of them are in it.
_INNER_2_5 = np.hypot(*np.mgrid[-2:3, -2:3]) < 2.5


def _plausible_lobes(cy: np.ndarray, cx: np.ndarray, r: np.ndarray, r_eq: np.ndarray, labels_sub: np.ndarray,
                     lobes: np.ndarray, pr: np.ndarray, pc: np.ndarray, pix_reg: np.ndarray, px_area: float,
                     r_typ: float) -> np.ndarray:
    """Which regions' ``k`` circles (arrays of shape (n, k)) make plausible lobes.

    Each circle is sized like a lobe of the region (``_SPLIT_RADIUS``: 0.3 to 1.5 x its
    equivalent radius ``r_eq``), centred inside it and apart from the others (by
    ``_MIN_SEPARATION``, half the smaller radius), owns (power diagram) at least
    ``_MIN_LOBE_AREA`` of a typical lobe's disc of the region's pixels (``pr, pc``, region index
    ``pix_reg``; a sample, each pixel standing for ``px_area``), and has at least
    ``_MIN_INSIDE`` (half) of its disc inside the region, the largest at least
    ``_MIN_BIG_INSIDE`` of it (a lobe is not wider than its particle). ``labels_sub``: the regions' labels in
    ``lobes`` (the label image, same coordinates as the circles).
    """
    n, k = r.shape
    height, width = lobes.shape
    lo, hi = _SPLIT_RADIUS
    valid = np.all((r >= lo * r_eq[:, None]) & (r <= hi * r_eq[:, None]), axis=1)
    iy = np.clip(np.round(np.nan_to_num(cy)).astype(np.intp), 0, height - 1)
    ix = np.clip(np.round(np.nan_to_num(cx)).astype(np.intp), 0, width - 1)
    valid &= np.all((lobes[iy, ix] == labels_sub[:, None]) & np.isfinite(cy), axis=1)
    for i in range(k):
        for j in range(i + 1, k):
            sep = np.hypot(cy[:, i] - cy[:, j], cx[:, i] - cx[:, j])
            valid &= sep >= _MIN_SEPARATION * np.minimum(r[:, i], r[:, j])
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
    valid &= (inside[np.arange(n), big] >= _MIN_BIG_INSIDE) & np.all(inside >= _MIN_INSIDE, axis=1)
    return valid


def split_by_circles(lobes: np.ndarray, max_k: int = _MAX_CIRCLES, candidates: np.ndarray | None = None, *,
                     geometry: _Geometry | None = None, r_typ: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split lobes whose background-facing outline is two or more circles, not one.

    (The numbers below are the module's constants.) Each lobe's outline facing the background
    gets one circle fitted; where that fits worse
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
    unchanged = out, np.zeros(0, np.int64)
    if m == 0 or max_k < 2:
        return unchanged
    if geometry is None or r_typ is None:
        if r_typ is None:
            r_typ = lobe_radius_px(out)
        geometry = _geometry(out)
    area = np.bincount(out[out > 0], minlength=m + 1).astype(float)
    r_in = _label_max(out, geometry.dist, m) + 1.0
    cand = area > _ONE_DISC_AREA * np.pi * r_in**2
    cand[0] = False
    if candidates is not None:
        cand &= _label_set(candidates, m)
    if not cand.any():
        return unchanged
    view = out  # a few parts: work in their bounding box (a view of out)
    if candidates is not None:
        view = _crop_to(out, cand, int(np.ceil(_clearance(r_typ))) + 2)  # clearance and outline, with room
    outlines = _outlines(view, cand, area, r_typ)
    if outlines is None:
        return unchanged
    best_k, circles = _best_circles(view, outlines, max_k, r_typ)
    if not np.any(best_k >= 2):
        return unchanged
    return out, _cut_by_circles(view, outlines.labels, best_k, circles, m)


def _crop_to(labels: np.ndarray, which: np.ndarray, pad: int) -> np.ndarray:
    """View of ``labels`` on the bounding box of the labels with ``which[label]``, ``pad`` px wider."""
    on = which[labels]
    rows, cols = np.flatnonzero(on.any(axis=1)), np.flatnonzero(on.any(axis=0))
    return labels[max(rows[0] - pad, 0): rows[-1] + pad + 1, max(cols[0] - pad, 0): cols[-1] + pad + 1]


@dataclass(frozen=True)
class _Outlines:
    """Background-facing outline points of the regions that one circle does not describe
    (:func:`_outlines`); region ``i`` is label ``labels[i]``.

    Attributes
    ----------
    labels, r_eq, rms1 : ndarray, shape (n,)
        Label, equivalent radius (px) and RMS residual of the single circle (inf: no fit).
    region, y, x : ndarray, shape (p,)
        Region index and position (px) of every outline point.
    one_rms : float
        RMS residual (px) up to which circles describe an outline as well as one circle a disc.
    """

    labels: np.ndarray
    r_eq: np.ndarray
    rms1: np.ndarray
    region: np.ndarray
    y: np.ndarray
    x: np.ndarray
    one_rms: float


def _outlines(view: np.ndarray, cand: np.ndarray, area: np.ndarray, r_typ: float) -> _Outlines | None:
    """Outline points of the candidate regions (``cand[label]``) worth a multi-circle fit: enough
    points for two arcs, and one circle fits worse than a disc's outline. None when there are none."""
    lab, y, x = _outline_points(view, _clearance(r_typ), cand)
    ids = np.flatnonzero(cand)  # candidate labels; index i in the batched fits
    index = np.full(len(cand), -1, np.intp)
    index[ids] = np.arange(ids.size)
    reg = index[lab]
    n = ids.size
    npts = np.bincount(reg, minlength=n)
    rms1 = _fit_circle_groups(reg, y, x, n)[3]
    one_rms = max(_ONE_CIRCLE_RMS_PX, _ONE_CIRCLE_RMS * r_typ)
    good_one = np.isfinite(rms1) & (rms1 <= one_rms)
    try_k = (npts >= 2 * _MIN_ARC_POINTS) & ~good_one
    if not try_k.any():
        return None
    keep_pt = try_k[reg]
    sub = np.flatnonzero(try_k)
    reindex = np.full(n, -1, np.intp)
    reindex[sub] = np.arange(sub.size)
    return _Outlines(labels=ids[sub], r_eq=np.sqrt(area[ids] / np.pi)[sub],
                     rms1=np.where(np.isfinite(rms1[sub]), rms1[sub], np.inf), region=reindex[reg[keep_pt]],
                     y=y[keep_pt], x=x[keep_pt], one_rms=one_rms)


def _pixel_sample(view: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, columns and region index (into ``labels``) of a grid of the regions' pixels, every
    ``_PIXEL_SAMPLE``-th row and column, for the pixel-share checks."""
    step = _PIXEL_SAMPLE
    preg = np.full(int(view.max()) + 1, -1, np.intp)
    preg[labels] = np.arange(labels.size)
    grid = preg[view[::step, ::step]]
    pr, pc = np.nonzero(grid >= 0)
    return step * pr, step * pc, grid[pr, pc]


def _best_circles(view: np.ndarray, o: _Outlines, max_k: int, r_typ: float
                  ) -> tuple[np.ndarray, dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Best number of circles (1 = not split) of every region of ``o`` and, where 2 or more,
    their centres and radii (``cy, cx, r``), from ``k = 2..max_k`` circles (see
    :func:`split_by_circles`)."""
    ns = o.labels.size
    best_rms = o.rms1
    best_k = np.ones(ns, int)
    best_circles: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    pr, pc, pix_reg = _pixel_sample(view, o.labels)
    dominant = _trimmed_inliers(o.region, o.y, o.x, ns)
    need = np.ones(ns, bool)
    for k in range(2, max_k + 1):
        # regions that k - 1 circles describe as well as one circle a disc are done
        need &= ~((best_k >= 2) & (best_rms <= o.one_rms))
        if not need.any():
            break
        on = need[o.region]
        limit = np.where(best_k >= 2, _RMS_GAIN_MORE, _RMS_GAIN) * best_rms
        k_rms = np.full(ns, np.inf)
        for cy, cx, r, cov, rms, ok in _kmeans_starts(o.region[on], o.y[on], o.x[on], ns, k, dominant=dominant[on]):
            cy, cx, r, cov = (a.reshape(ns, k) for a in (cy, cx, r, cov))
            valid = need & ok & (rms < np.minimum(limit, k_rms)) & np.all(cov >= _MIN_SPLIT_COVERAGE, axis=1)
            valid &= _plausible_lobes(cy, cx, r, o.r_eq, o.labels, view, pr, pc, pix_reg, float(_PIXEL_SAMPLE**2),
                                      r_typ)
            for i in np.flatnonzero(valid):
                best_circles[int(i)] = (cy[i], cx[i], r[i])
            k_rms = np.where(valid, rms, k_rms)
        found = np.isfinite(k_rms)
        best_rms = np.where(found, k_rms, best_rms)
        best_k = np.where(found, k, best_k)
    return best_k, best_circles


def _cut_by_circles(view: np.ndarray, labels: np.ndarray, best_k: np.ndarray,
                    circles: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]], m: int) -> np.ndarray:
    """Split (in place) every region ``labels[i]`` with ``best_k[i] >= 2`` along the radical lines
    of its circles (power diagram); part 0 keeps the label, the others get new labels above
    ``m``. Returns the labels of every part of every split region."""
    split = np.flatnonzero(best_k >= 2)
    ns = labels.size
    kmax = int(best_k.max())
    ccy = np.full((ns, kmax), np.nan)
    ccx = np.full((ns, kmax), np.nan)
    crr = np.full((ns, kmax), np.nan)
    for i in split:
        c_y, c_x, c_r = circles[int(i)]
        ccy[i, : c_y.size], ccx[i, : c_x.size], crr[i, : c_r.size] = c_y, c_x, c_r
    full = np.full(m + 1, -1, np.intp)
    full[labels[split]] = split
    pix_reg = full[view]
    pr, pc = np.nonzero(pix_reg >= 0)
    pix_reg = pix_reg[pr, pc]
    power = np.stack([(pr - ccy[pix_reg, j]) ** 2 + (pc - ccx[pix_reg, j]) ** 2 - crr[pix_reg, j] ** 2
                      for j in range(kmax)])
    owner = np.argmin(np.where(np.isfinite(power), power, np.inf), axis=0)
    new_label = m + 1 + np.arange(ns * kmax).reshape(ns, kmax)
    moved = owner > 0
    view[pr[moved], pc[moved]] = new_label[pix_reg[moved], owner[moved]]
    changed = [labels[split]] + [new_label[i, 1: best_k[i]] for i in split]
    return np.concatenate(changed).astype(np.int64)


def _best_seam_chord(own: np.ndarray, grey: np.ndarray, r_typ: float, span: float,
                     min_area: float, max_chord: float) -> tuple[float, float, float] | None:
    """Straight chord across a piece (mask ``own``) along which the image is darkest relative
    to both sides.

    Only chords across a neck count (no longer than ``max_chord`` px and ``_NECK_NARROWING``
    of the piece's width somewhere within ``_NECK_WINDOW`` x ``r_typ`` on either side). Every
    pixel of the piece at least 2.5 px inside its outline is binned by its signed distance to
    lines of ``_SEAM_ANGLES`` directions (1 px bins); a chord's darkness is the mean grey
    ``_SEAM_SIDE_PX`` (2 to 4) px to either side minus the mean grey on it, over ``span``.
    Chords leaving less than ``min_area`` px on one side are not considered.

    Returns
    -------
    (depth, angle, offset) or None
        ``depth`` over ``span``; the chord is ``x cos(angle) + y sin(angle) = offset`` in crop
        coordinates.
    """
    n_angles = _SEAM_ANGLES
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
    # a neck: the chord (pixels of the piece on it) no longer than max_chord, and narrower than
    # the piece somewhere within the window (at least 2 px) on either side
    w = max(2, int(round(_NECK_WINDOW * r_typ)))
    padded = np.pad(area, ((0, 0), (w, w)))
    left = padded[:, w - 1: w - 1 + nb].copy()
    right = padded[:, w + 1: w + 1 + nb].copy()
    for d in range(2, w + 1):
        np.maximum(left, padded[:, w - d: w - d + nb], out=left)
        np.maximum(right, padded[:, w + d: w + d + nb], out=right)
    valid = ok_side & (area <= _NECK_NARROWING * np.minimum(left, right)) & (area <= max_chord)
    if not valid.any():
        return None
    inner = ndi.binary_erosion(own, _INNER_2_5, border_value=1)[yy, xx]  # >= 2.5 px from a zero of own
    if inner.sum() < _MIN_INNER_PX:
        return None
    kin = key[:, inner]
    g = grey[yy[inner], xx[inner]]
    cnt = np.bincount(kin.ravel(), minlength=n_angles * nb).reshape(n_angles, nb).astype(float)
    tot = np.bincount(kin.ravel(), np.broadcast_to(g, kin.shape).ravel(), minlength=n_angles * nb).reshape(
        n_angles, nb)
    pad = max(_SEAM_SIDE_PX)
    cntp = np.pad(cnt, ((0, 0), (pad, pad)))
    totp = np.pad(tot, ((0, 0), (pad, pad)))
    side_c = sum(cntp[:, pad + d: pad + d + nb] + cntp[:, pad - d: pad - d + nb] for d in _SEAM_SIDE_PX)
    side_t = sum(totp[:, pad + d: pad + d + nb] + totp[:, pad - d: pad - d + nb] for d in _SEAM_SIDE_PX)
    valid &= (cnt >= _MIN_CHORD_INNER * r_typ) & (side_c >= _MIN_SIDE_INNER * r_typ)
    if not valid.any():
        return None
    depth = np.where(valid, side_t / np.maximum(side_c, 1) - tot / np.maximum(cnt, 1), -np.inf)
    i, j = np.unravel_index(np.argmax(depth), depth.shape)
    return float(depth[i, j] / span), float(ang[i]), float(lo[i] + j + 0.5)


def split_by_seams(lobes: np.ndarray, grey: np.ndarray, r_typ: float, span: float, min_depth: float | None = None,
                   min_ratio: float = _SEAM_MIN_RATIO, max_chord: float = _SEAM_MAX_CHORD,
                   candidates: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cut lobes too large for one disc along the darkest straight seam across them.

    A lobe of at least ``min_ratio`` x a typical lobe's disc (``pi r_typ**2``) may hold two
    lobes whose outline barely shows it (the small middle lobe of a trimer, cut from its other
    neighbour by the segmenter). It is cut along the straight chord across a neck (no longer
    than ``max_chord`` x ``r_typ`` and 10 % narrower than the lobe within 0.6 ``r_typ`` on
    either side) that is darkest relative to the grey 2 to 4 px to either side
    (:func:`_best_seam_chord`), when that darkness reaches ``min_depth`` x ``span`` (the grey
    range of the lobes) and both parts are at least a third of a typical lobe's area
    (``_SEAM_MIN_PART``).

    Parameters
    ----------
    lobes : ndarray of int, shape (H, W)
    grey : ndarray of float, shape (H, W)
        Denoised intensity, bright particles.
    r_typ, span : float
        Typical lobe radius (px); grey range of the lobes.
    min_depth : float, optional
        Default: ``LobesConfig.seam_depth``.
    min_ratio, max_chord : float
        Defaults ``_SEAM_MIN_RATIO`` (1.4) and ``_SEAM_MAX_CHORD`` (2.4).
    candidates : ndarray of int, optional
        Only these lobe labels are examined (default: all).

    Returns
    -------
    lobes, changed : as :func:`split_by_circles`.
    """
    if min_depth is None:
        min_depth = LobesConfig().seam_depth
    out = lobes.astype(np.int32, copy=True)
    slices = ndi.find_objects(out)
    nxt = int(out.max()) + 1
    changed: list[int] = []
    height, width = out.shape
    min_area = _SEAM_MIN_PART * np.pi * r_typ**2
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
    """Regions split by circles into at most ``max_lobes`` lobes each, labels made sequential."""
    k = max(1, min(_MAX_CIRCLES, max_lobes))
    if k < 2:
        return _relabel(labels)
    lobes, changed = split_by_circles(labels, k, geometry=geo, r_typ=r_typ)
    for _ in range(max(0, max_lobes - 2)):  # a split-off part may itself hold several lobes
        if changed.size == 0:
            break
        lobes, changed = split_by_circles(lobes, k, changed, geometry=geo, r_typ=r_typ)
    return _relabel(lobes)
