"""Overlay: the SEM image with every particle outlined, numbered and coloured.

:func:`draw_overlay` returns an RGB array of the full frame (banner included) and optionally
writes it as PNG. Outline colour follows the lobe count (1, 2, 3, 4+) by default, or any column
of the particle table: a categorical column (``class``) gets a palette that is stable across
images (the colour depends only on the value), a numeric column with many values a viridis
scale. Particles cut by the image edge or the banner are drawn dashed and dimmer. Lobe
boundaries inside fused particles are drawn as faint lines.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from skimage.segmentation import find_boundaries

from qcloop.records import ParticleMasks, SemImage

#: outline colour by lobe count; the last one is used for 4 or more lobes
LOBE_COLORS: dict[int, tuple[int, int, int]] = {
    1: (0, 210, 255),    # cyan
    2: (255, 165, 0),    # orange
    3: (255, 60, 200),   # magenta
    4: (120, 255, 60),   # green (4+)
}
#: categorical palette (Tableau 10 without grey); a value's colour is crc32(value) mod 9
CATEGORY_PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207),
)
#: colour of particles whose value is missing or "unknown"
UNKNOWN_COLOR = (170, 170, 170)
#: fraction of the outline colour kept for particles touching the edge/banner
BORDER_DIM = 0.6
_DASH = 4  # px on, px off


def category_color(value: object) -> tuple[int, int, int]:
    """Stable colour of a categorical value (the same in every image and run)."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).lower() == "unknown":
        return UNKNOWN_COLOR
    return CATEGORY_PALETTE[zlib.crc32(str(value).encode("utf-8")) % len(CATEGORY_PALETTE)]


def draw_overlay(
    image: SemImage,
    masks: ParticleMasks,
    particles: pd.DataFrame,
    *,
    color_by: str = "lobes",
    path: str | Path | None = None,
    numbers: bool = True,
    legend: bool = True,
) -> np.ndarray:
    """Draw particle outlines, ids and a legend over the image.

    Parameters
    ----------
    image : SemImage
        Full frame; grey values are scaled to 8 bits by the analysed region's 0.5-99.5 %
        percentiles (16-bit images included).
    masks : ParticleMasks
        ``labels`` of shape (analysed_height_px, W); label = particle_id.
    particles : DataFrame
        One row per particle; ``particle_id`` links rows to labels (row order is used when the
        column is absent). Needed for ``color_by`` other than ``"lobes"``.
    color_by : str
        ``"lobes"`` (count from ``masks.lobe_parent``) or a column of ``particles``.
    path : path, optional
        Write the overlay there as PNG (folders are created).
    numbers, legend : bool
        Draw particle ids / the legend box.

    Returns
    -------
    ndarray of uint8, shape (H, W, 3)
        RGB overlay of the full frame.
    """
    labels = np.asarray(masks.labels)
    H, W = image.height_px, image.width_px
    if labels.ndim != 2 or labels.shape[1] != W or labels.shape[0] > H:
        raise ValueError(f"mask shape {labels.shape} does not fit image {H}x{W}")
    n = masks.n_particles
    rgb = _display_rgb(image)

    lut, legend_items, gradient = _colour_table(masks, particles, color_by, n)
    touches = np.zeros(n + 1, bool)
    tb = np.asarray(masks.touches_border, bool)
    touches[: min(len(tb), n + 1)] = tb[: n + 1]

    if n > 0:
        outline = find_boundaries(labels, mode="inner")
        # faint lobe boundaries inside fused particles
        lobes = np.asarray(masks.lobe_labels)
        if lobes.shape == labels.shape and lobes.max() > 0:
            inner = find_boundaries(lobes, mode="inner") & (labels > 0) & ~outline
            ys, xs = np.nonzero(inner)
            col = lut[labels[ys, xs]].astype(np.float32)
            rgb[ys, xs] = (0.5 * col + 0.5 * rgb[ys, xs]).astype(np.uint8)
        # particle outlines; dashed + dimmer where the particle touches the edge or banner
        ys, xs = np.nonzero(outline)
        lab = labels[ys, xs]
        cut = touches[lab]
        keep = ~cut | ((((xs + ys) // _DASH) % 2) == 0)
        ys, xs, lab, cut = ys[keep], xs[keep], lab[keep], cut[keep]
        col = lut[lab].astype(np.float32)
        dim = cut[:, None]
        col = np.where(dim, BORDER_DIM * col + (1 - BORDER_DIM) * rgb[ys, xs], col)
        rgb[ys, xs] = col.astype(np.uint8)

    img = Image.fromarray(rgb, "RGB")
    draw = ImageDraw.Draw(img)
    font_px = max(9, int(round(min(H, W) / 70)))
    font = _font(font_px)
    if numbers and n > 0:
        _draw_numbers(draw, labels, n, font, touches)
    if legend:
        img = _draw_legend(img, legend_items, gradient, color_by, _font(max(9, font_px)))
    if path is not None:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        img.save(out, format="PNG")
    return np.asarray(img)


# --------------------------------------------------------------------------- helpers
def _display_rgb(image: SemImage) -> np.ndarray:
    px = image.pixels
    region = px[: image.analysed_height_px]
    step = max(1, int(np.sqrt(region.size / 250_000)))
    lo, hi = np.percentile(region[::step, ::step], [0.5, 99.5])
    if not hi > lo:
        lo, hi = float(region.min()), float(region.max())
    if px.dtype == np.uint8 and lo <= 0 and hi >= 255:
        grey = px
    else:
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        grey = np.clip((px.astype(np.float32) - lo) * scale, 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def _particle_values(particles: pd.DataFrame, column: str, n: int) -> list[object]:
    """Value of ``column`` for labels 0..n (index 0 unused)."""
    if column not in particles.columns:
        raise ValueError(f"color_by={column!r} is not a particle column (have {list(particles.columns)})")
    values: list[object] = [None] * (n + 1)
    ids = particles["particle_id"].to_numpy() if "particle_id" in particles.columns \
        else np.arange(1, len(particles) + 1)
    for pid, v in zip(ids, particles[column].to_numpy()):
        pid = int(pid)
        if 1 <= pid <= n:
            values[pid] = v
    return values


def _colour_table(masks: ParticleMasks, particles: pd.DataFrame, color_by: str, n: int):
    lut = np.empty((n + 1, 3), np.uint8)
    lut[:] = UNKNOWN_COLOR
    gradient = None
    if color_by == "lobes":
        parent = np.asarray(masks.lobe_parent, np.int64)
        counts = np.bincount(parent[1:][parent[1:] > 0], minlength=n + 1)[: n + 1]
        counts = np.maximum(counts, 1)
        for k in range(1, n + 1):
            lut[k] = LOBE_COLORS[min(int(counts[k]), 4)]
        present = sorted({min(int(c), 4) for c in counts[1:]}) if n else []
        items = [(LOBE_COLORS[k], f"{k}{'+' if k == 4 else ''} lobe{'s' if k > 1 else ''}") for k in present]
        return lut, items, gradient
    values = _particle_values(particles, color_by, n)
    col = particles[color_by]
    numeric = pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)
    if numeric and col.nunique(dropna=True) > 12:
        arr = np.array([np.nan if v is None else float(v) for v in values[1:]], np.float64)
        lo, hi = np.nanmin(arr) if np.isfinite(arr).any() else 0.0, np.nanmax(arr) if np.isfinite(arr).any() else 1.0
        import matplotlib

        cmap = matplotlib.colormaps["viridis"]
        t = np.clip((arr - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(arr)
        cols = (np.asarray(cmap(np.nan_to_num(t, nan=0.0)))[:, :3] * 255).astype(np.uint8)
        cols[~np.isfinite(arr)] = UNKNOWN_COLOR
        lut[1:] = cols
        gradient = (float(lo), float(hi), cmap)
        return lut, [], gradient
    seen: dict[str, tuple[int, int, int]] = {}
    for k in range(1, n + 1):
        c = category_color(values[k])
        lut[k] = c
        key = "unknown" if c == UNKNOWN_COLOR else str(values[k])
        seen.setdefault(key, c)
    items = [(seen[k], k) for k in sorted(seen)][:12]
    return lut, items, gradient


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def _draw_numbers(draw: ImageDraw.ImageDraw, labels: np.ndarray, n: int, font, touches: np.ndarray) -> None:
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1)
    ys, xs = np.divmod(np.arange(flat.size), labels.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(flat, weights=ys, minlength=n + 1) / area
        cx = np.bincount(flat, weights=xs, minlength=n + 1) / area
    freetype = isinstance(font, ImageFont.FreeTypeFont)
    for k in range(1, n + 1):
        if area[k] == 0:
            continue
        fill = (200, 200, 200) if touches[k] else (255, 255, 255)
        if freetype:
            draw.text((float(cx[k]), float(cy[k])), str(k), fill=fill, font=font, anchor="mm",
                      stroke_width=1, stroke_fill=(0, 0, 0))
        else:
            draw.text((float(cx[k]) - 3, float(cy[k]) - 5), str(k), fill=fill, font=font)


def _draw_legend(img: Image.Image, items: Sequence[tuple[tuple[int, int, int], str]], gradient,
                 title: str, font) -> Image.Image:
    draw = ImageDraw.Draw(img)
    line_h = int(getattr(font, "size", 11) * 1.4) + 2
    rows: list[tuple[str, object]] = [("title", title)]
    rows += [("item", it) for it in items]
    if gradient is not None:
        rows.append(("gradient", gradient))
    rows.append(("dashed", "cut by edge/banner"))
    texts = [str(title)] + [str(lbl) for _, lbl in items] + ["cut by edge/banner"]
    if gradient is not None:
        texts.append(f"{gradient[0]:.4g} .. {gradient[1]:.4g}")
    text_w = max(int(draw.textlength(t, font=font)) for t in texts)
    box_w = 8 + 14 + 6 + text_w + 8
    box_h = 6 + line_h * len(rows) + 4
    box_w, box_h = min(box_w, img.width), min(box_h, img.height)
    # translucent dark box
    region = np.asarray(img.crop((0, 0, box_w, box_h)), np.float32)
    img.paste(Image.fromarray((region * 0.35).astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(img)
    y = 5
    for kind, payload in rows:
        if kind == "title":
            draw.text((8, y), str(payload), fill=(255, 255, 255), font=font)
        elif kind == "item":
            colour, label = payload  # type: ignore[misc]
            draw.rectangle((8, y + 2, 8 + 12, y + line_h - 6), outline=colour, width=2)
            draw.text((8 + 14 + 6, y), str(label), fill=(255, 255, 255), font=font)
        elif kind == "gradient":
            lo, hi, cmap = payload  # type: ignore[misc]
            for i in range(14):
                c = tuple(int(255 * v) for v in cmap(i / 13)[:3])
                draw.line((8 + i, y + 2, 8 + i, y + line_h - 6), fill=c)
            draw.text((8 + 14 + 6, y), f"{lo:.4g} .. {hi:.4g}", fill=(255, 255, 255), font=font)
        else:
            for x0 in range(8, 21, 2 * 3):
                draw.line((x0, y + line_h // 2, min(x0 + 2, 20), y + line_h // 2), fill=(200, 200, 200), width=2)
            draw.text((8 + 14 + 6, y), "cut by edge/banner", fill=(200, 200, 200), font=font)
        y += line_h
    return img
