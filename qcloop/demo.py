"""``qcloop demo``: the whole closed loop on one machine, on embedded defaults.

1. MQTT broker: the one on localhost:1883 if it answers; else ``mosquitto`` from the PATH; else
   the pure-Python fallback :mod:`qcloop.mqtt_broker` (for the demo's lifetime).
2. The simulated synthesis line (:mod:`qcloop_adapters.controllers.simulated_reactor`) publishes its
   setpoints (20 % off the size target at the start), announces batches and exports synthetic
   SEM images of each batch into ``OUT/watch``.
3. The real daemon runs as a subprocess: ``python -m qcloop run --config OUT/qcloop-demo.yaml``
   (the configuration below, written with this run's paths and ports).
4. Per batch the line waits for qcloop's decision (``{prefix}/control/decision``), applies a
   suggestion (auto-accepting operator) and starts the next batch; a table row is printed.
5. It stops once the targets are met for ``hold`` consecutive batches (exit 0) or after
   ``--batches`` (exit 1 when the targets were not met), and writes ``OUT/demo.png``
   (metrics and setpoints against the batch number) and ``OUT/demo.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qcloop.errors import QcloopError

log = logging.getLogger(__name__)

LINE_ID = "demo"
ECD_TARGET_NM = 50.0
ECD_TOLERANCE_NM = 2.5
START_SETPOINTS = {"temperature": 77.0, "reagent_ratio": 1.2}  # true ECD about 60 nm: 20 % above target

#: The demo's configuration (also in configs/demo.yaml); paths and ports are filled in per run.
DEMO_CONFIG: dict[str, Any] = {
    "line_id": LINE_ID,
    "watch": {"directory": "watch", "settle_seconds": 0.3, "polling": False},
    "batch": {"key": "regex:^(?P<batch>[^_]+)_", "close_after_idle_s": 1.0, "min_particles": 30},
    "targets": {"ecd_nm.mean": {"target": ECD_TARGET_NM, "tolerance": ECD_TOLERANCE_NM}},
    "mqtt": {"host": "127.0.0.1", "port": 1883, "topic_prefix": "qcloop/{line_id}"},
    "metrics": {"host": "127.0.0.1", "port": 9464},
    "control": {
        "enabled": True,
        "planner": "pi",
        "mode": "advisory",
        "cooldown_batches": 0,
        "suggestion_ttl_s": 120,
        "setpoints": [
            {"name": "temperature", "unit": "degC", "min": 60, "max": 100, "max_step": 2.0},
            {"name": "reagent_ratio", "unit": "", "min": 0.5, "max": 2.5, "max_step": 0.2},
        ],
        "rules": [
            # ECD mean above target -> raise the temperature by 0.4 degC per nm
            {"metric": "ecd_nm.mean", "setpoint": "temperature", "gain": 0.4},
        ],
    },
}


class DemoError(QcloopError):
    """The demo could not run (no broker could be started, the daemon died, ...)."""


# ============================================================================ broker
def mqtt_answers(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when an MQTT broker accepts a connection at host:port (a real CONNECT/CONNACK)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError:
        return False
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"qcloop-demo-probe-{os.getpid()}")
    try:
        c.connect(host, port, keepalive=10)
        c.loop_start()
        deadline = time.time() + timeout
        while not c.is_connected() and time.time() < deadline:
            time.sleep(0.02)
        return c.is_connected()
    except OSError:
        return False
    finally:
        try:
            c.disconnect()
            c.loop_stop()
        except Exception:  # noqa: BLE001
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@dataclass
class BrokerHandle:
    """The broker the demo talks to, and how to stop it (when the demo started it)."""

    host: str
    port: int
    kind: str  # "existing", "mosquitto", "python"
    process: subprocess.Popen | None = None
    broker: Any = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.broker is not None:
            self.broker.stop()


def ensure_broker(host: str = "127.0.0.1", port: int = 1883, *, prefer: str = "auto") -> BrokerHandle:
    """Use a broker at host:port if one answers, else start mosquitto or the Python fallback.

    ``prefer``: ``auto`` (mosquitto when on the PATH), ``mosquitto`` or ``python``.
    """
    if prefer == "auto" and mqtt_answers(host, port):
        return BrokerHandle(host, port, "existing")
    if not port_free(port):
        port = free_port()
    mosq = shutil.which("mosquitto") or (shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin"))
    if prefer in ("auto", "mosquitto") and mosq:
        proc = subprocess.Popen([mosq, "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            if proc.poll() is not None:
                break
            if mqtt_answers(host, port, timeout=0.5):
                return BrokerHandle(host, port, "mosquitto", process=proc)
            time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
        log.warning("mosquitto did not start on port %d; using the Python fallback broker", port)
    from qcloop.mqtt_broker import Broker

    b = Broker(host, port).start()
    return BrokerHandle(host, b.port, "python", broker=b)


# ============================================================================ the run
@dataclass
class DemoResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    met: bool = False
    batches_to_target: int | None = None
    seconds: float = 0.0
    plot: Path | None = None
    broker: str = ""


def write_config(out: Path, *, mqtt_host: str, mqtt_port: int, metrics_port: int, planner: str, mode: str) -> Path:
    cfg = json.loads(json.dumps(DEMO_CONFIG))
    cfg["watch"]["directory"] = str(out / "watch")
    cfg["state_dir"] = str(out / "state")
    cfg["mqtt"].update(host=mqtt_host, port=mqtt_port)
    cfg["metrics"]["port"] = metrics_port
    cfg["control"]["planner"] = planner
    cfg["control"]["mode"] = mode
    if planner == "bayes":
        cfg["control"]["bayes"] = {"objective": {"ecd_nm.mean": 1.0}}
    path = out / "qcloop-demo.yaml"
    path.write_text("# written by `qcloop demo`; see configs/demo.yaml\n" + yaml.safe_dump(cfg, sort_keys=False),
                    encoding="utf-8")
    return path


def _wait_online(host: str, port: int, prefix: str, since: float, daemon: subprocess.Popen, timeout: float) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from qcloop.control.suggestions import parse_iso

    seen: list[bool] = []

    def on_message(client, userdata, msg):
        try:
            body = json.loads(msg.payload)
            t = body.get("time")
            fresh = t is None or parse_iso(str(t)) >= since - 1
            if body.get("state") == "online" and fresh:
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


def _fmt_row(rec: Any) -> dict[str, Any]:
    res = rec.result or {}
    flat = res.get("flat") or {}
    unc = res.get("uncertainty") or {}
    dec = rec.decision or {}
    fractions = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("class_fraction.") and v is not None}
    sugg = ""
    if rec.suggestion:
        parts = [f"{s['name']} {s['current']:.4g}->{s['suggested']:.4g}" for s in rec.suggestion["setpoints"]]
        sugg = ", ".join(parts) + (f" ({rec.ack})" if rec.ack else " (no ack)")
    elif dec:
        sugg = f"{dec.get('action')}: {dec.get('reason')}"
    return {
        "batch": rec.batch,
        "n_particles": flat.get("n_particles"),
        "ecd_mean_nm": flat.get("ecd_nm.mean"),
        "ecd_ci95_nm": unc.get("ecd_nm.mean"),
        "true_ecd_nm": rec.true.mean_ecd_nm,
        "class_fractions": fractions,
        "silhouette": flat.get("silhouette"),
        "verdict": res.get("verdict") if res else ("pass" if dec.get("verdict_passed") else None),
        "passed": bool(dec.get("verdict_passed")) if dec else False,
        "setpoints": dict(rec.setpoints),
        "suggestion": sugg,
        "decision": dec.get("reason"),
    }


def _num(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, fmt)


HEADER = f"{'batch':<7} {'n':>5} {'ECD mean nm':>14} {'classes':<22} {'silh.':>6} {'verdict':<8} suggestion"


def format_row(row: dict[str, Any]) -> str:
    ecd = _num(row["ecd_mean_nm"], ".1f")
    if row["ecd_ci95_nm"] is not None:
        ecd += f" ± {_num(row['ecd_ci95_nm'], '.1f')}"
    fr = ", ".join(f"{k} {v:.2f}" for k, v in sorted(row["class_fractions"].items(), key=lambda kv: -kv[1])[:2])
    n = _num(row["n_particles"], ".0f")
    return (f"{row['batch']:<7} {n:>5} {ecd:>14} {fr[:22]:<22} {_num(row['silhouette'], '.2f'):>6} "
            f"{str(row['verdict'] or '-'):<8} {row['suggestion']}")


def plot(rows: list[dict[str, Any]], path: Path, *, setpoint_names: list[str]) -> Path:
    """PNG: ECD mean (with 95 % CI and the true value) and setpoints against the batch number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(1, len(rows) + 1))
    fig, axes = plt.subplots(1 + len(setpoint_names), 1, figsize=(8, 3 + 2 * len(setpoint_names)), sharex=True)
    ax = axes[0]
    ax.axhspan(ECD_TARGET_NM - ECD_TOLERANCE_NM, ECD_TARGET_NM + ECD_TOLERANCE_NM, color="tab:green", alpha=0.15,
               label=f"target {ECD_TARGET_NM:g} ± {ECD_TOLERANCE_NM:g} nm")
    y = [r["ecd_mean_nm"] if r["ecd_mean_nm"] is not None else float("nan") for r in rows]
    err = [r["ecd_ci95_nm"] if r["ecd_ci95_nm"] is not None else 0.0 for r in rows]
    ax.errorbar(x, y, yerr=err, fmt="o-", color="tab:blue", capsize=3, label="measured ECD mean (95 % CI)")
    ax.plot(x, [r["true_ecd_nm"] for r in rows], "x--", color="grey", label="true ECD mean (hidden)")
    for verdict, colour in ((True, "tab:green"), (False, "tab:red")):
        xs = [xi for xi, r in zip(x, rows) if r["passed"] is verdict]
        ax.plot(xs, [y[xi - 1] for xi in xs], "o", color=colour, ms=11, mfc="none",
                label="verdict: pass" if verdict else "verdict: fail")
    ax.set_ylabel("ECD mean (nm)")
    ax.legend(loc="best", fontsize=8)
    ax.set_title("qcloop demo: closed-loop QC of a simulated synthesis line")
    units = {s["name"]: s.get("unit", "") for s in DEMO_CONFIG["control"]["setpoints"]}
    for ax, name in zip(axes[1:], setpoint_names):
        ax.plot(x, [r["setpoints"].get(name, float("nan")) for r in rows], "o-", color="tab:orange",
                label=f"{name} used for the batch")
        ax.set_ylabel(f"{name} ({units[name]})" if units.get(name) else name)
        ax.legend(loc="best", fontsize=8)
    axes[-1].set_xlabel("batch")
    axes[-1].set_xticks(x)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(*, batches: int = 15, out: Path = Path("demo-out"), hold: int = 3, planner: str = "pi",
             mode: str = "advisory", seed: int = 0, images_per_batch: int = 3, broker: str = "auto",
             mqtt_port: int = 1883, echo=print, progress: bool = True) -> DemoResult:
    """Run the demo (see the module docstring). ``echo`` receives each printed line."""
    from qcloop_adapters.controllers.simulated_reactor import SimulatedReactor

    t0 = time.time()
    out = Path(out).resolve()
    for sub in ("watch", "state", "truth", ".staging"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "watch").mkdir(parents=True, exist_ok=True)
    handle = ensure_broker("127.0.0.1", mqtt_port, prefer=broker)
    result = DemoResult(broker=f"{handle.kind} at {handle.host}:{handle.port}")
    echo(f"MQTT broker: {result.broker}")
    metrics_port = 9464 if port_free(9464) else free_port()
    cfg_path = write_config(out, mqtt_host=handle.host, mqtt_port=handle.port, metrics_port=metrics_port,
                            planner=planner, mode=mode)
    prefix = f"qcloop/{LINE_ID}"
    limits = {s["name"]: (s["min"], s["max"]) for s in DEMO_CONFIG["control"]["setpoints"]}
    reactor = SimulatedReactor(host=handle.host, port=handle.port, prefix=prefix, watch_dir=out / "watch",
                               staging_dir=out / ".staging", truth_dir=out / "truth", start=START_SETPOINTS,
                               limits=limits, images_per_batch=images_per_batch, seed=seed)
    daemon: subprocess.Popen | None = None
    log_file = open(out / "daemon.log", "w", encoding="utf-8")
    try:
        reactor.connect()  # retained setpoints are on the broker before the daemon subscribes
        started = time.time()
        env = dict(os.environ)
        env.pop("QCLOOP_CONFIG", None)
        daemon = subprocess.Popen([sys.executable, "-m", "qcloop", "run", "--config", str(cfg_path)],
                                  stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
        echo(f"daemon: pid {daemon.pid}, config {cfg_path}, log {out / 'daemon.log'}, "
             f"metrics http://127.0.0.1:{metrics_port}/metrics")
        _wait_online(handle.host, handle.port, prefix, started, daemon, timeout=120)
        echo(f"watch it: mosquitto_sub -h {handle.host} -p {handle.port} -v -t '{prefix}/#'")
        echo(HEADER)
        streak = 0
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=batches, desc="batches", unit="batch", file=sys.stderr, leave=False)
        for _ in range(batches):
            if daemon.poll() is not None:
                raise DemoError(f"the daemon exited with code {daemon.returncode}; see {out / 'daemon.log'}")
            rec = reactor.run_batch(timeout=180)
            if rec.decision is None:
                raise DemoError(f"no decision from qcloop about batch {rec.batch} within 180 s; "
                                f"see {out / 'daemon.log'}")
            row = _fmt_row(rec)
            result.rows.append(row)
            if bar is not None:
                bar.update(1)
                bar.write(format_row(row))  # above the bar, without garbling it
            else:
                echo(format_row(row))
            streak = streak + 1 if row["passed"] else 0
            if streak >= hold:
                result.met = True
                result.batches_to_target = len(result.rows) - streak + 1  # first batch of the held streak
                break
        if bar is not None:
            bar.close()
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(5)
        reactor.close()
        handle.stop()
        log_file.close()
    result.seconds = time.time() - t0
    if reactor.violations:
        raise DemoError(f"the reactor received out-of-limits suggestions: {reactor.violations}")
    if result.rows:
        names = [n for n in START_SETPOINTS
                 if n == "temperature" or len({r["setpoints"].get(n) for r in result.rows}) > 1]
        result.plot = plot(result.rows, out / "demo.png", setpoint_names=names)
    (out / "demo.json").write_text(json.dumps({"met": result.met, "batches_to_target": result.batches_to_target,
                                               "seconds": round(result.seconds, 1), "broker": result.broker,
                                               "rows": result.rows}, indent=1, default=str), encoding="utf-8")
    return result
