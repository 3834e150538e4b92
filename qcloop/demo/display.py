"""What the demo shows: one table row per batch and ``demo.png``.

A row (:func:`batch_row`) holds what the daemon published about the batch (its
``batches/result`` flat metrics and verdict, its ``control/decision``, the suggestion and the
line's ack) next to what the simulated line really made (hidden truth: sphere yield, sharpness),
so the table and the plot can show both.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from qcloop.demo.config import DEMO_CONFIG, ECD_TARGET_NM, ECD_TOLERANCE_NM, SILHOUETTE_MIN, SPHERE_MIN

#: the table's class columns (short names), in this order; classes outside it are summed as "other"
CLASSES = (("sphere", "sph"), ("rod", "rod"), ("triangle", "tri"), ("cube", "cube"))


def batch_row(rec: Any) -> dict[str, Any]:
    """The table/plot row of one :class:`~qcloop_adapters.controllers.simulated_reactor.BatchRecord`."""
    res = rec.result or {}
    flat = res.get("flat") or {}
    unc = res.get("uncertainty") or {}
    dec = rec.decision or {}
    fractions = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("class_fraction.") and v is not None}
    ecd = {c: flat.get(f"ecd_nm.{c}.mean") for c, _ in CLASSES}
    sugg = ""
    if rec.suggestion:
        parts = [f"{s['name']} {s['current']:.4g}->{s['suggested']:.4g}" for s in rec.suggestion["setpoints"]]
        sugg = ", ".join(parts) + (f" ({rec.ack})" if rec.ack else " (no ack)")
    elif dec:
        sugg = f"{dec.get('action')}: {dec.get('reason')}"
    return {
        "batch": rec.batch,
        "n_particles": flat.get("n_particles"),
        "class_fractions": fractions,
        "ecd_nm": ecd,
        "ecd_sphere_ci95_nm": unc.get("ecd_nm.sphere.mean"),
        "inter_class_variance": flat.get("inter_class_variance"),
        "intra_class_variance": flat.get("intra_class_variance"),
        "silhouette": flat.get("silhouette"),
        "verdict": res.get("verdict") if res else None,
        "passed": bool(dec.get("verdict_passed")) if dec else False,
        "setpoints": dict(rec.setpoints),
        "suggestion": sugg,
        "decision": dec.get("reason"),
        "true": {"sphere_fraction": rec.true.sphere_fraction, "sharpness": rec.true.sharpness,
                 "ecd_nm": rec.true.mean_ecd_nm},
    }


def _num(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, fmt)


HEADER = ("batch      n | " + " ".join(f"{s:>4}" for _, s in CLASSES) + " | ECD nm: sphere       "
          + " ".join(f"{s:>4}" for _, s in CLASSES[1:]) + " | inter intra silh. | verdict suggestion")


def format_row(row: Mapping[str, Any]) -> str:
    """One line of the live table (missing values print as ``-``)."""
    fr = row.get("class_fractions") or {}
    ecd = row.get("ecd_nm") or {}
    sphere = _num(ecd.get("sphere"), ".1f")
    if row.get("ecd_sphere_ci95_nm") is not None and sphere != "-":
        sphere += f" ± {_num(row['ecd_sphere_ci95_nm'], '.1f')}"
    return (f"{row['batch']:<7} {_num(row.get('n_particles'), '.0f'):>4} | "
            + " ".join(f"{_num(fr.get(c, 0.0) if fr else None, '.2f'):>4}" for c, _ in CLASSES)
            + f" | {sphere:>19} " + " ".join(f"{_num(ecd.get(c), '.0f'):>4}" for c, _ in CLASSES[1:])
            + f" | {_num(row.get('inter_class_variance'), '5.1f'):>5} {_num(row.get('intra_class_variance'), '5.1f'):>5} "
            f"{_num(row.get('silhouette'), '.2f'):>5} | {str(row.get('verdict') or '-'):<7} {row.get('suggestion', '')}")


def plot(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """``demo.png``: class fractions, sphere ECD, separation metrics and both setpoints per batch,
    with the targets; verdicts marked on every panel (green pass, red fail)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(1, len(rows) + 1))

    def series(get) -> list[float]:
        out = []
        for r in rows:
            v = get(r)
            out.append(float(v) if v is not None and math.isfinite(float(v)) else float("nan"))
        return out

    fig, axes = plt.subplots(4, 1, figsize=(8.5, 11), sharex=True)
    ax = axes[0]
    for cls, _ in CLASSES:
        ax.plot(x, series(lambda r, c=cls: (r.get("class_fractions") or {}).get(c, 0.0)), "o-", label=cls, ms=4)
    ax.plot(x, series(lambda r: r["true"]["sphere_fraction"]), "x--", color="grey", label="sphere (true, hidden)")
    ax.axhline(SPHERE_MIN, color="tab:green", ls=":", label=f"target sphere ≥ {SPHERE_MIN:g}")
    ax.set_ylabel("class fraction")
    ax.set_ylim(0, 1)
    ax.legend(loc="center right", fontsize=7, ncol=2)
    ax.set_title("qcloop demo: shape classes, size and class separation drive the loop")

    ax = axes[1]
    ax.axhspan(ECD_TARGET_NM - ECD_TOLERANCE_NM, ECD_TARGET_NM + ECD_TOLERANCE_NM, color="tab:green", alpha=0.15,
               label=f"target {ECD_TARGET_NM:g} ± {ECD_TOLERANCE_NM:g} nm")
    ax.errorbar(x, series(lambda r: (r.get("ecd_nm") or {}).get("sphere")),
                yerr=[v if math.isfinite(v) else 0.0 for v in series(lambda r: r.get("ecd_sphere_ci95_nm"))],
                fmt="o-", capsize=3, label="sphere ECD mean (95 % CI)")
    ax.plot(x, series(lambda r: r["true"]["ecd_nm"]), "x--", color="grey", label="true ECD (hidden)")
    ax.set_ylabel("ECD (nm)")
    ax.legend(loc="best", fontsize=7)

    ax = axes[2]
    sil = series(lambda r: r.get("silhouette"))
    ax.plot(x, sil, "o-", color="tab:purple", label="silhouette")
    ax.axhline(SILHOUETTE_MIN, color="tab:purple", ls=":", label=f"target silhouette ≥ {SILHOUETTE_MIN:g}")
    ax.set_ylabel("silhouette")
    ax2 = ax.twinx()
    ax2.plot(x, series(lambda r: r.get("inter_class_variance")), "s--", color="tab:blue", ms=4, label="inter-class var.")
    ax2.plot(x, series(lambda r: r.get("intra_class_variance")), "v--", color="tab:red", ms=4, label="intra-class var.")
    ax2.set_ylabel("variance (standardised)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=7)

    ax = axes[3]
    specs = {s["name"]: s for s in DEMO_CONFIG["control"]["setpoints"]}
    ax.plot(x, series(lambda r: r["setpoints"].get("temperature")), "o-", color="tab:orange", label="temperature")
    ax.set_ylabel(f"temperature ({specs['temperature']['unit']})")
    ax2 = ax.twinx()
    ax2.plot(x, series(lambda r: r["setpoints"].get("reagent_ratio")), "s-", color="tab:brown", label="reagent ratio")
    ax2.set_ylabel("reagent ratio")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=7)
    ax.set_xlabel("batch (setpoints used for it; green: every target met, red: not)")
    ax.set_xticks(x)
    for a in axes:
        for xi, r in zip(x, rows):
            a.axvspan(xi - 0.5, xi + 0.5, color="tab:green" if r.get("passed") else "tab:red", alpha=0.06, lw=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
