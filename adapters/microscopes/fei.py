"""FEI / Thermo Fisher: TIFF tag 34682 (``FEI_HELIOS``) or 34680 (``FEI_SFEG``).

The tag holds INI text; tifffile parses it into ``TiffFile.fei_metadata``, a dict of sections:
``{'Scan': {'PixelWidth': 2.0345e-09, ...}, 'EBeam': {'HV': 5000, ...}, ...}``. Lengths are in
metres and the high voltage in volts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import tifffile

from qcloop_adapters.microscopes._units import VendorReading, format_kv, plausible_nm

NAME = "fei"
TAGS = (34680, 34682)

log = logging.getLogger(__name__)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def read(path: Path, tif: tifffile.TiffFile | None) -> VendorReading | None:
    """Pixel size and a few fields from the FEI tag; None when the file has no such tag."""
    if tif is None or not tif.is_fei:
        return None
    md = tif.fei_metadata
    meta: dict[str, str] = {"vendor": NAME}
    if not isinstance(md, dict) or not md:
        log.warning("%s: FEI tag present but not parseable; ignoring it", path)
        return VendorReading(NAME, None, meta)
    nm = None
    for section in ("Scan", "EScan", "IScan"):
        sec = md.get(section)
        if isinstance(sec, dict):
            m = _number(sec.get("PixelWidth"))
            nm = plausible_nm(m * 1e9 if m is not None else None)
            if nm is not None:
                break
    if nm is None:
        log.warning("%s: FEI metadata hold no usable [Scan] PixelWidth", path)
    beam = md.get("EBeam") if isinstance(md.get("EBeam"), dict) else md.get("Beam")
    if isinstance(beam, dict):
        hv = _number(beam.get("HV"))
        if hv is not None and hv > 0:
            meta["kv"] = format_kv(hv / 1000.0)
    system = md.get("System")
    if isinstance(system, dict) and system.get("SystemType"):
        meta["instrument"] = str(system["SystemType"])
    det = md.get("Detectors")
    if isinstance(det, dict) and det.get("Name"):
        meta["detector"] = str(det["Name"])
    scan = md.get("Scan") if isinstance(md.get("Scan"), dict) else {}
    hfw = _number(scan.get("HorFieldsize")) if scan else None
    if hfw:
        meta["horizontal_field_width_um"] = f"{hfw * 1e6:g}"
    return VendorReading(NAME, nm, meta)


def pixel_size_nm(path: Path, tif: tifffile.TiffFile | None) -> float | None:
    """Pixel size in nm from the FEI tag, or None."""
    r = read(path, tif)
    return r.pixel_size_nm if r else None
