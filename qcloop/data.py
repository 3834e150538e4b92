"""Where the real SEM sample images live (for the demo, benchmarks and tests)."""

from __future__ import annotations

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]


def sem_data_dir() -> Path | None:
    """``$QCLOOP_SEM_DATA`` if set, else ``../shared/data/sem`` beside the checkout; None if absent."""
    env = os.environ.get("QCLOOP_SEM_DATA")
    for c in ([Path(env)] if env else []) + [_REPO.parent / "shared" / "data" / "sem"]:
        if (c / "konstanz").is_dir():
            return c
    return None
