"""Segment Anything (SAM1) segmenter: the paper's automatic mode and a prompted fast path.

``mode: auto`` runs segment-anything's own :class:`SamAutomaticMaskGenerator` with the settings
of Barnatan et al. (2025): a ``points_per_side``² grid, predicted IoU ≥ ``pred_iou_thresh``,
stability ≥ ``stability_score_thresh``, clean-up of holes and islands below
``min_mask_region_area`` px. (segment-anything does that clean-up with OpenCV; here the same
algorithm runs on scipy's 8-connected labelling, so OpenCV is not needed.)

``mode: prompted`` is the fast path: the classical detector
(:func:`qcloop.segment.classical.detect_candidates`) gives one point (centroid) or box prompt
per particle candidate; the image is encoded once per tile; prompts go through SAM's prompt
encoder and a batched re-organisation of SAM's own mask decoder (:func:`decode_tokens`: same
modules and weights, prompt-independent work done once per image); the best of the multimask
outputs (highest predicted IoU) is kept, as users of ``SamPredictor`` do. The decoder's output
upscaling is local (one image token → its own 4×4 logits), so it runs in a window of tokens
around the prompt that doubles while the mask touches its edge; the 256×256 logits are then
upsampled only inside the window where the mask can be positive, with exactly the geometry of
``Sam.postprocess_masks`` (bilinear to 1024², crop the padding, bilinear to the original size)
written as two small matrix products per mask. The masks equal ``SamPredictor.predict``'s for
the same prompts (up to float rounding at logit 0), except for mask parts separated from the
prompt's neighbourhood by at least one background token (other particles).

Both modes turn masks into the :class:`~qcloop.records.Segmentation` the classical segmenter
makes, over the analysed region (banner excluded). Overlaps are resolved deterministically:
masks are taken in order of (cut by an inner tile edge last, higher predicted IoU, larger
area, position); a mask whose IoU with an already kept one reaches ``duplicate_iou``, or that
keeps less than half of its pixels, is dropped; the rest get the free pixels. Images with a
side above ``tile_size_px`` are processed in tiles overlapping by at least
``tile_overlap_px``.

Needs the 'foundation' extra (torch, segment-anything).
"""

from __future__ import annotations

import contextlib
import logging
import math
import types
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from qcloop.config import ClassicalConfig, SamConfig
from qcloop.records import Segmentation, SemImage

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, eq=False)
class MaskPiece:
    """One mask, stored as a window of the full frame.

    Attributes
    ----------
    r0, c0 : int
        Top-left corner of ``mask`` in the analysed region (rows, cols, px).
    mask : ndarray of bool, shape (h, w)
    score : float
        SAM's predicted IoU.
    cut : bool
        True when the mask touches a tile edge that is not an image edge.
    prompt : int
        Index of the prompt (candidate) that produced it; -1 for automatic masks.
    """

    r0: int
    c0: int
    mask: np.ndarray
    score: float
    cut: bool = False
    prompt: int = -1

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def shifted(self, dr: int, dc: int, cut: bool) -> "MaskPiece":
        return MaskPiece(self.r0 + dr, self.c0 + dc, self.mask, self.score, cut, self.prompt)


def _trim(mask: np.ndarray, r0: int = 0, c0: int = 0) -> tuple[int, int, np.ndarray] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return (r0 + int(rows[0]), c0 + int(cols[0]),
            mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])


# --------------------------------------------------------------------------- image → SAM input


def to_rgb_uint8(image: SemImage) -> np.ndarray:
    """Analysed region as the HWC uint8 RGB SAM expects (grey replicated, range stretched).

    Returns
    -------
    ndarray of uint8, shape (analysed_height_px, W, 3)
    """
    grey = np.rint(image.intensity() * 255.0).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


# --------------------------------------------------------------------------- upsampling geometry


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Matrix of ``F.interpolate(..., mode="bilinear", align_corners=False)`` along one axis.

    Returns
    -------
    ndarray of float64, shape (out_size, in_size)
        ``out = M @ in`` for one axis, with PyTorch's source-index rule
        ``src = max((dst + 0.5) * in/out - 0.5, 0)``.
    """
    scale = in_size / out_size
    dst = np.arange(out_size, dtype=np.float64)
    src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    l1 = src - i0
    m = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), 1.0 - l1)
    np.add.at(m, (rows, i1), l1)
    return m


class UpsampleGeometry:
    """``Sam.postprocess_masks`` for one (input size, original size), restricted to windows.

    ``postprocess_masks`` = bilinear ``low_res → img_size²``, crop to ``input_size``, bilinear
    to ``original_size``; bilinear resizing is separable and linear, so per axis it is one
    matrix ``A = B(input→orig) @ B(low→img)[:input]`` and a window of the full-size logits is
    ``A_rows[r0:r1] @ low_res @ A_cols[c0:c1].T``.

    Parameters
    ----------
    low_res : int
        Side of the decoder's logits (256).
    img_size : int
        Encoder input side (1024).
    input_size, original_size : (int, int)
        As in ``SamPredictor``: resized (H', W') and original (H, W).
    """

    def __init__(self, low_res: int, img_size: int, input_size: tuple[int, int],
                 original_size: tuple[int, int]):
        self.original_size = original_size
        # image pixels per low-res logit pixel (rows, cols), for area estimates
        self.px_per_logit = (original_size[0] * img_size / (input_size[0] * low_res),
                             original_size[1] * img_size / (input_size[1] * low_res))
        self.valid = (math.ceil(input_size[0] * low_res / img_size),
                      math.ceil(input_size[1] * low_res / img_size))
        self.axes = []
        for ax in (0, 1):
            a = bilinear_matrix(input_size[ax], original_size[ax]) @ \
                bilinear_matrix(low_res, img_size)[: input_size[ax]]
            nz = a != 0
            # support of each low-res index in the output, and of each output index in low-res
            has = nz.any(axis=0)
            out_lo = np.where(has, nz.argmax(axis=0), np.iinfo(np.int64).max)
            out_hi = np.where(has, a.shape[0] - 1 - nz[::-1].argmax(axis=0), -1)
            in_lo = nz.argmax(axis=1)
            in_hi = a.shape[1] - 1 - nz[:, ::-1].argmax(axis=1)
            self.axes.append((a.astype(np.float32), out_lo, out_hi, in_lo, in_hi))

    def area_estimate(self, logits: np.ndarray, threshold: float = 0.0) -> float:
        """Mask area in image pixels judged on the low-res logits (positive logit pixels inside
        the unpadded region × image pixels per logit pixel)."""
        n = np.count_nonzero(logits[: self.valid[0], : self.valid[1]] > threshold)
        return float(n * self.px_per_logit[0] * self.px_per_logit[1])

    def window(self, logits: np.ndarray, threshold: float = 0.0) -> tuple[int, int, np.ndarray] | None:
        """Upsample one low-res logit map only where the result can exceed ``threshold``.

        Parameters
        ----------
        logits : ndarray, shape (low_res, low_res)

        Returns
        -------
        (r0, c0, mask) or None
            ``mask`` (bool, trimmed to its bounding box) equals
            ``postprocess_masks(logits)[r0:, c0:] > threshold`` on that window, and the full
            mask is False outside it. None when no pixel exceeds the threshold.
        """
        pos = logits > threshold
        (ar, rlo, rhi, rin_lo, rin_hi), (ac, clo, chi, cin_lo, cin_hi) = self.axes
        pr = np.flatnonzero(pos.any(axis=1))
        pc = np.flatnonzero(pos.any(axis=0))
        if pr.size == 0:
            return None
        r0, r1 = int(rlo[pr].min()), int(rhi[pr].max()) + 1
        c0, c1 = int(clo[pc].min()), int(chi[pc].max()) + 1
        if r1 <= r0 or c1 <= c0:  # positives only in the padding
            return None
        jr0, jr1 = int(rin_lo[r0]), int(rin_hi[r1 - 1]) + 1
        jc0, jc1 = int(cin_lo[c0]), int(cin_hi[c1 - 1]) + 1
        block = logits[jr0:jr1, jc0:jc1].astype(np.float32)
        full = ar[r0:r1, jr0:jr1] @ block @ ac[c0:c1, jc0:jc1].T
        return _trim(full > threshold, r0, c0)


# --------------------------------------------------------------------------- small regions


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """segment_anything.utils.amg.remove_small_regions on scipy instead of OpenCV.

    Removes holes (``mode="holes"``) or islands (``"islands"``) smaller than ``area_thresh``,
    8-connected; if every island is small the largest is kept. Returns (mask, changed).
    """
    correct_holes = mode == "holes"
    working = np.logical_xor(correct_holes, mask)
    regions, n = ndimage.label(working, structure=np.ones((3, 3), bool))
    sizes = np.bincount(regions.ravel(), minlength=n + 1)[1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask, False
    fill = [0] + small
    if not correct_holes:
        fill = [i for i in range(n + 1) if i not in fill]
        if not fill:
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True


def _make_generator_class():
    import torch
    from segment_anything import SamAutomaticMaskGenerator
    from segment_anything.utils.amg import batched_mask_to_box, mask_to_rle_pytorch, rle_to_mask
    from torchvision.ops.boxes import batched_nms

    class Generator(SamAutomaticMaskGenerator):
        """SamAutomaticMaskGenerator whose small-region clean-up needs no OpenCV."""

        @staticmethod
        def postprocess_small_regions(mask_data, min_area, nms_thresh):  # same as upstream
            if len(mask_data["rles"]) == 0:
                return mask_data
            new_masks, scores = [], []
            for rle in mask_data["rles"]:
                mask = rle_to_mask(rle)
                mask, changed = remove_small_regions(mask, min_area, mode="holes")
                unchanged = not changed
                mask, changed = remove_small_regions(mask, min_area, mode="islands")
                unchanged = unchanged and not changed
                new_masks.append(torch.as_tensor(mask).unsqueeze(0))
                scores.append(float(unchanged))
            masks = torch.cat(new_masks, dim=0)
            boxes = batched_mask_to_box(masks)
            keep = batched_nms(boxes.float(), torch.as_tensor(scores), torch.zeros(len(boxes)),
                               iou_threshold=nms_thresh)
            for i in keep:
                if scores[i] == 0.0:
                    mask_data["rles"][i] = mask_to_rle_pytorch(masks[i].unsqueeze(0))[0]
                    mask_data["boxes"][i] = boxes[i]
            mask_data.filter(keep)
            return mask_data

    return Generator


# --------------------------------------------------------------------------- tiles and merging


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Evenly spaced tile starts covering ``length`` with tiles of ``tile`` px overlapping by
    at least ``overlap`` px (one tile when ``length <= tile``)."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [int(round(v)) for v in np.linspace(0, length - tile, n)]


def make_tiles(shape: tuple[int, int], tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Tiles ``(r0, r1, c0, c1)`` over an image of ``shape`` (rows, cols)."""
    h, w = shape
    return [(r, min(r + tile, h), c, min(c + tile, w))
            for r in tile_starts(h, tile, overlap) for c in tile_starts(w, tile, overlap)]


def _touches_inner_edge(p: MaskPiece, tile: tuple[int, int, int, int], shape: tuple[int, int]) -> bool:
    r0, r1, c0, c1 = tile
    h, w = p.mask.shape
    return ((p.r0 <= r0 and r0 > 0) or (p.r0 + h >= r1 and r1 < shape[0])
            or (p.c0 <= c0 and c0 > 0) or (p.c0 + w >= c1 and c1 < shape[1]))


def paint_masks(pieces: Sequence[MaskPiece], shape: tuple[int, int], duplicate_iou: float = 0.7,
                min_kept_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Resolve overlapping masks into one label image, deterministically.

    Masks are taken in order of (``cut`` last, higher score, larger area, top-left position).
    A mask is dropped when its IoU with an already kept mask is ≥ ``duplicate_iou``, or when
    fewer than ``min_kept_fraction`` of its pixels are still free; otherwise it takes the free
    pixels under it.

    Returns
    -------
    labels : ndarray of int32, shape ``shape``
        0 = background, 1..n in the order taken.
    scores : ndarray of float32, shape (n,)
    kept : list of int
        Index into ``pieces`` of each label (label k ↔ ``pieces[kept[k-1]]``).
    """
    labels = np.zeros(shape, np.int32)
    order = sorted(range(len(pieces)), key=lambda i: (
        pieces[i].cut, -pieces[i].score, -pieces[i].area, pieces[i].r0, pieces[i].c0, i))
    kept: list[int] = []
    scores: list[float] = []
    for i in order:
        p = pieces[i]
        h, w = p.mask.shape
        area = p.area
        if area == 0:
            continue
        region = labels[p.r0:p.r0 + h, p.c0:p.c0 + w]
        under = region[p.mask]
        free = int((under == 0).sum())
        if free < min_kept_fraction * area:
            continue
        duplicate = False
        for lab in np.unique(under[under > 0]):
            q = pieces[kept[lab - 1]]
            inter = _intersection(p, q)
            if inter / (area + q.area - inter) >= duplicate_iou:
                duplicate = True
                break
        if duplicate:
            continue
        kept.append(i)
        scores.append(p.score)
        region[p.mask & (region == 0)] = len(kept)
    return labels, np.asarray(scores, np.float32), kept


def _intersection(p: MaskPiece, q: MaskPiece) -> int:
    r0, c0 = max(p.r0, q.r0), max(p.c0, q.c0)
    r1 = min(p.r0 + p.mask.shape[0], q.r0 + q.mask.shape[0])
    c1 = min(p.c0 + p.mask.shape[1], q.c0 + q.mask.shape[1])
    if r1 <= r0 or c1 <= c0:
        return 0
    a = p.mask[r0 - p.r0:r1 - p.r0, c0 - p.c0:c1 - p.c0]
    b = q.mask[r0 - q.r0:r1 - q.r0, c0 - q.c0:c1 - q.c0]
    return int(np.logical_and(a, b).sum())


# --------------------------------------------------------------------------- segmenter


class SamSegmenter:
    """Callable ``(SemImage) -> Segmentation`` with a SAM model loaded once.

    Parameters
    ----------
    cfg : SamConfig
    classical_cfg : ClassicalConfig, optional
        Settings of the candidate detector that prompts ``mode: prompted``.
    model : segment_anything Sam, optional
        An already loaded model (otherwise :func:`qcloop.models.load_sam` loads ``cfg``).

    Raises
    ------
    ModelError
        Missing or mismatched checkpoint, foundation extra not installed, device absent.
    """

    def __init__(self, cfg: SamConfig, classical_cfg: ClassicalConfig | None = None, *, model: Any = None):
        from qcloop.models import choose_device, load_sam, require_foundation

        require_foundation("segmenter: sam")
        import torch
        from segment_anything import SamPredictor

        self._torch = torch
        self.cfg = cfg
        self.classical_cfg = classical_cfg if classical_cfg is not None else ClassicalConfig()
        self.device = choose_device(cfg.device) if model is None else model.device
        self.model = load_sam(cfg, self.device) if model is None else model
        self.name = f"sam-{cfg.mode}"
        # small batches on the CPU keep the decoder's temporaries (a few MB per prompt) reusable
        # by the allocator instead of fresh page-faulted memory per batch; GPUs like big ones
        self.prompt_batch_size = cfg.prompt_batch_size or (4 if self.device.type == "cpu" else 64)
        self.predictor = SamPredictor(self.model)
        self._generator = None
        if cfg.mode == "auto":
            gen_cls = _make_generator_class()
            self._generator = gen_cls(
                self.model,
                points_per_side=cfg.points_per_side,
                points_per_batch=cfg.points_per_batch,
                pred_iou_thresh=cfg.pred_iou_thresh,
                stability_score_thresh=cfg.stability_score_thresh,
                box_nms_thresh=cfg.box_nms_thresh,
                min_mask_region_area=0,  # set below: upstream would import OpenCV for it
            )
            self._generator.min_mask_region_area = cfg.min_mask_region_area

    # ------------------------------------------------------------------ public
    def __call__(self, image: SemImage) -> Segmentation:
        rgb = to_rgb_uint8(image)
        if rgb.shape[0] == 0 or rgb.shape[1] == 0:
            return Segmentation(labels=np.zeros(rgb.shape[:2], np.int32), method=self.name,
                                scores=np.zeros(0, np.float32))
        if self.cfg.mode == "auto":
            pieces = self.auto_masks(rgb)
        else:
            pieces = self.prompted_masks(image, rgb)
        labels, scores, _ = paint_masks(pieces, rgb.shape[:2], self.cfg.duplicate_iou)
        return Segmentation(labels=labels, method=self.name, scores=scores)

    def tiles(self, shape: tuple[int, int]) -> list[tuple[int, int, int, int]]:
        return make_tiles(shape, self.cfg.tile_size_px, self.cfg.tile_overlap_px)

    # ------------------------------------------------------------------ auto
    def auto_masks(self, rgb: np.ndarray) -> list[MaskPiece]:
        """SamAutomaticMaskGenerator masks over every tile, in full-frame window form."""
        shape = rgb.shape[:2]
        out: list[MaskPiece] = []
        for tile in self.tiles(shape):
            r0, r1, c0, c1 = tile
            anns = self._generator.generate(np.ascontiguousarray(rgb[r0:r1, c0:c1]))
            for ann in anns:
                t = _trim(np.asarray(ann["segmentation"], bool))
                if t is None:
                    continue
                p = MaskPiece(t[0], t[1], t[2], float(ann["predicted_iou"])).shifted(r0, c0, False)
                out.append(p.shifted(0, 0, _touches_inner_edge(p, tile, shape)))
        return out

    # ------------------------------------------------------------------ prompted
    def prompted_masks(self, image: SemImage, rgb: np.ndarray) -> list[MaskPiece]:
        """One mask per classical candidate (before overlap resolution)."""
        from qcloop.segment.classical import detect_candidates

        cand = detect_candidates(image, self.classical_cfg)
        if len(cand) == 0:
            return []
        shape = rgb.shape[:2]
        boxes = cand[["bbox_c0", "bbox_r0", "bbox_c1", "bbox_r1"]].to_numpy(np.float64)
        points = cand[["x", "y"]].to_numpy(np.float64)
        tiles = self.tiles(shape)
        owner = assign_to_tiles(boxes, tiles, shape)
        max_area = None
        if self.cfg.max_area_ratio is not None:
            box_area = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1.0)
            max_area = self.cfg.max_area_ratio * box_area
        sizes = np.max(boxes[:, 2:] - boxes[:, :2], axis=1)
        pieces: list[MaskPiece] = []
        for t_index, tile in enumerate(tiles):
            idx = np.flatnonzero(owner == t_index)
            if idx.size == 0:
                continue
            r0, r1, c0, c1 = tile
            off = np.array([c0, r0], np.float64)
            sub = np.ascontiguousarray(rgb[r0:r1, c0:c1])
            limit = None if max_area is None else max_area[idx]
            if self.cfg.prompt == "point":
                got = self.predict_prompts(sub, points=points[idx] - off, max_area=limit,
                                           sizes=sizes[idx])
            else:
                got = self.predict_prompts(sub, boxes=boxes[idx] - np.tile(off, 2), max_area=limit)
            for k, p in zip(idx, got):
                if p is None:
                    continue
                p = MaskPiece(p.r0 + r0, p.c0 + c0, p.mask, p.score, False, int(k))
                pieces.append(p.shifted(0, 0, _touches_inner_edge(p, tile, shape)))
        return [p for p in pieces if p.score >= self.cfg.prompt_min_iou]

    def encode(self, rgb: np.ndarray) -> None:
        """Encode one image (tile) with SamPredictor's own preprocessing.

        The image encoder's global-attention blocks run :func:`attention_per_head` (the same
        arithmetic, one head at a time) while this call lasts; ``mode: auto`` keeps
        segment-anything's code untouched.
        """
        with self._torch.inference_mode(), per_head_global_attention(self.model):
            self.predictor.set_image(rgb)

    def predict_prompts(self, rgb: np.ndarray, *, points: np.ndarray | None = None,
                        boxes: np.ndarray | None = None, encode: bool = True,
                        max_area: np.ndarray | None = None,
                        sizes: np.ndarray | None = None) -> list[MaskPiece | None]:
        """Masks for many prompts on one image, decoded in batches.

        Parameters
        ----------
        rgb : ndarray of uint8, shape (H, W, 3)
        points : ndarray, shape (n, 2), optional
            One positive point per prompt, (x, y) in pixels of ``rgb``.
        boxes : ndarray, shape (n, 4), optional
            One box per prompt, (x0, y0, x1, y1) in pixels of ``rgb``.
        encode : bool
            Encode ``rgb`` first (False reuses the last encoded image).
        max_area : ndarray, shape (n,), optional
            Per prompt, the largest mask area (px) worth upsampling; a mask whose area judged
            on the low-res logits (:meth:`UpsampleGeometry.area_estimate`) exceeds it is
            returned as None without being upsampled.
        sizes : ndarray, shape (n,), optional
            Expected object size (px) per point prompt: sets the first logit window (default
            64 px; boxes use their own size).

        Notes
        -----
        The decoder's output upscaling is local (each image token gives its own 4 × 4 block of
        logits), so it is computed first in a window of tokens around the prompt (twice the
        object's size plus two tokens); while the mask reaches the window's edge (inside the
        image) the window doubles. The result equals the stock decoder's mask except for parts
        of it disconnected from the prompt's neighbourhood by a background ring of at least one
        token (those are particles elsewhere, not this prompt's object).

        Returns
        -------
        list of MaskPiece or None
            Per prompt: the multimask output with the highest predicted IoU (the single
            output when ``multimask_output`` is off), None when the mask is empty. Coordinates
            are those of ``rgb``.
        """
        torch = self._torch
        if (points is None) == (boxes is None):
            raise ValueError("give exactly one of points or boxes")
        if encode:
            self.encode(rgb)
        pred = self.predictor
        model = self.model
        orig = rgb.shape[:2]
        geom = UpsampleGeometry(_low_res_side(model), model.image_encoder.img_size,
                                tuple(pred.input_size), tuple(orig))
        prompts = points if points is not None else boxes
        n = len(prompts)
        # window of image tokens around each prompt where its mask logits are computed first
        eh, ew = pred.features.shape[-2:]
        tok = model.image_encoder.img_size / eh  # input pixels per token (16)
        if points is not None:
            centre_in = pred.transform.apply_coords(np.asarray(points, np.float64), orig)
            ext = np.full(n, 64.0) if sizes is None else np.asarray(sizes, np.float64)
            ext_in = ext * (pred.input_size[0] / orig[0])
        else:
            bx_in = pred.transform.apply_boxes(np.asarray(boxes, np.float64), orig).reshape(-1, 4)
            centre_in = (bx_in[:, :2] + bx_in[:, 2:]) / 2
            ext_in = np.max(bx_in[:, 2:] - bx_in[:, :2], axis=1)
        centre = np.floor(centre_in[:, ::-1] / tok).astype(np.int64)  # (row, col) token
        half0 = (np.ceil(ext_in / tok / 2) + 2).astype(np.int64)
        out: list[MaskPiece | None] = []
        bs = self.prompt_batch_size
        cache: dict = {}
        with torch.inference_mode():
            dense_pe = model.prompt_encoder.get_dense_pe()
            for s in range(0, n, bs):
                chunk = np.asarray(prompts[s:s + bs], np.float64)
                if points is not None:
                    coords = pred.transform.apply_coords(chunk, orig)
                    coords_t = torch.as_tensor(coords, dtype=torch.float, device=self.device)[:, None, :]
                    labels_t = torch.ones((len(chunk), 1), dtype=torch.int, device=self.device)
                    sparse, dense = model.prompt_encoder(points=(coords_t, labels_t), boxes=None, masks=None)
                else:
                    bx = pred.transform.apply_boxes(chunk, orig)
                    boxes_t = torch.as_tensor(bx, dtype=torch.float, device=self.device)
                    sparse, dense = model.prompt_encoder(points=None, boxes=boxes_t, masks=None)
                keys, hyper, score_t = decode_tokens(model.mask_decoder, pred.features, dense_pe, sparse,
                                                     dense, self.cfg.multimask_output, cache)
                score = score_t.float().cpu().numpy()
                for j in range(len(chunk)):
                    low = self._grow_logits(keys[j], hyper[j], centre[s + j], half0[s + j], geom,
                                            None if max_area is None else max_area[s + j])
                    w = None if low is None else geom.window(low, model.mask_threshold)
                    out.append(None if w is None else MaskPiece(w[0], w[1], w[2], float(score[j]),
                                                                prompt=s + j))
        return out

    def _grow_logits(self, keys, hyper, centre, half: int, geom: "UpsampleGeometry",
                     max_area: float | None) -> np.ndarray | None:
        """Low-res logits of one mask, computed in a growing window of tokens.

        Returns the (low_res, low_res) logit map with -1e4 outside the computed window, or
        None when the mask already exceeds ``max_area`` (judged on the low-res logits).
        """
        dec = self.model.mask_decoder
        thr = self.model.mask_threshold
        eh = ew = int(round(math.sqrt(keys.shape[0])))
        grid = keys.reshape(eh, ew, keys.shape[-1])
        side = 4 * eh
        cy, cx = int(min(max(centre[0], 0), eh - 1)), int(min(max(centre[1], 0), ew - 1))
        while True:
            r0, r1 = max(cy - half, 0), min(cy + half + 1, eh)
            c0, c1 = max(cx - half, 0), min(cx + half + 1, ew)
            win = grid[r0:r1, c0:c1].reshape(1, -1, grid.shape[-1])
            logits = _upscale_one_mask(dec, win, hyper[None], r1 - r0, c1 - c0)[0].float().cpu().numpy()
            canvas = np.full((side, side), -1e4, np.float32)
            canvas[4 * r0:4 * r1, 4 * c0:4 * c1] = logits
            if max_area is not None and geom.area_estimate(canvas, thr) > max_area:
                return None
            pos = logits > thr
            touching = ((r0 > 0 and pos[:4].any()) or (r1 < eh and pos[-4:].any())
                        or (c0 > 0 and pos[:, :4].any()) or (c1 < ew and pos[:, -4:].any()))
            if not touching or (r0 == 0 and c0 == 0 and r1 == eh and c1 == ew):
                return canvas
            half *= 2


# --------------------------------------------------------------------------- batched decoder
#
# The functions below compute exactly what segment_anything's MaskDecoder.predict_masks
# computes (same modules, same weights, same operations up to the order of floating-point
# sums) for many prompts on one image, but organised for throughput:
# * work that does not depend on the prompt is done once (layer 1's key/value projections of
#   the image tokens, the image tokens' query projection), not once per prompt;
# * attention between the 4096 image tokens and the few prompt tokens is re-associated so the
#   projections act on the few tokens ((q W_k) x^T instead of q (x W_k)^T, and
#   softmax(.) (v W_o) instead of (softmax(.) v) W_o);
# * the output upscaling (two stride-2 transposed convolutions) runs as two matrix products
#   in channels-last layout, with the 2-D LayerNorm as a plain layer_norm over channels;
# * only the selected mask (highest predicted IoU among the multimask outputs) is formed, and
#   (SamSegmenter._grow_logits) only in a window of image tokens around the prompt.
# tests/foundation/test_sam.py checks logits and scores against the stock decoder.


def attention_per_head(self, x):
    """``segment_anything.modeling.image_encoder.Attention.forward``, one head at a time.

    Same operations in the same order per head (q k^T scaled, decomposed relative positions
    added, softmax, times v), so the result equals upstream's to the last bit in our tests;
    but only one head's (HW)² attention map exists at a time, updated in place, instead of
    four copies of all heads' maps (12 x 4096² floats = 805 MB each for ViT-B's global blocks
    at 1024 px). On a CPU that halves the time of the global attention, which is memory-bound
    (measured: 4.1 → 2.4 CPU-s per global block, ViT-B, one thread).
    Bound to an ``Attention`` instance by :func:`per_head_global_attention`.
    """
    import torch
    from segment_anything.modeling.image_encoder import get_rel_pos

    B, H, W, _ = x.shape
    qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)
    out = torch.empty_like(v)
    if self.use_rel_pos:
        rh = get_rel_pos(H, H, self.rel_pos_h)
        rw = get_rel_pos(W, W, self.rel_pos_w)
    for i in range(q.shape[0]):
        attn = (q[i] * self.scale) @ k[i].transpose(-2, -1)
        if self.use_rel_pos:
            r_q = q[i].reshape(H, W, -1)
            rel_h = torch.einsum("hwc,hkc->hwk", r_q, rh)
            rel_w = torch.einsum("hwc,wkc->hwk", r_q, rw)
            attn.view(H, W, H, W).add_(rel_h[:, :, :, None]).add_(rel_w[:, :, None, :])
        torch.softmax(attn, dim=-1, out=attn)
        torch.mm(attn, v[i], out=out[i])
    x = out.view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
    return self.proj(x)


@contextlib.contextmanager
def per_head_global_attention(model: Any):
    """Run the global-attention blocks of ``model.image_encoder`` with :func:`attention_per_head`.

    Windowed blocks (14 x 14 tokens: small maps, already cache-resident) keep upstream's code.
    The instance attributes are removed on exit, so the model is upstream's again.
    """
    patched = []
    try:
        for blk in getattr(getattr(model, "image_encoder", None), "blocks", ()):
            if getattr(blk, "window_size", 1) == 0 and hasattr(blk, "attn"):
                blk.attn.forward = types.MethodType(attention_per_head, blk.attn)
                patched.append(blk.attn)
        yield
    finally:
        for attn in patched:
            attn.__dict__.pop("forward", None)


def _cached(cache: dict | None, key: str, fn):
    if cache is None:
        return fn()
    if key not in cache:
        cache[key] = fn()
    return cache[key]


def _attn_tokens_to_image(att, q_tok, k_img, v_img, cache=None, key=""):
    """segment_anything Attention(q=tokens, k=image, v=image) → (B, Nq, C).

    When the image side has batch 1 (shared by every prompt) its projections are computed
    once and kept in ``cache[key + ...]`` for the next batch of prompts on the same image.
    """
    import torch

    B, Nq, _ = q_tok.shape
    h, inner = att.num_heads, att.internal_dim
    d = inner // h
    q = att.q_proj(q_tok).reshape(B, Nq, h, d).transpose(1, 2)  # B,h,Nq,d
    if k_img.shape[0] == 1 and v_img.shape[0] == 1:  # image side shared by every prompt
        k = _cached(cache, key + "k", lambda: att.k_proj(k_img).reshape(1, -1, h, d).transpose(1, 2))
        v = _cached(cache, key + "v", lambda: att.v_proj(v_img).reshape(1, -1, h, d).transpose(1, 2))
        out = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(d), dim=-1) @ v
    else:
        wk = att.k_proj.weight.reshape(h, d, -1)
        qk = torch.einsum("bhnd,hdc->bhnc", q, wk).reshape(B, h * Nq, -1)
        bias = (q * att.k_proj.bias.reshape(1, h, 1, d)).sum(-1).reshape(B, h * Nq, 1)
        scores = torch.baddbmm(bias, qk, k_img.expand(B, -1, -1).transpose(1, 2))
        attn = torch.softmax(scores / math.sqrt(d), dim=-1)
        av = torch.bmm(attn, v_img.expand(B, -1, -1)).reshape(B, h, Nq, -1)
        out = (torch.einsum("bhnc,hdc->bhnd", av, att.v_proj.weight.reshape(h, d, -1))
               + att.v_proj.bias.reshape(1, h, 1, d))  # attention rows sum to 1
    return att.out_proj(out.transpose(1, 2).reshape(B, Nq, inner))


def _attn_image_to_tokens(att, q_img, k_tok, v_tok, cache=None, key=""):
    """segment_anything Attention(q=image, k=tokens, v=tokens) → (B, N, C) (cache: as above)."""
    import torch

    B, Nq, C = k_tok.shape
    h, inner = att.num_heads, att.internal_dim
    d = inner // h
    k = att.k_proj(k_tok).reshape(B, Nq, h, d)
    v = att.v_proj(v_tok).reshape(B, Nq, h, d)
    u = torch.einsum("bnhd,chd->bhnc", v, att.out_proj.weight.reshape(C, h, d)).reshape(B, h * Nq, C)
    N = q_img.shape[1]
    if q_img.shape[0] == 1:
        q = _cached(cache, key + "q", lambda: att.q_proj(q_img).reshape(1, N, h, d))
        scores = torch.einsum("xmhd,bnhd->bmhn", q, k)
    else:
        m = torch.einsum("bnhd,hdc->bchn", k, att.q_proj.weight.reshape(h, d, C)).reshape(B, C, h * Nq)
        bias = torch.einsum("bnhd,hd->bhn", k, att.q_proj.bias.reshape(h, d)).reshape(B, 1, h * Nq)
        scores = torch.baddbmm(bias, q_img, m).reshape(B, N, h, Nq)
    attn = torch.softmax(scores / math.sqrt(d), dim=-1).reshape(B, N, h * Nq)
    return torch.baddbmm(att.out_proj.bias.reshape(1, 1, C), attn, u)


def _two_way_transformer(tf, image_embedding, image_pe, point_embedding, cache=None):
    """segment_anything TwoWayTransformer.forward with the batching above."""
    keys = image_embedding.flatten(2).permute(0, 2, 1)
    key_pe = image_pe.flatten(2).permute(0, 2, 1)
    queries = point_embedding
    for i, layer in enumerate(tf.layers):
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + point_embedding
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        q = queries + point_embedding
        k = keys + key_pe
        queries = layer.norm2(queries + _attn_tokens_to_image(layer.cross_attn_token_to_image, q, k, keys,
                                                              cache, f"{i}t"))
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + point_embedding
        keys = layer.norm4(keys + _attn_image_to_tokens(layer.cross_attn_image_to_token, k, q, queries,
                                                        cache, f"{i}i"))
    q = queries + point_embedding
    k = keys + key_pe
    queries = tf.norm_final_attn(queries + _attn_tokens_to_image(tf.final_attn_token_to_image, q, k, keys))
    return queries, keys


def _upscale_one_mask(dec, keys, hyper, h: int, w: int):
    """``output_upscaling`` then the product with one hypernetwork vector per prompt.

    keys: (B, h*w, C) transformer output; hyper: (B, C // 8). Returns logits (B, 4h, 4w).
    """
    import torch

    F = torch.nn.functional
    ct1, ln, act1, ct2, act2 = dec.output_upscaling
    B, N, C = keys.shape
    c1, c2 = ct1.out_channels, ct2.out_channels
    # ConvTranspose2d(k=2, s=2): out[o, 2i+a, 2j+b] = bias[o] + sum_c in[c, i, j] W[c, o, a, b]
    w1 = ct1.weight.permute(0, 2, 3, 1).reshape(C, 4 * c1)
    y = torch.addmm(ct1.bias.repeat(4), keys.reshape(B * N, C), w1).reshape(B * N * 4, c1)
    y = act1(F.layer_norm(y, (c1,), ln.weight, ln.bias, ln.eps))  # LayerNorm2d over channels
    w2 = ct2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
    z = act2(torch.addmm(ct2.bias.repeat(4), y, w2).reshape(B, N * 16, c2))
    m = torch.bmm(z, hyper[:, :, None]).reshape(B, h, w, 2, 2, 2, 2)  # i, j, a1, b1, a2, b2
    return m.permute(0, 1, 3, 5, 2, 4, 6).reshape(B, 4 * h, 4 * w)


def decode_tokens(dec, image_embeddings, image_pe, sparse, dense, multimask_output: bool,
                  cache: dict | None = None):
    """The mask decoder up to (not including) the output upscaling, for B prompts on one image.

    Parameters
    ----------
    dec : segment_anything MaskDecoder
    image_embeddings : tensor (1, C, h, w)
    image_pe : tensor (1, C, h, w)
    sparse : tensor (B, n_tokens, C)
    dense : tensor (B, C, h, w)
        The prompt encoder's dense embedding (the no-mask embedding broadcast when no mask
        prompt is given; then it is shared, not copied per prompt).
    multimask_output : bool
        Choose among the three multimask outputs (True) or take the single-mask output.
    cache : dict, optional
        Pass the same (initially empty) dict for every batch of prompts on one image: the
        prompt-independent projections are then computed once.

    Returns
    -------
    keys : tensor (B, h*w, C), contiguous
        Image tokens after the two-way transformer (input of the output upscaling).
    hyper : tensor (B, C // 8)
        Hypernetwork output of the chosen mask token.
    score : tensor (B,)
        The chosen mask's predicted IoU (its maximum over the candidates).
    """
    import torch

    B = sparse.shape[0]
    output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(B, -1, -1), sparse), dim=1)
    shared = B == 1 or dense.stride(0) == 0
    src = image_embeddings + (dense[:1] if shared else dense)
    hs, keys = _two_way_transformer(dec.transformer, src, image_pe, tokens,
                                    cache if shared else None)
    iou = dec.iou_prediction_head(hs[:, 0, :])
    first = 1 if multimask_output else 0
    last = iou.shape[1] if multimask_output else 1
    best = first + iou[:, first:last].argmax(dim=1)
    ar = torch.arange(B, device=iou.device)
    token = hs[ar, 1 + best]  # the chosen mask token: (B, C)
    hyper = torch.empty((B, dec.output_hypernetworks_mlps[0].layers[-1].out_features),
                        dtype=token.dtype, device=token.device)
    for k in torch.unique(best).tolist():
        sel = best == k
        hyper[sel] = dec.output_hypernetworks_mlps[k](token[sel])
    return keys.contiguous(), hyper, iou[ar, best]


def decode_best(dec, image_embeddings, image_pe, sparse, dense, multimask_output: bool,
                cache: dict | None = None):
    """Low-res logits and predicted IoU of the best mask for each of B prompts on one image.

    Same parameters as :func:`decode_tokens`. Returns ``logits`` (B, 4h, 4w), equal to
    ``MaskDecoder(...)[0][b, k]`` for the chosen k, and ``score`` (B,).
    """
    keys, hyper, score = decode_tokens(dec, image_embeddings, image_pe, sparse, dense,
                                       multimask_output, cache)
    _, h, w = image_embeddings.shape[1:]
    return _upscale_one_mask(dec, keys, hyper, h, w), score

def _low_res_side(model: Any) -> int:
    """Side of the mask decoder's logits: 4 × the image-embedding side (256 for SAM)."""
    return 4 * int(model.prompt_encoder.image_embedding_size[0])


def assign_to_tiles(boxes: np.ndarray, tiles: Sequence[tuple[int, int, int, int]],
                    shape: tuple[int, int]) -> np.ndarray:
    """Index of the tile where each box lies deepest (distance to the nearest inner edge).

    Parameters
    ----------
    boxes : ndarray, shape (n, 4)
        (x0, y0, x1, y1) in full-frame pixels.

    Returns
    -------
    ndarray of int64, shape (n,)
    """
    if len(tiles) == 1:
        return np.zeros(len(boxes), np.int64)
    h, w = shape
    depth = np.empty((len(boxes), len(tiles)))
    big = float(max(h, w)) * 4
    for k, (r0, r1, c0, c1) in enumerate(tiles):
        d_top = boxes[:, 1] - r0 if r0 > 0 else np.full(len(boxes), big)
        d_bot = r1 - boxes[:, 3] if r1 < h else np.full(len(boxes), big)
        d_left = boxes[:, 0] - c0 if c0 > 0 else np.full(len(boxes), big)
        d_right = c1 - boxes[:, 2] if c1 < w else np.full(len(boxes), big)
        inside = (boxes[:, 0] >= c0) & (boxes[:, 2] <= c1) & (boxes[:, 1] >= r0) & (boxes[:, 3] <= r1)
        depth[:, k] = np.minimum.reduce([d_top, d_bot, d_left, d_right]) + np.where(inside, 0, -big)
    return depth.argmax(axis=1)


__all__ = ["SamSegmenter", "MaskPiece", "UpsampleGeometry", "bilinear_matrix", "paint_masks",
           "make_tiles", "tile_starts", "assign_to_tiles", "remove_small_regions", "to_rgb_uint8"]
