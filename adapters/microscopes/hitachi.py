"""Hitachi: the ``.txt`` sidecar (same stem) with an INI ``[SemImageFile]`` section.

Keys used (as read by Bio-Formats' HitachiReader and pynxtools-em): ``PixelSize`` in nm (a
bare number), ``Magnification``, ``AcceleratingVoltage`` (``"5000 Volt"``), ``InstructName``,
``DataSize`` (``"1280x960"``, the image area without the data bar). The file may be ASCII,
Latin-1/-2 or UTF-16.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import tifffile

from qcloop_adapters.microscopes._units import (
    VendorReading,
    format_kv,
    parse_length_nm,
    plausible_nm,
    read_sidecar_text,
    sidecar_candidates,
)

NAME = "hitachi"
MAGIC = "[SemImageFile]"
SIDECAR_SUFFIXES = (".txt",)

log = logging.getLogger(__name__)


def parse_section(text: str) -> dict[str, str] | None:
    """``Key=Value`` pairs of the ``[SemImageFile]`` section; None when there is none."""
    lines = text.replace("\x00", "").splitlines()
    out: dict[str, str] = {}
    inside = False
    seen = False
    for line in lines:
        s = line.strip().lstrip("\ufeff")
        if s.startswith("[") and s.endswith("]"):
            inside = s == MAGIC
            seen = seen or inside
            continue
        if inside and "=" in s and not s.startswith(("#", ";")):
            k, _, v = s.partition("=")
            out.setdefault(k.strip(), v.strip())
    return out if seen else None


def parse_text(text: str) -> tuple[float | None, dict[str, str]] | None:
    """Pixel size (nm) and informative fields; None when the text is not a Hitachi sidecar."""
    sec = parse_section(text)
    if sec is None:
        return None
    nm = plausible_nm(parse_length_nm(sec.get("PixelSize", ""), default_unit="nm"))
    meta: dict[str, str] = {"vendor": NAME}
    if sec.get("Magnification"):
        meta["magnification"] = sec["Magnification"]
    volt = sec.get("AcceleratingVoltage")
    if volt:
        m = re.match(r"\s*([-+]?\d+\.?\d*)\s*([A-Za-z]*)", volt)
        if m:
            v = float(m.group(1))
            unit = m.group(2).lower()
            kv = v if unit in ("kv", "kilovolt") else v / 1000.0
            meta["kv"] = format_kv(kv)
    if sec.get("InstructName"):
        meta["instrument"] = sec["InstructName"]
    if sec.get("DataSize"):
        meta["image_area_px"] = sec["DataSize"]
    if sec.get("SignalName"):
        meta["detector"] = sec["SignalName"]
    return nm, meta


def read(path: Path, tif: tifffile.TiffFile | None) -> VendorReading | None:
    """Pixel size from the ``[SemImageFile]`` sidecar; None when there is no such sidecar."""
    found = False
    for txt in sidecar_candidates(path, SIDECAR_SUFFIXES):
        text = read_sidecar_text(txt)
        if text is None or MAGIC not in text:
            continue
        parsed = parse_text(text)
        if parsed is None:
            continue
        found = True
        nm, meta = parsed
        meta["sidecar"] = txt.name
        if nm is not None:
            return VendorReading(NAME, nm, meta)
        log.warning("%s: Hitachi sidecar holds no usable PixelSize", txt)
    return VendorReading(NAME, None, {"vendor": NAME}) if found else None


def pixel_size_nm(path: Path, tif: tifffile.TiffFile | None) -> float | None:
    """Pixel size in nm from the Hitachi sidecar, or None."""
    r = read(path, tif)
    return r.pixel_size_nm if r else None
