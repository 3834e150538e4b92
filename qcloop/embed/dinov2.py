"""DINOv2 embedder: the paper's per-particle crops, or one pooled pass per image.

``mode: crop`` (Barnatan et al. 2025): each particle is cut out at its mask's bounding box;
pixels outside the mask are set to ``background_value`` (``input: masked``), or the binary
mask itself is the input (``input: mask``, 1 inside, 0 outside — the paper's best for
triangles); the crop is padded to a square (centred, same background), resized to
``size_px`` (bilinear, antialiased), replicated to three channels and ImageNet-normalised.
Crops go through the model in batches of ``batch_size``; the vector is the final CLS token
(``token: cls``) or CLS and the mean patch token concatenated (``cls+mean``, 2 × hidden).

``mode: pooled`` (fast path): the analysed region, optionally rescaled by ``pooled_scale``
and padded (edge values) to a multiple of the 14 px patch, goes through the model in windows
of at most ``pooled_window_px`` that tile the patch grid without overlap (the fewest windows,
sizes differing by at most one patch; every patch token comes from exactly one pass); a
particle's vector is the mean of the final patch tokens weighted by how many of its mask
pixels fall into each patch.

``spec`` names model and preprocessing, e.g. ``dinov2:dinov2-base:crop:masked:bg0:cls:224``;
a classifier trained on one spec refuses another. :func:`select_preprocessing` ranks candidate
preprocessings by the mean distance between class centroids on labelled particles.

Needs the 'foundation' extra (torch, transformers).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from qcloop.config import Dinov2Config
from qcloop.errors import ModelError
from qcloop.records import ParticleMasks, SemImage

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def model_short_name(model: str) -> str:
    """``facebook/dinov2-base`` or ``/models/dinov2-base/`` → ``dinov2-base``."""
    return Path(model.rstrip("/\\")).name or model


def spec_for(cfg: Dinov2Config) -> str:
    """The embedder spec a configuration produces (see module docstring)."""
    name = model_short_name(cfg.model)
    if cfg.mode == "pooled":
        return f"dinov2:{name}:pooled:x{cfg.pooled_scale:g}:w{cfg.pooled_window_px}:patchmean"
    inp = "mask" if cfg.input == "mask" else f"masked:bg{cfg.background_value:g}"
    return f"dinov2:{name}:crop:{inp}:{cfg.token}:{cfg.size_px}"


def square_crop(grey: np.ndarray, mask: np.ndarray, cfg: Dinov2Config) -> np.ndarray:
    """The paper's crop before resizing: masked (or mask) image padded to a centred square.

    Parameters
    ----------
    grey : ndarray of float, shape (h, w)
        Intensity in [0, 1] over the mask's bounding box.
    mask : ndarray of bool, shape (h, w)

    Returns
    -------
    ndarray of float32, shape (s, s), s = max(h, w)
    """
    if cfg.input == "mask":
        img = mask.astype(np.float32)
        bg = 0.0
    else:
        bg = float(cfg.background_value)
        img = np.where(mask, grey, bg).astype(np.float32)
    h, w = img.shape
    s = max(h, w)
    out = np.full((s, s), bg, np.float32)
    r0, c0 = (s - h) // 2, (s - w) // 2
    out[r0:r0 + h, c0:c0 + w] = img
    return out


def particle_crops(image: SemImage, masks: ParticleMasks, ids: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(grey, mask) over each particle's bounding box, in the order of ``ids``."""
    grey = image.intensity()
    labels = masks.labels
    slices = ndi.find_objects(labels, max_label=int(max(ids, default=0)))
    out = []
    for pid in ids:
        sl = slices[pid - 1] if 0 < pid <= len(slices) else None
        if sl is None:
            raise ValueError(f"particle {pid} has no pixels in the label image")
        out.append((grey[sl], labels[sl] == pid))
    return out


def split_evenly(n: int, most: int) -> list[tuple[int, int]]:
    """``n`` patches cut into the fewest runs of at most ``most``, sizes differing by ≤ 1."""
    k = max(1, math.ceil(n / most))
    edges = [round(i * n / k) for i in range(k + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:])]


@dataclass(frozen=True)
class Candidate:
    """One preprocessing tried by :func:`select_preprocessing`."""

    input: str
    background_value: float
    token: str

    def apply(self, cfg: Dinov2Config) -> Dinov2Config:
        return cfg.model_copy(update={"mode": "crop", "input": self.input,
                                      "background_value": self.background_value, "token": self.token})


DEFAULT_CANDIDATES: tuple[Candidate, ...] = tuple(
    [Candidate("masked", bg, tok) for bg in (0.0, 0.5, 1.0) for tok in ("cls", "cls+mean")]
    + [Candidate("mask", 0.0, tok) for tok in ("cls", "cls+mean")]
)


class Dinov2Embedder:
    """Callable ``(image, masks, particles) -> ndarray (n_particles, dim)`` (float32).

    Parameters
    ----------
    cfg : Dinov2Config
    model : transformers.Dinov2Model, optional
        Already loaded (shared between embedders with different preprocessing); otherwise
        :func:`qcloop.models.load_dinov2` loads ``cfg.model``.

    Raises
    ------
    ModelError
        Model missing or unusable, foundation extra absent, window not a multiple of the patch.
    """

    def __init__(self, cfg: Dinov2Config, *, model: Any = None):
        from qcloop.models import choose_device, load_dinov2, require_foundation

        require_foundation("embedder: dinov2")
        import torch

        self._torch = torch
        self.cfg = cfg
        if model is None:
            self.device = choose_device(cfg.device)
            self.model = load_dinov2(cfg, self.device)
        else:
            self.model = model
            self.device = next(model.parameters()).device
        self.patch = int(self.model.config.patch_size)
        self.hidden = int(self.model.config.hidden_size)
        if cfg.mode == "pooled" and cfg.pooled_window_px % self.patch:
            raise ModelError(f"pipeline.dinov2.pooled_window_px ({cfg.pooled_window_px}) must be a "
                             f"multiple of the model's patch size ({self.patch})")
        self.spec = spec_for(cfg)
        self.dim = self.hidden * (2 if (cfg.mode == "crop" and cfg.token == "cls+mean") else 1)
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        self._mean, self._std = mean.to(self.device), std.to(self.device)

    def with_preprocessing(self, cfg: Dinov2Config) -> "Dinov2Embedder":
        """Another embedder sharing this one's loaded model."""
        return Dinov2Embedder(cfg, model=self.model)

    # ------------------------------------------------------------------ pipeline entry
    def __call__(self, image: SemImage, masks: ParticleMasks, particles: pd.DataFrame) -> np.ndarray:
        from qcloop.embed.morphology import particle_ids

        ids = [int(i) for i in particle_ids(particles, masks)]
        if not ids:
            return np.zeros((0, self.dim), np.float32)
        if self.cfg.mode == "pooled":
            return self.embed_pooled(image.intensity(), masks.labels, ids)
        return self.embed_crops(particle_crops(image, masks, ids))

    # ------------------------------------------------------------------ crop mode
    def preprocess(self, crops: Sequence[tuple[np.ndarray, np.ndarray]]):
        """Crops → normalised tensor (n, 3, size, size) on the device."""
        torch = self._torch
        F = torch.nn.functional
        size = self.cfg.size_px
        out = torch.empty((len(crops), 1, size, size), dtype=torch.float32)
        for i, (grey, mask) in enumerate(crops):
            sq = torch.from_numpy(square_crop(grey, mask, self.cfg))[None, None]
            out[i] = F.interpolate(sq, size=(size, size), mode="bilinear", align_corners=False,
                                   antialias=True)[0]
        x = out.to(self.device).expand(-1, 3, -1, -1)
        return (x - self._mean) / self._std

    def embed_crops(self, crops: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Embed (grey in [0, 1], bool mask) crop pairs.

        Returns
        -------
        ndarray of float32, shape (n, dim)
        """
        torch = self._torch
        vecs = []
        bs = self.cfg.batch_size
        with torch.inference_mode():
            for s in range(0, len(crops), bs):
                x = self.preprocess(crops[s:s + bs])
                h = self.model(pixel_values=x).last_hidden_state
                v = h[:, 0]
                if self.cfg.token == "cls+mean":
                    v = torch.cat([v, h[:, 1:].mean(dim=1)], dim=1)
                vecs.append(v.float().cpu().numpy())
        if not vecs:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(vecs).astype(np.float32, copy=False)

    # ------------------------------------------------------------------ pooled mode
    def patch_features(self, grey: np.ndarray):
        """Final patch tokens over a whole image, windowed.

        Parameters
        ----------
        grey : ndarray of float, shape (H, W), values in [0, 1]

        Returns
        -------
        feats : ndarray of float32, shape (gh, gw, hidden)
            Patch grid of the image scaled by ``pooled_scale`` and padded to whole patches.
        scaled_shape : (int, int)
            (H', W') of the scaled image before padding.
        """
        torch = self._torch
        F = torch.nn.functional
        p = self.patch
        H, W = grey.shape
        Hs, Ws = max(1, round(H * self.cfg.pooled_scale)), max(1, round(W * self.cfg.pooled_scale))
        x = torch.from_numpy(np.ascontiguousarray(grey, np.float32))[None, None]
        if (Hs, Ws) != (H, W):
            x = F.interpolate(x, size=(Hs, Ws), mode="bilinear", align_corners=False, antialias=True)
        gh, gw = math.ceil(Hs / p), math.ceil(Ws / p)
        x = F.pad(x, (0, gw * p - Ws, 0, gh * p - Hs), mode="replicate")
        x = ((x.to(self.device).expand(-1, 3, -1, -1)) - self._mean) / self._std
        win = self.cfg.pooled_window_px // p
        windows = list(itertools.product(split_evenly(gh, win), split_evenly(gw, win)))
        feats = torch.empty((gh, gw, self.hidden), dtype=torch.float32)
        with torch.inference_mode():
            # windows of equal shape go through the model together
            for shape in sorted({(r1 - r0, c1 - c0) for (r0, r1), (c0, c1) in windows}):
                same = [w for w in windows if (w[0][1] - w[0][0], w[1][1] - w[1][0]) == shape]
                for s in range(0, len(same), self.cfg.batch_size):
                    chunk = same[s:s + self.cfg.batch_size]
                    batch = torch.cat([x[:, :, r0 * p:r1 * p, c0 * p:c1 * p] for (r0, r1), (c0, c1) in chunk])
                    tok = self.model(pixel_values=batch).last_hidden_state[:, 1:].float().cpu()
                    tok = tok.reshape(len(chunk), shape[0], shape[1], self.hidden)
                    for k, ((r0, r1), (c0, c1)) in enumerate(chunk):
                        feats[r0:r1, c0:c1] = tok[k]
        return feats.numpy(), (Hs, Ws)

    def patch_weights(self, labels: np.ndarray, ids: Sequence[int], grid: tuple[int, int],
                      scaled_shape: tuple[int, int]):
        """Sparse (n_ids, gh*gw) matrix: mask pixels of each particle falling in each patch."""
        from scipy import sparse

        H, W = labels.shape
        gh, gw = grid
        Hs, Ws = scaled_shape
        p = self.patch
        prow = np.minimum(((np.arange(H) + 0.5) * (Hs / H) // p).astype(np.int64), gh - 1)
        pcol = np.minimum(((np.arange(W) + 0.5) * (Ws / W) // p).astype(np.int64), gw - 1)
        row_of = np.full(int(labels.max(initial=0)) + 1, -1, np.int64)
        row_of[np.asarray(ids, np.int64)] = np.arange(len(ids))
        rr, cc = np.nonzero(labels)
        rows = row_of[labels[rr, cc]]
        keep = rows >= 0
        cols = prow[rr[keep]] * gw + pcol[cc[keep]]
        return sparse.csr_matrix((np.ones(int(keep.sum())), (rows[keep], cols)),
                                 shape=(len(ids), gh * gw))

    def embed_pooled(self, grey: np.ndarray, labels: np.ndarray, ids: Sequence[int]) -> np.ndarray:
        """Area-weighted mean patch token under each particle's mask.

        Returns
        -------
        ndarray of float32, shape (len(ids), hidden)
        """
        feats, scaled = self.patch_features(grey)
        gh, gw, d = feats.shape
        w = self.patch_weights(labels, ids, (gh, gw), scaled)
        total = np.asarray(w.sum(axis=1)).ravel()
        if np.any(total == 0):
            missing = [int(ids[i]) for i in np.flatnonzero(total == 0)[:5]]
            raise ValueError(f"particles without pixels in the label image: {missing}")
        out = (w @ feats.reshape(gh * gw, d).astype(np.float64)) / total[:, None]
        return out.astype(np.float32)


# --------------------------------------------------------------------------- preprocessing choice


def centroid_separation(X: np.ndarray, y: Sequence[str]) -> float:
    """Mean Euclidean distance between class centroids of L2-normalised embeddings.

    Normalising first makes the figure comparable between preprocessings whose vectors differ
    in scale or length (``cls`` vs ``cls+mean``). Needs at least two classes.
    """
    X = np.asarray(X, np.float64)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    Xn = X / np.where(norms > 0, norms, 1.0)
    classes = sorted(set(y))
    if len(classes) < 2:
        raise ValueError("need at least two classes to compare centroids")
    yy = np.asarray(list(y))
    cents = np.stack([Xn[yy == c].mean(axis=0) for c in classes])
    d = [np.linalg.norm(cents[i] - cents[j]) for i, j in itertools.combinations(range(len(classes)), 2)]
    return float(np.mean(d))


@dataclass
class SelectionResult:
    """Ranking of candidate preprocessings (best first)."""

    table: pd.DataFrame  # columns: spec, input, background_value, token, separation, n, classes
    best: Dinov2Config

    @property
    def best_spec(self) -> str:
        return spec_for(self.best)


def select_preprocessing(crops: Sequence[tuple[np.ndarray, np.ndarray]], classes: Sequence[str],
                         base: Dinov2Config, *, candidates: Iterable[Candidate] = DEFAULT_CANDIDATES,
                         embedder: Dinov2Embedder | None = None) -> SelectionResult:
    """Pick the crop preprocessing whose embeddings separate the labelled classes best.

    Parameters
    ----------
    crops : sequence of (grey, mask)
        Per labelled particle: intensity in [0, 1] over its bounding box and its bool mask.
    classes : sequence of str
        Class of each crop (at least two distinct).
    base : Dinov2Config
        Model, size, batch size, device; each candidate overrides input, background, token.
    candidates : iterable of Candidate
    embedder : Dinov2Embedder, optional
        Reuse a loaded model.

    Returns
    -------
    SelectionResult
        Ranked by :func:`centroid_separation` (largest first; ties keep the candidate order).
    """
    if len(crops) != len(classes):
        raise ValueError("one class per crop")
    if len(set(classes)) < 2:
        raise ModelError("preprocessing selection needs labelled particles of at least two classes")
    cands = list(candidates)
    if embedder is None:
        embedder = Dinov2Embedder(base.model_copy(update={"mode": "crop"}))
    rows = []
    for k, cand in enumerate(cands):
        cfg = cand.apply(base)
        emb = embedder.with_preprocessing(cfg).embed_crops(crops)
        rows.append({"spec": spec_for(cfg), "input": cand.input,
                     "background_value": cand.background_value, "token": cand.token,
                     "separation": centroid_separation(emb, classes), "n": len(crops),
                     "classes": len(set(classes)), "_order": k})
    table = pd.DataFrame(rows).sort_values(["separation", "_order"], ascending=[False, True],
                                           kind="stable").drop(columns="_order").reset_index(drop=True)
    top = table.iloc[0]
    best = Candidate(str(top["input"]), float(top["background_value"]), str(top["token"])).apply(base)
    return SelectionResult(table=table, best=best)
