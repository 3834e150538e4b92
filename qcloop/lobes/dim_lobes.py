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
