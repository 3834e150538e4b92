"""Reading SEM images: decode, convert to grey, find the info banner, attach the pixel size.

Entry points
------------
load_image(path, cfg) -> SemImage
    TIFF (8/16-bit grey, palette, RGB, multi-page: first page) through tifffile; PNG, JPEG,
    BMP (and anything else Pillow opens) through Pillow. Every bad file raises
    :class:`qcloop.errors.InputImageError` naming the file and the reason, and nothing else.
load_array(pixels, name=..., cfg=..., pixel_size_nm=...) -> SemImage
    The same for an in-memory array (tests, synthetic images).
detect_banner(pixels) -> int
    Height of the analysed region: rows above the microscope's info banner.

The pixel size comes from :mod:`qcloop_adapters.microscopes` (vendor metadata, then
``cfg.pixel_size_nm``, then none).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import tifffile

from qcloop.config import ImagingConfig
from qcloop.errors import InputImageError
from qcloop.records import PixelSize, SemImage

log = logging.getLogger(__name__)

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: Peak memory of one analysis with the default (classical) pipeline, per pixel of the image,
#: on top of the decoded pixels. Measured with ``bench/daemon.py --working-set``: the real JEOL
#: image ../shared/data/sem/jeol/A2h_01.tif tiled 1x1, 2x2 and 3x3 (1.3 to 11.8 Mpx) needed
#: 94 to 111 bytes per pixel above the baseline (two runs on a shared 2-core machine); 128 leaves a margin.
WORKING_SET_BYTES_PER_PIXEL = 128
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as Pillow's "L" conversion


# --------------------------------------------------------------------------- public API
def load_image(path: str | Path, cfg: ImagingConfig | None = None) -> SemImage:
    """Read one SEM image file.

    Parameters
    ----------
    path : path
        TIFF, PNG, JPEG or BMP file. The format is recognised from the content, not the name.
    cfg : ImagingConfig, optional
        Banner handling, fallback pixel size, size limit. Defaults to ``ImagingConfig()``.

    Returns
    -------
    SemImage
        ``pixels`` is a 2-D grey array (H, W) in the file's own dtype: uint8, uint16 (16-bit
        files keep their full range) or float32. Palette images go through their colour map,
        colour images are converted with ITU-R 601-2 luma weights (exactly the first channel
        when all channels are equal).

    Raises
    ------
    InputImageError
        Missing, empty, truncated or undecodable file, not an image, zero size, a side longer
        than ``cfg.max_side_px`` or an analysis that would need more than
        ``cfg.memory_budget_mb`` (both checked on the header, before any pixel is decoded:
        see :func:`memory_needed`), non-finite float pixels, or a fixed banner taller than the
        image.
    """
    cfg = cfg if cfg is not None else ImagingConfig()
    p = Path(path)
    head = _read_head(p)
    if head.startswith(_TIFF_MAGIC):
        pixels, pixel_size, meta, lossy = _load_tiff(p, cfg)
    else:
        pixels, pixel_size, meta, lossy = _load_pillow(p, cfg, head)
    pixels = _normalise(pixels, p)
    height = _analysed_height(pixels, cfg, p, lossy=lossy)
    meta["banner_rows"] = str(pixels.shape[0] - height)
    return SemImage(path=p, pixels=pixels, analysed_height_px=height, pixel_size=pixel_size,
                    metadata=meta)


def load_array(
    pixels: np.ndarray,
    *,
    name: str = "<array>",
    cfg: ImagingConfig | None = None,
    pixel_size_nm: float | None = None,
) -> SemImage:
    """Wrap an in-memory image as a :class:`SemImage` (same checks as :func:`load_image`).

    Parameters
    ----------
    pixels : ndarray, shape (H, W) or (H, W, 3|4)
        Grey or colour image; colour is converted to grey.
    name : str
        Used as the image's path/name.
    cfg : ImagingConfig, optional
        Banner handling and size limit; ``cfg.pixel_size_nm`` is the fallback pixel size.
    pixel_size_nm : float, optional
        Physical pixel size (source ``"config"``); else ``cfg.pixel_size_nm``; else none.
    """
    cfg = cfg if cfg is not None else ImagingConfig()
    p = Path(name)
    arr = np.asarray(pixels)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = _rgb_to_grey(arr)
    elif arr.ndim == 3 and arr.shape[2] in (1, 2):
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise InputImageError(p, f"expected a 2-D grey or (H, W, 3|4) colour array, got shape {arr.shape}")
    _check_size(p, arr.shape[1], arr.shape[0], cfg)
    arr = _normalise(arr, p)
    if pixel_size_nm is not None:
        try:
            size = PixelSize(float(pixel_size_nm), "config")
        except ValueError as exc:
            raise InputImageError(p, str(exc)) from None
    elif cfg.pixel_size_nm is not None:
        size = PixelSize(cfg.pixel_size_nm, "config")
    else:
        size = PixelSize(None, "none")
    height = _analysed_height(arr, cfg, p, lossy=False)
    return SemImage(path=p, pixels=arr, analysed_height_px=height, pixel_size=size,
                    metadata={"banner_rows": str(arr.shape[0] - height)})


def memory_needed(width: int, height: int, bytes_per_pixel: int = 1) -> int:
    """Bytes one analysis of a ``width`` x ``height`` image needs: the decoded pixels
    (``bytes_per_pixel``: samples x bytes per sample) plus the pipeline's working set
    (:data:`WORKING_SET_BYTES_PER_PIXEL` per pixel)."""
    return int(width) * int(height) * (int(bytes_per_pixel) + WORKING_SET_BYTES_PER_PIXEL)


def detect_banner(
    pixels: np.ndarray,
    *,
    tolerance: float = 0.0,
    max_fraction: float = 0.35,
    min_rows: int = 6,
) -> int:
    """Height of the region above the microscope's info banner (the full height if none).

    A banner is a band of rendered rows at the bottom of the frame: each row is dominated by
    one background value (black, white or grey) with sparse, thin, high-contrast text or
    graphics, and the band starts abruptly below rows of real, textured image. Concretely the
    band ``[top, H)`` is accepted only when all of these hold:

    * every row in it has at least half its pixels equal (within ``tolerance``) to the row's
      most common value, and that value is the bar's background (the dominant value of its
      lowest rows, within ``3 * tolerance``) unless the row is a full-width line of a contrasting value (>= 90 % one
      value; 65 % with a tolerance); at least a fifth of its rows are clean (>= 97 %, or 90 %
      with a tolerance: the margins between text lines); at most 2 rows at the very bottom
      may differ (some SEMs write one line of image below the bar);
    * it is at least ``min_rows`` and at most ``max_fraction`` of the frame tall;
    * the 12 rows above it look like image (median share of the row's exact most common
      value <= 0.4), so a uniform background holding particles is not a banner;
    * it holds text or frame lines: >= 2 rows with high-contrast "ink" pixels whose horizontal
      runs are thin (median run <= max(8, 0.6 % of the width): letters, not particles), or a
      full-width line of a contrasting value.

    Parameters
    ----------
    pixels : ndarray, shape (H, W)
        Grey image, any real dtype, full frame.
    tolerance : float
        Grey levels within which a pixel counts as the row's background (0 for lossless files;
        a few levels for JPEG).
    max_fraction : float
        Largest banner height as a fraction of H.
    min_rows : int
        Smallest banner height in rows.

    Returns
    -------
    int
        Number of rows to analyse, ``H - banner_rows``.
    """
    a = np.asarray(pixels)
    if a.ndim != 2:
        raise ValueError(f"detect_banner needs a 2-D array, got shape {a.shape}")
    tolerance = float(tolerance)
    H, W = a.shape
    if H < 4 * min_rows or W < 16:
        return H
    sample = a[:: max(1, H // 256), :: max(1, W // 256)].astype(np.float64)
    lo_p, hi_p = np.percentile(sample, [1.0, 99.0])
    full_lo, full_hi = float(sample.min()), float(sample.max())
    contrast = 0.3 * max(hi_p - lo_p, 0.5 * (full_hi - full_lo))
    if not contrast > 0:
        return H
    lowest_top = H - int(max_fraction * H)
    window = 12
    start = max(0, lowest_top - window)
    rows = a[start:]
    n = rows.shape[0]
    frac = np.empty(n)  # share of the row within `tolerance` of its most common value
    exact = np.empty(n)  # share exactly equal to it
    mode = np.empty(n)
    srt = np.sort(rows, axis=1)
    for i in range(n):
        vals, counts = np.unique(srt[i], return_counts=True)
        k = int(np.argmax(counts))
        mode[i] = float(vals[k])
        exact[i] = counts[k] / W
        if tolerance > 0:
            frac[i] = (np.searchsorted(srt[i], mode[i] + tolerance, "right")
                       - np.searchsorted(srt[i], mode[i] - tolerance, "left")) / W
        else:
            frac[i] = exact[i]
    lossy = tolerance > 0
    like = frac >= 0.5
    line_frac = 0.65 if lossy else 0.9  # JPEG smears thin lines into their neighbours
    clean_frac = 0.9 if lossy else 0.97

    # bottom-most banner row (tolerate up to 2 image-like rows under the bar)
    end = n
    while end > n - 2 and not like[end - 1]:
        end -= 1
    if not like[end - 1]:
        return H
    # background of the bar: the dominant value of its lowest rows (frame lines are outvoted)
    low = np.arange(max(0, end - 12), end)
    low = low[like[low]]
    low_modes, inv = np.unique(mode[low], return_inverse=True)
    bg = float(low_modes[np.argmax(np.bincount(inv, weights=frac[low]))])
    is_line = (frac >= line_frac) & (np.abs(mode - bg) >= contrast)
    # grow upwards through rows on that background, or full-width lines of a contrasting value
    top = end - 1
    bg_tol = 3 * tolerance  # lossy coding shifts a row's most common value by a few levels
    while top - 1 >= 0 and like[top - 1] and (abs(mode[top - 1] - bg) <= bg_tol or is_line[top - 1]):
        top -= 1
    top_abs = start + top
    if top_abs < lowest_top or top == 0:  # too tall, or no image rows left above it
        return H
    if H - top_abs < min_rows:
        return H
    band = slice(top, end)
    # rendered bars have clean margins between text lines; a clipped noisy region has none
    if np.count_nonzero(frac[band] >= clean_frac) < max(2, 0.2 * (end - top)):
        return H
    # the rows above must look like image (exact values: not smoothed by lossy coding)
    above = slice(max(0, top - window), top)
    if float(np.median(exact[above])) > 0.4:
        return H
    has_line = bool(np.any(is_line[band]))
    ink = np.abs(rows[band].astype(np.float64) - bg) >= contrast
    ink_rows = int(np.count_nonzero(ink.sum(axis=1) >= max(2, 0.002 * W)))
    has_text = ink_rows >= 2 and _median_run(ink) <= max(8.0, 0.006 * W)
    if not (has_text or has_line):
        return H
    return int(top_abs)


# --------------------------------------------------------------------------- helpers
def _median_run(mask: np.ndarray) -> float:
    """Median length of horizontal runs of True in a 2-D boolean array (0 if none)."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    starts = np.flatnonzero(d.ravel() == 1)
    ends = np.flatnonzero(d.ravel() == -1)
    if starts.size == 0:
        return 0.0
    return float(np.median(ends - starts))


def _read_head(p: Path) -> bytes:
    try:
        if not p.exists():
            raise InputImageError(p, "file not found")
        if not p.is_file():
            raise InputImageError(p, "not a regular file")
        size = p.stat().st_size
        if size == 0:
            raise InputImageError(p, "empty file (0 bytes)")
        with p.open("rb") as fh:
            return fh.read(16)
    except OSError as exc:
        raise InputImageError(p, f"cannot read file: {exc.strerror or exc}") from None


def _check_size(p: Path, width: int, height: int, cfg: ImagingConfig, bytes_per_pixel: int = 1) -> None:
    if width <= 0 or height <= 0:
        raise InputImageError(p, f"image has zero size ({width}x{height} px)")
    if width > cfg.max_side_px or height > cfg.max_side_px:
        raise InputImageError(
            p, f"image size {width}x{height} px exceeds imaging.max_side_px={cfg.max_side_px}")
    need = memory_needed(width, height, bytes_per_pixel)
    if need > cfg.memory_budget_mb * 2**20:
        raise InputImageError(
            p, f"image of {width}x{height} px would need about {need / 2**30:.1f} GiB to analyse, more than "
               f"imaging.memory_budget_mb={cfg.memory_budget_mb:g}; refused before decoding")


def _vendor_pixel_size(p: Path, tif: tifffile.TiffFile | None, cfg: ImagingConfig):
    from qcloop_adapters.microscopes import read_pixel_size

    return read_pixel_size(p, tif, config_pixel_size_nm=cfg.pixel_size_nm,
                           force_config=cfg.force_pixel_size)


def _load_tiff(p: Path, cfg: ImagingConfig):
    try:
        tif = tifffile.TiffFile(p)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad input file
        raise InputImageError(p, f"not a readable TIFF ({_describe(exc)})") from None
    with tif:
        try:
            if len(tif.pages) == 0:
                raise InputImageError(p, "TIFF holds no image (no readable page; truncated?)")
            page = tif.pages.first
            width, height = int(page.imagewidth), int(page.imagelength)
            bpp = int(page.samplesperpixel) * max(1, int(page.bitspersample) // 8)
        except InputImageError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise InputImageError(p, f"TIFF structure unreadable ({_describe(exc)})") from None
        _check_size(p, width, height, cfg, bpp)
        if int(getattr(page, "imagedepth", 1)) > 1:
            raise InputImageError(p, "3-D (volumetric) TIFF pages are not supported")
        file_size = p.stat().st_size
        ends = [int(o) + int(c) for o, c in zip(page.dataoffsets, page.databytecounts) if c]
        if not ends:
            raise InputImageError(p, "TIFF page holds no pixel data")
        if max(ends) > file_size:
            raise InputImageError(
                p, f"truncated file: pixel data run to byte {max(ends)} but the file has "
                   f"{file_size} bytes")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = page.asarray()
            grey = _tiff_to_grey(arr, page, p)
        except InputImageError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise InputImageError(p, f"cannot decode TIFF pixels ({_describe(exc)})") from None
        pixel_size, meta = _vendor_pixel_size(p, tif, cfg)
        meta["format"] = "TIFF"
        meta["bits_per_sample"] = str(page.bitspersample)
        if len(tif.pages) > 1:
            meta["pages"] = str(len(tif.pages))
        lossy = int(page.compression) in (6, 7, 34892, 50001)  # OJPEG, JPEG, lossy JPEG, WebP
    return grey, pixel_size, meta, lossy


def _tiff_to_grey(arr: np.ndarray, page: tifffile.TiffPage, p: Path) -> np.ndarray:
    axes = page.axes
    arr = np.asarray(arr)
    if arr.ndim != len(axes):  # tifffile squeezes length-1 dimensions by default
        arr = arr.reshape(page.shape)
    if "S" in axes and axes.index("S") != len(axes) - 1:
        arr = np.moveaxis(arr, axes.index("S"), -1)
        axes = axes.replace("S", "") + "S"
    if axes not in ("YX", "YXS"):
        raise InputImageError(p, f"unsupported TIFF page layout {page.axes!r} (shape {page.shape})")
    photometric = int(page.photometric)
    if photometric == 3 and page.colormap is not None:  # palette
        return _apply_palette(arr, np.asarray(page.colormap), p)
    if arr.ndim == 3:
        if arr.shape[2] == 1:
            arr = arr[..., 0]
        elif arr.shape[2] == 2:  # grey + alpha
            arr = arr[..., 0]
        else:
            arr = _rgb_to_grey(arr)
    if photometric == 0 and arr.dtype.kind in "ui":  # MINISWHITE: 0 is white
        arr = np.iinfo(arr.dtype).max - arr if arr.dtype.kind == "u" else -arr
    return arr


def _apply_palette(idx: np.ndarray, cmap: np.ndarray, p: Path) -> np.ndarray:
    """Indices (H, W) through a TIFF colour map (3, N) of uint16 to grey."""
    if idx.ndim != 2 or cmap.ndim != 2 or cmap.shape[0] != 3:
        raise InputImageError(p, "malformed palette image")
    if int(idx.max()) >= cmap.shape[1]:
        raise InputImageError(p, "palette index outside the colour map")
    eight_bit_map = int(cmap.max()) <= 255
    if cmap.shape[1] <= 256:
        out_dtype = np.uint8
        table = cmap.astype(np.float64) if eight_bit_map else cmap.astype(np.float64) / 257.0
    else:
        out_dtype = np.uint16
        table = cmap.astype(np.float64) * (257.0 if eight_bit_map else 1.0)
    if np.array_equal(table[0], table[1]) and np.array_equal(table[0], table[2]):
        grey = table[0]
    else:
        grey = _LUMA[0] * table[0] + _LUMA[1] * table[1] + _LUMA[2] * table[2]
    lut = np.clip(np.rint(grey), 0, np.iinfo(out_dtype).max).astype(out_dtype)
    return lut[idx]


def _rgb_to_grey(rgb: np.ndarray) -> np.ndarray:
    c = rgb[..., :3]
    if np.array_equal(c[..., 0], c[..., 1]) and np.array_equal(c[..., 0], c[..., 2]):
        return np.ascontiguousarray(c[..., 0])
    g = (_LUMA[0] * c[..., 0].astype(np.float32) + _LUMA[1] * c[..., 1].astype(np.float32)
         + _LUMA[2] * c[..., 2].astype(np.float32))
    if c.dtype.kind in "ui":
        info = np.iinfo(c.dtype)
        return np.clip(np.rint(g), info.min, info.max).astype(c.dtype)
    return g.astype(np.float32)


def _load_pillow(p: Path, cfg: ImagingConfig, head: bytes):
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(p)
    except UnidentifiedImageError:
        raise InputImageError(
            p, f"not a recognised image format (TIFF, PNG, JPEG, BMP); file starts with "
               f"{head[:8]!r}") from None
    except Exception as exc:  # noqa: BLE001 - decompression bombs, broken headers
        raise InputImageError(p, f"cannot open image ({_describe(exc)})") from None
    with im:
        fmt = im.format or "unknown"
        width, height = im.size
        _check_size(p, width, height, cfg, max(1, len(im.getbands())) * (2 if ";16" in im.mode or im.mode in ("I", "F") else 1))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                im.seek(0)
                im.load()
                arr = _pillow_to_array(im)
        except InputImageError:
            raise
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt data
            raise InputImageError(p, f"cannot decode {fmt} pixels ({_describe(exc)})") from None
    pixel_size, meta = _vendor_pixel_size(p, None, cfg)
    meta["format"] = fmt
    return arr, pixel_size, meta, fmt in ("JPEG", "MPO", "WEBP")


def _pillow_to_array(im) -> np.ndarray:
    mode = im.mode
    if mode == "1":
        return np.asarray(im.convert("L"))
    if mode == "L":
        return np.asarray(im)
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    if mode == "I":
        a = np.asarray(im)
        if a.size and a.min() >= 0 and a.max() <= 65535:
            return a.astype(np.uint16)
        return a.astype(np.float32)
    if mode == "F":
        return np.asarray(im, dtype=np.float32)
    if mode == "LA":
        return np.asarray(im)[..., 0]
    if mode in ("RGB", "RGBA", "RGBX"):
        return _rgb_to_grey(np.asarray(im))
    if mode in ("P", "PA"):
        return _rgb_to_grey(np.asarray(im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")))
    return _rgb_to_grey(np.asarray(im.convert("RGB")))


def _normalise(arr: np.ndarray, p: Path) -> np.ndarray:
    """2-D, C-contiguous, dtype uint8 / uint16 / float32 with finite values."""
    if arr.ndim != 2:
        raise InputImageError(p, f"decoded image is not 2-D (shape {arr.shape})")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputImageError(p, f"image has zero size ({arr.shape[1]}x{arr.shape[0]} px)")
    kind = arr.dtype.kind
    if kind == "b":
        arr = arr.astype(np.uint8) * np.uint8(255)
    elif arr.dtype in (np.uint8, np.uint16, np.float32):
        pass
    elif kind == "f":
        arr = arr.astype(np.float32)
    elif kind in "ui":
        lo, hi = int(arr.min()), int(arr.max())
        arr = arr.astype(np.uint16) if lo >= 0 and hi <= 65535 else arr.astype(np.float32)
    else:
        raise InputImageError(p, f"unsupported pixel type {arr.dtype}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise InputImageError(p, "image contains NaN or infinite pixel values")
    return np.ascontiguousarray(arr)


def _analysed_height(pixels: np.ndarray, cfg: ImagingConfig, p: Path, *, lossy: bool) -> int:
    H = int(pixels.shape[0])
    if cfg.banner == "none":
        return H
    if cfg.banner == "fixed":
        rows = int(cfg.banner_rows or 0)
        if rows >= H:
            raise InputImageError(p, f"imaging.banner_rows={rows} leaves no rows of the {H}-row image")
        return H - rows
    tol = 0.0
    if lossy:
        span = 255.0 if pixels.dtype == np.uint8 else float(np.ptp(pixels)) or 1.0
        tol = 3.0 * span / 255.0
    return detect_banner(pixels, tolerance=tol)


def _describe(exc: BaseException) -> str:
    msg = str(exc).strip()
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
