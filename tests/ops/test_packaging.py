"""The wheel: built from a clean copy of the checkout, its contents checked; installed into a fresh
venv, ``qcloop files`` finds the example configs there and ``qcloop check-config`` runs on them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parents[2]
#: what the checkout has that a wheel build must not see (build outputs, caches, the venv)
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache", "*.pyc")
#: the unit file's install prefix (docs/daemon.md: python3.11 -m venv /opt/qcloop/venv)
UNIT_SITE = "/opt/qcloop/venv/lib/python3.11/site-packages/"


def _dist_name(names: list[str]) -> str:
    (info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    return info


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built without network from a copy of the sources (no stale build/ reused)."""
    src = tmp_path_factory.mktemp("src") / "qcloop"
    shutil.copytree(REPO, src, ignore=_NOT_SOURCE)
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--no-index", "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = out.glob("qcloop-*.whl")
    return whl


def test_wheel_holds_only_qcloop_names_every_package_and_the_shared_files(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    info = _dist_name(names)
    top = {n.split("/")[0] for n in names}
    assert top == {"qcloop", "qcloop_adapters", info}, top
    assert zipfile.ZipFile(wheel).read(f"{info}/top_level.txt").decode().split() == ["qcloop", "qcloop_adapters"]
    # every module of the package and of the adapters (installed as qcloop_adapters)
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "qcloop").rglob("*.py")}
    modules |= {"qcloop_adapters/" + p.relative_to(REPO / "adapters").as_posix()
                for p in (REPO / "adapters").rglob("*.py")}
    modules = {m for m in modules if "__pycache__" not in m}
    assert modules - set(names) == set(), sorted(modules - set(names))
    packages = {str(PurePosixPath(m).parent) for m in modules}
    assert len(packages) >= 10 and {"qcloop/daemon", "qcloop/control", "qcloop/segment", "qcloop/embed",
                                    "qcloop/commands", "qcloop_adapters/microscopes"} <= packages
    # package data: schemas, example configs, every deploy file, the docs
    shared = {f"qcloop/schemas/{p.name}" for p in (REPO / "qcloop/schemas").glob("*.json")}
    shared |= {f"qcloop/share/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    shared |= {"qcloop/share/deploy/" + p.relative_to(REPO / "deploy").as_posix()
               for p in (REPO / "deploy").rglob("*") if p.is_file()}
    shared |= {f"qcloop/share/docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    assert len(shared) >= 20 and shared - set(names) == set(), sorted(shared - set(names))
    assert not [n for n in names if n.startswith(("tests/", "bench/")) or "/tests/" in n]


def test_unit_file_links_only_to_installed_docs(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    unit = (REPO / "deploy" / "qcloop.service").read_text()
    docs = re.findall(r"^Documentation=(.+)$", unit, flags=re.M)
    assert docs, "the unit names its documentation"
    for uri in " ".join(docs).split():
        assert uri.startswith("file://" + UNIT_SITE), f"{uri}: not a file of the installed package"
        assert uri[len("file://" + UNIT_SITE):] in names, f"{uri} is not in the wheel"


@pytest.mark.slow
def test_wheel_installs_in_a_fresh_venv_and_check_config_runs(wheel: Path, tmp_path: Path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    before = set(os.listdir(site))
    # dependencies come from this checkout's environment (no download): a .pth appends its
    # site-packages after the fresh venv's own (its .pth files, the editable install's finder
    # among them, are not processed)
    (site / "zz_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                        "-q", str(wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    added = set(os.listdir(site)) - before - {"zz_project_deps.pth"}
    top = {n for n in added if not n.endswith(".dist-info")}
    assert top == {"qcloop", "qcloop_adapters"}, added
    env = {k: v for k, v in os.environ.items() if not k.startswith("QCLOOP_") and k != "PYTHONPATH"}

    def qcloop(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / "qcloop"), *args], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path, env={**env, **extra})

    where = subprocess.run([str(py), "-c", "import qcloop, qcloop_adapters; print(qcloop.__file__); "
                            "print(qcloop_adapters.__file__)"], capture_output=True, text=True, env=env,
                           cwd=tmp_path, check=True).stdout.split()
    assert all(w.startswith(str(site)) for w in where), where
    # the example configs are installed and found
    r = qcloop("files", "configs/default.yaml")
    assert r.returncode == 0, r.stderr
    default = Path(r.stdout.strip())
    assert default == site / "qcloop/share/configs/default.yaml" and default.is_file()
    listing = qcloop("files").stdout.split()
    assert str(site / "qcloop/share/deploy/prometheus/alerts.yml") in listing
    assert str(site / "qcloop/share/docs/daemon.md") in listing
    # check-config runs on every installed example config; the site paths come from the
    # environment, as under the systemd unit
    (tmp_path / "watch").mkdir()
    site_env = {"QCLOOP_WATCH__DIRECTORY": str(tmp_path / "watch"), "QCLOOP_STATE_DIR": str(tmp_path / "state")}
    for cfg in sorted((site / "qcloop/share/configs").glob("*.yaml")):
        r = qcloop("check-config", str(cfg), **site_env)
        assert r.returncode == 0 and ": OK (config hash" in r.stdout, (cfg.name, r.stdout, r.stderr)
    # ... and it still names a bad field (the checks run, they are not skipped)
    r = qcloop("check-config", str(default), QCLOOP_WATCH__SETTLE_SECONDS="-1", **site_env)
    assert r.returncode == 2 and "settle_seconds" in r.stderr, r.stderr
    r = qcloop("files", "--copy", str(tmp_path / "etc"), "deploy")
    assert r.returncode == 0 and (tmp_path / "etc/deploy/qcloop.service").is_file(), r.stderr


def test_files_into_a_closed_pipe_prints_no_traceback():
    """``qcloop files | head -1``: the reader has left before qcloop writes; no BrokenPipeError
    traceback, the shell's exit status for SIGPIPE (141)."""
    proc = subprocess.Popen([sys.executable, "-m", "qcloop", "files"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # closed before the interpreter has even started: the first write fails
    err = proc.stderr.read()
    assert proc.wait(120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err
