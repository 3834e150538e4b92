"""The core install has no torch: qcloop, the CLI and the classical path must not need it, and
asking for a foundation model must say how to install it. Runs in a subprocess where importing
torch / segment_anything / transformers fails (needs no foundation extra itself)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "segment_anything", "transformers"):
                raise ImportError(f"blocked {name}")
            return None

    sys.meta_path.insert(0, Block())

    import numpy as np
    import qcloop, qcloop.cli, qcloop.models, qcloop.segment.sam, qcloop.embed.dinov2
    qcloop.cli.build_parser()
    from qcloop.config import PipelineConfig, SamConfig, Dinov2Config
    from qcloop.errors import ModelError
    from qcloop.segment import get_segmenter
    from qcloop.imaging import load_array
    from qcloop.synth import SynthSpec, generate_image

    s = generate_image(SynthSpec(width_px=200, height_px=160, n_particles=6, banner=False), seed=1)
    seg = get_segmenter(PipelineConfig())(load_array(s.pixels, pixel_size_nm=4.0))
    assert seg.n_regions > 0
    for build in (lambda: get_segmenter(PipelineConfig(segmenter="sam", sam=SamConfig(checkpoint="x.pth"))),
                  lambda: qcloop.embed.dinov2.Dinov2Embedder(Dinov2Config())):
        try:
            build()
        except ModelError as exc:
            assert "pip install 'qcloop[foundation]'" in str(exc), exc
        else:
            raise SystemExit("no ModelError")
    assert not any(m.split(".")[0] in ("torch", "transformers", "segment_anything") for m in sys.modules)
    print("OK")
    """
)


def test_core_paths_do_not_import_torch():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("OK")
