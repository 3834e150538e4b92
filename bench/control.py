"""Closed-loop control benchmark on the simulated reactor (pure functions, no MQTT, no images).

Scenario A -- one setpoint (temperature), PI rules: the batch ECD mean starts 20 % above its
target (50 ± 2.5 nm); batches until the verdict passes and whether it then holds for 3 more.

Scenario B -- two setpoints (temperature, reagent ratio), nonlinear hidden response (size falls
with temperature and grows with the ratio; the sphere yield is a ridge along an optimal ratio
that moves with temperature): targets ECD mean 40 ± 2 nm and sphere fraction >= 0.85, random
start inside the bounds per seed. Batches until the first passing verdict (budget 12), for the
PI rules (ECD -> temperature only; the sphere yield has no monotone rule), the Bayesian planner
with per-metric GPs (``model: metrics``, default) and with one GP of the objective
(``model: objective``).

Scenario C -- the demo campaign (``qcloop demo``): configs/demo.yaml's targets (sphere fraction
>= 0.85, sphere ECD 50 +- 2.5 nm, silhouette >= 0.55), rules and setpoints, started where the
demo starts; batches until every target is met and held for 3 batches (budget 12), for the PI
rules and the Bayesian planner. The silhouette comes from the line's separation surface
(SEPARATION_FIT, fitted to the image path by bench/fit_separation.py). ``--images`` runs the real
thing instead: ``qcloop demo`` per seed and planner (broker on 127.0.0.1:1883, daemon, images;
about 40 s a run).

Every batch is a finite particle sample (200 particles; 240 in scenario C, as the demo's six
images) with batch-to-batch noise; metrics and 95 % half-widths come from qcloop.batch; verdicts
from qcloop.targets; decisions from qcloop.control.Controller, exactly as in the daemon.

    .venv/bin/python bench/control.py                 # seeds 0-4
    .venv/bin/python bench/control.py --seeds 20      # seeds 0-19
    .venv/bin/python bench/control.py --images        # scenario C through broker, daemon and images
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qcloop_adapters.controllers.simulated_reactor import ReactorModel, simulate_campaign  # noqa: E402
from qcloop.config import load_settings  # noqa: E402

BUDGET = 12


def one_setpoint(planner: str = "pi"):
    return load_settings(use_env=False, targets={"ecd_nm.mean": {"target": 50.0, "tolerance": 2.5}}, control={
        "enabled": True, "planner": planner, "cooldown_batches": 0,
        "setpoints": [{"name": "temperature", "unit": "degC", "min": 60, "max": 100, "max_step": 2.0}],
        "rules": [{"metric": "ecd_nm.mean", "setpoint": "temperature", "gain": 0.4}]})


def two_setpoints(planner: str, model: str = "metrics"):
    return load_settings(
        use_env=False,
        targets={"ecd_nm.mean": {"target": 40.0, "tolerance": 2.0}, "class_fraction.sphere": {"min": 0.85}},
        control={"enabled": True, "planner": planner, "cooldown_batches": 0,
                 "setpoints": [{"name": "temperature", "unit": "degC", "min": 65, "max": 95, "max_step": 4.0},
                               {"name": "reagent_ratio", "unit": "", "min": 0.6, "max": 2.0, "max_step": 0.25}],
                 "rules": [{"metric": "ecd_nm.mean", "setpoint": "temperature", "gain": 0.4}],
                 "bayes": {"objective": {"ecd_nm.mean": 1.0, "class_fraction.sphere": 1.0}, "model": model}})


def random_start(seed: int) -> dict[str, float]:
    rng = np.random.default_rng(100 + seed)
    return {"temperature": float(rng.uniform(65, 95)), "reagent_ratio": float(rng.uniform(0.6, 2.0))}


def first_pass(steps) -> int | None:
    return next((st.batch for st in steps if st.passed), None)


def temperature_for(model: ReactorModel, ecd: float) -> float:
    lo, hi = 60.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if model.response({"temperature": mid}).mean_ecd_nm > ecd else (lo, mid)
    return (lo + hi) / 2


def demo_settings(planner: str):
    from qcloop.demo.config import DEMO_CONFIG

    cfg = json.loads(json.dumps(DEMO_CONFIG))
    cfg["control"]["planner"] = planner
    return load_settings(use_env=False, targets=cfg["targets"], control=cfg["control"], batch=cfg["batch"])


def held_from(passed: list[bool], hold: int = 3) -> int | None:
    """First batch of the first run of ``hold`` passing batches (1-based), None without one."""
    return next((k + 1 for k in range(len(passed) - hold + 1) if all(passed[k:k + hold])), None)


def demo_campaign(seeds: list[int], images: bool) -> None:
    from qcloop.demo.config import START_SETPOINTS

    where = "broker + daemon + SEM images (qcloop demo)" if images else "pure functions"
    print(f"Scenario C: the demo campaign, {where}; batches until every target holds for 3 (budget {BUDGET})")
    for planner in ("pi", "bayes"):
        firsts, t0 = [], time.perf_counter()
        for seed in seeds:
            if images:
                from qcloop.demo.broker import free_port
                from qcloop.demo.run import run_demo

                out = Path(tempfile.mkdtemp(prefix=f"qcloop-bench-{planner}{seed}-"))
                res = run_demo(out=out, seed=seed, planner=planner, batches=BUDGET, start_broker="never",
                               metrics_port=free_port(), echo=lambda _line: None, progress=False)
                passed = [r["passed"] for r in res.rows]
            else:
                steps = simulate_campaign(demo_settings(planner), ReactorModel(), START_SETPOINTS, BUDGET, seed,
                                          n_particles=240)
                passed = [st.passed for st in steps]
            k = held_from(passed)
            firsts.append(k)
            print(f"  {planner:<5} seed {seed}: targets met from batch {k if k else '-'}, held 3   "
                  + "".join("P" if p else "." for p in passed), flush=True)
        ok = sum(1 for k in firsts if k is not None and k + 2 <= BUDGET)
        dt = (time.perf_counter() - t0) / len(seeds)
        print(f"  -> {planner:<5} {ok}/{len(seeds)} seeds met and held within {BUDGET} batches "
              f"(batches to target {', '.join(str(k) if k else '>' + str(BUDGET) for k in firsts)}; {dt:.1f} s per campaign)\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    ap.add_argument("--skip-objective", action="store_true", help="skip the bayes model=objective variant")
    ap.add_argument("--images", action="store_true",
                    help="scenario C only, through the real broker, daemon and images (qcloop demo per seed)")
    args = ap.parse_args(argv)
    seeds = list(range(args.seeds))
    model = ReactorModel()
    if args.images:
        demo_campaign(seeds, images=True)
        return 0

    print("Scenario A: one setpoint, PI, start 20 % above the ECD target (50 ± 2.5 nm)")
    s = one_setpoint()
    start = {"temperature": temperature_for(model, 60.0)}
    a_ok = 0
    for seed in seeds:
        steps = simulate_campaign(s, model, start, 14, seed)
        k = first_pass(steps)
        held = k is not None and all(st.passed for st in steps[k - 1:k + 3])
        a_ok += int(k is not None and k <= 8 and held)
        trace = "".join("P" if st.passed else "." for st in steps)
        print(f"  seed {seed}: within tolerance at batch {k}, held 3 more: {held}   {trace}")
    print(f"  -> {a_ok}/{len(seeds)} seeds within 8 batches and held\n")

    print(f"Scenario B: two setpoints, nonlinear response, random start, budget {BUDGET} batches")
    variants = [("pi", "pi", "metrics"), ("bayes (model: metrics)", "bayes", "metrics")]
    if not args.skip_objective:
        variants.append(("bayes (model: objective)", "bayes", "objective"))
    summary = []
    for label, planner, gp_model in variants:
        s = two_setpoints(planner, gp_model)
        needed = []
        t0 = time.perf_counter()
        for seed in seeds:
            steps = simulate_campaign(s, model, random_start(seed), BUDGET, seed)
            needed.append(first_pass(steps))
        dt = time.perf_counter() - t0
        ok = sum(1 for k in needed if k is not None and k <= BUDGET)
        shown = ", ".join(f"{seed}:{k if k is not None else '>' + str(BUDGET)}" for seed, k in zip(seeds, needed))
        print(f"  {label:<26} batches needed per seed  {shown}")
        summary.append((label, ok, dt))
    for label, ok, dt in summary:
        print(f"  -> {label:<26} {ok}/{len(seeds)} seeds within {BUDGET} batches "
              f"({dt / len(seeds):.1f} s planning+simulation per campaign)")
    print()
    demo_campaign(seeds, images=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
