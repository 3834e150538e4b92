"""Lobe grouping: which segmented regions are lobes of one fused particle (dumbbell, trimer).

A segmenter's region may be a whole particle, one lobe of a fused particle, several fused lobes
in one piece, or a piece of a lobe. Each lobe of a fused particle is close to a disc; the part
of its outline facing the background is a circular arc, and where two lobes meet the image
shows a faint, darker *seam*. The grouping (:func:`group_lobes`) runs in three steps, all
relative to the typical lobe radius ``r`` of the image (the median largest inscribed radius of
the regions, :func:`lobe_radius_px`):

1. **Split regions into lobes**. Holes enclosed by one region are filled
   (:func:`fill_enclosed_holes`), and with ``LobesConfig.dim_lobes`` lobe-sized dim background
   blobs wedged between regions are added (:func:`recover_dim_lobes`). Regions whose outline
   facing the background is two or three circles, not one, are split along the circles'
   radical lines (:func:`split_by_circles`); parts too large for one disc are cut along a dark
   straight seam at a neck (:func:`split_by_seams`).
2. **Describe every pair of neighbouring lobes** (:func:`lobe_pair_features`): gap, neck
   width, contrast of the contact and of the line between the centroids, overlap of the
   lobes' circles, same segmented region.
3. **Decide** with a logistic model on these features, :data:`FUSE_MODEL`
   (:func:`fuse_logit`): best pair first, thresholds from :class:`qcloop.config.LobesConfig`.

One module per job:

==========================  ================================================================
:mod:`~.circles`            circle fits: :class:`Circle`, :func:`fit_circle`,
                            :func:`fit_circles`, :func:`lobe_circles`, :func:`exterior_circle`
:mod:`~.labels`             label utilities: :func:`lobe_radius_px`,
                            :func:`fill_enclosed_holes`, :func:`border_flags`
:mod:`~.dim_lobes`          dim-lobe recovery: :func:`recover_dim_lobes`
:mod:`~.split`              step 1: :func:`split_by_circles`, :func:`split_by_seams`
:mod:`~.pairs`              step 2: :func:`lobe_pair_features`
:mod:`~.fusion`             step 3: :data:`FUSE_MODEL`, :func:`fuse_logit`
:mod:`~.group`              all steps: :func:`group_lobes`
==========================  ================================================================

:func:`exterior_circle`, :func:`fit_circle` and :func:`fit_circles` are also useful on their
own (circles fitted to lobe outlines).

Where the numbers come from
---------------------------
What a user may tune is in :class:`qcloop.config.LobesConfig` (documented in
``configs/default.yaml``). Every other threshold is a named constant at the top of the module
that uses it; its comment says what it means and where it comes from. All were chosen by hand
on the 15 Konstanz images in ``../shared/data/sem/konstanz`` (spheres, dumbbells, trimers,
judged by the figures of ``bench/analyze.py``); none was fitted, and none has been checked on
other data. "(e996b90)" marks those in the first recorded version of the code, which kept no
record of how they were chosen; "(cebfcf5)" those that came with the small-lobe splits, open
seams and dim lobes of that commit. Numerical guards (``1e-9`` against division by zero,
pixel-centre offsets of 0.5) are not thresholds and stay literals. :data:`FUSE_MODEL` is
fitted; ``bench/fit_fuse_model.py`` refits it (it does not reproduce today's weights: see
:data:`FUSE_MODEL`'s comment in :mod:`qcloop.lobes.fusion`).
"""

from __future__ import annotations

from qcloop.lobes.circles import Circle, exterior_circle, fit_circle, fit_circles, lobe_circles
from qcloop.lobes.dim_lobes import recover_dim_lobes
from qcloop.lobes.fusion import FUSE_MODEL, _fuse_lobes, fuse_logit  # noqa: F401 (_fuse_lobes: tests)
from qcloop.lobes.group import _pieces_and_features, group_lobes  # noqa: F401 (tests)
from qcloop.lobes.labels import border_flags, fill_enclosed_holes, lobe_radius_px
from qcloop.lobes.pairs import lobe_pair_features
from qcloop.lobes.split import split_by_circles, split_by_seams

# _fuse_lobes and _pieces_and_features are imported here for the tests that drive the decision
# step and the costly steps apart; they are not part of the public API.
__all__ = [
    "FUSE_MODEL",
    "Circle",
    "border_flags",
    "exterior_circle",
    "fill_enclosed_holes",
    "fit_circle",
    "fit_circles",
    "fuse_logit",
    "group_lobes",
    "lobe_circles",
    "lobe_pair_features",
    "lobe_radius_px",
    "recover_dim_lobes",
    "split_by_circles",
    "split_by_seams",
]
