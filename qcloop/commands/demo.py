"""``qcloop demo``: the closed loop end to end on this machine (broker, daemon, simulated line).

Uses the MQTT broker on localhost:1883 if one answers, else starts ``mosquitto`` (or, without
it, a minimal pure-Python broker) for the demo's lifetime; runs the daemon as a subprocess and a
simulated synthesis line whose size starts 20 % off target; prints one table row per batch and
writes OUT/demo.png. Exit 0 once the targets are met for --hold consecutive batches, 1 when
--batches pass without that. See docs/control.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the closed loop on a simulated synthesis line",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=15, metavar="N", help="stop after N batches (default 15)")
    p.add_argument("--out", type=Path, default=Path("demo-out"), metavar="DIR",
                   help="working folder: watch/, state/, truth/, demo.png, daemon.log (default ./demo-out)")
    p.add_argument("--hold", type=int, default=3, metavar="K",
                   help="targets must hold for K consecutive batches (default 3)")
    p.add_argument("--planner", choices=("pi", "bayes"), default="pi")
    p.add_argument("--mode", choices=("advisory", "command"), default="advisory")
    p.add_argument("--broker", choices=("auto", "mosquitto", "python"), default="auto",
                   help="auto: use localhost:1883 if a broker answers, else start mosquitto, else the "
                        "Python fallback; mosquitto/python: start that one")
    p.add_argument("--images-per-batch", type=int, default=3, metavar="K")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qcloop.demo import run_demo
    from qcloop.errors import QcloopError

    if args.batches < 1 or args.hold < 1 or args.images_per_batch < 1:
        raise QcloopError("--batches, --hold and --images-per-batch must be at least 1")
    res = run_demo(batches=args.batches, out=args.out, hold=args.hold, planner=args.planner, mode=args.mode,
                   seed=args.seed, images_per_batch=args.images_per_batch, broker=args.broker)
    if res.met:
        print(f"targets met from batch {res.batches_to_target} on, held for {args.hold} batches "
              f"({len(res.rows)} batches, {res.seconds:.0f} s). Plot: {res.plot}")
        return 0
    print(f"targets NOT met within {len(res.rows)} batches ({res.seconds:.0f} s). Plot: {res.plot}")
    return 1
