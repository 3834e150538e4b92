"""Step 2 of the grouping: describe every pair of neighbouring lobes (:func:`lobe_pair_features`).

Lobes are neighbours when they touch, or face each other across a gap of at most
``LobesConfig.max_gap`` x ``r`` (``r`` the typical lobe radius; the segmenter often leaves a
thin gap along a seam). Every pair gets these features:

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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from qcloop.lobes.circles import lobe_circles
from qcloop.lobes.labels import _extend, _geometry, _Geometry, _label_max, lobe_radius_px

from qcloop.config import LobesConfig

# Tuned constants: see "Where the numbers come from" in the package docstring.
#: The contact of two lobes: where they are closest, and up to this many px wider (a gap) ...
#: By hand (cebfcf5).
_CONTACT_SLACK_PX = 1.0
#: ... where that gap is at most this much (fraction of the lobes' grey range) darker than the two
#: lobes (a seam the segmenter left open). Konstanz dumbbells, by hand (cebfcf5).
_OPEN_SEAM_DARKNESS = 0.2
#: ``line_contrast`` samples the segment between the lobe centroids at these fractions of its
#: length (the middle 60 %, 13 points). By hand (e996b90).
_LINE_SAMPLES = np.linspace(0.2, 0.8, 13)
#: The lobes' grey range: between these percentiles of their pixels (e996b90), at least
#: ``_MIN_GREY_SPAN`` (flat images: no contrast to speak of; cebfcf5). By hand.
_GREY_PERCENTILES = (5, 95)
_MIN_GREY_SPAN = 0.05


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


def _gap_px(r_typ: float, max_gap: float) -> float:
    """Widest gap (px, at least one pixel) across which lobes of radius ``r_typ`` are neighbours."""
    return max(1.0, max_gap * r_typ)


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


def lobe_pair_features(lobes: np.ndarray, intensity: np.ndarray, regions: np.ndarray | None = None, *,
                       r_typ: float | None = None, max_gap: float | None = None) -> pd.DataFrame:
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
    max_gap : float, optional
        Lobes up to ``max_gap * r_typ`` px apart are neighbours (default ``LobesConfig.max_gap``).

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
    if max_gap is None:
        max_gap = LobesConfig().max_gap
    return _pair_features(lobes, intensity, regions, r_typ, _geometry(regions), _gap_px(r_typ, max_gap))[0]


def _no_pairs() -> pd.DataFrame:
    """:func:`lobe_pair_features` of lobes without neighbours (no rows)."""
    return pd.DataFrame({c: [] for c in ("a", "b", "shared_px", "gap", "neck", "contrast", "line_contrast",
                                         "overlap", "same_region")})


def _grey_span(values: np.ndarray) -> float:
    """Grey range of lobe pixels: 5th to 95th percentile, at least 0.05 (flat images: no
    contrast to speak of; ``_GREY_PERCENTILES``, ``_MIN_GREY_SPAN``)."""
    lo, hi = np.percentile(values, list(_GREY_PERCENTILES))
    return max(float(hi - lo), _MIN_GREY_SPAN)


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
    closest = w <= gap[inv] + np.minimum(gap[inv], _CONTACT_SLACK_PX)
    shared = np.bincount(inv, w == 0, n)
    if span is None:
        span = _grey_span(intensity[fg])
    level = _histogram_median(np.clip(intensity[fg], 0, 1), lab_fg, m)
    mid_level = 0.5 * (level[a] + level[b])
    # the contact: where they are closest, and a gap up to 1 px wider that is about as bright as
    # the lobes (a seam the segmenter left open, not a dark crevice between touching spheres)
    bridge = closest | ((w <= gap[inv] + _CONTACT_SLACK_PX) & (mid_level[inv] - c["v"] <= _OPEN_SEAM_DARKNESS * span))
    nb = np.maximum(np.bincount(inv, closest, n), 1)
    contrast = (mid_level - np.bincount(inv, np.where(closest, c["v"], 0.0), n) / nb) / span
    # darkest point between the two centroids (middle 60 % of the segment)
    t = _LINE_SAMPLES
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
