"""Tiny random-initialised SAM and DINOv2 models, built once per session in a temp folder.

They go through the same loaders users use (config → qcloop.models → segmenter/embedder).
Random weights: outputs are arbitrary but real (never faked); the tests compare code paths
against each other (ours vs segment-anything's stock predictor, batched vs one-by-one...).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from qcloop.config import Dinov2Config, SamArchitecture, SamConfig

# Each test module starts with pytest.importorskip("torch") etc.; fixtures import lazily so the
# core install (no torch) collects this folder and skips those modules with the reason.

TINY_SAM = dict(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1])


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/foundation/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.foundation)


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory) -> Path:
    """``torch.save(state_dict)`` of a tiny SAM, named ``tiny_sam_<sha256[:6]>.pth``."""
    import torch

    from qcloop.models import build_sam

    torch.manual_seed(1234)
    model = build_sam(**TINY_SAM)
    d = tmp_path_factory.mktemp("sam")
    tmp = d / "tiny.pth"
    torch.save(model.state_dict(), tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = d / f"tiny_sam_{digest[:6]}.pth"
    tmp.rename(path)
    return path


@pytest.fixture(scope="session")
def tiny_sam_cfg(tiny_sam_checkpoint) -> SamConfig:
    return SamConfig(mode="prompted", checkpoint=tiny_sam_checkpoint,
                     architecture=SamArchitecture(**TINY_SAM), device="cpu")


@pytest.fixture(scope="session")
def tiny_sam_model(tiny_sam_cfg):
    from qcloop.models import load_sam

    return load_sam(tiny_sam_cfg)


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory) -> Path:
    """``Dinov2Model(small config).save_pretrained(dir)``: hidden 32, 2 layers, patch 14."""
    import torch
    from transformers import Dinov2Config as HFDinov2Config
    from transformers import Dinov2Model

    torch.manual_seed(4321)
    cfg = HFDinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, image_size=518, patch_size=14)
    d = tmp_path_factory.mktemp("dinov2") / "tiny-dinov2"
    Dinov2Model(cfg).eval().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_dinov2_cfg(tiny_dinov2_dir) -> Dinov2Config:
    return Dinov2Config(model=str(tiny_dinov2_dir), device="cpu", batch_size=4)


@pytest.fixture(scope="session")
def tiny_dinov2_model(tiny_dinov2_cfg):
    from qcloop.models import load_dinov2

    return load_dinov2(tiny_dinov2_cfg)


@pytest.fixture(scope="session")
def synth_image():
    """A small synthetic SEM image (spheres and dumbbells) with a banner, as a SemImage."""
    from qcloop.imaging import load_array
    from qcloop.synth import SynthSpec, generate_image

    spec = SynthSpec(width_px=320, height_px=256, pixel_size_nm=4.0, mean_ecd_nm=120,
                     class_mix={"sphere": 0.6, "dumbbell": 0.4}, n_particles=14, banner=True)
    s = generate_image(spec, seed=7)
    from qcloop.config import ImagingConfig

    rows = s.pixels.shape[0] - s.labels.shape[0]
    img = load_array(s.pixels, name="synth.tif",
                     cfg=ImagingConfig(banner="fixed", banner_rows=rows), pixel_size_nm=4.0)
    assert img.analysed_height_px == s.labels.shape[0]
    return img


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)
