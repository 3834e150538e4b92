"""Helpers for the Prometheus/Grafana tests: Debian's prometheus + promtool binaries, a private
Prometheus on a free port, the dashboard's queries read from its JSON."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROM_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "qcloop.json"
HEALTH_ROW = "Daemon health"
#: Grafana's built-in interval variables, replaced as Grafana would for a 1 h dashboard range
GRAFANA_INTERVALS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def binary(name: str) -> str:
    """Path of ``prometheus`` / ``promtool``; skips with the way to get it when absent."""
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/sbin")
    if path is None:
        pytest.skip(f"{name} not installed (Debian: apt-get install prometheus; .ci/run does this in CI)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def promtool(*args: str, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess:
    return subprocess.run([binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------- dashboard
@dataclass(frozen=True)
class Query:
    panel: str
    row: str
    ref: str
    expr: str
    panel_json: dict


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict | None = None) -> Iterator[tuple[str, dict]]:
    """(row title, panel) for every non-row panel, collapsed rows' panels included."""
    row = ""
    for p in (dash or dashboard())["panels"]:
        if p.get("type") == "row":
            row = p.get("title", "")
            for inner in p.get("panels", []):
                yield row, inner
            continue
        yield row, p


def queries(dash: dict | None = None) -> list[Query]:
    return [Query(p.get("title", ""), row, t.get("refId", ""), t["expr"], p)
            for row, p in panels(dash) for t in p.get("targets", []) if t.get("expr")]


def substitute(expr: str, line_regex: str) -> str:
    """The PromQL Grafana sends: ``$line`` and the interval variables replaced."""
    out = expr.replace("${line}", line_regex).replace("$line", line_regex)
    for var, value in GRAFANA_INTERVALS.items():
        out = out.replace(var, value)
    left = re.findall(r"\$\{?\w+", out)
    assert not left, f"unknown Grafana variable {left} in {expr!r}: add it to GRAFANA_INTERVALS"
    return out


def value_text(panel: dict, value: float) -> str:
    """What a stat panel shows for ``value``: its value mapping's text, else the number."""
    for m in panel.get("fieldConfig", {}).get("defaults", {}).get("mappings", []):
        if m.get("type") == "value":
            for k, opt in m.get("options", {}).items():
                if float(k) == value and "text" in opt:
                    return str(opt["text"])
        if m.get("type") == "range":
            o = m.get("options", {})
            lo, hi = o.get("from"), o.get("to")
            if (lo is None or value >= lo) and (hi is None or value <= hi) and "result" in o:
                return str(o["result"].get("text", value))
    return f"{value:g}"


# --------------------------------------------------------------------------- Prometheus
class Prometheus:
    """A private Prometheus scraping one target every second, with ``deploy/``'s rules."""

    def __init__(self, workdir: Path, target: str, *, scrape_interval: str = "1s"):
        self.workdir = workdir
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
        cfg["global"].update(scrape_interval=scrape_interval, evaluation_interval=scrape_interval)
        cfg["rule_files"] = [str(PROM_DIR / f) for f in cfg.get("rule_files", [])]
        (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "qcloop"]
        job.update(scrape_interval=scrape_interval, scrape_timeout=scrape_interval)
        job["static_configs"][0]["targets"] = [target]
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> "Prometheus":
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [binary("prometheus"), f"--config.file={self.config}",
                 f"--storage.tsdb.path={self.workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                 "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            assert self.proc.poll() is None, f"prometheus exited: {self.log.read_text()[-2000:]}"
            assert time.time() < deadline, "prometheus not ready"
            time.sleep(0.2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant vector result of ``expr`` now (a scalar comes back as one unlabelled sample)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def wait(self, expr: str, pred, timeout: float = 30) -> list[dict]:
        deadline = time.time() + timeout
        while True:
            res = self.query(expr)
            if pred(res):
                return res
            assert time.time() < deadline, f"{expr!r} never satisfied the condition; last {res}"
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def values(result: list[dict]) -> list[float]:
    return [float(s["value"][1]) for s in result]
