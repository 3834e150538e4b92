"""Circle fits of the lobe grouping (qcloop.lobes.circles)."""

from __future__ import annotations

import numpy as np

from qcloop.lobes.circles import _fit_circle_groups, _solve3


def test_solve3_solves_every_system_and_marks_singular_ones_nan():
    rng = np.random.default_rng(0)
    mat = rng.normal(size=(6, 3, 3))
    x = rng.normal(size=(6, 3))
    mat[2] = [[1, 2, 3], [2, 4, 6], [0, 1, 1]]  # rank 2
    mat[4] = 0.0
    rhs = np.einsum("nij,nj->ni", mat, x)
    out = _solve3(mat, rhs)
    ok = np.array([True, True, False, True, False, True])
    np.testing.assert_allclose(out[ok], x[ok], rtol=1e-10)
    assert np.isnan(out[~ok]).all()
    assert _solve3(np.zeros((0, 3, 3)), np.zeros((0, 3))).shape == (0, 3)


def test_batched_fit_recovers_circles_and_rejects_lines():
    t = np.linspace(0, 1.5 * np.pi, 40)
    groups = [(10.0 + 7.0 * np.sin(t), 20.0 + 7.0 * np.cos(t)),        # 270 degrees of arc
              (50.0 + 30.0 * np.sin(t / 3), 5.0 + 30.0 * np.cos(t / 3)),  # 90 degrees
              (np.zeros(40), np.arange(40.0))]                            # a straight line
    y = np.concatenate([g[0] for g in groups])
    x = np.concatenate([g[1] for g in groups])
    group = np.repeat(np.arange(3), 40)
    cy, cx, r, rms = _fit_circle_groups(group, y, x, 3)
    np.testing.assert_allclose(np.c_[cy, cx, r][:2], [[10, 20, 7], [50, 5, 30]], atol=1e-8)
    np.testing.assert_allclose(rms[:2], 0.0, atol=1e-8)
    assert np.isnan([cy[2], cx[2], r[2], rms[2]]).all()
