"""Measurements on small drawn shapes with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.signal import find_peaks
from scipy.spatial import ConvexHull
from skimage.draw import disk, polygon
from skimage.measure import find_contours, regionprops
from skimage.morphology import disk as footprint_disk
from skimage.morphology import opening

from qcloop import _geometry
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


# --- the vectorised formulas, pinned against the library calls they stand for -------------------

def _shapes() -> dict[str, np.ndarray]:
    """Disc, square, rotated rectangle and triangle, one label each in one image."""
    labels = np.zeros((120, 160), np.int32)
    labels[disk((30, 30), 18)] = 1
    labels[70:100, 15:45] = 2
    ang = np.radians(30)
    c, s = np.cos(ang), np.sin(ang)
    corners = np.array([[-8, -25], [-8, 25], [8, 25], [8, -25]]) @ np.array([[c, -s], [s, c]])
    labels[polygon(30 + corners[:, 0], 100 + corners[:, 1])] = 3
    labels[polygon([70, 110, 110], [120, 95, 150])] = 4
    return labels


def test_moment_features_match_regionprops() -> None:
    labels = _shapes()
    img, masks = _image(labels, nm=2.0)
    table = measure_particles(img, masks).set_index("particle_id")
    for p in regionprops(labels, intensity_image=img.intensity()):
        row = table.loc[p.label]
        assert row.area_px == p.area
        assert (row.centroid_y_px, row.centroid_x_px) == pytest.approx(p.centroid, abs=1e-9)
        assert row.eccentricity**2 == pytest.approx(p.eccentricity**2, abs=1e-12)  # sqrt(1 - l2/l1)
        assert row.aspect_ratio == pytest.approx(p.axis_major_length / p.axis_minor_length, rel=1e-9)
        assert row.mean_intensity == pytest.approx(p.intensity_mean, rel=1e-6)
        assert (row.bbox_r0, row.bbox_c0, row.bbox_r1, row.bbox_c1) == p.bbox
        if p.label not in (1, 2):  # a disc or a square has no major axis
            expected = (np.degrees(p.orientation) + 90.0) % 180.0
            assert min(abs(row.orientation_deg - expected), 180 - abs(row.orientation_deg - expected)) < 1e-6


def _random_labels(seed: int) -> np.ndarray:
    """Touching labels, holes, specks, shapes cut by the image edge and an absent label."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((90, 110), np.int32)
    for k in range(1, 16):
        r, c = rng.integers(-5, 95), rng.integers(-5, 115)
        m = rng.integers(3, 7)
        ang = np.sort(rng.uniform(0, 2 * np.pi, m))
        rad = rng.uniform(1, 22, m)
        labels[polygon(r + rad * np.sin(ang), c + rad * np.cos(ang), shape=labels.shape)] = k
        if k % 5 == 0:
            labels[disk((r, c), 3, shape=labels.shape)] = 0  # hole (or bite)
        if k % 7 == 0:
            labels[rng.integers(0, 90, 4), rng.integers(0, 110, 4)] = k  # specks elsewhere
    labels[labels == 3] = 0
    return labels


def _reference_contour(mask: np.ndarray) -> np.ndarray:
    """The outline as skimage traces it: longest 0.5 contour of the padded mask, open."""
    c = max(find_contours(np.pad(mask, 1).astype(np.float32), 0.5), key=len)
    return c[:-1] - 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outlines_are_those_of_find_contours(seed: int) -> None:
    labels = _random_labels(seed)
    n = int(labels.max())
    slices = ndi.find_objects(labels)
    origins = np.zeros((n + 1, 2), np.int64)
    for k, sl in enumerate(slices, start=1):
        if sl is not None:
            origins[k] = sl[0].start, sl[1].start
    ol = _geometry.trace_outlines(labels, n, origins)
    fig = _geometry.outline_figures(ol)
    assert ol.lengths[3] == 0
    for k, sl in enumerate(slices, start=1):
        if sl is None:
            continue
        ref = _reference_contour(labels[sl] == k)
        got = np.stack([ol.rows2[ol.start[k]:ol.start[k + 1]], ol.cols2[ol.start[k]:ol.start[k + 1]]], 1) / 2.0
        np.testing.assert_array_equal(got, ref)  # same points, same start and direction
        # perimeter, enclosed area, convex hull and Feret diameters of that outline
        y, x = ref[:, 0], ref[:, 1]
        assert fig.perimeter[k] == pytest.approx(np.hypot(np.diff(y, append=y[0]), np.diff(x, append=x[0])).sum())
        assert fig.area[k] == pytest.approx(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)
        hull = ConvexHull(ref)
        assert fig.hull_area[k] == pytest.approx(hull.volume)
        v = ref[hull.vertices]
        assert fig.feret_max[k] == pytest.approx(np.sqrt(((v[:, None] - v[None]) ** 2).sum(-1)).max())
        edges = np.roll(v, -1, axis=0) - v
        normals = np.stack([-edges[:, 1], edges[:, 0]], 1) / np.hypot(edges[:, 0], edges[:, 1])[:, None]
        proj = v @ normals.T
        assert fig.feret_min[k] == pytest.approx((proj.max(0) - proj.min(0)).min())


def test_inscribed_radii_are_the_distance_transform_maxima() -> None:
    labels = _random_labels(4)
    slices = ndi.find_objects(labels)
    ids = np.array([k for k, sl in enumerate(slices, start=1) if sl is not None])
    expected = [ndi.distance_transform_edt(np.pad(labels[slices[k - 1]] == k, 1)).max() for k in ids]
    box = np.zeros((len(slices) + 1, 4), np.int64)
    box[ids] = [(slices[k - 1][0].start, slices[k - 1][1].start, slices[k - 1][0].stop, slices[k - 1][1].stop)
                for k in ids]
    np.testing.assert_array_equal(_geometry.inscribed_radii(labels, box, ids), expected)


def test_wrap_gaussian_is_scipys() -> None:
    rng = np.random.default_rng(0)
    n = rng.integers(12, 300, 25)
    sigmas = np.maximum(1.0, 0.015 * n)
    values = rng.normal(size=int(n.sum()))
    off = np.concatenate([[0], np.cumsum(n)])
    expected = np.concatenate([ndi.gaussian_filter1d(values[off[i]:off[i + 1]], sigmas[i], mode="wrap")
                               for i in range(len(n))])
    np.testing.assert_array_equal(_geometry.wrap_gaussian(values, n, sigmas), expected)


def test_tiled_peaks_are_find_peaks_on_the_tiled_signal() -> None:
    rng = np.random.default_rng(1)
    n = rng.integers(12, 120, 40)
    kappa = np.round(rng.normal(size=int(n.sum())), 1)  # coarse values: plateaus and ties
    off = np.concatenate([[0], np.cumsum(n)[:-1]])
    height = np.full(len(n), 0.3)
    distance = np.maximum(2, (0.08 * n).astype(np.int64))
    seg, pos = _geometry._tiled_peaks(kappa, off, n, np.arange(len(n)), height, distance)
    expected = []
    for j in range(len(n)):
        k = kappa[off[j]:off[j] + n[j]]
        peaks, _ = find_peaks(np.tile(k, 3), height=height[j], distance=distance[j])
        expected += [(j, p - n[j]) for p in peaks if n[j] <= p < 2 * n[j]]
    assert list(zip(seg.tolist(), pos.tolist())) == expected


def _reference_corners(mask: np.ndarray) -> tuple[int, float]:
    """The corner algorithm of corner_features written outline by outline with numpy / scipy."""
    contour = _reference_contour(mask)
    closed = np.vstack([contour, contour[:1]])
    seg = np.hypot(*np.diff(closed, axis=0).T)
    perimeter = float(seg.sum())
    if perimeter < 12:
        return 0, 0.0
    s = np.concatenate([[0.0], np.cumsum(seg)])
    n = int(round(perimeter))
    t = np.linspace(0, perimeter, n, endpoint=False)
    y = ndi.gaussian_filter1d(np.interp(t, s, closed[:, 0]), 1.0, mode="wrap")
    x = ndi.gaussian_filter1d(np.interp(t, s, closed[:, 1]), 1.0, mode="wrap")
    theta = np.arctan2(np.roll(y, -1) - y, np.roll(x, -1) - x)
    turn = np.mod(np.diff(np.concatenate([theta, theta[:1]])) + np.pi, 2 * np.pi) - np.pi
    kappa = ndi.gaussian_filter1d(turn, max(1.0, 0.015 * n), mode="wrap")
    kappa = -kappa if kappa.sum() < 0 else kappa
    base = 2 * np.pi / n
    peaks, _ = find_peaks(np.tile(kappa, 3), height=1.8 * base, distance=max(2, int(0.08 * n)))
    r_in = ndi.distance_transform_edt(np.pad(mask, 1)).max()
    sharp = []
    for p in peaks[(peaks >= n) & (peaks < 2 * n)] - n:
        lo = hi = p
        while kappa[(lo - 1) % n] > 1.2 * base and (p - lo) < n // 4:
            lo -= 1
        while kappa[(hi + 1) % n] > 1.2 * base and (hi - p) < n // 4:
            hi += 1
        if (kappa[np.arange(lo, hi + 1) % n] - base).sum() >= np.radians(25.0):
            sharp.append(float(np.clip(1.0 - 1.0 / kappa[p] / r_in, 0.0, 1.0)))
    return (len(sharp), float(np.mean(sharp))) if sharp else (0, 0.0)


def test_corners_match_the_per_outline_algorithm() -> None:
    """Square, triangle, disc, rotated rectangle, a rounded square and random polygons."""
    shapes = _shapes()
    shapes[opening(shapes == 2, footprint_disk(6)) | (shapes == 2)] = 0
    shapes[opening(_shapes() == 2, footprint_disk(6))] = 2
    labels = np.zeros((120, 380), np.int32)
    labels[:, :160] = shapes
    for seed, col in ((5, 160), (6, 270)):
        more = _random_labels(seed)
        labels[:90, col:col + 110] = np.where(more > 0, more + labels.max(), 0)
    img, masks = _image(labels)
    table = measure_particles(img, masks).set_index("particle_id")
    assert table.corners.max() >= 3
    for k, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        n_ref, sharp_ref = _reference_corners(labels[sl] == k)
        assert table.loc[k, "corners"] == n_ref
        assert table.loc[k, "corner_sharpness"] == pytest.approx(sharp_ref, rel=1e-9, abs=1e-12)
