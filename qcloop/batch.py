"""Batch QC metrics: class fractions, size statistics, embedding-space separation, orientation.

A *batch* is the set of particles of all images taken from one synthesis batch. Its metrics
are what the QC targets (:mod:`qcloop.targets`), the Prometheus exporter and the controller
read. Everything here is a plain function of the particle table and the embeddings; no I/O.

Which particles count
---------------------
Particles cut by the image edge or the banner (``touches_border`` True) are **excluded from
every statistic** -- sizes, class counts and fractions, embedding separation and orientation --
and only reported as ``n_border``. A cut particle has a wrong size and an unreliable shape class
(a cut sphere looks like a fragment, a cut cube like a triangle), and using one set of particles
for all statistics keeps fractions and per-class sizes consistent with each other. The price is
a mild bias against large particles, which touch the border more often (no Miles-Lantuejoul
edge correction is applied). ``n_particles`` is the number of interior particles, i.e. the
denominator of every fraction.

Classes
-------
Particles without a class column (no classifier) all belong to one class, ``"particle"``.
Missing class values count as ``"unknown"``. The ``"unknown"`` class (the classifier's label
for particles below its probability threshold) takes part in counts and fractions -- so unknowns
lower the fraction of every real class -- but not in the embedding-space separation metrics
nor in the orientation statistics, because it is not a coherent cluster.

Embedding-space separation (Barnatan et al., Figure 8)
------------------------------------------------------
Embeddings (rows aligned with the particle table) are standardised per dimension (z-score over
the batch's interior, known-class particles by default, or with a fixed reference scaler so that
several batches share one scale). With :math:`x_i` the standardised rows, :math:`\\mu` their
mean, :math:`\\mu_k` the mean of class :math:`k` and :math:`N` the particle count:

* ``total_variance``       = :math:`\\frac1N\\sum_i \\lVert x_i-\\mu\\rVert^2` (trace of the covariance)
* ``inter_class_variance`` = :math:`\\frac1N\\sum_k n_k \\lVert \\mu_k-\\mu\\rVert^2` (between-class scatter)
* ``intra_class_variance`` = :math:`\\frac1N\\sum_k\\sum_{i\\in k} \\lVert x_i-\\mu_k\\rVert^2` (within-class)

so ``inter + intra = total`` exactly. With batch standardisation ``total`` equals the number of
non-constant embedding dimensions, so only the split between inter and intra carries
information. ``silhouette`` is scikit-learn's mean silhouette coefficient (Euclidean, on the
standardised embeddings; a random subsample of ``max_silhouette_samples`` particles, fixed seed,
on large batches); it is NaN unless at least two classes have at least two members each and
the points are not all identical. The ``pca.*`` versions are the same three figures in the
plane of the first two principal components of the standardised embeddings (fitted on the
batch).

Sizes
-----
Equivalent circular diameter statistics (``ecd_nm.*`` over all classes and ``ecd_nm.<cls>.*``
per class): mean, sample standard deviation (ddof=1), coefficient of variation sd/mean and the
number-weighted 10/50/90 % percentiles (linear interpolation). ``ecd_nm`` uses the particles
with a known pixel size; it is NaN when no image of the batch has one. ``ecd_px.*`` (same
statistics in pixels, all particles) is always reported as well -- meaningful when all images
share one magnification.

Lobe diameters (``lobe_diameter_nm.*``, ``lobe_diameter_nm.<cls>.*``, and ``lobe_diameter_px``)
are the same statistics of the particle table's ``lobe_diameter_<unit>`` column: per particle,
the mean major axis of its lobes for a fused particle (dumbbell, trimer), the ECD for a one-lobe
particle -- so for a dumbbell class ``lobe_diameter_nm.dumbbell.mean`` is the headline "lobe size"
while ``ecd_nm.dumbbell.mean`` is the diameter of a disc of the whole particle's area. The
statistics are number-weighted over particles (one value per particle, not per lobe).

Names
-----
Every name :meth:`BatchMetrics.flat` produces belongs to one :class:`MetricFamily` of
:data:`METRIC_FAMILIES`; the target names (:mod:`qcloop.targets`) and the Prometheus labels
(``qcloop_batch_metric{metric, class}``) are derived from that one table.

Orientation
-----------
Orientation is axial (180 deg periodic): statistics use doubled angles. Only classes whose median
``aspect_ratio`` is at least ``min_aspect_ratio`` get orientation statistics, because the
second-moment orientation of an isotropic shape (disc, square, equilateral triangle) is noise.
``orientation_deg.<cls>.mean`` is the axial mean direction in [0, 180) (the convention of the
particle table's ``orientation_deg``),
``.mean_resultant_length`` is R of the doubled angles (0 = isotropic, 1 = all aligned) and
``.circular_sd`` is the axial circular standard deviation :math:`\\sqrt{-2\\ln R}/2` in degrees.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as _stats

DEFAULT_CLASS = "particle"
UNKNOWN_CLASS = "unknown"
SIZE_STATS = ("mean", "sd", "cv", "d10", "d50", "d90")
SEPARATION_METRICS = ("inter_class_variance", "intra_class_variance", "total_variance", "silhouette")
ORIENTATION_STATS = ("mean", "mean_resultant_length", "circular_sd")
SIZE_UNITS = ("nm", "px")
#: particle-table columns ``<quantity>_<unit>`` that get size statistics (SIZE_STATS)
SIZE_QUANTITIES = ("ecd", "lobe_diameter")
COUNT_METRICS = ("n_particles", "n_images", "n_border")
CONFIDENCE = 0.95

_NAN = float("nan")


# --------------------------------------------------------------------------- small records
@dataclass(frozen=True)
class SizeStats:
    """Statistics of one set of diameters, with 95 % confidence half-widths.

    Attributes
    ----------
    n : int
        Number of finite diameters used.
    mean, sd, cv, d10, d50, d90 : float
        Mean, sample sd (ddof=1), sd/mean and percentiles, in the unit of the input. NaN when
        undefined (``n == 0``; sd and cv need ``n >= 2``).
    halfwidth : mapping of str to float
        95 % confidence half-width per statistic: mean -> Student t; sd -> chi-square interval;
        cv -> normal approximation :math:`z\\,cv\\sqrt{(1+2cv^2)/(2n)}`; percentiles ->
        distribution-free order-statistic interval (binomial ranks). ``inf`` when the data are
        too few to bound the statistic.
    """

    n: int
    mean: float = _NAN
    sd: float = _NAN
    cv: float = _NAN
    d10: float = _NAN
    d50: float = _NAN
    d90: float = _NAN
    halfwidth: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, values: Sequence[float] | np.ndarray) -> "SizeStats":
        """Statistics of the finite entries of ``values`` (float array, shape (n,))."""
        x = np.asarray(values, dtype=np.float64)
        x = np.sort(x[np.isfinite(x)])
        n = int(x.size)
        inf = math.inf
        if n == 0:
            return cls(n=0, halfwidth={k: inf for k in SIZE_STATS})
        mean = float(x.mean())
        d10, d50, d90 = (float(v) for v in np.percentile(x, [10, 50, 90]))
        hw: dict[str, float] = {}
        if n >= 2:
            sd = float(x.std(ddof=1))
            cv = sd / mean if mean != 0 else _NAN
            alpha = 1 - CONFIDENCE
            hw["mean"] = float(_stats.t.ppf(1 - alpha / 2, n - 1) * sd / math.sqrt(n))
            chi_lo = _stats.chi2.ppf(alpha / 2, n - 1)
            chi_hi = _stats.chi2.ppf(1 - alpha / 2, n - 1)
            hw["sd"] = float(sd * (math.sqrt((n - 1) / chi_lo) - math.sqrt((n - 1) / chi_hi)) / 2)
            z = float(_stats.norm.ppf(1 - alpha / 2))
            hw["cv"] = float(z * abs(cv) * math.sqrt((1 + 2 * cv * cv) / (2 * n))) if np.isfinite(cv) else inf
        else:
            sd = cv = _NAN
            hw.update(mean=inf, sd=inf, cv=inf)
        for name, q in (("d10", 0.10), ("d50", 0.50), ("d90", 0.90)):
            hw[name] = _quantile_halfwidth(x, q)
        return cls(n=n, mean=mean, sd=sd, cv=cv, d10=d10, d50=d50, d90=d90, halfwidth=hw)

    def values(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in SIZE_STATS}

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, **{k: _jsonable(v) for k, v in self.values().items()}}


def _quantile_halfwidth(sorted_x: np.ndarray, q: float) -> float:
    """Half-width of the distribution-free 95 % CI of the q-quantile from order statistics."""
    n = sorted_x.size
    alpha = 1 - CONFIDENCE
    lo = int(_stats.binom.ppf(alpha / 2, n, q))  # 1-based rank of the lower bound
    hi = int(_stats.binom.ppf(1 - alpha / 2, n, q)) + 1  # 1-based rank of the upper bound
    if lo < 1 or hi > n:
        return math.inf
    return float(sorted_x[hi - 1] - sorted_x[lo - 1]) / 2


@dataclass(frozen=True)
class Separation:
    """How well the classes separate in an embedding space (see module docstring).

    Attributes
    ----------
    n : int
        Particles used (interior, known class, finite embedding).
    n_classes : int
        Classes among them.
    inter_class_variance, intra_class_variance, total_variance, silhouette : float
        NaN when there are no embeddings or fewer than 2 particles (silhouette: see module doc).
    """

    n: int = 0
    n_classes: int = 0
    inter_class_variance: float = _NAN
    intra_class_variance: float = _NAN
    total_variance: float = _NAN
    silhouette: float = _NAN

    def values(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in SEPARATION_METRICS}

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "n_classes": self.n_classes,
                **{k: _jsonable(v) for k, v in self.values().items()}}


@dataclass(frozen=True)
class OrientationStats:
    """Axial (180 deg periodic) orientation statistics of one class, in degrees."""

    n: int
    mean: float = _NAN
    mean_resultant_length: float = _NAN
    circular_sd: float = _NAN

    @classmethod
    def of(cls, angles_deg: Sequence[float] | np.ndarray) -> "OrientationStats":
        a = np.asarray(angles_deg, dtype=np.float64)
        a = a[np.isfinite(a)]
        if a.size == 0:
            return cls(n=0)
        z = np.exp(2j * np.deg2rad(a)).mean()
        r = float(min(abs(z), 1.0))
        mean = float((np.rad2deg(np.angle(z)) / 2) % 180.0) if r > 1e-12 else _NAN
        csd = float(np.rad2deg(math.sqrt(-2 * math.log(r)) / 2)) if r > 0 else math.inf
        return cls(n=int(a.size), mean=mean, mean_resultant_length=r, circular_sd=csd)

    def values(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in ORIENTATION_STATS}

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, **{k: _jsonable(v) for k, v in self.values().items()}}


# --------------------------------------------------------------------------- the metrics
@dataclass(frozen=True)
class BatchMetrics:
    """All QC metrics of one batch. Build it with :func:`batch_metrics`.

    Attributes
    ----------
    n_images : int
    n_particles : int
        Interior particles: the ones every statistic uses.
    n_border : int
        Particles cut by the image border or banner, excluded from every statistic.
    classes : tuple of str
        Classes present among the interior particles, sorted.
    class_count : mapping of str to int
    size : mapping of unit (``"nm"``, ``"px"``) to {``"all"``: SizeStats, ``"by_class"``: {cls: SizeStats}}
        Equivalent circular diameter.
    separation, pca : Separation
        In the standardised embedding space and in its 2-D PCA plane.
    pca_explained_variance_ratio : tuple of float
        Share of the standardised total variance on PC1 and PC2 (NaN without embeddings).
    orientation : mapping of str to OrientationStats
        Only elongated classes (see module docstring).
    standardisation : str
        ``"batch"`` (z-score fitted on this batch), ``"reference"`` (given scaler) or ``"none"``
        (no embeddings).
    lobe_diameter : mapping like ``size``
        Statistics of the particles' ``lobe_diameter_<unit>`` column (see module docstring).
    """

    n_images: int
    n_particles: int
    n_border: int
    classes: tuple[str, ...]
    class_count: Mapping[str, int]
    size: Mapping[str, Mapping[str, Any]]
    separation: Separation
    pca: Separation
    pca_explained_variance_ratio: tuple[float, float]
    orientation: Mapping[str, OrientationStats]
    standardisation: str
    lobe_diameter: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    # ---- derived
    @property
    def class_fraction(self) -> dict[str, float]:
        """Fraction of the interior particles in each class (NaN for an empty batch)."""
        n = self.n_particles
        return {c: (k / n if n else _NAN) for c, k in self.class_count.items()}

    def flat(self) -> dict[str, float]:
        """Every metric under its dotted name (the names targets and Prometheus use).

        Returns
        -------
        dict of str to float
            One entry per name of every family in :data:`METRIC_FAMILIES` (see
            :func:`metric_name_forms`): ``n_particles``, ``class_fraction.<cls>``,
            ``ecd_nm.d50``, ``ecd_nm.<cls>.mean``, ``lobe_diameter_nm.<cls>.sd``,
            ``silhouette``, ``pca.silhouette``, ``orientation_deg.<cls>.mean``, ...
            Undefined values are NaN, never missing.
        """
        return {fam.name(cls, stat): float(v)
                for fam in METRIC_FAMILIES for cls, stat, v in fam.values(self)}

    def uncertainty(self) -> dict[str, float]:
        """Half-width of the 95 % confidence interval of each metric where one is meaningful.

        Size statistics (ECD, lobe diameter): see :class:`SizeStats`. Class fractions: half the
        width of the Wilson score interval with ``n_particles`` trials. Counts, separation and
        orientation metrics have none. ``inf`` means the data are too few to bound the metric.
        """
        out: dict[str, float] = {}
        n = self.n_particles
        for c, k in self.class_count.items():
            out[f"class_fraction.{c}"] = wilson_halfwidth(k, n)
        for quantity, unit, block in self.size_blocks():
            base = f"{quantity}_{unit}"
            out.update({f"{base}.{stat}": float(v) for stat, v in block["all"].halfwidth.items()})
            for c, st in block["by_class"].items():
                out.update({f"{base}.{c}.{stat}": float(v) for stat, v in st.halfwidth.items()})
        return out

    def size_blocks(self) -> list[tuple[str, str, Mapping[str, Any]]]:
        """``(quantity, unit, {"all": SizeStats, "by_class": {cls: SizeStats}})`` for every
        quantity of :data:`SIZE_QUANTITIES` and unit of :data:`SIZE_UNITS`."""
        per_quantity = {"ecd": self.size, "lobe_diameter": self.lobe_diameter}
        return [(q, u, per_quantity[q][u]) for q in SIZE_QUANTITIES for u in SIZE_UNITS
                if u in per_quantity[q]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able nested dict (plain int/float/str/list/dict; NaN and inf become None)."""
        sizes: dict[str, dict[str, Any]] = {}  # {"ecd": {"nm": {"all": ..., "by_class": ...}}, ...}
        for q, u, block in self.size_blocks():
            sizes.setdefault(q, {})[u] = {
                "all": block["all"].to_dict(),
                "by_class": {c: st.to_dict() for c, st in block["by_class"].items()}}
        return {
            "n_images": self.n_images,
            "n_particles": self.n_particles,
            "n_border": self.n_border,
            "classes": list(self.classes),
            "class_count": {c: int(k) for c, k in self.class_count.items()},
            "class_fraction": {c: _jsonable(f) for c, f in self.class_fraction.items()},
            **sizes,
            "separation": {**self.separation.to_dict(), "standardisation": self.standardisation},
            "pca": {**self.pca.to_dict(),
                    "explained_variance_ratio": [_jsonable(v) for v in self.pca_explained_variance_ratio]},
            "orientation_deg": {c: o.to_dict() for c, o in self.orientation.items()},
        }



# --------------------------------------------------------------------------- metric names
_Values = Callable[[BatchMetrics], Iterable[tuple[str | None, str | None, float]]]


@dataclass(frozen=True)
class MetricFamily:
    """One family of batch-metric names: the single declaration behind
    :meth:`BatchMetrics.flat`, the target names (:mod:`qcloop.targets`) and the Prometheus
    labels (:func:`qcloop.daemon.metrics.split_metric_name`).

    A name is the dot-join of its non-empty parts ``base``, ``<class>`` (when ``per_class``)
    and ``<stat>`` (one of ``stats``, when there are any): ``ecd_nm.cube.mean``,
    ``class_fraction.cube``, ``pca.silhouette``, ``silhouette`` (empty base).

    Attributes
    ----------
    base : str
    per_class : bool
    stats : tuple of str
    values : callable
        ``values(metrics)`` yields ``(class or None, stat or None, value)``.
    """

    base: str
    per_class: bool
    stats: tuple[str, ...]
    values: _Values

    def name(self, cls: str | None, stat: str | None) -> str:
        return ".".join(p for p in (self.base, cls, stat) if p)

    @property
    def pattern(self) -> "re.Pattern[str]":
        parts = [re.escape(self.base)] if self.base else []
        if self.per_class:
            parts.append(r"(?P<cls>[^.\s]+)")
        if self.stats:
            parts.append("(?P<stat>" + "|".join(re.escape(st) for st in self.stats) + ")")
        return re.compile(r"\.".join(parts))

    def forms(self) -> list[str]:
        """Human-readable forms: ``ecd_nm.<class>.{mean,sd,...}``; fixed names one by one."""
        if not self.per_class and not self.base:
            return list(self.stats)
        stats = [("{" + ",".join(self.stats) + "}")] if self.stats else []
        return [".".join([self.base] + (["<class>"] if self.per_class else []) + stats)]


def _size_values(quantity: str, unit: str, per_class: bool) -> _Values:
    def values(m: BatchMetrics):
        block = dict((u, b) for q, u, b in m.size_blocks() if q == quantity).get(unit)
        if block is None:
            return
        sets = block["by_class"].items() if per_class else [(None, block["all"])]
        for cls, st in sets:
            for stat, v in st.values().items():
                yield cls, stat, v
    return values


METRIC_FAMILIES: tuple[MetricFamily, ...] = (
    MetricFamily("", False, COUNT_METRICS,
                 lambda m: ((None, k, float(getattr(m, k))) for k in COUNT_METRICS)),
    MetricFamily("class_count", True, (),
                 lambda m: ((c, None, float(k)) for c, k in m.class_count.items())),
    MetricFamily("class_fraction", True, (),
                 lambda m: ((c, None, float(f)) for c, f in m.class_fraction.items())),
    *(MetricFamily(f"{q}_{u}", per_class, SIZE_STATS, _size_values(q, u, per_class))
      for q in SIZE_QUANTITIES for u in SIZE_UNITS for per_class in (False, True)),
    MetricFamily("", False, SEPARATION_METRICS,
                 lambda m: ((None, k, v) for k, v in m.separation.values().items())),
    MetricFamily("pca", False, SEPARATION_METRICS,
                 lambda m: ((None, k, v) for k, v in m.pca.values().items())),
    MetricFamily("orientation_deg", True, ORIENTATION_STATS,
                 lambda m: ((c, k, v) for c, o in m.orientation.items() for k, v in o.values().items())),
)


def parse_metric_name(name: str) -> tuple[MetricFamily, str | None, str | None] | None:
    """``(family, class, stat)`` of a batch-metric name, None when no family has it."""
    for fam in METRIC_FAMILIES:
        hit = fam.pattern.fullmatch(name)
        if hit:
            d = hit.groupdict()
            return fam, d.get("cls"), d.get("stat")
    return None


def metric_name_forms() -> list[str]:
    """Every accepted metric-name form, for error messages and docs."""
    return [form for fam in METRIC_FAMILIES for form in fam.forms()]


def wilson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval (low, high) for k successes in n trials ((0, 1) if n = 0)."""
    if n <= 0:
        return 0.0, 1.0
    z = float(_stats.norm.ppf(1 - (1 - confidence) / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = wilson_halfwidth(k, n, confidence)
    return max(0.0, centre - half), min(1.0, centre + half)


def wilson_halfwidth(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """Half the width of the Wilson score interval for k successes in n trials (inf if n = 0)."""
    if n <= 0:
        return math.inf
    z = float(_stats.norm.ppf(1 - (1 - confidence) / 2))
    p = k / n
    return float(z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)))


# --------------------------------------------------------------------------- building blocks
def class_labels(particles: pd.DataFrame, class_column: str = "class") -> np.ndarray:
    """Class label per row as an object array of str (``"particle"`` without a class column)."""
    if class_column not in particles.columns:
        return np.full(len(particles), DEFAULT_CLASS, dtype=object)
    col = particles[class_column]
    return np.array([UNKNOWN_CLASS if pd.isna(v) else str(v) for v in col], dtype=object)


def interior_mask(particles: pd.DataFrame) -> np.ndarray:
    """Boolean array, True for particles not cut by the border (all True without the column)."""
    if "touches_border" not in particles.columns:
        return np.ones(len(particles), dtype=bool)
    return ~particles["touches_border"].fillna(False).to_numpy(dtype=bool)


def standardise(x: np.ndarray, scaler: Any = None) -> np.ndarray:
    """Z-score the columns of ``x`` (float, shape (n, d)).

    ``scaler`` None fits mean and sd (ddof=0) on ``x``; otherwise an object with ``mean_`` and
    ``scale_`` arrays (e.g. a fitted sklearn StandardScaler) or a ``(mean, scale)`` tuple.
    Zero scales are treated as 1 (constant columns become 0).
    """
    x = np.asarray(x, dtype=np.float64)
    if scaler is None:
        mean, scale = x.mean(axis=0), x.std(axis=0)
    elif isinstance(scaler, tuple):
        mean, scale = (np.asarray(v, dtype=np.float64) for v in scaler)
    else:
        mean, scale = np.asarray(scaler.mean_, np.float64), np.asarray(scaler.scale_, np.float64)
    if mean.shape != (x.shape[1],) or scale.shape != (x.shape[1],):
        raise ValueError(f"scaler has shape {mean.shape}/{scale.shape}, embeddings have {x.shape[1]} dims")
    scale = np.where(scale > 0, scale, 1.0)
    return (x - mean) / scale


def variance_decomposition(x: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """Between-class, within-class and total scatter (traces, divided by n).

    Parameters
    ----------
    x : ndarray of float, shape (n, d)
    labels : ndarray, shape (n,)

    Returns
    -------
    inter, intra, total : float
        ``inter + intra == total`` up to rounding. NaN for n = 0.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if n == 0:
        return _NAN, _NAN, _NAN
    mu = x.mean(axis=0)
    total = float(((x - mu) ** 2).sum() / n)
    inter = intra = 0.0
    for c in np.unique(labels):
        xc = x[labels == c]
        mc = xc.mean(axis=0)
        inter += xc.shape[0] * float(((mc - mu) ** 2).sum())
        intra += float(((xc - mc) ** 2).sum())
    return inter / n, intra / n, total


def separation(x: np.ndarray, labels: np.ndarray, *, max_silhouette_samples: int = 4000) -> Separation:
    """Inter/intra/total variance and silhouette of labelled points (see module docstring)."""
    n = int(x.shape[0])
    if n == 0:
        return Separation()
    uniq, counts = np.unique(labels, return_counts=True)
    inter, intra, total = variance_decomposition(x, labels)
    sil = _NAN
    if int((counts >= 2).sum()) >= 2 and total > 0:
        from sklearn.metrics import silhouette_score

        try:
            sil = float(silhouette_score(
                x, labels, metric="euclidean",
                sample_size=max_silhouette_samples if n > max_silhouette_samples else None,
                random_state=0))
        except ValueError:  # a subsample with a single class
            sil = _NAN
    return Separation(n=n, n_classes=int(uniq.size), inter_class_variance=inter,
                      intra_class_variance=intra, total_variance=total, silhouette=sil)


@dataclass(frozen=True)
class EmbeddingView:
    """The particles that take part in the separation metrics, standardised and projected.

    Attributes
    ----------
    rows : ndarray of int, shape (m,)
        Positions (``iloc``) in the particle table.
    labels : ndarray of str, shape (m,)
    z : ndarray of float64, shape (m, d)
        Standardised embeddings.
    pca : ndarray of float64, shape (m, 2)
        Coordinates in the plane of the first two principal components of ``z``.
    explained_variance_ratio : tuple of float
    standardisation : str
    """

    rows: np.ndarray
    labels: np.ndarray
    z: np.ndarray
    pca: np.ndarray
    explained_variance_ratio: tuple[float, float]
    standardisation: str


def embedding_view(particles: pd.DataFrame, embeddings: np.ndarray | None, *,
                   class_column: str = "class", scaler: Any = None) -> EmbeddingView | None:
    """Select interior, known-class particles with finite embeddings; standardise; project.

    Returns None without embeddings. Raises ValueError when the embedding rows do not align
    with the particle table.
    """
    if embeddings is None:
        return None
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != len(particles):
        raise ValueError(f"embeddings have shape {emb.shape}, expected ({len(particles)}, d)")
    if emb.shape[1] == 0:
        return None  # zero-width embeddings carry no information: treated as none
    labels = class_labels(particles, class_column)
    keep = interior_mask(particles) & (labels != UNKNOWN_CLASS) & np.isfinite(emb).all(axis=1)
    rows = np.flatnonzero(keep)
    x = emb[rows]
    lab = labels[rows].astype(str)
    if x.shape[0] == 0:
        z = np.zeros((0, emb.shape[1]))
        return EmbeddingView(rows, lab, z, np.zeros((0, 2)), (_NAN, _NAN),
                             "batch" if scaler is None else "reference")
    z = standardise(x, scaler)
    coords, evr = _pca_plane(z)
    return EmbeddingView(rows, lab, z, coords, evr, "batch" if scaler is None else "reference")


def _pca_plane(z: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """First two principal-component coordinates of z (zero-padded when rank < 2)."""
    n, d = z.shape
    centred = z - z.mean(axis=0)
    total = float((centred ** 2).sum())
    if n < 2 or total <= 0:
        return np.zeros((n, 2)), (_NAN, _NAN)
    # SVD of the centred data: deterministic sign (largest |loading| positive)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(2, vt.shape[0])
    comps = vt[:k]
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    signs[signs == 0] = 1
    coords = np.zeros((n, 2))
    coords[:, :k] = centred @ (comps * signs[:, None]).T
    var = s ** 2
    evr = [float(var[i] / total) if i < var.size else 0.0 for i in range(2)]
    return coords, (evr[0], evr[1])


# --------------------------------------------------------------------------- entry point
def batch_metrics(particles: pd.DataFrame, embeddings: np.ndarray | None, *,
                  class_column: str = "class", n_images: int | None = None,
                  scaler: Any = None, min_aspect_ratio: float = 1.2,
                  max_silhouette_samples: int = 4000) -> BatchMetrics:
    """Compute every QC metric of one batch.

    Parameters
    ----------
    particles : DataFrame
        One row per particle (columns of :data:`qcloop.measure.PARTICLE_COLUMNS`, plus
        ``class`` once classified). Used: ``image``, ``touches_border``, ``ecd_nm``, ``ecd_px``,
        ``orientation_deg``, ``aspect_ratio`` and ``class_column``; missing ones count as
        unknown (NaN) values.
    embeddings : ndarray of float, shape (len(particles), d), or None
        Rows aligned with ``particles``. None (or d = 0): separation metrics are NaN.
    class_column : str
        Column holding the class label.
    n_images : int, optional
        Number of images in the batch (images without particles do not show up in the table).
        Default: distinct values of ``particles["image"]``.
    scaler : optional
        Fixed standardisation for the embeddings (see :func:`standardise`); default fits the
        batch itself.
    min_aspect_ratio : float
        Classes whose median aspect ratio is below this get no orientation statistics.
    max_silhouette_samples : int
        Silhouette is computed on a fixed-seed subsample of this many particles above it.

    Returns
    -------
    BatchMetrics
    """
    if not isinstance(particles, pd.DataFrame):
        raise TypeError(f"particles must be a pandas DataFrame, got {type(particles).__name__}")
    p = particles.reset_index(drop=True)
    if n_images is None:
        n_images = int(p["image"].nunique()) if "image" in p.columns else (1 if len(p) else 0)
    labels = class_labels(p, class_column)
    inner = interior_mask(p)
    lab_in = labels[inner]
    classes = tuple(sorted(set(lab_in.tolist())))
    class_count = {c: int((lab_in == c).sum()) for c in classes}

    def col(name: str) -> np.ndarray:
        if name not in p.columns:
            return np.full(len(p), np.nan)
        return pd.to_numeric(p[name], errors="coerce").to_numpy(dtype=np.float64)

    size: dict[str, dict[str, dict[str, Any]]] = {q: {} for q in SIZE_QUANTITIES}
    for q in SIZE_QUANTITIES:
        for unit in SIZE_UNITS:
            d = col(f"{q}_{unit}")[inner]
            size[q][unit] = {
                "all": SizeStats.of(d),
                "by_class": {c: SizeStats.of(d[lab_in == c]) for c in classes},
            }

    view = embedding_view(p, embeddings, class_column=class_column, scaler=scaler)
    if view is None:
        sep = pca_sep = Separation()
        evr: tuple[float, float] = (_NAN, _NAN)
        standardisation = "none"
    else:
        sep = separation(view.z, view.labels, max_silhouette_samples=max_silhouette_samples)
        pca_sep = separation(view.pca, view.labels, max_silhouette_samples=max_silhouette_samples)
        evr = view.explained_variance_ratio
        standardisation = view.standardisation

    orientation: dict[str, OrientationStats] = {}
    angle = col("orientation_deg")[inner]
    ar = col("aspect_ratio")[inner]
    for c in classes:
        if c == UNKNOWN_CLASS:
            continue
        sel = lab_in == c
        ar_c = ar[sel]
        ar_c = ar_c[np.isfinite(ar_c)]
        if ar_c.size and float(np.median(ar_c)) >= min_aspect_ratio:
            orientation[c] = OrientationStats.of(angle[sel])

    return BatchMetrics(
        n_images=int(n_images),
        n_particles=int(inner.sum()),
        n_border=int((~inner).sum()),
        classes=classes,
        class_count=class_count,
        size=size["ecd"],
        lobe_diameter=size["lobe_diameter"],
        separation=sep,
        pca=pca_sep,
        pca_explained_variance_ratio=evr,
        orientation=orientation,
        standardisation=standardisation,
    )


def _jsonable(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None
