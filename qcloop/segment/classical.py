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
   level (low, so dim lobes stay whole; outlines are placed in step 6), or a global Otsu /
   Li / triangle, or ``local`` (Gaussian-weighted mean over about three particle diameters).
   Where the local background is darker than the substrate (shadows between packed
   particles) the threshold follows it down. Small holes are filled; components with fewer
   than a tenth of the expected area above the threshold proper are dropped.
5. **Split touching particles**: the *cores* (:func:`marker_core`) are the pixels brighter
   than half-way from the threshold to the brightest grey level within about a radius, so
   the darker contact lines between particles fall out, and the middle of a dim particle
   whose edge is brighter than its centre is filled in. Markers are the centres of the discs
   inscribed in the cores (maxima of their distance map, each the deepest point within half
   a radius, at least ``split_min_distance_frac`` x radius apart). A core too big for the
   discs inscribed at its markers (a small lobe merged into the core of a bigger one, as the
   middle lobe of a trimer) gets a marker at its deepest point well away from them
   (:func:`_lobe_markers`). A watershed floods the cores first (a core holding several
   markers, as the merged cores of fused lobes, is split at its narrowest part; one with an
   added lobe marker along the radical lines of the markers' discs) and then the rest of the
   foreground by the darkness of the image, so cuts follow the dark contact lines.
6. **Outline** (:func:`half_max_outline`): each region keeps the pixels of its basin brighter
   than half-way between its own grey level and that of its surroundings (the full width
   at half maximum, the same for a free-standing and a packed particle); strips thinner
   than d / 8 are opened off (:func:`open_regions`).

The regions are whole particles or lobes; :func:`qcloop.lobes.group_lobes` groups lobes into
particles and splits regions holding several lobes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage import feature, filters, measure, morphology, segmentation

from qcloop._binary import cross_opening, cross_step, cut_pixels
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
    "half_max_outline",
    "marker_core",
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
    """Area-weighted mean solidity of the connected components of ``mask`` (0 when empty).

    Components below ``min_area`` px are left out. The convex hull of every component is
    approximated by the 32-gon of its supporting lines in 32 directions (all components at
    once; 0.3 % too large for a disc); its area counts the pixel centres it covers (polygon
    area + half its perimeter + 1, as for a polygon through pixel centres).
    """
    lab, n = ndi.label(mask)
    if n == 0:
        return 0.0
    area = np.bincount(lab.ravel(), minlength=n + 1).astype(float)
    keep = area >= min_area
    keep[0] = False
    if not keep.any():
        return 0.0
    edge = mask & ~cross_step(mask, True) & keep[lab]
    ys, xs = np.nonzero(edge)
    ids = lab[ys, xs]
    order = np.argsort(ids, kind="stable")
    ys, xs, ids = ys[order].astype(float), xs[order].astype(float), ids[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    angles = np.linspace(0.0, 2 * np.pi, 32, endpoint=False)
    cos, sin = np.cos(angles), np.sin(angles)
    # support function h_j = max over the component of (x, y) . u_j
    h = np.stack([np.maximum.reduceat(xs * c + ys * s, starts) for c, s in zip(cos, sin)], 1)
    # vertex j: where the supporting lines j and j + 1 meet
    c1, s1 = np.roll(cos, -1), np.roll(sin, -1)
    det = cos * s1 - sin * c1
    h1 = np.roll(h, -1, 1)
    vx = (h * s1 - h1 * sin) / det
    vy = (cos * h1 - c1 * h) / det
    twice_area = np.abs((vx * np.roll(vy, -1, 1) - vy * np.roll(vx, -1, 1)).sum(1))
    perimeter = np.hypot(np.roll(vx, -1, 1) - vx, np.roll(vy, -1, 1) - vy).sum(1)
    a = area[ids[starts]]
    solidity = np.minimum(1.0, a / (twice_area / 2 + perimeter / 2 + 1))
    return float(np.sum(solidity * a) / a.sum())


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
    :func:`segment_classical` then places each outline at half maximum (:func:`half_max_outline`).
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
    """Fill holes (background enclosed by foreground) of at most ``max_area`` px.

    A hole is a 4-connected background component that does not reach the image edge.
    """
    bg, n = ndi.label(~mask)
    if n == 0:
        return mask
    small = np.bincount(bg.ravel(), minlength=n + 1) <= max_area
    small[0] = False
    small[np.concatenate([bg[0], bg[-1], bg[:, 0], bg[:, -1]])] = False
    if not small.any():
        return mask
    return mask | small[bg]


def _half_res_filter(fn, img: np.ndarray, size: float) -> np.ndarray:
    """Minimum or maximum (``fn``: ``ndi.minimum_filter`` / ``ndi.maximum_filter``) over a
    ``size`` px window, on 2 x 2 blocks (each reduced to its own minimum / maximum first) and
    spread back: about 8x cheaper, the window a pixel coarser."""
    h, w = img.shape
    even = np.pad(img, ((0, h % 2), (0, w % 2)), mode="edge")
    blocks = even.reshape(even.shape[0] // 2, 2, even.shape[1] // 2, 2)
    reduce = np.minimum if fn is ndi.minimum_filter else np.maximum
    small = reduce(reduce(blocks[:, 0, :, 0], blocks[:, 0, :, 1]),
                   reduce(blocks[:, 1, :, 0], blocks[:, 1, :, 1]))
    half = fn(small, size=max(3, int(size / 2.0) | 1))
    return np.repeat(np.repeat(half, 2, axis=0), 2, axis=1)[:h, :w]


def _keep_components_with(mask: np.ndarray, seeds: np.ndarray, min_count: int = 1) -> np.ndarray:
    """Connected components of ``mask`` holding at least ``min_count`` ``seeds`` pixels."""
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    keep = np.bincount(lab[seeds & mask], minlength=n + 1) >= min_count
    keep[0] = False
    return keep[lab]


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
    fg = cross_opening(s > levels.level(0.5), 1)
    if not fg.any():
        return _MIN_DIAMETER_PX
    edt = ndi.distance_transform_edt(fg).astype(np.float32)
    peaks = (edt == ndi.maximum_filter(edt, size=5)) & (edt >= 2.0)
    r = edt[peaks]
    if r.size == 0:
        return _MIN_DIAMETER_PX
    w = r * r
    order = np.argsort(r)
    cw = np.cumsum(w[order])
    median_r = float(r[order][np.searchsorted(cw, 0.5 * cw[-1])])
    return max(_MIN_DIAMETER_PX, 2.0 * median_r)


#: Outline level: half-way between the region's own grey level and its surroundings' (FWHM).
_OUTLINE_LEVEL = 0.5
#: The surroundings of a region: background pixels within this many diameters of it.
_RING_FRAC = 0.4
#: Markers: core pixels are brighter than this fraction of the way from the threshold to the
#: brightest grey level within about one radius.
_CORE_LEVEL = 0.5
#: Markers: the distance map of the cores peaks at least this many radii deep.
_PEAK_DEPTH = 0.25
#: Markers: a peak is the deepest point within this many radii.
_PEAK_WINDOW = 0.5
#: Lobe markers: a core is examined when it is more than this many times the area of the discs
#: inscribed at its markers.
_LOBE_EXCESS = 1.35
#: Lobe markers: a new marker is at least this many radii from the other markers of its core ...
_LOBE_APART = 1.2
#: ... and at least this many radii deep in the core.
_LOBE_CORE = 0.5
#: Lobe markers: at most this many are added to one core.
_LOBE_ROUNDS = 3
#: Foreground where the local background is dark: this fraction of the particle-substrate
#: contrast above the local background.
_LOCAL_FG_LEVEL = 0.5
#: A region is a particle when it is at least this fraction of the particle-substrate contrast
#: brighter than its surroundings.
_MIN_CONTRAST = 0.5


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
    base = ndi.gaussian_filter(img, 1.0, mode="nearest", truncate=4.0)
    if float(base.max()) <= float(base.min()):
        return ClassicalResult(empty, np.zeros(img.shape, bool), base, float("nan"), 1.0, 0.0)
    levels = grey_levels(base)
    d = expected_diameter_px or cfg.expected_diameter_px
    if d is None:
        d = estimate_diameter_px(img, levels=levels, smoothed=base)
    d = float(d)
    r = d / 2.0
    sigma = cfg.denoise_sigma_px if cfg.denoise_sigma_px is not None else max(1.0, d / 25.0)
    if sigma == 1.0:
        smoothed = base
    elif sigma > 1.0:  # Gaussians compose: the rest of the blur on top of base's (shorter kernel)
        smoothed = ndi.gaussian_filter(base, np.sqrt(sigma * sigma - 1.0), mode="nearest", truncate=4.0)
    elif sigma > 0:
        smoothed = ndi.gaussian_filter(img, sigma, mode="nearest", truncate=4.0)
    else:
        smoothed = img

    thr: float | np.ndarray
    if cfg.threshold == "local":
        block = cfg.local_block_size_px or int(3 * d)
        block = max(3, block | 1)  # odd
        thr = filters.threshold_local(smoothed, block_size=block, method="gaussian") + cfg.threshold_offset
    elif cfg.threshold == "auto":
        thr = levels.level(cfg.auto_level) + cfg.threshold_offset
    else:
        thr = _global_threshold(smoothed, cfg.threshold) + cfg.threshold_offset
    expected_area = np.pi * r * r
    min_area = cfg.min_area_px if cfg.min_area_px is not None else max(4, int(0.1 * expected_area))
    max_hole = cfg.max_hole_frac * expected_area
    # where the local background is darker than the substrate (shadows between packed
    # particles) the particles are dimmer too: the threshold follows the local background
    contrast = max(levels.particle - levels.background, 0.0)
    local_bg = _half_res_filter(ndi.minimum_filter, smoothed, d)
    thr_map = np.minimum(thr, local_bg + _LOCAL_FG_LEVEL * contrast)
    fg = _fill_small_holes(smoothed > thr_map, max_hole)
    # ... but only around particles: components with fewer than min_area pixels above the
    # threshold proper (substrate next to shadows, specks) are background
    fg = _keep_components_with(fg, smoothed > thr, min_area)
    if not fg.any():
        return ClassicalResult(empty, fg, smoothed, d, sigma, thr)

    if cfg.split_touching:
        cores = _core_components(img, fg, thr, d, max_hole)
        core = cores > 0
        # depth of the cores in radii (lightly smoothed: no ridge noise)
        depth = ndi.gaussian_filter(ndi.distance_transform_edt(core).astype(np.float32), 1.0) / r
        markers = _markers(depth, cores, r, cfg.split_min_distance_frac, min_area)
        markers, lobed = _lobe_markers(depth, cores, markers, r)
        labels = _split(smoothed, fg, cores, depth, markers, lobed, r)
    else:
        labels, _ = ndi.label(fg)
    if cfg.refine_outline:
        labels = half_max_outline(labels, smoothed, fg, max(2, int(round(_RING_FRAC * d))), max_hole,
                                  min_contrast=_MIN_CONTRAST * contrast,
                                  core=core if cfg.split_touching else None)
        labels = open_regions(labels, max(1, int(round(d / 16.0))))
    labels = _drop_small(labels, min_area)
    return ClassicalResult(labels.astype(np.int32, copy=False), fg, smoothed, d, sigma, thr)


def _core_components(img: np.ndarray, fg: np.ndarray, thr: float | np.ndarray, d: float,
                     max_hole: float) -> np.ndarray:
    """Labelled cores (:func:`marker_core`), 0 = no core."""
    ms = ndi.gaussian_filter(img, max(1.0, 0.1 * d), mode="nearest", truncate=3.0)
    brightest = _half_res_filter(ndi.maximum_filter, ms, d / 2.0)
    core = (ms > thr + _CORE_LEVEL * (brightest - thr)) & fg
    cc, n = ndi.label(core)
    bg, nb = ndi.label(~core)
    if n == 0 or nb < 2:
        return cc
    # holes: small ones, and the middle of a ring-shaped core (a dim particle whose edge is
    # brighter than its middle) up to a quarter of the expected area, where the ring is no
    # bigger than 1.5 particles (the gap enclosed by the merged cores of several stays open)
    expected_area = np.pi * d * d / 4.0
    size = np.bincount(bg.ravel(), minlength=nb + 1)
    area = np.bincount(cc.ravel(), minlength=n + 1)
    enclosing = np.zeros(nb + 1, np.int32)
    for a, b in ((bg[:, :-1], cc[:, 1:]), (bg[:, 1:], cc[:, :-1]), (bg[:-1], cc[1:]), (bg[1:], cc[:-1])):
        m = (a > 0) & (b > 0)
        enclosing[a[m]] = b[m]
    fill = (size <= max_hole) | ((size <= 0.25 * expected_area) & (area[enclosing] <= 1.5 * expected_area))
    fill &= enclosing > 0
    fill[0] = False
    fill[np.concatenate([bg[0], bg[-1], bg[:, 0], bg[:, -1]])] = False
    holes = fill[bg] & fg
    cc[holes] = enclosing[bg[holes]]
    return cc


def _split(smoothed: np.ndarray, fg: np.ndarray, cores: np.ndarray, depth: np.ndarray,
           markers: np.ndarray, lobed: dict[int, tuple[slice, slice]] | None = None,
           r: float = 1.0) -> np.ndarray:
    """Watershed of the foreground from ``markers``.

    The landscape is ``-depth`` on the cores (``cores``: labelled; flooded first, so a core
    holding several markers, as the merged cores of two lobes, is split along its narrowest
    part) and the darkness of the image on the rest of the foreground (cuts between touching
    particles follow the dark contact lines).
    A core holding one marker is that marker's in one piece, so only its outline pixels take
    part in the flooding (the costly part of a watershed is the number of pixels it floods).
    The cores flagged in ``lobed`` (:func:`_lobe_markers`) are split by :func:`_power_split`
    instead (``r``: the expected radius, px, the unit of ``depth``).
    """
    cc, ncc = cores, int(cores.max())
    per = np.bincount(cc[markers > 0], minlength=ncc + 1)
    per[0] = 0
    owner = np.zeros(ncc + 1, np.int32)
    one = markers > 0
    owner[cc[one & (per[cc] == 1)]] = markers[one & (per[cc] == 1)]
    seeds = owner[cc]
    several = (per >= 2)[cc]
    if several.any():
        rows, cols = ndi.find_objects(several.astype(np.int8))[0]
        box = np.s_[rows, cols]
        part = segmentation.watershed(-depth[box], markers[box], mask=several[box])
        seeds[box] = np.where(several[box], part, seeds[box])
    if lobed:
        _power_split(seeds, cc, markers, depth, lobed, r)
    lo, hi = np.percentile(smoothed[fg], [5, 95])
    dark = np.clip((hi - smoothed) / max(float(hi - lo), 1e-6), 0, 1)
    landscape = np.where(cc > 0, -depth, dark)
    # pixels of a seed whose 4 neighbours are all the same seed stay out of the flooding
    inner = seeds > 0
    inner[1:-1, 1:-1] &= ((seeds[1:-1, 1:-1] == seeds[:-2, 1:-1]) & (seeds[1:-1, 1:-1] == seeds[2:, 1:-1])
                          & (seeds[1:-1, 1:-1] == seeds[1:-1, :-2]) & (seeds[1:-1, 1:-1] == seeds[1:-1, 2:]))
    inner[[0, -1], :] = False
    inner[:, [0, -1]] = False
    # a piece of the rest of the foreground next to one seed only (the rim of a free-standing
    # particle) is that seed's: only the pieces between several seeds are flooded
    rest = fg & (seeds == 0)
    pieces, n = ndi.label(rest)
    count = np.zeros(n + 1)
    total = np.zeros(n + 1)
    square = np.zeros(n + 1)
    for a, b in ((pieces[:, :-1], seeds[:, 1:]), (pieces[:, 1:], seeds[:, :-1]),
                 (pieces[:-1], seeds[1:]), (pieces[1:], seeds[:-1])):
        m = (a > 0) & (b > 0)
        piece, lab = a[m], b[m].astype(np.float64)
        count += np.bincount(piece, minlength=n + 1)
        total += np.bincount(piece, lab, minlength=n + 1)
        square += np.bincount(piece, lab * lab, minlength=n + 1)
    mean = total / np.maximum(count, 1)
    single = (count == 0) | (square == mean * total)  # no seed, or one seed label all round
    single[0] = False
    direct = np.where(single, np.rint(mean), 0).astype(np.int32)[pieces]
    flood = segmentation.watershed(landscape, np.where(seeds > 0, seeds, markers),
                                   mask=fg & ~inner & ~single[pieces])
    return np.where(inner, seeds, np.where(direct > 0, direct, flood))


def marker_core(img: np.ndarray, fg: np.ndarray, thr: float | np.ndarray, d: float,
                max_hole: float) -> np.ndarray:
    """Bright cores of the particles, one blob per particle where contact lines separate them.

    The image is smoothed with a Gaussian of ``d / 10`` (noise no longer cuts dim particles'
    cores apart) and kept where it is brighter than half-way from the threshold to the
    brightest grey level within about one radius: a dim particle next to bright ones keeps
    its own core, and the darker contact line between two touching particles falls out.
    Holes up to ``max_hole`` are filled, and so is the middle of a ring-shaped core (a dim
    particle whose edge is brighter than its middle: up to a quarter of the expected particle
    area, enclosed by a core of at most 1.5 particles).

    Parameters
    ----------
    img : ndarray, shape (H, W), float32
        Intensity (bright particles).
    fg : ndarray of bool
        Foreground mask; the core lies inside it.
    thr : float or ndarray
        Foreground threshold (global value or per-pixel image).
    d : float
        Expected particle diameter, px.
    max_hole : float
        Holes up to this area (px) are filled.

    Returns
    -------
    ndarray of bool, shape (H, W)
    """
    return _core_components(img, fg, thr, d, max_hole) > 0


def _region_medians(values: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Median of ``values`` (in [0, 1]) over every label 1..n, to 1/1024; NaN where empty.

    One 2-D histogram (label x grey bin) instead of a sort per label.
    """
    bins = 1024
    q = np.clip((values * bins).astype(np.int64), 0, bins - 1)
    sel = labels > 0
    lab = labels[sel].astype(np.int64)
    hist = np.bincount(lab * bins + q[sel], minlength=(n + 1) * bins).reshape(n + 1, bins)
    cum = np.cumsum(hist, axis=1)
    total = cum[:, -1]
    k = np.argmax(cum >= ((total + 1) // 2)[:, None], axis=1)
    med = (k + 0.5) / bins
    med = med.astype(np.float64)
    med[total == 0] = np.nan
    return med


def half_max_outline(basins: np.ndarray, smoothed: np.ndarray, fg: np.ndarray, ring_px: int,
                     max_hole: float, min_contrast: float = 0.0,
                     core: np.ndarray | None = None) -> np.ndarray:
    """Put every region's outline half-way between its own grey level and its surroundings'.

    The particle level is the median grey of the region's foreground pixels, the surrounding
    level the median grey of the background pixels (outside ``fg``) within ``ring_px`` of it:
    the substrate around an isolated particle, the dark gaps and shadows around a packed one.
    A pixel of the region's watershed basin stays in the region where the image is brighter
    than half-way between the two (the full width at half maximum of a blurred particle, which
    does not depend on how bright the particle is). Small holes are filled.

    Parameters
    ----------
    basins : ndarray of int, shape (H, W)
        Watershed basins 1..n (the largest extent each region may take), 0 = background.
    smoothed : ndarray of float, shape (H, W)
        Denoised intensity in [0, 1].
    fg : ndarray of bool, shape (H, W)
        Thresholded foreground.
    ring_px : int
        Width of the ring of surroundings, px.
    max_hole : float
        Holes up to this area (px) are filled with the basin they lie in.
    min_contrast : float
        Regions less than this much brighter than their surroundings are dropped.
    core : ndarray of bool, shape (H, W), optional
        Bright cores of the particles (:func:`marker_core`); where given, the particle level
        is the median grey of the region's core pixels (the foreground may take in some
        substrate next to shadows), else of its foreground pixels.

    Returns
    -------
    ndarray of int32, shape (H, W)
    """
    n = int(basins.max())
    if n == 0:
        return basins.astype(np.int32, copy=False)
    values = np.clip(smoothed, 0.0, 1.0)
    inside = np.where(fg, basins, 0)
    particle = _region_medians(values, np.where(core, basins, 0), n) if core is not None \
        else np.full(n + 1, np.nan)
    if np.isnan(particle[1:]).any():  # regions without core pixels: their foreground's median
        particle = np.where(np.isnan(particle), _region_medians(values, inside, n), particle)
    # the ring is sampled on every second row and column (plenty for a median, 4x faster)
    ring = segmentation.expand_labels(inside[::2, ::2], distance=max(1.0, ring_px / 2.0))
    ring[fg[::2, ::2]] = 0
    around = _region_medians(values[::2, ::2], ring, n)
    # a region without background around it (inside a packed cluster): the darkest nearby
    lonely = np.isnan(around)
    if lonely.any():
        around[lonely] = float(np.percentile(values[~fg], 5)) if (~fg).any() else 0.0
    particle = np.where(np.isnan(particle), around, particle)
    level = around + _OUTLINE_LEVEL * (particle - around)
    level[0] = np.inf
    level[particle - around < min_contrast] = np.inf  # no particle: texture of the substrate
    out = np.where(values > level[basins], basins, 0).astype(np.int32)
    holes = _fill_small_holes(out > 0, max_hole) & (out == 0)
    out[holes] = basins[holes]
    return out


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
    cut = cut_pixels(labels)
    if radius <= 2:  # disk(1) is the cross, disk(2) the cross dilated by itself
        opened = cross_opening(fg & ~cut, radius)
    else:
        opened = ndi.binary_opening(fg & ~cut, structure=morphology.disk(radius))
    kept = np.where(opened, labels, 0)
    # cut pixels come back where their own region kept a 4-neighbour
    grown = ndi.grey_dilation(kept, footprint=ndi.generate_binary_structure(2, 1))
    back = cut & (grown == labels)
    return np.where(opened | back, labels, 0).astype(np.int32)


def _markers(depth: np.ndarray, cores: np.ndarray, r: float, min_distance_frac: float,
             min_area: int = 1) -> np.ndarray:
    """One marker per particle: the centres of the discs inscribed in the cores.

    Markers are the points of ``depth`` (distance map of the cores, in radii ``r``) that are
    the deepest within ``_PEAK_WINDOW`` radii (a small particle next to a large one keeps its
    own) and at least ``_PEAK_DEPTH`` deep; of two closer than ``min_distance_frac`` radii
    the deeper one is kept. Every core component (``cores``: labelled) of at least
    ``min_area`` px left without one gets one at its deepest pixel.
    """
    min_dist = max(2, int(round(min_distance_frac * r)))
    k = 2 * max(2, int(round(_PEAK_WINDOW * r))) + 1
    pts = feature.peak_local_max(depth, min_distance=min_dist, threshold_abs=_PEAK_DEPTH,
                                 footprint=np.ones((k, k), bool), exclude_border=False)
    markers = np.zeros(depth.shape, np.int32)
    markers[pts[:, 0], pts[:, 1]] = np.arange(1, len(pts) + 1)
    cc, ncc = cores, int(cores.max())
    if ncc == 0:
        return markers
    need = np.bincount(cc.ravel(), minlength=ncc + 1) >= min_area
    need[0] = False
    need[cc[markers > 0]] = False
    if need.any():
        # deepest pixel of every component without a marker
        flat = np.flatnonzero(need[cc])
        order = np.lexsort((depth.ravel()[flat], cc.ravel()[flat]))
        lab = cc.ravel()[flat[order]]
        last = flat[order][np.r_[lab[1:] != lab[:-1], True]]
        pos = np.unravel_index(last, depth.shape)
        markers[pos] = np.arange(len(pts) + 1, len(pts) + 1 + len(last))
    return markers


def _lobe_markers(depth: np.ndarray, cores: np.ndarray, markers: np.ndarray, r: float
                  ) -> tuple[np.ndarray, dict[int, tuple[slice, slice]]]:
    """Extra markers for lobes merged into the core of a bigger neighbour.

    A small lobe fused to a bigger one (the middle lobe of a trimer) often has no peak of its
    own in the cores' distance map: its ridge climbs into the bigger lobe. A core component
    more than ``_LOBE_EXCESS`` times the area of the discs inscribed at its markers (radius:
    the depth there) is too big for them: its deepest point at least ``_LOBE_APART`` radii from
    all its markers becomes a marker when it is at least ``_LOBE_CORE`` radii deep (up to
    ``_LOBE_ROUNDS`` times per component). A single disc has no such point. Cores touching the
    image edge (cut-off particles, not discs) are left alone.

    Parameters
    ----------
    depth : ndarray of float32, shape (H, W)
        Smoothed distance map of the cores, in radii ``r``.
    cores : ndarray of int, shape (H, W)
        Labelled core components, 0 = no core.
    markers : ndarray of int32, shape (H, W)
        Markers from :func:`_markers`.
    r : float
        Expected particle radius, px.

    Returns
    -------
    markers : ndarray of int32
        The markers with the new ones added.
    lobed : dict
        The core components that got a new marker: label -> bounding box (slices).
    """
    ncc = int(cores.max())
    lobed: dict[int, tuple[slice, slice]] = {}
    ys, xs = np.nonzero(markers)
    if ncc == 0 or ys.size == 0:
        return markers, lobed
    comp = cores[ys, xs]
    rad = depth[ys, xs] * r
    area = np.bincount(cores.ravel(), minlength=ncc + 1)
    discs = np.bincount(comp, np.pi * rad * rad, minlength=ncc + 1)
    cand = np.flatnonzero((area > _LOBE_EXCESS * discs) & (discs > 0))
    cand = cand[cand > 0]
    if cand.size == 0:
        return markers, lobed
    out = markers.copy()
    objs = ndi.find_objects(cores)
    h, w = cores.shape
    next_id = int(markers.max()) + 1
    for c in cand:
        sl = objs[c - 1]
        if sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == h or sl[1].stop == w:
            continue
        at = comp == c
        cy, cx = list(ys[at]), list(xs[at])
        # a new marker's disc (radius _LOBE_CORE) lies in the box, beyond _LOBE_APART of each marker
        reach = np.hypot(np.maximum(ys[at] - sl[0].start, sl[0].stop - 1 - ys[at]),
                         np.maximum(xs[at] - sl[1].start, sl[1].stop - 1 - xs[at]))
        if reach.min() < (_LOBE_APART + _LOBE_CORE) * r:
            continue
        own = cores[sl] == c
        yy = np.arange(sl[0].start, sl[0].stop)[:, None]
        xx = np.arange(sl[1].start, sl[1].stop)[None, :]
        for _ in range(_LOBE_ROUNDS):
            far = own.copy()
            for y0, x0 in zip(cy, cx):
                far &= (yy - y0) ** 2 + (xx - x0) ** 2 >= (_LOBE_APART * r) ** 2
            if not far.any():
                break
            dd = np.where(far, depth[sl], 0)
            k = int(np.argmax(dd))
            if dd.flat[k] < _LOBE_CORE:
                break
            y, x = np.unravel_index(k, dd.shape)
            out[sl][y, x] = next_id
            next_id += 1
            lobed[int(c)] = sl
            cy.append(y + sl[0].start)
            cx.append(x + sl[1].start)
    return out, lobed


def _power_split(seeds: np.ndarray, cores: np.ndarray, markers: np.ndarray, depth: np.ndarray,
                 lobed: dict[int, tuple[slice, slice]], r: float) -> None:
    """Split the ``lobed`` core components (in ``seeds``, in place) among their markers by the
    power distance ``|p - c|^2 - R^2`` (``R``: depth at the marker): two overlapping discs are
    cut along their radical line, the neck."""
    for c, sl in lobed.items():
        own = cores[sl] == c
        my, mx = np.nonzero(own & (markers[sl] > 0))
        yy = np.arange(own.shape[0])[:, None, None]
        xx = np.arange(own.shape[1])[None, :, None]
        power = (yy - my) ** 2 + (xx - mx) ** 2 - (depth[sl][my, mx] * r) ** 2
        ids = markers[sl][my, mx][np.argmin(power, axis=2)]
        seeds[sl] = np.where(own, ids, seeds[sl])


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
