"""The MQTT broker the demo talks to: one that answers, else one the demo starts for its lifetime.

Order (``start="auto"``): a broker already answering at ``host:port`` (a real CONNECT /
CONNACK; MQTT v5, or 3.1.1 when it refuses v5); else ``mosquitto`` from the PATH (or /usr/sbin)
on that port, or a free one when the port is taken (MQTT v5); else the maintained pure-Python
broker ``amqtt`` (the ``broker`` extra: ``pip install 'qcloop[broker]'``), which speaks MQTT
3.1.1 only, so the daemon and the simulated line then run with ``mqtt.protocol: "3.1.1"``.

What amqtt 0.12.1 does for the loop (measured, ``tests/control/test_demo_broker.py``): QoS 1
both ways, retained messages, the retained Last Will -- yes. Persistent sessions: no for the
demo's anonymous clients (amqtt keeps no session for them); for clients with a user name it
queues QoS 1 messages sent while they are away but delivers them flagged *retained* (the daemon
ignores a retained ``close-batch``), and it never redelivers a message that was delivered but not
acknowledged when the client died. The demo never restarts its daemon, so it needs none of that;
a plant broker should be Mosquitto (or another v5 broker).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from qcloop.errors import QcloopError

log = logging.getLogger(__name__)

STARTS = ("auto", "mosquitto", "amqtt", "never")
#: searched for ``mosquitto`` after the PATH (Debian installs it in /usr/sbin, often not on a user's PATH)
SBIN_DIRS = "/usr/sbin:/usr/local/sbin"
#: how long a started broker may take to answer a CONNECT
START_TIMEOUT_S = 15.0
INSTALL_HINTS = {"mosquitto": "apt-get install mosquitto", "amqtt": "pip install 'qcloop[broker]'"}


class DemoError(QcloopError):
    """The demo could not run (no broker could be started, the daemon died, ...)."""


def mqtt_answers(host: str, port: int, timeout: float = 2.0, protocol: str = "3.1.1") -> bool:
    """True when an MQTT broker accepts a ``protocol`` ("5" or "3.1.1") CONNECT at host:port."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    version = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"qcloop-demo-probe-{os.getpid()}", protocol=version)
    c.connect_timeout = timeout
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


def broker_protocol(host: str, port: int, timeout: float = 2.0) -> str | None:
    """The MQTT version to speak to the broker at host:port: "5", "3.1.1" (it refuses v5), or
    None when nothing answers."""
    for protocol in ("5", "3.1.1"):
        if mqtt_answers(host, port, timeout, protocol):
            return protocol
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def parse_address(text: str, default_port: int = 1883) -> tuple[str, int]:
    """``"HOST:PORT"``, ``"HOST"`` or ``":PORT"`` -> (host, port); ValueError when malformed."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(default_port)
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"not a HOST:PORT address: {text!r}")
    return host, int(port)


@dataclass
class BrokerHandle:
    """The broker the demo talks to, the MQTT version to speak, and how to stop it (when the
    demo started it). ``workdir``: the started broker's config and log (removed by :meth:`stop`
    when ``owns_workdir``)."""

    host: str
    port: int
    kind: str  # "existing", "mosquitto", "amqtt"
    protocol: str = "5"
    process: subprocess.Popen | None = None
    workdir: Path | None = None
    owns_workdir: bool = False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.owns_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __str__(self) -> str:
        return f"{self.kind} at {self.host}:{self.port} (MQTT {self.protocol})"


def find_mosquitto() -> str | None:
    """The ``mosquitto`` executable: on the PATH, else in /usr/sbin or /usr/local/sbin."""
    return shutil.which("mosquitto") or (shutil.which("mosquitto", path=SBIN_DIRS) if SBIN_DIRS else None)


def find_amqtt() -> bool:
    """True when the ``amqtt`` package (the ``broker`` extra) is installed."""
    return importlib.util.find_spec("amqtt") is not None


def _wait_started(proc: subprocess.Popen, handle: BrokerHandle) -> BrokerHandle | None:
    """``handle`` once the started broker answers a CONNECT in its protocol; None (killed) if not."""
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline and proc.poll() is None:
        if mqtt_answers(handle.host, handle.port, timeout=0.5, protocol=handle.protocol):
            return handle
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)
    log.warning("%s did not start on port %d", handle.kind, handle.port)
    return None


def _start_mosquitto(host: str, port: int, workdir: Path | None) -> BrokerHandle | None:
    exe = find_mosquitto()
    if exe is None:
        return None
    proc = subprocess.Popen([exe, "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return _wait_started(proc, BrokerHandle(host, port, "mosquitto", "5", process=proc))


def amqtt_config(host: str, port: int) -> dict:
    """amqtt's broker configuration for the demo: one plain listener, anonymous clients."""
    return {"listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}


def _start_amqtt(host: str, port: int, workdir: Path | None) -> BrokerHandle | None:
    """``python -m amqtt.scripts.broker_script -c workdir/amqtt.yaml`` (log: workdir/amqtt.log)."""
    if not find_amqtt():
        return None
    owns = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="qcloop-amqtt-")) if owns else Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "amqtt.yaml"
    conf.write_text(yaml.safe_dump(amqtt_config(host, port)), encoding="utf-8")
    with open(workdir / "amqtt.log", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(conf)],
                                stdout=out, stderr=subprocess.STDOUT)
    handle = BrokerHandle(host, port, "amqtt", "3.1.1", process=proc, workdir=workdir, owns_workdir=owns)
    started = _wait_started(proc, handle)
    if started is None and owns:
        shutil.rmtree(workdir, ignore_errors=True)
    return started


STARTERS: dict[str, Callable[[str, int, Path | None], BrokerHandle | None]] = {
    "mosquitto": _start_mosquitto, "amqtt": _start_amqtt}


def ensure_broker(host: str = "127.0.0.1", port: int = 1883, *, start: str = "auto",
                  workdir: Path | None = None) -> BrokerHandle:
    """A broker for the demo (module docstring).

    Parameters
    ----------
    start : {"auto", "mosquitto", "amqtt", "never"}
        ``auto``: use one that answers at host:port, else start mosquitto, else amqtt;
        ``mosquitto`` / ``amqtt``: start that one (on a free port if ``port`` is taken);
        ``never``: only use one that answers.
    workdir : path, optional
        Where a started amqtt keeps its config and log (default: a temporary folder, removed
        when the broker stops).

    Raises
    ------
    DemoError
        ``never`` and nothing answers; the broker asked for (or, with ``auto``, both) not
        installed or not starting.
    """
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    if start in ("auto", "never"):
        protocol = broker_protocol(host, port)
        if protocol is not None:
            return BrokerHandle(host, port, "existing", protocol)
    if start == "never":
        raise DemoError(f"no MQTT broker answers at {host}:{port}")
    if host not in ("127.0.0.1", "localhost"):
        raise DemoError(f"no MQTT broker answers at {host}:{port}; the demo starts one only on this machine "
                        "(give --broker 127.0.0.1:PORT or start a broker there)")
    host = "127.0.0.1"
    if not port_free(port):
        port = free_port()
    kinds = ("mosquitto", "amqtt") if start == "auto" else (start,)
    for kind in kinds:
        handle = STARTERS[kind](host, port, workdir)
        if handle is not None:
            return handle
    hints = " or ".join(f"{k} ({INSTALL_HINTS[k]})" for k in kinds)
    raise DemoError(f"no MQTT broker answers at {host}:{port} and none could be started: install {hints}"
                    if start == "auto" else f"{start} is not installed or did not start ({INSTALL_HINTS[start]})")
