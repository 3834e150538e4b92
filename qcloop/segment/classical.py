"""Classical segmentation: denoise, threshold, distance-transform watershed.

Every step takes its defaults from the image itself:

1. **Grey levels** (:func:`grey_levels`). SEM images of particles on a substrate often hold
   three grey classes (dark shadows between particles, flat substrate, bright particles). The
   two-class Otsu and the upper three-class multi-Otsu thresholds are both tried and the one
   giving the more compact foreground is kept; the substrate (background) level is the mode
   below it, the particle level the median above it.
2. **Expected size** (:func:`estimate_diameter_px`), unless ``expected_diameter_px`` is set:
   the area-weighted median radius of the inscribed discs (local maxima of the distance map of
   the half-way mask), times two.
3. **Denoise** with a Gaussian of ``sigma = d / 25`` (at least 1 px).
4. **Threshold** ``auto_level`` (default 0.2) of the way from the background to the particle
   level (low, so dim lobes stay whole; outlines are placed on the edges in step 6), or a
   global Otsu / Li / triangle, or ``local`` (Gaussian-weighted mean over about three particle
   diameters). Small holes are filled, specks below a tenth of the expected area dropped.
5. **Split touching particles**: markers are the maxima of the distance map of the brighter,
   half-way mask (where contact lines still separate particles), at least
   ``split_min_distance_frac`` x radius apart; a watershed over the darkness of the image plus
   the inverted distance map grows them, so cuts follow the dark contact lines.
6. **Outline**: each region's outer outline moves onto the steepest edge within d / 10 px
   (:func:`refine_outline`), and strips thinner than d / 8 are opened off
   (:func:`open_regions`).

The regions are whole particles or lobes; :func:`qcloop.lobes.group_lobes` groups lobes into
particles and splits regions holding several lobes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage import feature, filters, measure, morphology, segmentation

from qcloop.config import ClassicalConfig
from qcloop.records import Segmentation, SemImage

__all__ = [
    "ClassicalResult",
    "ClassicalSegmenter",
    "GreyLevels",
    "auto_threshold",
    "detect_candidates",
    "estimate_diameter_px",
    "grey_levels",
    "open_regions",
    "refine_outline",
    "segment_classical",
]

#: Smallest expected diameter the estimator returns (px); below this, particles are noise.
_MIN_DIAMETER_PX = 4.0


@dataclass(frozen=True)
class ClassicalResult:
    """Everything :func:`segment_classical` derived, for callers that need more than labels.

    Attributes
    ----------
    labels : ndarray of int32, shape (H, W)
        Regions 1..n, 0 = background.
    foreground : ndarray of bool, shape (H, W)
        Thresholded, hole-filled foreground before splitting.
    smoothed : ndarray of float32, shape (H, W)
        Denoised intensity in [0, 1] (bright = particle).
    expected_diameter_px : float
        Expected particle (or lobe) diameter used, in px.
    sigma_px : float
        Gaussian denoising sigma used, in px.
    threshold : float or ndarray
        Global threshold value, or the per-pixel threshold image of the ``local`` method.
    """

    labels: np.ndarray
    foreground: np.ndarray
    smoothed: np.ndarray
    expected_diameter_px: float
    sigma_px: float
    threshold: float | np.ndarray


def _compactness(mask: np.ndarray, min_area: int = 20) -> float:
    """Area-weighted mean solidity of the connected components of ``mask`` (0 when empty)."""
    lab, n = ndi.label(mask)
    if n == 0:
        return 0.0
    area = np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(float)
    keep = area >= min_area
    if not keep.any():
        return 0.0
    props = measure.regionprops(lab)
    sol = np.array([p.solidity if keep[i] else 0.0 for i, p in enumerate(props)])
    return float(np.sum(sol[keep] * area[keep]) / np.sum(area[keep]))


@dataclass(frozen=True)
class GreyLevels:
    """Grey levels of an SEM image of bright particles (units of the image, usually 0..1).

    Attributes
    ----------
    separation : float
        Class boundary between "particle" and "not particle" (two-class Otsu, or the upper
        three-class multi-Otsu threshold when shadows form a class of their own).
    background : float
        Most common grey level below ``separation`` (the substrate).
    particle : float
        Median grey level above ``separation``.
    classes : int
        2 or 3, the histogram model that was kept.
    """

    separation: float
    background: float
    particle: float
    classes: int

    def level(self, fraction: float) -> float:
        """Grey level ``fraction`` of the way from the background to the particle level."""
        return self.background + fraction * (self.particle - self.background)


def grey_levels(img: np.ndarray) -> GreyLevels:
    """Background and particle grey levels, robust to dark shadows between particles.

    SEM images of particles on a substrate often hold three grey classes: dark shadows in the
    gaps between particles, the flat substrate and the bright particles; two-class Otsu then
    may split shadows from substrate + particles. Both the two-class Otsu threshold and the
    upper three-class (multi-Otsu) threshold are tried and the one whose foreground is the more
    compact (area-weighted solidity of its connected components) is kept: the wrong one takes
    in the sprawling substrate, or cuts particles into ragged bright patches.

    Parameters
    ----------
    img : ndarray, shape (H, W), float
        Denoised intensity, bright particles.

    Returns
    -------
    GreyLevels
    """
    step = max(1, int(np.ceil(np.sqrt(img.size / 120_000))))  # judge on <= ~120k pixels
    sub = img[::step, ::step]
    t2 = float(filters.threshold_otsu(sub))
    sep, classes = t2, 2
    try:
        t3 = float(filters.threshold_multiotsu(sub, classes=3)[1])
    except ValueError:  # too few grey levels for three classes
        t3 = t2
    if abs(t3 - t2) > 1e-6 and _compactness(sub > t3) > _compactness(sub > t2):
        sep, classes = t3, 3
    below = sub[sub <= sep]
    above = sub[sub > sep]
    lo, hi = float(sub.min()), float(sub.max())
    if below.size == 0 or above.size == 0:
        return GreyLevels(sep, lo, hi, classes)
    hist, edges = np.histogram(below, bins=256, range=(lo, sep))
    hist = np.convolve(hist, np.ones(3) / 3.0, mode="same")
    k = int(np.argmax(hist))
    background = float(0.5 * (edges[k] + edges[k + 1]))
    return GreyLevels(sep, background, float(np.median(above)), classes)


def auto_threshold(img: np.ndarray, level: float = 0.2) -> float:
    """Threshold ``level`` of the way from the background to the particle grey level.

    See :func:`grey_levels`. A low level keeps dim particles (lobes that charge less);
    :func:`segment_classical` then places each outline on the steepest edge.
    """
    return grey_levels(img).level(level)


def _global_threshold(img: np.ndarray, method: str, level: float = 0.2) -> float:
    if method == "auto":
        return auto_threshold(img, level)
    if method == "otsu":
        return float(filters.threshold_otsu(img))
    if method == "li":
        return float(filters.threshold_li(img))
    if method == "triangle":
        return float(filters.threshold_triangle(img))
    raise ValueError(f"unknown global threshold method {method!r}")


def _fill_small_holes(mask: np.ndarray, max_area: float) -> np.ndarray:
    """Fill holes (background enclosed by foreground) of at most ``max_area`` px."""
    holes = ndi.binary_fill_holes(mask) & ~mask
    if not holes.any():
        return mask
    lab, n = ndi.label(holes)
    small = np.bincount(lab.ravel()) <= max_area
    small[0] = False
    return mask | small[lab]


def _drop_small_objects(mask: np.ndarray, min_area: int) -> np.ndarray:
    if min_area <= 1:
        return mask
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    small = np.bincount(lab.ravel()) < min_area
    small[0] = True
    return ~small[lab]


def estimate_diameter_px(intensity: np.ndarray, *, dark_particles: bool = False,
                         levels: GreyLevels | None = None, smoothed: np.ndarray | None = None) -> float:
    """Estimate the typical particle (or lobe) diameter from the image alone.

    The image (Gaussian sigma 1 px) is thresholded half-way between its background and
    particle grey levels and lightly opened; every local maximum of the mask's distance map is
    the radius of a disc inscribed in a particle. The median of those radii, weighted by the
    disc area (so ridge points of specks and necks count little), times two, is the estimate.
    The inscribed disc of a particle packed among others is a little smaller than its
    equivalent circle, so this errs low by a few per cent in dense packings.

    Parameters
    ----------
    intensity : ndarray, shape (H, W), float in [0, 1]
    dark_particles : bool
        Particles darker than the background.
    levels : GreyLevels, optional
        Grey levels of the sigma-1 smoothed image, when already known.
    smoothed : ndarray, shape (H, W), optional
        That sigma-1 smoothed image (of ``1 - intensity`` for dark particles), when already known.

    Returns
    -------
    float
        Expected diameter in px (at least 4).
    """
    img = 1.0 - intensity if dark_particles else intensity
    s = smoothed if smoothed is not None else filters.gaussian(img, sigma=1.0, preserve_range=True)
    if float(s.max()) <= float(s.min()):
        return _MIN_DIAMETER_PX
    levels = levels if levels is not None else grey_levels(s)
    fg = ndi.binary_opening(s > levels.level(0.5))
    if not fg.any():
        return _MIN_DIAMETER_PX
    edt = ndi.distance_transform_edt(fg)
    peaks = (edt == ndi.maximum_filter(edt, size=5)) & (edt >= 2.0)
    r = edt[peaks]
    if r.size == 0:
        return _MIN_DIAMETER_PX
    w = r * r
    order = np.argsort(r)
    cw = np.cumsum(w[order])
    median_r = float(r[order][np.searchsorted(cw, 0.5 * cw[-1])])
    return max(_MIN_DIAMETER_PX, 2.0 * median_r)


def segment_classical(
    intensity: np.ndarray,
    cfg: ClassicalConfig,
    *,
    expected_diameter_px: float | None = None,
) -> ClassicalResult:
    """Segment particles (or lobes of fused particles) in a grey image.

    Parameters
    ----------
    intensity : ndarray, shape (H, W), float
        Grey values in [0, 1] (see :meth:`qcloop.records.SemImage.intensity`).
    cfg : ClassicalConfig
        Every ``None`` field is derived from the image.
    expected_diameter_px : float, optional
        Overrides ``cfg.expected_diameter_px`` and the automatic estimate.

    Returns
    -------
    ClassicalResult
        ``labels`` (int32, 0 = background) and the intermediate images.
    """
    img = np.asarray(intensity, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"intensity must be 2-D, got shape {img.shape}")
    if cfg.dark_particles:
        img = 1.0 - img
    empty = np.zeros(img.shape, np.int32)
    base = filters.gaussian(img, sigma=1.0, preserve_range=True).astype(np.float32)
    if float(base.max()) <= float(base.min()):
        return ClassicalResult(empty, np.zeros(img.shape, bool), base, float("nan"), 1.0, 0.0)
    levels = grey_levels(base) if cfg.threshold == "auto" else None
    d = expected_diameter_px or cfg.expected_diameter_px
    if d is None:
        # base is exactly the sigma-1 smoothing estimate_diameter_px would compute
        d = estimate_diameter_px(img, levels=levels,
                                 smoothed=base if base.dtype == img.dtype else None)
    d = float(d)
    r = d / 2.0
    sigma = cfg.denoise_sigma_px if cfg.denoise_sigma_px is not None else max(1.0, d / 25.0)
    if sigma == 1.0:
        smoothed = base
    elif sigma > 0:
        smoothed = filters.gaussian(img, sigma=sigma, preserve_range=True).astype(np.float32)
    else:
        smoothed = img

    marker_thr: float | np.ndarray
    if cfg.threshold == "local":
        block = cfg.local_block_size_px or int(3 * d)
        block = max(3, block | 1)  # odd
        thr: float | np.ndarray = filters.threshold_local(smoothed, block_size=block, method="gaussian")
        thr = thr + cfg.threshold_offset
        marker_thr = thr
    elif levels is not None:  # auto
        thr = levels.level(cfg.auto_level) + cfg.threshold_offset
        # markers come from the brighter half, where contact lines still separate particles
        marker_thr = max(thr, levels.level(0.5) + cfg.threshold_offset)
    else:
        thr = _global_threshold(smoothed, cfg.threshold) + cfg.threshold_offset
        marker_thr = thr
    expected_area = np.pi * r * r
    min_area = cfg.min_area_px if cfg.min_area_px is not None else max(4, int(0.1 * expected_area))
    fg = _fill_small_holes(smoothed > thr, cfg.max_hole_frac * expected_area)
    fg = _drop_small_objects(fg, min_area)
    if not fg.any():
        return ClassicalResult(empty, fg, smoothed, d, sigma, thr)

    if cfg.split_touching:
        mcore = _fill_small_holes(smoothed > marker_thr, cfg.max_hole_frac * expected_area) & fg
        edt = ndi.distance_transform_edt(mcore).astype(np.float32)
        markers = _markers(edt, fg, r, cfg.split_min_distance_frac)
        # landscape: darkness (contact lines) plus the inverted distance map of the cores
        lo, hi = np.percentile(smoothed[fg], [5, 95])
        dark = np.clip((hi - smoothed) / max(hi - lo, 1e-6), 0, 1)
        landscape = dark - 0.5 * np.minimum(edt, r) / r
        labels = segmentation.watershed(landscape, markers, mask=fg)
    else:
        labels, _ = ndi.label(fg)
    if cfg.refine_outline:
        labels = refine_outline(labels, smoothed, max(2, int(round(d / 10.0))))
        labels = open_regions(labels, max(1, int(round(d / 16.0))))
    labels = _drop_small(labels, min_area)
    return ClassicalResult(labels.astype(np.int32, copy=False), fg, smoothed, d, sigma, thr)


def open_regions(labels: np.ndarray, radius: int) -> np.ndarray:
    """Morphological opening of every region on its own: strips thinner than ``2 radius`` px
    (flooded gaps, bits of a neighbour's contact line) are cut off; cuts between regions stay.

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)
    radius : int
        Radius of the disc structuring element, px.

    Returns
    -------
    ndarray of int32, shape (H, W)
    """
    fg = labels > 0
    # take out both sides of every cut so regions are opened separately
    cut = np.zeros_like(fg)
    h = (labels[:, :-1] != labels[:, 1:]) & fg[:, :-1] & fg[:, 1:]
    v = (labels[:-1, :] != labels[1:, :]) & fg[:-1, :] & fg[1:, :]
    cut[:, :-1] |= h
    cut[:, 1:] |= h
    cut[:-1, :] |= v
    cut[1:, :] |= v
    opened = ndi.binary_opening(fg & ~cut, structure=morphology.disk(radius))
    kept = np.where(opened, labels, 0)
    # cut pixels come back where their own region kept a 4-neighbour
    grown = ndi.grey_dilation(kept, footprint=ndi.generate_binary_structure(2, 1))
    back = cut & (grown == labels)
    return np.where(opened | back, labels, 0).astype(np.int32)


def refine_outline(labels: np.ndarray, smoothed: np.ndarray, band_px: int) -> np.ndarray:
    """Move each region's outer outline onto the steepest edge within ``band_px`` of it.

    A watershed over the gradient magnitude grows the regions' inner parts (pixels deeper than
    ``band_px`` inside the foreground) and the background (pixels farther than ``band_px``
    outside) towards each other; they meet on the gradient ridge, i.e. the edge's inflection,
    whatever the particle's own brightness. Cuts between touching regions are kept.

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)
    smoothed : ndarray of float, shape (H, W)
        Denoised intensity.
    band_px : int
        Half-width of the band in which the outline may move, px.

    Returns
    -------
    ndarray of int32, shape (H, W)
    """
    fg = labels > 0
    if not fg.any():
        return labels.astype(np.int32, copy=False)
    n = int(labels.max())
    if fg.all():
        depth = ndi.distance_transform_edt(fg)
        outside = ndi.distance_transform_edt(~fg)
        deep_in, near_in = depth > band_px, depth <= band_px + 1
        deep_out, near_out = outside > band_px, outside <= band_px + 1
    else:
        # only distances up to band_px + 1 matter: squared distances capped there (exact below)
        depth2 = _squared_distance_capped(~fg, band_px + 1)
        outside2 = _squared_distance_capped(fg, band_px + 1)
        deep_in, near_in = depth2 > band_px**2, depth2 <= (band_px + 1) ** 2
        deep_out, near_out = outside2 > band_px**2, outside2 <= (band_px + 1) ** 2
    markers = np.where(deep_in, labels, 0).astype(np.int32)
    markers[deep_out] = n + 1
    grad = filters.sobel(smoothed)
    # flood only the band (plus a rim of each side's markers)
    band = near_out & near_in
    out = segmentation.watershed(grad, np.where(band, markers, 0), mask=band)
    out[out == n + 1] = 0
    # pixels of the band keep their original region where they stay foreground; deeper
    # pixels are untouched
    keep = (out > 0) & fg
    out[keep] = labels[keep]
    deep = ~near_in
    out[deep] = labels[deep]
    return out.astype(np.int32, copy=False)


def _squared_distance_capped(zero: np.ndarray, cap: int) -> np.ndarray:
    """Squared Euclidean distance (px^2) of every pixel to the nearest ``True`` of ``zero``.

    Exact wherever the distance is at most ``cap`` px (the squared distance that
    ``ndi.distance_transform_edt(~zero)`` gives); larger distances come out as some value
    above ``cap**2``. A row pass (distance to the nearest zero in the row) and a column pass
    over offsets ``-cap..cap``.

    Parameters
    ----------
    zero : ndarray of bool, shape (H, W)
    cap : int

    Returns
    -------
    ndarray of int64, shape (H, W)
    """
    h, w = zero.shape
    big = 4 * (h + w + cap + 2)
    idx = np.arange(w, dtype=np.int64)[None, :]
    left = np.maximum.accumulate(np.where(zero, idx, -big), axis=1)
    right = np.minimum.accumulate(np.where(zero, idx, big)[:, ::-1], axis=1)[:, ::-1]
    g = np.minimum(np.minimum(idx - left, right - idx), cap + 1)
    g2 = g * g
    d2 = g2.copy()
    for k in range(1, min(cap, h - 1) + 1):
        np.minimum(d2[k:], g2[:-k] + k * k, out=d2[k:])
        np.minimum(d2[:-k], g2[k:] + k * k, out=d2[:-k])
    return d2


def _markers(edt: np.ndarray, fg: np.ndarray, r: float, min_distance_frac: float) -> np.ndarray:
    """One marker per inscribed-disc centre: local maxima of the (lightly smoothed) distance
    map at least ``min_distance_frac * r`` px apart and at least ``r / 4`` deep; every
    foreground component gets at least one.
    """
    smooth = ndi.gaussian_filter(edt, 1.0)
    cc, ncc = ndi.label(fg)
    min_dist = max(2, int(round(min_distance_frac * r)))
    pts = feature.peak_local_max(smooth, min_distance=min_dist, threshold_abs=max(1.0, 0.25 * r),
                                 labels=cc, exclude_border=False)
    markers = np.zeros(edt.shape, np.int32)
    markers[pts[:, 0], pts[:, 1]] = np.arange(1, len(pts) + 1)
    has = np.zeros(ncc + 1, bool)
    has[cc[markers > 0]] = True
    missing = np.flatnonzero(~has[1:]) + 1
    if missing.size:
        pos = np.asarray(ndi.maximum_position(edt, cc, index=missing)).reshape(-1, 2)
        markers[pos[:, 0], pos[:, 1]] = np.arange(len(pts) + 1, len(pts) + 1 + len(pos))
    return markers


def _drop_small(labels: np.ndarray, min_area: int) -> np.ndarray:
    if labels.max() == 0:
        return labels
    counts = np.bincount(labels.ravel())
    small = counts < min_area
    small[0] = False
    if small.any():
        labels = labels.copy()
        labels[small[labels]] = 0
    out, _, _ = segmentation.relabel_sequential(labels)
    return out


class ClassicalSegmenter:
    """Callable segmenter ``(SemImage) -> Segmentation`` (see :func:`segment_classical`)."""

    name = "classical"

    def __init__(self, cfg: ClassicalConfig | None = None):
        self.cfg = cfg if cfg is not None else ClassicalConfig()

    def __call__(self, image: SemImage) -> Segmentation:
        res = segment_classical(image.intensity(), self.cfg)
        return Segmentation(labels=res.labels, method=self.name)


def detect_candidates(image: SemImage, cfg: ClassicalConfig | None = None) -> pd.DataFrame:
    """Particle candidates for prompting another segmenter (one row per classical region).

    Returns
    -------
    pandas.DataFrame
        Columns ``x, y`` (centroid column / row, px, full-frame coordinates), ``bbox_r0,
        bbox_c0, bbox_r1, bbox_c1`` (rows/cols, end exclusive, px) and ``label`` (the region's
        label in the classical segmentation).
    """
    cfg = cfg if cfg is not None else ClassicalConfig()
    labels = segment_classical(image.intensity(), cfg).labels
    cols = ["x", "y", "bbox_r0", "bbox_c0", "bbox_r1", "bbox_c1", "label"]
    if labels.max() == 0:
        return pd.DataFrame({c: pd.Series(dtype=float if c in "xy" else np.int64) for c in cols})
    t = measure.regionprops_table(labels, properties=("label", "centroid", "bbox"))
    return pd.DataFrame(
        {
            "x": t["centroid-1"],
            "y": t["centroid-0"],
            "bbox_r0": t["bbox-0"],
            "bbox_c0": t["bbox-1"],
            "bbox_r1": t["bbox-2"],
            "bbox_c1": t["bbox-3"],
            "label": t["label"],
        }
    )[cols]
