"""Splitting regions into lobes (qcloop.lobes.split)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from qcloop.config import ClassicalConfig, ImagingConfig, LobesConfig
from qcloop.imaging import load_image
from qcloop.lobes import group_lobes, split_by_seams
from qcloop.segment.classical import ClassicalSegmenter


def _peanut_with_seam(darkness: float) -> tuple[np.ndarray, np.ndarray]:
    """Two fused discs (radius 20, centres 30 px apart along a row) in one region, a 1-px line
    ``darkness`` darker than the particle at their neck (column 57)."""
    yy, xx = np.mgrid[:80, :120]
    own = ((yy - 40) ** 2 + (xx - 42) ** 2 < 20**2) | ((yy - 40) ** 2 + (xx - 72) ** 2 < 20**2)
    grey = np.where(own, 0.8, 0.3)
    grey[own & (xx == 57)] -= darkness
    return own.astype(np.int32), ndi.gaussian_filter(grey, 1.0)


def test_a_dark_seam_at_a_neck_is_cut_straight_across():
    labels, grey = _peanut_with_seam(0.2)
    out, changed = split_by_seams(labels, grey, 20.0, 0.5)
    assert sorted(changed.tolist()) == [1, 2]
    np.testing.assert_array_equal(out[labels > 0] == out[40, 42], np.nonzero(labels)[1] <= 57)


def test_seam_depth_sets_how_dark_a_seam_must_be():
    labels, grey = _peanut_with_seam(0.2)  # darker than the grey beside it by ~0.15 x the span 0.5
    assert split_by_seams(labels, grey, 20.0, 0.5, min_depth=0.1)[1].size == 2
    assert split_by_seams(labels, grey, 20.0, 0.5, min_depth=0.2)[1].size == 0
    assert split_by_seams(*_peanut_with_seam(0.0), 20.0, 0.5)[1].size == 0  # no seam, no cut


@pytest.mark.real_data
def test_group_lobes_honours_seam_depth_on_real_trimers(sem_data):
    image = load_image(sem_data / "konstanz" / "GM_124_00.tif", ImagingConfig())
    seg = ClassicalSegmenter(ClassicalConfig())(image)
    n_lobes = [int(group_lobes(seg, image, LobesConfig(seam_depth=d)).lobe_parent.size) for d in (0.05, 10.0)]
    assert n_lobes[0] > n_lobes[1]  # the default cuts trimers' middle lobes along their seams
