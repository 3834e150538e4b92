"""Configuration: one YAML file plus ``QCLOOP_<SECTION>__<KEY>`` environment overrides.

Every section is a pydantic model with ``extra="forbid"``, so a typo fails at start with the
field's path (``pipeline.classical.treshold: Extra inputs are not permitted``). Only
``yaml.safe_load`` is used. The configuration is loaded once, at the edge (CLI / daemon), and
the parts each stage needs are passed down as plain typed objects.

Sections (each documented on its class): imaging, pipeline (classical, sam, dinov2, lobes),
watch, batch, targets, mqtt, metrics, retention, control.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from qcloop.errors import ConfigError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- imaging
class ImagingConfig(Section):
    """How images are read.

    banner: ``auto`` detects the microscope's info bar from the image; ``fixed`` drops the
    bottom ``banner_rows`` rows; ``none`` analyses the whole frame.
    pixel_size_nm: used when the file carries no vendor metadata (source ``config``).
    force_pixel_size: use ``pixel_size_nm`` even when the file has vendor metadata.
    max_side_px: images whose header claims a longer side are refused before decoding.
    memory_budget_mb: images whose analysis would need more memory than this (decoded pixels
    plus the pipeline's working set, estimated from the header before any pixel is decoded:
    :data:`qcloop.imaging.WORKING_SET_BYTES_PER_PIXEL`) are refused with that reason.
    """

    banner: Literal["auto", "fixed", "none"] = "auto"
    banner_rows: int | None = Field(default=None, ge=0)
    pixel_size_nm: float | None = Field(default=None, gt=0)
    force_pixel_size: bool = False
    max_side_px: int = Field(default=30000, gt=0)
    memory_budget_mb: float = Field(default=1536.0, gt=0)

    @model_validator(mode="after")
    def _check_dependent_fields(self) -> "ImagingConfig":
        if self.banner == "fixed" and self.banner_rows is None:
            raise ValueError("banner: fixed needs banner_rows (rows to drop at the bottom)")
        if self.force_pixel_size and self.pixel_size_nm is None:
            raise ValueError("force_pixel_size: true needs pixel_size_nm")
        return self


# --------------------------------------------------------------------------- segmentation
class ClassicalConfig(Section):
    """Classical segmenter: denoise, threshold, distance-transform watershed (``qcloop.segment.classical``).

    Every ``None`` is derived from the image (expected particle size is estimated
    automatically). ``threshold: auto`` puts the threshold ``auto_level`` of the way from the
    substrate to the particle grey level (robust to dark shadows between particles); ``otsu``,
    ``li``, ``triangle`` are global, ``local`` a Gaussian-weighted local mean over
    ``local_block_size_px`` (default three particle diameters). ``threshold_offset`` is added to
    any of them. Holes up to ``max_hole_frac`` x the expected particle area are filled.
    ``split_touching`` splits touching particles by a watershed from the centres of the
    particles' bright cores, at least ``split_min_distance_frac`` x radius apart;
    ``refine_outline`` puts every outline half-way between the particle's grey level and its
    surroundings' and trims thin strips.
    """

    denoise_sigma_px: float | None = Field(default=None, ge=0)
    threshold: Literal["auto", "otsu", "li", "triangle", "local"] = "auto"
    local_block_size_px: int | None = Field(default=None, ge=3)
    threshold_offset: float = 0.0
    auto_level: float = Field(default=0.2, gt=0, lt=1)
    expected_diameter_px: float | None = Field(default=None, gt=0)
    min_area_px: int | None = Field(default=None, ge=1)
    split_touching: bool = True
    refine_outline: bool = True
    max_hole_frac: float = Field(default=0.03, ge=0)
    split_min_distance_frac: float = Field(default=1.0, gt=0, le=2)
    dark_particles: bool = False


class SamArchitecture(Section):
    """Encoder dimensions of a SAM model that is none of the official types (a distilled or
    test model). Unset = the dimensions of ``model_type`` (ViT-B/L/H as published)."""

    encoder_embed_dim: int = Field(ge=8)
    encoder_depth: int = Field(ge=1)
    encoder_num_heads: int = Field(ge=1)
    encoder_global_attn_indexes: list[int] = []


class SamConfig(Section):
    """Segment Anything (SAM1); needs the 'foundation' extra. See docs/foundation.md.

    ``auto`` runs segment-anything's SamAutomaticMaskGenerator with the paper's settings
    (grid ``points_per_side``², predicted IoU and stability thresholds, small-region clean-up
    below ``min_mask_region_area`` px). ``prompted`` is the fast path: one ``point`` or
    ``box`` prompt per classical candidate (``pipeline.classical`` settings), image encoded
    once, prompts decoded in batches of ``prompt_batch_size`` (default: 4 on the CPU, 64 on a
    GPU), masks upsampled only around each particle. Images with a side above ``tile_size_px`` are cut into overlapping tiles.
    Prompted masks with predicted IoU below ``prompt_min_iou``, or larger than
    ``max_area_ratio`` × their candidate's box area (judged on the decoder's 256² logits, before
    upsampling; SAM took the background or a cluster) are dropped. Overlapping masks: the higher
    predicted IoU wins the shared pixels; a mask left with less than half its pixels, or with
    IoU ≥ ``duplicate_iou`` with a better one, is dropped.
    """

    mode: Literal["auto", "prompted"] = "auto"
    model_type: Literal["vit_b", "vit_l", "vit_h"] = "vit_b"
    checkpoint: Path | None = None
    architecture: SamArchitecture | None = None
    points_per_side: int = Field(default=32, ge=1)
    points_per_batch: int = Field(default=64, ge=1)
    pred_iou_thresh: float = Field(default=0.95, ge=0, le=1)
    stability_score_thresh: float = Field(default=0.95, ge=0, le=1)
    box_nms_thresh: float = Field(default=0.7, gt=0, le=1)
    min_mask_region_area: int = Field(default=500, ge=0)
    prompt: Literal["point", "box"] = "point"
    prompt_batch_size: int | None = Field(default=None, ge=1)
    multimask_output: bool = True
    prompt_min_iou: float = Field(default=0.0, ge=0, le=1)
    max_area_ratio: float | None = Field(default=6.0, gt=0)
    duplicate_iou: float = Field(default=0.7, gt=0, le=1)
    tile_size_px: int = Field(default=1500, ge=256)
    tile_overlap_px: int = Field(default=200, ge=0)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"

    @model_validator(mode="after")
    def _check_tiles(self) -> "SamConfig":
        if 2 * self.tile_overlap_px >= self.tile_size_px:
            raise ValueError("tile_overlap_px must be less than half of tile_size_px")
        return self


class Dinov2Config(Section):
    """DINOv2 embedder; needs the 'foundation' extra. See docs/foundation.md.

    ``model``: a local Hugging Face format directory (config.json + weights) or a model id
    already in the local HF cache (the network is never used). ``crop`` mode (the paper's):
    each particle cropped to its bounding box, pixels outside its mask set to
    ``background_value`` (``input: mask`` feeds the binary mask itself), padded to a square,
    resized to ``size_px``, ImageNet-normalised; the ``cls`` token (or ``cls+mean``: CLS and
    mean patch token concatenated). ``pooled`` mode: one pass over the image (scaled by
    ``pooled_scale``) in windows of ``pooled_window_px`` (multiple of the 14 px patch), each
    particle the area-weighted mean of the patch tokens under its mask.
    """

    model: str = "facebook/dinov2-base"
    mode: Literal["crop", "pooled"] = "crop"
    input: Literal["masked", "mask"] = "masked"
    background_value: float = Field(default=0.0, ge=0, le=1)
    token: Literal["cls", "cls+mean"] = "cls"
    size_px: int = Field(default=224, ge=14)
    batch_size: int = Field(default=32, ge=1)
    pooled_window_px: int = Field(default=518, ge=14)
    pooled_scale: float = Field(default=1.0, gt=0, le=8)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"


class LobesConfig(Section):
    """Grouping of fused lobes (dumbbells, trimers) into one particle (see ``qcloop.lobes``).

    Regions split into lobes where their background-facing outline is several circles. Touching
    lobes fuse when the log-odds of ``qcloop.lobes.FUSE_MODEL`` (neck width, darkness of the
    common boundary, overlap of the lobes' circles) is at least ``fuse_score``: raise it to fuse
    less, lower it to fuse more. A single lobe joins a two-lobe particle whose own neck is
    unmistakable (log-odds at least ``clear_pair_score``) already at log-odds of at least
    ``third_lobe_score`` when it continues the chain: the angle at the lobe it joins, between
    the centroids of the other two, is at least ``third_lobe_angle`` degrees (a trimer's middle
    lobe often meets one end across a narrow, darker neck; a lobe beside the pair's neck may be
    a neighbouring particle or the other half of a split lobe). Set ``third_lobe_score`` to
    ``fuse_score`` to switch this off. Lobes meeting across a neck narrower than ``min_neck`` x the
    smaller lobe's inscribed radius (a point contact) never fuse. Lobes facing each other across
    a background gap of at most ``max_gap`` x the typical lobe radius count as neighbours (the
    segmenter may cut a fused neck along its seam). ``dim_lobes``: lobe-sized background blobs
    about as bright as the substrate and wedged between regions (dim middle lobes of trimers the
    segmenter missed) are added as lobes, and kept where they fuse with a neighbour.
    ``seam_depth``: a lobe too large for one disc is cut along a straight seam across a neck
    that is darker than the grey 2-4 px to either side by at least this fraction of the lobes'
    grey range (raise it to cut less; chosen by hand on the Konstanz trimers).
    """

    enabled: bool = True
    max_lobes: int = Field(default=6, ge=1)
    fuse_score: float = 1.0
    third_lobe_score: float = -0.5
    clear_pair_score: float = 4.0
    third_lobe_angle: float = Field(default=100.0, ge=0, le=180)
    min_neck: float = Field(default=0.3, ge=0)
    max_gap: float = Field(default=0.3, ge=0)
    dim_lobes: bool = True
    seam_depth: float = Field(default=0.05, ge=0)


class PipelineConfig(Section):
    segmenter: Literal["classical", "sam"] = "classical"
    embedder: Literal["morphology", "dinov2"] = "morphology"
    classifier: Path | None = None
    unknown_below: float = Field(default=0.5, ge=0, le=1)
    classical: ClassicalConfig = ClassicalConfig()
    sam: SamConfig = SamConfig()
    dinov2: Dinov2Config = Dinov2Config()
    lobes: LobesConfig = LobesConfig()


# --------------------------------------------------------------------------- targets
class TargetSpec(Section):
    """One QC check on one batch metric (names: :func:`qcloop.targets.validate_target_names`).

    Give ``min`` and/or ``max`` (inclusive bounds), or ``target`` with ``tolerance`` (passes
    when ``|observed - target| <= tolerance``); both forms may be combined. Example::

        targets:
          class_fraction.cube: {min: 0.9}
          ecd_nm.mean: {target: 130, tolerance: 5}
    """

    min: float | None = None
    max: float | None = None
    target: float | None = None
    tolerance: float | None = Field(default=None, ge=0, validate_default=True)

    @field_validator("tolerance")
    @classmethod
    def _check_bounds(cls, v: float | None, info: Any) -> float | None:
        # runs last (validate_default), so it sees every other field
        lo, hi, target = info.data.get("min"), info.data.get("max"), info.data.get("target")
        if v is not None and target is None:
            raise ValueError("tolerance needs target")
        if target is not None and v is None:
            raise ValueError("target needs tolerance")
        if lo is None and hi is None and target is None:
            raise ValueError("give min, max, or target with tolerance")
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"min ({lo}) is greater than max ({hi})")
        return v


# --------------------------------------------------------------------------- daemon
class WatchConfig(Section):
    """The export folder the daemon watches (``qcloop run``).

    A file is taken only when its size and mtime have been stable for ``settle_seconds`` and
    the image decodes; a file that is stable but does not decode is re-checked
    ``decode_retries`` more times (``settle_seconds`` apart) before it is quarantined.
    ``patterns`` are matched case-insensitively against the file name; hidden files (name
    starting with ``.``, e.g. rsync/samba temporaries) are ignored. ``polling: true`` uses the
    polling observer (network shares: NFS/SMB deliver no inotify events). An image that was
    being analysed when the daemon died ``max_attempts`` times is quarantined (poison pill); a
    death counts against an image only when that image alone was in analysis and the process
    was not stopping cleanly (SIGTERM/SIGINT: a machine shutdown, ``systemctl stop``, a kill
    after ``TimeoutStopSec``). The systemd watchdog stops being fed when one image takes longer
    than ``stall_timeout_s``. Symbolic links are followed only when they end inside the watched
    folder; loops and dangling links are reported once.
    """

    directory: Path | None = None
    patterns: list[str] = Field(default=["*.tif", "*.tiff", "*.png", "*.jpg", "*.jpeg", "*.bmp"],
                                min_length=1)
    recursive: bool = True
    polling: bool = False
    polling_interval_s: float = Field(default=1.0, gt=0)
    settle_seconds: float = Field(default=2.0, ge=0)
    decode_retries: int = Field(default=2, ge=0)
    max_attempts: int = Field(default=3, ge=1)
    stall_timeout_s: float = Field(default=900.0, gt=0)


class BatchConfig(Section):
    """How images are grouped into batches and when a batch closes.

    key: ``regex:<pattern>`` (the named group ``batch`` of a match against the file name),
    ``subfolder`` (the first folder below ``watch.directory``) or ``message`` (the batch named
    by the latest ``{prefix}/reactor/batch`` message). Images without a key go to
    ``default_batch``. A batch closes when an image of another batch arrives, after
    ``close_after_idle_s`` without a new image, or on ``{prefix}/commands/close-batch``.
    ``min_particles``: a closed batch with fewer particles is published with
    ``sufficient: false`` (verdict ``insufficient``); the controller hooks get the same flag.
    """

    key: str = "regex:^(?P<batch>[^_]+)_"
    close_after_idle_s: float = Field(default=900, gt=0)
    min_particles: int = Field(default=30, ge=0)
    default_batch: str = Field(default="unassigned", min_length=1)

    @field_validator("key")
    @classmethod
    def _valid_key(cls, v: str) -> str:
        import re

        if v in ("subfolder", "message"):
            return v
        if not v.startswith("regex:"):
            raise ValueError("must be 'regex:<pattern>', 'subfolder' or 'message'")
        try:
            pattern = re.compile(v[len("regex:"):])
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from None
        if "batch" not in pattern.groupindex:
            raise ValueError("the regular expression needs a named group (?P<batch>...)")
        return v


class TlsConfig(Section):
    """TLS to the broker: on when ``enabled`` or ``ca`` is set (``ca`` unset: system CAs).
    ``cert``/``key``: client certificate. ``insecure``: skip host-name check (tests only)."""

    enabled: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    insecure: bool = False

    @property
    def active(self) -> bool:
        return self.enabled or self.ca is not None


class MqttConfig(Section):
    """MQTT link (paho-mqtt 2.x), MQTT v5 or, with ``protocol: "3.1.1"``, MQTT 3.1.1 for brokers
    that speak no v5 (then no v5 properties are sent: no content type, message expiry, response
    topic or correlation data; the payloads carry ``msg_id`` and ``expires_at``, and expired
    suggestions are still dropped from the outbox unsent; the session is ``clean_session=False``
    and ``session_expiry_s`` is not sent: the broker's own setting decides how long it keeps it).
    Every message is stored in the durable outbox first and
    deleted after the broker's PUBACK; at most ``max_inflight`` are unacknowledged at once.
    The password comes from ``password_file`` (first line) or ``password``
    (``QCLOOP_MQTT__PASSWORD``). ``enabled: false`` runs the daemon without MQTT (nothing is
    queued).

    Inbound messages are acknowledged only after the ledger commit that handled them, in a
    persistent session (``session_expiry_s``; the client id is kept in the ledger unless
    ``client_id`` is set), so the broker redelivers what a crash interrupted and queues what
    arrives while the daemon is down. Payloads larger than ``max_payload_bytes`` or nested deeper
    than ``max_json_depth`` are rejected before they are parsed. Failed connects back off from
    ``reconnect_min_s`` to ``reconnect_max_s``; while the broker's port is closed it is probed
    every ``probe_interval_s`` and the daemon reconnects as soon as it opens. The retained
    ``online`` status is re-sent every ``status_interval_s`` (a heartbeat with the current time).
    """

    enabled: bool = True
    protocol: Literal["5", "3.1.1"] = "5"
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    topic_prefix: str = "qcloop/{line_id}"
    client_id: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    keepalive_s: int = Field(default=30, ge=5)
    max_inflight: int = Field(default=20, ge=1, le=65535)
    reconnect_min_s: float = Field(default=1.0, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    flush_timeout_s: float = Field(default=5.0, ge=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    probe_interval_s: float = Field(default=0.25, gt=0)
    session_expiry_s: int = Field(default=604800, ge=0)
    status_interval_s: float = Field(default=60.0, gt=0)
    max_payload_bytes: int = Field(default=65536, ge=64)
    max_json_depth: int = Field(default=32, ge=2, le=500)
    tls: TlsConfig = TlsConfig()

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_text(cls, v: Any) -> Any:
        """YAML reads ``protocol: 5`` as a number."""
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @property
    def v5(self) -> bool:
        return self.protocol == "5"

    @field_validator("topic_prefix")
    @classmethod
    def _valid_prefix(cls, v: str) -> str:
        if not v or v.startswith("/") or v.endswith("/") or "+" in v or "#" in v:
            raise ValueError("must be a topic without wildcards and without leading/trailing '/'")
        try:
            v.format(line_id="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"only the placeholder {{line_id}} is allowed ({exc})") from None
        return v


class MetricsConfig(Section):
    """Prometheus endpoint (``http://host:port/metrics``); ``port: 0`` picks a free port.

    Requests are served by at most ``threads`` threads; a connection is handed to one only
    once its request has arrived, so idle connections hold no thread; they are closed after
    ``idle_timeout_s``, and beyond ``max_connections`` open ones the oldest is closed.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=9464, ge=0, le=65535)
    threads: int = Field(default=4, ge=1, le=64)
    idle_timeout_s: float = Field(default=10.0, gt=0)
    max_connections: int = Field(default=64, ge=1)


class RetentionConfig(Section):
    """What the daemon prunes, in the background (every ``interval_s``, a bounded amount per run).

    ``particles_days``: per-image particle tables (kept to re-score a batch when a late image
    arrives) of batches closed longer ago are dropped (the image rows and results stay).
    ``rows_days``: image rows older than this whose file is gone from the watched folder are
    deleted. ``quarantine_days`` / ``quarantine_max_mb``: quarantined files (and reason files)
    older than that, or the oldest beyond that total size, are deleted. ``inbox_days`` /
    ``inbox_max_rows``: the log of handled inbound messages (used to drop redeliveries).
    ``seen_max``: file states the watcher remembers (least recently seen forgotten first; the
    ledger still keeps a forgotten file from being analysed twice).
    """

    interval_s: float = Field(default=3600.0, gt=0)
    particles_days: float = Field(default=90.0, gt=0)
    rows_days: float = Field(default=365.0, gt=0)
    quarantine_days: float = Field(default=90.0, gt=0)
    quarantine_max_mb: float = Field(default=2048.0, gt=0)
    inbox_days: float = Field(default=7.0, gt=0)
    inbox_max_rows: int = Field(default=100000, ge=100)
    seen_max: int = Field(default=100000, ge=100)
    batch_rows: int = Field(default=500, ge=1)


# --------------------------------------------------------------------------- control
class SetpointSpec(Section):
    """One reactor setpoint the controller may move (see docs/control.md).

    ``max_step`` is the largest change one suggestion may make (per batch), in ``unit``.
    ``source`` is the key of this setpoint in the reactor's retained ``{prefix}/reactor/setpoints``
    message (default: ``name``); ``initial`` is assumed until the reactor has published a value.
    ``resolution`` rounds suggestions to that step (inside the bounds).
    """

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")
    unit: str = ""
    min: float
    max: float
    max_step: float = Field(gt=0)
    initial: float | None = None
    source: str | None = None
    resolution: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check_bounds(self) -> "SetpointSpec":
        if not self.min < self.max:
            raise ValueError(f"setpoint {self.name!r}: min ({self.min}) must be below max ({self.max})")
        if self.initial is not None and not self.min <= self.initial <= self.max:
            raise ValueError(f"setpoint {self.name!r}: initial {self.initial} outside [{self.min}, {self.max}]")
        return self


class RuleSpec(Section):
    """Map one metric's deviation from its target to moves of one setpoint (incremental PI).

    With ``e = observed - target`` the move per batch is ``gain * e + kp * (e - e_previous)``:
    ``gain`` is the integral gain in setpoint units per metric unit (``ecd_nm.mean`` above
    target, ``gain: 0.4`` -> raise the setpoint 0.4 per nm). ``deadband`` (default: the target's
    tolerance) is the ``|e|`` at or below which the rule asks for nothing. ``target`` and
    ``tolerance`` default to ``targets.<metric>``.
    """

    metric: str = Field(min_length=1)
    setpoint: str = Field(min_length=1)
    gain: float
    kp: float = 0.0
    deadband: float | None = Field(default=None, ge=0)
    target: float | None = None
    tolerance: float | None = Field(default=None, gt=0)


class BayesConfig(Section):
    """Gaussian-process planner (``control.planner: bayes``).

    The objective ``sum_m weight_m * ((observed_m - target_m) / tolerance_m)**2`` is modelled over
    the setpoints of past batches -- ``model: metrics`` (default): one GP per objective metric,
    the objective computed from them (composite); ``model: objective``: one GP of the objective
    itself -- and the next setpoints maximise expected improvement inside a trust region of
    ``trust_region * max_step`` around the best batch so far, within one ``max_step`` of the
    current setpoints. Until ``n_initial``
    batches with distinct setpoints exist (default: number of setpoints + 1) it probes one
    setpoint at a time by ``probe_fraction * max_step``.
    """

    objective: dict[str, float] = {}
    model: Literal["metrics", "objective"] = "metrics"
    mc_samples: int = Field(default=128, ge=16)
    trust_region: float = Field(default=1.0, gt=0)
    n_initial: int | None = Field(default=None, ge=1)
    probe_fraction: float = Field(default=1.0, gt=0, le=1)
    candidates: int = Field(default=1024, ge=16)
    xi: float = Field(default=0.01, ge=0)
    history: int = Field(default=60, ge=3)
    seed: int = 0


class ControlConfig(Section):
    """Setpoint suggestions (closing the loop); see docs/control.md and :mod:`qcloop.control`.

    ``min_particles`` (default: ``batch.min_particles``) and ``hold_when_uncertain`` (95 % CI
    half-width of a rule's metric wider than its tolerance) make the controller hold.
    ``cooldown_batches`` closed batches are skipped after a change. A suggestion not acknowledged
    within ``suggestion_ttl_s`` expires.
    """

    enabled: bool = False
    planner: Literal["pi", "bayes"] = "pi"
    mode: Literal["advisory", "command"] = "advisory"
    setpoints: list[SetpointSpec] = []
    rules: list[RuleSpec] = []
    cooldown_batches: int = Field(default=1, ge=0)
    min_particles: int | None = Field(default=None, ge=0)
    hold_when_uncertain: bool = True
    suggestion_ttl_s: float = Field(default=900.0, gt=0)
    bayes: BayesConfig = BayesConfig()

    @model_validator(mode="after")
    def _check_references(self) -> "ControlConfig":
        names = [s.name for s in self.setpoints]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"setpoints: duplicate name(s) {dupes}")
        for i, rule in enumerate(self.rules):
            if rule.setpoint not in names:
                raise ValueError(f"rules.{i}.setpoint: {rule.setpoint!r} is not a declared setpoint {names}")
        if self.enabled and not self.setpoints:
            raise ValueError("setpoints: control is enabled but no setpoint is declared")
        if self.enabled and self.planner == "pi" and not self.rules:
            raise ValueError("rules: planner 'pi' needs at least one rule")
        return self


# --------------------------------------------------------------------------- top level
class Settings(BaseSettings):
    """The whole configuration. Load it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="QCLOOP_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    line_id: str = Field(default="line1", pattern=r"^[A-Za-z0-9_.-]+$")
    state_dir: Path = Path("./qcloop-state")
    imaging: ImagingConfig = ImagingConfig()
    pipeline: PipelineConfig = PipelineConfig()
    watch: WatchConfig = WatchConfig()
    batch: BatchConfig = BatchConfig()
    targets: dict[str, TargetSpec] = {}
    mqtt: MqttConfig = MqttConfig()
    metrics: MetricsConfig = MetricsConfig()
    retention: RetentionConfig = RetentionConfig()
    control: ControlConfig = ControlConfig()

    _yaml_data: dict[str, Any] = {}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # environment overrides win over the YAML file (passed as init kwargs)
        return (env_settings, init_settings)

    def config_hash(self) -> str:
        """Short stable hash of the effective configuration (published in the status message)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def topic_prefix(self) -> str:
        return self.mqtt.topic_prefix.format(line_id=self.line_id)


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "<root>"
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {path}: {err['msg']}{shown}")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load``; errors become ConfigError naming the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_settings(path: str | Path | None = None, *, use_env: bool = True, **overrides: Any) -> Settings:
    """Load the configuration.

    Parameters
    ----------
    path : path, optional
        YAML file. Defaults to ``$QCLOOP_CONFIG`` when set, else the embedded defaults.
    use_env : bool
        Apply ``QCLOOP_<SECTION>__<KEY>`` environment overrides (default True).
    **overrides
        Top-level keys that win over the file (used by tests and the CLI).

    Raises
    ------
    ConfigError
        With one line per bad field: its dotted path, the reason and the offending value.
    """
    if path is None:
        path = os.environ.get("QCLOOP_CONFIG") or None
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "embedded defaults"
    if path is not None:
        base = Path(path).resolve().parent
        data = _resolve_relative_paths(data, base)
    data.update(overrides)
    try:
        settings = Settings(**data) if use_env else _NoEnvSettings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
    from qcloop.targets import validate_target_names  # metric names are defined by qcloop.batch

    validate_target_names(settings.targets)
    return settings


class _NoEnvSettings(Settings):
    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, *args, **kwargs):  # type: ignore[override]
        return (init_settings,)


_PATH_FIELDS = (
    ("state_dir",),
    ("watch", "directory"),
    ("pipeline", "classifier"),
    ("pipeline", "sam", "checkpoint"),
    ("mqtt", "password_file"),
    ("mqtt", "tls", "ca"),
    ("mqtt", "tls", "cert"),
    ("mqtt", "tls", "key"),
)


def _resolve_relative_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Paths written relative in a YAML file are relative to that file, not to the cwd."""
    for dotted in _PATH_FIELDS:
        node: Any = data
        for part in dotted[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        value = node.get(dotted[-1])
        if isinstance(value, str) and value:
            p = Path(value).expanduser()
            node[dotted[-1]] = str(p if p.is_absolute() else base / p)
    return data
