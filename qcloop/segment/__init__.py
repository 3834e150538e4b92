"""Segmenters: same call signature, same output record (:class:`qcloop.records.Segmentation`).

``get_segmenter(cfg)`` builds the one the configuration names, loading any model once; the
returned object is called once per image: ``segmenter(image) -> Segmentation``.
"""

from __future__ import annotations

from typing import Protocol

from qcloop.config import PipelineConfig
from qcloop.records import Segmentation, SemImage


class Segmenter(Protocol):
    name: str

    def __call__(self, image: SemImage) -> Segmentation: ...


def get_segmenter(cfg: PipelineConfig) -> Segmenter:
    if cfg.segmenter == "classical":
        from qcloop.segment.classical import ClassicalSegmenter

        return ClassicalSegmenter(cfg.classical)
    if cfg.segmenter == "sam":
        from qcloop.segment.sam import SamSegmenter  # needs the 'foundation' extra

        return SamSegmenter(cfg.sam, cfg.classical)
    raise ValueError(f"unknown segmenter {cfg.segmenter!r}")
