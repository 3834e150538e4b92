"""Foundation-model files: SAM checkpoints and DINOv2 directories; device choice; downloads.

Everything here that needs torch, segment-anything or transformers imports it inside the
function, so ``import qcloop.models`` works on the core install (``models download`` and the
checksum part of ``models check`` need only the standard library).

Security: SAM checkpoints are read with ``torch.load(..., weights_only=True)`` (a file that
carries pickled Python objects beyond tensors is refused) and loaded into a model built here,
never through segment-anything's own loader (which unpickles without that guard). DINOv2 is
loaded with ``local_files_only=True``: the network is never used.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from qcloop.errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qcloop.config import Dinov2Config, SamArchitecture, SamConfig, Settings

log = logging.getLogger(__name__)

SAM_URL_BASE = "https://dl.fbaipublicfiles.com/segment_anything/"

#: Official SAM checkpoint file names; the hex before ``.pth`` is the SHA-256 prefix.
SAM_CHECKPOINTS: dict[str, str] = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
}

#: Encoder dimensions of the official SAM types (segment_anything.build_sam).
SAM_ENCODERS: dict[str, dict[str, Any]] = {
    "vit_h": dict(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
                  encoder_global_attn_indexes=[7, 15, 23, 31]),
    "vit_l": dict(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                  encoder_global_attn_indexes=[5, 11, 17, 23]),
    "vit_b": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                  encoder_global_attn_indexes=[2, 5, 8, 11]),
}

_SHA_IN_NAME = re.compile(r"_([0-9a-f]{6,64})\.(?:pth|pt|bin|safetensors)$")

# --------------------------------------------------------------------------- helpers


def require_foundation(what: str = "this feature") -> None:
    """Raise ModelError with the install hint when torch / segment-anything / transformers lack."""
    missing = []
    for mod in ("torch", "segment_anything", "transformers"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ModelError(
            f"{what} needs the 'foundation' extra (missing: {', '.join(missing)}); "
            "install it with: pip install 'qcloop[foundation]'"
        )


def choose_device(preference: str = "auto") -> "torch.device":
    """Torch device for ``auto|cpu|cuda|mps``.

    ``auto`` takes CUDA when available, else Apple MPS, else the CPU. Asking for ``cuda`` or
    ``mps`` where it is absent is a ModelError (not a silent fall-back to the CPU).
    """
    import torch

    pref = preference.lower()
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise ModelError("device: cuda requested but torch sees no CUDA device "
                             "(use device: auto or cpu)")
        return torch.device("cuda")
    if pref == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ModelError("device: mps requested but this torch build has no MPS device")
        return torch.device("mps")
    raise ModelError(f"unknown device {preference!r} (auto, cpu, cuda, mps)")


def sha256_prefix_from_name(name: str) -> str | None:
    """The SHA-256 prefix Meta's naming puts before the suffix (``sam_vit_b_01ec64.pth``)."""
    m = _SHA_IN_NAME.search(Path(name).name)
    return m.group(1) if m else None


def sha256_file(path: Path, progress: bool = False) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    size = path.stat().st_size
    bar = _progress(size, f"sha256 {path.name}", progress)
    with open(path, "rb") as f:
        while True:
            block = f.read(4 << 20)
            if not block:
                break
            h.update(block)
            bar.update(len(block))
    bar.close()
    return h.hexdigest()


def _progress(total: int | None, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, disable=not enabled, leave=False)


# --------------------------------------------------------------------------- SAM


def sam_encoder_dims(model_type: str, architecture: "SamArchitecture | None" = None) -> dict[str, Any]:
    """Encoder dimensions for a model type, or the explicit ``architecture`` when given."""
    if architecture is not None:
        return dict(encoder_embed_dim=architecture.encoder_embed_dim,
                    encoder_depth=architecture.encoder_depth,
                    encoder_num_heads=architecture.encoder_num_heads,
                    encoder_global_attn_indexes=list(architecture.encoder_global_attn_indexes))
    if model_type not in SAM_ENCODERS:
        raise ModelError(f"unknown SAM model type {model_type!r} (vit_b, vit_l, vit_h)")
    return dict(SAM_ENCODERS[model_type])


def build_sam(encoder_embed_dim: int, encoder_depth: int, encoder_num_heads: int,
              encoder_global_attn_indexes: list[int]):
    """An untrained ``segment_anything.modeling.Sam`` with the given encoder dimensions.

    Same construction as ``segment_anything.build_sam._build_sam`` (image size 1024, patch 16,
    prompt embedding 256, two-way transformer decoder), without its unguarded ``torch.load``.
    """
    from functools import partial

    import torch
    from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                           TwoWayTransformer)

    prompt_embed_dim = 256
    image_size = 1024
    vit_patch_size = 16
    image_embedding_size = image_size // vit_patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=encoder_depth,
            embed_dim=encoder_embed_dim,
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=encoder_num_heads,
            patch_size=vit_patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=list(encoder_global_attn_indexes),
            window_size=14,
            out_chans=prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(image_embedding_size, image_embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_embed_dim,
                                          mlp_dim=2048, num_heads=8),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.eval()
    return sam


def read_state_dict(path: Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with every failure turned into a ModelError."""
    import pickle

    import torch

    path = Path(path)
    if not path.exists():
        raise ModelError(f"model checkpoint not found: {path}")
    if not path.is_file():
        raise ModelError(f"model checkpoint is not a file: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{path}: refused to load: the file holds pickled Python objects beyond tensors "
            f"(loaded with weights_only=True for safety; {first})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]  # training checkpoints that wrap the weights
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ModelError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    return dict(obj)


def _guess_sam_type(state: Mapping[str, Any]) -> str | None:
    w = state.get("image_encoder.patch_embed.proj.weight")
    if w is None or not hasattr(w, "shape"):
        return None
    dim = int(w.shape[0])
    for name, dims in SAM_ENCODERS.items():
        if dims["encoder_embed_dim"] == dim:
            return name
    return f"a non-standard encoder (embed dim {dim})"


def check_state_dict(model, state: Mapping[str, Any], path: Path, expected: str) -> None:
    """Raise ModelError when the checkpoint's keys or tensor shapes differ from the model's."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape_bad = [k for k in own if k in state and hasattr(state[k], "shape")
                 and tuple(state[k].shape) != tuple(own[k].shape)]
    not_tensor = [k for k in own if k in state and not hasattr(state[k], "shape")]
    if not (missing or unexpected or shape_bad or not_tensor):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if shape_bad:
        k = shape_bad[0]
        parts.append(f"{len(shape_bad)} tensors of the wrong shape (e.g. {k}: file "
                     f"{tuple(state[k].shape)}, model {tuple(own[k].shape)})")
    if not_tensor:
        parts.append(f"{len(not_tensor)} entries that are not tensors (e.g. {not_tensor[0]})")
    guess = _guess_sam_type(state)
    hint = f"; the file looks like SAM {guess}" if guess else "; the file does not look like a SAM checkpoint"
    raise ModelError(f"{path}: does not match SAM {expected}: " + "; ".join(parts) + hint
                     + " (check pipeline.sam.model_type / checkpoint)")


def load_sam(cfg: "SamConfig", device: "torch.device | str | None" = None):
    """Build the configured SAM and load its checkpoint safely.

    Parameters
    ----------
    cfg : SamConfig
        ``checkpoint`` (required), ``model_type`` or ``architecture``, ``device``.
    device : torch.device or str, optional
        Overrides ``cfg.device``.

    Returns
    -------
    segment_anything.modeling.Sam
        In eval mode, on the chosen device.

    Raises
    ------
    ModelError
        Checkpoint unset, missing, unreadable, pickle-bearing, or not of the configured type.
    """
    require_foundation("segmenter: sam")
    if cfg.checkpoint is None:
        official = SAM_CHECKPOINTS.get(cfg.model_type, "sam_vit_b_01ec64.pth")
        raise ModelError(
            "pipeline.sam.checkpoint is not set; get the official weights with "
            f"`qcloop models download {official} --dest DIR` and point the config at the file"
        )
    path = Path(cfg.checkpoint).expanduser()
    state = read_state_dict(path)
    dims = sam_encoder_dims(cfg.model_type, cfg.architecture)
    model = build_sam(**dims)
    expected = cfg.model_type if cfg.architecture is None else (
        f"architecture (embed dim {dims['encoder_embed_dim']}, depth {dims['encoder_depth']})")
    check_state_dict(model, state, path, expected)
    model.load_state_dict(state, strict=True)
    model.eval()
    dev = choose_device(cfg.device) if device is None else device
    return model.to(dev)


# --------------------------------------------------------------------------- DINOv2

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")


def resolve_dinov2(model: str) -> Path:
    """Local directory of a DINOv2 model: the path itself, or its snapshot in the HF cache.

    Never reaches the network. Raises ModelError naming what is missing.
    """
    p = Path(model).expanduser()
    looks_like_path = p.is_absolute() or model.startswith((".", "~")) or p.exists() \
        or model.count("/") != 1
    if p.is_dir():
        return p
    if looks_like_path:
        raise ModelError(f"DINOv2 model directory not found: {p} (pipeline.dinov2.model)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers depends on it
        raise ModelError("DINOv2 model ids need huggingface_hub (part of transformers)") from None
    try:
        found = snapshot_download(repo_id=model, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - many hub error types; all mean "not cached"
        raise ModelError(
            f"DINOv2 model {model!r} is neither a local directory nor in the Hugging Face cache "
            f"({os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'}); "
            "qcloop never downloads it itself: fetch it once with `hf download "
            f"{model}` (or copy a saved directory) and set pipeline.dinov2.model; "
            f"({type(exc).__name__})"
        ) from None
    return Path(found)


def check_dinov2_dir(path: Path) -> list[str]:
    """Problems with a DINOv2 directory (empty list = config and weights present)."""
    problems = []
    if not (path / "config.json").is_file():
        problems.append(f"{path}: config.json missing")
    else:
        import json

        try:
            mt = json.loads((path / "config.json").read_text()).get("model_type")
        except (OSError, ValueError) as exc:
            problems.append(f"{path / 'config.json'}: unreadable ({exc})")
        else:
            if mt != "dinov2":
                problems.append(f"{path / 'config.json'}: model_type is {mt!r}, not 'dinov2'")
    if not any((path / w).is_file() for w in _WEIGHT_FILES):
        problems.append(f"{path}: no weights file ({' or '.join(_WEIGHT_FILES[:2])})")
    return problems


def load_dinov2(cfg: "Dinov2Config", device: "torch.device | str | None" = None):
    """Load the configured DINOv2 as a ``transformers.Dinov2Model`` in eval mode.

    Raises
    ------
    ModelError
        Directory / cache entry missing, files missing, or not a DINOv2 model.
    """
    require_foundation("embedder: dinov2")
    from transformers import Dinov2Model

    path = resolve_dinov2(cfg.model)
    problems = check_dinov2_dir(path)
    if problems:
        raise ModelError("DINOv2 model unusable: " + "; ".join(problems))
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no per-tensor loading bars on the daemon's stderr
    try:
        model = Dinov2Model.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: cannot load DINOv2 weights: {msg}") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    dev = choose_device(cfg.device) if device is None else device
    return model.to(dev)


# --------------------------------------------------------------------------- models check


@dataclass
class CheckResult:
    """One line of ``qcloop models check``."""

    what: str
    path: str
    ok: bool
    detail: str


def check_sam_file(path: Path, model_type: str, architecture=None, *, load: bool = True,
                   progress: bool = False) -> CheckResult:
    """Verify a SAM checkpoint: exists, SHA-256 prefix of an official name, keys and shapes."""
    what = f"sam {model_type}"
    if not path.is_file():
        return CheckResult(what, str(path), False, "file not found")
    notes = []
    prefix = sha256_prefix_from_name(path.name)
    if prefix:
        digest = sha256_file(path, progress)
        if not digest.startswith(prefix):
            return CheckResult(what, str(path), False,
                               f"SHA-256 {digest[:12]}… does not start with {prefix} (corrupt or "
                               "truncated download?)")
        notes.append(f"SHA-256 matches {prefix}")
    else:
        notes.append("name carries no SHA-256 prefix: checksum not verified")
    official = SAM_CHECKPOINTS.get(model_type)
    if architecture is None and official and prefix and path.name != official:
        if path.name in SAM_CHECKPOINTS.values():
            other = [k for k, v in SAM_CHECKPOINTS.items() if v == path.name][0]
            return CheckResult(what, str(path), False,
                               f"official {other} checkpoint but model_type is {model_type}")
    if load:
        try:
            require_foundation("checking a SAM checkpoint's contents")
            state = read_state_dict(path)
            model = build_sam(**sam_encoder_dims(model_type, architecture))
            check_state_dict(model, state, path, model_type)
        except ModelError as exc:
            return CheckResult(what, str(path), False, str(exc))
        notes.append("keys and shapes match")
    return CheckResult(what, str(path), True, "; ".join(notes))


def check_models(settings: "Settings", *, load: bool = True, progress: bool = False,
                 everything: bool = False) -> list[CheckResult]:
    """Check the model files the configuration uses (all configured ones with ``everything``)."""
    pipe = settings.pipeline
    out: list[CheckResult] = []
    if pipe.segmenter == "sam" or everything or pipe.sam.checkpoint is not None:
        if pipe.sam.checkpoint is None:
            out.append(CheckResult(f"sam {pipe.sam.model_type}", "-", False,
                                   "pipeline.sam.checkpoint is not set"))
        else:
            out.append(check_sam_file(Path(pipe.sam.checkpoint).expanduser(), pipe.sam.model_type,
                                      pipe.sam.architecture, load=load, progress=progress))
    if pipe.embedder == "dinov2" or everything:
        what = "dinov2"
        try:
            path = resolve_dinov2(pipe.dinov2.model)
        except ModelError as exc:
            out.append(CheckResult(what, pipe.dinov2.model, False, str(exc)))
        else:
            problems = check_dinov2_dir(path)
            out.append(CheckResult(what, str(path), not problems,
                                   "; ".join(problems) or "config.json and weights present"))
    return out


# --------------------------------------------------------------------------- download


def official_sam_name(name: str) -> str | None:
    """Map ``vit_b`` / ``sam_vit_b`` / ``sam_vit_b_01ec64.pth`` to the official file name."""
    n = name.strip().lower()
    if n in SAM_CHECKPOINTS.values():
        return n
    n = n.removeprefix("sam_").removesuffix(".pth")
    return SAM_CHECKPOINTS.get(n)


def download(name: str, dest: str | Path = ".", *, url: str | None = None, progress: bool = True,
             timeout_s: float = 60.0, chunk_bytes: int = 1 << 20,
             opener: Callable[..., Any] | None = None) -> Path:
    """Fetch a checkpoint over HTTP(S), resuming a partial ``.part`` file, and verify it.

    Parameters
    ----------
    name : str
        ``vit_b``, ``sam_vit_b`` or an official file name (``sam_vit_b_01ec64.pth``); with
        ``url`` any file name. A name ending ``_<hex>.pth`` is checked against that SHA-256
        prefix; a name without one is downloaded unverified (logged as a warning).
    dest : path
        Folder to write into (created).
    url : str, optional
        Source; default ``https://dl.fbaipublicfiles.com/segment_anything/<name>``.

    Returns
    -------
    Path
        The verified file ``dest/<name>``. A file already there that verifies is kept.

    Raises
    ------
    ModelError
        Unknown name, HTTP or network error, interrupted transfer (the ``.part`` file is kept,
        so running again resumes), or checksum mismatch (the bad file is deleted).
    """
    official = official_sam_name(name)
    filename = official or Path(name).name
    if official is None and url is None:
        raise ModelError(f"unknown checkpoint {name!r}: give one of "
                         f"{', '.join(SAM_CHECKPOINTS.values())} (or vit_b/vit_l/vit_h), "
                         "or --url for another file")
    src = url or SAM_URL_BASE + filename
    prefix = sha256_prefix_from_name(filename)
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / filename
    part = dest / (filename + ".part")
    if final.exists():
        if prefix is None or sha256_file(final, progress).startswith(prefix):
            log.info("%s already present", final)
            return final
        raise ModelError(f"{final} exists but its SHA-256 does not start with {prefix}; "
                         "delete it and download again")
    open_url = opener or urllib.request.urlopen
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(src, headers={"User-Agent": "qcloop"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = open_url(req, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            resp = None  # the .part already holds the whole file
        else:
            raise ModelError(f"download of {src} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ModelError(f"download of {src} failed: {reason} (partial data kept in {part}; "
                         "run again to resume)" if have else f"download of {src} failed: {reason}") from None
    if resp is not None:
        with resp:
            status = getattr(resp, "status", 200)
            if status == 206:
                mode = "ab"
                total = _total_from_content_range(resp.headers.get("Content-Range"))
            else:  # server ignored the range: start over
                mode, have = "wb", 0
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            bar = _progress(total, filename, progress)
            bar.update(have)
            got = have
            try:
                with open(part, mode) as f:
                    while True:
                        block = resp.read(chunk_bytes)
                        if not block:
                            break
                        f.write(block)
                        got += len(block)
                        bar.update(len(block))
            except (OSError, http.client.HTTPException) as exc:
                bar.close()
                raise ModelError(f"download of {src} interrupted after {got} bytes "
                                 f"({type(exc).__name__}); partial data kept in {part}: "
                                 "run again to resume") from None
            bar.close()
            if total is not None and got < total:
                raise ModelError(f"download of {src} interrupted after {got} of {total} bytes; "
                                 f"partial data kept in {part}: run again to resume")
    if prefix is not None:
        digest = sha256_file(part, progress)
        if not digest.startswith(prefix):
            part.unlink()
            raise ModelError(f"download of {src}: SHA-256 {digest[:12]}… does not start with "
                             f"{prefix}; the corrupt file was deleted")
    else:
        log.warning("%s has no SHA-256 prefix in its name: not verified", filename)
    os.replace(part, final)
    return final


def _total_from_content_range(value: str | None) -> int | None:
    # "bytes 100-199/200"
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None
