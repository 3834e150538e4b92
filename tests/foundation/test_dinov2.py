"""DINOv2 embedder: crop preprocessing, batching, pooled mode, spec, preprocessing selection."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch", reason="needs the 'foundation' extra (torch)")
pytest.importorskip("transformers", reason="needs transformers")
pytest.importorskip("segment_anything", reason="needs segment-anything")

from qcloop.config import Dinov2Config, PipelineConfig  # noqa: E402
from qcloop.embed.dinov2 import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    Candidate,
    Dinov2Embedder,
    centroid_separation,
    select_preprocessing,
    spec_for,
    square_crop,
)
from qcloop.records import ParticleMasks  # noqa: E402

F = torch.nn.functional


def _shapes(n_each: int = 3, seed: int = 0):
    """(grey, mask) crops of discs and squares with random texture, and their classes."""
    rng = np.random.default_rng(seed)
    crops, classes = [], []
    for k in range(n_each):
        s = 24 + 4 * k
        yy, xx = np.mgrid[:s, :s]
        disc = (yy - s / 2 + 0.5) ** 2 + (xx - s / 2 + 0.5) ** 2 <= (s / 2) ** 2
        crops.append((rng.random((s, s)), disc))
        classes.append("disc")
        square = np.zeros((s, s), bool)
        square[2:-2, 2:-2] = True
        crops.append((rng.random((s, s)), square))
        classes.append("square")
    return crops, classes


@pytest.fixture(scope="module")
def embedder(tiny_dinov2_cfg, tiny_dinov2_model):
    return Dinov2Embedder(tiny_dinov2_cfg, model=tiny_dinov2_model)


def test_embedder_from_config_through_get_embedder(tiny_dinov2_cfg):
    from qcloop.embed import get_embedder

    e = get_embedder(PipelineConfig(embedder="dinov2", dinov2=tiny_dinov2_cfg))
    assert e.spec == "dinov2:tiny-dinov2:crop:masked:bg0:cls:224"
    assert e.dim == 32


def test_specs_differ_per_preprocessing(tiny_dinov2_cfg):
    base = tiny_dinov2_cfg
    specs = {spec_for(base),
             spec_for(base.model_copy(update={"input": "mask"})),
             spec_for(base.model_copy(update={"background_value": 1.0})),
             spec_for(base.model_copy(update={"token": "cls+mean"})),
             spec_for(base.model_copy(update={"size_px": 448})),
             spec_for(base.model_copy(update={"mode": "pooled"})),
             spec_for(base.model_copy(update={"mode": "pooled", "pooled_scale": 2.0})),
             spec_for(base.model_copy(update={"model": "/models/dinov2-large"}))}
    assert len(specs) == 8
    assert spec_for(base.model_copy(update={"input": "mask"})) == "dinov2:tiny-dinov2:crop:mask:cls:224"


def test_square_crop_geometry(tiny_dinov2_cfg):
    grey = np.full((4, 8), 0.7)
    mask = np.zeros((4, 8), bool)
    mask[1:3, 2:6] = True
    sq = square_crop(grey, mask, tiny_dinov2_cfg.model_copy(update={"background_value": 0.25}))
    assert sq.shape == (8, 8)
    assert np.allclose(sq[3:5, 2:6], 0.7) and (sq == 0.7).sum() == 8  # centred, mask only
    assert np.allclose(sq[sq != np.float32(0.7)], 0.25)
    m = square_crop(grey, mask, tiny_dinov2_cfg.model_copy(update={"input": "mask"}))
    assert m.sum() == 8 and set(np.unique(m)) == {0.0, 1.0}


def test_crop_embedding_matches_a_manual_forward_pass(embedder, tiny_dinov2_model):
    crops, _ = _shapes(1)
    grey, mask = crops[0]
    sq = torch.from_numpy(square_crop(grey, mask, embedder.cfg))[None, None]
    x = F.interpolate(sq, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    x = (x.expand(-1, 3, -1, -1) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = tiny_dinov2_model(pixel_values=x).last_hidden_state[0, 0].numpy()
    np.testing.assert_allclose(embedder.embed_crops([crops[0]])[0], ref, rtol=1e-5, atol=1e-5)


def test_batching_does_not_change_embeddings(tiny_dinov2_cfg, tiny_dinov2_model):
    crops, _ = _shapes(3)
    one = Dinov2Embedder(tiny_dinov2_cfg.model_copy(update={"batch_size": 1}), model=tiny_dinov2_model)
    many = Dinov2Embedder(tiny_dinov2_cfg.model_copy(update={"batch_size": 4}), model=tiny_dinov2_model)
    a, b = one.embed_crops(crops), many.embed_crops(crops)
    assert a.shape == (6, 32) and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not np.allclose(a[0], a[1])  # different crops, different vectors


def test_masked_input_ignores_pixels_outside_the_mask(embedder, tiny_dinov2_cfg, tiny_dinov2_model):
    crops, _ = _shapes(1)
    grey, mask = crops[0]
    other = np.where(mask, grey, 1.0 - grey)  # change only outside-mask pixels
    v = embedder.embed_crops([(grey, mask), (other, mask)])
    np.testing.assert_allclose(v[0], v[1], atol=1e-6)
    as_mask = embedder.with_preprocessing(tiny_dinov2_cfg.model_copy(update={"input": "mask"}))
    w = as_mask.embed_crops([(grey, mask), (np.random.default_rng(5).random(grey.shape), mask)])
    np.testing.assert_allclose(w[0], w[1], atol=1e-6)  # mask input: grey values irrelevant
    assert not np.allclose(v[0], w[0])


def test_cls_plus_mean(embedder, tiny_dinov2_cfg):
    crops, _ = _shapes(1)
    both = embedder.with_preprocessing(tiny_dinov2_cfg.model_copy(update={"token": "cls+mean"}))
    v, vv = embedder.embed_crops(crops), both.embed_crops(crops)
    assert both.dim == 64 and vv.shape == (2, 64)
    np.testing.assert_allclose(vv[:, :32], v, rtol=1e-5, atol=1e-6)


def _masks_from_labels(labels: np.ndarray) -> ParticleMasks:
    n = int(labels.max())
    return ParticleMasks(labels=labels, lobe_labels=labels.copy(),
                         lobe_parent=np.arange(n + 1, dtype=np.int32), touches_border=np.zeros(n + 1, bool))


def test_pipeline_call_follows_particle_table_order(embedder, synth_image):
    labels = np.zeros((synth_image.analysed_height_px, synth_image.width_px), np.int32)
    labels[10:40, 10:50] = 1
    labels[100:130, 200:225] = 2
    labels[150:190, 30:60] = 3
    masks = _masks_from_labels(labels)
    table = pd.DataFrame({"particle_id": [3, 1, 2]})
    v = embedder(synth_image, masks, table)
    grey = synth_image.intensity()
    direct = embedder.embed_crops([(grey[150:190, 30:60], np.ones((40, 30), bool)),
                                   (grey[10:40, 10:50], np.ones((30, 40), bool))])
    np.testing.assert_allclose(v[:2], direct, rtol=1e-5, atol=1e-6)
    assert embedder(synth_image, masks, table.iloc[:0]).shape == (0, 32)


def test_pooled_single_window_matches_manual(tiny_dinov2_cfg, tiny_dinov2_model):
    e = Dinov2Embedder(tiny_dinov2_cfg.model_copy(update={"mode": "pooled"}), model=tiny_dinov2_model)
    assert e.spec == "dinov2:tiny-dinov2:pooled:x1:w518:patchmean"
    rng = np.random.default_rng(2)
    grey = rng.random((60, 80))
    labels = np.zeros((60, 80), np.int32)
    labels[3:20, 5:33] = 1      # spans patch rows 0-1, cols 0-2
    labels[40:60, 70:80] = 2    # in the padded corner patch
    v = e.embed_pooled(grey, labels, [2, 1])
    # manual: pad to 70 x 84 (5 x 6 patches) by edge replication, one forward pass
    x = torch.from_numpy(grey.astype(np.float32))[None, None]
    x = F.pad(x, (0, 4, 0, 10), mode="replicate").expand(-1, 3, -1, -1)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        tok = tiny_dinov2_model(pixel_values=x).last_hidden_state[0, 1:].reshape(5, 6, 32).numpy()
    for row, pid in enumerate([2, 1]):
        rr, cc = np.nonzero(labels == pid)
        ref = tok[rr // 14, cc // 14].mean(axis=0)
        np.testing.assert_allclose(v[row], ref, rtol=1e-4, atol=1e-5)


def test_pooled_windows(tiny_dinov2_cfg, tiny_dinov2_model):
    e = Dinov2Embedder(tiny_dinov2_cfg.model_copy(update={"mode": "pooled", "pooled_window_px": 28}),
                       model=tiny_dinov2_model)
    grey = np.random.default_rng(3).random((70, 84))  # 5 x 6 patches, windows of 2 x 2
    feats, scaled = e.patch_features(grey)
    assert feats.shape == (5, 6, 32) and scaled == (70, 84)
    x = torch.from_numpy(grey[:28, :28].astype(np.float32))[None, None].expand(-1, 3, -1, -1)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        tok = tiny_dinov2_model(pixel_values=x).last_hidden_state[0, 1:].reshape(2, 2, 32).numpy()
    np.testing.assert_allclose(feats[0, 0], tok[0, 0], rtol=1e-4, atol=1e-5)  # only window (0, 0)
    with pytest.raises(Exception, match="multiple of the model's patch size"):
        Dinov2Embedder(tiny_dinov2_cfg.model_copy(update={"mode": "pooled", "pooled_window_px": 30}),
                       model=tiny_dinov2_model)


def test_split_evenly():
    from qcloop.embed.dinov2 import split_evenly

    assert split_evenly(5, 2) == [(0, 2), (2, 3), (3, 5)]
    assert split_evenly(51, 37) == [(0, 26), (26, 51)]
    assert split_evenly(74, 37) == [(0, 37), (37, 74)]
    assert split_evenly(3, 37) == [(0, 3)]


def test_pooled_scale(tiny_dinov2_cfg, tiny_dinov2_model):
    e = Dinov2Embedder(tiny_dinov2_cfg.model_copy(update={"mode": "pooled", "pooled_scale": 2.0}),
                       model=tiny_dinov2_model)
    labels = np.zeros((40, 50), np.int32)
    labels[5:15, 5:15] = 1
    v = e.embed_pooled(np.random.default_rng(4).random((40, 50)), labels, [1])
    feats, scaled = e.patch_features(np.zeros((40, 50)))
    assert scaled == (80, 100) and feats.shape[:2] == (6, 8) and v.shape == (1, 32)


# --------------------------------------------------------------------------- selection


def test_centroid_separation():
    X = np.array([[1.0, 0], [2.0, 0], [0, 3.0], [0, 1.0]])
    assert centroid_separation(X, ["a", "a", "b", "b"]) == pytest.approx(np.sqrt(2))
    X3 = np.array([[1.0, 0], [0, 1.0], [-1.0, 0]])
    assert centroid_separation(X3, ["a", "b", "c"]) == pytest.approx((np.sqrt(2) * 2 + 2) / 3)
    with pytest.raises(ValueError):
        centroid_separation(X, ["a"] * 4)


def test_select_preprocessing(tiny_dinov2_cfg, embedder):
    crops, classes = _shapes(3)
    cands = [Candidate("masked", 0.0, "cls"), Candidate("mask", 0.0, "cls"), Candidate("masked", 1.0, "cls+mean")]
    res = select_preprocessing(crops, classes, tiny_dinov2_cfg, candidates=cands, embedder=embedder)
    t = res.table
    assert len(t) == 3 and list(t["separation"]) == sorted(t["separation"], reverse=True)
    assert res.best_spec == t["spec"].iloc[0]
    # the reported figure is the centroid separation of that preprocessing's embeddings
    emb = embedder.with_preprocessing(res.best).embed_crops(crops)
    assert centroid_separation(emb, classes) == pytest.approx(t["separation"].iloc[0], rel=1e-6)


def test_select_preprocessing_cli_on_mask_pairs(tmp_path, tiny_dinov2_dir, capsys):
    from PIL import Image

    from qcloop.cli import main

    crops, classes = _shapes(2)
    for k, ((grey, mask), cls) in enumerate(zip(crops, classes)):
        d = tmp_path / "labelled" / cls
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(grey * 255).astype(np.uint8)).save(d / f"p{k}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(d / f"p{k}.mask.png")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"pipeline:\n  dinov2:\n    model: {tiny_dinov2_dir}\n    device: cpu\n")
    out_csv = tmp_path / "rank.csv"
    assert main(["embed", "select-preprocessing", str(tmp_path / "labelled"), "--config", str(cfg),
                 "--out", str(out_csv)]) == 0
    out = capsys.readouterr().out
    assert "4 particles: disc 2, square 2" in out and "best: dinov2:tiny-dinov2:crop:" in out
    table = pd.read_csv(out_csv)
    assert len(table) == 8 and table["spec"].iloc[0] in out

    (tmp_path / "labelled" / "disc" / "p0.mask.png").unlink()
    assert main(["embed", "select-preprocessing", str(tmp_path / "labelled"), "--config", str(cfg)]) == 2
    assert "no mask p0.mask.png" in capsys.readouterr().err


def test_select_preprocessing_cli_on_exported_crops(tmp_path, tiny_dinov2_dir, capsys):
    """`qcloop crops export` → sort crops into classes → select-preprocessing re-segments the
    source image and embeds the labelled particles' masks."""
    pytest.importorskip("qcloop.measure", reason="needs the measurement stage (qcloop.measure)")
    import shutil

    from qcloop.cli import main
    from qcloop.synth import SynthSpec, generate_image, write_image

    spec = SynthSpec(class_mix={"sphere": 1.0, "dumbbell": 1.0}, width_px=320, height_px=256,
                     pixel_size_nm=4.0, mean_ecd_nm=120.0, n_particles=16, banner=True)
    img = write_image(tmp_path / "img" / "s_0.tif", generate_image(spec, 5))[0]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"pipeline:\n  dinov2:\n    model: {tiny_dinov2_dir}\n    device: cpu\n")
    crops = tmp_path / "crops"
    assert main(["crops", "export", str(img), "--out", str(crops), "--config", str(cfg)]) == 0
    index = pd.read_csv(crops / "crops.csv").sort_values("area_px")
    assert len(index) >= 4
    half = len(index) // 2
    for cls, names in (("small", index["crop"][:half]), ("large", index["crop"][half:])):
        (crops / cls).mkdir()
        for name in names:
            shutil.copy(crops / name, crops / cls / name)
    assert main(["embed", "select-preprocessing", str(crops), "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"{len(index)} particles: large {len(index) - half}, small {half}" in out
    assert "best: dinov2:tiny-dinov2:crop:" in out
