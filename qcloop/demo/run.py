"""``qcloop demo``: the closed loop on a simulated synthesis line, end to end on one machine.

1. **Broker** (:func:`qcloop.demo.broker.ensure_broker`): the one at ``--broker`` if it answers,
   else mosquitto, else amqtt (MQTT 3.1.1: the daemon and the line then speak 3.1.1), for the
   demo's lifetime.
2. **Labelling** (:mod:`qcloop.demo.labelling`): the line makes a labelling batch at its start
   setpoints; crops export, the chemist's sorting (played by the generator's truth), ``qcloop
   train``; the model goes to ``OUT/model/`` and the daemon's config points at it.
3. **The daemon** runs as a subprocess: ``python -m qcloop run --config OUT/qcloop-demo.yaml``.
4. **The campaign**: the simulated line (:mod:`qcloop_adapters.controllers.simulated_reactor`)
   starts where the shape target fails (sphere yield ~0.5, rounded ill-defined side products),
   exports each batch's SEM images into ``OUT/watch``, waits for qcloop's decision, applies a
   suggestion (auto-accepting operator) and makes the next batch; one table row per batch.
   It stops once every target (sphere fraction, sphere ECD, silhouette) is met for ``hold``
   batches in a row, or after ``batches``.
5. **Results**: ``OUT/demo.png`` (:func:`qcloop.demo.display.plot`), ``OUT/demo.json``, the last
   batch's ``OUT/report/report.html`` (``qcloop batch`` on its images: PCA scatter coloured by
   class, overlays, checks) and the classifier's macro-F1 on every image of the campaign (what
   the daemon predicted, scored against the generator's truth).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from qcloop.demo.broker import DemoError, ensure_broker, free_port, port_free
from qcloop.demo.config import (IMAGE_SETTINGS, IMAGES_PER_BATCH, LABELLING_IMAGES, LINE_ID, START_SETPOINTS,
                                DEMO_CONFIG, write_config)
from qcloop.demo.display import HEADER, batch_row, format_row, plot
from qcloop.demo.labelling import ClassifierScore, score_tables, train_classifier

log = logging.getLogger(__name__)

RESULTS = ("watch", "state", "truth", ".staging", "labelling", "model", "report", "broker")


@dataclass
class DemoResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    met: bool = False
    batches_to_target: int | None = None
    seconds: float = 0.0
    plot: Path | None = None
    report: Path | None = None
    broker: str = ""
    labelled: dict[str, int] = field(default_factory=dict)
    score: ClassifierScore | None = None
    violations: list[str] = field(default_factory=list)


def wait_online(host: str, port: int, prefix: str, since: float, daemon: subprocess.Popen, timeout: float) -> None:
    """Wait for the daemon's retained ``{prefix}/status`` ``online`` published after ``since``."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from qcloop.control.suggestions import parse_iso

    seen: list[bool] = []

    def on_message(client, userdata, msg):
        try:
            body = json.loads(msg.payload)
            t = body.get("time")
            if body.get("state") == "online" and (t is None or parse_iso(str(t)) >= since - 1):
                seen.append(True)
        except (ValueError, TypeError, AttributeError):
            pass

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"qcloop-demo-wait-{os.getpid()}")
    c.on_message = on_message
    c.on_connect = lambda cl, *a: cl.subscribe(f"{prefix}/status", qos=1)
    c.connect(host, port, keepalive=30)
    c.loop_start()
    try:
        deadline = time.time() + timeout
        while not seen:
            if daemon.poll() is not None:
                raise DemoError(f"the daemon exited with code {daemon.returncode} before it came online")
            if time.time() > deadline:
                raise DemoError(f"the daemon did not come online within {timeout:.0f} s")
            time.sleep(0.1)
    finally:
        c.disconnect()
        c.loop_stop()


def _start_daemon(cfg: Path, log_file) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("QCLOOP_CONFIG", None)
    return subprocess.Popen([sys.executable, "-m", "qcloop", "run", "--config", str(cfg)], stdout=log_file,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop_daemon(daemon: subprocess.Popen | None) -> None:
    if daemon is None or daemon.poll() is not None:
        return
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(20)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait(5)


def _campaign(reactor: Any, daemon: subprocess.Popen, result: DemoResult, *, batches: int, hold: int,
              out: Path, echo: Callable[[str], None], progress: bool) -> None:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=batches, desc="batches", unit="batch", file=sys.stderr, leave=False, disable=None)
    streak = 0
    try:
        for _ in range(batches):
            if daemon.poll() is not None:
                raise DemoError(f"the daemon exited with code {daemon.returncode}; see {out / 'daemon.log'}")
            rec = reactor.run_batch(timeout=180)
            if rec.decision is None:
                raise DemoError(f"no decision from qcloop about batch {rec.batch} within 180 s; "
                                f"see {out / 'daemon.log'}")
            row = batch_row(rec)
            result.rows.append(row)
            if bar is not None and not bar.disable:
                bar.update(1)
                bar.write(format_row(row))  # above the bar, without garbling it
            else:
                echo(format_row(row))
            streak = streak + 1 if row["passed"] else 0
            if streak >= hold:
                result.met = True
                result.batches_to_target = len(result.rows) - streak + 1  # first batch of the held streak
                return
    finally:
        if bar is not None:
            bar.close()


def _score(cfg_path: Path, out: Path, rows: list[dict[str, Any]]) -> ClassifierScore | None:
    """Macro-F1 of the daemon's own predictions on every campaign image (from its ledger)."""
    from qcloop.config import load_settings
    from qcloop.daemon.ledger import Ledger

    ledger = Ledger(load_settings(cfg_path, use_env=False).state_dir, outbox=False)
    try:
        tables = [t for r in rows for t in ledger.batch_particles(r["batch"])[0]]
    finally:
        ledger.close()
    return score_tables(tables, out / "truth") if tables else None


def _report(cfg_path: Path, out: Path, batch: str) -> Path:
    """``qcloop batch`` on the last batch's images: ``OUT/report/report.html``."""
    from qcloop.demo.labelling import _run_cli

    images = sorted(str(p) for p in (out / "watch").glob(f"{batch}_*.tif"))
    _run_cli(["batch", *images, "--out", str(out / "report"), "--config", str(cfg_path), "--jobs", "1",
              "--title", f"qcloop demo: batch {batch}"], "qcloop batch")
    return out / "report" / "report.html"


def run_demo(*, batches: int = 12, out: Path = Path("demo-out"), hold: int = 3, planner: str = "pi",
             mode: str = "advisory", seed: int = 0, images_per_batch: int = IMAGES_PER_BATCH,
             mqtt_host: str = "127.0.0.1", mqtt_port: int = 1883, start_broker: str = "auto",
             metrics_port: int | None = None, echo: Callable[[str], None] = print,
             progress: bool = True) -> DemoResult:
    """Run the demo (module docstring). ``echo`` receives each printed line.

    ``metrics_port`` None: 9464 when free, else a free port. Raises DemoError when the demo
    cannot run (no broker, daemon died, no decision, out-of-limits suggestion).
    """
    from qcloop_adapters.controllers.simulated_reactor import SimulatedReactor

    t0 = time.time()
    out = Path(out).resolve()
    for sub in RESULTS:
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "watch").mkdir(parents=True, exist_ok=True)
    handle = ensure_broker(mqtt_host, mqtt_port, start=start_broker, workdir=out / "broker")
    result = DemoResult(broker=str(handle))
    daemon: subprocess.Popen | None = None
    log_file = open(out / "daemon.log", "w", encoding="utf-8")
    reactor = None
    try:
        echo(f"MQTT broker: {result.broker}")
        if metrics_port is None:
            metrics_port = 9464 if port_free(9464) else free_port()
        cfg_path = write_config(out, mqtt_host=handle.host, mqtt_port=handle.port, metrics_port=metrics_port,
                                planner=planner, mode=mode, mqtt_protocol=handle.protocol)
        prefix = f"qcloop/{LINE_ID}"
        limits = {s["name"]: (s["min"], s["max"]) for s in DEMO_CONFIG["control"]["setpoints"]}
        reactor = SimulatedReactor(host=handle.host, port=handle.port, prefix=prefix, watch_dir=out / "watch",
                                   staging_dir=out / ".staging", truth_dir=out / "truth", start=START_SETPOINTS,
                                   limits=limits, images_per_batch=images_per_batch, seed=seed,
                                   protocol=handle.protocol, **IMAGE_SETTINGS)
        echo(f"labelling batch at {START_SETPOINTS}: crops -> sorted -> qcloop train")
        lab_true = reactor.model.batch(START_SETPOINTS, reactor.rng)
        images = reactor.export_images(lab_true, "LAB", out / "labelling" / "images", seed=seed * 100003 + 99991,
                                       n_images=LABELLING_IMAGES, truth_dir=out / "labelling" / "truth")
        model = out / "model" / "shape-classifier.json"
        result.labelled = train_classifier(images, out / "labelling" / "truth", out / "labelling", cfg_path, model,
                                           seed=seed, echo=echo)
        reactor.connect()  # retained setpoints are on the broker before the daemon subscribes
        started = time.time()
        daemon = _start_daemon(cfg_path, log_file)
        echo(f"daemon: pid {daemon.pid}, config {cfg_path}, log {out / 'daemon.log'}, "
             f"metrics http://127.0.0.1:{metrics_port}/metrics")
        wait_online(handle.host, handle.port, prefix, started, daemon, timeout=120)
        echo(f"watch it: mosquitto_sub -h {handle.host} -p {handle.port} -v -t '{prefix}/#'")
        echo(HEADER)
        _campaign(reactor, daemon, result, batches=batches, hold=hold, out=out, echo=echo, progress=progress)
    finally:
        _stop_daemon(daemon)
        if reactor is not None:
            reactor.close()
        handle.stop()
        log_file.close()
    result.violations = list(reactor.violations)
    if result.violations:
        raise DemoError(f"the reactor received out-of-limits suggestions: {result.violations}")
    if result.rows:
        result.score = _score(cfg_path, out, result.rows)
        result.report = _report(cfg_path, out, result.rows[-1]["batch"])
        result.plot = plot(result.rows, out / "demo.png")
    result.seconds = time.time() - t0
    summary = {"met": result.met, "batches_to_target": result.batches_to_target, "seconds": round(result.seconds, 1),
               "broker": result.broker, "planner": planner, "seed": seed, "labelled_crops": result.labelled,
               "classifier_macro_f1": result.score.macro_f1 if result.score else None,
               "classifier_per_class_f1": result.score.per_class_f1 if result.score else None,
               "report": str(result.report) if result.report else None, "rows": result.rows}
    (out / "demo.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    return result
