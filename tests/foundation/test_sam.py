"""SAM segmenter: windowed upsampling, batched decoder and prompted masks against the stock
SamPredictor; automatic mode against the stock SamAutomaticMaskGenerator; overlap resolution
and tiling."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the 'foundation' extra (torch)")
pytest.importorskip("segment_anything", reason="needs segment-anything")
pytest.importorskip("transformers", reason="needs transformers")

from segment_anything import SamAutomaticMaskGenerator, SamPredictor  # noqa: E402

from qcloop.config import ClassicalConfig, PipelineConfig  # noqa: E402
from qcloop.segment.sam import (  # noqa: E402
    MaskPiece,
    SamSegmenter,
    UpsampleGeometry,
    assign_to_tiles,
    attention_per_head,
    bilinear_matrix,
    decode_best,
    make_tiles,
    paint_masks,
    per_head_global_attention,
    remove_small_regions,
    to_rgb_uint8,
)

F = torch.nn.functional


def _full(p: MaskPiece, shape) -> np.ndarray:
    out = np.zeros(shape, bool)
    out[p.r0:p.r0 + p.mask.shape[0], p.c0:p.c0 + p.mask.shape[1]] = p.mask
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random blobs (something for SAM to look at), uint8 RGB."""
    from scipy import ndimage

    g = ndimage.gaussian_filter(np.random.default_rng(seed).random((h, w)), 6)
    g = (g - g.min()) / (g.max() - g.min())
    return np.repeat(np.rint(g * 255).astype(np.uint8)[:, :, None], 3, axis=2)


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("n_in,n_out", [(256, 1024), (768, 768), (1024, 1500), (700, 301), (5, 17)])
def test_bilinear_matrix_is_torch_interpolate(n_in, n_out):
    x = torch.randn(1, 1, n_in, 3, dtype=torch.float64)
    ref = F.interpolate(x, (n_out, 3), mode="bilinear", align_corners=False)[0, 0]
    ours = bilinear_matrix(n_in, n_out) @ x[0, 0].numpy()
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-12)


@pytest.mark.parametrize("orig", [(768, 1024), (1024, 768), (1500, 1100), (300, 420), (64, 64)])
def test_window_upsampling_equals_postprocess_masks(orig):
    """Sam.postprocess_masks (full image) vs UpsampleGeometry.window (only where positive)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    input_size = ResizeLongestSide.get_preprocess_shape(orig[0], orig[1], 1024)
    geom = UpsampleGeometry(256, 1024, input_size, orig)
    g = torch.Generator().manual_seed(sum(orig))
    for trial in range(4):
        logits = -torch.rand(256, 256, generator=g) * 3  # negative everywhere ...
        r, c, rad = (torch.randint(0, 200, (2,), generator=g).tolist() + [3 + 10 * trial])
        yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
        logits += 4 * torch.exp(-((yy - r) ** 2 + (xx - c) ** 2) / rad ** 2)  # ... but one blob
        if trial == 3:
            logits[5, 250] = 2.0  # an isolated positive low-res pixel far away
        # stock
        up = F.interpolate(logits[None, None], (1024, 1024), mode="bilinear", align_corners=False)
        up = up[..., : input_size[0], : input_size[1]]
        ref = (F.interpolate(up, orig, mode="bilinear", align_corners=False)[0, 0] > 0).numpy()
        w = geom.window(logits.numpy())
        ours = np.zeros(orig, bool) if w is None else _full(MaskPiece(w[0], w[1], w[2], 0.0), orig)
        assert (ours != ref).sum() <= 2, (ours != ref).sum()  # float rounding at logit 0 only
        if trial < 3:  # the low-res area estimate is close to the real area
            assert geom.area_estimate(logits.numpy()) == pytest.approx(ref.sum(), rel=0.4, abs=20)
    assert geom.window(-np.ones((256, 256), np.float32)) is None


# --------------------------------------------------------------------------- decoder


@pytest.mark.parametrize("prompt,multimask", [("point", True), ("point", False), ("box", True)])
def test_batched_decoder_equals_stock_mask_decoder(tiny_sam_model, prompt, multimask):
    model = tiny_sam_model
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(1, 256, 64, 64, generator=g)
    n = 7
    with torch.inference_mode():
        if prompt == "point":
            pts = (torch.rand(n, 1, 2, generator=g) * 1000, torch.ones(n, 1, dtype=torch.int))
            sparse, dense = model.prompt_encoder(points=pts, boxes=None, masks=None)
        else:
            xy = torch.rand(n, 2, generator=g) * 800
            boxes = torch.cat([xy, xy + 30 + torch.rand(n, 2, generator=g) * 100], dim=1)
            sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=None)
        pe = model.prompt_encoder.get_dense_pe()
        low, iou = model.mask_decoder(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                                      dense_prompt_embeddings=dense, multimask_output=multimask)
        ours, score = decode_best(model.mask_decoder, emb, pe, sparse, dense, multimask)
    best = iou.argmax(dim=1)
    ref = low[torch.arange(n), best]
    torch.testing.assert_close(score, iou.max(dim=1).values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prompt", ["point", "box"])
def test_prompted_masks_equal_stock_predictor(tiny_sam_model, tiny_sam_cfg, prompt):
    cfg = tiny_sam_cfg.model_copy(update={"prompt": prompt, "prompt_batch_size": 3})
    seg = SamSegmenter(cfg, model=tiny_sam_model)
    rgb = _rgb(230, 320)
    rng = np.random.default_rng(1)
    xy = rng.uniform([5, 5], [300, 210], size=(5, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 60, size=(5, 2))], axis=1)
    got = seg.predict_prompts(rgb, points=xy) if prompt == "point" else seg.predict_prompts(rgb, boxes=boxes)
    stock = SamPredictor(tiny_sam_model)
    stock.set_image(rgb)
    for k in range(len(xy)):
        if prompt == "point":
            masks, scores, _ = stock.predict(point_coords=xy[k:k + 1], point_labels=np.array([1]),
                                             multimask_output=True)
        else:
            masks, scores, _ = stock.predict(box=boxes[k], multimask_output=True)
        ref = masks[int(np.argmax(scores))]
        ours = np.zeros(ref.shape, bool) if got[k] is None else _full(got[k], ref.shape)
        assert _iou(ours, ref) >= 0.99
        if got[k] is not None:
            assert got[k].score == pytest.approx(float(scores.max()), abs=1e-4)
            assert got[k].prompt == k


# --------------------------------------------------------------------------- segmenter


def _check_segmentation(seg, image, method):
    h = image.analysed_height_px
    assert seg.method == method
    assert seg.labels.shape == (h, image.width_px) and seg.labels.dtype == np.int32
    n = seg.n_regions
    assert seg.scores is not None and seg.scores.shape == (n,) and seg.scores.dtype == np.float32
    assert set(np.unique(seg.labels)) <= set(range(n + 1))
    assert all((seg.labels == k).any() for k in range(1, n + 1))  # labels 1..n all used


def test_prompted_segmenter_end_to_end(tiny_sam_cfg, synth_image):
    from qcloop.segment import get_segmenter
    from qcloop.segment.classical import detect_candidates

    cfg = tiny_sam_cfg.model_copy(update={"max_area_ratio": None})
    seg = get_segmenter(PipelineConfig(segmenter="sam", sam=cfg))
    out = seg(synth_image)
    _check_segmentation(out, synth_image, "sam-prompted")
    cand = detect_candidates(synth_image, ClassicalConfig())
    assert 0 < out.n_regions <= len(cand)
    assert out.labels[synth_image.analysed_height_px - 1:].shape[0] == 1  # nothing below banner


def test_prompted_area_filter(tiny_sam_model, tiny_sam_cfg, synth_image):
    """Random weights give huge masks: the area-ratio filter drops them all."""
    seg = SamSegmenter(tiny_sam_cfg.model_copy(update={"max_area_ratio": 1e-3}), model=tiny_sam_model)
    assert seg(synth_image).n_regions == 0


def test_auto_mode_equals_stock_generator(tiny_sam_model, tiny_sam_cfg, synth_image):
    cfg = tiny_sam_cfg.model_copy(update={"mode": "auto", "points_per_side": 3, "pred_iou_thresh": 0.0,
                                          "stability_score_thresh": 0.0, "min_mask_region_area": 0})
    seg = SamSegmenter(cfg, model=tiny_sam_model)
    rgb = to_rgb_uint8(synth_image)
    pieces = seg.auto_masks(rgb)
    stock = SamAutomaticMaskGenerator(tiny_sam_model, points_per_side=3, pred_iou_thresh=0.0,
                                      stability_score_thresh=0.0).generate(rgb)
    assert len(pieces) == len(stock) > 0
    for p, ann in zip(pieces, stock):
        assert np.array_equal(_full(p, rgb.shape[:2]), ann["segmentation"])
        assert p.score == pytest.approx(ann["predicted_iou"])
    labels, scores, kept = paint_masks(pieces, rgb.shape[:2])
    assert 1 <= len(kept) == labels.max() == len(scores)


def test_auto_mode_paper_settings_run(tiny_sam_model, tiny_sam_cfg, synth_image):
    """Paper thresholds (0.95/0.95, 500 px clean-up) on random weights: runs, valid output."""
    cfg = tiny_sam_cfg.model_copy(update={"mode": "auto", "points_per_side": 2})
    out = SamSegmenter(cfg, model=tiny_sam_model)(synth_image)
    _check_segmentation(out, synth_image, "sam-auto")


def test_remove_small_regions():
    m = np.zeros((40, 40), bool)
    m[5:25, 5:25] = True
    m[10:12, 10:12] = False          # 4-px hole
    m[30:32, 30:33] = True           # 6-px island
    filled, changed = remove_small_regions(m, 10, "holes")
    assert changed and filled[10:12, 10:12].all() and filled[30:32, 30:33].all()
    cleaned, changed = remove_small_regions(m, 10, "islands")
    assert changed and not cleaned[30:32, 30:33].any() and cleaned[5:8, 5:8].all()
    tiny = np.zeros((20, 20), bool)
    tiny[1:3, 1:3] = True
    tiny[10:13, 10:13] = True
    kept, _ = remove_small_regions(tiny, 100, "islands")  # all small: the largest stays
    assert kept.sum() == 9 and kept[10:13, 10:13].all()
    same, changed = remove_small_regions(m, 2, "islands")
    assert not changed and same is m


# --------------------------------------------------------------------------- overlaps and tiles


def _disc(shape, r, c, rad, score, cut=False):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    m = (yy - r) ** 2 + (xx - c) ** 2 <= rad ** 2
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    return MaskPiece(int(rows[0]), int(cols[0]), m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], score, cut)


def test_paint_masks_rules():
    shape = (100, 100)
    a = _disc(shape, 30, 30, 12, 0.9)
    b = _disc(shape, 30, 45, 12, 0.95)          # overlaps a, better score → wins the overlap
    dup = _disc(shape, 31, 45, 12, 0.5)         # IoU with b ≥ 0.7 → dropped
    inner = _disc(shape, 70, 70, 5, 0.99)       # small and better
    outer = _disc(shape, 70, 70, 8, 0.6)        # > half of it covered? no: 0.39 covered → kept
    cut = _disc(shape, 30, 40, 6, 0.999, cut=True)  # cut at a tile edge, inside a and b → dropped
    pieces = [a, b, dup, inner, outer, cut]
    labels, scores, kept = paint_masks(pieces, shape, duplicate_iou=0.7)
    assert kept == [3, 1, 0, 4]
    np.testing.assert_allclose(scores, [0.99, 0.95, 0.9, 0.6])
    assert labels[30, 40] == 2 and labels[30, 20] == 3  # shared pixel to b; a keeps the rest
    assert labels[70, 70] == 1 and labels[70, 77] == 4
    # order of the input does not matter
    perm = [5, 2, 4, 0, 3, 1]
    labels2, scores2, kept2 = paint_masks([pieces[i] for i in perm], shape, duplicate_iou=0.7)
    assert np.array_equal(labels2, labels) and np.array_equal(scores2, scores)


def test_tiles_cover_with_overlap():
    tiles = make_tiles((1100, 2600), 1000, 200)
    assert len(tiles) == 2 * 3
    cover = np.zeros((1100, 2600), int)
    for r0, r1, c0, c1 in tiles:
        assert r1 - r0 == 1000 and c1 - c0 == 1000
        cover[r0:r1, c0:c1] += 1
    assert cover.min() >= 1
    starts = sorted({t[2] for t in tiles})
    assert all(b - a <= 1000 - 200 for a, b in zip(starts, starts[1:]))
    assert make_tiles((700, 900), 1500, 200) == [(0, 700, 0, 900)]
    boxes = np.array([[10.0, 10, 40, 40], [950, 500, 990, 540], [2550, 1050, 2590, 1090]])
    owner = assign_to_tiles(boxes, tiles, (1100, 2600))
    for b, k in zip(boxes, owner):
        r0, r1, c0, c1 = tiles[k]
        assert c0 <= b[0] and b[2] <= c1 and r0 <= b[1] and b[3] <= r1


def test_tiled_prompted_segmentation(tiny_sam_model, tiny_sam_cfg):
    """An image above tile_size_px is cut into tiles; every tile is encoded and decoded."""
    from qcloop.imaging import load_array
    from qcloop.synth import SynthSpec, generate_image

    s = generate_image(SynthSpec(width_px=420, height_px=240, pixel_size_nm=4.0, mean_ecd_nm=120,
                                 class_mix={"sphere": 1.0}, n_particles=12, banner=False), seed=3)
    image = load_array(s.pixels, name="wide.tif", pixel_size_nm=4.0)
    cfg = tiny_sam_cfg.model_copy(update={"tile_size_px": 256, "tile_overlap_px": 64, "max_area_ratio": 4.0})
    seg = SamSegmenter(cfg, model=tiny_sam_model)
    calls = []
    orig = seg.predict_prompts
    seg.predict_prompts = lambda rgb, **kw: calls.append(rgb.shape) or orig(rgb, **kw)
    out = seg(image)
    assert len(calls) == 2 and all(max(c[:2]) <= 256 for c in calls)
    _check_segmentation(out, image, "sam-prompted")


def test_upscaling_is_local_and_window_growth_finds_the_whole_mask(tiny_sam_model, tiny_sam_cfg):
    from qcloop.segment.sam import _upscale_one_mask

    dec = tiny_sam_model.mask_decoder
    g = torch.Generator().manual_seed(11)
    keys = torch.randn(1, 64 * 64, 256, generator=g)
    hyper = torch.randn(1, 32, generator=g)
    with torch.inference_mode():
        full = _upscale_one_mask(dec, keys, hyper, 64, 64)[0]
        win = _upscale_one_mask(dec, keys.reshape(64, 64, 256)[10:20, 30:45].reshape(1, -1, 256), hyper, 10, 15)[0]
        torch.testing.assert_close(win, full[40:80, 120:180], atol=1e-5, rtol=1e-5)

        # two token vectors and a hypernetwork vector for which every logit of one token's 4x4
        # block is -1 and of the other's +1: solve the 32 linear conditions on the 32 weights
        neg, pos = torch.randn(2, 256, generator=g)
        pair = torch.stack([neg, pos])[None].expand(32, -1, -1)
        basis = _upscale_one_mask(dec, pair, torch.eye(32), 1, 2)   # (32 channels, 4, 8)
        feats = basis.reshape(32, 4, 2, 4).permute(2, 1, 3, 0).reshape(32, 32)  # (token, sub) x channel
        target = torch.cat([-torch.ones(16), torch.ones(16)])
        hyper = torch.linalg.solve(feats.double(), target.double()).float()[None]
    grid = neg.repeat(64, 64, 1)
    grid[30:34, 20:23] = pos            # the object: 4 x 3 tokens
    grid[30:33, 24] = pos               # a second part one token away: reached when the window grows
    grid[60, 60] = pos                  # a far, disconnected fragment: outside every window tried
    keys = grid.reshape(64 * 64, 256)
    seg = SamSegmenter(tiny_sam_cfg, model=tiny_sam_model)
    geom = UpsampleGeometry(256, 1024, (1024, 1024), (1024, 1024))
    with torch.inference_mode():
        canvas = seg._grow_logits(keys, hyper[0], (31, 21), 2, geom, None)
        ref = _upscale_one_mask(dec, keys[None], hyper, 64, 64)[0].numpy()
        assert seg._grow_logits(keys, hyper[0], (31, 21), 2, geom, max_area=100.0) is None
    inside = canvas > -1e3
    assert 0 < inside.mean() < 0.25                                  # a window, not the image
    np.testing.assert_allclose(canvas[inside], ref[inside], atol=1e-5)
    mask, ref_mask = canvas > 0, ref > 0
    assert ref_mask[120:136, 80:92].all() and mask[120:136, 80:92].all()
    assert mask[120:132, 96:100].all()                               # second part found by growth
    assert ref_mask[240:244, 240:244].all() and not mask[200:, 200:].any()  # far fragment left out
    assert np.array_equal(mask[:200, :200], ref_mask[:200, :200])


def test_generator_small_region_cleanup_without_opencv():
    """The generator's min_mask_region_area post-processing (OpenCV upstream) runs on scipy."""
    from segment_anything.utils.amg import MaskData, batched_mask_to_box, mask_to_rle_pytorch, rle_to_mask

    from qcloop.segment.sam import _make_generator_class

    m = torch.zeros(2, 60, 60, dtype=torch.bool)
    m[0, 5:30, 5:30] = True
    m[0, 10:12, 10:12] = False        # small hole → filled
    m[0, 50:52, 50:52] = True         # small island → removed
    m[1, 35:55, 5:25] = True          # clean mask, untouched
    data = MaskData(rles=mask_to_rle_pytorch(m), boxes=batched_mask_to_box(m).float(),
                    iou_preds=torch.tensor([0.9, 0.8]))
    out = _make_generator_class().postprocess_small_regions(data, 20, 0.7)
    masks = [rle_to_mask(r) for r in out["rles"]]
    assert len(masks) == 2
    expected = m[0].numpy().copy()
    expected[10:12, 10:12] = True
    expected[50:52, 50:52] = False
    # NMS puts unchanged masks first (as upstream): the clean one, then the cleaned one
    assert np.array_equal(masks[0], m[1].numpy()) and np.array_equal(masks[1], expected)
    assert out["boxes"][1].tolist() == [5, 5, 29, 29]


# --------------------------------------------------------------------------- encoder attention


@pytest.mark.parametrize("use_rel_pos", [True, False])
def test_per_head_attention_equals_upstream(use_rel_pos):
    from segment_anything.modeling.image_encoder import Attention

    torch.manual_seed(0)
    att = Attention(48, num_heads=3, use_rel_pos=use_rel_pos, input_size=(9, 7)).eval()
    if use_rel_pos:  # upstream initialises them to zero: make them matter
        torch.nn.init.normal_(att.rel_pos_h, std=0.5)
        torch.nn.init.normal_(att.rel_pos_w, std=0.5)
    x = torch.randn(2, 9, 7, 48)
    with torch.inference_mode():
        ref = att(x)
        ours = attention_per_head(att, x)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_per_head_global_attention_patches_only_global_blocks_and_restores(tiny_sam_model):
    blocks = tiny_sam_model.image_encoder.blocks
    glob = [b.window_size == 0 for b in blocks]
    assert any(glob) and not all(glob)
    with per_head_global_attention(tiny_sam_model):
        assert [("forward" in b.attn.__dict__) for b in blocks] == glob
    assert not any("forward" in b.attn.__dict__ for b in blocks)
    rgb = _rgb(200, 260)
    stock = SamPredictor(tiny_sam_model)
    stock.set_image(rgb)
    ref = stock.features.clone()
    with per_head_global_attention(tiny_sam_model):
        stock.set_image(rgb)
    torch.testing.assert_close(stock.features, ref, rtol=1e-5, atol=1e-6)
