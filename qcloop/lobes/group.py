"""The lobe grouping end to end: :func:`group_lobes` (regions in, particles made of lobes out).

Steps 1 and 2 (:func:`_pieces_and_features`: fill holes, recover dim lobes, split into lobes,
pair features) are the costly part; step 3 (:func:`qcloop.lobes.fusion._fuse_lobes`) decides
with thresholds after. The gap between fused lobes becomes part of the particle
(:func:`_bridge_gaps`); a recovered dim blob that fuses with nothing is dropped.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from qcloop.config import LobesConfig
from qcloop.lobes.dim_lobes import recover_dim_lobes
from qcloop.lobes.fusion import _fuse_lobes, fuse_logit
from qcloop.lobes.labels import _geometry, _Geometry, _relabel, border_flags, fill_enclosed_holes, lobe_radius_px
from qcloop.lobes.pairs import _gap_px, _grey_span, _pair_features, _Pairs
from qcloop.lobes.split import _decompose, split_by_seams
from qcloop.records import ParticleMasks, Segmentation, SemImage

# Tuned constants: see "Where the numbers come from" in the package docstring.
#: Holes enclosed by one region belong to it up to this fraction of a typical region's area.
#: Konstanz, by hand (cebfcf5).
_MAX_HOLE_AREA = 0.5
#: Gaussian smoothing (px) of the intensity that seams, dim lobes and pair contrasts are read
#: from (shot noise). Konstanz, by hand (cebfcf5).
_SMOOTH_PX = 1.0


def _bridge_gaps(lobes: np.ndarray, particle_of_lobe: np.ndarray, geo: _Geometry,
                 feats: pd.DataFrame, fused: np.ndarray, pairs: _Pairs) -> np.ndarray:
    """Lobe labels with the background gap between fused lobes that do not touch filled
    (each gap pixel gets the nearest lobe's label); ``feats`` and ``pairs`` from
    :func:`_pair_features` of the lobes with ``geo``."""
    sel = fused & (feats["shared_px"].to_numpy() == 0)
    if not sel.any():
        return lobes
    c = pairs.contacts
    on = sel[pairs.pair]
    height, width = lobes.shape
    marker = np.zeros(lobes.shape, np.int32)
    for dy, dx in ((0.0, 0.5), (0.0, -0.5), (0.5, 0.0), (-0.5, 0.0)):  # both pixels of a contact
        yy = np.round(c["y"][on] + dy).astype(np.intp)
        xx = np.round(c["x"][on] + dx).astype(np.intp)
        ok = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        marker[yy[ok], xx[ok]] = particle_of_lobe[c["a"][on][ok]]
    reach = int(np.ceil(pairs.gap_px / 2.0)) + 1
    near = ndi.maximum_filter(marker, size=2 * reach + 1)
    ext = pairs.ext
    fill = (lobes == 0) & (near > 0) & (geo.dist_bg <= pairs.gap_px / 2.0 + 1.0) & (particle_of_lobe[ext] == near)
    return np.where(fill, ext, lobes).astype(np.int32)


def _pieces_and_features(labels: np.ndarray, intensity: np.ndarray, cfg: LobesConfig
                         ) -> tuple[np.ndarray, int, _Geometry, _Pairs, np.ndarray, pd.DataFrame]:
    """Steps 1 and 2 of the grouping.

    Returns
    -------
    labels : ndarray of int32
        The regions, holes filled, recovered dim lobes added (labels above ``n_segmented``).
    n_segmented : int
        Number of regions from the segmenter.
    geometry : _Geometry
        Distances of ``labels``.
    pairs : _Pairs
        Contacts and centroids of the lobes (:func:`_pair_features`).
    lobes : ndarray of int32
        Lobes split from the regions (each inside one region).
    features : pandas.DataFrame
        :func:`lobe_pair_features` of the lobes.
    """
    n_segmented = int(labels.max())
    area = np.bincount(labels.ravel())[1:]
    r_area = float(np.sqrt(np.median(area[area > 0]) / np.pi))
    labels = fill_enclosed_holes(labels, _MAX_HOLE_AREA * np.pi * r_area**2)
    smoothed = ndi.gaussian_filter(np.asarray(intensity, np.float32), _SMOOTH_PX)
    if cfg.dim_lobes:
        labels = recover_dim_lobes(labels, smoothed, r_area)
    geo = _geometry(labels)
    r_typ = lobe_radius_px(labels, geo.dist)
    lobes = _decompose(labels, geo, r_typ, cfg.max_lobes)
    span = _grey_span(smoothed[labels > 0])  # the lobes cover the regions' pixels
    changed = None
    for _ in range(max(0, cfg.max_lobes - 1)):  # a part may hold a further seam (a chain)
        lobes, changed = split_by_seams(lobes, smoothed, r_typ, span, cfg.seam_depth, candidates=changed)
        if changed.size == 0:
            break
    lobes = _relabel(lobes)
    feats, pairs = _pair_features(lobes, smoothed, labels, r_typ, geo, _gap_px(r_typ, cfg.max_gap), span)
    return labels, n_segmented, geo, pairs, lobes, feats


def group_lobes(seg: Segmentation, image: SemImage, cfg: LobesConfig | None = None) -> ParticleMasks:
    """Group a segmentation's regions into particles made of one or more lobes.

    Parameters
    ----------
    seg : Segmentation
        Regions over the analysed part of ``image``.
    image : SemImage
        The image; its intensity gives the contrast across lobe boundaries.
    cfg : LobesConfig
        ``enabled=False`` makes every region one particle with one lobe.

    Returns
    -------
    ParticleMasks
        Particle and lobe label images (int32), ``lobe_parent`` and ``touches_border``.
    """
    cfg = cfg if cfg is not None else LobesConfig()
    labels = np.asarray(seg.labels)
    if labels.ndim != 2:
        raise ValueError(f"segmentation labels must be 2-D, got shape {labels.shape}")
    expected = (image.analysed_height_px, image.width_px)
    if labels.shape != expected:
        raise ValueError(f"segmentation labels have shape {labels.shape}, image analysed region is {expected}")
    labels = _relabel(labels)
    n = int(labels.max())
    if n == 0:
        z = np.zeros(labels.shape, np.int32)
        return ParticleMasks(z, z.copy(), np.zeros(1, np.int32), np.zeros(1, bool))
    if not cfg.enabled:
        return ParticleMasks(labels, labels.copy(), np.arange(n + 1, dtype=np.int32), border_flags(labels))

    labels, n_segmented, geo, pairs, lobes, feats = _pieces_and_features(labels, image.intensity(), cfg)
    m = int(lobes.max())
    recovered = np.zeros(m + 1, bool)  # lobes of dim blobs the segmenter had left out
    recovered[lobes[labels > n_segmented]] = True
    recovered[0] = False
    a = feats["a"].to_numpy()
    b = feats["b"].to_numpy()
    fuse = fuse_logit(feats)
    fuse[~(feats["neck"].to_numpy(float) >= cfg.min_neck)] = -np.inf
    roots, fused = _fuse_lobes(a, b, fuse, pairs.centres, cfg)
    # a recovered dim blob stays only as a lobe of a particle with other lobes
    alone = np.bincount(roots, weights=~recovered, minlength=m + 1) == 0
    roots = np.where(alone[roots], 0, roots)
    _, particle_of_piece = np.unique(roots, return_inverse=True)  # root 0 -> 0
    particle_of_piece = particle_of_piece.astype(np.int32)
    pieces = _bridge_gaps(lobes, particle_of_piece, geo, feats, fused, pairs)
    _, lobe_of_piece = np.unique(np.where(particle_of_piece > 0, np.arange(m + 1), 0), return_inverse=True)
    lobe_of_piece = lobe_of_piece.astype(np.int32)
    lobe_parent = np.zeros(int(lobe_of_piece.max()) + 1, np.int32)
    lobe_parent[lobe_of_piece] = particle_of_piece
    particles = particle_of_piece[pieces]
    return ParticleMasks(
        labels=particles.astype(np.int32),
        lobe_labels=lobe_of_piece[pieces],
        lobe_parent=lobe_parent,
        touches_border=border_flags(particles),
    )
