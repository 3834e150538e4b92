"""Hostile files for the reliability suite: every kind a microscope PC, a share or an operator
can leave in the export folder, with what the daemon must do with it."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import struct
import subprocess
import sys
import time
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tifffile
from PIL import Image

from daemon_helpers import (Recorder, daemon_cmd, disk_image, huge_tiff_header, start_daemon, stop_process,
                            tiff_bytes, wait_until, write_slowly)

GOOD, QUARANTINED, REPORTED, IGNORED = "good", "quarantined", "reported", "ignored"


@dataclass
class Kind:
    """One hostile kind: ``make(folder) -> [name bytes]`` and the outcome every name must have."""

    name: str
    expect: str
    make: Callable[[Path], list[bytes]]


def _put(folder: Path, name: bytes, data: bytes) -> list[bytes]:
    path = os.fsencode(folder) + b"/" + name
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.dirname(path) + b"/.part-" + str(time.monotonic_ns()).encode()
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return [os.path.relpath(path, os.fsencode(folder))]


def _image_bytes(fmt: str, seed: int = 5) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(disk_image(seed)).save(buf, format=fmt)
    return buf.getvalue()


def _tiff(arr: np.ndarray, **kw: Any) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def _png_header(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def _bogus_compression() -> bytes:
    data = bytearray(_tiff(disk_image(3)))
    n = struct.unpack("<H", data[8:10])[0]
    for i in range(n):  # the Compression tag (259) gets an unknown scheme
        off = 10 + 12 * i
        if struct.unpack("<H", data[off:off + 2])[0] == 259:
            data[off + 8:off + 10] = struct.pack("<H", 34999)
    return bytes(data)


def _big_sparse(folder: Path, name: bytes) -> list[bytes]:
    path = Path(os.fsdecode(os.fsencode(folder) + b"/" + name))
    tmp = path.with_name(".big.part")
    tifffile.imwrite(tmp, shape=(15000, 15000), dtype="uint8")  # header + a sparse 225 MB of zeros
    os.replace(tmp, path)
    return [name]


def _symlinks(pairs: list[tuple[str, str]]) -> Callable[[Path], list[bytes]]:
    def make(folder: Path) -> list[bytes]:
        for link, target in pairs:
            os.symlink(target, folder / link)
        return [os.fsencode(link) for link, _ in pairs]
    return make


def _fifo(folder: Path) -> list[bytes]:
    os.mkfifo(folder / "pipe_not_image.tif")
    return [b"pipe_not_image.tif"]


def _vanishing(folder: Path) -> list[bytes]:
    p = folder / "G_vanish.tif"
    p.write_bytes(tiff_bytes(8))
    p.unlink()
    return [b"G_vanish.tif"]


def _slow(folder: Path) -> list[bytes]:
    write_slowly(folder / "G_slowcopy.tif", tiff_bytes(31), chunks=4, pause=0.1)
    return [b"G_slowcopy.tif"]


def _data(name: bytes, data: Callable[[], bytes], expect: str, label: str | None = None) -> Kind:
    return Kind(label or os.fsdecode(name), expect, lambda folder: _put(folder, name, data()))


def kinds() -> list[Kind]:
    """The hostile kinds (bad files, file-system tricks) and the good images mixed among them."""
    good = tiff_bytes(11)
    out = [
        _data(b"bad_zero.tif", lambda: b"", QUARANTINED),
        _data(b"bad_trunc.tif", lambda: good[:300], QUARANTINED),
        _data(b"bad_text.tif", lambda: b"this is not an image\n" * 40, QUARANTINED),
        _data(b"bad_hugeheader.tif", lambda: huge_tiff_header(100_000), QUARANTINED),
        Kind("15000x15000 (memory budget)", QUARANTINED, lambda f: _big_sparse(f, b"bad_15k_montage.tif")),
        _data(b"bad_trunc.png", lambda: _image_bytes("PNG")[:120], QUARANTINED),
        _data(b"bad_html.png", lambda: b"<html><body>404 Not Found</body></html>\n" * 10, QUARANTINED),
        _data(b"bad_trunc.jpg", lambda: _image_bytes("JPEG")[:200], QUARANTINED),
        _data(b"bad_garbage.jpeg", lambda: b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8, QUARANTINED),
        _data(b"bad_headeronly.bmp", lambda: _image_bytes("BMP")[:54], QUARANTINED),
        _data(b"bad_trunc.bmp", lambda: _image_bytes("BMP")[:500], QUARANTINED),
        _data(b"bad_gzip.tif", lambda: gzip.compress(good), QUARANTINED),
        _data(b"bad_elf.tif", lambda: Path(sys.executable).read_bytes()[:8192], QUARANTINED),
        _data(b"bad_zerosize.tif", lambda: huge_tiff_header(0), QUARANTINED),
        _data(b"bad_ifd_past_eof.tif", lambda: b"II*\x00" + struct.pack("<I", 10**6) + b"\x00" * 64, QUARANTINED),
        _data(b"bad_random.tif", lambda: b"II*\x00" + np.random.default_rng(1).bytes(600), QUARANTINED),
        _data(b"bad_magic_only.tif", lambda: b"II*\x00", QUARANTINED),
        _data(b"bad_bigendian.tif", lambda: b"MM\x00*" + np.random.default_rng(2).bytes(300), QUARANTINED),
        _data(b"bad_bigtiff.tif", lambda: b"II+\x00" + np.random.default_rng(3).bytes(300), QUARANTINED),
        _data(b"bad_nan.tif", lambda: _tiff(np.full((64, 64), np.nan, np.float32)), QUARANTINED),
        _data(b"bad_lzw_trunc.tif", lambda: _tiff(disk_image(4), compression="zlib")[:700], QUARANTINED),
        _data(b"bad_compression.tif", _bogus_compression, QUARANTINED),
        _data(b"bad_bomb.png", lambda: _png_header(20000, 20000) + b"\x00" * 32, QUARANTINED),
        _data(b"bad_ihdr.png", lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 10, QUARANTINED),
        _data(b"bad_upper.JPG", lambda: b"not a jpeg" * 30, QUARANTINED),
        _data(b"bad_pdf.tif", lambda: b"%PDF-1.7\n" + b"0" * 500, QUARANTINED),
        _data(b"bad_zip.png", lambda: b"PK\x03\x04" + b"\x00" * 500, QUARANTINED),
        _data(b"bad_svg.png", lambda: b'<svg xmlns="http://www.w3.org/2000/svg"/>' * 5, QUARANTINED),
        _data(b"bad_onebyte.tif", lambda: b"\x00", QUARANTINED),
        _data(b"bad_allff.tif", lambda: b"\xff" * 1000, QUARANTINED),
        _data(b"bad_soi_only.jpg", lambda: b"\xff\xd8", QUARANTINED),
        _data(b"bad_\xff\xfe_cp1252.tif", lambda: b"garbage" * 50, QUARANTINED, "corrupt, name not UTF-8"),
        _data(b"bad_" + b"x" * 240 + b".tif", lambda: b"garbage" * 50, QUARANTINED, "corrupt, 248-byte name"),
        _data(b"bad\nnewline.tif", lambda: b"garbage" * 50, QUARANTINED, "corrupt, newline in name"),
        _data(b'bad "quote" \\ back.tif', lambda: b"garbage" * 50, QUARANTINED, "corrupt, quotes/backslash"),
        _data(b"bad..%2f..%2fetc.tif", lambda: b"garbage" * 50, QUARANTINED, "corrupt, traversal-looking name"),
        Kind("FIFO named .tif", REPORTED, _fifo),
        Kind("symlink loop A->B->A", REPORTED, _symlinks([("loop_a.tif", "loop_b.tif"), ("loop_b.tif", "loop_a.tif")])),
        Kind("symlink to itself", REPORTED, _symlinks([("loop_self.tif", "loop_self.tif")])),
        Kind("dangling symlink", REPORTED, _symlinks([("link_dangling.tif", "no_such_file.tif")])),
        Kind("symlink out of the tree", REPORTED, _symlinks([("link_outside.tif", "/etc/hostname")])),
        _data(b".hidden_partial.tif", lambda: b"half a file", IGNORED, "hidden temporary file"),
        Kind("file deleted before it settled", IGNORED, _vanishing),
        # good images among them, in names and ways a share hands them over
        _data(b"G_\xe9t\xe9_latin1.tif", lambda: tiff_bytes(12), GOOD, "good, name not UTF-8"),
        _data(b"G_" + b"y" * 245 + b".tif", lambda: tiff_bytes(13), GOOD, "good, 251-byte name"),
        _data(unicodedata.normalize("NFC", "G_é_nfc.tif").encode(), lambda: tiff_bytes(14), GOOD, "good, NFC name"),
        _data(unicodedata.normalize("NFD", "G_é_nfd.tif").encode(), lambda: tiff_bytes(15), GOOD, "good, NFD name"),
        _data("G_🧪_emoji.tif".encode(), lambda: tiff_bytes(16), GOOD, "good, emoji name"),
        _data(b"/".join([b"d%02d" % i for i in range(30)]) + b"/G_deep.tif", lambda: tiff_bytes(17), GOOD,
              "good, 30 folders deep"),
        _data(b"G_upper.TIFF", lambda: tiff_bytes(18), GOOD),
        _data(b"G_fine.png", lambda: _image_bytes("PNG", 19), GOOD),
        Kind("good, slow chunked copy", GOOD, _slow),
    ]
    return out
