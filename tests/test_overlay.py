"""Overlay drawing (qcloop.overlay) with hand-made ParticleMasks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage.draw import disk
from skimage.segmentation import find_boundaries

from qcloop.config import ImagingConfig
from qcloop.imaging import load_array
from qcloop.overlay import BORDER_DIM, LOBE_COLORS, UNKNOWN_COLOR, category_color, draw_overlay
from qcloop.records import ParticleMasks

H, W, ANALYSED = 240, 320, 220  # 20-row banner below the analysed region


def make_scene(dtype=np.uint8):
    """Four particles with 1, 2, 3 and 4 lobes, plus one cut by the left edge (1 lobe)."""
    labels = np.zeros((ANALYSED, W), np.int32)
    lobes = np.zeros((ANALYSED, W), np.int32)
    parent = [0]
    centres = {1: [(60, 70)], 2: [(60, 170), (60, 190)], 3: [(160, 60), (160, 80), (143, 70)],
               4: [(150, 200), (150, 220), (170, 200), (170, 220)], 5: [(110, 4)]}
    m = 0
    for pid, lobe_centres in centres.items():
        for c in lobe_centres:
            m += 1
            rr, cc = disk(c, 11, shape=labels.shape)
            free = labels[rr, cc] == 0
            labels[rr[free], cc[free]] = pid
            lobes[rr[free], cc[free]] = m
            parent.append(pid)
    touches = np.zeros(6, bool)
    touches[5] = True
    masks = ParticleMasks(labels, lobes, np.array(parent, np.int32), touches)
    img = np.full((H, W), 60, np.uint8)
    img[:ANALYSED][labels > 0] = 180
    img[ANALYSED:] = 0
    if dtype == np.uint16:
        img = img.astype(np.uint16) * 200
    image = load_array(img, name="scene", cfg=ImagingConfig(banner="fixed", banner_rows=H - ANALYSED))
    particles = pd.DataFrame({
        "particle_id": [1, 2, 3, 4, 5],
        "class": ["sphere", "dumbbell", "trimer", "unknown", "sphere"],
        "ecd_nm": np.linspace(80, 120, 5),
    })
    return image, masks, particles


def plain_display(image):
    """The overlay with no particle: the grey display image."""
    z = np.zeros((ANALYSED, W), np.int32)
    empty = ParticleMasks(z, z, np.zeros(1, np.int32), np.zeros(1, bool))
    return draw_overlay(image, empty, pd.DataFrame({"particle_id": []}), numbers=False, legend=False)


def outline(masks, pid):
    b = find_boundaries(masks.labels, mode="inner") & (masks.labels == pid)
    return np.nonzero(b)


def test_shape_and_lobe_colours():
    image, masks, particles = make_scene()
    out = draw_overlay(image, masks, particles, numbers=False, legend=False)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    for pid, lobes in ((1, 1), (2, 2), (3, 3), (4, 4)):
        ys, xs = outline(masks, pid)
        assert len(ys) > 30
        assert np.all(out[ys, xs] == LOBE_COLORS[lobes]), pid
    # the banner and particle interiors are left as the (grey) image
    assert np.all(out[ANALYSED:] == 0)
    inside = (masks.labels == 1) & ~find_boundaries(masks.labels, mode="inner")
    interior = out[:ANALYSED][inside]
    assert np.all(interior == interior[0]) and interior[0][0] == interior[0][1] == interior[0][2]


def test_touching_particle_dashed_and_dim():
    image, masks, particles = make_scene()
    base = plain_display(image)
    out = draw_overlay(image, masks, particles, numbers=False, legend=False)
    ys, xs = outline(masks, 5)
    changed = np.any(out[ys, xs] != base[ys, xs], axis=1)
    assert 0.3 < changed.mean() < 0.7  # dashed: about half the outline drawn
    drawn = out[ys, xs][changed].astype(float)
    expected = BORDER_DIM * np.array(LOBE_COLORS[1]) + (1 - BORDER_DIM) * base[ys, xs][changed]
    assert np.all(np.abs(drawn - expected) <= 1)
    assert np.all(np.abs(drawn - np.array(LOBE_COLORS[1])).max(axis=1) > 10)  # not the full colour


def test_lobe_boundaries_drawn_inside_fused_particles():
    image, masks, particles = make_scene()
    out = draw_overlay(image, masks, particles, numbers=False, legend=False)
    neck = find_boundaries(masks.lobe_labels, mode="inner") & (masks.labels == 2) \
        & ~find_boundaries(masks.labels, mode="inner")
    ys, xs = np.nonzero(neck)
    assert len(ys) > 5
    grey = plain_display(image)[ys, xs].astype(float)
    expected = 0.5 * np.array(LOBE_COLORS[2]) + 0.5 * grey
    assert np.all(np.abs(out[ys, xs] - expected) <= 1)  # half-tinted with the particle colour


def test_color_by_class_uses_stable_palette():
    image, masks, particles = make_scene()
    out = draw_overlay(image, masks, particles, color_by="class", numbers=False, legend=False)
    for pid, cls in ((1, "sphere"), (2, "dumbbell"), (3, "trimer")):
        ys, xs = outline(masks, pid)
        assert np.all(out[ys, xs] == category_color(cls))
    ys, xs = outline(masks, 4)
    assert np.all(out[ys, xs] == UNKNOWN_COLOR)
    # the colour of a class does not depend on which other classes are in the image
    only = particles.assign(**{"class": ["sphere"] * 5})
    out2 = draw_overlay(image, masks, only, color_by="class", numbers=False, legend=False)
    ys, xs = outline(masks, 1)
    assert np.all(out2[ys, xs] == category_color("sphere"))
    assert category_color("sphere") == category_color("sphere") != category_color("dumbbell")


def test_color_by_numeric_and_unknown_column():
    image, masks, particles = make_scene()
    many = pd.concat([particles] * 4, ignore_index=True)  # > 12 distinct values -> continuous scale
    many["particle_id"] = np.tile(np.arange(1, 6), 4)
    many["ecd_nm"] = np.linspace(50, 150, len(many))
    out = draw_overlay(image, masks, many.drop_duplicates("particle_id", keep="last"), color_by="ecd_nm",
                       numbers=False, legend=False)
    assert out.shape == (H, W, 3)
    with pytest.raises(ValueError, match="not a particle column"):
        draw_overlay(image, masks, particles, color_by="nope")


def test_numbers_and_legend_drawn():
    image, masks, particles = make_scene()
    plain = draw_overlay(image, masks, particles, numbers=False, legend=False)
    numbered = draw_overlay(image, masks, particles, numbers=True, legend=False)
    cy, cx = 60, 70  # centroid of particle 1
    patch = (slice(cy - 6, cy + 7), slice(cx - 6, cx + 7))
    assert np.any(numbered[patch] != plain[patch])
    assert np.any(np.all(numbered[patch] == 255, axis=-1))  # white digits
    with_legend = draw_overlay(image, masks, particles, numbers=False, legend=True)
    assert np.any(with_legend[:30, :80] != plain[:30, :80])


def test_png_written(tmp_path):
    image, masks, particles = make_scene()
    path = tmp_path / "sub" / "scene_overlay.png"
    out = draw_overlay(image, masks, particles, path=path)
    assert path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), out)


def test_16bit_image_and_empty_masks():
    image, masks, particles = make_scene(np.uint16)
    out = draw_overlay(image, masks, particles, numbers=False, legend=False)
    ys, xs = outline(masks, 1)
    assert np.all(out[ys, xs] == LOBE_COLORS[1])
    bg = out[5, 300]
    assert bg[0] == bg[1] == bg[2] and bg[0] < 50  # dark background scaled from 16 bits
    empty = ParticleMasks(np.zeros_like(masks.labels), np.zeros_like(masks.labels),
                          np.zeros(1, np.int32), np.zeros(1, bool))
    out = draw_overlay(image, empty, particles.iloc[:0])
    assert out.shape == (H, W, 3)


def test_mask_shape_mismatch():
    image, masks, particles = make_scene()
    bad = ParticleMasks(masks.labels[:, :-1], masks.lobe_labels[:, :-1], masks.lobe_parent, masks.touches_border)
    with pytest.raises(ValueError, match="does not fit"):
        draw_overlay(image, bad, particles)
