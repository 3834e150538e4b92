"""JEOL: the EXIF MakerNote of the TIFF, or the ``.txt`` sidecar JEOL writes beside the image.

MakerNote (JSM-IT800 and similar): bytes ``b'UNICODE\\x00'`` followed by UTF-16-LE text of
tab-separated ``$KEY=value`` entries, e.g. ``$CM_PIXEL_SIZE=1.00nm/pixel``, ``$CM_MAG=100000``,
``$CM_ACCEL_VOLT=10`` (kV), ``$SM_MICRON_MARKER=100nm``, ``$SM_MICRON_BAR=99`` (pixels).

Sidecar (``<stem>.txt``, older SEMs and PC-SEM): one ``$KEY value`` per line, some keys with a
double dollar: ``$CM_MAG 5000``, ``$CM_FULL_SIZE 1280 960``, ``$$SM_MICRON_BAR 160``,
``$$SM_MICRON_MARKER 5um``. The pixel size is ``CM_PIXEL_SIZE`` where present, else the micron
marker length divided by the micron bar length in pixels (as ImageJ's EM-tool and pynxtools-em
do).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import tifffile

from qcloop_adapters.microscopes._units import (
    VendorReading,
    decode_text,
    format_kv,
    parse_length_nm,
    plausible_nm,
    read_sidecar_text,
    sidecar_candidates,
)

NAME = "jeol"
EXIF_TAG = 34665
MAKERNOTE_EXIF_TAG = 0x927C
SIDECAR_SUFFIXES = (".txt",)

log = logging.getLogger(__name__)

_ENTRY = re.compile(r"^\$+([A-Za-z0-9_]+)(?:\s*=\s*|\s+)(.*)$")


def parse_entries(text: str) -> dict[str, str]:
    """``$KEY=value`` / ``$KEY value`` / ``$$KEY value`` entries (tab or newline separated).

    Keys are returned without the leading dollars; the first occurrence of a key wins.
    """
    out: dict[str, str] = {}
    for raw in re.split(r"[\t\r\n]+", text.replace("\x00", "")):
        m = _ENTRY.match(raw.strip())
        if m and m.group(1) not in out:
            out[m.group(1)] = m.group(2).strip()
    return out


def makernote_text(data: bytes) -> str | None:
    """Text of a JEOL MakerNote blob; None when it is not one."""
    if data.startswith(b"UNICODE\x00"):
        text = data[8:].decode("utf-16-le", errors="replace")
    else:
        text = decode_text(data)
    return text if "$CM_" in text or "$SM_" in text else None


def pixel_size_from_entries(e: dict[str, str]) -> float | None:
    """Explicit ``CM_PIXEL_SIZE``, else micron marker / micron bar; nm or None."""
    if "CM_PIXEL_SIZE" in e:
        nm = plausible_nm(parse_length_nm(e["CM_PIXEL_SIZE"]))
        if nm is not None:
            return nm
    marker = parse_length_nm(e.get("SM_MICRON_MARKER", ""))
    try:
        bar = float(e.get("SM_MICRON_BAR", "").split()[0])
    except (ValueError, IndexError):
        bar = 0.0
    if marker is not None and bar > 0:
        return plausible_nm(marker / bar)
    return None


def metadata_from_entries(e: dict[str, str]) -> dict[str, str]:
    meta: dict[str, str] = {"vendor": NAME}
    if e.get("CM_MAG"):
        meta["magnification"] = e["CM_MAG"]
    kv = e.get("CM_ACCEL_VOLT")
    if kv:
        try:
            meta["kv"] = format_kv(float(kv.split()[0]))
        except (ValueError, IndexError):
            pass
    instrument = e.get("CM_INSTRUMENT") or e.get("SM_NICKNAME")
    if instrument:
        meta["instrument"] = instrument
    signal = e.get("CM_SIGNAL") or e.get("SM_DETECTOR")
    if signal:
        meta["detector"] = signal
    size = e.get("CM_IMAGE_SIZE") or e.get("CM_FULL_SIZE")
    if size:
        parts = size.split()
        if len(parts) >= 2:
            meta["image_area_px"] = f"{parts[0]}x{parts[1]}"
    if e.get("SM_PNU_HEIGHT"):
        meta["databar_rows"] = e["SM_PNU_HEIGHT"]
    if e.get("SM_MICRON_MARKER"):
        meta["scale_bar"] = e["SM_MICRON_MARKER"]
    return meta


def _makernote_bytes(path: Path, tif: tifffile.TiffFile | None) -> bytes | None:
    if tif is not None:
        tag = tif.pages.first.tags.get(EXIF_TAG)
        exif = tag.value if tag is not None else None
        note = exif.get("MakerNote") if isinstance(exif, dict) else None
        return bytes(note) if isinstance(note, (bytes, bytearray)) else None
    # JPEG/other: Pillow reads only the header here
    try:
        from PIL import Image

        with Image.open(path) as im:
            note = im.getexif().get_ifd(0x8769).get(MAKERNOTE_EXIF_TAG)
    except Exception:  # noqa: BLE001 - metadata are optional; the image loader reports bad files
        return None
    return bytes(note) if isinstance(note, (bytes, bytearray)) else None


def read(path: Path, tif: tifffile.TiffFile | None) -> VendorReading | None:
    """Pixel size from the MakerNote or the ``.txt`` sidecar; None when neither is JEOL's."""
    found = False
    note = _makernote_bytes(path, tif)
    text = makernote_text(note) if note else None
    if text is not None:
        found = True
        e = parse_entries(text)
        nm = pixel_size_from_entries(e)
        if nm is not None:
            return VendorReading(NAME, nm, metadata_from_entries(e))
        log.warning("%s: JEOL MakerNote holds no usable pixel size", path)
    for txt in sidecar_candidates(path, SIDECAR_SUFFIXES):
        text = read_sidecar_text(txt)
        if text is None or not re.search(r"^\$+(CM|SM)_", text, re.MULTILINE):
            continue
        found = True
        e = parse_entries(text)
        nm = pixel_size_from_entries(e)
        meta = metadata_from_entries(e)
        meta["sidecar"] = txt.name
        if nm is not None:
            return VendorReading(NAME, nm, meta)
        log.warning("%s: JEOL sidecar holds no usable pixel size", txt)
    return VendorReading(NAME, None, {"vendor": NAME}) if found else None


def pixel_size_nm(path: Path, tif: tifffile.TiffFile | None) -> float | None:
    """Pixel size in nm from JEOL metadata, or None."""
    r = read(path, tif)
    return r.pixel_size_nm if r else None
