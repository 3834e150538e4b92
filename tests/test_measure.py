"""Measurements on small drawn shapes with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage.draw import disk, polygon
from skimage.morphology import disk as footprint_disk
from skimage.morphology import opening

from qcloop.measure import PARTICLE_COLUMNS, corner_features, feret_diameters, measure_particles
from qcloop.records import ParticleMasks, PixelSize, SemImage


def _image(mask_labels: np.ndarray, lobe_labels: np.ndarray | None = None, lobe_parent=None,
           nm: float | None = 2.0) -> tuple[SemImage, ParticleMasks]:
    pixels = np.where(mask_labels > 0, 200, 40).astype(np.uint8)
    img = SemImage(Path("shape.tif"), pixels, pixels.shape[0],
                   PixelSize(nm, "config" if nm else "none"))
    n = int(mask_labels.max())
    if lobe_labels is None:
        lobe_labels = mask_labels.copy()
        lobe_parent = np.arange(n + 1, dtype=np.int32)
    border = np.zeros(n + 1, bool)
    return img, ParticleMasks(mask_labels.astype(np.int32), lobe_labels.astype(np.int32),
                              np.asarray(lobe_parent, np.int32), border)


def test_every_column_is_produced_and_documented() -> None:
    labels = np.zeros((60, 60), np.int32)
    labels[disk((30, 30), 12)] = 1
    img, masks = _image(labels)
    table = measure_particles(img, masks)
    assert list(table.columns) == list(PARTICLE_COLUMNS)
    assert all(isinstance(doc, str) and len(doc) > 5 for doc in PARTICLE_COLUMNS.values())
    empty = measure_particles(*_image(np.zeros((20, 20), np.int32)))
    assert list(empty.columns) == list(PARTICLE_COLUMNS) and len(empty) == 0


def test_disk_size_and_roundness_in_nm() -> None:
    labels = np.zeros((100, 100), np.int32)
    labels[disk((50, 50), 20)] = 1
    row = measure_particles(*_image(labels, nm=2.0)).iloc[0]
    assert row.ecd_px == pytest.approx(40.0, rel=0.02)
    assert row.ecd_nm == pytest.approx(2.0 * row.ecd_px)
    assert row.area_nm2 == pytest.approx(4.0 * row.area_px)
    assert row.circularity > 0.9
    assert row.solidity > 0.97
    assert row.aspect_ratio == pytest.approx(1.0, abs=0.05)
    assert row.corners == 0 and row.corner_sharpness == 0.0
    assert row.lobes == 1 and row.lobe_diameter_nm == pytest.approx(row.ecd_nm)
    assert (row.centroid_x_px, row.centroid_y_px) == pytest.approx((50.0, 50.0), abs=0.01)


def test_without_pixel_size_nm_columns_are_nan() -> None:
    labels = np.zeros((60, 60), np.int32)
    labels[disk((30, 30), 10)] = 1
    row = measure_particles(*_image(labels, nm=None)).iloc[0]
    assert np.isnan(row.ecd_nm) and np.isnan(row.area_nm2) and np.isnan(row.feret_max_nm)
    assert row.ecd_px > 0


def test_rectangle_feret_orientation_aspect() -> None:
    m = np.zeros((80, 80), bool)
    m[30:50, 10:70] = True  # 20 rows x 60 columns: major axis along x
    fmax, fmin = feret_diameters(m)
    assert fmin == pytest.approx(20.0)
    assert fmax == pytest.approx(np.hypot(20, 60), rel=0.02)
    row = measure_particles(*_image(m.astype(np.int32))).iloc[0]
    assert row.aspect_ratio == pytest.approx(3.0, rel=0.05)
    assert min(row.orientation_deg, 180 - row.orientation_deg) < 1.0
    # rotate: major axis along y → 90°
    row = measure_particles(*_image(m.T.copy().astype(np.int32))).iloc[0]
    assert row.orientation_deg == pytest.approx(90.0, abs=1.0)


def test_diagonal_orientation_counter_clockwise_from_x() -> None:
    m = np.zeros((100, 100), bool)
    rr, cc = polygon([80, 85, 25, 20], [15, 20, 85, 80])  # a bar rising to the right
    m[rr, cc] = True
    row = measure_particles(*_image(m.astype(np.int32))).iloc[0]
    assert row.orientation_deg == pytest.approx(45.0, abs=3.0)


def test_corners_of_square_and_triangle_and_rounding() -> None:
    sq = np.zeros((90, 90), bool)
    sq[20:70, 20:70] = True
    n_sq, sharp_sq = corner_features(sq)
    assert n_sq == 4
    rounded = opening(sq, footprint_disk(12))
    n_r, sharp_r = corner_features(rounded)
    assert n_r == 4 and sharp_r < sharp_sq - 0.05
    tri = np.zeros((90, 90), bool)
    tri[polygon([10, 80, 80], [45, 5, 85])] = True
    assert corner_features(tri)[0] == 3
    circle = np.zeros((90, 90), bool)
    circle[disk((45, 45), 30)] = True
    assert corner_features(circle) == (0, 0.0)


def test_lobe_diameters_of_a_dumbbell() -> None:
    labels = np.zeros((80, 130), np.int32)
    lobes = np.zeros_like(labels)
    a = np.zeros_like(labels, bool); a[disk((40, 40), 20)] = True
    b = np.zeros_like(labels, bool); b[disk((40, 72), 20)] = True
    labels[a | b] = 1
    lobes[a] = 1
    lobes[b & ~a] = 2
    img, masks = _image(labels, lobes, [0, 1, 1])
    row = measure_particles(img, masks).iloc[0]
    assert row.lobes == 2
    assert row.lobe_diameter_px == pytest.approx(41.0, abs=2.0)
    assert len(row.lobe_diameters_nm.split(";")) == 2
    assert row.solidity < 0.97
