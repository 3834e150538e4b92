"""Fit the simulated line's image-free separation metrics to the real image path.

``measure`` in ``adapters/controllers/simulated_reactor.py`` (used by ``bench/control.py`` and
the fast tests) draws particle samples without images; the silhouette and the inter/intra-class
variance it reports come from :data:`SEPARATION_FIT`, a response surface in (sphere fraction p,
sharpness s). This script measures them on the image path, exactly as the demo does:

1. the demo's labelling batch (4 images at the demo's start setpoints), crops export, sorting
   by truth, ``qcloop train`` (:func:`qcloop.demo.labelling.train_classifier`);
2. batches of the demo's size and image settings (6 images of 512 x 384 px at 1.5 nm) on a grid of p x s, two seeds
   each, analysed by the pipeline with that classifier and scored like the daemon scores a
   closed batch (:func:`qcloop.daemon.batches.compute_batch`);
3. least squares of silhouette and inter/total on (1, p, s, p*s); prints the fitted
   ``SeparationFit(...)`` to paste into the reactor module, R² and the residual sd.

    .venv/bin/python bench/fit_separation.py [--seeds 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qcloop_adapters.controllers.simulated_reactor import (ReactorModel, SimulatedReactor, _mix,  # noqa: E402
                                                           shape_of)

P_GRID = (0.4, 0.55, 0.7, 0.85, 0.95)
S_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def main(argv: list[str] | None = None) -> int:
    from qcloop.config import load_settings
    from qcloop.daemon.batches import compute_batch
    from qcloop.demo.config import IMAGE_SETTINGS, IMAGES_PER_BATCH, LABELLING_IMAGES, START_SETPOINTS, write_config
    from qcloop.demo.labelling import train_classifier
    from qcloop.pipeline import Pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=2, help="batches per grid point (default 2)")
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="qcloop-fit-"))
    t0 = time.perf_counter()
    cfg = write_config(work, mqtt_host="127.0.0.1", mqtt_port=1883, metrics_port=9464)
    settings = load_settings(cfg, use_env=False)
    line = SimulatedReactor(host="", port=0, prefix="fit", watch_dir=work / "images", staging_dir=work / ".staging",
                            images_per_batch=IMAGES_PER_BATCH, **IMAGE_SETTINGS)
    model = ReactorModel()
    lab = model.response(START_SETPOINTS)
    images = line.export_images(lab, "LAB", work / "labelling" / "images", seed=7, n_images=LABELLING_IMAGES,
                                truth_dir=work / "labelling" / "truth")
    train_classifier(images, work / "labelling" / "truth", work / "labelling", cfg, Path(settings.pipeline.classifier))
    pipe = Pipeline.from_settings(settings)
    rows = []
    for p in P_GRID:
        for s in S_GRID:
            for rep in range(args.seeds):
                true = replace(lab, class_fractions=_mix(p), sharpness=s, **shape_of(s), mean_ecd_nm=50.0)
                name = f"P{int(p * 100)}S{int(s * 100)}R{rep}"
                paths = line.export_images(true, name, work / "grid", seed=1000 + len(rows))
                results = [pipe.analyze(q) for q in paths]
                out = compute_batch([r.particles for r in results], [r.embeddings for r in results],
                                    n_images=len(results), targets={}, min_particles=0)
                f = out.flat
                rows.append((p, s, f["silhouette"], f["inter_class_variance"] / f["total_variance"],
                             f["total_variance"], f.get("class_fraction.sphere", 0.0), f["n_particles"]))
                print(f"  p {p:.2f}  s {s:.2f}  seed {rep}: n {f['n_particles']:.0f}, sphere fraction "
                      f"{rows[-1][5]:.2f}, silhouette {f['silhouette']:.3f}, inter/total {rows[-1][3]:.3f}", flush=True)
    data = np.array(rows, dtype=float)
    X = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1], data[:, 0] * data[:, 1]])
    fits = {}
    for name, col in (("silhouette", 2), ("inter_share", 3)):
        ok = np.isfinite(data[:, col])  # NaN silhouette: fewer than two classes of two particles
        y = data[ok, col]
        coef, *_ = np.linalg.lstsq(X[ok], y, rcond=None)
        resid = y - X[ok] @ coef
        r2 = 1 - float(resid @ resid) / float(((y - y.mean()) ** 2).sum())
        fits[name] = (tuple(round(float(c), 4) for c in coef), round(float(resid.std(ddof=4)), 4), r2)
        print(f"{name}: coefficients (1, p, s, p*s) {fits[name][0]}, residual sd {fits[name][1]}, R^2 {r2:.3f}")
    total = round(float(np.median(data[:, 4])), 1)
    n_nan = int(np.isnan(data[:, 2]).sum())
    print(f"silhouette undefined (NaN) in {n_nan} of {len(data)} batches (left out of its fit)")
    print(f"\n{len(data)} batches, median {np.median(data[:, 6]):.0f} particles, {time.perf_counter() - t0:.0f} s\n")
    print("SEPARATION_FIT = SeparationFit(")
    print(f"    silhouette={fits['silhouette'][0]}, silhouette_noise={fits['silhouette'][1]},")
    print(f"    inter_share={fits['inter_share'][0]}, inter_share_noise={fits['inter_share'][1]}, total={total},")
    print(f"    fitted_on=\"bench/fit_separation.py --seeds {args.seeds}: {len(data)} batches of {IMAGES_PER_BATCH} images"
          f" ({IMAGE_SETTINGS['width_px']}x{IMAGE_SETTINGS['height_px']} px at {IMAGE_SETTINGS['pixel_size_nm']} nm), p in {P_GRID}, s in {S_GRID}\",")
    print(")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
