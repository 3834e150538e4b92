"""``qcloop demo``: the closed loop end to end on this machine (broker, daemon, simulated line).

The simulated line starts where the shape target fails: about half the particles are spheres,
the side products (rods, triangles, cubes) are rounded, ill-defined seeds, and the spheres are
~10 % too large. The demo first trains the few-shot shape classifier as a chemist would
(labelling batch, crops export, 10 crops per class sorted, qcloop train), then runs the daemon
against the line: every batch is segmented, classified and scored (sphere fraction >= 0.85,
sphere ECD 50 +- 2.5 nm, silhouette >= 0.55), and the controller moves the reagent ratio (shape
yield, class separation) and the temperature (size). One table row per batch; OUT/demo.png,
OUT/demo.json and the last batch's OUT/report/report.html at the end.

Broker: the one at --broker (default 127.0.0.1:1883) if it answers, else (on this machine)
mosquitto, else the pure-Python broker amqtt (the broker extra; MQTT 3.1.1, so the daemon and the
line then speak 3.1.1), for the demo's lifetime. Exit 0 once every target
is met for --hold consecutive batches, 1 when --batches pass without that. See docs/control.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qcloop.demo.broker import STARTS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the closed loop on a simulated synthesis line",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=12, metavar="N", help="stop after N batches (default 12)")
    p.add_argument("--out", type=Path, default=Path("demo-out"), metavar="DIR",
                   help="working folder: watch/, state/, truth/, model/, report/, demo.png (default ./demo-out)")
    p.add_argument("--hold", type=int, default=3, metavar="K",
                   help="targets must hold for K consecutive batches (default 3)")
    p.add_argument("--planner", choices=("pi", "bayes"), default="pi")
    p.add_argument("--mode", choices=("advisory", "command"), default="advisory")
    p.add_argument("--broker", default="127.0.0.1:1883", metavar="HOST:PORT",
                   help="MQTT broker to use (default 127.0.0.1:1883)")
    p.add_argument("--mqtt-host", metavar="HOST", help="broker host (overrides --broker)")
    p.add_argument("--mqtt-port", type=int, metavar="PORT", help="broker port (overrides --broker)")
    p.add_argument("--start-broker", choices=STARTS, default="auto",
                   help="when nothing answers there: auto (mosquitto, else amqtt), start that one, or never (fail)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="the daemon's Prometheus port (default 9464, or a free one when taken)")
    p.add_argument("--images-per-batch", type=int, default=None, metavar="K", help="SEM images per batch (default 6)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qcloop.demo.broker import parse_address
    from qcloop.demo.config import IMAGES_PER_BATCH
    from qcloop.demo.run import run_demo
    from qcloop.errors import QcloopError

    images = IMAGES_PER_BATCH if args.images_per_batch is None else args.images_per_batch
    if args.batches < 1 or args.hold < 1 or images < 1:
        raise QcloopError("--batches, --hold and --images-per-batch must be at least 1")
    try:
        host, port = parse_address(args.broker)
    except ValueError as exc:
        raise QcloopError(f"--broker: {exc}") from None
    host = args.mqtt_host or host
    port = args.mqtt_port or port
    if not 1 <= port <= 65535 or (args.metrics_port is not None and not 0 <= args.metrics_port <= 65535):
        raise QcloopError("--mqtt-port and --metrics-port must be in 1..65535")
    res = run_demo(batches=args.batches, out=args.out, hold=args.hold, planner=args.planner, mode=args.mode,
                   seed=args.seed, images_per_batch=images, mqtt_host=host, mqtt_port=port,
                   start_broker=args.start_broker, metrics_port=args.metrics_port)
    if res.score is not None:
        per = ", ".join(f"{c} {f:.3f}" for c, f in res.score.per_class_f1.items())
        print(f"classifier (trained on {sum(res.labelled.values())} labelled crops): macro-F1 {res.score.macro_f1:.3f} "
              f"on the {res.score.n_matched} particles of the demo's images matched to the generator's truth ({per})")
    if res.report is not None:
        print(f"last batch's report: {res.report}")
    if res.met:
        print(f"targets met from batch {res.batches_to_target} on, held for {args.hold} batches "
              f"({len(res.rows)} batches, {res.seconds:.0f} s). Plot: {res.plot}")
        return 0
    print(f"targets NOT met within {len(res.rows)} batches ({res.seconds:.0f} s). Plot: {res.plot}")
    return 1
