"""A simulated synthesis line: a virtual reactor with hidden response curves.

Two parts:

* :class:`ReactorModel` -- plain functions: setpoints (temperature in degC, reagent ratio) ->
  the *true* batch (mean ECD, size CV, class mix, corner rounding), with batch-to-batch noise.
  :func:`measure` draws a finite particle sample from a true batch and returns the flat metrics
  and 95 % half-widths qcloop would compute (no images; used by the bench and fast tests), and
  :func:`simulate_campaign` runs the controller against the model without MQTT.
* :class:`SimulatedReactor` -- the same model on the wire (MQTT v5 or 3.1.1): subscribes to
  ``{prefix}/suggestions``, answers on ``{prefix}/suggestions/ack`` (operator policy: accept,
  reject all, never ack; v5: on the suggestion's response topic with its correlation data,
  3.1.1: on the documented ack topic, the payload's ``msg_id`` naming the suggestion), publishes its setpoints retained on ``{prefix}/reactor/setpoints``
  and batch starts / ends on ``{prefix}/reactor/batch``, and writes synthetic SEM images of
  every batch (:mod:`qcloop.synth`) into the watched folder -- written under a temporary name
  in a staging folder on the same file system, then renamed into place, as a microscope
  export would.

Hidden response (the controller never sees these formulas)::

    ecd_nm        = 50 * exp(-0.05 * (T - 80)) * ratio ** 0.25          (about -2.5 nm/degC at 80 degC)
    off           = ratio - r_opt(T),   r_opt(T) = 1.2 + 0.02 * (T - 80)
    sphere yield  = 0.2 + 0.75 * exp(-(off / 0.35) ** 2)
    size_cv       = 0.07 + 0.04 * |off|
    rest          = rods 40 %, triangles 35 %, cubes 25 % of (1 - sphere yield)
    sharpness     = exp(-(off / 0.15) ** 2)        (synthesis progress: 0 ill-defined .. 1 sharp)

The **sharpness** is the synthesis-progress response (Barnatan et al. 2025): away from the
optimal ratio growth is ill-controlled and every particle stays close to a rounded, irregular
seed; at the optimum the side products grow sharp facets and the classes separate. It sets the
images' shapes (:meth:`TrueBatch.synth_fields`)::

    rounding        = 0.65 - 0.55 * sharpness    (corner radius / in-radius of triangles, cubes, rods)
    rounding_jitter = 0.03 + 0.20 * (1 - sharpness)  (per-particle spread of that rounding)
    rod_aspect      = 1.6 + 1.9 * sharpness      (short blunt rods -> 3.5:1 rods)

so the silhouette and the inter-class share of the embedding variance rise, and the intra-class
share falls, as the loop brings the ratio to its optimum. The sharpness ridge is narrower than
the yield's: a sphere fraction of 0.85 is reached at ``|off| = 0.13`` (sharpness 0.47), the
sharp, well-separated product needs ``|off| < 0.08``.

Batch-to-batch noise: ECD x (1 + N(0, ecd_noise)) with ecd_noise 1 %, sphere yield + N(0, yield_noise)
with yield_noise 0.02 (the sharpness has none of its own; the images' particles scatter around it).

:func:`measure` (the image-free path) reproduces the separation metrics the image path gives from
a response surface in (sphere fraction, sharpness) fitted to the real pipeline on the line's
images: :data:`SEPARATION_FIT`, fitted by ``bench/fit_separation.py``.
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
#: side products, shares of (1 - sphere yield); single-body shapes whose corners the sharpness sets
OTHER_CLASSES = {"rod": 0.4, "triangle": 0.35, "cube": 0.25}


# ============================================================================ the model
@dataclass(frozen=True)
class TrueBatch:
    """What the reactor really made in one batch (before any measurement).

    ``sharpness`` is the synthesis progress (0 rounded, ill-defined seeds .. 1 sharp, well
    separated shapes); ``rounding``, ``rounding_jitter`` and ``rod_aspect`` are the image
    generator's shape parameters it implies (module docstring).
    """

    mean_ecd_nm: float
    size_cv: float
    class_fractions: Mapping[str, float]
    rounding: float
    sharpness: float = 1.0
    rounding_jitter: float = 0.03
    rod_aspect: float = 3.5

    @property
    def sphere_fraction(self) -> float:
        return float(self.class_fractions.get("sphere", 0.0))

    def synth_fields(self) -> dict[str, float]:
        """The :class:`qcloop.synth.SynthSpec` shape fields of this batch's images."""
        return {"rounding": self.rounding, "rounding_jitter": self.rounding_jitter, "rod_aspect": self.rod_aspect}


def shape_of(sharpness: float) -> dict[str, float]:
    """Image shape parameters for a sharpness in [0, 1] (module docstring)."""
    m = float(min(max(sharpness, 0.0), 1.0))
    return {"rounding": 0.65 - 0.55 * m, "rounding_jitter": 0.03 + 0.20 * (1.0 - m), "rod_aspect": 1.6 + 1.9 * m}


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
    sharpness_width : float
        Width of the sharpness ridge around the optimal ratio (``exp(-(off / width) ** 2)``).
    """

    ecd_ref_nm: float = 50.0
    ecd_per_degc: float = 0.05
    ratio_exponent: float = 0.25
    ecd_noise: float = 0.01
    yield_noise: float = 0.02
    ecd_offset_nm: float = 0.0
    sharpness_width: float = 0.15

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
        sharp = math.exp(-((off / self.sharpness_width) ** 2))
        return TrueBatch(max(ecd, 5.0), min(cv, 0.3), _mix(sphere), sharpness=sharp, **shape_of(sharp))

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


# ============================================================================ image-free measurement
@dataclass(frozen=True)
class SeparationFit:
    """Separation metrics of the image path as a response surface (see ``bench/fit_separation.py``).

    ``value = c0 + c1 * p + c2 * s + c3 * p * s`` for the sphere fraction ``p`` and the
    sharpness ``s``, plus normal noise of sd ``noise`` (the batch-to-batch scatter of the image
    path at ~150 particles). ``inter_class_variance`` is the fitted share of ``total`` (the
    number of non-constant embedding dimensions; batch standardisation).
    """

    silhouette: tuple[float, float, float, float]
    silhouette_noise: float
    inter_share: tuple[float, float, float, float]
    inter_share_noise: float
    total: float
    fitted_on: str


#: fitted by ``bench/fit_separation.py`` (its printout pasted here; R^2 0.71 silhouette, 0.75 inter share)
SEPARATION_FIT = SeparationFit(
    silhouette=(0.0971, 0.3972, 0.3512, -0.1877), silhouette_noise=0.0668,
    inter_share=(0.5753, -0.0956, 0.1701, -0.0021), inter_share_noise=0.0378, total=49.0,
    fitted_on="bench/fit_separation.py --seeds 2: 50 batches of 6 images (512x384 px at 1.5 nm), "
              "p in (0.4, 0.55, 0.7, 0.85, 0.95), s in (0.0, 0.25, 0.5, 0.75, 1.0)",
)


def _surface(c: tuple[float, float, float, float], p: float, s: float) -> float:
    return c[0] + c[1] * p + c[2] * s + c[3] * p * s


def separation_of(batch: TrueBatch, counts: Mapping[str, int], rng: np.random.Generator,
                  fit: SeparationFit = SEPARATION_FIT) -> dict[str, float]:
    """Silhouette and inter/intra/total variance the image path would report for a sample of
    ``batch`` with these class counts (silhouette NaN unless two classes have two particles,
    as :func:`qcloop.batch.separation` has it)."""
    s = batch.sharpness
    n = sum(counts.values())
    sphere_fraction = counts.get("sphere", 0) / n if n else 0.0
    sil = _surface(fit.silhouette, sphere_fraction, s) + fit.silhouette_noise * rng.standard_normal()
    if sum(1 for k in counts.values() if k >= 2) < 2:
        sil = float("nan")
    share = _surface(fit.inter_share, sphere_fraction, s) + fit.inter_share_noise * rng.standard_normal()
    share = float(np.clip(share, 0.0, 1.0))
    return {"silhouette": float(np.clip(sil, -1.0, 1.0)) if math.isfinite(sil) else sil, "inter_class_variance": share * fit.total,
            "intra_class_variance": (1.0 - share) * fit.total, "total_variance": fit.total}


def measure(batch: TrueBatch, rng: np.random.Generator, n_particles: int = 200) -> tuple[dict[str, float],
                                                                                        dict[str, float]]:
    """Metrics of a finite particle sample of ``batch`` (what image analysis would report).

    Draws ``n_particles`` log-normal ECDs and multinomial classes and computes the same flat
    names and 95 % half-widths as :class:`qcloop.batch.BatchMetrics` (``n_particles``,
    ``ecd_nm.<stat>``, ``ecd_nm.<cls>.<stat>``, ``class_fraction.<cls>``, ``class_count.<cls>``)
    and the separation metrics (``silhouette``, ``inter_class_variance``,
    ``intra_class_variance``, ``total_variance``) from :data:`SEPARATION_FIT`. The classes are
    the true ones (a classifier's mistakes are not modelled).

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
    # the ECDs are iid: consecutive runs of them are a random split by class (no further draws,
    # so the noise of later batches stays what it was before the per-class sizes existed)
    local = np.random.default_rng(np.frombuffer(ecd[:2].tobytes(), dtype=np.uint32))
    flat: dict[str, float] = {"n_particles": float(n_particles), "n_images": 1.0, "n_border": 0.0}
    unc: dict[str, float] = {}
    _add_sizes(flat, unc, "ecd_nm", SizeStats.of(ecd))
    start = 0
    for name, k in zip(names, counts):
        if k == 0:
            continue
        _add_sizes(flat, unc, f"ecd_nm.{name}", SizeStats.of(ecd[start:start + k]))
        start += k
        flat[f"class_count.{name}"] = float(k)
        flat[f"class_fraction.{name}"] = float(k) / n_particles
        unc[f"class_fraction.{name}"] = wilson_halfwidth(int(k), n_particles)
    flat.update(separation_of(batch, dict(zip(names, (int(k) for k in counts))), local))
    return flat, unc


def _add_sizes(flat: dict[str, float], unc: dict[str, float], prefix: str, stats: Any) -> None:
    for k, v in stats.values().items():
        flat[f"{prefix}.{k}"] = v
        unc[f"{prefix}.{k}"] = float(stats.halfwidth[k])


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
    protocol : {"5", "3.1.1"}
        The MQTT version (the daemon's ``mqtt.protocol``). v5 answers a suggestion on its response
        topic with its correlation data; 3.1.1 has neither and answers on
        ``{prefix}/suggestions/ack``, naming the suggestion by the payload's ``msg_id``.
    """

    def __init__(self, *, host: str, port: int, prefix: str, watch_dir: str | Path,
                 staging_dir: str | Path | None = None, start: Mapping[str, float] | None = None,
                 model: ReactorModel | None = None, limits: Mapping[str, tuple[float, float]] | None = None,
                 operator: str = "accept", images_per_batch: int = 2, width_px: int = 512, height_px: int = 384,
                 pixel_size_nm: float = 2.0, truth_dir: str | Path | None = None, seed: int = 0,
                 batch_prefix: str = "B", client_id: str | None = None, synth_overrides: Mapping[str, Any] | None = None,
                 persistent_session: bool = False, protocol: str = "5"):
        if operator not in ("accept", "reject", "silent"):
            raise ValueError(f"operator must be accept, reject or silent, got {operator!r}")
        if protocol not in ("5", "3.1.1"):
            raise ValueError(f"protocol must be '5' or '3.1.1', got {protocol!r}")
        self.protocol = protocol
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
        v5 = self.protocol == "5"
        session = {} if v5 else {"clean_session": not self.persistent_session}
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, **session)
        c.reconnect_delay_set(0.2, 2)
        c.on_message = self._on_message
        c.on_connect = self._on_connect
        connect: dict[str, Any] = {}
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600 if self.persistent_session else 0
            connect = {"clean_start": not self.persistent_session, "properties": props}
        c.connect(self.host, self.port, keepalive=30, **connect)
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
                    props = msg.properties  # MQTT v5 request/response: where and how to answer (3.1.1: None)
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
        props = None  # 3.1.1: no properties; the payload's msg_id names the suggestion
        if self.protocol == "5":
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

        self.n_batches += 1
        name = self.batch_name(self.n_batches)
        used = dict(self.setpoints)
        self._publish("reactor/batch", {"batch": name, "event": "start", "setpoints": used, "at": iso(time.time())})
        true = self.model.batch(used, self.rng)
        paths = self.export_images(true, name, self.watch_dir, seed=self.seed * 100003 + self.n_batches)
        self._publish("reactor/batch", {"batch": name, "event": "end", "setpoints": used, "at": iso(time.time())})
        rec = BatchRecord(name, used, true, [str(p) for p in paths])
        self.records.append(rec)
        return rec

    def export_images(self, true: TrueBatch, name: str, folder: str | Path, *, seed: int,
                      n_images: int | None = None, truth_dir: str | Path | None = None) -> list[Path]:
        """Write the synthetic SEM images of one batch into ``folder`` as ``<name>_imgNN.tif``.

        Each image is written under a temporary name in the staging folder and renamed into
        place (atomic: a watcher never sees a half-written file); its ground-truth CSV goes to
        ``truth_dir`` (default: the reactor's ``truth_dir``; dropped when both are None) as
        ``<name>_imgNN.csv``, never into ``folder``. MQTT is not touched.
        """
        from qcloop.synth import generate_batch, write_image

        truth = Path(truth_dir) if truth_dir is not None else self.truth_dir
        images = generate_batch(true.mean_ecd_nm, true.size_cv, true.class_fractions,
                                self.images_per_batch if n_images is None else int(n_images), seed=seed,
                                pixel_size_nm=self.pixel_size_nm, width_px=self.width_px, height_px=self.height_px,
                                **{**true.synth_fields(), **self.synth_overrides})
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, img in enumerate(images, 1):
            final = folder / f"{name}_img{i:02d}.tif"
            tmp = self.staging_dir / f".{final.name}.part"
            tif, csv = write_image(tmp.with_suffix(".tif"), img)
            if truth is not None:
                truth.mkdir(parents=True, exist_ok=True)
                os.replace(csv, truth / f"{final.stem}.csv")
            else:
                csv.unlink(missing_ok=True)
            os.replace(tif, final)
            paths.append(final)
        return paths

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
