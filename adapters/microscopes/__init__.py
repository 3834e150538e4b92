"""Pixel size and acquisition metadata from the microscope's own files, one module per vendor.

Every vendor module exposes ``read(path, tif) -> VendorReading | None`` (None: not this
vendor's file) and ``pixel_size_nm(path, tif) -> float | None``. :func:`read_pixel_size` asks
them in :data:`VENDORS` order and applies the fallback rule:

1. vendor metadata (``source`` = the vendor's name), unless ``force_config``;
2. the configured ``pixel_size_nm`` (``source="config"``);
3. nothing: sizes stay in pixels (``source="none"``).

Malformed metadata never raise: the vendor reader logs a warning and the next source is used.
"""

from __future__ import annotations

import logging
from pathlib import Path

import tifffile

from qcloop_adapters.microscopes import fei, hitachi, jeol, tescan, zeiss
from qcloop_adapters.microscopes._units import VendorReading, parse_length_nm
from qcloop.records import PixelSize

__all__ = ["VENDORS", "VendorReading", "read_vendor_metadata", "read_pixel_size", "parse_length_nm"]

#: tag-based readers first, then the sidecar readers
VENDORS = (zeiss, fei, tescan, jeol, hitachi)

log = logging.getLogger(__name__)


def read_vendor_metadata(path: str | Path, tif: tifffile.TiffFile | None = None) -> VendorReading | None:
    """First vendor reading with a usable pixel size, else the first vendor seen, else None.

    Parameters
    ----------
    path : path
        The image file (sidecars are looked up beside it).
    tif : tifffile.TiffFile, optional
        The open TIFF, when the image is one (tag-based vendors need it).
    """
    p = Path(path)
    first: VendorReading | None = None
    for vendor in VENDORS:
        try:
            reading = vendor.read(p, tif)
        except Exception as exc:  # noqa: BLE001 - bad metadata must not stop the analysis
            log.warning("%s: %s metadata unreadable (%s: %s); ignoring them",
                        p, vendor.NAME, type(exc).__name__, exc)
            continue
        if reading is None:
            continue
        if reading.pixel_size_nm is not None:
            return reading
        first = first or reading
    return first


def read_pixel_size(
    path: str | Path,
    tif: tifffile.TiffFile | None = None,
    *,
    config_pixel_size_nm: float | None = None,
    force_config: bool = False,
) -> tuple[PixelSize, dict[str, str]]:
    """Pixel size with its source, and the vendor metadata worth keeping.

    Parameters
    ----------
    path : path
        The image file.
    tif : tifffile.TiffFile, optional
        The open TIFF, when the image is one.
    config_pixel_size_nm : float, optional
        ``imaging.pixel_size_nm``: used when the file carries no vendor pixel size.
    force_config : bool
        ``imaging.force_pixel_size``: use the configured value even when metadata exist.

    Returns
    -------
    (PixelSize, dict of str to str)
    """
    reading = read_vendor_metadata(path, tif)
    meta: dict[str, str] = dict(reading.metadata) if reading else {}
    vendor_nm = reading.pixel_size_nm if reading else None
    if vendor_nm is not None:
        meta["vendor_pixel_size_nm"] = f"{vendor_nm:.6g}"
    if force_config and config_pixel_size_nm is not None:
        if vendor_nm is not None and abs(vendor_nm - config_pixel_size_nm) > 1e-6 * vendor_nm:
            log.info("%s: forced pixel size %.6g nm overrides the %s metadata (%.6g nm)",
                     path, config_pixel_size_nm, reading.vendor if reading else "?", vendor_nm)
        return PixelSize(float(config_pixel_size_nm), "config"), meta
    if vendor_nm is not None and reading is not None:
        return PixelSize(vendor_nm, reading.vendor), meta
    if config_pixel_size_nm is not None:
        return PixelSize(float(config_pixel_size_nm), "config"), meta
    return PixelSize(None, "none"), meta
