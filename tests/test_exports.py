"""``qcloop analyze --export roi|coco``: read the files back with roifile and pycocotools and
compare them with the particle masks the pipeline made."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from skimage.draw import polygon as fill_polygon

from qcloop.cli import main
from qcloop.config import Settings
from qcloop.exports import label_rles, particle_polygons
from qcloop.pipeline import Pipeline
from qcloop.synth import SynthSpec, generate_image, write_image

roifile = pytest.importorskip("roifile")
mask_utils = pytest.importorskip("pycocotools.mask")

SPEC = SynthSpec(width_px=384, height_px=320, pixel_size_nm=2.0, mean_ecd_nm=45.0, size_cv=0.1,
                 class_mix={"sphere": 0.5, "dumbbell": 0.3, "cube": 0.2}, coverage=0.22,
                 touching_fraction=0.3, banner=True, banner_rows=24)
#: a rasterised ROI polygon (pixel centres inside) against its mask: polygons have no holes and
#: keep the largest of diagonally touching pieces, so a few pixels may differ
MIN_ROI_IOU = 0.9
MIN_ROI_AGREEMENT = 0.995  # share of all analysed pixels on which ROI raster and masks agree


def rasterise(xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """ImageJ polygon (x, y) -> mask of the pixels whose centre lies inside."""
    out = np.zeros(shape, bool)
    rr, cc = fill_polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape)
    out[rr, cc] = True
    return out


def check_export(out: Path, image: Path) -> int:
    """Compare the ROI zip and the COCO annotations of ``image`` with a fresh analysis."""
    result = Pipeline.from_settings(Settings(), embed=False).analyze(image)
    labels = result.masks.labels
    ids = result.particles["particle_id"].astype(int).tolist()
    assert ids, "the image has particles"

    # ImageJ ROI set: one polygon per particle, named by particle id
    zpath = out / "rois" / f"{image.stem}.zip"
    rois = roifile.roiread(zpath)
    rois = rois if isinstance(rois, list) else [rois]
    assert sorted(int(r.name) for r in rois) == sorted(ids)
    assert len(zipfile.ZipFile(zpath).namelist()) == len(ids)
    raster = np.zeros(labels.shape, np.int64)
    for roi in rois:
        assert roi.roitype == roifile.ROI_TYPE.POLYGON
        pid = int(roi.name)
        m = rasterise(roi.coordinates(), labels.shape)
        truth = labels == pid
        iou = (m & truth).sum() / (m | truth).sum()
        assert iou >= MIN_ROI_IOU, (pid, iou)
        raster[m] = pid
    assert (raster == labels).mean() >= MIN_ROI_AGREEMENT

    # COCO: RLE over the full frame (banner rows included) decodes to the exact masks
    doc = json.loads((out / "coco.json").read_text())
    (img,) = [i for i in doc["images"] if i["file_name"] == image.name]
    assert (img["height"], img["width"]) == result.image.pixels.shape
    anns = [a for a in doc["annotations"] if a["image_id"] == img["id"]]
    assert sorted(a["particle_id"] for a in anns) == sorted(ids)
    cats = {c["id"]: c["name"] for c in doc["categories"]}
    table = result.particles.set_index("particle_id")
    for a in anns:
        m = mask_utils.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()})
        truth = np.zeros(result.image.pixels.shape, bool)
        truth[: labels.shape[0]] = labels == a["particle_id"]
        assert np.array_equal(m.astype(bool), truth), a["particle_id"]
        assert a["area"] == truth.sum() == table.loc[a["particle_id"], "area_px"]
        x, y, w, h = a["bbox"]
        rows, cols = np.nonzero(truth)
        assert (x, y, x + w, y + h) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        assert cats[a["category_id"]] == "particle" and a["iscrowd"] == 0

    # images.csv: area fraction = particle pixels / analysed pixels (banner excluded)
    row = pd.read_csv(out / "images.csv").set_index("image").loc[image.stem]
    assert row["area_fraction"] == pytest.approx(np.count_nonzero(labels) / labels.size)
    assert row["area_fraction"] == pytest.approx(result.particles["area_px"].sum() / labels.size)
    assert 0.02 < row["area_fraction"] < 0.8
    return len(ids)


def test_analyze_export_roi_and_coco_read_back(tmp_path):
    paths = [write_image(tmp_path / f"S_{seed}.tif", generate_image(SPEC, seed))[0] for seed in (3, 4)]
    out = tmp_path / "out"
    assert main(["analyze", *map(str, paths), "--out", str(out), "--export", "roi", "--export", "coco"]) == 0
    n = sum(check_export(out, p) for p in paths)
    doc = json.loads((out / "coco.json").read_text())
    assert len(doc["annotations"]) == n == len(pd.read_csv(out / "particles.csv"))
    assert [a["id"] for a in doc["annotations"]] == list(range(1, n + 1))
    # the dumbbells are single annotations (one mask per particle, not per lobe)
    assert any(a["lobes"] == 2 for a in doc["annotations"])


@pytest.mark.real_data
def test_export_on_a_real_sem_image(sem_data, tmp_path):
    image = sem_data / "konstanz" / "GM_116_20.tif"
    out = tmp_path / "out"
    assert main(["analyze", str(image), "--out", str(out), "--export", "roi", "--export", "coco"]) == 0
    assert check_export(out, image) > 100


def test_polygons_and_rles_of_hand_made_labels():
    labels = np.zeros((6, 8), np.int32)
    labels[2, 3] = 1          # one pixel
    labels[3:5, 1:3] = 2      # a 2 x 2 square
    labels[0, 5:8] = 3        # a bar on the top edge
    polys = particle_polygons(labels)
    # the one-pixel particle: a diamond through the midpoints of its sides, in ImageJ coordinates
    assert sorted(map(tuple, polys[1])) == sorted([(3.5, 3.0), (3.0, 2.5), (3.5, 2.0), (4.0, 2.5)])
    for k, xy in polys.items():
        assert np.array_equal(rasterise(xy, labels.shape), labels == k), k
    rles = label_rles(labels, height=9)
    for k, rle in rles.items():
        m = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert m.shape == (9, 8) and np.array_equal(m[:6].astype(bool), labels == k) and not m[6:].any()
    assert label_rles(np.zeros((3, 3), np.int32)) == {} and particle_polygons(np.zeros((3, 3), np.int32)) == {}
