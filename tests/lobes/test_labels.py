"""Label utilities of the lobe grouping (qcloop.lobes.labels)."""

from __future__ import annotations

import numpy as np
import pytest

from qcloop.lobes.labels import _relabel


def test_relabel_numbers_labels_in_value_order_as_int32():
    labels = np.array([[0, 7, 7], [40, 0, 3], [2**40, 3, 0]], np.int64)
    out = _relabel(labels)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [[0, 2, 2], [3, 0, 1], [4, 1, 0]])


def test_relabel_without_background_starts_at_one():
    np.testing.assert_array_equal(_relabel(np.array([[5, 9], [9, 5]], np.uint16)), [[1, 2], [2, 1]])


def test_relabel_empty_and_negative():
    assert _relabel(np.zeros((0, 4), np.int64)).shape == (0, 4)
    with pytest.raises(ValueError, match="negative"):
        _relabel(np.array([[0, -1]]))
