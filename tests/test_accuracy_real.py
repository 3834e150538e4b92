"""Acceptance figures of the classical pipeline on the real Konstanz SEM images.

The 15 images are analysed once (segmentation, lobe grouping, measurement) and compared with
the NanoparticlesSAM reference (SAM ViT-H masks, ``reference_sam_vith.csv``; see the data
README). The thresholds are the issue's acceptance figures; where the classical pipeline does
not reach one yet, the test is marked ``xfail(strict=True)`` with the measured figure, so it
turns into a failure (to be updated) as soon as the figure is met.
"""

from __future__ import annotations

import ast

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

from qcloop.config import ClassicalConfig, ImagingConfig, LobesConfig
from qcloop.imaging import load_image
from qcloop.lobes import group_lobes
from qcloop.measure import measure_particles
from qcloop.segment.classical import ClassicalSegmenter

pytestmark = pytest.mark.real_data

SERIES = {
    "spheres": [f"GM_59_{i}" for i in range(20, 25)],
    "dumbbells": [f"GM_116_{i}" for i in range(20, 25)],
    "trimers": [f"GM_124_0{i}" for i in range(5)],
}


@pytest.fixture(scope="module")
def analysed(sem_data):
    """name -> (SemImage, ParticleMasks, particle table) for the 15 Konstanz images."""
    segment = ClassicalSegmenter(ClassicalConfig())
    out = {}
    for names in SERIES.values():
        for name in names:
            image = load_image(sem_data / "konstanz" / f"{name}.tif", ImagingConfig())
            masks = group_lobes(segment(image), image, LobesConfig())
            out[name] = (image, masks, measure_particles(image, masks))
    return out


@pytest.fixture(scope="module")
def reference(sem_data) -> pd.DataFrame:
    ref = pd.read_csv(sem_data / "konstanz" / "reference_sam_vith.csv")
    rc = np.array([ast.literal_eval(v) for v in ref["centroid_rc"]], float)
    return ref.assign(row=rc[:, 0], col=rc[:, 1])


def _groups(ref: pd.DataFrame, name: str, size: int) -> np.ndarray:
    """Centres (row, col) of the reference particles made of ``size`` masks: mean of the lobe
    centroids."""
    r = ref[ref.image == name]
    g = r.groupby("group_id").agg(row=("row", "mean"), col=("col", "mean"), n=("row", "size"))
    return g.loc[g.n == size, ["row", "col"]].to_numpy()


def _matched_fraction(analysed, ref, series: str, lobes: int, accept: tuple[int, ...] | None = None) -> float:
    """Share of the reference particles of ``lobes`` masks with a detected particle (with a
    lobe count in ``accept``, default ``(lobes,)``) whose centroid lies within 10 px of the
    mean of the reference lobe centroids."""
    accept = accept or (lobes,)
    hit = total = 0
    for name in SERIES[series]:
        table = analysed[name][2]
        centres = _groups(ref, name, lobes)
        cand = table.loc[table.lobes.isin(accept), ["centroid_y_px", "centroid_x_px"]].to_numpy()
        total += len(centres)
        if len(cand) and len(centres):
            d, _ = cKDTree(cand).query(centres)
            hit += int((d <= 10.0).sum())
    return hit / total


def _inner_spheres(analysed) -> pd.DataFrame:
    return pd.concat([analysed[n][2] for n in SERIES["spheres"]]).query("~touches_border")


def test_no_particle_in_the_banner(analysed):
    for image, masks, table in analysed.values():
        assert image.analysed_height_px <= 702  # the info bar starts at row 701
        assert masks.labels.shape[0] == image.analysed_height_px
        assert (table.bbox_r1 <= image.analysed_height_px).all()


def test_sphere_mean_ecd_within_2_percent(analysed):
    ecd = _inner_spheres(analysed).ecd_nm
    assert len(ecd) > 1500
    assert ecd.mean() == pytest.approx(130.8, rel=0.02)


@pytest.mark.xfail(strict=True, reason="measured SD 6.58 nm over all 2029 inner spheres; 4.35 nm over the 1512 "
                   "that match a reference sphere; the 517 others (SD 10.7 nm, small dim and bright free-standing "
                   "spheres) are outside the reference's selection; see README 'About the spread'")
def test_sphere_ecd_spread(analysed):
    assert _inner_spheres(analysed).ecd_nm.std() <= 1.5 * 3.5


def test_sphere_spread_on_the_reference_spheres(analysed, reference):
    """Cuts between touching spheres do not inflate the spread: over the spheres the reference
    also measured, our ECD spread is within the issue's 1.5x the reference's, and each ECD is
    close to the reference's ECD of the same particle (measured: SD 4.35 nm; difference
    -0.54 +/- 1.70 nm)."""
    ours, theirs = [], []
    for name in SERIES["spheres"]:
        table = analysed[name][2].query("~touches_border")
        r = reference[reference.image == name]
        d, j = cKDTree(table[["centroid_y_px", "centroid_x_px"]].to_numpy()).query(r[["row", "col"]].to_numpy())
        ok = d <= 5.0
        ours.append(table.ecd_nm.to_numpy()[j[ok]])
        theirs.append(2.0 * np.sqrt(r.area_px.to_numpy()[ok] / np.pi) * 4.466)
    ours, theirs = np.concatenate(ours), np.concatenate(theirs)
    assert len(ours) > 1400
    assert ours.std(ddof=1) <= 1.5 * 3.5
    diff = ours - theirs
    assert abs(diff.mean()) <= 1.5 and diff.std(ddof=1) <= 2.5


def test_reference_spheres_found(analysed, reference):
    found = total = 0
    for name in SERIES["spheres"]:
        table = analysed[name][2]
        r = reference[reference.image == name]
        d, _ = cKDTree(table[["centroid_y_px", "centroid_x_px"]].to_numpy()).query(r[["row", "col"]].to_numpy())
        found += int((d <= 5.0).sum())
        total += len(r)
    assert found / total >= 0.95


def test_reference_dumbbells_found_with_two_lobes(analysed, reference):
    assert _matched_fraction(analysed, reference, "dumbbells", 2) >= 0.90


def test_dumbbell_lobe_diameter_within_3_percent(analysed):
    t = pd.concat([analysed[n][2] for n in SERIES["dumbbells"]]).query("lobes == 2 and ~touches_border")
    diam = np.array([float(v) for s in t.lobe_diameters_nm for v in s.split(";")])
    assert len(diam) > 1000
    assert diam.mean() == pytest.approx(173.0, rel=0.03)


def test_reference_trimers_found_with_three_lobes(analysed, reference):
    assert _matched_fraction(analysed, reference, "trimers", 3) >= 0.80


def test_most_reference_fused_particles_have_several_lobes(analysed, reference):
    """Regression guard on what the classical pipeline reaches today (measured: 92 % of the
    reference dumbbells as 2-lobe particles, 87 % of the trimers as fused 2- or 3-lobe ones)."""
    assert _matched_fraction(analysed, reference, "dumbbells", 2) >= 0.85
    assert _matched_fraction(analysed, reference, "trimers", 3, accept=(2, 3)) >= 0.70
