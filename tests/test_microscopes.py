"""Vendor metadata readers (qcloop_adapters.microscopes, the adapters/microscopes/ folder): pixel size, units, fallbacks, real samples.

Every test writes its own files: TIFFs with the vendor's private tag (tifffile ``extratags``),
a hand-built TIFF with an EXIF MakerNote, and the sidecar text files the vendors write.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from qcloop_adapters import microscopes
from qcloop_adapters.microscopes import fei, hitachi, jeol, read_pixel_size, read_vendor_metadata, tescan, zeiss
from qcloop_adapters.microscopes._units import parse_length_nm
from qcloop.config import ImagingConfig
from qcloop.imaging import load_image

PIX = (np.arange(48 * 64) % 251).astype(np.uint8).reshape(48, 64)


def write_tif(path: Path, extratags=()) -> Path:
    tifffile.imwrite(path, PIX, extratags=list(extratags))
    return path


def resolve(path: Path, **kw):
    with tifffile.TiffFile(path) as tif:
        return read_pixel_size(path, tif, **kw)


def tiff_with_makernote(path: Path, note: bytes, width: int = 16, height: int = 8) -> Path:
    """Little-endian TIFF: IFD0 (8-bit grey) + ExifTag -> EXIF IFD holding a MakerNote."""
    pixels = bytes(range(width)) * height
    entries0 = 8  # 256 257 258 259 262 273 278 279 + 34665 below
    ifd0_off = 8
    ifd0_size = 2 + 12 * (entries0 + 1) + 4
    exif_off = ifd0_off + ifd0_size
    exif_size = 2 + 12 * 1 + 4
    note_off = exif_off + exif_size
    data_off = note_off + len(note)
    tags = [
        (256, 3, 1, width), (257, 3, 1, height), (258, 3, 1, 8), (259, 3, 1, 1),
        (262, 3, 1, 1), (273, 4, 1, data_off), (278, 3, 1, height), (279, 4, 1, len(pixels)),
        (34665, 4, 1, exif_off),
    ]
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd0_off))
    out += struct.pack("<H", len(tags))
    for code, typ, count, value in tags:
        fmt = "<HHIHH" if typ == 3 else "<HHII"
        out += struct.pack(fmt, code, typ, count, value, 0) if typ == 3 else struct.pack(fmt, code, typ, count, value)
    out += struct.pack("<I", 0)
    out += struct.pack("<H", 1) + struct.pack("<HHII", 0x927C, 7, len(note), note_off) + struct.pack("<I", 0)
    out += note + pixels
    path.write_bytes(bytes(out))
    return path


# --------------------------------------------------------------------------- units
@pytest.mark.parametrize("text, nm", [
    ("1.00nm/pixel", 1.0), ("4.466 nm", 4.466), ("100nm", 100.0), ("5um", 5000.0),
    ("5\u00b5m", 5000.0), ("5\u03bcm", 5000.0), ("2.5e-09 m", 2.5), ("250 pm", 0.25),
    ("1mm", 1e6), ("0.5 microns", 500.0), ("10 \u00c5", 1.0),
])
def test_parse_length_units(text, nm):
    assert parse_length_nm(text) == pytest.approx(nm)


@pytest.mark.parametrize("text", ["", "abc", "nm", "3", "5 furlongs"])
def test_parse_length_rejects_garbage(text):
    assert parse_length_nm(text) is None


def test_parse_length_default_unit():
    assert parse_length_nm("24.8", default_unit="nm") == pytest.approx(24.8)


# --------------------------------------------------------------------------- Zeiss
ZEISS_NAMED = "\r\n".join([
    "0", "0", "0", "9.9e-09", "25000.0",
    "AP_IMAGE_PIXEL_SIZE", "Image Pixel Size = 2.233 nm",
    "AP_MAG", "Mag = 50.00 K X",
    "AP_ACTUALKV", "EHT = 3.00 kV",
])


def test_zeiss_named_pixel_size_wins_over_unnamed(tmp_path):
    p = write_tif(tmp_path / "z.tif", [(34118, "s", 0, ZEISS_NAMED, False)])
    size, meta = resolve(p)
    assert size.source == "zeiss"
    assert size.nm == pytest.approx(2.233)
    assert meta["magnification"] == "50.00 K X"
    assert meta["kv"] == "3 kV"


def test_zeiss_unnamed_tuple_in_metres(tmp_path):
    text = "\r\n".join(["0", "0", "0", "4.466e-09", "25000.0", "AP_MAG", "Mag = 25.00 K X"])
    p = write_tif(tmp_path / "z.tif", [(34118, "s", 0, text, False)])
    size, _ = resolve(p)
    assert (size.source, size.nm) == ("zeiss", pytest.approx(4.466))


def test_zeiss_micrometre_unit(tmp_path):
    text = "\r\n".join(["0", "AP_IMAGE_PIXEL_SIZE", "Image Pixel Size = 0.0125 \u00b5m"])
    p = write_tif(tmp_path / "z.tif", [(34118, "B", 0, text.encode("cp1252"), False)])
    size, _ = resolve(p)
    assert (size.source, size.nm) == ("zeiss", pytest.approx(12.5))


def test_zeiss_malformed_falls_back_to_config(tmp_path):
    text = "\r\n".join(["AP_IMAGE_PIXEL_SIZE", "Image Pixel Size = lots", "AP_MAG", "Mag = ?"])
    p = write_tif(tmp_path / "z.tif", [(34118, "s", 0, text, False)])
    size, meta = resolve(p, config_pixel_size_nm=3.0)
    assert (size.source, size.nm) == ("config", 3.0)
    assert meta["vendor"] == "zeiss"
    size, _ = resolve(p)
    assert (size.source, size.nm) == ("none", None)


def test_zeiss_implausible_value_rejected(tmp_path):
    text = "\r\n".join(["0", "0", "0", "-4.466e-09"])
    p = write_tif(tmp_path / "z.tif", [(34118, "s", 0, text, False)])
    assert resolve(p)[0].source == "none"


# --------------------------------------------------------------------------- FEI / Thermo
FEI_INI = ("[User]\r\nDate=03/12/2019\r\n\r\n[System]\r\nSystemType=Helios G4 UX\r\n\r\n"
           "[EBeam]\r\nHV=5000\r\n\r\n[Scan]\r\nPixelWidth=2.0345e-009\r\nPixelHeight=2.0345e-009\r\n"
           "HorFieldsize=2.0833e-006\r\n\r\n[Detectors]\r\nName=TLD\r\n")


@pytest.mark.parametrize("tag", [34682, 34680])
def test_fei_pixel_width_in_metres(tmp_path, tag):
    p = write_tif(tmp_path / "f.tif", [(tag, "s", 0, FEI_INI, False)])
    size, meta = resolve(p)
    assert (size.source, size.nm) == ("fei", pytest.approx(2.0345))
    assert meta["kv"] == "5 kV"
    assert meta["instrument"] == "Helios G4 UX"
    assert meta["detector"] == "TLD"


def test_fei_malformed_falls_back(tmp_path):
    ini = FEI_INI.replace("PixelWidth=2.0345e-009", "PixelWidth=n/a")
    p = write_tif(tmp_path / "f.tif", [(34682, "s", 0, ini, False)])
    size, meta = resolve(p, config_pixel_size_nm=7.5)
    assert (size.source, size.nm) == ("config", 7.5)
    assert meta["vendor"] == "fei"


# --------------------------------------------------------------------------- TESCAN
def tescan_blob(main_text: str) -> bytes:
    """Block list as TESCAN writes it: (uint32 size, uint16 type) headers, MAIN=2, SEM=3."""
    main = main_text.encode("ascii")
    sem = b"HV=15000.0\r\nWD=0.0101\r\n"
    out = b""
    for typ, payload in ((2, main), (3, sem)):
        out += struct.pack("<IH", len(payload) + 2, typ) + payload
    return out + struct.pack("<IH", 2, 0)


def test_tescan_tag_50431(tmp_path):
    blob = tescan_blob("AccFrames=4\r\nDevice=MIRA3\r\nMagnification=50000\r\n"
                       "PixelSizeX=4.96e-009\r\nPixelSizeY=4.96e-009\r\n")
    p = write_tif(tmp_path / "t.tif", [(50431, "B", len(blob), blob, False)])
    size, meta = resolve(p)
    assert (size.source, size.nm) == ("tescan", pytest.approx(4.96))
    assert meta["kv"] == "15 kV"
    assert meta["magnification"] == "50000"
    assert meta["instrument"] == "MIRA3"


def test_tescan_pixel_size_first_in_block(tmp_path):
    """The key right after the binary block header is still found."""
    blob = tescan_blob("PixelSizeX=1.2e-008\r\nPixelSizeY=1.2e-008\r\n")
    p = write_tif(tmp_path / "t.tif", [(50431, "B", len(blob), blob, False)])
    assert resolve(p)[0].nm == pytest.approx(12.0)


def test_tescan_hdr_sidecar_for_png(tmp_path):
    png = tmp_path / "scan01.png"
    Image.fromarray(PIX).save(png)
    (tmp_path / "scan01-png.hdr").write_text(
        "[MAIN]\r\nDevice=TESCAN LYRA\r\nMagnification=20000\r\nPixelSizeX=7.5e-009\r\n"
        "PixelSizeY=7.5e-009\r\n[SEM]\r\nHV=10000\r\n")
    size, meta = read_pixel_size(png, None)
    assert (size.source, size.nm) == ("tescan", pytest.approx(7.5))
    assert meta["sidecar"] == "scan01-png.hdr"


def test_tescan_garbage_tag_does_not_crash(tmp_path):
    blob = bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8))
    p = write_tif(tmp_path / "t.tif", [(50431, "B", len(blob), blob, False)])
    size, _ = resolve(p, config_pixel_size_nm=2.0)
    assert (size.source, size.nm) == ("config", 2.0)


# --------------------------------------------------------------------------- JEOL
def jeol_note(entries: str) -> bytes:
    return b"UNICODE\x00" + entries.encode("utf-16-le")


def test_jeol_makernote_in_tiff(tmp_path):
    note = jeol_note("$CM_FORMAT=JEOL/FE\t$CM_MAG=50000\t$CM_ACCEL_VOLT=5\t"
                     "$CM_PIXEL_SIZE=2.50nm/pixel\t$SM_MICRON_MARKER=500nm\t$SM_MICRON_BAR=180\t")
    p = tiff_with_makernote(tmp_path / "j.tif", note)
    size, meta = resolve(p)
    assert (size.source, size.nm) == ("jeol", pytest.approx(2.5))
    assert meta["magnification"] == "50000"
    assert meta["kv"] == "5 kV"
    # the whole loader reads it too
    img = load_image(p, ImagingConfig(banner="none"))
    assert img.pixel_size.source == "jeol" and img.pixel_size_nm == pytest.approx(2.5)


def test_jeol_makernote_marker_over_bar(tmp_path):
    note = jeol_note("$CM_FORMAT=JEOL/FE\t$SM_MICRON_MARKER=1\u00b5m\t$SM_MICRON_BAR=200\t")
    p = tiff_with_makernote(tmp_path / "j.tif", note)
    assert resolve(p)[0].nm == pytest.approx(5.0)


def test_jeol_makernote_in_jpeg(tmp_path):
    ex = Image.Exif()
    ex.get_ifd(0x8769)[0x927C] = jeol_note("$CM_FORMAT=JEOL/FE\t$CM_PIXEL_SIZE=0.50nm/pixel\t")
    p = tmp_path / "j.jpg"
    Image.fromarray(PIX).save(p, exif=ex)
    assert read_pixel_size(p, None)[0].nm == pytest.approx(0.5)


def test_jeol_txt_sidecar_micron_bar(tmp_path):
    p = write_tif(tmp_path / "IMG_0001.tif")
    (tmp_path / "IMG_0001.txt").write_text(
        "$CM_FORMAT JEOL/SEM\n$CM_INSTRUMENT JSM-7800F\n$CM_SIGNAL SEI\n$CM_MAG 5000\n"
        "$CM_ACCEL_VOLT 15.0\n$CM_FULL_SIZE 1280 960\n$$SM_MICRON_BAR 160\n$$SM_MICRON_MARKER 5um\n")
    size, meta = resolve(p)
    assert (size.source, size.nm) == ("jeol", pytest.approx(5000 / 160))
    assert meta["kv"] == "15 kV"
    assert meta["image_area_px"] == "1280x960"
    assert meta["instrument"] == "JSM-7800F"


def test_jeol_sidecar_malformed_falls_back(tmp_path):
    p = write_tif(tmp_path / "a.tif")
    (tmp_path / "a.txt").write_text("$CM_MAG 5000\n$$SM_MICRON_BAR 0\n$$SM_MICRON_MARKER 5parsecs\n")
    size, meta = resolve(p, config_pixel_size_nm=9.0)
    assert (size.source, size.nm) == ("config", 9.0)
    assert meta["vendor"] == "jeol"


def test_unrelated_txt_is_not_a_sidecar(tmp_path):
    p = write_tif(tmp_path / "a.tif")
    (tmp_path / "a.txt").write_text("sample A, batch 12, PixelSize=3 maybe\n")
    size, meta = resolve(p)
    assert (size.source, size.nm, meta) == ("none", None, {})


# --------------------------------------------------------------------------- Hitachi
HITACHI_TXT = ("[SemImageFile]\r\nInstructName=S-4800\r\nSerialNumber=123189-06\r\n"
               "ImageName=h.tif\r\nDataSize=1280x960\r\nMagnification=20000\r\n"
               "AcceleratingVoltage=5000 Volt\r\nPixelSize=2.480469\r\n")


def test_hitachi_sidecar(tmp_path):
    p = write_tif(tmp_path / "h.tif")
    (tmp_path / "h.txt").write_text(HITACHI_TXT, encoding="latin-1")
    size, meta = resolve(p)
    assert (size.source, size.nm) == ("hitachi", pytest.approx(2.480469))
    assert meta["kv"] == "5 kV"
    assert meta["magnification"] == "20000"
    assert meta["image_area_px"] == "1280x960"


def test_hitachi_utf16_sidecar_for_bmp(tmp_path):
    p = tmp_path / "h.bmp"
    Image.fromarray(PIX).save(p)
    (tmp_path / "h.txt").write_text(HITACHI_TXT, encoding="utf-16")
    assert read_pixel_size(p, None)[0].nm == pytest.approx(2.480469)


def test_hitachi_malformed_falls_back(tmp_path):
    p = write_tif(tmp_path / "h.tif")
    (tmp_path / "h.txt").write_text(HITACHI_TXT.replace("PixelSize=2.480469", "PixelSize=unknown"))
    size, meta = resolve(p)
    assert (size.source, size.nm) == ("none", None)
    assert meta["vendor"] == "hitachi"


# --------------------------------------------------------------------------- precedence
def test_no_metadata_uses_config_then_none(tmp_path):
    p = write_tif(tmp_path / "plain.tif")
    assert resolve(p, config_pixel_size_nm=3.3)[0].source == "config"
    size, meta = resolve(p)
    assert (size.source, size.nm, meta) == ("none", None, {})


def test_force_config_overrides_vendor(tmp_path):
    p = write_tif(tmp_path / "f.tif", [(34682, "s", 0, FEI_INI, False)])
    size, meta = resolve(p, config_pixel_size_nm=10.0, force_config=True)
    assert (size.source, size.nm) == ("config", 10.0)
    assert meta["vendor_pixel_size_nm"] == "2.0345"


def test_vendor_exception_is_contained(tmp_path, monkeypatch):
    def boom(path, tif):
        raise RuntimeError("parser bug")

    monkeypatch.setattr(zeiss, "read", boom)
    p = write_tif(tmp_path / "f.tif", [(34682, "s", 0, FEI_INI, False)])
    assert resolve(p)[0].source == "fei"


def test_each_vendor_module_has_the_same_interface():
    for mod in (zeiss, jeol, fei, hitachi, tescan):
        assert mod in microscopes.VENDORS
        assert callable(mod.pixel_size_nm) and callable(mod.read)
        assert isinstance(mod.NAME, str)


def test_vendor_pixel_size_nm_functions(tmp_path):
    p = write_tif(tmp_path / "f.tif", [(34682, "s", 0, FEI_INI, False)])
    with tifffile.TiffFile(p) as tif:
        assert fei.pixel_size_nm(p, tif) == pytest.approx(2.0345)
        assert zeiss.pixel_size_nm(p, tif) is None
        assert read_vendor_metadata(p, tif).vendor == "fei"


# --------------------------------------------------------------------------- real samples
@pytest.mark.real_data
def test_real_jeol_sample(sem_data):
    img = load_image(sem_data / "jeol" / "A2h_01.tif")
    assert (img.pixel_size.source, img.pixel_size_nm) == ("jeol", pytest.approx(1.0))
    assert img.metadata["magnification"] == "100000"
    assert img.metadata["kv"] == "10 kV"


@pytest.mark.real_data
def test_real_zeiss_samples(sem_data):
    files = sorted((sem_data / "konstanz").glob("*.tif"))
    assert len(files) == 15
    for f in files:
        with tifffile.TiffFile(f) as tif:
            size, meta = read_pixel_size(f, tif)
        assert (size.source, size.nm) == ("zeiss", pytest.approx(4.466)), f.name
        assert meta["kv"] == "3 kV"
