"""Embedders: one fixed-length vector per particle, rows aligned with the particle table.

``get_embedder(cfg)`` builds the one the configuration names (``morphology`` needs no
weights; ``dinov2`` needs the 'foundation' extra); it is called once per image:
``embedder(image, masks, particles) -> ndarray (n_particles, dim)``. ``embedder.spec`` is a
short string naming the embedder and its preprocessing; a trained classifier records it and
refuses embeddings of another spec.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pandas as pd

from qcloop.config import PipelineConfig
from qcloop.records import ParticleMasks, SemImage


class Embedder(Protocol):
    spec: str

    def __call__(self, image: SemImage, masks: ParticleMasks, particles: pd.DataFrame) -> np.ndarray: ...


def get_embedder(cfg: PipelineConfig) -> Embedder:
    if cfg.embedder == "morphology":
        from qcloop.embed.morphology import MorphologyEmbedder

        return MorphologyEmbedder()
    if cfg.embedder == "dinov2":
        from qcloop.embed.dinov2 import Dinov2Embedder  # needs the 'foundation' extra

        return Dinov2Embedder(cfg.dinov2)
    raise ValueError(f"unknown embedder {cfg.embedder!r}")
