"""``qcloop eval`` and ``qcloop analyze --labels`` end to end, on real TIFF files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

from qcloop.cli import main
from qcloop.evaluate import evaluate_labels
from qcloop.labels_io import read_label_tiff
from qcloop.synth import SynthSpec, generate_image, write_image

SPEC = SynthSpec(width_px=320, height_px=256, pixel_size_nm=2.0, mean_ecd_nm=50.0, size_cv=0.08,
                 class_mix={"sphere": 1, "dumbbell": 1, "cube": 1}, coverage=0.2, touching_fraction=0.3,
                 overlap_fraction=0.0, banner=True, banner_rows=24)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    for seed in (1, 2):
        write_image(d / f"S_{seed}.tif", generate_image(SPEC, seed), write_labels=True)
    return d


@pytest.fixture(scope="module")
def analysed(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysed")
    assert main(["analyze", str(synth_dir / "S_1.tif"), str(synth_dir / "S_2.tif"), "--out", str(out),
                 "--labels"]) == 0
    return out


def test_analyze_labels_round_trip_with_particles_csv(analysed):
    particles = pd.read_csv(analysed / "particles.csv")
    for name, table in particles.groupby("image"):
        pages = read_label_tiff(analysed / "labels" / f"{name}.tif")
        lab, lobes = pages.labels, pages.lobe_labels
        assert lab.dtype == np.uint16 and lobes is not None and lobes.shape == lab.shape == (256 - 24, 320)
        ids = table["particle_id"].to_numpy()
        assert sorted(set(np.unique(lab)) - {0}) == sorted(ids)
        area = np.bincount(lab.ravel())[ids]
        assert np.array_equal(area, table["area_px"].to_numpy())
        rr, cc = np.indices(lab.shape)
        cy = np.bincount(lab.ravel(), weights=rr.ravel())[ids] / area
        cx = np.bincount(lab.ravel(), weights=cc.ravel())[ids] / area
        assert np.allclose(cx, table["centroid_x_px"], atol=1e-6) and np.allclose(cy, table["centroid_y_px"], atol=1e-6)
        # lobes tile the particles: each lobe inside one particle, as many lobes as particles.csv says
        assert np.array_equal(lobes > 0, lab > 0)
        pairs = np.unique(np.stack([lobes[lobes > 0], lab[lobes > 0]]), axis=1)
        assert len(np.unique(pairs[0])) == pairs.shape[1]
        n_lobes = np.bincount(pairs[1], minlength=lab.max() + 1)[ids]
        assert np.array_equal(n_lobes, table["lobes"].to_numpy())


def test_eval_of_label_images_equals_the_library_scores(analysed, synth_dir, tmp_path, capsys):
    rc = main(["eval", str(analysed / "labels"), "--truth", str(synth_dir), "--out", str(tmp_path),
               "--min-area", "20"])
    assert rc == 0
    table = pd.read_csv(tmp_path / "eval.csv")
    assert table["image"].tolist() == ["S_1", "S_2", "all (pooled)", "mean of images"]
    for name in ("S_1", "S_2"):
        pred = read_label_tiff(analysed / "labels" / f"{name}.tif").labels
        truth = read_label_tiff(synth_dir / f"{name}_labels.tif").labels
        s = evaluate_labels(truth, pred, min_area=20)
        row = table.set_index("image").loc[name]
        assert (row.n_truth, row.tp, row.fp, row.fn) == (s.n_truth, s.tp[0], s.fp[0], s.fn[0])
        assert row.f1 == pytest.approx(s.f1) and row.mean_iou == pytest.approx(s.mean_iou)
    assert table.loc[0, "f1"] > 0.5  # the pipeline finds these bright spheres/cubes
    out = capsys.readouterr().out
    assert "all (pooled)" in out and "eval.csv" in out


def test_eval_analyses_images_and_skips_the_truth_files_beside_them(analysed, synth_dir, tmp_path):
    assert main(["eval", str(synth_dir), "--truth", str(synth_dir), "--out", str(tmp_path), "--min-area", "20"]) == 0
    direct = pd.read_csv(tmp_path / "eval.csv")
    assert direct["image"].tolist()[:2] == ["S_1", "S_2"]  # the *_labels.tif were not scored themselves
    assert direct["seconds"].iloc[:2].gt(0).all()
    assert main(["eval", str(analysed / "labels"), "--truth", str(synth_dir), "--out", str(tmp_path / "b"),
                 "--min-area", "20"]) == 0
    from_labels = pd.read_csv(tmp_path / "b" / "eval.csv")
    cols = ["n_truth", "tp", "fp", "fn", "f1", "mean_iou"]
    pd.testing.assert_frame_equal(direct[cols], from_labels[cols])


def test_eval_hand_computed_binary_mask_truth(tmp_path, capsys):
    """A drawn binary mask (0/255, 1-px line between touching particles) vs a split prediction."""
    mask = np.zeros((12, 20), np.uint8)
    mask[0:4, 0:4] = 255  # A, 16 px
    mask[0:4, 5:9] = 255  # B, 16 px, kept apart from A by a 1-px line
    mask[8:11, 12:15] = 255  # C, 9 px
    mask[11, 0] = 255  # a 1 px sliver
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    truth_dir.mkdir()
    pred_dir.mkdir()
    tifffile.imwrite(truth_dir / "img_m.tif", mask)
    pred = np.zeros((12, 20), np.uint16)
    pred[0:4, 0:3], pred[0:4, 3] = 1, 2  # A split 12 + 4 px: IoU 0.75 and 0.25
    pred[0:4, 5:9] = 3  # B perfect; C missing
    pred[6, 18] = 4  # a 1 px speck
    tifffile.imwrite(pred_dir / "img.tif", pred)  # a foreign label image: no qcloop marker
    assert main(["eval", str(pred_dir / "img.tif"), "--truth", str(truth_dir), "--kind", "labels",
                 "--out", str(tmp_path), "--min-area", "4"]) == 0
    row = pd.read_csv(tmp_path / "eval.csv").iloc[0]
    assert (row.n_truth, row.tp, row.fp, row.fn, row.dropped_truth, row.ignored_pred) == (3, 2, 1, 1, 1, 1)
    assert (row.precision, row.recall, row.f1) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert row.mean_iou == pytest.approx((0.75 + 1) / 2)
    # F1 at 0.50..0.75: TP 2, FP 1, FN 1 -> 2/3; at 0.80..0.95: TP 1, FP 2, FN 2 -> 1/3
    assert row.f1_mean == pytest.approx((6 * 2 / 3 + 4 * 1 / 3) / 10)
    assert row.count_ratio == pytest.approx(1.0)


def test_eval_reports_missing_truth_and_bad_arguments(synth_dir, tmp_path, capsys):
    other = tmp_path / "empty"
    other.mkdir()
    # S_1_labels.tif given as PRED is S_1's truth: not scored itself
    assert main(["eval", str(synth_dir / "S_1_labels.tif"), str(synth_dir / "S_1.tif"), "--truth", str(synth_dir),
                 "--out", str(tmp_path)]) == 0
    assert pd.read_csv(tmp_path / "eval.csv")["image"].tolist() == ["S_1", "all (pooled)", "mean of images"]
    # one PRED without truth: reported, the others scored, exit code 1
    (tmp_path / "lonely.tif").write_bytes((synth_dir / "S_2.tif").read_bytes())
    assert main(["eval", str(synth_dir / "S_1.tif"), str(tmp_path / "lonely.tif"), "--truth", str(synth_dir),
                 "--out", str(tmp_path / "o")]) == 1
    failed = pd.read_csv(tmp_path / "o" / "eval_failed.csv")
    assert failed["image"].tolist() == ["lonely"] and "no truth for lonely" in failed["reason"][0]
    assert main(["eval", str(synth_dir / "S_1.tif"), "--truth", str(other), "--out", str(tmp_path)]) == 2
    assert "no truth for S_1" in capsys.readouterr().err
    assert main(["eval", str(synth_dir), "--truth", str(tmp_path / "nope")]) == 2
    assert main(["eval", str(synth_dir), "--truth", str(synth_dir), "--min-area", "-1"]) == 2


@pytest.mark.real_data
def test_eval_on_the_bam_sem_images_and_their_drawn_masks(sem_data, tmp_path):
    """The real naming rule (<id>.tif ↔ <id>_m.tif), binary masks, banner rows cut off."""
    from skimage.measure import label

    from qcloop.imaging import load_image

    root = sem_data / "bam_tio2"
    if not (root / "masks").is_dir():
        pytest.skip("bam_tio2/ not in the SEM data folder")
    images = sorted((root / "sem").glob("*.tif"))[:2]
    assert main(["eval", *map(str, images), "--truth", str(root / "masks"), "--min-area", "100",
                 "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "eval.csv").set_index("image")
    for img in images:
        mask = tifffile.imread(root / "masks" / f"{img.stem}_m.tif")
        rows = load_image(img).analysed_height_px  # the rows above the Zeiss banner
        areas = np.bincount(label(mask[:rows] > 0, connectivity=1).ravel())[1:]
        assert table.loc[img.stem, "n_truth"] == (areas >= 100).sum()
        assert table.loc[img.stem, "n_pred"] > 0 and table.loc[img.stem, "seconds"] > 0
