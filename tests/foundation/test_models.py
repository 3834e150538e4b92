"""Checkpoint loading, device choice, `models check` and `models download` (local HTTP server)."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="needs the 'foundation' extra (torch)")
pytest.importorskip("segment_anything", reason="needs segment-anything")
pytest.importorskip("transformers", reason="needs transformers")

from qcloop.config import Dinov2Config, SamArchitecture, SamConfig, load_settings  # noqa: E402
from qcloop.errors import ModelError  # noqa: E402
from qcloop.models import (  # noqa: E402
    check_models,
    check_sam_file,
    choose_device,
    download,
    load_dinov2,
    load_sam,
    official_sam_name,
    resolve_dinov2,
    sha256_prefix_from_name,
)

from .conftest import TINY_SAM  # noqa: E402


# --------------------------------------------------------------------------- SAM checkpoints


def test_load_sam_gives_the_saved_weights(tiny_sam_cfg, tiny_sam_checkpoint):
    model = load_sam(tiny_sam_cfg)
    saved = torch.load(tiny_sam_checkpoint, weights_only=True)
    own = model.state_dict()
    assert set(own) == set(saved)
    assert all(torch.equal(own[k], saved[k]) for k in saved)
    assert not model.training
    assert model.device.type == "cpu"


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "sam_vit_b_01ec64.pth"
    with pytest.raises(ModelError, match="not found") as exc:
        load_sam(SamConfig(checkpoint=missing, device="cpu"))
    assert str(missing) in str(exc.value)


def test_unset_checkpoint_says_how_to_get_one():
    with pytest.raises(ModelError, match="checkpoint is not set.*models download sam_vit_h_4b8939.pth"):
        load_sam(SamConfig(model_type="vit_h", device="cpu"))


def test_wrong_model_type_is_a_clear_error(tiny_sam_checkpoint):
    # a tiny (embed dim 32) checkpoint configured as the official ViT-B
    with pytest.raises(ModelError) as exc:
        load_sam(SamConfig(checkpoint=tiny_sam_checkpoint, model_type="vit_b", device="cpu"))
    msg = str(exc.value)
    assert str(tiny_sam_checkpoint) in msg
    assert "does not match SAM vit_b" in msg
    assert "wrong shape" in msg and "embed dim 32" in msg


def test_checkpoint_with_missing_keys_is_refused(tmp_path, tiny_sam_model):
    state = tiny_sam_model.state_dict()
    state.pop("mask_decoder.iou_token.weight")
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    cfg = SamConfig(checkpoint=path, architecture=SamArchitecture(**TINY_SAM), device="cpu")
    with pytest.raises(ModelError, match=r"1 missing keys \(e.g. mask_decoder.iou_token.weight\).*"
                                         r"1 unexpected keys \(e.g. extra.weight\)"):
        load_sam(cfg)


class _Payload:
    """Unpickling this would call print(): weights_only must refuse it before that."""

    def __reduce__(self):
        return (print, ("PAYLOAD EXECUTED",))


def test_pickle_bearing_checkpoint_is_refused(tmp_path, tiny_sam_model, capsys):
    state = dict(tiny_sam_model.state_dict())
    state["payload"] = _Payload()
    path = tmp_path / "evil.pth"
    torch.save(state, path)
    cfg = SamConfig(checkpoint=path, architecture=SamArchitecture(**TINY_SAM), device="cpu")
    with pytest.raises(ModelError, match="refused to load.*weights_only") as exc:
        load_sam(cfg)
    assert str(path) in str(exc.value)
    assert "PAYLOAD EXECUTED" not in capsys.readouterr().out


def test_corrupt_checkpoint_is_a_model_error(tmp_path, tiny_sam_checkpoint):
    path = tmp_path / "cut.pth"
    path.write_bytes(tiny_sam_checkpoint.read_bytes()[:5000])
    with pytest.raises(ModelError, match="not a readable torch checkpoint"):
        load_sam(SamConfig(checkpoint=path, architecture=SamArchitecture(**TINY_SAM), device="cpu"))


def test_config_file_to_segmenter(tmp_path, tiny_sam_checkpoint):
    """The user path: YAML (checkpoint relative to the file) → get_segmenter."""
    from qcloop.segment import get_segmenter

    link = tmp_path / "models" / tiny_sam_checkpoint.name
    link.parent.mkdir()
    link.write_bytes(tiny_sam_checkpoint.read_bytes())
    cfg_file = tmp_path / "qcloop.yaml"
    cfg_file.write_text(
        "pipeline:\n  segmenter: sam\n  sam:\n    mode: prompted\n"
        f"    checkpoint: models/{link.name}\n    device: cpu\n    architecture:\n"
        "      encoder_embed_dim: 32\n      encoder_depth: 2\n      encoder_num_heads: 2\n"
        "      encoder_global_attn_indexes: [1]\n"
    )
    settings = load_settings(cfg_file, use_env=False)
    seg = get_segmenter(settings.pipeline)
    assert seg.name == "sam-prompted"
    assert Path(settings.pipeline.sam.checkpoint) == link


# --------------------------------------------------------------------------- devices


def test_device_choice():
    assert choose_device("cpu").type == "cpu"
    auto = choose_device("auto").type
    assert auto == ("cuda" if torch.cuda.is_available() else auto)
    assert auto in ("cuda", "mps", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="cuda requested"):
            choose_device("cuda")


# --------------------------------------------------------------------------- DINOv2


def test_load_dinov2_from_directory(tiny_dinov2_cfg):
    model = load_dinov2(tiny_dinov2_cfg)
    assert model.config.hidden_size == 32 and model.config.patch_size == 14
    assert not model.training


def test_dinov2_missing_directory(tmp_path):
    with pytest.raises(ModelError, match="not found") as exc:
        load_dinov2(Dinov2Config(model=str(tmp_path / "gone"), device="cpu"))
    assert "gone" in str(exc.value)


def test_dinov2_directory_without_weights(tmp_path, tiny_dinov2_dir):
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "config.json").write_bytes((tiny_dinov2_dir / "config.json").read_bytes())
    with pytest.raises(ModelError, match="no weights file"):
        load_dinov2(Dinov2Config(model=str(d), device="cpu"))


def test_dinov2_id_not_in_cache_never_downloads(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError, match="neither a local directory nor in the Hugging Face cache"):
        resolve_dinov2("qcloop-tests/not-a-model")


def test_dinov2_id_found_in_hf_cache(monkeypatch, tmp_path, tiny_dinov2_dir):
    """A model id resolves to its snapshot in a (hand-built, standard-layout) HF cache."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    commit = "0" * 40
    repo = cache / "models--qcloop-tests--tiny-dinov2"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in tiny_dinov2_dir.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_dinov2("qcloop-tests/tiny-dinov2") == snap
    model = load_dinov2(Dinov2Config(model="qcloop-tests/tiny-dinov2", device="cpu"))
    assert model.config.hidden_size == 32


# --------------------------------------------------------------------------- models check


def test_sha_prefix_from_names():
    assert sha256_prefix_from_name("sam_vit_b_01ec64.pth") == "01ec64"
    assert sha256_prefix_from_name("/x/sam_vit_h_4b8939.pth") == "4b8939"
    assert sha256_prefix_from_name("my_model.pth") is None
    assert official_sam_name("vit_l") == "sam_vit_l_0b3195.pth"
    assert official_sam_name("sam_vit_b") == "sam_vit_b_01ec64.pth"
    assert official_sam_name("whatever") is None


def test_models_check(tmp_path, tiny_sam_checkpoint, tiny_dinov2_dir):
    settings = load_settings(use_env=False, pipeline={
        "segmenter": "sam", "embedder": "dinov2",
        "sam": {"checkpoint": str(tiny_sam_checkpoint), "architecture": TINY_SAM},
        "dinov2": {"model": str(tiny_dinov2_dir)}})
    results = check_models(settings)
    assert [r.ok for r in results] == [True, True], results
    assert "SHA-256 matches" in results[0].detail and "keys and shapes match" in results[0].detail

    # same bytes under a name whose checksum prefix is wrong
    bad = tmp_path / "tiny_sam_ffffff.pth"
    bad.write_bytes(tiny_sam_checkpoint.read_bytes())
    r = check_sam_file(bad, "vit_b", SamArchitecture(**TINY_SAM))
    assert not r.ok and "does not start with ffffff" in r.detail

    # the official ViT-L name configured as vit_b
    other = tmp_path / "sam_vit_l_0b3195.pth"
    other.write_bytes(b"x")
    r = check_sam_file(other, "vit_b", load=False)
    assert not r.ok


def test_models_check_cli(tmp_path, tiny_sam_checkpoint, capsys):
    from qcloop.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"pipeline:\n  segmenter: sam\n  sam:\n    checkpoint: {tiny_sam_checkpoint}\n")
    # configured as official vit_b: the tiny file's shapes do not match → exit 1 with the reason
    assert main(["models", "check", "--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "does not match SAM vit_b" in out


# --------------------------------------------------------------------------- download


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` with HTTP Range support; can cut the first transfer short."""

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802
        srv = self.server
        name = self.path.lstrip("/")
        data = srv.files.get(name)
        srv.requests.append((name, self.headers.get("Range")))
        if data is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and srv.honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_after is not None:
            cut, srv.cut_after = srv.cut_after, None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def http_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    srv.files, srv.requests, srv.cut_after, srv.honour_range = {}, [], None, True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _payload(n: int = 300_000) -> tuple[bytes, str]:
    data = bytes((i * 7919 + 13) % 251 for i in range(n))
    return data, hashlib.sha256(data).hexdigest()


def _url(srv, name: str) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/{name}"


def test_download_verifies_checksum(http_server, tmp_path):
    data, digest = _payload()
    name = f"mini_{digest[:6]}.pth"
    http_server.files[name] = data
    path = download(name, tmp_path, url=_url(http_server, name), progress=False)
    assert path == tmp_path / name and path.read_bytes() == data
    assert not (tmp_path / (name + ".part")).exists()
    # a second call finds the verified file and does not fetch again
    n = len(http_server.requests)
    assert download(name, tmp_path, url=_url(http_server, name), progress=False) == path
    assert len(http_server.requests) == n


def test_download_resumes_after_interruption(http_server, tmp_path):
    data, digest = _payload()
    name = f"mini_{digest[:6]}.pth"
    http_server.files[name] = data
    http_server.cut_after = 100_000
    with pytest.raises(ModelError, match="interrupted.*run again to resume"):
        download(name, tmp_path, url=_url(http_server, name), progress=False, chunk_bytes=8192)
    part = tmp_path / (name + ".part")
    assert part.stat().st_size == 100_000
    assert not (tmp_path / name).exists()
    path = download(name, tmp_path, url=_url(http_server, name), progress=False)
    assert http_server.requests[-1] == (name, "bytes=100000-")
    assert path.read_bytes() == data and not part.exists()


def test_download_restarts_when_server_ignores_range(http_server, tmp_path):
    data, digest = _payload()
    name = f"mini_{digest[:6]}.pth"
    http_server.files[name] = data
    (tmp_path / (name + ".part")).write_bytes(b"stale bytes from another file")
    http_server.honour_range = False
    path = download(name, tmp_path, url=_url(http_server, name), progress=False)
    assert path.read_bytes() == data


def test_download_checksum_mismatch_deletes_the_file(http_server, tmp_path):
    data, digest = _payload()
    wrong = "000000" if not digest.startswith("000000") else "111111"
    name = f"mini_{wrong}.pth"
    http_server.files[name] = data
    with pytest.raises(ModelError, match=f"does not start with {wrong}"):
        download(name, tmp_path, url=_url(http_server, name), progress=False)
    assert not (tmp_path / name).exists() and not (tmp_path / (name + ".part")).exists()


def test_download_errors(http_server, tmp_path):
    with pytest.raises(ModelError, match="unknown checkpoint"):
        download("sam_vit_x", tmp_path)
    with pytest.raises(ModelError, match="HTTP 404"):
        download("sam_vit_b_01ec64.pth", tmp_path, url=_url(http_server, "missing.pth"), progress=False)


def test_download_cli(http_server, tmp_path, capsys):
    from qcloop.cli import main

    data, digest = _payload(50_000)
    name = f"mini_{digest[:6]}.pth"
    http_server.files[name] = data
    dest = tmp_path / "weights"
    assert main(["models", "download", name, "--dest", str(dest), "--url", _url(http_server, name)]) == 0
    assert (dest / name).read_bytes() == data
    assert str(dest / name) in capsys.readouterr().out
