"""Label-image utilities of the lobe grouping: outlines, distances, renumbering, holes, borders.

All work on integer label images (0 = background). :func:`_geometry` computes, from one
Euclidean distance transform, every region pixel's distance to its own outline and every
background pixel's distance to (and label of) the nearest region; the split, pair and grouping
steps share it. :func:`lobe_radius_px` gives the typical lobe radius ``r`` of an image (median
largest inscribed radius) that every other step is relative to; :func:`fill_enclosed_holes`
gives a region the holes it encloses; :func:`border_flags` says which regions reach the edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential

from qcloop._binary import cut_pixels, dilate_square

#: Outline points this close to a pixel where two regions touch, or to the image edge, are left
#: out of circle fits (near a cut or neck the outline bends into the corner): the larger of
#: ``_CLEARANCE_PX`` px and ``_CLEARANCE`` x the typical lobe radius. Konstanz, by hand (e996b90).
_CLEARANCE_PX = 2.0
_CLEARANCE = 0.15
#: A lobe has at least this fraction of the area of a disc of the typical lobe radius (a split's
#: parts, a recovered dim lobe). Konstanz, by hand (cebfcf5).
_MIN_LOBE_AREA = 0.3


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
    """Labels renumbered 1..n in the order of their values (0 stays background), as int32
    (:func:`skimage.segmentation.relabel_sequential`; negative labels raise ValueError)."""
    labels = np.asarray(labels)
    if labels.size == 0:  # relabel_sequential needs a minimum
        return labels.astype(np.int32)
    return relabel_sequential(labels)[0].astype(np.int32, copy=False)


def _label_set(ids: np.ndarray, m: int) -> np.ndarray:
    """``out[k]`` True for the labels ``k`` in ``ids`` (values outside ``1..m`` ignored), shape (m + 1,)."""
    out = np.zeros(m + 1, bool)
    ids = np.asarray(ids, np.int64)
    out[ids[(ids > 0) & (ids <= m)]] = True
    return out


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
    """How far (px, Chebyshev) outline points must be from a cut or the image edge
    (:func:`_outline_points`) for lobes of radius ``r_typ``."""
    return max(_CLEARANCE_PX, _CLEARANCE * r_typ)


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
