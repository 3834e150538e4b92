"""The whole per-image pipeline with the foundation backends (tiny models, real code paths)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the 'foundation' extra (torch)")
pytest.importorskip("segment_anything", reason="needs segment-anything")
pytest.importorskip("transformers", reason="needs transformers")


def test_pipeline_sam_prompted_with_dinov2_pooled(tiny_sam_cfg, tiny_dinov2_cfg, synth_image):
    pytest.importorskip("qcloop.measure", reason="needs the measurement stage (qcloop.measure)")
    from qcloop.config import ImagingConfig, PipelineConfig
    from qcloop.pipeline import Pipeline

    cfg = PipelineConfig(segmenter="sam", embedder="dinov2",
                         sam=tiny_sam_cfg.model_copy(update={"max_area_ratio": None}),
                         dinov2=tiny_dinov2_cfg.model_copy(update={"mode": "pooled"}))
    result = Pipeline(ImagingConfig(), cfg).analyze(synth_image)
    n = len(result.particles)
    assert n >= 1 and result.masks.n_particles == n
    assert result.embeddings.shape == (n, 32) and np.isfinite(result.embeddings).all()
    assert {"segment", "embed"} <= set(result.stage_seconds)
