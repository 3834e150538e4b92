"""Synthetic SEM micrographs of nanoparticles, with per-particle ground truth.

Used by the tests, the classifier benchmark and the simulated reactor: every image is built
from a :class:`SynthSpec` and a seed, and the same (spec, seed) always gives the same pixels.

What an image looks like
------------------------
Bright particles on a darker substrate, as in a secondary-electron (SE) image:

* substrate: a base grey level, a linear gradient in a random direction, a smooth low-frequency
  mottle and a faint fine texture;
* particles: a grey level above the substrate, *edge brightening* (the SE edge effect: signal
  rises towards the particle outline, ``edge_gain * exp(-d / edge_width)`` with ``d`` the
  distance to the outline inside the particle) except in the outermost pixel, which is darker
  (``- rim_dark * exp(-d / 0.9 px)``: the dark crevice where touching particles meet), a faint
  directional shading on faceted shapes
  (cubes, triangles), a darker seam where the lobes of fused particles (dumbbell, trimer,
  aggregate) meet and a faint dark halo on the substrate around each particle;
* optics and detector: Gaussian blur (beam spot, ``blur_sigma_px``) followed by shot noise
  (Poisson, ``dose`` = mean electron count at intensity 1) and a small per-scan-line offset;
* optionally the microscope's info banner at the bottom: a black band with white text-like
  blocks and a scale bar (rows below ``analysed_height_px``).

``contrast="dark"`` draws the same particles as a transmission image (TSEM, bright-field TEM):
dark particles on a bright substrate, darkest where they are thickest, optionally with a bright
Fresnel-like fringe just outside the outline (``halo``). ``halo`` on a bright image adds a bright
fringe outside every particle (the SE edge effect spilling onto the substrate). Both are off by
default: a spec without them gives exactly the pixels it gave before they existed.

Shapes
------
Every particle is a signed distance function (SDF) in its own frame, so the outline is drawn
anti-aliased at sub-pixel precision. Faceted classes (``cube``, ``triangle``,
``truncated_triangle``, ``rod``, ``bipyramid``: an elongated rhombus, the outline of a
bipyramid lying on its side) are convex polygons whose corners are rounded by the
``rounding`` parameter: 0 = sharp corners, 1 = corner radius equal to the in-radius, i.e. a
disc for cubes and triangles and a stadium (capsule) for rods. A "synthesis progress" series
goes from rounded blobs to sharp cubes and triangles by lowering ``rounding``::

    for r in (0.9, 0.6, 0.3, 0.05):
        synth = generate_image(SynthSpec(class_mix={"cube": 0.5, "triangle": 0.5}, rounding=r), seed=1)

Fused classes are unions of discs: ``dumbbell`` (2 lobes), ``trimer`` (3 lobes, bent chain),
``aggregate`` (4-8 lobes of mixed size, irregular). ``sphere`` is a disc.

Sizes: each particle's equivalent circular diameter (ECD, of the whole particle, in nm) is drawn
from a log-normal distribution with mean ``mean_ecd_nm`` and coefficient of variation
``size_cv``; the shape is scaled so that its area is exactly ``pi/4 * ECD**2``.

Mixed sizes: ``populations`` adds particles of other classes and sizes (e.g. 10 px dots beside
300 px triangles), each with its own size distribution and coverage; they are placed after the
spec's own particles, so they fill the gaps and touch the large ones.

Placement: a particle is placed *free* (at least ``gap_px`` from every other), *touching* (slid
towards an already placed particle until contact, gap < 1 px) or *overlapping* (slid further
until it covers 8-30 % of its own area of others; drawn on top) with probabilities
``1 - touching_fraction - overlap_fraction``, ``touching_fraction``, ``overlap_fraction``.
Particles may be cut by the image border and by the banner (ground truth says so).

Ground truth (one row per particle, :data:`TRUTH_COLUMNS`): class, centroid of the whole shape
and of its visible part (px, x = column, y = row), ECD (nm and px), area, orientation, number
of lobes, rounding, placement, contacts, visible fraction, border flag. ``SynthImage.labels``
is the label image of the visible part of every particle (int32, 0 = background).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

CLASSES = (
    "sphere",
    "cube",
    "triangle",
    "truncated_triangle",
    "rod",
    "dumbbell",
    "trimer",
    "aggregate",
    "bipyramid",
)
"""Particle classes the generator can draw."""

BENCH_CLASSES = (
    "sphere",
    "cube",
    "triangle",
    "truncated_triangle",
    "rod",
    "bipyramid",
    "dumbbell",
    "trimer",
)
"""The 8 classes of the segmentation benchmark (``bench/segmentation.py``).

Every class the product promises to segment as one particle: the convex ones (cube, triangle,
truncated triangle, rod, bipyramid, sphere) and the fused lobes of the Konstanz series (dumbbell,
trimer). ``aggregate`` is left out: 4-8 fused lobes of mixed size with a seam between each pair
is an agglomerate of primary particles, and whether it is one particle or several has no single
right answer (the segmenter is asked to cut touching particles where the image shows a contact
line, which is what an aggregate's seams are), so it cannot be scored as one instance.
"""

CONTRASTS = ("bright", "dark")
"""``bright``: SE image, bright particles on a darker substrate; ``dark``: transmission-like."""

TRUTH_COLUMNS = (
    "particle",
    "class",
    "centroid_x_px",
    "centroid_y_px",
    "visible_centroid_x_px",
    "visible_centroid_y_px",
    "ecd_nm",
    "ecd_px",
    "area_px",
    "orientation_deg",
    "n_lobes",
    "rounding",
    "aspect_ratio",
    "placement",
    "n_contacts",
    "visible_fraction",
    "touches_border",
    "population",
)
"""Columns of :attr:`SynthImage.truth`.

particle : int, 1-based, equals the label in :attr:`SynthImage.labels`
centroid_x_px, centroid_y_px : float, centroid of the whole (unoccluded, uncut) shape
visible_centroid_x_px, visible_centroid_y_px : float, centroid of the visible pixels (NaN if none)
ecd_nm, ecd_px : float, equivalent circular diameter of the whole shape
area_px : float, area of the whole shape in px²
orientation_deg : float, rotation of the shape's frame, counter-clockwise in image display, [0, 360)
n_lobes : int, 1 for single-body shapes, number of fused discs otherwise
rounding : float, corner rounding actually used (0 sharp .. 1 round; NaN for disc-based shapes)
aspect_ratio : float, length / width of the un-rounded body (rods), 1 for the others
placement : str, ``free`` / ``touching`` / ``overlapping``
n_contacts : int, number of other particles within 1.5 px of the outline (or overlapping)
visible_fraction : float, visible px / whole-shape px (occlusion, border and banner cuts)
touches_border : bool, the whole shape is cut by the image edge or the banner
population : int, 0 = the spec's own population, k = ``spec.populations[k - 1]``
"""


@dataclass(frozen=True)
class Population:
    """An extra particle population drawn into the same image (mixed sizes).

    Parameters
    ----------
    class_mix : mapping of str to float
        Relative frequency of each class of this population (keys from :data:`CLASSES`).
    mean_ecd_nm, size_cv : float
        Log-normal ECD distribution of this population.
    coverage : float
        Area fraction of the analysed region this population covers (sets its count).
    """

    class_mix: Mapping[str, float]
    mean_ecd_nm: float
    size_cv: float = 0.08
    coverage: float = 0.02

    def __post_init__(self) -> None:
        _check_class_mix(self.class_mix)
        if not self.mean_ecd_nm > 0:
            raise ValueError(f"population mean_ecd_nm must be positive, got {self.mean_ecd_nm!r}")
        if not 0 <= self.size_cv < 1:
            raise ValueError(f"population size_cv must be in [0, 1), got {self.size_cv!r}")
        if not 0 <= self.coverage <= 1:
            raise ValueError(f"population coverage must be in [0, 1], got {self.coverage!r}")


def _check_class_mix(class_mix: Mapping[str, float]) -> None:
    unknown = set(class_mix) - set(CLASSES)
    if unknown:
        raise ValueError(f"unknown particle class(es) {sorted(unknown)}; known: {', '.join(CLASSES)}")
    weights = list(class_mix.values())
    if not weights or any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"class_mix needs non-negative weights with a positive sum, got {dict(class_mix)}")



# ============================================================================ spec
@dataclass(frozen=True)
class SynthSpec:
    """Everything that defines a synthetic image except the seed.

    Parameters
    ----------
    width_px, height_px : int
        Full frame size (banner included).
    pixel_size_nm : float
        Physical pixel size; written to the TIFF as Zeiss metadata.
    class_mix : mapping of str to float
        Relative frequency of each class (normalised; zero weights allowed). Keys from
        :data:`CLASSES`.
    mean_ecd_nm, size_cv : float
        Mean and coefficient of variation of the particle ECD (log-normal).
    n_particles : int, optional
        Number of particles to place. Default: as many as fill ``coverage`` of the analysed area.
    coverage : float
        Target area fraction covered by particles when ``n_particles`` is None.
    touching_fraction, overlap_fraction : float
        Probability that a particle is placed in contact with / partly over another one.
    rounding : float or mapping of str to float
        Corner rounding of faceted classes, 0 (sharp) .. 1 (fully rounded); one value for all
        classes or one per class (missing classes get 0.15).
    rounding_jitter : float
        Per-particle uniform jitter added to ``rounding`` (clipped to [0, 1]).
    rod_aspect : float
        Mean length / width of rods (±15 % per particle).
    banner : bool
        Draw a black info banner with text-like blocks and a scale bar at the bottom.
    banner_rows : int, optional
        Banner height; default 10 % of ``height_px``.
    dtype : {"uint8", "uint16"}
    background, particle_level, edge_gain : float
        Substrate grey level, particle grey level above it, SE edge brightening (intensity 0..1).
    edge_width_px : float, optional
        Decay length of the edge brightening; default 12 % of the mean ECD in px (≥ 1.5), of
        each population's own mean ECD for ``populations``.
    rim_dark : float
        Darkening of the outermost ~1 px of every particle (decay length 0.9 px): the dark
        crevice seen where touching particles meet (secondary electrons cannot escape there).
    gradient : float
        Peak-to-peak amplitude of the linear background gradient.
    blur_sigma_px : float
        Gaussian blur (beam spot) in px.
    dose : float
        Mean electron count per pixel at intensity 1 (shot noise; larger = less noise).
        ``inf`` disables shot noise.
    gap_px : float
        Minimal gap between *free* particles.
    max_particles : int
        Safety cap on ``n_particles``.
    contrast : {"bright", "dark"}
        ``bright`` (default): the SE image described in the module docstring. ``dark``: a
        transmission-like image (TSEM, bright-field TEM) of the same particles: substrate at
        ``1 - background``, particles ``particle_level`` darker, darkest in the middle (thickness:
        the outer ``edge_width_px`` are up to 45 % lighter), no SE rims; the same seed gives the
        same particles and labels in both contrasts.
    halo : float
        Bright fringe on the substrate just outside every particle, ``halo * exp(-d /
        halo_width_px)`` at distance ``d`` from the outline: the Fresnel fringe of an under-focused
        TEM image (``dark``) or a spill-over of the SE edge effect (``bright``). 0 (default): none.
    halo_width_px : float
        Decay length of the halo.
    populations : tuple of Population
        Extra populations of other classes and sizes in the same image (e.g. 10 px dots beside
        300 px triangles), placed after the spec's own particles; ``truth.population`` says which.
    bipyramid_aspect : float
        Mean long / short diagonal of the ``bipyramid`` outline (an elongated rhombus, ±15 % per
        particle).
    """

    width_px: int = 1024
    height_px: int = 768
    pixel_size_nm: float = 2.0
    class_mix: Mapping[str, float] = field(default_factory=lambda: {"sphere": 1.0})
    mean_ecd_nm: float = 60.0
    size_cv: float = 0.08
    n_particles: int | None = None
    coverage: float = 0.25
    touching_fraction: float = 0.2
    overlap_fraction: float = 0.05
    rounding: float | Mapping[str, float] = 0.15
    rounding_jitter: float = 0.03
    rod_aspect: float = 3.5
    banner: bool = False
    banner_rows: int | None = None
    dtype: str = "uint8"
    background: float = 0.28
    particle_level: float = 0.30
    edge_gain: float = 0.28
    edge_width_px: float | None = None
    rim_dark: float = 0.3
    gradient: float = 0.08
    blur_sigma_px: float = 1.0
    dose: float = 120.0
    gap_px: float = 3.0
    max_particles: int = 5000
    contrast: str = "bright"
    halo: float = 0.0
    halo_width_px: float = 1.5
    populations: tuple[Population, ...] = ()
    bipyramid_aspect: float = 2.2

    def __post_init__(self) -> None:
        if self.width_px < 16 or self.height_px < 16:
            raise ValueError(f"image must be at least 16x16 px, got {self.width_px}x{self.height_px}")
        if not (self.pixel_size_nm > 0 and math.isfinite(self.pixel_size_nm)):
            raise ValueError(f"pixel_size_nm must be positive, got {self.pixel_size_nm!r}")
        _check_class_mix(self.class_mix)
        if not self.mean_ecd_nm > 0:
            raise ValueError(f"mean_ecd_nm must be positive, got {self.mean_ecd_nm!r}")
        if not 0 <= self.size_cv < 1:
            raise ValueError(f"size_cv must be in [0, 1), got {self.size_cv!r}")
        for name in ("touching_fraction", "overlap_fraction", "coverage"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        if self.touching_fraction + self.overlap_fraction > 1:
            raise ValueError("touching_fraction + overlap_fraction must not exceed 1")
        rvals = self.rounding.values() if isinstance(self.rounding, Mapping) else [self.rounding]
        if any(not 0 <= r <= 1 for r in rvals):
            raise ValueError(f"rounding must be in [0, 1], got {self.rounding!r}")
        if isinstance(self.rounding, Mapping) and set(self.rounding) - set(CLASSES):
            raise ValueError(f"rounding names unknown class(es) {sorted(set(self.rounding) - set(CLASSES))}")
        if self.dtype not in ("uint8", "uint16"):
            raise ValueError(f"dtype must be 'uint8' or 'uint16', got {self.dtype!r}")
        if self.n_particles is not None and not 0 <= self.n_particles <= self.max_particles:
            raise ValueError(f"n_particles must be in [0, {self.max_particles}], got {self.n_particles}")
        if self.rod_aspect < 1:
            raise ValueError(f"rod_aspect must be >= 1, got {self.rod_aspect!r}")
        if self.dose <= 0:
            raise ValueError(f"dose must be positive, got {self.dose!r}")
        if self.banner_rows is not None and not 0 <= self.banner_rows < self.height_px - 8:
            raise ValueError(f"banner_rows must be in [0, height_px - 8), got {self.banner_rows}")
        if self.contrast not in CONTRASTS:
            raise ValueError(f"contrast must be one of {CONTRASTS}, got {self.contrast!r}")
        if not (self.halo >= 0 and self.halo_width_px > 0):
            raise ValueError(f"halo must be >= 0 and halo_width_px > 0, got {self.halo!r}, {self.halo_width_px!r}")
        if any(not isinstance(p, Population) for p in self.populations):
            raise ValueError("populations must be a tuple of qcloop.synth.Population")
        if self.bipyramid_aspect < 1:
            raise ValueError(f"bipyramid_aspect must be >= 1, got {self.bipyramid_aspect!r}")

    # ------------------------------------------------------------------ derived
    @property
    def analysed_height_px(self) -> int:
        """Rows above the banner (the whole frame without a banner)."""
        if not self.banner:
            return self.height_px
        rows = self.banner_rows if self.banner_rows is not None else int(round(0.1 * self.height_px))
        return self.height_px - rows

    @property
    def mean_ecd_px(self) -> float:
        return self.mean_ecd_nm / self.pixel_size_nm

    def rounding_for(self, cls: str) -> float:
        if isinstance(self.rounding, Mapping):
            return float(self.rounding.get(cls, 0.15))
        return float(self.rounding)

    def class_probabilities(self) -> dict[str, float]:
        total = float(sum(self.class_mix.values()))
        return {k: float(v) / total for k, v in self.class_mix.items() if v > 0}

    @classmethod
    def for_batch(
        cls,
        mean_ecd_nm: float,
        size_cv: float,
        class_fractions: Mapping[str, float],
        *,
        pixel_size_nm: float | None = None,
        target_ecd_px: float = 32.0,
        **overrides: object,
    ) -> "SynthSpec":
        """Spec for one simulated batch (used by the simulated reactor).

        Parameters
        ----------
        mean_ecd_nm, size_cv : float
            Mean particle ECD (nm) and its coefficient of variation.
        class_fractions : mapping of str to float
            Fraction of each class (normalised).
        pixel_size_nm : float, optional
            Microscope pixel size. Default: chosen so that the mean particle is about
            ``target_ecd_px`` pixels across (rounded to 3 significant digits), i.e. a fixed
            magnification per batch.
        **overrides
            Any other :class:`SynthSpec` field (``rounding``, ``touching_fraction``, ``banner``...).
        """
        if pixel_size_nm is None:
            raw = mean_ecd_nm / target_ecd_px
            pixel_size_nm = float(f"{raw:.3g}")
        return cls(mean_ecd_nm=float(mean_ecd_nm), size_cv=float(size_cv), class_mix=dict(class_fractions),
                   pixel_size_nm=float(pixel_size_nm), **overrides)  # type: ignore[arg-type]


@dataclass(frozen=True, eq=False)
class SynthImage:
    """One synthetic micrograph.

    Attributes
    ----------
    pixels : ndarray, shape (height_px, width_px), uint8 or uint16
        The full frame, banner included.
    truth : DataFrame
        One row per particle, columns :data:`TRUTH_COLUMNS`.
    labels : ndarray of int32, shape (analysed_height_px, width_px)
        Visible part of every particle (label = ``truth.particle``), 0 = background.
    spec : SynthSpec
    seed : int
    """

    pixels: np.ndarray
    truth: pd.DataFrame
    labels: np.ndarray
    spec: SynthSpec
    seed: int

    @property
    def pixel_size_nm(self) -> float:
        return self.spec.pixel_size_nm

    @property
    def analysed_height_px(self) -> int:
        return self.spec.analysed_height_px

    def to_sem_image(self, name: str = "synthetic"):
        """The image as a :class:`qcloop.records.SemImage` (pixel size source ``config``)."""
        from qcloop.records import PixelSize, SemImage

        return SemImage(path=Path(f"<{name}>"), pixels=self.pixels,
                        analysed_height_px=self.analysed_height_px,
                        pixel_size=PixelSize(self.pixel_size_nm, "config"),
                        metadata={"synthetic": "true", "seed": str(self.seed)})


# ============================================================================ shapes
SdfFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray | None]]
"""sdf(x, y) -> (distance, seam) in the shape's unit frame; seam is the lobe seam depth or None."""


def _clip_polygon(poly: np.ndarray, n: np.ndarray, d: float) -> np.ndarray:
    """Sutherland-Hodgman: keep the part of convex ``poly`` (k, 2) with n·p <= d."""
    if len(poly) == 0:
        return poly
    out = []
    s = poly @ n - d
    for i in range(len(poly)):
        j = (i + 1) % len(poly)
        pi, pj, si, sj = poly[i], poly[j], s[i], s[j]
        if si <= 0:
            out.append(pi)
        if (si <= 0) != (sj <= 0):
            t = si / (si - sj)
            out.append(pi + t * (pj - pi))
    return np.array(out, dtype=float).reshape(-1, 2)


def _halfplane_polygon(normals: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Convex polygon {p : normals @ p <= offsets}, vertices counter-clockwise."""
    big = 1e3
    poly = np.array([[-big, -big], [big, -big], [big, big], [-big, big]], float)
    for n, d in zip(normals, offsets):
        poly = _clip_polygon(poly, n, float(d))
    # drop duplicate vertices left by tangent cuts
    if len(poly) > 1:
        keep = np.r_[True, np.linalg.norm(np.diff(poly, axis=0), axis=1) > 1e-9]
        poly = poly[keep]
        if len(poly) > 1 and np.linalg.norm(poly[0] - poly[-1]) < 1e-9:
            poly = poly[:-1]
    return poly


def _polygon_sdf(poly: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact signed distance to a convex polygon (CCW vertices); < 0 inside.

    A polygon degenerate to a point or a segment is handled (distance to it).
    """
    px, py = x.ravel(), y.ravel()
    k = len(poly)
    if k == 0:
        return np.full(x.shape, np.inf)
    dmin = np.full(px.shape, np.inf)
    inside = np.ones(px.shape, bool)
    for i in range(k):
        ax, ay = poly[i]
        bx, by = poly[(i + 1) % k]
        ex, ey = bx - ax, by - ay
        wx, wy = px - ax, py - ay
        ee = ex * ex + ey * ey
        if ee > 0:
            t = np.clip((wx * ex + wy * ey) / ee, 0.0, 1.0)
        else:
            t = 0.0
        dx, dy = wx - t * ex, wy - t * ey
        np.minimum(dmin, np.hypot(dx, dy), out=dmin)
        inside &= (ex * wy - ey * wx) >= 0
    if k < 3:
        inside[:] = False
    return np.where(inside, -dmin, dmin).reshape(x.shape)


def _rounded_polygon(normals: np.ndarray, offsets: np.ndarray, rho: float) -> tuple[SdfFn, float]:
    """Convex polygon with corners rounded by radius ``rho``: its SDF and its exact area.

    The rounded polygon is the core polygon (every edge moved in by ``rho``) dilated by a disc of
    radius ``rho``; by Steiner's formula its area is ``A_core + P_core * rho + pi * rho**2``.
    """
    core = _halfplane_polygon(normals, offsets - rho)

    def sdf(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, None]:
        return _polygon_sdf(core, x, y) - rho, None

    if len(core) >= 3:
        xs, ys = core[:, 0], core[:, 1]
        a_core = 0.5 * abs(float(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))
    else:
        a_core = 0.0
    p_core = float(np.linalg.norm(core - np.roll(core, -1, axis=0), axis=1).sum()) if len(core) >= 2 else 0.0
    # (a core degenerate to a segment of length L has "perimeter" 2 L here: area 2 L rho + pi rho², right)
    return sdf, a_core + p_core * rho + math.pi * rho * rho


def _regular_normals(k: int, phase: float = 0.0) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(k) / k
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def _disc_union(centers: np.ndarray, radii: np.ndarray, seam_width: float = 0.12) -> SdfFn:
    """Union of discs; the seam term is high where two lobes' outlines meet inside the union."""
    cx, cy = centers[:, 0], centers[:, 1]

    def sdf(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        d1 = np.hypot(x - cx[0], y - cy[0]) - radii[0]
        if len(radii) == 1:
            return d1, None
        d2 = np.full_like(d1, np.inf)
        for i in range(1, len(radii)):
            di = np.hypot(x - cx[i], y - cy[i]) - radii[i]
            np.minimum(d2, np.maximum(d1, di), out=d2)
            np.minimum(d1, di, out=d1)
        # inside both nearest discs, near the bisector between their outlines -> seam
        seam = np.exp(-np.abs(d2 - d1) / seam_width) * (d2 < 0.15)
        return d1, seam

    return sdf


@dataclass
class _Shape:
    cls: str
    sdf: SdfFn
    extent: float  # radius (unit frame) of a circle around the origin containing the shape
    n_lobes: int
    rounding: float
    aspect: float
    faceted: bool
    area: float | None = None  # exact unit-frame area when known (centred, symmetric shapes)


def _make_shape(cls: str, rounding: float, spec: SynthSpec, rng: np.random.Generator) -> _Shape:
    """Random instance of a class in its unit frame (roughly unit in-radius, centred later)."""
    if cls == "sphere":
        return _Shape(cls, _disc_union(np.zeros((1, 2)), np.ones(1)), 1.0, 1, float("nan"), 1.0, False, math.pi)
    if cls == "cube":
        n = _regular_normals(4)
        return _Shape(cls, *_poly_args(_rounded_polygon(n, np.ones(4), rounding), math.sqrt(2), 1, rounding, 1.0))
    if cls == "triangle":
        n = _regular_normals(3, np.pi / 2)  # apex pointing down the frame's -y
        return _Shape(cls, *_poly_args(_rounded_polygon(n, np.ones(3), rounding), 2.0, 1, rounding, 1.0))
    if cls == "truncated_triangle":
        n_side = _regular_normals(3, np.pi / 2)
        n_cut = -n_side  # vertices of an equilateral triangle lie opposite its side normals
        trunc = rng.uniform(0.18, 0.30)  # fraction of the side cut at each corner
        side = 2 * math.sqrt(3)
        cut = 2.0 - trunc * side * math.cos(math.pi / 6)
        normals = np.vstack([n_side, n_cut])
        offsets = np.r_[np.ones(3), np.full(3, cut)]
        return _Shape(cls, *_poly_args(_rounded_polygon(normals, offsets, rounding), 2.0, 1, rounding, 1.0))
    if cls == "rod":
        aspect = spec.rod_aspect * rng.uniform(0.85, 1.15)
        n = _regular_normals(4)
        offsets = np.array([aspect, 1.0, aspect, 1.0])
        return _Shape(cls, *_poly_args(_rounded_polygon(n, offsets, rounding), math.hypot(aspect, 1), 1, rounding, aspect))
    if cls == "bipyramid":
        # elongated rhombus, in-radius 1: half-diagonals a (long, x) and b with a / b = k
        k = spec.bipyramid_aspect * rng.uniform(0.85, 1.15)
        a, b = math.hypot(k, 1.0), math.hypot(k, 1.0) / k
        n = np.array([[b, a], [-b, a], [-b, -a], [b, -a]]) / math.hypot(a, b)
        return _Shape(cls, *_poly_args(_rounded_polygon(n, np.ones(4), rounding), a, 1, rounding, k))
    if cls == "dumbbell":
        r = np.array([1.0, rng.uniform(0.8, 1.0)])
        dist = (r[0] + r[1]) * rng.uniform(0.62, 0.78)
        c = np.array([[0.0, 0.0], [dist, 0.0]])
        return _Shape(cls, _disc_union(c, r), dist + 2.0, 2, float("nan"), 1.0, False)
    if cls == "trimer":
        r = rng.uniform(0.8, 1.0, size=3)
        r[1] = 1.0
        bend = math.radians(rng.uniform(95, 180))
        d01 = (r[0] + r[1]) * rng.uniform(0.62, 0.78)
        d12 = (r[1] + r[2]) * rng.uniform(0.62, 0.78)
        c = np.array([[-d01, 0.0], [0.0, 0.0], [-d12 * math.cos(bend), d12 * math.sin(bend)]])
        return _Shape(cls, _disc_union(c, r), float(np.max(np.hypot(*c.T) + r)) + 2.0, 3, float("nan"), 1.0, False)
    if cls == "aggregate":
        k = int(rng.integers(4, 9))
        r = rng.uniform(0.5, 1.0, size=k)
        c = np.zeros((k, 2))
        for i in range(1, k):
            j = int(rng.integers(0, i))
            for _ in range(20):
                a = rng.uniform(0, 2 * np.pi)
                cand = c[j] + (r[i] + r[j]) * rng.uniform(0.65, 0.9) * np.array([math.cos(a), math.sin(a)])
                others = np.hypot(*(c[:i] - cand).T) - (r[:i] + r[i]) * 0.55
                if np.all(others >= 0) or _ == 19:
                    c[i] = cand
                    break
        return _Shape(cls, _disc_union(c, r), float(np.max(np.hypot(*c.T) + r)) + 2.0, k, float("nan"), 1.0, False)
    raise ValueError(f"unknown particle class {cls!r}")


def _poly_args(sdf_area: tuple[SdfFn, float], extent: float, n_lobes: int, rounding: float,
               aspect: float) -> tuple:
    sdf, area = sdf_area
    return sdf, extent, n_lobes, rounding, aspect, True, area


_UNIT_GRID = 48


def _unit_area_centroid(shape: _Shape) -> tuple[float, float, float]:
    """Area and centroid of the unit shape (exact when known, else anti-aliased grid integration)."""
    if shape.area is not None:
        return shape.area, 0.0, 0.0
    e = shape.extent
    h = 2 * e / _UNIT_GRID
    g = -e + h * (np.arange(_UNIT_GRID) + 0.5)
    x, y = np.meshgrid(g, g)
    d, _ = shape.sdf(x, y)
    cov = np.clip(0.5 - d / h, 0.0, 1.0)
    a = float(cov.sum())
    if a <= 0:
        raise RuntimeError(f"degenerate {shape.cls} shape")
    return a * h * h, float((cov * x).sum() / a), float((cov * y).sum() / a)


# ============================================================================ particles
@dataclass
class _Particle:
    cls: str
    shape: _Shape
    scale: float  # px per unit
    cx0: float  # unit-frame centroid
    cy0: float
    theta: float
    ecd_px: float
    r_px: float  # bounding radius in px
    frac: tuple[float, float]  # sub-pixel part of the centre
    sdf: np.ndarray  # px, over the local patch
    seam: np.ndarray | None
    half: int  # patch is (2*half+1)^2 around the integer centre
    ix: int = 0
    iy: int = 0
    placement: str = "free"
    population: int = 0

    @property
    def x(self) -> float:
        return self.ix + self.frac[0]

    @property
    def y(self) -> float:
        return self.iy + self.frac[1]


def _build_particle(cls: str, spec: SynthSpec, rng: np.random.Generator, ecd_px: float) -> _Particle:
    rnd = spec.rounding_for(cls)
    if spec.rounding_jitter > 0:
        rnd = float(np.clip(rnd + rng.uniform(-spec.rounding_jitter, spec.rounding_jitter), 0.0, 1.0))
    # a fully rounded polygon degenerates to a point; keep a sliver of core
    shape = _make_shape(cls, min(rnd, 0.999), spec, rng)
    if shape.faceted:
        shape.rounding = rnd
    area_u, cx0, cy0 = _unit_area_centroid(shape)
    scale = (ecd_px / 2.0) * math.sqrt(math.pi / area_u)
    theta = float(rng.uniform(0, 2 * np.pi))
    r_px = (shape.extent + math.hypot(cx0, cy0)) * scale
    half = int(math.ceil(r_px + 4 + 3 * spec.blur_sigma_px))
    fx, fy = float(rng.uniform(0, 1)), float(rng.uniform(0, 1))
    g = np.arange(-half, half + 1, dtype=float)
    gx, gy = np.meshgrid(g - fx, g - fy)  # px offsets from the exact centre
    c, s = math.cos(theta), math.sin(theta)
    # rotate back into the shape frame; +y of the frame is image row direction
    ux = (c * gx + s * gy) / scale + cx0
    uy = (-s * gx + c * gy) / scale + cy0
    d, seam = shape.sdf(ux, uy)
    return _Particle(cls=cls, shape=shape, scale=scale, cx0=cx0, cy0=cy0, theta=theta, ecd_px=ecd_px,
                     r_px=r_px, frac=(fx, fy), sdf=d * scale, seam=seam, half=half)


def _window(p: _Particle, ix: int, iy: int, h: int, w: int) -> tuple[slice, slice, slice, slice] | None:
    """Image and patch slices of particle ``p`` centred at integer (ix, iy); None if off-frame."""
    y0, x0 = iy - p.half, ix - p.half
    n = 2 * p.half + 1
    ys0, xs0 = max(y0, 0), max(x0, 0)
    ys1, xs1 = min(y0 + n, h), min(x0 + n, w)
    if ys1 <= ys0 or xs1 <= xs0:
        return None
    return (slice(ys0, ys1), slice(xs0, xs1), slice(ys0 - y0, ys1 - y0), slice(xs0 - x0, xs1 - x0))


class _Canvas:
    """Occupancy (whole shapes, union) used while placing particles, padded by ``pad`` px."""

    def __init__(self, h: int, w: int, pad: int):
        self.pad = pad
        self.occ = np.zeros((h + 2 * pad, w + 2 * pad), bool)

    def overlap(self, p: _Particle, ix: int, iy: int, thresh: float) -> int | None:
        win = _window(p, ix + self.pad, iy + self.pad, *self.occ.shape)
        if win is None:
            return None
        ys, xs, py, px = win
        return int(np.count_nonzero(self.occ[ys, xs] & (p.sdf[py, px] <= thresh)))

    def add(self, p: _Particle) -> None:
        win = _window(p, p.ix + self.pad, p.iy + self.pad, *self.occ.shape)
        if win is not None:
            ys, xs, py, px = win
            self.occ[ys, xs] |= p.sdf[py, px] <= 0


def _place(particles: Iterator[_Particle], spec: SynthSpec, rng: np.random.Generator, n_target: int,
           canvas: _Canvas, placed: list[_Particle]) -> list[_Particle]:
    """Place particles one by one (free / touching / overlapping) until ``n_target`` more are on
    ``canvas``; skips those that find no room. Appends to and returns ``placed``."""
    w, h = spec.width_px, spec.analysed_height_px
    n_target = len(placed) + n_target
    probs = np.array([1 - spec.touching_fraction - spec.overlap_fraction, spec.touching_fraction,
                      spec.overlap_fraction])
    probs = np.clip(probs, 0, None)
    probs = probs / probs.sum()
    for p in particles:
        if len(placed) >= n_target:
            break
        mode = int(rng.choice(3, p=probs)) if placed else 0
        ok = False
        area = float(np.count_nonzero(p.sdf <= 0))
        for _attempt in range(25):
            if mode == 0:
                # centre anywhere; particles may be cut by the frame edge
                ix = int(rng.integers(-int(p.r_px * 0.5), w + int(p.r_px * 0.5)))
                iy = int(rng.integers(-int(p.r_px * 0.5), h + int(p.r_px * 0.5)))
                ov = canvas.overlap(p, ix, iy, spec.gap_px)
                if ov == 0:
                    ok = True
                    break
                continue
            q = placed[int(rng.integers(len(placed)))]
            a = rng.uniform(0, 2 * np.pi)
            ux, uy = math.cos(a), math.sin(a)
            dist = p.r_px + q.r_px + 2.0
            ix, iy = int(round(q.x + dist * ux - p.frac[0])), int(round(q.y + dist * uy - p.frac[1]))
            if canvas.overlap(p, ix, iy, 0.0) != 0:
                continue
            target = 0.0 if mode == 1 else rng.uniform(0.08, 0.30) * area
            last = (ix, iy)
            hit = False
            step = 0.0
            while step < dist:
                step += 1.0
                jx = int(round(q.x + (dist - step) * ux - p.frac[0]))
                jy = int(round(q.y + (dist - step) * uy - p.frac[1]))
                if (jx, jy) == last:
                    continue
                ov = canvas.overlap(p, jx, jy, 0.0)
                if ov is None:
                    break
                if ov > target:
                    hit = True
                    break
                last = (jx, jy)
            if hit and last is not None:
                ix, iy = last
                ok = True
                break
        if not ok:
            continue
        p.ix, p.iy = ix, iy
        p.placement = ("free", "touching", "overlapping")[mode]
        canvas.add(p)
        placed.append(p)
    return placed


# ============================================================================ rendering
def _smooth_field(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Low-frequency random field in [-1, 1] (bilinear upsampling of a coarse grid)."""
    gh, gw = max(2, h // cell + 2), max(2, w // cell + 2)
    coarse = rng.standard_normal((gh, gw))

    def interp_matrix(n: int, k: int) -> np.ndarray:
        """(n, k) linear interpolation weights from k grid nodes spanning [0, n) onto n samples."""
        pos = np.arange(n) * (k - 1) / max(n - 1, 1)
        i0 = np.minimum(np.floor(pos).astype(int), k - 2)
        t = pos - i0
        m = np.zeros((n, k))
        m[np.arange(n), i0] = 1 - t
        m[np.arange(n), i0 + 1] = t
        return m

    zoomed = interp_matrix(h, gh) @ coarse @ interp_matrix(w, gw).T  # separable bilinear upsampling
    m = np.abs(zoomed).max()
    return zoomed / m if m > 0 else zoomed


def _draw_banner(img: np.ndarray, top: int, rng: np.random.Generator, spec: SynthSpec) -> None:
    """Black band with white text-like blocks and a scale bar (intensity units)."""
    h, w = img.shape
    img[top:] = 0.0
    rows = h - top
    if rows < 8:
        return
    # a thin white frame line like Zeiss banners
    img[top + 1, 2:w - 2] = 1.0
    img[h - 2, 2:w - 2] = 1.0
    text_h = max(3, rows // 6)
    line_y = [top + rows // 4, top + rows // 2 + rows // 8]
    # scale bar: bar of ~ a round physical length at the left
    bar_px = max(20, w // 12)
    by = top + int(rows * 0.6)
    img[by:by + 2, 20:20 + bar_px] = 1.0
    img[by - 5:by + 7, 20:22] = 1.0
    img[by - 5:by + 7, 18 + bar_px:20 + bar_px] = 1.0
    img[top + rows // 4:top + rows // 4 + text_h, 22:22 + bar_px // 2] = 1.0
    x = 20 + bar_px + w // 20
    col_w = (w - x) // 4
    for col in range(4):
        for ly in line_y:
            cx = x + col * col_w
            end = cx + int(col_w * rng.uniform(0.55, 0.85))
            while cx < end:
                # a word: letters made of thin vertical and horizontal strokes, like rendered text
                for _ in range(int(rng.integers(2, 8))):
                    lw = max(3, int(text_h * 0.6))
                    if cx + lw >= end:
                        break
                    v = rng.uniform(0.85, 1.0)
                    for sx in rng.choice(lw, size=int(rng.integers(1, 3)), replace=False):
                        img[ly:ly + text_h, cx + sx] = v
                    for sy in rng.choice(text_h, size=int(rng.integers(0, 3)), replace=False):
                        img[ly + sy, cx:cx + lw] = v
                    cx += lw + 1
                cx += max(3, text_h)


def _render(placed: list[_Particle], spec: SynthSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    w, h, ha = spec.width_px, spec.height_px, spec.analysed_height_px
    yy = np.linspace(-0.5, 0.5, h)[:, None]
    xx = np.linspace(-0.5, 0.5, w)[None, :]
    a = rng.uniform(0, 2 * np.pi)
    dark = spec.contrast == "dark"
    substrate = 1.0 - spec.background if dark else spec.background
    img = (substrate + spec.gradient * (math.cos(a) * xx + math.sin(a) * yy)).astype(np.float32)
    img = img + np.float32(0.03) * _smooth_field(rng, h, w, 96).astype(np.float32)
    # faint substrate texture (white here, correlated by the beam blur below)
    img += np.float32(0.02) * rng.standard_normal((h, w), dtype=np.float32)
    labels = np.zeros((ha, w), np.int32)
    edge_ws = [spec.edge_width_px if spec.edge_width_px is not None else max(1.5, 0.12 * ecd)
               for ecd in [spec.mean_ecd_px] + [q.mean_ecd_nm / spec.pixel_size_nm for q in spec.populations]]
    light = rng.uniform(0, 2 * np.pi)
    lx, ly = math.cos(light), math.sin(light)
    for idx, p in enumerate(placed, start=1):
        win = _window(p, p.ix, p.iy, ha, w)
        if win is None:
            continue
        ys, xs, py, px = win
        d = p.sdf[py, px]
        cov = np.clip(0.5 - d, 0.0, 1.0).astype(np.float32)
        region = img[ys, xs]
        if not dark:
            # faint dark halo on the substrate (shadowing next to the particle)
            halo = (0.04 * np.exp(-np.clip(d, 0, None) / 3.0) * (d > 0)).astype(np.float32)
            region -= halo
        if spec.halo > 0:
            region += (spec.halo * np.exp(-np.clip(d, 0, None) / spec.halo_width_px) * (d > 0)).astype(np.float32)
        inner = np.clip(-d, 0.0, None)
        edge_w = edge_ws[p.population]
        jitter = 0.02 * rng.standard_normal()
        if dark:
            # transmission: darkest where thickest; the outer edge_w px are up to 45 % lighter
            val = substrate - (spec.particle_level + jitter) * (1.0 - 0.45 * np.exp(-inner / edge_w))
        else:
            level = spec.background + spec.particle_level + jitter
            val = level + spec.edge_gain * np.exp(-inner / edge_w) - spec.rim_dark * np.exp(-inner / 0.9)
        if p.shape.faceted:
            n = 2 * p.half + 1
            g = (np.arange(n) - p.half)[:, None]
            gx = (np.arange(n) - p.half)[None, :]
            shade = (lx * gx + ly * g)[py, px] / max(p.r_px, 1.0)
            val = val + 0.06 * shade
        if p.seam is not None:
            # the neck between fused lobes: a darker seam in SE, a lighter (thinner) one in transmission
            val = val + 0.22 * p.seam[py, px] if dark else val - 0.22 * p.seam[py, px]
        img[ys, xs] = region * (1 - cov) + cov * val.astype(np.float32)
        lab = labels[ys, xs]
        lab[d <= 0] = idx
    if spec.blur_sigma_px > 0:
        img = ndi.gaussian_filter(img, spec.blur_sigma_px)
    img = np.clip(img, 0.0, 1.0)
    if math.isfinite(spec.dose):
        img = rng.poisson(img.astype(np.float64) * spec.dose).astype(np.float32) / np.float32(spec.dose)
    img += np.float32(0.006) * rng.standard_normal((h, 1)).astype(np.float32)  # scan-line offsets
    if spec.banner and ha < h:
        _draw_banner(img, ha, rng, spec)
    img = np.clip(img, 0.0, 1.0)
    top = 255 if spec.dtype == "uint8" else 65535
    pixels = np.round(img * top).astype(spec.dtype)
    return pixels, labels


def _truth(placed: list[_Particle], labels: np.ndarray, spec: SynthSpec) -> pd.DataFrame:
    ha, w = labels.shape
    n = len(placed)
    flat = labels.ravel()
    vis_area = np.bincount(flat, minlength=n + 1)[1:].astype(float)
    rr, cc = np.divmod(np.arange(flat.size), w)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(flat, weights=rr, minlength=n + 1)[1:] / vis_area
        cx = np.bincount(flat, weights=cc, minlength=n + 1)[1:] / vis_area
    rows = []
    for i, p in enumerate(placed, start=1):
        full = p.sdf <= 0
        area = float(np.count_nonzero(full))
        # contacts: other labels within 1.5 px of this particle's whole outline
        win = _window(p, p.ix, p.iy, ha, w)
        contacts: set[int] = set()
        if win is not None:
            ys, xs, py, px = win
            near = p.sdf[py, px] <= 1.5
            found = np.unique(labels[ys, xs][near])
            contacts = {int(v) for v in found if v not in (0, i)}
        # cut by the frame or the banner: does the whole shape leave the analysed region?
        n_in = 0
        if win is not None:
            n_in = int(np.count_nonzero(full[py, px]))
        cut = n_in < area
        vf = float(vis_area[i - 1]) / area if area else 0.0
        rows.append({
            "particle": i,
            "class": p.cls,
            "centroid_x_px": p.x,
            "centroid_y_px": p.y,
            "visible_centroid_x_px": float(cx[i - 1]) if vis_area[i - 1] > 0 else float("nan"),
            "visible_centroid_y_px": float(cy[i - 1]) if vis_area[i - 1] > 0 else float("nan"),
            "ecd_nm": p.ecd_px * spec.pixel_size_nm,
            "ecd_px": p.ecd_px,
            "area_px": math.pi / 4 * p.ecd_px ** 2,
            "orientation_deg": math.degrees(p.theta) % 360.0,
            "n_lobes": p.shape.n_lobes,
            "rounding": p.shape.rounding,
            "aspect_ratio": p.shape.aspect,
            "placement": p.placement,
            "n_contacts": len(contacts),
            "visible_fraction": min(vf, 1.0),
            "touches_border": bool(cut),
            "population": p.population,
        })
    return pd.DataFrame(rows, columns=list(TRUTH_COLUMNS))


# ============================================================================ public API
def _seed_int(seed: int | np.random.SeedSequence) -> int:
    if isinstance(seed, np.random.SeedSequence):
        return int(seed.generate_state(1)[0])
    return int(seed)


def generate_image(spec: SynthSpec, seed: int) -> SynthImage:
    """Draw one synthetic SEM image.

    Parameters
    ----------
    spec : SynthSpec
    seed : int
        Same (spec, seed) → identical pixels and truth.

    Returns
    -------
    SynthImage
        ``pixels`` (height_px, width_px) of ``spec.dtype``; ``truth`` DataFrame
        (:data:`TRUTH_COLUMNS`); ``labels`` int32 (analysed_height_px, width_px).
    """
    seed = _seed_int(seed)
    rng = np.random.default_rng(seed)
    ha = spec.analysed_height_px
    n_target = spec.n_particles if spec.n_particles is not None else _count_for(
        spec.coverage, spec.mean_ecd_px, spec.size_cv, spec.width_px * ha, spec.max_particles)
    particles = _candidates(spec.class_probabilities(), spec.mean_ecd_px, spec.size_cv, n_target, spec, rng,
                            np.random.default_rng([seed, 1]), population=0)
    canvas = _Canvas(ha, spec.width_px, 0)
    placed = _place(particles, spec, rng, n_target, canvas, [])
    for k, pop in enumerate(spec.populations, start=1):
        # own generators per population: the spec's own particles stay as they are without it
        pop_rng = np.random.default_rng([seed, 2, k])
        ecd_px = pop.mean_ecd_nm / spec.pixel_size_nm
        n_pop = _count_for(pop.coverage, ecd_px, pop.size_cv, spec.width_px * ha, spec.max_particles)
        total = sum(pop.class_mix.values())
        probs = {c: w / total for c, w in pop.class_mix.items() if w > 0}
        cands = _candidates(probs, ecd_px, pop.size_cv, n_pop, spec, pop_rng, np.random.default_rng([seed, 3, k]),
                            population=k)
        placed = _place(cands, spec, pop_rng, n_pop, canvas, placed)
    pixels, labels = _render(placed, spec, rng)
    truth = _truth(placed, labels, spec)
    return SynthImage(pixels=pixels, truth=truth, labels=labels, spec=spec, seed=seed)


def _count_for(coverage: float, mean_ecd_px: float, size_cv: float, area_px: float, cap: int) -> int:
    """Number of particles of a log-normal ECD distribution that cover ``coverage`` of ``area_px``."""
    sigma2 = math.log1p(size_cv ** 2)
    mean_area = math.pi / 4 * mean_ecd_px ** 2 * math.exp(sigma2)
    return min(int(round(coverage * area_px / mean_area)), cap)


def _candidates(probs: Mapping[str, float], mean_ecd_px: float, size_cv: float, n_target: int, spec: SynthSpec,
                rng: np.random.Generator, shape_rng: np.random.Generator, population: int) -> Iterator[_Particle]:
    """Lazily built candidate particles: classes and log-normal ECDs drawn from ``rng`` now."""
    names = list(probs)
    p = np.array([probs[k] for k in names])
    sigma = math.sqrt(math.log1p(size_cv ** 2))
    mu = math.log(mean_ecd_px) - sigma ** 2 / 2
    # draw a few more candidates than needed; crowded frames drop the ones that do not fit
    n_cand = int(n_target * 1.3) + 4
    classes = rng.choice(len(names), size=n_cand, p=p)
    ecds = np.exp(mu + sigma * rng.standard_normal(n_cand)) if sigma > 0 else np.full(n_cand, mean_ecd_px)
    ecds = np.maximum(ecds, 3.0)
    for c, e in zip(classes, ecds):
        particle = _build_particle(names[c], spec, shape_rng, float(e))
        particle.population = population
        yield particle


def generate_images(spec: SynthSpec, n_images: int, seed: int) -> Iterator[SynthImage]:
    """``n_images`` independent images; image ``i`` uses a child seed of ``seed`` (deterministic)."""
    children = np.random.SeedSequence(int(seed)).spawn(int(n_images))
    for child in children:
        yield generate_image(spec, _seed_int(child))


def generate_batch(
    mean_ecd_nm: float,
    size_cv: float,
    class_fractions: Mapping[str, float],
    n_images: int,
    seed: int,
    **spec_fields: object,
) -> list[SynthImage]:
    """Images of one simulated reactor batch (see :meth:`SynthSpec.for_batch`)."""
    spec = SynthSpec.for_batch(mean_ecd_nm, size_cv, class_fractions, **spec_fields)  # type: ignore[arg-type]
    return list(generate_images(spec, n_images, seed))


def zeiss_sem_text(pixel_size_nm: float, width_px: int, *, file_name: str = "", user_text: str = "") -> str:
    """CZ_SEM (TIFF tag 34118) text as Zeiss SmartSEM writes it, read back by ``tifffile``.

    ``tifffile.TiffFile(...).sem_metadata`` gives ``''`` → a tuple whose 4th item is the pixel
    size in metres, and ``ap_image_pixel_size`` → ``('Image Pixel Size', value, 'nm')``.
    """
    px_m = pixel_size_nm * 1e-9
    # Zeiss magnification refers to a 114.3 mm wide Polaroid 545 print
    mag = 0.1143 / (width_px * px_m)
    lines = ["0", "0", "0", f"{px_m:.6e}", f"{mag:.6e}", "6", f"{3000.0:.6e}"]
    entries = [
        ("AP_IMAGE_PIXEL_SIZE", f"Image Pixel Size = {pixel_size_nm:.6g} nm"),
        ("AP_PIXEL_SIZE", f"Pixel Size = {pixel_size_nm:.6g} nm"),
        ("AP_MAG", f"Mag = {mag / 1000:.2f} K X"),
        ("AP_ACTUALKV", "EHT = 3.00 kV"),
        ("AP_WIDTH", f"Width = {width_px * pixel_size_nm / 1000:.4g} µm"),
        ("DP_DETECTOR_CHANNEL", "Signal A = InLens"),
        ("DP_PIXEL_SIZE", "Pix Size state = calibrated"),
        ("SV_SERIAL_NUMBER", "Serial No. = qcloop-synth"),
        ("SV_FILE_NAME", f"File Name = {file_name}"),
        ("SV_USER_TEXT", f"User Text = {user_text}"),
    ]
    for key, line in entries:
        lines += [key, line]
    return "\r\n".join(lines) + "\r\n"


def write_image(path: str | Path, synth: SynthImage, *, write_labels: bool = False) -> tuple[Path, Path]:
    """Write the image as a TIFF with Zeiss CZ_SEM metadata and its truth CSV beside it.

    Parameters
    ----------
    path : path
        ``*.tif``; the truth goes to the same stem with ``.csv``.
    write_labels : bool
        Also write ``<stem>_labels.tif``: the visible-particle labels of the analysed rows,
        uint16 (uint32 above 65535 particles), 0 = background, value = the truth CSV's
        ``particle`` (:func:`qcloop.labels_io.write_label_tiff`, one page).

    Returns
    -------
    (tif_path, csv_path)
    """
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = zeiss_sem_text(synth.pixel_size_nm, synth.spec.width_px, file_name=path.name,
                          user_text=f"qcloop synthetic seed={synth.seed}")
    tifffile.imwrite(path, synth.pixels, photometric="minisblack", metadata=None, software=False,
                     extratags=[(34118, "s", 0, text.encode("latin-1"), True)])
    csv = path.with_suffix(".csv")
    synth.truth.to_csv(csv, index=False, float_format="%.4f")
    if write_labels:
        from qcloop.labels_io import write_label_tiff

        write_label_tiff(path.with_name(path.stem + "_labels.tif"), synth.labels)
    return path, csv


def read_truth(path: str | Path) -> pd.DataFrame:
    """Truth CSV written by :func:`write_image` (accepts the TIFF or the CSV path)."""
    p = Path(path)
    return pd.read_csv(p.with_suffix(".csv"))


def match_centroids(detected_xy: np.ndarray, truth_xy: np.ndarray, max_dist: float | np.ndarray) -> list[tuple[int, int]]:
    """One-to-one matches between detected and true particles by centroid.

    A pair (i, j) matches when truth j is detection i's nearest truth, detection i is truth j's
    nearest detection, and their distance is below ``max_dist`` (a number, or one per truth
    particle). Rows with NaN coordinates never match.

    Parameters
    ----------
    detected_xy : ndarray, shape (n, 2)
        Detected centroids (x, y) in px.
    truth_xy : ndarray, shape (m, 2)
        True centroids (x, y) in px (e.g. ``visible_centroid_x_px``, ``visible_centroid_y_px``).
    max_dist : float or ndarray of shape (m,)

    Returns
    -------
    list of (i, j)
        Row indices into ``detected_xy`` and ``truth_xy``.
    """
    from scipy.spatial import cKDTree

    det = np.asarray(detected_xy, float).reshape(-1, 2)
    tru = np.asarray(truth_xy, float).reshape(-1, 2)
    lim = np.broadcast_to(np.asarray(max_dist, float), (len(tru),))
    dok = np.isfinite(det).all(axis=1)
    tok = np.isfinite(tru).all(axis=1)
    if not dok.any() or not tok.any():
        return []
    di, ti = np.flatnonzero(dok), np.flatnonzero(tok)
    d_t, nn_t = cKDTree(tru[ti]).query(det[di])  # nearest truth of each detection
    _, nn_d = cKDTree(det[di]).query(tru[ti])  # nearest detection of each truth
    pairs = []
    for a, (dist, b) in enumerate(zip(d_t, nn_t)):
        if nn_d[b] == a and dist < lim[ti[b]]:
            pairs.append((int(di[a]), int(ti[b])))
    return pairs


def with_rounding(spec: SynthSpec, rounding: float | Mapping[str, float]) -> SynthSpec:
    """Copy of ``spec`` with another rounding (for synthesis-progress series)."""
    return replace(spec, rounding=rounding)
