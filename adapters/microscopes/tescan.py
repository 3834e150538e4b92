"""TESCAN: TIFF tag 50431, or the ``.hdr`` sidecar TESCAN writes beside the image.

The tag is a byte blob made of blocks (uint32 size, uint16 type, payload); the MAIN and SEM
blocks are INI-like ``Key=Value`` text (``PixelSizeX=4.96e-009`` in metres, ``HV=15000`` in volts,
``Magnification=...``). tifffile has no parser for it, so the text is searched here. The
sidecar (``<stem>.hdr``, ``<stem>-tif.hdr``, ``<stem>-png.hdr``) is plain INI with ``[MAIN]`` and
``[SEM]`` sections holding the same keys (format as read by Gwyddion's ``tescan.c`` and NexusLIMS).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import tifffile

from qcloop_adapters.microscopes._units import (
    VendorReading,
    format_kv,
    plausible_nm,
    read_sidecar_text,
    sidecar_candidates,
)

NAME = "tescan"
TAG = 50431
SIDECAR_SUFFIXES = (".hdr", "-tif.hdr", "-png.hdr", "-jpg.hdr", "-bmp.hdr")

log = logging.getLogger(__name__)

_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"


def _value(text: str, key: str) -> str | None:
    m = re.search(r"(?<![A-Za-z0-9_])" + re.escape(key) + r"\s*=\s*([^\r\n\x00]*)", text)
    if m is None and key == "PixelSizeX":  # block header bytes may glue onto the first key
        m = re.search(re.escape(key) + r"\s*=\s*([^\r\n\x00]*)", text)
    return m.group(1).strip() if m else None


def _float(text: str | None) -> float | None:
    if text is None:
        return None
    m = re.match(_NUM, text)
    return float(m.group(1)) if m else None


def parse_text(text: str) -> tuple[float | None, dict[str, str]]:
    """Pixel size (nm) and informative fields from TESCAN ``Key=Value`` text."""
    text = text.replace("\x00", "")
    meta: dict[str, str] = {"vendor": NAME}
    px_m = _float(_value(text, "PixelSizeX"))
    nm = plausible_nm(px_m * 1e9 if px_m is not None else None)
    hv = _float(_value(text, "HV"))
    if hv is not None and hv > 0:
        meta["kv"] = format_kv(hv / 1000.0)
    mag = _value(text, "Magnification")
    if mag:
        meta["magnification"] = mag
    for key, name in (("Device", "instrument"), ("Detector", "detector"), ("WD", "working_distance_m")):
        v = _value(text, key)
        if v:
            meta[name] = v
    return nm, meta


def _tag_text(tif: tifffile.TiffFile) -> str | None:
    tag = tif.pages.first.tags.get(TAG)
    if tag is None:
        return None
    value = tag.value
    if isinstance(value, (bytes, bytearray)):
        # binary block headers around ASCII text: latin-1 never fails, NULs are dropped later
        return bytes(value).decode("latin-1")
    if isinstance(value, str):
        return value
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return bytes(v & 0xFF for v in value).decode("latin-1")
    return None


def read(path: Path, tif: tifffile.TiffFile | None) -> VendorReading | None:
    """Pixel size from tag 50431 or a ``.hdr`` sidecar; None when neither is present."""
    found = False
    if tif is not None:
        text = _tag_text(tif)
        if text is not None:
            found = True
            nm, meta = parse_text(text)
            if nm is not None:
                return VendorReading(NAME, nm, meta)
            log.warning("%s: TESCAN tag 50431 holds no usable PixelSizeX", path)
    for hdr in sidecar_candidates(path, SIDECAR_SUFFIXES):
        text = read_sidecar_text(hdr)
        if text is None or ("[MAIN]" not in text and "PixelSizeX" not in text):
            continue
        found = True
        nm, meta = parse_text(text)
        meta["sidecar"] = hdr.name
        if nm is not None:
            return VendorReading(NAME, nm, meta)
        log.warning("%s: TESCAN sidecar holds no usable PixelSizeX", hdr)
    return VendorReading(NAME, None, {"vendor": NAME}) if found else None


def pixel_size_nm(path: Path, tif: tifffile.TiffFile | None) -> float | None:
    """Pixel size in nm from TESCAN metadata, or None."""
    r = read(path, tif)
    return r.pixel_size_nm if r else None
