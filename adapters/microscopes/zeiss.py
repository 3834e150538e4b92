"""Zeiss SmartSEM: TIFF tag 34118 ``CZ_SEM``, parsed by tifffile (``TiffFile.sem_metadata``).

The parsed tag is a dict. Named entries are tuples ``(label, value[, unit])``, e.g.
``'ap_image_pixel_size': ('Image Pixel Size', 4.466, 'nm')``; the unnamed entry ``''`` is a
tuple of numbers whose 4th item is the pixel size in metres (older files carry only that).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import tifffile

from qcloop_adapters.microscopes._units import VendorReading, format_kv, parse_length_nm, plausible_nm

NAME = "zeiss"
TAG = 34118

log = logging.getLogger(__name__)


def _named_length_nm(entry: Any) -> float | None:
    """``('Image Pixel Size', 4.466, 'nm')`` -> 4.466; also accepts ``('..', '4.466 nm')``."""
    if not isinstance(entry, tuple) or len(entry) < 2:
        return None
    value = entry[1]
    unit = entry[2] if len(entry) > 2 and isinstance(entry[2], str) else ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return parse_length_nm(f"{value!r} {unit}") if unit else None
    if isinstance(value, str):
        return parse_length_nm(value + (f" {unit}" if unit else ""))
    return None


def _unnamed_pixel_size_nm(values: Any) -> float | None:
    if not isinstance(values, tuple) or len(values) < 4:
        return None
    v = values[3]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v) * 1e9  # metres
    return None


def _label_value(md: dict, key: str) -> str | None:
    entry = md.get(key)
    if not isinstance(entry, tuple) or len(entry) < 2:
        return None
    return " ".join(str(x) for x in entry[1:]).strip() or None


def read(path: Path, tif: tifffile.TiffFile | None) -> VendorReading | None:
    """Pixel size and a few fields from the CZ_SEM tag; None when the file has no such tag."""
    if tif is None or not tif.is_sem:
        return None
    md = tif.sem_metadata
    if not isinstance(md, dict):
        log.warning("%s: CZ_SEM tag present but not parseable; ignoring it", path)
        return VendorReading(NAME, None, {"vendor": NAME})
    nm = None
    for key in ("ap_image_pixel_size", "ap_pixel_size"):
        nm = plausible_nm(_named_length_nm(md.get(key)))
        if nm is not None:
            break
    if nm is None:
        nm = plausible_nm(_unnamed_pixel_size_nm(md.get("")))
    if nm is None:
        log.warning("%s: CZ_SEM tag holds no usable pixel size", path)
    meta: dict[str, str] = {"vendor": NAME}
    mag = _label_value(md, "ap_mag")
    if mag:
        meta["magnification"] = mag
    kv_entry = md.get("ap_actualkv") or md.get("ap_manualkv")
    if isinstance(kv_entry, tuple) and len(kv_entry) >= 2 and isinstance(kv_entry[1], (int, float)):
        unit = kv_entry[2] if len(kv_entry) > 2 else "kV"
        kv = float(kv_entry[1]) / (1000.0 if str(unit).strip().lower() == "v" else 1.0)
        meta["kv"] = format_kv(kv)
    for key, name in (("ap_wd", "working_distance"), ("dp_detector_channel", "detector"),
                      ("dp_implied_detector", "detector"), ("ap_date", "date"), ("ap_time", "time")):
        val = _label_value(md, key)
        if val and name not in meta:
            meta[name] = val
    return VendorReading(NAME, nm, meta)


def pixel_size_nm(path: Path, tif: tifffile.TiffFile | None) -> float | None:
    """Pixel size in nm from the CZ_SEM tag, or None."""
    r = read(path, tif)
    return r.pixel_size_nm if r else None
