"""Dim-lobe recovery: lobe-sized dim blobs the segmenter left as background between regions.

The small middle lobe of a trimer can be as dim as the substrate, and a threshold then leaves it
out (``LobesConfig.dim_lobes``). :func:`recover_dim_lobes` adds such blobs as new regions; the
fuse step (:mod:`qcloop.lobes.fusion`) decides whether they belong to their neighbours, and a
recovered blob that fuses with nothing is dropped (:func:`qcloop.lobes.group_lobes`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from qcloop._binary import cross_opening, dilate_square
from qcloop.lobes.labels import _MIN_LOBE_AREA

# Tuned constants: see "Where the numbers come from" in the package docstring. All chosen by
# hand on the Konstanz trimers (GM_124_*) when dim-lobe recovery came (cebfcf5).
#: Recover only where this fraction of the image is substrate (farther than the typical lobe
#: radius from every region): else the substrate's grey is not known.
_MIN_SUBSTRATE = 0.02
#: A dim lobe is background at least as bright as the substrate's median less this fraction of
#: the gap from it up to the regions' median grey.
_DIM_TOLERANCE = 0.15
#: ... after an opening by this many px (thin links between candidates cut).
_DIM_OPENING_PX = 2
#: ... at most this many times the area of a typical lobe's disc (at least ``_MIN_LOBE_AREA``).
_MAX_DIM_AREA = 1.5
#: ... and within this many px of two or more regions.
_DIM_REACH_PX = 2


def recover_dim_lobes(labels: np.ndarray, grey: np.ndarray, r_typ: float) -> np.ndarray:
    """Add lobes the segmenter left as background: dim blobs wedged between regions.

    The small middle lobe of a trimer can be as dim as the substrate, and a threshold then
    leaves it out. Where the substrate is visible (at least 2 % of the image lies farther than
    ``r_typ`` from every region), background at least about as bright as the substrate's median
    (less 15 % of the gap up to the regions' median grey) is opened by 2 px (thin links cut);
    its pieces of a lobe's size (0.3 to 1.5 x ``pi r_typ**2``) within 2 px of two or more
    regions become new regions (the numbers are the module's constants). The fuse step decides
    whether they belong to their neighbours.

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
    if far.mean() < _MIN_SUBSTRATE or not fg.any():
        return labels
    substrate = float(np.median(grey[far]))
    level = float(np.median(grey[fg]))
    cand = ~fg & (grey >= substrate - _DIM_TOLERANCE * max(level - substrate, 0.0))
    cand = cross_opening(cand, _DIM_OPENING_PX)
    comp, n = ndi.label(cand)
    if n == 0:
        return labels
    area = np.bincount(comp.ravel(), minlength=n + 1)
    disc = np.pi * r_typ**2
    ok = (area >= _MIN_LOBE_AREA * disc) & (area <= _MAX_DIM_AREA * disc)
    ok[0] = False
    if not ok.any():
        return labels
    # regions within _DIM_REACH_PX of each candidate
    grown = ndi.maximum_filter(np.where(ok[comp], comp, 0), size=2 * _DIM_REACH_PX + 1)
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
