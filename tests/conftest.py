"""Shared fixtures. Real SEM data come from $QCLOOP_SEM_DATA or ../shared/data/sem."""

from __future__ import annotations

from pathlib import Path

import pytest

from qcloop.data import sem_data_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def sem_data() -> Path:
    """Folder holding konstanz/ and jeol/; skips the test with a clear reason when absent."""
    d = sem_data_dir()
    if d is None:
        pytest.skip("real SEM images not found: set QCLOOP_SEM_DATA or place them in ../shared/data/sem")
    return d
