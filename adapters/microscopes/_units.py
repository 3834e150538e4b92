"""Small helpers shared by the vendor readers: length units, text decoding, plausibility.

Nothing here touches the file system except :func:`read_sidecar_text`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

#: nanometres per unit; keys are lower-case, micro written as ``u`` (see :func:`_norm_unit`)
_NM_PER_UNIT = {
    "m": 1e9,
    "mm": 1e6,
    "um": 1e3,
    "micron": 1e3,
    "microns": 1e3,
    "nm": 1.0,
    "pm": 1e-3,
    "a": 0.1,  # angstrom
}

#: a pixel size outside this range (nm) is treated as malformed metadata
PLAUSIBLE_NM = (1e-3, 1e6)

_NUMBER_UNIT = re.compile(
    r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-z\u00b5\u03bc\u00c5\u212b]*)"
)

# sidecar text files are small; anything bigger is not a sidecar
MAX_SIDECAR_BYTES = 1 << 20


@dataclass
class VendorReading:
    """What one vendor reader found in a file.

    Attributes
    ----------
    vendor : str
        Source name, one of ``qcloop.records.PIXEL_SIZE_SOURCES``.
    pixel_size_nm : float or None
        Physical pixel size in nm; None when the vendor's metadata were found but held no
        usable pixel size.
    metadata : dict of str to str
        Informative fields (magnification, kV, instrument, ...).
    """

    vendor: str
    pixel_size_nm: float | None
    metadata: dict[str, str] = field(default_factory=dict)


def _norm_unit(unit: str) -> str:
    u = unit.strip().lower()
    u = u.replace("\u00b5", "u").replace("\u03bc", "u").replace("\u00e5", "a").replace("\u212b", "a")
    return u


def nm_per_unit(unit: str) -> float | None:
    """Nanometres in one ``unit`` (m, mm, um/µm/μm, nm, pm, Å); None for an unknown unit."""
    return _NM_PER_UNIT.get(_norm_unit(unit))


def parse_length_nm(text: str, default_unit: str | None = None) -> float | None:
    """Parse a length such as ``"1.00nm/pixel"``, ``"4.466 nm"``, ``"100nm"``, ``"2.5e-09"``.

    Parameters
    ----------
    text : str
        Number followed by an optional unit (anything after the unit, like ``/pixel``, is
        ignored).
    default_unit : str, optional
        Unit assumed when the text carries none. Without it, a bare number is rejected.

    Returns
    -------
    float or None
        Length in nm, or None when the text cannot be understood.
    """
    m = _NUMBER_UNIT.match(str(text))
    if not m:
        return None
    value = float(m.group(1))
    unit = m.group(2) or default_unit
    if not unit:
        return None
    factor = nm_per_unit(unit)
    if factor is None:
        return None
    return value * factor


def plausible_nm(value: float | None) -> float | None:
    """Return ``value`` when it is a finite pixel size within :data:`PLAUSIBLE_NM`, else None."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(v) or not (PLAUSIBLE_NM[0] <= v <= PLAUSIBLE_NM[1]):
        return None
    return v


def decode_text(data: bytes) -> str:
    """Decode a metadata blob that may be UTF-16 (with/without BOM), UTF-8 or Latin-1."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    if len(data) >= 4 and data[1:2] == b"\x00" and data[3:4] == b"\x00":
        return data.decode("utf-16-le", errors="replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def sidecar_candidates(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Existing files beside ``path`` with the same stem and one of ``suffixes``.

    ``suffixes`` are tried as given and upper-cased (``.txt`` and ``.TXT``).
    """
    out: list[Path] = []
    for suffix in suffixes:
        for s in (suffix, suffix.upper()):
            cand = path.with_name(path.stem + s)
            if cand != path and cand.is_file() and cand not in out:
                out.append(cand)
    return out


def read_sidecar_text(path: Path) -> str | None:
    """Text of a small sidecar file, or None when unreadable or too big to be one."""
    try:
        if path.stat().st_size > MAX_SIDECAR_BYTES:
            return None
        return decode_text(path.read_bytes())
    except OSError:
        return None


def format_kv(kv: float) -> str:
    """Accelerating voltage as a short string: ``"3 kV"``, ``"0.5 kV"``."""
    return f"{kv:g} kV"
