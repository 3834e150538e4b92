"""Options shared by the image commands (``analyze``, ``batch``, ``crops``)."""

from __future__ import annotations

import argparse
import math
from typing import Any, Sequence

PIXEL_SIZE_HELP = ("pixel size in nm for images whose file carries none (sets imaging.pixel_size_nm; "
                   "files with vendor metadata keep theirs unless imaging.force_pixel_size is true)")


def _positive_nm(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive number of nm, got {text!r}")
    return v


def add_pixel_size_option(parser: argparse.ArgumentParser) -> None:
    """``--pixel-size-nm NM``."""
    parser.add_argument("--pixel-size-nm", type=_positive_nm, metavar="NM", help=PIXEL_SIZE_HELP)


def apply_pixel_size(settings: Any, args: argparse.Namespace) -> None:
    """Put ``--pixel-size-nm`` into ``settings.imaging`` (no-op when not given)."""
    if getattr(args, "pixel_size_nm", None) is not None:
        settings.imaging.pixel_size_nm = args.pixel_size_nm


def pixel_size_warning(images_without: Sequence[str], n_images: int) -> str | None:
    """The warning for images measured in pixels (None when every image has a pixel size)."""
    k = len(images_without)
    if k == 0:
        return None
    names = ", ".join(images_without[:5]) + (f" and {k - 5} more" if k > 5 else "")
    which = "no image carries" if k == n_images else f"{k} of {n_images} images carry"
    return (f"{which} a pixel size ({names}): their sizes are in px only (the *_px columns; *_nm is "
            "empty); give --pixel-size-nm NM or set imaging.pixel_size_nm in the config")
