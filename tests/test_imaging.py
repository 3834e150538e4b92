"""Image loading (qcloop.imaging): formats, dtypes, bad inputs, banner detection."""

from __future__ import annotations

import io
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageDraw, ImageFont
from pydantic import ValidationError
from scipy import ndimage
from skimage.draw import disk

from qcloop.config import ImagingConfig
from qcloop.errors import InputImageError
from qcloop.imaging import detect_banner, load_array, load_image

NO_BANNER = ImagingConfig(banner="none")


# --------------------------------------------------------------------------- helpers
def micrograph(h=480, w=640, *, seed=0, n=70, noise=8.0, touch_bottom=False, dtype=np.uint8):
    """Noisy grey background with bright blurred discs (a crude SEM picture of particles)."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w), 90.0)
    for _ in range(n):
        r = rng.uniform(8, 20)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        rr, cc = disk((cy, cx), r, shape=(h, w))
        img[rr, cc] = 200.0
    if touch_bottom:
        for cx in range(30, w, 70):
            rr, cc = disk((h - 5, cx), 18, shape=(h, w))
            img[rr, cc] = 210.0
    img = ndimage.gaussian_filter(img, 1.5)
    if noise:
        img = img + rng.normal(0, noise, img.shape)
    if dtype == np.uint16:
        return np.clip(img * 256, 0, 65535).astype(np.uint16)
    return np.clip(img, 0, 255).astype(dtype)


def banner(w, rows=56, *, bg=0, fg=255, frame=True, dtype=np.uint8):
    """An info bar like the microscopes draw: uniform band, frame line, text and a scale bar."""
    pil = Image.new("L", (w, rows), bg)
    d = ImageDraw.Draw(pil)
    if frame:
        d.line((0, 0, w, 0), fill=fg, width=2)
    font = ImageFont.load_default(size=14)
    d.text((20, 10), "300 nm", fill=fg, font=font)
    d.line((20, 35, 110, 35), fill=fg, width=2)
    d.text((w // 3, 10), "EHT = 3.00 kV   WD = 2.7 mm", fill=fg, font=font)
    d.text((w // 3, 30), "Mag = 25.00 K X   Signal A = InLens", fill=fg, font=font)
    a = np.asarray(pil)
    if dtype == np.uint16:
        return a.astype(np.uint16) * 257
    return a


def with_banner(img, **kw):
    return np.vstack([img, banner(img.shape[1], dtype=img.dtype.type, **kw)])


def raw_tiff(path: Path, width: int, height: int, data: bytes = b"", bytecount: int | None = None) -> Path:
    """A minimal hand-written little-endian 8-bit grey TIFF (header claims whatever we say)."""
    data_off = 8 + 2 + 12 * 8 + 4
    count = width * height if bytecount is None else bytecount
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
            (273, 4, 1, data_off), (278, 4, 1, max(height, 1)), (279, 4, 1, count)]
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)))
    for code, typ, n, value in tags:
        out += struct.pack("<HHIHH", code, typ, n, value, 0) if typ == 3 else struct.pack("<HHII", code, typ, n, value)
    out += struct.pack("<I", 0) + data
    path.write_bytes(bytes(out))
    return path


def expect_error(path: Path, fragment: str, cfg: ImagingConfig | None = None) -> InputImageError:
    with pytest.raises(InputImageError) as info:
        load_image(path, cfg)
    err = info.value
    assert err.path == path
    assert fragment in err.reason, err.reason
    assert str(path) in str(err)
    return err


# --------------------------------------------------------------------------- TIFF formats
def test_tiff_8bit_round_trip(tmp_path):
    a = micrograph()
    tifffile.imwrite(tmp_path / "a.tif", a)
    img = load_image(tmp_path / "a.tif")
    assert img.pixels.dtype == np.uint8
    np.testing.assert_array_equal(img.pixels, a)
    assert img.analysed_height_px == a.shape[0]
    assert img.pixel_size.source == "none" and img.pixel_size_nm is None
    assert img.name == "a"


def test_tiff_16bit_keeps_dtype_and_range(tmp_path):
    a = np.linspace(0, 65535, 300 * 400).reshape(300, 400).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a16.tif", a)
    img = load_image(tmp_path / "a16.tif", NO_BANNER)
    assert img.pixels.dtype == np.uint16
    assert int(img.pixels.max()) == 65535 and int(img.pixels.min()) == 0
    np.testing.assert_array_equal(img.pixels, a)
    # intensity() scales by the full 16-bit range: 65536 distinct levels survive
    assert len(np.unique(img.intensity())) > 256


def test_tiff_lzw_and_float(tmp_path):
    a = micrograph(seed=3)
    tifffile.imwrite(tmp_path / "lzw.tif", a, compression="lzw")
    np.testing.assert_array_equal(load_image(tmp_path / "lzw.tif").pixels, a)
    f = a.astype(np.float64) / 255.0
    tifffile.imwrite(tmp_path / "f.tif", f)
    img = load_image(tmp_path / "f.tif", NO_BANNER)
    assert img.pixels.dtype == np.float32
    np.testing.assert_allclose(img.pixels, f, rtol=1e-6)


def test_palette_tiff_goes_through_colormap(tmp_path):
    idx = (np.arange(64 * 80) % 256).astype(np.uint8).reshape(64, 80)
    grey_map = (255 - np.arange(256)) * 257  # inverted grey ramp, 16-bit like real files
    cmap = np.stack([grey_map] * 3).astype(np.uint16)
    tifffile.imwrite(tmp_path / "pal.tif", idx, photometric="palette", colormap=cmap)
    img = load_image(tmp_path / "pal.tif", NO_BANNER)
    assert img.pixels.dtype == np.uint8
    np.testing.assert_array_equal(img.pixels, 255 - idx)


def test_colour_palette_tiff_to_luma(tmp_path):
    idx = np.array([[0, 1], [2, 3]], np.uint8)
    cmap = np.zeros((3, 256), np.uint16)
    cmap[:, 1] = (65535, 0, 0)
    cmap[:, 2] = (0, 65535, 0)
    cmap[:, 3] = (65535, 65535, 65535)
    tifffile.imwrite(tmp_path / "cpal.tif", idx, photometric="palette", colormap=cmap)
    px = load_image(tmp_path / "cpal.tif", NO_BANNER).pixels
    np.testing.assert_array_equal(px, [[0, 76], [150, 255]])  # 0.299*255, 0.587*255


def test_multipage_tiff_takes_first_page(tmp_path):
    a, b = micrograph(seed=1), micrograph(seed=2)
    tifffile.imwrite(tmp_path / "m.tif", np.stack([a, b]))
    img = load_image(tmp_path / "m.tif")
    np.testing.assert_array_equal(img.pixels, a)
    assert img.metadata["pages"] == "2"


@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_rgb_tiff_converted_to_grey(tmp_path, planar):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    data = rgb if planar == "contig" else np.moveaxis(rgb, -1, 0)
    tifffile.imwrite(tmp_path / "rgb.tif", data, photometric="rgb", planarconfig=planar)
    px = load_image(tmp_path / "rgb.tif", NO_BANNER).pixels
    expected = np.rint(0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2])
    assert px.dtype == np.uint8 and px.shape == (40, 50)
    assert np.max(np.abs(px.astype(int) - expected)) <= 1


def test_grey_stored_as_rgb_is_exact(tmp_path):
    a = micrograph()
    tifffile.imwrite(tmp_path / "g.tif", np.stack([a, a, a], -1), photometric="rgb")
    np.testing.assert_array_equal(load_image(tmp_path / "g.tif").pixels, a)


def test_rgb16_tiff_stays_16bit(tmp_path):
    rgb = np.full((20, 30, 3), 40000, np.uint16)
    rgb[..., 0] = 1000
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb, photometric="rgb")
    px = load_image(tmp_path / "rgb16.tif", NO_BANNER).pixels
    assert px.dtype == np.uint16
    assert int(px[0, 0]) == round(0.299 * 1000 + 0.587 * 40000 + 0.114 * 40000)


# --------------------------------------------------------------------------- Pillow formats
def test_png_8_and_16_bit(tmp_path):
    a = micrograph()
    Image.fromarray(a).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.metadata["format"] == "PNG"
    np.testing.assert_array_equal(img.pixels, a)
    a16 = (np.arange(100 * 120) * 5).reshape(100, 120).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "a16.png")
    img16 = load_image(tmp_path / "a16.png", NO_BANNER)
    assert img16.pixels.dtype == np.uint16
    np.testing.assert_array_equal(img16.pixels, a16)


def test_bmp_and_rgb_png(tmp_path):
    a = micrograph(seed=5)
    Image.fromarray(a).save(tmp_path / "a.bmp")
    np.testing.assert_array_equal(load_image(tmp_path / "a.bmp").pixels, a)
    rgb = np.stack([a, a // 2, 255 - a], -1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    px = load_image(tmp_path / "rgb.png", NO_BANNER).pixels
    expected = np.rint(0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2])
    assert px.ndim == 2 and np.max(np.abs(px - expected)) <= 1


def test_jpeg(tmp_path):
    a = micrograph(seed=6)
    Image.fromarray(a).save(tmp_path / "a.jpg", quality=95)
    img = load_image(tmp_path / "a.jpg")
    assert img.pixels.dtype == np.uint8 and img.pixels.shape == a.shape
    assert np.mean(np.abs(img.pixels.astype(float) - a)) < 4
    assert img.analysed_height_px == a.shape[0]


def test_format_from_content_not_name(tmp_path):
    a = micrograph()
    Image.fromarray(a).save(tmp_path / "really_png.tif", format="PNG")
    np.testing.assert_array_equal(load_image(tmp_path / "really_png.tif").pixels, a)


# --------------------------------------------------------------------------- bad inputs
def test_missing_and_directory(tmp_path):
    expect_error(tmp_path / "nope.tif", "file not found")
    (tmp_path / "dir.tif").mkdir()
    expect_error(tmp_path / "dir.tif", "not a regular file")


def test_empty_file(tmp_path):
    (tmp_path / "empty.tif").write_bytes(b"")
    expect_error(tmp_path / "empty.tif", "empty file (0 bytes)")


def test_truncated_tiff(tmp_path):
    tifffile.imwrite(tmp_path / "full.tif", micrograph())
    data = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "half.tif").write_bytes(data[: len(data) // 2])
    expect_error(tmp_path / "half.tif", "truncated")


def test_truncated_tiff_ifd_at_end(tmp_path, sem_data_or_synthetic):
    """Strips first, IFD at the end (as many SEMs write): cutting it loses the directory."""
    data = sem_data_or_synthetic.read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputImageError) as info:
        load_image(tmp_path / "cut.tif")
    assert info.value.path == tmp_path / "cut.tif"


def test_corrupt_compressed_strip(tmp_path):
    tifffile.imwrite(tmp_path / "lzw.tif", micrograph(), compression="lzw")
    with tifffile.TiffFile(tmp_path / "lzw.tif") as tif:
        off, n = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    data = bytearray((tmp_path / "lzw.tif").read_bytes())
    data[off:off + n] = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()
    (tmp_path / "bad.tif").write_bytes(bytes(data))
    expect_error(tmp_path / "bad.tif", "cannot decode TIFF pixels")


def test_text_renamed_tif(tmp_path):
    (tmp_path / "notes.tif").write_text("batch 12: looked fine under the microscope\n")
    expect_error(tmp_path / "notes.tif", "not a recognised image format")


def test_truncated_png(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(micrograph()).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    expect_error(tmp_path / "cut.png", "cannot decode PNG pixels")


def test_absurd_header_fails_fast_without_allocating(tmp_path):
    p = raw_tiff(tmp_path / "huge.tif", 40000, 40000)  # claims 1.6 GB of pixels, file is ~120 B
    tracemalloc.start()
    try:
        expect_error(p, "exceeds imaging.max_side_px=30000")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"peak allocation {peak / 2**20:.1f} MiB"


def test_header_beyond_file_is_truncated(tmp_path):
    p = raw_tiff(tmp_path / "claims.tif", 3000, 2000, data=b"\x00" * 1000)
    expect_error(p, "truncated")


def test_zero_size(tmp_path):
    expect_error(raw_tiff(tmp_path / "zero.tif", 0, 0), "zero size (0x0 px)")


def test_max_side_from_config(tmp_path):
    tifffile.imwrite(tmp_path / "wide.tif", np.zeros((50, 200), np.uint8))
    expect_error(tmp_path / "wide.tif", "200x50 px exceeds imaging.max_side_px=100",
                 ImagingConfig(max_side_px=100))


def test_float_nan_rejected(tmp_path):
    a = np.ones((30, 30), np.float32)
    a[3, 4] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", a)
    expect_error(tmp_path / "nan.tif", "NaN")


def test_hand_written_tiff_reads(tmp_path):
    p = raw_tiff(tmp_path / "tiny.tif", 4, 2, data=bytes(range(8)))
    np.testing.assert_array_equal(load_image(p, NO_BANNER).pixels, [[0, 1, 2, 3], [4, 5, 6, 7]])


# --------------------------------------------------------------------------- banner: config modes
def test_banner_modes(tmp_path):
    a = with_banner(micrograph())
    tifffile.imwrite(tmp_path / "b.tif", a)
    assert load_image(tmp_path / "b.tif").analysed_height_px == 480
    assert load_image(tmp_path / "b.tif", NO_BANNER).analysed_height_px == a.shape[0]
    fixed = ImagingConfig(banner="fixed", banner_rows=100)
    assert load_image(tmp_path / "b.tif", fixed).analysed_height_px == a.shape[0] - 100
    img = load_image(tmp_path / "b.tif", fixed)
    assert img.pixels.shape == a.shape  # full frame kept
    expect_error(tmp_path / "b.tif", "leaves no rows", ImagingConfig(banner="fixed", banner_rows=a.shape[0]))


def test_banner_config_validation():
    with pytest.raises(ValidationError, match="banner_rows"):
        ImagingConfig(banner="fixed")
    with pytest.raises(ValidationError, match="pixel_size_nm"):
        ImagingConfig(force_pixel_size=True)


# --------------------------------------------------------------------------- banner: synthetic
@pytest.mark.parametrize("bg, fg", [(0, 255), (255, 0), (40, 230)])
@pytest.mark.parametrize("frame", [True, False])
def test_synthetic_banner_found_exactly(bg, fg, frame):
    a = with_banner(micrograph(), bg=bg, fg=fg, frame=frame)
    assert detect_banner(a) == 480


def test_frame_only_banner():
    """A bar with only frame lines (no text) is still a bar."""
    band = np.zeros((40, 640), np.uint8)
    band[:2] = 255
    band[-2:] = 255
    assert detect_banner(np.vstack([micrograph(), band])) == 480


def test_synthetic_banner_16bit():
    a = with_banner(micrograph(dtype=np.uint16))
    assert a.dtype == np.uint16
    assert detect_banner(a) == 480


def test_synthetic_banner_in_jpeg(tmp_path):
    a = with_banner(micrograph(h=477))  # boundary not on a JPEG block edge
    Image.fromarray(a).save(tmp_path / "b.jpg", quality=90)
    h = load_image(tmp_path / "b.jpg").analysed_height_px
    assert 477 - 3 <= h <= 477 + 1


def test_banner_with_a_line_of_image_below():
    """Zeiss files carry one row of image under the bar; the bar is still found."""
    img = micrograph(h=481)
    a = np.vstack([img[:480], banner(640), img[480:]])
    assert detect_banner(a) == 480


def small_dots(shape, *, seed=2, n=120, value=230.0):
    """Text-sized bright dots (radius 3 px)."""
    rng = np.random.default_rng(seed)
    m = np.zeros(shape, bool)
    for _ in range(n):
        rr, cc = disk((rng.uniform(0, shape[0]), rng.uniform(0, shape[1])), 3, shape=shape)
        m[rr, cc] = True
    return m


@pytest.mark.parametrize("case", ["noise_particles", "touch_bottom", "noiseless_touch_bottom",
                                  "dark_bottom", "clipped_dark_bottom_with_particles",
                                  "clipped_black_bottom_small_dots", "black_bottom_big_particles",
                                  "noiseless_small_dots", "noiseless_dots_scan_line",
                                  "tall_text_block", "thin_strip", "uniform"])
def test_no_banner_nothing_removed(case):
    if case == "noise_particles":
        a = micrograph()
    elif case == "touch_bottom":
        a = micrograph(touch_bottom=True)
    elif case == "noiseless_touch_bottom":
        a = micrograph(touch_bottom=True, noise=0)
    elif case == "dark_bottom":
        a = micrograph().astype(float)
        a[-120:] = a[-120:] * 0.12
        a = a.astype(np.uint8)
    elif case == "clipped_dark_bottom_with_particles":
        a = micrograph(touch_bottom=True).astype(float)
        rng = np.random.default_rng(1)
        dark = np.clip(rng.normal(0, 3, (100, a.shape[1])), 0, None)
        a[-100:] = np.where(a[-100:] > 150, a[-100:], dark)
        a = np.clip(a, 0, 255).astype(np.uint8)
    elif case == "clipped_black_bottom_small_dots":
        # a very dark clipped region (88 % exact zeros) holding text-sized bright dots
        a = micrograph().astype(float)
        rng = np.random.default_rng(3)
        dark = np.clip(rng.normal(-3.5, 3, (90, a.shape[1])), 0, None)
        dark[small_dots(dark.shape)] = 230
        a[-90:] = dark
        a = np.clip(a, 0, 255).astype(np.uint8)
    elif case == "black_bottom_big_particles":
        # exactly black bottom (e.g. a hole in the support film) with particles on it
        a = micrograph()
        bottom = np.zeros((80, a.shape[1]), np.uint8)
        for cx in (60, 200, 330, 500):
            rr, cc = disk((40, cx), 15, shape=bottom.shape)
            bottom[rr, cc] = 210
        a[-80:] = bottom
    elif case == "noiseless_small_dots":
        a = np.full((400, 600), 90, np.uint8)
        a[small_dots(a.shape, n=600)] = 220
    elif case == "noiseless_dots_scan_line":
        # noise-free render with one noisy scan line: the rows above it are not image-like
        a = np.full((400, 600), 90, np.uint8)
        a[small_dots(a.shape, n=60)] = 220
        a[300] = np.random.default_rng(4).integers(0, 256, 600)
    elif case == "tall_text_block":
        # a bar-like block taller than 35 % of the frame is not an info banner
        a = np.vstack([micrograph(h=200)] + [banner(640, bg=0, fg=255, frame=False)] * 4)
    elif case == "thin_strip":
        # 4 rows (white line + black) are below the 6-row minimum: left alone
        a = micrograph()
        a[-4:] = 0
        a[-4] = 255
    else:
        a = np.full((300, 400), 77, np.uint8)
    assert detect_banner(a) == a.shape[0]


def test_load_array():
    a = with_banner(micrograph())
    img = load_array(a, name="synthetic_01", pixel_size_nm=2.5)
    assert img.name == "synthetic_01"
    assert (img.pixel_size.source, img.pixel_size_nm) == ("config", 2.5)
    assert img.analysed_height_px == 480
    assert load_array(a, cfg=ImagingConfig(pixel_size_nm=4.0)).pixel_size.source == "config"
    assert load_array(a).pixel_size.source == "none"
    rgb = load_array(np.stack([a, a, a], -1), cfg=NO_BANNER)
    np.testing.assert_array_equal(rgb.pixels, a)
    with pytest.raises(InputImageError, match="2-D"):
        load_array(np.zeros(10))
    with pytest.raises(InputImageError, match="zero size"):
        load_array(np.zeros((0, 5), np.uint8))


def test_config_pixel_size_and_force(tmp_path):
    Image.fromarray(micrograph()).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png", ImagingConfig(pixel_size_nm=3.0)).pixel_size.source == "config"


# --------------------------------------------------------------------------- banner: real images
def _zeiss_frame_line(px: np.ndarray) -> int:
    """Independent ground truth: first row of the lower half that is >= 99 % white (bar frame)."""
    H = px.shape[0]
    for r in range(H // 2, H):
        if np.mean(px[r] == 255) >= 0.99:
            return r
    raise AssertionError("no frame line")


@pytest.mark.real_data
def test_real_banners(sem_data):
    files = sorted((sem_data / "konstanz").glob("*.tif"))
    assert len(files) == 15
    for f in files:
        img = load_image(f)
        line = _zeiss_frame_line(img.pixels)
        h = img.analysed_height_px
        assert line - 3 <= h <= line, (f.name, h, line)
        assert img.pixel_size.source == "zeiss"
    jeol = load_image(sem_data / "jeol" / "A2h_01.tif")
    area_h = int(jeol.metadata["image_area_px"].split("x")[1])  # from the MakerNote: 960
    assert area_h < jeol.height_px
    assert area_h - 3 <= jeol.analysed_height_px <= area_h


@pytest.mark.real_data
@pytest.mark.parametrize("quality", [75, 50])
def test_real_banners_survive_jpeg(sem_data, tmp_path, quality):
    """Exported as JPEG the bar is found at the same row as in the TIFF."""
    for f in [sem_data / "konstanz" / "GM_116_21.tif", sem_data / "konstanz" / "GM_59_23.tif",
              sem_data / "jeol" / "A2h_01.tif"]:
        tif = load_image(f)
        Image.fromarray(tif.pixels).save(tmp_path / "x.jpg", quality=quality)
        assert load_image(tmp_path / "x.jpg").analysed_height_px == tif.analysed_height_px, f.name


@pytest.mark.real_data
def test_real_micrographs_without_banner_untouched(sem_data):
    """The real images cut above their bar, plus a darkened bottom, lose nothing."""
    for f in [sem_data / "konstanz" / "GM_59_20.tif", sem_data / "konstanz" / "GM_124_03.tif",
              sem_data / "jeol" / "A2h_01.tif"]:
        img = load_image(f)
        crop = img.pixels[: img.analysed_height_px]
        assert detect_banner(crop) == crop.shape[0], f.name
        dark = crop.astype(float)
        dark[-150:] *= 0.1
        dark = dark.astype(np.uint8)
        assert detect_banner(dark) == crop.shape[0], f.name


@pytest.fixture
def sem_data_or_synthetic(tmp_path) -> Path:
    """A real JEOL TIFF when present (strips before the IFD); else a synthetic one like it."""
    from qcloop.data import sem_data_dir

    d = sem_data_dir()
    if d is not None and (d / "jeol" / "A2h_01.tif").is_file():
        return d / "jeol" / "A2h_01.tif"
    a = micrograph()
    # write strips first, IFD at the end, as the microscope does
    raw = a.tobytes()
    ifd_off = 8 + len(raw)
    tags = [(256, 4, 1, a.shape[1]), (257, 4, 1, a.shape[0]), (258, 3, 1, 8), (259, 3, 1, 1),
            (262, 3, 1, 1), (273, 4, 1, 8), (278, 4, 1, a.shape[0]), (279, 4, 1, len(raw))]
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_off) + raw + struct.pack("<H", len(tags)))
    for code, typ, n, value in tags:
        out += struct.pack("<HHIHH", code, typ, n, value, 0) if typ == 3 else struct.pack("<HHII", code, typ, n, value)
    out += struct.pack("<I", 0)
    p = tmp_path / "ifd_last.tif"
    p.write_bytes(bytes(out))
    return p


@pytest.mark.parametrize("fmt", ["tif-lzw", "tif-palette", "PNG", "JPEG", "BMP"])
def test_corrupted_files_raise_only_input_image_error(tmp_path, fmt):
    """Random byte damage and truncation: the file loads or fails with InputImageError, nothing else."""
    a = micrograph(h=96, w=128)
    buf = io.BytesIO()
    if fmt == "tif-lzw":
        tifffile.imwrite(buf, a, compression="lzw")
    elif fmt == "tif-palette":
        tifffile.imwrite(buf, a, photometric="palette", colormap=np.stack([np.arange(256) * 257] * 3).astype(np.uint16))
    else:
        Image.fromarray(a).save(buf, format=fmt)
    data = buf.getvalue()
    rng = np.random.default_rng(7)
    p = tmp_path / "damaged.img"
    failures = 0
    for i in range(40):
        d = bytearray(data)
        if i % 2:
            for _ in range(int(rng.integers(1, 30))):
                d[int(rng.integers(0, min(len(d), 512)))] = int(rng.integers(0, 256))
        else:
            d = d[: int(rng.integers(1, len(d)))]
        p.write_bytes(bytes(d))
        try:
            load_image(p)
        except InputImageError as err:
            assert err.path == p and err.reason
            failures += 1
    assert failures > 0
