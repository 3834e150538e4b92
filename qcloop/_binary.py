"""Binary morphology by array shifts, for the hot paths of segmentation and lobe grouping.

Each function equals its scipy.ndimage counterpart (tested) and is several times faster on
the masks of a 1024 x 768 image, because it avoids a generic structuring element.
"""

from __future__ import annotations

import numpy as np

__all__ = ["cross_opening", "cross_step", "cut_pixels", "dilate_square"]


def cross_step(mask: np.ndarray, erode: bool) -> np.ndarray:
    """Erosion (background outside the image) or dilation by the 3 x 3 cross."""
    out = mask.copy()
    op = np.logical_and if erode else np.logical_or
    op(out[1:], mask[:-1], out=out[1:])
    op(out[:-1], mask[1:], out=out[:-1])
    op(out[:, 1:], mask[:, :-1], out=out[:, 1:])
    op(out[:, :-1], mask[:, 1:], out=out[:, :-1])
    if erode:
        out[[0, -1], :] = False
        out[:, [0, -1]] = False
    return out


def cross_opening(mask: np.ndarray, times: int) -> np.ndarray:
    """``ndi.binary_opening(mask, iterations=times)`` with the default (cross) structure: the
    opening by the cross dilated ``times - 1`` times by itself."""
    out = mask
    for _ in range(times):
        out = cross_step(out, True)
    for _ in range(times):
        out = cross_step(out, False)
    return out


def cut_pixels(labels: np.ndarray) -> np.ndarray:
    """Pixels of a region with a 4-neighbour in another region (both sides of every cut).

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)
        Regions 1..n, 0 = background.

    Returns
    -------
    ndarray of bool, shape (H, W)
    """
    fg = labels > 0
    cut = np.zeros_like(fg)
    h = (labels[:, :-1] != labels[:, 1:]) & fg[:, :-1] & fg[:, 1:]
    v = (labels[:-1, :] != labels[1:, :]) & fg[:-1, :] & fg[1:, :]
    cut[:, :-1] |= h
    cut[:, 1:] |= h
    cut[:-1, :] |= v
    cut[1:, :] |= v
    return cut


def dilate_square(mask: np.ndarray, reach: int) -> np.ndarray:
    """``mask`` (bool) dilated by a square of side ``2 reach + 1`` (as
    ``ndi.maximum_filter(mask, size=2 * reach + 1)``)."""
    out = mask.copy()
    for d in range(1, reach + 1):
        out[:, d:] |= mask[:, :-d]
        out[:, :-d] |= mask[:, d:]
    rows = out.copy()
    for d in range(1, reach + 1):
        out[d:, :] |= rows[:-d, :]
        out[:-d, :] |= rows[d:, :]
    return out
