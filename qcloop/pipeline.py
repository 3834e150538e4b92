"""The per-image pipeline: load → segment → group lobes → measure → embed → classify.

This is the one place that strings the stages together; each stage is a plain function (or a
callable holding a loaded model) in its own module. :class:`Pipeline` loads models once and
then analyses any number of images; it touches no MQTT, no ledger and no clock other than the
per-stage timings it reports.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from qcloop.config import ImagingConfig, PipelineConfig, Settings
from qcloop.records import ImageResult, SemImage


class Pipeline:
    """Analyse SEM images with the configured segmenter, embedder and classifier.

    Parameters
    ----------
    imaging, pipeline : config sections
        From :class:`qcloop.config.Settings`.
    embed : bool
        Compute embeddings even without a classifier (needed for batch metrics). Default True.
    """

    def __init__(self, imaging: ImagingConfig, pipeline: PipelineConfig, *, embed: bool = True):
        from qcloop.segment import get_segmenter

        self.imaging = imaging
        self.config = pipeline
        self.segmenter = get_segmenter(pipeline)
        self.classifier = None
        if pipeline.classifier is not None:
            from qcloop.classify import Classifier

            self.classifier = Classifier.load(pipeline.classifier)
        self.embedder = None
        if embed or self.classifier is not None:
            from qcloop.embed import get_embedder

            self.embedder = get_embedder(pipeline)
            if self.classifier is not None:
                self.classifier.check_embedder(self.embedder.spec)

    @classmethod
    def from_settings(cls, settings: Settings, *, embed: bool = True) -> "Pipeline":
        return cls(settings.imaging, settings.pipeline, embed=embed)

    def load(self, path: str | Path) -> SemImage:
        from qcloop.imaging import load_image

        return load_image(path, self.imaging)

    def analyze(self, source: str | Path | SemImage) -> ImageResult:
        """Run every stage on one image. Raises InputImageError for a bad file."""
        from qcloop.lobes import group_lobes
        from qcloop.measure import measure_particles

        timings: dict[str, float] = {}

        @contextmanager
        def stage(name: str) -> Iterator[None]:
            t0 = time.perf_counter()
            yield
            timings[name] = time.perf_counter() - t0

        if isinstance(source, SemImage):
            image = source
        else:
            with stage("load"):
                image = self.load(source)
        with stage("segment"):
            segmentation = self.segmenter(image)
        with stage("lobes"):
            masks = group_lobes(segmentation, image, self.config.lobes)
        with stage("measure"):
            particles = measure_particles(image, masks)
        embeddings: np.ndarray | None = None
        if self.embedder is not None:
            with stage("embed"):
                embeddings = self.embedder(image, masks, particles)
        if self.classifier is not None and embeddings is not None:
            with stage("classify"):
                particles = self.classifier.annotate(particles, embeddings, self.config.unknown_below)
        return ImageResult(image=image, masks=masks, particles=particles, embeddings=embeddings,
                           stage_seconds=timings)


def analyze_image(path: str | Path, settings: Settings | None = None) -> ImageResult:
    """Convenience: analyse one file with the given (or embedded default) settings."""
    if settings is None:
        from qcloop.config import load_settings

        settings = load_settings(use_env=False)
    return Pipeline.from_settings(settings).analyze(path)
