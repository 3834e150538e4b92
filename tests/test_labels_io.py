"""Label TIFFs: pages, dtypes, marker, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from qcloop.labels_io import is_label_tiff, label_dtype, read_label_tiff, write_label_tiff


def test_two_pages_round_trip_as_uint16(tmp_path):
    lab = np.zeros((20, 30), np.int32)
    lab[2:8, 3:9], lab[10:15, 10:25] = 1, 2
    lobes = np.zeros_like(lab)
    lobes[10:15, 10:17], lobes[10:15, 17:25], lobes[2:8, 3:9] = 2, 3, 1
    path = write_label_tiff(tmp_path / "sub" / "a.tif", lab, lobes)
    back = read_label_tiff(path)
    assert back.labels.dtype == back.lobe_labels.dtype == np.uint16
    assert np.array_equal(back.labels, lab) and np.array_equal(back.lobe_labels, lobes)
    assert is_label_tiff(path)
    with tifffile.TiffFile(path) as t:
        assert len(t.pages) == 2
    assert np.array_equal(tifffile.imread(path, key=0), lab)  # what other tools read first


def test_uint32_beyond_65535_and_limits(tmp_path):
    assert label_dtype(65535) == np.uint16 and label_dtype(65536) == np.uint32
    with pytest.raises(ValueError, match="uint32"):
        label_dtype(2 ** 32)
    lab = np.arange(70000, dtype=np.int64).reshape(100, 700)
    back = read_label_tiff(write_label_tiff(tmp_path / "big.tif", lab))
    assert back.labels.dtype == np.uint32 and np.array_equal(back.labels, lab) and back.lobe_labels is None


@pytest.mark.parametrize("labels, lobes, match", [
    (np.zeros((4, 4), float), None, "integer"),
    (-np.ones((4, 4), int), None, ">= 0"),
    (np.zeros((4, 4), int), np.zeros((4, 5), int), "shape"),
])
def test_bad_label_images_are_rejected(tmp_path, labels, lobes, match):
    with pytest.raises(ValueError, match=match):
        write_label_tiff(tmp_path / "x.tif", labels, lobes)


def test_plain_images_are_not_label_tiffs(tmp_path):
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((5, 5), np.uint8))
    (tmp_path / "junk.tif").write_bytes(b"not a tiff")
    assert not is_label_tiff(tmp_path / "img.tif") and not is_label_tiff(tmp_path / "junk.tif")
    tifffile.imwrite(tmp_path / "f.tif", np.zeros((5, 5), np.float32))
    with pytest.raises(ValueError, match="not a label image"):
        read_label_tiff(tmp_path / "f.tif")
