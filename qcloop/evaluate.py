"""Score a predicted label image against a ground-truth label image (instance segmentation).

Plain functions over NumPy label images (0 = background, any positive integer = one object);
no files, no pipeline. ``qcloop eval`` and ``bench/segmentation.py`` are built on them.

Scoring rules
-------------
1. **Overlaps.** The contingency table of (truth label, predicted label) pairs is counted in one
   pass over the pixels (a sparse matrix); the IoU of a pair is
   ``intersection / (area_truth + area_pred - intersection)``.
2. **Slivers** (``min_area``). Truth objects with fewer than ``min_area`` pixels are *dropped*:
   they count neither as found nor as missed. A prediction is *ignorable* when its area is below
   ``min_area`` or more than half of its pixels lie on dropped truth objects; an ignorable
   prediction that matches no kept truth object is *ignored* (neither true nor false positive).
   An ignorable prediction that does match (IoU >= t) a kept truth object counts as a true
   positive as usual.
3. **Matching at a threshold t.** A kept truth object and a prediction match when their
   IoU >= t. For t > 0.5 a pair's partners are unique (two predictions cannot both cover more
   than half of one truth object's union), so the matching is simply the set of such pairs.
   At t = 0.5 exactly a tie can give one object two partners at IoU = 0.5; such conflicts are
   resolved by the assignment of largest total IoU (``scipy.optimize.linear_sum_assignment``).
4. **Counts per threshold.** TP = matched pairs, FN = kept truth objects left unmatched,
   FP = unmatched predictions that are not ignored. precision = TP / (TP + FP),
   recall = TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN); a ratio with a zero denominator is NaN.
   Thresholds :data:`THRESHOLDS` = 0.50, 0.55, ..., 0.95 (COCO's); ``f1_mean`` is the mean of the
   ten F1 values, ``f1`` / ``precision`` / ``recall`` are at IoU >= 0.5.
5. **Mean matched IoU**: mean IoU of the pairs matched at 0.5. **Count ratio**: predictions
   counted (all minus those ignored at 0.5) / kept truth objects.
6. **Pooling over images**: TP, FP and FN are summed over the images (and the matched IoUs
   pooled) before the ratios are taken (:func:`pool_scores`); :func:`score_table` also gives the
   plain mean of the per-image figures.

A truth object *cut in pieces* (:func:`pieces_per_truth`): the number of predictions that have
more than half of their own pixels on it and cover at least ``min_cover`` (default 10 %) of it;
two or more pieces = cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import numpy as np
import pandas as pd
from scipy import sparse

THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
"""IoU thresholds 0.50:0.05:0.95 (as COCO), in :attr:`ImageScore.tp` / ``fp`` / ``fn`` order."""

MAJORITY = 0.5
"""A prediction lies *on* an object when more than this fraction of its pixels do (rules 2, pieces)."""


# ============================================================================ records
@dataclass(frozen=True, eq=False)
class Matching:
    """Every overlap between the kept truth objects and the predictions of one image.

    Attributes
    ----------
    truth_ids : ndarray of int64, shape (n,)
        Labels of the kept truth objects (area >= ``min_area``), ascending.
    truth_area : ndarray of int64, shape (n,)
    pred_ids : ndarray of int64, shape (m,)
        Labels of all predictions, ascending.
    pred_area : ndarray of int64, shape (m,)
    pred_ignorable : ndarray of bool, shape (m,)
        Below ``min_area`` or mostly on dropped truth (rule 2).
    pred_truth : ndarray of int64, shape (m,)
        Truth label (kept or dropped) holding most of each prediction's pixels; 0 = background.
    pair_t, pair_p : ndarray of intp, shape (k,)
        Indices into ``truth_ids`` / ``pred_ids`` of every overlapping pair (kept truth only).
    pair_inter : ndarray of int64, shape (k,)
        Pixels in common.
    pair_iou : ndarray of float64, shape (k,)
    n_dropped_truth : int
        Truth objects dropped as slivers.
    """

    truth_ids: np.ndarray
    truth_area: np.ndarray
    pred_ids: np.ndarray
    pred_area: np.ndarray
    pred_ignorable: np.ndarray
    pred_truth: np.ndarray
    pair_t: np.ndarray
    pair_p: np.ndarray
    pair_inter: np.ndarray
    pair_iou: np.ndarray
    n_dropped_truth: int

    def matched(self, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One-to-one pairs at IoU >= ``threshold`` (rule 3).

        Returns
        -------
        (t_idx, p_idx, iou) : ndarrays of shape (k,)
            Indices into ``truth_ids`` and ``pred_ids``, and the pairs' IoU, by ascending truth.
        """
        sel = self.pair_iou >= threshold
        t, p, iou = self.pair_t[sel], self.pair_p[sel], self.pair_iou[sel]
        if len(np.unique(t)) < len(t) or len(np.unique(p)) < len(p):
            t, p, iou = _resolve_ties(t, p, iou)
        order = np.argsort(t, kind="stable")
        return t[order], p[order], iou[order]


@dataclass(frozen=True)
class ImageScore:
    """Scores of one image (or of several images pooled); ratios are derived properties.

    Attributes
    ----------
    name : str
    n_images : int
        1 for one image, the number pooled otherwise.
    n_truth : int
        Kept truth objects.
    n_pred : int
        Predictions counted at IoU 0.5 (all minus ignored).
    tp, fp, fn : tuple of int
        Counts at each of :data:`THRESHOLDS`.
    iou_sum : float
        Sum of the IoUs of the pairs matched at 0.5.
    n_dropped_truth, n_ignored_pred : int
        Truth slivers dropped; predictions ignored at 0.5 (rule 2).
    seconds : float
        Time spent producing the prediction, when the caller knows it (else NaN).
    """

    name: str
    n_images: int
    n_truth: int
    n_pred: int
    tp: tuple[int, ...]
    fp: tuple[int, ...]
    fn: tuple[int, ...]
    iou_sum: float
    n_dropped_truth: int = 0
    n_ignored_pred: int = 0
    seconds: float = float("nan")

    def _at(self, threshold: float) -> int:
        for i, t in enumerate(THRESHOLDS):
            if abs(t - threshold) < 1e-9:
                return i
        raise ValueError(f"threshold {threshold!r} is not one of {THRESHOLDS}")

    def precision_at(self, threshold: float) -> float:
        i = self._at(threshold)
        return _ratio(self.tp[i], self.tp[i] + self.fp[i])

    def recall_at(self, threshold: float) -> float:
        i = self._at(threshold)
        return _ratio(self.tp[i], self.tp[i] + self.fn[i])

    def f1_at(self, threshold: float) -> float:
        i = self._at(threshold)
        return _ratio(2 * self.tp[i], 2 * self.tp[i] + self.fp[i] + self.fn[i])

    @property
    def precision(self) -> float:
        return self.precision_at(0.5)

    @property
    def recall(self) -> float:
        return self.recall_at(0.5)

    @property
    def f1(self) -> float:
        return self.f1_at(0.5)

    @property
    def f1_mean(self) -> float:
        """Mean F1 over IoU 0.50:0.05:0.95."""
        return float(np.mean([self.f1_at(t) for t in THRESHOLDS]))

    @property
    def mean_iou(self) -> float:
        """Mean IoU of the pairs matched at 0.5."""
        return _ratio(self.iou_sum, self.tp[0])

    @property
    def count_ratio(self) -> float:
        """Predictions counted / truth objects kept."""
        return _ratio(self.n_pred, self.n_truth)

    def as_row(self) -> dict[str, object]:
        """One row of :func:`score_table`."""
        return {"image": self.name, "n_truth": self.n_truth, "n_pred": self.n_pred, "tp": self.tp[0],
                "fp": self.fp[0], "fn": self.fn[0], "precision": self.precision, "recall": self.recall,
                "f1": self.f1, "f1_mean": self.f1_mean, "mean_iou": self.mean_iou,
                "count_ratio": self.count_ratio, "dropped_truth": self.n_dropped_truth,
                "ignored_pred": self.n_ignored_pred, "seconds": self.seconds}


SCORE_COLUMNS = ("image", "n_truth", "n_pred", "tp", "fp", "fn", "precision", "recall", "f1", "f1_mean",
                 "mean_iou", "count_ratio", "dropped_truth", "ignored_pred", "seconds")
"""Columns of :func:`score_table`: image, n_truth, n_pred, tp/fp/fn at 0.5, precision, recall,
f1 (at 0.5), f1_mean (0.5:0.95), mean_iou (matched at 0.5), count_ratio, dropped_truth,
ignored_pred, seconds."""


# ============================================================================ matching
def match_labels(truth: np.ndarray, pred: np.ndarray, *, min_area: int = 0) -> Matching:
    """All overlaps between truth and predicted objects, with the sliver rule applied.

    Parameters
    ----------
    truth, pred : ndarray of int, shape (H, W)
        Label images, 0 = background; labels need not be sequential.
    min_area : int
        Truth objects below this many pixels are dropped; predictions below it (or mostly on
        dropped truth) are ignored when unmatched. 0 keeps everything.

    Returns
    -------
    Matching

    Raises
    ------
    ValueError
        Shapes differ, labels are negative or not integers, or ``min_area`` < 0.
    """
    truth, pred = _check_labels(truth, "truth"), _check_labels(pred, "pred")
    if truth.shape != pred.shape:
        raise ValueError(f"truth and prediction shapes differ: {truth.shape} vs {pred.shape}")
    if min_area < 0:
        raise ValueError(f"min_area must be >= 0, got {min_area!r}")
    t, p = truth.ravel(), pred.ravel()
    table = sparse.coo_matrix((np.ones(t.size, np.int64), (t, p)),
                              shape=(int(t.max(initial=0)) + 1, int(p.max(initial=0)) + 1)).tocsr()
    table.sum_duplicates()
    t_area = np.asarray(table.sum(axis=1)).ravel()
    p_area = np.asarray(table.sum(axis=0)).ravel()
    present_t = np.flatnonzero(t_area[1:]) + 1
    truth_ids = present_t[t_area[present_t] >= min_area]
    dropped = np.setdiff1d(present_t, truth_ids)
    pred_ids = np.flatnonzero(p_area[1:]) + 1
    coo = table.tocoo()
    # per prediction: pixels on dropped truth, and the truth label holding most of it
    on_dropped = np.bincount(coo.col, weights=np.where(np.isin(coo.row, dropped), coo.data, 0),
                             minlength=len(p_area))
    majority = _column_argmax(table)
    ignorable = (p_area[pred_ids] < min_area) | (on_dropped[pred_ids] > MAJORITY * p_area[pred_ids])
    keep = (coo.row > 0) & (coo.col > 0) & np.isin(coo.row, truth_ids)
    rows, cols, inter = coo.row[keep], coo.col[keep], coo.data[keep].astype(np.int64)
    iou = inter / (t_area[rows] + p_area[cols] - inter)
    return Matching(truth_ids=truth_ids.astype(np.int64), truth_area=t_area[truth_ids].astype(np.int64),
                    pred_ids=pred_ids.astype(np.int64), pred_area=p_area[pred_ids].astype(np.int64),
                    pred_ignorable=ignorable, pred_truth=majority[pred_ids].astype(np.int64),
                    pair_t=np.searchsorted(truth_ids, rows), pair_p=np.searchsorted(pred_ids, cols),
                    pair_inter=inter, pair_iou=iou.astype(np.float64), n_dropped_truth=int(len(dropped)))


def score_matching(m: Matching, name: str = "", *, seconds: float = float("nan")) -> ImageScore:
    """Counts at every threshold of :data:`THRESHOLDS` (rules 3-5)."""
    tp, fp, fn = [], [], []
    iou_sum, n_ignored = 0.0, 0
    for k, thr in enumerate(THRESHOLDS):
        _, p_idx, iou = m.matched(thr)
        unmatched = np.ones(len(m.pred_ids), bool)
        unmatched[p_idx] = False
        ignored = int(np.count_nonzero(unmatched & m.pred_ignorable))
        tp.append(len(p_idx))
        fp.append(int(np.count_nonzero(unmatched)) - ignored)
        fn.append(len(m.truth_ids) - len(p_idx))
        if k == 0:
            iou_sum, n_ignored = float(iou.sum()), ignored
    return ImageScore(name=name, n_images=1, n_truth=len(m.truth_ids), n_pred=len(m.pred_ids) - n_ignored,
                      tp=tuple(tp), fp=tuple(fp), fn=tuple(fn), iou_sum=iou_sum,
                      n_dropped_truth=m.n_dropped_truth, n_ignored_pred=n_ignored, seconds=seconds)


def evaluate_labels(truth: np.ndarray, pred: np.ndarray, *, min_area: int = 0, name: str = "",
                    seconds: float = float("nan")) -> ImageScore:
    """Score one predicted label image against its truth (:func:`match_labels` + :func:`score_matching`).

    Examples
    --------
    >>> truth = np.zeros((4, 8), int); truth[:, :4] = 1; truth[:, 4:] = 2
    >>> pred = np.zeros((4, 8), int); pred[:, :4] = 7              # finds 1, misses 2
    >>> s = evaluate_labels(truth, pred)
    >>> s.precision, s.recall, round(s.f1, 3)
    (1.0, 0.5, 0.667)
    """
    return score_matching(match_labels(truth, pred, min_area=min_area), name, seconds=seconds)


def pool_scores(scores: Iterable[ImageScore], name: str = "all") -> ImageScore:
    """Scores of several images pooled: counts and matched IoUs summed (rule 6)."""
    scores = list(scores)
    if not scores:
        raise ValueError("pool_scores needs at least one score")

    def total(attr: str) -> tuple[int, ...]:
        return tuple(int(sum(v)) for v in zip(*(getattr(s, attr) for s in scores)))

    secs = [s.seconds * s.n_images for s in scores]
    return ImageScore(name=name, n_images=sum(s.n_images for s in scores),
                      n_truth=sum(s.n_truth for s in scores), n_pred=sum(s.n_pred for s in scores),
                      tp=total("tp"), fp=total("fp"), fn=total("fn"), iou_sum=sum(s.iou_sum for s in scores),
                      n_dropped_truth=sum(s.n_dropped_truth for s in scores),
                      n_ignored_pred=sum(s.n_ignored_pred for s in scores),
                      seconds=float(np.sum(secs) / sum(s.n_images for s in scores)))


def score_table(scores: Sequence[ImageScore]) -> pd.DataFrame:
    """One row per image, then ``all (pooled)`` (rule 6) and ``mean of images`` rows.

    Columns :data:`SCORE_COLUMNS`; ``seconds`` is per image in every row.
    """
    rows = [s.as_row() for s in scores]
    table = pd.DataFrame(rows, columns=list(SCORE_COLUMNS))
    if not rows:
        return table
    pooled = pool_scores(scores, "all (pooled)").as_row()
    mean = table.drop(columns="image").mean(numeric_only=True).to_dict()
    mean["image"] = "mean of images"
    return pd.concat([table, pd.DataFrame([pooled, mean], columns=list(SCORE_COLUMNS))], ignore_index=True)


def score_groups(m: Matching, truth_group: Sequence[str] | np.ndarray,
                 unmatched_group: Sequence[str] | np.ndarray | None = None, name: str = "") -> dict[str, ImageScore]:
    """Scores per group of truth objects (e.g. per particle class or size population).

    A truth object belongs to its group; a matched prediction to its partner's group; an
    unmatched (not ignored) prediction to the group of the kept truth object holding most of its
    pixels, else to ``unmatched_group[i]`` when given (``""`` or None: to no group; it then
    counts only in the image's overall score).

    Parameters
    ----------
    m : Matching
    truth_group : sequence of str, shape (len(m.truth_ids),)
    unmatched_group : sequence of str, shape (len(m.pred_ids),), optional

    Returns
    -------
    dict of str to ImageScore
        One score per group named in ``truth_group`` (``n_pred`` = its predictions counted at 0.5).
    """
    tg = np.asarray(truth_group, dtype=object)
    if len(tg) != len(m.truth_ids):
        raise ValueError(f"truth_group has {len(tg)} entries for {len(m.truth_ids)} truth objects")
    pred_group = (np.asarray(unmatched_group, dtype=object).copy() if unmatched_group is not None
                  else np.full(len(m.pred_ids), "", dtype=object))
    if len(m.truth_ids):
        pos = np.searchsorted(m.truth_ids, m.pred_truth).clip(0, len(m.truth_ids) - 1)
        on_kept = m.truth_ids[pos] == m.pred_truth
        pred_group[on_kept] = tg[pos[on_kept]]
    counts: dict[str, list[list[int]]] = {g: [[], [], []] for g in dict.fromkeys(tg)}
    iou_sums = dict.fromkeys(counts, 0.0)
    n_pred = dict.fromkeys(counts, 0)
    for k, thr in enumerate(THRESHOLDS):
        t_idx, p_idx, iou = m.matched(thr)
        groups_p = pred_group.copy()
        groups_p[p_idx] = tg[t_idx]
        unmatched = np.ones(len(m.pred_ids), bool)
        unmatched[p_idx] = False
        fp_mask = unmatched & ~m.pred_ignorable
        for g, (tp, fp, fn) in counts.items():
            hit = tg[t_idx] == g
            tp.append(int(np.count_nonzero(hit)))
            fp.append(int(np.count_nonzero(fp_mask & (groups_p == g))))
            fn.append(int(np.count_nonzero(tg == g)) - tp[-1])
            if k == 0:
                iou_sums[g] = float(iou[hit].sum())
                n_pred[g] = tp[-1] + fp[-1]
    return {g: ImageScore(name=f"{name}:{g}" if name else str(g), n_images=1, n_truth=int(np.count_nonzero(tg == g)),
                          n_pred=n_pred[g], tp=tuple(c[0]), fp=tuple(c[1]), fn=tuple(c[2]), iou_sum=iou_sums[g])
            for g, c in counts.items()}


def pieces_per_truth(m: Matching, *, min_cover: float = 0.1) -> np.ndarray:
    """Number of predictions each kept truth object is cut into.

    A prediction is a piece of truth object T when more than half of the prediction's pixels lie
    on T and it covers at least ``min_cover`` of T's area. One piece = whole (or shrunk), two or
    more = cut; zero = missed or merged into a larger prediction.

    Returns
    -------
    ndarray of int, shape (len(m.truth_ids),)
    """
    on_t = (m.pair_inter > MAJORITY * m.pred_area[m.pair_p]) & (m.pair_inter >= min_cover * m.truth_area[m.pair_t])
    return np.bincount(m.pair_t[on_t], minlength=len(m.truth_ids))


# ============================================================================ truth preparation
def truth_from_binary(mask: np.ndarray) -> np.ndarray:
    """Ground-truth label image from a hand-drawn mask.

    A *binary* mask (bool, or integers with one non-zero value, e.g. 0/255) drawn with 1-px
    background lines between touching particles is split into its 4-connected components; a
    *label* image (more than one non-zero value) keeps its objects, relabelled 1..n in order
    (``skimage.segmentation.relabel_sequential``).

    Parameters
    ----------
    mask : ndarray, shape (H, W), bool or non-negative integers

    Returns
    -------
    ndarray of int32, shape (H, W)
        0 = background, 1..n = objects.
    """
    from skimage.measure import label
    from skimage.segmentation import relabel_sequential

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a truth mask must be 2-D, got shape {mask.shape}")
    if mask.dtype == bool or len(np.unique(mask[mask != 0])) <= 1:
        return label(mask != 0, connectivity=1).astype(np.int32)
    labels = _check_labels(mask, "truth")
    return relabel_sequential(labels)[0].astype(np.int32)


def crop_truth(truth: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Truth drawn on the full frame, cut to the analysed rows of a prediction.

    Predictions cover only the rows above the microscope's info banner; a truth image of the
    full frame (same width, more rows) loses its bottom rows (objects cut there keep their
    visible part). Any other shape mismatch raises ``ValueError``.
    """
    truth = np.asarray(truth)
    if truth.shape == tuple(shape):
        return truth
    if truth.ndim == 2 and len(shape) == 2 and truth.shape[1] == shape[1] and truth.shape[0] > shape[0]:
        return truth[: shape[0]]
    raise ValueError(f"truth of shape {truth.shape} does not fit a prediction of shape {tuple(shape)} "
                     "(only a truth with extra banner rows at the bottom is cut to fit)")


@dataclass(frozen=True, eq=False)
class Alignment:
    """Result of :func:`align_truth`.

    Attributes
    ----------
    shift : (int, int)
        (rows, columns) the truth was moved by: ``aligned[r, c] = truth[r - dy, c - dx]``.
    truth : ndarray, same shape and dtype as the input truth
        The shifted truth (pixels moved in from outside are 0).
    contrast : {"bright", "dark"}
        Particle polarity used to threshold the image.
    overlap_iou : float
        IoU of the shifted truth's foreground with the thresholded image (a quality figure).
    """

    shift: tuple[int, int]
    truth: np.ndarray
    contrast: str
    overlap_iou: float


def align_truth(truth: np.ndarray, image: np.ndarray, max_shift: int = 20, *,
                contrast: Literal["auto", "bright", "dark"] = "auto") -> Alignment:
    """Integer offset that best aligns a truth mask with an image of the same field.

    For masks drawn on one detector's image (e.g. SE) scored on another's (e.g. TSEM, taken at
    the same time, offset by a few pixels). The image is thresholded (Otsu) into particle /
    substrate, particles brighter (``bright``) or darker (``dark``) than the substrate; the
    offset is the peak of the phase correlation of the truth foreground with that binary image
    (``skimage.registration.phase_cross_correlation``, whole pixels). ``auto`` tries both
    polarities and keeps the one whose shifted truth overlaps the particles best.

    Parameters
    ----------
    truth : ndarray of int or bool, shape (H, W)
        Label image or mask (0 = background).
    image : ndarray, shape (H, W)
        Grey image of the same field (the analysed rows only: no banner).
    max_shift : int
        Largest plausible offset per axis in px; a larger peak raises ``ValueError``.
    contrast : {"auto", "bright", "dark"}

    Returns
    -------
    Alignment
    """
    from skimage.filters import threshold_otsu
    from skimage.registration import phase_cross_correlation

    truth, image = np.asarray(truth), np.asarray(image, dtype=np.float64)
    if truth.shape != image.shape:
        raise ValueError(f"truth and image shapes differ: {truth.shape} vs {image.shape}")
    if contrast not in ("auto", "bright", "dark"):
        raise ValueError(f"contrast must be 'auto', 'bright' or 'dark', got {contrast!r}")
    fg = truth != 0
    bright = image > threshold_otsu(image)
    tries = []
    for polarity in (("bright", "dark") if contrast == "auto" else (contrast,)):
        particles = bright if polarity == "bright" else ~bright
        shift, _, _ = phase_cross_correlation(particles.astype(np.float32), fg.astype(np.float32),
                                              normalization=None)
        dy, dx = (int(round(float(v))) for v in shift)
        moved = shift_labels(fg, dy, dx)
        iou = np.count_nonzero(moved & particles) / max(np.count_nonzero(moved | particles), 1)
        tries.append((iou, polarity, dy, dx))
    iou, polarity, dy, dx = max(tries)
    if max(abs(dy), abs(dx)) > max_shift:
        raise ValueError(f"the best offset ({dy}, {dx}) px exceeds max_shift={max_shift}: "
                         "is this the same field? (raise max_shift if the detectors are that far apart)")
    return Alignment(shift=(dy, dx), truth=shift_labels(truth, dy, dx), contrast=polarity, overlap_iou=float(iou))


def shift_labels(labels: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``labels`` moved by whole pixels (``out[r, c] = labels[r - dy, c - dx]``), zero-filled."""
    out = np.zeros_like(labels)
    h, w = labels.shape
    if abs(dy) >= h or abs(dx) >= w:
        return out
    src = labels[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    out[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    return out


# ============================================================================ helpers
def _check_labels(labels: np.ndarray, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{what} label image must be 2-D, got shape {labels.shape}")
    if labels.dtype == bool:
        raise ValueError(f"{what} is a boolean mask, not a label image: use truth_from_binary() first")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what} labels must be integers, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{what} labels must be >= 0 (0 = background), got {labels.min()}")
    return labels.astype(np.int64, copy=False)


def _column_argmax(table: sparse.csr_matrix) -> np.ndarray:
    """Row index of the largest entry of each column (0 for an empty column)."""
    csc = table.tocsc()
    out = np.zeros(csc.shape[1], np.int64)
    counts = np.diff(csc.indptr)
    nz = np.flatnonzero(counts)
    if len(nz):
        # sort each column's entries by value, take the last one
        col_of = np.repeat(np.arange(csc.shape[1]), counts)
        order = np.lexsort((csc.data, col_of))
        last = csc.indptr[nz + 1] - 1
        out[nz] = csc.indices[order][last]
    return out


def _resolve_ties(t: np.ndarray, p: np.ndarray, iou: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one subset of candidate pairs with the largest total IoU (ties at IoU = 0.5 only)."""
    from scipy.optimize import linear_sum_assignment

    ut, ti = np.unique(t, return_inverse=True)
    up, pi = np.unique(p, return_inverse=True)
    w = np.zeros((len(ut), len(up)))
    w[ti, pi] = iou
    r, c = linear_sum_assignment(w, maximize=True)
    ok = w[r, c] > 0
    return ut[r[ok]], up[c[ok]], w[r[ok], c[ok]]


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")
