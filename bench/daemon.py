"""Benchmark of the daemon (``qcloop run``) as a real process against a real Mosquitto.

Figures printed
---------------
added latency
    For ``--latency-images`` images written one at a time (each after the previous result
    arrived, so the queue is empty): time from the moment the watcher found the file settled
    (``timing.settled_at`` in the result) to the moment a subscriber received the result, minus
    the analysis time the daemon reports (``timing.analysis_s``: decode + all pipeline stages).
    What is left is the daemon's own overhead: queue hand-over, SHA-256, three SQLite
    commits with fsync (pending, done + outbox row), the publisher's wake-up, the broker
    round trip. Target: median < 0.5 s.
peak memory
    ``--flood`` images (default 500) renamed into the watched folder at once. The daemon's
    peak RSS (``VmHWM`` from /proc) is read before the flood (after a few images) and after the
    flood has been processed; the queue holds paths, never pixels, so the flood must not
    raise the peak by more than the memory of one analysis.
broker outage (``--outage SECONDS``, e.g. 60)
    The broker is stopped, ``--outage-images`` images are written while it is down, then it
    is started again after SECONDS; prints how many results arrived (must be all), whether in
    order, and how long the backlog took to drain.

15 000 x 15 000 montage (``--montage``, default on; ``--no-montage`` skips it)
    A stitched montage of 225 Mpx (a sparse TIFF: header + zeros) is renamed into the folder;
    the daemon must refuse it from its header (``imaging.memory_budget_mb``) and stay below
    2 GiB: prints the reason and the daemon's peak RSS (VmHWM) before and after.
working set (``--working-set``, runs instead of the daemon phases)
    Fits ``qcloop.imaging.WORKING_SET_BYTES_PER_PIXEL``: the real JEOL image
    ``../shared/data/sem/jeol/A2h_01.tif`` tiled 1x1, 2x2, 3x3 is analysed with the default
    pipeline, each in a fresh process; prints the peak RSS above the process's baseline per pixel.

Images: 1024x768 synthetic SEM images (qcloop.synth) for the latency run, smaller ones
(``--flood-size`` px) for the flood so that it finishes in minutes on a small machine.

Usage::

    python bench/daemon.py                      # latency + 500-image flood
    python bench/daemon.py --outage 60 --flood 0
    python bench/daemon.py --working-set
"""

from __future__ import annotations

import argparse
import getpass
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import tifffile
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- parts
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self, work: Path):
        self.port = free_port()
        work.mkdir(parents=True, exist_ok=True)
        self.conf = work / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                             f"persistence_location {work}/\nuser {getpass.getuser()}\nlog_dest none\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class Subscriber:
    """Records (receive time, payload) of every image result; persistent session."""

    def __init__(self, port: int, prefix: str):
        self.results: list[tuple[float, dict]] = []
        self.cond = threading.Condition()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex[:6]}",
                        protocol=MQTTProtocolVersion.MQTTv5)
        c.reconnect_delay_set(1, 1)
        c.on_connect = lambda cl, u, f, rc, p: (cl.subscribe(f"{prefix}/images/result", qos=1),
                                                cl.subscribe(f"{prefix}/events/error", qos=1))
        self.errors: list[dict] = []
        c.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c.connect_async("127.0.0.1", port, keepalive=10, clean_start=False, properties=props)
        c.loop_start()
        self.client = c

    def _on_message(self, client, userdata, msg) -> None:
        t = time.time()
        with self.cond:
            body = json.loads(msg.payload)
            (self.errors.append(body) if msg.topic.endswith("events/error") else self.results.append((t, body)))
            self.cond.notify_all()

    def wait_error(self, name: str, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                hit = [e for e in self.errors if str(e.get("path", "")).endswith(name)]
                if hit or time.monotonic() > deadline:
                    return hit[0] if hit else None
                self.cond.wait(1.0)

    def wait_count(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len({p["msg_id"] for _, p in self.results}) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 1.0))
        return True

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0])
    return out


def synth_tiff(seed: int, size: int | None) -> bytes:
    """A synthetic SEM image as TIFF bytes (1024x768 from qcloop.synth, or a small disk image)."""
    buf = io.BytesIO()
    if size is None:  # what the microscope exports: 1024x768, banner, Zeiss pixel-size tag
        from qcloop.synth import SynthSpec, generate_image, write_image

        with tempfile.TemporaryDirectory() as d:
            tif, _ = write_image(Path(d) / "x.tif", generate_image(SynthSpec(), seed=seed))
            return tif.read_bytes()
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size), 40.0)
    for _ in range(max(4, size // 20)):
        r = rng.uniform(7, 11)
        cy, cx = rng.uniform(r + 2, size - r - 2, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 190.0
    img += rng.normal(0, 6, img.shape)
    tifffile.imwrite(buf, np.clip(img, 0, 255).astype(np.uint8))
    return buf.getvalue()


def put(watch: Path, name: str, data: bytes) -> None:
    tmp = watch / f".{name}.part"
    tmp.write_bytes(data)
    os.replace(tmp, watch / name)


def iso(s: str) -> float:
    return datetime.fromisoformat(s).timestamp()


# ----------------------------------------------------------------------------- working set
SEM_IMAGE = REPO.parent / "shared" / "data" / "sem" / "jeol" / "A2h_01.tif"


def working_set_child(k: int) -> None:
    """One analysis of the JEOL image tiled k x k, in this (fresh) process; prints one JSON line."""
    import resource

    from qcloop.config import load_settings
    from qcloop.pipeline import Pipeline

    src = tifffile.imread(os.environ.get("QCLOOP_SEM_IMAGE", SEM_IMAGE))
    src = src[..., 0] if src.ndim == 3 else src
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"tiled{k}.tif"
        tifffile.imwrite(path, np.tile(src, (k, k)))
        del src
        pipe = Pipeline.from_settings(load_settings(use_env=False))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # lazy imports count, as in the daemon
        t0 = time.monotonic()
        image = pipe.load(path)
        result = pipe.analyze(image)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    h, w = image.pixels.shape
    print(json.dumps({"tiles": k, "width": w, "height": h, "mpx": round(w * h / 1e6, 2),
                      "baseline_mib": round(base / 2**20), "peak_mib": round(peak / 2**20),
                      "bytes_per_px": round((peak - base) / (w * h), 1), "particles": int(len(result.particles)),
                      "seconds": round(time.monotonic() - t0, 1)}))


def working_set() -> int:
    if not Path(os.environ.get("QCLOOP_SEM_IMAGE", SEM_IMAGE)).exists():
        raise SystemExit(f"needs the real SEM image {SEM_IMAGE} (or $QCLOOP_SEM_IMAGE)")
    rows = []
    for k in (1, 2, 3):
        out = subprocess.run([sys.executable, __file__, "--working-set-child", str(k)], capture_output=True,
                             text=True, check=True, cwd=str(REPO))
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['width']}x{r['height']} ({r['mpx']} Mpx): peak {r['peak_mib']} MiB, baseline "
              f"{r['baseline_mib']} MiB -> {r['bytes_per_px']} bytes/px above it ({r['particles']} particles, "
              f"{r['seconds']} s)")
    from qcloop.imaging import WORKING_SET_BYTES_PER_PIXEL

    print(f"max {max(r['bytes_per_px'] for r in rows)} B/px measured; "
          f"WORKING_SET_BYTES_PER_PIXEL = {WORKING_SET_BYTES_PER_PIXEL}")
    return 0


# ----------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency-images", type=int, default=15)
    ap.add_argument("--flood", type=int, default=500, help="images renamed in at once (0: skip)")
    ap.add_argument("--flood-size", type=int, default=128, help="side of the flood images, px")
    ap.add_argument("--outage", type=float, default=0.0, help="broker outage in seconds (0: skip)")
    ap.add_argument("--outage-images", type=int, default=20)
    ap.add_argument("--settle", type=float, default=1.0)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--montage", action=argparse.BooleanOptionalAction, default=True,
                    help="hand the daemon a 15000x15000 montage and print its peak RSS")
    ap.add_argument("--working-set", action="store_true", help="fit WORKING_SET_BYTES_PER_PIXEL instead")
    ap.add_argument("--working-set-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.working_set_child:
        working_set_child(args.working_set_child)
        return 0
    if args.working_set:
        return working_set()

    tmp = Path(tempfile.mkdtemp(prefix="qcloop-bench-daemon-"))
    watch, state = tmp / "export", tmp / "state"
    watch.mkdir()
    broker = Broker(tmp / "broker")
    broker.start()
    prefix = f"bench/{uuid.uuid4().hex[:8]}"
    cfg = tmp / "qcloop.yaml"
    cfg.write_text(yaml.safe_dump({
        "line_id": "bench", "state_dir": str(state),
        "imaging": {"pixel_size_nm": 2.0},
        "watch": {"directory": str(watch), "settle_seconds": args.settle},
        "batch": {"key": "regex:^(?P<batch>[A-Za-z]+)_", "close_after_idle_s": 3600},
        "mqtt": {"port": broker.port, "topic_prefix": prefix, "reconnect_min_s": 1, "reconnect_max_s": 2},
        "metrics": {"port": 0},
    }))
    sock_path = tmp / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_path))
    notify.settimeout(120)
    env = dict(os.environ, NOTIFY_SOCKET=str(sock_path))
    log = open(tmp / "daemon.log", "ab")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "qcloop", "run", "--config", str(cfg)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
    figures: dict[str, object] = {}
    sub = Subscriber(broker.port, prefix)
    try:
        while b"READY=1" not in notify.recv(4096):
            pass
        figures["startup_s"] = round(time.monotonic() - t0, 2)
        print(f"daemon ready after {figures['startup_s']} s (pid {proc.pid})")

        # -------------------------------------------------------------- added latency
        n = args.latency_images
        if n:
            images = [synth_tiff(1000 + i, None) for i in range(n)]
            for i, data in enumerate(images):
                put(watch, f"LAT_{i:04d}.tif", data)
                if not sub.wait_count(i + 1, 300):
                    raise SystemExit("latency image result did not arrive")
            rows = []
            for t_recv, p in sub.results[:n]:
                settled = iso(p["timing"]["settled_at"])
                rows.append((t_recv - settled, p["timing"]["analysis_s"]))
            added = [total - analysis for total, analysis in rows]
            analysis = [a for _, a in rows]
            figures["latency"] = {
                "images": n,
                "analysis_s_median": round(statistics.median(analysis), 3),
                "added_s_median": round(statistics.median(added), 3),
                "added_s_p90": round(float(np.percentile(added, 90)), 3),
                "added_s_max": round(max(added), 3),
            }
            print(f"latency, {n} images of 1024x768 one at a time: analysis median "
                  f"{figures['latency']['analysis_s_median']} s; added by the daemon (settled -> "
                  f"received, minus analysis): median {figures['latency']['added_s_median']} s, "
                  f"p90 {figures['latency']['added_s_p90']} s, max {figures['latency']['added_s_max']} s "
                  f"(target < 0.5 s)")

        # -------------------------------------------------------------- flood / memory
        if args.flood:
            mem_before = rss_kib(proc.pid)
            staging = tmp / "staging"
            staging.mkdir()
            for i in range(args.flood):
                (staging / f"FLOOD_{i:04d}.tif").write_bytes(synth_tiff(5000 + i, args.flood_size))
            base = len({p["msg_id"] for _, p in sub.results})
            t_flood = time.monotonic()
            for i in range(args.flood):
                os.rename(staging / f"FLOOD_{i:04d}.tif", watch / f"FLOOD_{i:04d}.tif")
            rename_s = time.monotonic() - t_flood
            peak_rss = 0
            done = threading.Event()

            def sample() -> None:
                nonlocal peak_rss
                while not done.is_set():
                    try:
                        peak_rss = max(peak_rss, rss_kib(proc.pid)["VmRSS"])
                    except (OSError, KeyError):
                        pass
                    time.sleep(0.2)

            th = threading.Thread(target=sample, daemon=True)
            th.start()
            ok = sub.wait_count(base + args.flood, 3600)
            done.set()
            th.join()
            mem_after = rss_kib(proc.pid)
            figures["flood"] = {
                "images": args.flood, "side_px": args.flood_size, "renamed_in_s": round(rename_s, 3),
                "all_results": ok, "processing_s": round(time.monotonic() - t_flood, 1),
                "rss_before_mib": round(mem_before["VmRSS"] / 1024, 1),
                "peak_rss_before_mib": round(mem_before["VmHWM"] / 1024, 1),
                "peak_rss_sampled_during_mib": round(peak_rss / 1024, 1),
                "peak_rss_after_mib": round(mem_after["VmHWM"] / 1024, 1),
            }
            f = figures["flood"]
            print(f"flood: {args.flood} images ({args.flood_size} px) renamed in within {f['renamed_in_s']} s; "
                  f"all results: {ok} after {f['processing_s']} s; daemon RSS before {f['rss_before_mib']} MiB "
                  f"(peak so far {f['peak_rss_before_mib']} MiB), peak RSS during the flood "
                  f"{f['peak_rss_sampled_during_mib']} MiB (sampled 5/s), VmHWM after {f['peak_rss_after_mib']} MiB")

        # -------------------------------------------------------------- broker outage
        if args.outage > 0:
            base = len({p["msg_id"] for _, p in sub.results})
            broker.stop()
            t_down = time.monotonic()
            k = args.outage_images
            for i in range(k):  # spread over the first half of the outage
                put(watch, f"OUT_{i:04d}.tif", synth_tiff(9000 + i, args.flood_size))
                time.sleep(args.outage / 2 / k)
            time.sleep(max(0.0, args.outage - (time.monotonic() - t_down)))
            broker.start()
            t_up = time.monotonic()
            first = None
            while first is None and time.monotonic() - t_up < 60:
                with sub.cond:
                    if len({p["msg_id"] for _, p in sub.results}) > base:
                        first = time.monotonic() - t_up
                    else:
                        sub.cond.wait(0.02)
            ok = sub.wait_count(base + k, 300)
            drained = time.monotonic() - t_up
            got = [p for _, p in sub.results if p["name"].startswith("OUT_")]
            ids = [p["image_id"] for p in got]
            in_order = list(dict.fromkeys(ids)) == sorted(set(ids))
            figures["outage"] = {"seconds": args.outage, "images": k, "delivered": len(set(ids)),
                                 "all_delivered": ok, "in_order": in_order,
                                 "duplicates": len(ids) - len(set(ids)), "drain_s": round(drained, 2),
                                 "first_result_s": None if first is None else round(first, 2)}
            print(f"broker outage {args.outage} s with {k} images: {len(set(ids))}/{k} results delivered "
                  f"{'in order' if in_order else 'OUT OF ORDER'} within {drained:.2f} s after the broker "
                  f"returned ({len(ids) - len(set(ids))} duplicate deliveries); first result "
                  f"{figures['outage']['first_result_s']} s after its return (target < 2 s)")

        # -------------------------------------------------------------- 15000 x 15000 montage
        if args.montage:
            before = rss_kib(proc.pid)
            tmp_big = tmp / "montage.tif"
            tifffile.imwrite(tmp_big, shape=(15000, 15000), dtype="uint8")  # sparse: no pixels in memory
            os.rename(tmp_big, watch / "MONTAGE_15000.tif")
            event = sub.wait_error("MONTAGE_15000.tif", 300)
            after = rss_kib(proc.pid)
            figures["montage"] = {"side_px": 15000, "outcome": None if event is None else event["kind"],
                                  "reason": None if event is None else event["message"],
                                  "peak_rss_before_mib": round(before["VmHWM"] / 1024, 1),
                                  "peak_rss_after_mib": round(after["VmHWM"] / 1024, 1)}
            m = figures["montage"]
            print(f"15000x15000 montage: {m['outcome']} ({m['reason']}); daemon peak RSS (VmHWM) "
                  f"{m['peak_rss_before_mib']} MiB before, {m['peak_rss_after_mib']} MiB after (limit 2048 MiB)")
    finally:
        sub.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        broker.stop()
        notify.close()
        log.close()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
