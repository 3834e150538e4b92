"""Morphology embedder: shape, invariances, row order, degenerate particles."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from skimage.draw import disk, polygon

from qcloop.embed import get_embedder
from qcloop.embed.morphology import DIM, FEATURE_NAMES, MorphologyEmbedder
from qcloop.config import PipelineConfig
from qcloop.records import ParticleMasks, PixelSize, SemImage
from qcloop.synth import SynthSpec, generate_image

F = {name: i for i, name in enumerate(FEATURE_NAMES)}


def masks_from(labels: np.ndarray, lobe_labels: np.ndarray | None = None,
               lobe_parent: np.ndarray | None = None) -> ParticleMasks:
    n = int(labels.max())
    if lobe_labels is None:
        lobe_labels, lobe_parent = labels, np.arange(n + 1, dtype=np.int32)
    return ParticleMasks(labels=labels.astype(np.int32), lobe_labels=lobe_labels.astype(np.int32),
                         lobe_parent=np.asarray(lobe_parent, np.int32), touches_border=np.zeros(n + 1, bool))


def sem(pixels: np.ndarray, nm: float | None = 2.0) -> SemImage:
    return SemImage(path=__import__("pathlib").Path("<test>"), pixels=pixels, analysed_height_px=pixels.shape[0],
                    pixel_size=PixelSize(nm, "config" if nm else "none"))


def table(ids) -> pd.DataFrame:
    return pd.DataFrame({"particle_id": np.asarray(ids, int)})


def square(labels: np.ndarray, label: int, cx: float, cy: float, half: float, angle: float) -> None:
    c, s = math.cos(angle), math.sin(angle)
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * half
    x = cx + c * corners[:, 0] - s * corners[:, 1]
    y = cy + s * corners[:, 0] + c * corners[:, 1]
    rr, cc = polygon(y, x, labels.shape)
    labels[rr, cc] = label


def test_registered_and_shape():
    emb = get_embedder(PipelineConfig())
    assert isinstance(emb, MorphologyEmbedder)
    assert emb.spec == "morphology-v1"
    labels = np.zeros((120, 160), np.int32)
    rr, cc = disk((40, 40), 15)
    labels[rr, cc] = 1
    square(labels, 2, 110, 60, 14, 0.3)
    img = np.where(labels > 0, 200, 60).astype(np.uint8)
    out = emb(sem(img), masks_from(labels), table([1, 2]))
    assert out.shape == (2, DIM) and out.dtype == np.float64
    assert np.isfinite(out).all()
    assert len(FEATURE_NAMES) == DIM == len(set(FEATURE_NAMES))
    # disc vs square: circularity, corners, rectangularity tell them apart
    assert out[0, F["circularity"]] > 0.95 > out[1, F["circularity"]]
    assert out[0, F["corners"]] == 0 and out[1, F["corners"]] == 4
    assert out[1, F["rectangularity"]] > 0.95 and out[0, F["rectangularity"]] < 0.86
    # ECD in nm at 2 nm/px: area ~ pi 15^2 -> ECD ~ 30 px = 60 nm
    assert math.exp(out[0, F["log_ecd"]]) == pytest.approx(60, rel=0.05)


def test_rotation_and_scale_invariance_of_shape_features():
    emb = MorphologyEmbedder()
    shape_cols = [F[c] for c in ("circularity", "solidity", "rectangularity", "corners", "hu_1", "hu_2",
                                 "cfd_m3", "cfd_5", "radial_4", "radial_sd")]
    rows = []
    for k, (angle, half) in enumerate([(0.0, 20), (0.4, 20), (1.1, 20), (0.7, 32)]):
        labels = np.zeros((100, 100), np.int32)
        square(labels, 1, 50, 50, half, angle)
        img = np.where(labels > 0, 190, 50).astype(np.uint8)
        rows.append(emb(sem(img), masks_from(labels), table([1]))[0])
    rows = np.array(rows)
    spread = rows[:, shape_cols].max(0) - rows[:, shape_cols].min(0)
    assert np.all(spread < np.array([0.04, 0.03, 0.06, 0.5, 0.05, 0.5, 0.04, 0.03, 0.04, 0.03])), spread
    # the size feature does change with size, by log(32/20)
    assert rows[3, F["log_ecd"]] - rows[0, F["log_ecd"]] == pytest.approx(math.log(32 / 20), abs=0.03)


def test_pixel_size_sets_the_size_unit():
    labels = np.zeros((60, 60), np.int32)
    rr, cc = disk((30, 30), 12)
    labels[rr, cc] = 1
    img = np.where(labels > 0, 200, 60).astype(np.uint8)
    a = MorphologyEmbedder()(sem(img, 2.0), masks_from(labels), table([1]))[0]
    b = MorphologyEmbedder()(sem(img, 4.0), masks_from(labels), table([1]))[0]
    c = MorphologyEmbedder()(sem(img, None), masks_from(labels), table([1]))[0]
    assert b[F["log_ecd"]] - a[F["log_ecd"]] == pytest.approx(math.log(2))
    assert a[F["log_ecd"]] - c[F["log_ecd"]] == pytest.approx(math.log(2))  # px when no pixel size
    np.testing.assert_allclose(np.delete(a, F["log_ecd"]), np.delete(b, F["log_ecd"]))


def test_rows_follow_the_particle_table_and_lobes_come_from_the_masks():
    labels = np.zeros((80, 200), np.int32)
    lobes = np.zeros_like(labels)
    rr, cc = disk((40, 40), 14)
    labels[rr, cc] = 1
    lobes[rr, cc] = 1
    for i, x in enumerate((110, 130)):  # a dumbbell of two lobes = particle 2
        rr, cc = disk((40, x), 13)
        labels[rr, cc] = 2
        lobes[rr, cc] = 2 + i
    lobes[labels == 2] = np.where(np.arange(200)[None, :].repeat(80, 0)[labels == 2] < 120, 2, 3)
    masks = masks_from(labels, lobes, np.array([0, 1, 2, 2]))
    img = np.where(labels > 0, 200, 60).astype(np.uint8)
    emb = MorphologyEmbedder()
    fwd = emb(sem(img), masks, table([1, 2]))
    rev = emb(sem(img), masks, table([2, 1]))
    np.testing.assert_array_equal(fwd, rev[::-1])
    assert fwd[0, F["lobes"]] == 1 and fwd[1, F["lobes"]] == 2
    assert 0.6 < fwd[1, F["lobe_area_ratio"]] <= 1.0
    assert fwd[1, F["log_aspect_ratio"]] > 0.4 > fwd[0, F["log_aspect_ratio"]]
    # without a particle_id column the rows are labels 1..n
    np.testing.assert_array_equal(emb(sem(img), masks, pd.DataFrame({"x": [0, 0]})), fwd)


def test_degenerate_and_missing_particles_give_finite_rows():
    labels = np.zeros((30, 30), np.int32)
    labels[5, 5] = 1  # one pixel
    labels[10:12, 20:23] = 2  # a sliver
    img = np.where(labels > 0, 200, 60).astype(np.uint8)
    out = MorphologyEmbedder()(sem(img), masks_from(labels), table([1, 2, 3]))  # 3 does not exist
    assert out.shape == (3, DIM) and np.isfinite(out).all()
    assert MorphologyEmbedder()(sem(img), masks_from(labels), table([])).shape == (0, DIM)


def test_intensity_texture_sees_the_edge_effect():
    """Synthetic SEM particles have bright rims: edge contrast > 0 and bright vs substrate."""
    s = generate_image(SynthSpec(class_mix={"sphere": 1}, n_particles=20, mean_ecd_nm=80, pixel_size_nm=2,
                                 touching_fraction=0, overlap_fraction=0, width_px=400, height_px=300), 1)
    t = s.truth[~s.truth["touches_border"]]
    out = MorphologyEmbedder()(s.to_sem_image(), masks_from(s.labels), table(t["particle"]))
    assert (out[:, F["edge_contrast"]] > 0.02).mean() > 0.9
    assert (out[:, F["background_contrast"]] > 0.2).all()


def test_corner_features_follow_the_rounding_series():
    """Sharp → rounded cubes: corner sharpness and turning peaks fall, circularity rises."""
    med = []
    for r in (0.05, 0.4, 0.9):
        s = generate_image(SynthSpec(class_mix={"cube": 1, "triangle": 1}, rounding=r, rounding_jitter=0,
                                     n_particles=30, mean_ecd_nm=80, pixel_size_nm=2, touching_fraction=0,
                                     overlap_fraction=0, width_px=512, height_px=384), 4)
        t = s.truth[~s.truth["touches_border"]]
        out = MorphologyEmbedder()(s.to_sem_image(), masks_from(s.labels), table(t["particle"]))
        med.append(np.median(out[:, [F["corner_sharpness"], F["turn_1"], F["circularity"]]], axis=0))
    med = np.array(med)
    assert np.all(np.diff(med[:, 0]) < 0) and np.all(np.diff(med[:, 1]) < 0), med
    assert np.all(np.diff(med[:, 2]) > 0), med
