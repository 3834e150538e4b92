"""A simulated synthesis line: a virtual reactor with hidden response curves.

Two parts:

* :class:`ReactorModel` -- plain functions: setpoints (temperature in degC, reagent ratio) ->
  the *true* batch (mean ECD, size CV, class mix, corner rounding), with batch-to-batch noise.
  :func:`measure` draws a finite particle sample from a true batch and returns the flat metrics
  and 95 % half-widths qcloop would compute (no images; used by the bench and fast tests), and
  :func:`simulate_campaign` runs the controller against the model without MQTT.
* :class:`SimulatedReactor` -- the same model on the wire: subscribes to
  ``{prefix}/suggestions``, answers on ``{prefix}/suggestions/ack`` (operator policy: accept,
  reject all, never ack), publishes its setpoints retained on ``{prefix}/reactor/setpoints``
  and batch starts / ends on ``{prefix}/reactor/batch``, and writes synthetic SEM images of
  every batch (:mod:`qcloop.synth`) into the watched folder -- written under a temporary name
  in a staging folder on the same file system, then renamed into place, as a microscope
  export would.

Hidden response (the controller never sees these formulas)::

    ecd_nm        = 50 * exp(-0.05 * (T - 80)) * ratio ** 0.25          (about -2.5 nm/degC at 80 degC)
    sphere yield  = 0.2 + 0.75 * exp(-((ratio - r_opt(T)) / 0.35) ** 2),  r_opt(T) = 1.2 + 0.02 * (T - 80)
    size_cv       = 0.07 + 0.04 * |ratio - r_opt(T)|
    rest          = rods 50 %, dumbbells 30 %, triangles 20 % of (1 - sphere yield)

Batch-to-batch noise: ECD x (1 + N(0, ecd_noise)) with ecd_noise 1 %, sphere yield + N(0, yield_noise)
with yield_noise 0.02.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

log = logging.getLogger(__name__)

SETPOINTS = ("temperature", "reagent_ratio")
#: the line's sample preparation disperses the particles well on the substrate: few touch, none
#: overlap (crowded, touching particles make segmentation, and so the size statistics, noisier)
DEFAULT_SYNTH = {"touching_fraction": 0.05, "overlap_fraction": 0.0}
OTHER_CLASSES = {"rod": 0.5, "dumbbell": 0.3, "triangle": 0.2}


# ============================================================================ the model
@dataclass(frozen=True)
class TrueBatch:
    """What the reactor really made in one batch (before any measurement)."""

    mean_ecd_nm: float
    size_cv: float
    class_fractions: Mapping[str, float]
    rounding: float

    @property
    def sphere_fraction(self) -> float:
        return float(self.class_fractions.get("sphere", 0.0))


@dataclass(frozen=True)
class ReactorModel:
    """Hidden response curves of the virtual reactor.

    Parameters
    ----------
    ecd_ref_nm : float
        Mean ECD at 80 degC and ratio 1.
    ecd_per_degc : float
        Relative ECD change per degC (``exp(-ecd_per_degc * (T - 80))``).
    ratio_exponent : float
        ECD grows as ``ratio ** ratio_exponent``.
    ecd_noise, yield_noise : float
        Batch-to-batch noise (relative for ECD, absolute for the sphere yield).
    ecd_offset_nm : float
        Constant shift of the ECD (to make a line whose curve is not the nominal one).
    """

    ecd_ref_nm: float = 50.0
    ecd_per_degc: float = 0.05
    ratio_exponent: float = 0.25
    ecd_noise: float = 0.01
    yield_noise: float = 0.02
    ecd_offset_nm: float = 0.0

    def r_opt(self, temperature: float) -> float:
        return 1.2 + 0.02 * (temperature - 80.0)

    def response(self, setpoints: Mapping[str, float]) -> TrueBatch:
        """Noise-free batch for these setpoints (``temperature`` degC, ``reagent_ratio``)."""
        t = float(setpoints.get("temperature", 80.0))
        r = max(float(setpoints.get("reagent_ratio", 1.2)), 1e-3)
        ecd = self.ecd_ref_nm * math.exp(-self.ecd_per_degc * (t - 80.0)) * r ** self.ratio_exponent
        ecd += self.ecd_offset_nm
        off = r - self.r_opt(t)
        sphere = 0.2 + 0.75 * math.exp(-((off / 0.35) ** 2))
        cv = 0.07 + 0.04 * abs(off)
        return TrueBatch(max(ecd, 5.0), min(cv, 0.3), _mix(sphere), rounding=0.15)

    def batch(self, setpoints: Mapping[str, float], rng: np.random.Generator) -> TrueBatch:
        """One batch with batch-to-batch noise."""
        b = self.response(setpoints)
        ecd = b.mean_ecd_nm * (1.0 + self.ecd_noise * rng.standard_normal())
        sphere = float(np.clip(b.sphere_fraction + self.yield_noise * rng.standard_normal(), 0.0, 1.0))
        return replace(b, mean_ecd_nm=max(ecd, 5.0), class_fractions=_mix(sphere))


def _mix(sphere: float) -> dict[str, float]:
    sphere = float(min(max(sphere, 0.0), 1.0))
    rest = 1.0 - sphere
    return {"sphere": sphere, **{k: rest * w for k, w in OTHER_CLASSES.items()}}


def measure(batch: TrueBatch, rng: np.random.Generator, n_particles: int = 200) -> tuple[dict[str, float],
                                                                                        dict[str, float]]:
    """Metrics of a finite particle sample of ``batch`` (what image analysis would report).

    Draws ``n_particles`` log-normal ECDs and multinomial classes and computes the same flat
    names and 95 % half-widths as :class:`qcloop.batch.BatchMetrics` (``n_particles``,
    ``ecd_nm.<stat>``, ``class_fraction.<cls>``, ``class_count.<cls>``).

    Returns
    -------
    (flat, uncertainty) : dicts of str to float
    """
    from qcloop.batch import SizeStats, wilson_halfwidth

    sigma = math.sqrt(math.log1p(batch.size_cv ** 2))
    mu = math.log(batch.mean_ecd_nm) - sigma ** 2 / 2
    ecd = np.exp(mu + sigma * rng.standard_normal(n_particles))
    names = list(batch.class_fractions)
    p = np.array([batch.class_fractions[k] for k in names], dtype=float)
    counts = rng.multinomial(n_particles, p / p.sum())
    stats = SizeStats.of(ecd)
    flat: dict[str, float] = {"n_particles": float(n_particles), "n_images": 1.0, "n_border": 0.0}
    unc: dict[str, float] = {}
    for k, v in stats.values().items():
        flat[f"ecd_nm.{k}"] = v
        unc[f"ecd_nm.{k}"] = float(stats.halfwidth[k])
    for name, k in zip(names, counts):
        if k == 0:
            continue
        flat[f"class_count.{name}"] = float(k)
        flat[f"class_fraction.{name}"] = float(k) / n_particles
        unc[f"class_fraction.{name}"] = wilson_halfwidth(int(k), n_particles)
    return flat, unc


@dataclass
class CampaignStep:
    """One batch of a simulated campaign."""

    batch: int
    setpoints: dict[str, float]
    true: TrueBatch
    flat: dict[str, float]
    passed: bool
    decision: str
    suggested: dict[str, float] = field(default_factory=dict)


def simulate_campaign(settings: Any, model: ReactorModel, start: Mapping[str, float], n_batches: int, seed: int,
                      *, n_particles: int = 200, operator: str = "accept") -> list[CampaignStep]:
    """Run the controller against the model, batch by batch, without MQTT or images.

    The reactor makes each batch with the setpoints in force, qcloop measures it
    (:func:`measure`), scores it (:func:`qcloop.targets.evaluate_targets`) and the controller
    decides; an accepted suggestion is in force for the next batch (the line waits for the
    analysis, so ``cooldown_batches: 0`` is the natural setting here).

    Parameters
    ----------
    settings : qcloop.config.Settings
        ``control`` and ``targets`` are used.
    operator : {"accept", "reject", "silent"}
        How suggestions are answered.
    """
    from qcloop.control import Controller
    from qcloop.targets import evaluate_targets

    rng = np.random.default_rng(seed)
    ctl = Controller(settings)
    current = {k: float(v) for k, v in start.items()}
    ctl.on_setpoints({"setpoints": current}, now=0.0)
    steps: list[CampaignStep] = []
    for k in range(1, n_batches + 1):
        now = 60.0 * k
        bid = f"B{k:04d}"
        used = dict(current)
        ctl.on_batch_started(bid, {"setpoints": used}, now=now)
        true = model.batch(used, rng)
        flat, unc = measure(true, rng, n_particles)
        verdict = evaluate_targets(flat, settings.targets, unc)
        sugg = ctl.on_batch_closed(bid, flat, unc, verdict.passed, int(flat["n_particles"]), now=now + 1)
        decision = ctl.last_decision.reason if ctl.last_decision else ""
        suggested: dict[str, float] = {}
        if sugg is not None:
            suggested = sugg.suggested()
            if operator == "accept":
                ctl.on_ack(sugg.msg_id, "applied", now=now + 2)
                current.update(suggested)
                ctl.on_setpoints({"setpoints": current}, now=now + 2)
            elif operator == "reject":
                ctl.on_ack(sugg.msg_id, "rejected", now=now + 2)
        steps.append(CampaignStep(k, used, true, flat, verdict.passed, decision, suggested))
    return steps


# ============================================================================ the line on the wire
@dataclass
class BatchRecord:
    """What the simulated line did for one batch (for the demo's table and plot, and tests)."""

    batch: str
    setpoints: dict[str, float]
    true: TrueBatch
    images: list[str]
    decision: dict[str, Any] | None = None
    suggestion: dict[str, Any] | None = None
    ack: str | None = None
    result: dict[str, Any] | None = None


class SimulatedReactor:
    """The virtual synthesis line, talking MQTT and writing SEM images.

    Parameters
    ----------
    host, port : broker address
    prefix : str
        Topic prefix (``qcloop/<line_id>``).
    watch_dir : path
        The folder qcloop watches; images appear there by an atomic rename.
    staging_dir : path, optional
        Where images are written first (same file system as ``watch_dir``; default
        ``watch_dir/../.staging``).
    start : mapping of str to float
        Initial setpoints (``temperature``, ``reagent_ratio``).
    limits : mapping of name to (min, max), optional
        The reactor's own hard limits: a suggestion outside them is rejected and counted in
        ``violations`` (qcloop should never send one).
    operator : {"accept", "reject", "silent"}
        ``accept``: apply every suggestion (advisory: ack ``accepted`` then ``applied``;
        command: ``applied``); ``reject``: ack ``rejected``; ``silent``: never answer, never apply.
    images_per_batch, width_px, height_px, pixel_size_nm : image settings (fixed magnification)
    synth_overrides : mapping, optional
        Extra :class:`qcloop.synth.SynthSpec` fields (default :data:`DEFAULT_SYNTH`).
    truth_dir : path, optional
        Where the generator's ground-truth CSVs go (never into the watched folder).
    seed : int
        Seeds the batch-to-batch noise and the images.
    persistent_session : bool
        Connect with ``clean_session=False`` (the broker keeps the subscriptions and queues QoS 1
        suggestions while the line is away), as a real line should.
    """

    def __init__(self, *, host: str, port: int, prefix: str, watch_dir: str | Path,
                 staging_dir: str | Path | None = None, start: Mapping[str, float] | None = None,
                 model: ReactorModel | None = None, limits: Mapping[str, tuple[float, float]] | None = None,
                 operator: str = "accept", images_per_batch: int = 2, width_px: int = 512, height_px: int = 384,
                 pixel_size_nm: float = 2.0, truth_dir: str | Path | None = None, seed: int = 0,
                 batch_prefix: str = "B", client_id: str | None = None, synth_overrides: Mapping[str, Any] | None = None,
                 persistent_session: bool = False):
        if operator not in ("accept", "reject", "silent"):
            raise ValueError(f"operator must be accept, reject or silent, got {operator!r}")
        self.host, self.port, self.prefix = host, int(port), prefix.rstrip("/")
        self.watch_dir = Path(watch_dir)
        self.staging_dir = Path(staging_dir) if staging_dir else self.watch_dir.parent / ".staging"
        self.truth_dir = Path(truth_dir) if truth_dir else None
        self.model = model or ReactorModel()
        self.setpoints = {k: float(v) for k, v in (start or {"temperature": 80.0, "reagent_ratio": 1.2}).items()}
        self.limits = dict(limits or {})
        self.operator = operator
        self.images_per_batch = int(images_per_batch)
        self.width_px, self.height_px, self.pixel_size_nm = int(width_px), int(height_px), float(pixel_size_nm)
        self.synth_overrides = {**DEFAULT_SYNTH, **dict(synth_overrides or {})}
        self.persistent_session = bool(persistent_session)
        self.rng = np.random.default_rng(seed)
        self.seed = int(seed)
        self.batch_prefix = batch_prefix
        self.client_id = client_id or f"qcloop-simreactor-{os.getpid()}-{id(self) & 0xFFFF:x}"
        self.n_batches = 0
        self.records: list[BatchRecord] = []
        self.suggestions: list[dict[str, Any]] = []
        self.violations: list[str] = []
        self.acks_sent: list[tuple[str, str]] = []
        self._cond = threading.Condition()
        self._decisions: dict[str, dict[str, Any]] = {}
        self._results: dict[str, dict[str, Any]] = {}
        self._by_msg: dict[str, dict[str, Any]] = {}
        self._reply_to: dict[str, tuple[str | None, bytes | None]] = {}
        self._client = None

    # ------------------------------------------------------------------ MQTT
    def topic(self, leaf: str) -> str:
        return f"{self.prefix}/{leaf}"

    def connect(self, timeout: float = 10.0) -> "SimulatedReactor":
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        # MQTT v5: the ack goes to the suggestion's response topic with its correlation data
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        c.reconnect_delay_set(0.2, 2)
        c.on_message = self._on_message
        c.on_connect = self._on_connect
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600 if self.persistent_session else 0
        c.connect(self.host, self.port, keepalive=30, clean_start=not self.persistent_session, properties=props)
        c.loop_start()
        self._client = c
        deadline = time.time() + timeout
        while not c.is_connected():
            if time.time() > deadline:
                raise ConnectionError(f"simulated reactor: no MQTT broker at {self.host}:{self.port}")
            time.sleep(0.02)
        self.publish_setpoints()
        return self

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        for leaf in ("suggestions", "control/decision", "batches/result"):
            client.subscribe(self.topic(leaf), qos=1)

    def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def __enter__(self) -> "SimulatedReactor":
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _publish(self, leaf: str, body: Mapping[str, Any], *, retain: bool = False, topic: str | None = None,
                 properties: Any = None) -> None:
        assert self._client is not None, "connect() first"
        import paho.mqtt.client as mqtt

        info = self._client.publish(topic or self.topic(leaf), json.dumps(body), qos=1, retain=retain,
                                    properties=properties)
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            log.info("simulated reactor: broker unreachable; %s queued until reconnect", leaf)
            return  # paho keeps QoS 1 messages and sends them after the reconnect
        info.wait_for_publish(10)

    def publish_setpoints(self) -> None:
        from qcloop.control.suggestions import iso

        self._publish("reactor/setpoints", {"setpoints": dict(self.setpoints), "at": iso(time.time())}, retain=True)

    def _on_message(self, client, userdata, msg) -> None:
        try:
            body = json.loads(msg.payload.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            log.warning("simulated reactor: non-JSON message on %s", msg.topic)
            return
        if not isinstance(body, dict):
            return
        with self._cond:
            if msg.topic == self.topic("suggestions"):
                self.suggestions.append(body)
                if isinstance(body.get("msg_id"), str):
                    self._by_msg[body["msg_id"]] = body
                    props = msg.properties  # MQTT v5 request/response: where and how to answer
                    self._reply_to[body["msg_id"]] = (getattr(props, "ResponseTopic", None),
                                                      getattr(props, "CorrelationData", None))
            elif msg.topic == self.topic("control/decision"):
                if isinstance(body.get("batch_id"), str):
                    self._decisions[body["batch_id"]] = body
            elif msg.topic == self.topic("batches/result"):
                if isinstance(body.get("batch"), str):
                    self._results[body["batch"]] = body
            self._cond.notify_all()

    # ------------------------------------------------------------------ suggestions
    def _check(self, sugg: Mapping[str, Any]) -> list[str]:
        bad = []
        for sp in sugg.get("setpoints", []):
            name = sp.get("name")
            lim = self.limits.get(name)
            v = sp.get("suggested")
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                bad.append(f"{name}: suggested {v!r}")
                continue
            if lim is not None and not lim[0] <= v <= lim[1]:
                bad.append(f"{name}: {v} outside the reactor limits {lim}")
            if name not in self.setpoints:
                bad.append(f"{name}: not a setpoint of this reactor")
        return bad

    def handle_suggestion(self, sugg: Mapping[str, Any]) -> str | None:
        """Answer one suggestion according to the operator policy; the ack status sent (or None)."""
        from qcloop.control.suggestions import ack_message, parse_iso

        msg_id = str(sugg.get("msg_id"))
        if self.operator == "silent":
            return None
        now = time.time()
        expires = sugg.get("expires_at")
        status: str
        bad = self._check(sugg)
        if bad:
            self.violations.extend(bad)
            status = "rejected"
        elif isinstance(expires, str) and parse_iso(expires) < now:
            status = "expired"
        elif self.operator == "reject":
            status = "rejected"
        else:
            if sugg.get("mode") != "command":
                self._ack(ack_message(msg_id, "accepted", at=now, batch_id=sugg.get("batch_id")))
            for sp in sugg.get("setpoints", []):
                self.setpoints[sp["name"]] = float(sp["suggested"])
            self.publish_setpoints()
            status = "applied"
        self._ack(ack_message(msg_id, status, at=time.time(), batch_id=sugg.get("batch_id")))
        return status

    def _ack(self, body: Mapping[str, Any]) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.acks_sent.append((str(body["msg_id"]), str(body["status"])))
        topic, corr = self._reply_to.get(str(body["msg_id"]), (None, None))
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"
        if corr is not None:
            props.CorrelationData = corr
        self._publish("suggestions/ack", body, topic=topic, properties=props)

    # ------------------------------------------------------------------ batches
    def batch_name(self, k: int) -> str:
        return f"{self.batch_prefix}{k:04d}"

    def make_batch(self) -> BatchRecord:
        """Start the next batch: announce it, make it, export its images into the watched folder."""
        from qcloop.control.suggestions import iso
        from qcloop.synth import generate_batch, write_image

        self.n_batches += 1
        name = self.batch_name(self.n_batches)
        used = dict(self.setpoints)
        self._publish("reactor/batch", {"batch": name, "event": "start", "setpoints": used, "at": iso(time.time())})
        true = self.model.batch(used, self.rng)
        images = generate_batch(true.mean_ecd_nm, true.size_cv, true.class_fractions, self.images_per_batch,
                                seed=self.seed * 100003 + self.n_batches, pixel_size_nm=self.pixel_size_nm,
                                width_px=self.width_px, height_px=self.height_px, rounding=true.rounding,
                                **self.synth_overrides)
        self.watch_dir.mkdir(parents=True, exist_ok=True)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, img in enumerate(images, 1):
            final = self.watch_dir / f"{name}_img{i:02d}.tif"
            tmp = self.staging_dir / f".{final.name}.part"
            tif, csv = write_image(tmp.with_suffix(".tif"), img)
            if self.truth_dir is not None:
                self.truth_dir.mkdir(parents=True, exist_ok=True)
                os.replace(csv, self.truth_dir / f"{final.stem}.csv")
            else:
                csv.unlink(missing_ok=True)
            os.replace(tif, final)  # atomic: the watcher never sees a half-written file
            paths.append(str(final))
        self._publish("reactor/batch", {"batch": name, "event": "end", "setpoints": used, "at": iso(time.time())})
        rec = BatchRecord(name, used, true, paths)
        self.records.append(rec)
        return rec

    def wait_for_decision(self, rec: BatchRecord, timeout: float) -> BatchRecord:
        """Wait until qcloop decided about ``rec`` (and its suggestion, if any, arrived); answer it."""
        deadline = time.time() + timeout
        with self._cond:
            while rec.batch not in self._decisions and time.time() < deadline:
                self._cond.wait(0.1)
            rec.decision = self._decisions.get(rec.batch)
            rec.result = self._results.get(rec.batch)
            sid = (rec.decision or {}).get("suggestion_msg_id")
            while sid and sid not in self._by_msg and time.time() < deadline:
                self._cond.wait(0.1)
            sugg = self._by_msg.get(sid) if sid else None
            result_deadline = min(deadline, time.time() + 2.0)  # the result precedes the decision
            while rec.result is None and rec.decision is not None and time.time() < result_deadline:
                self._cond.wait(0.1)
                rec.result = self._results.get(rec.batch)
        if sugg is not None:
            rec.suggestion = sugg
            rec.ack = self.handle_suggestion(sugg)
        return rec

    def run_batch(self, timeout: float = 120.0) -> BatchRecord:
        """Make one batch and wait for qcloop's decision about it (the line waits for QC)."""
        return self.wait_for_decision(self.make_batch(), timeout)
