"""The MQTT broker the demo talks to: one that answers, else one the demo starts for its lifetime.

Order (``start="auto"``): a broker already answering at ``host:port`` (a real CONNECT /
CONNACK); else ``mosquitto`` from the PATH (or /usr/sbin) on that port, or a free one when the
port is taken; else the minimal pure-Python broker :mod:`qcloop.mqtt_broker`. The maintained
pure-Python broker ``amqtt`` (0.12) cannot stand in for it: it speaks MQTT 3.1.1 only and
refuses the daemon's MQTT v5 CONNECT.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from qcloop.errors import QcloopError

log = logging.getLogger(__name__)

STARTS = ("auto", "mosquitto", "python", "never")
#: searched for ``mosquitto`` after the PATH (Debian installs it in /usr/sbin, often not on a user's PATH)
SBIN_DIRS = "/usr/sbin:/usr/local/sbin"


class DemoError(QcloopError):
    """The demo could not run (no broker could be started, the daemon died, ...)."""


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
                self.process.wait(5)
        if self.broker is not None:
            self.broker.stop()

    def __str__(self) -> str:
        return f"{self.kind} at {self.host}:{self.port}"


def find_mosquitto() -> str | None:
    """The ``mosquitto`` executable: on the PATH, else in /usr/sbin or /usr/local/sbin."""
    return shutil.which("mosquitto") or (shutil.which("mosquitto", path=SBIN_DIRS) if SBIN_DIRS else None)


def _start_mosquitto(exe: str, host: str, port: int) -> BrokerHandle | None:
    proc = subprocess.Popen([exe, "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline and proc.poll() is None:
        if mqtt_answers(host, port, timeout=0.5):
            return BrokerHandle(host, port, "mosquitto", process=proc)
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)
    log.warning("mosquitto did not start on port %d", port)
    return None


def ensure_broker(host: str = "127.0.0.1", port: int = 1883, *, start: str = "auto") -> BrokerHandle:
    """A broker for the demo (module docstring).

    Parameters
    ----------
    start : {"auto", "mosquitto", "python", "never"}
        ``auto``: use one that answers at host:port, else start mosquitto, else the Python
        broker; ``mosquitto`` / ``python``: start that one (on a free port if ``port`` is
        taken); ``never``: only use one that answers.

    Raises
    ------
    DemoError
        ``never`` and nothing answers; ``mosquitto`` and it is not installed or does not start.
    """
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    if start in ("auto", "never") and mqtt_answers(host, port):
        return BrokerHandle(host, port, "existing")
    if start == "never":
        raise DemoError(f"no MQTT broker answers at {host}:{port}")
    if host not in ("127.0.0.1", "localhost"):
        raise DemoError(f"no MQTT broker answers at {host}:{port}; the demo starts one only on this machine "
                        "(give --broker 127.0.0.1:PORT or start a broker there)")
    host = "127.0.0.1"
    if not port_free(port):
        port = free_port()
    exe = find_mosquitto() if start in ("auto", "mosquitto") else None
    if exe:
        handle = _start_mosquitto(exe, host, port)
        if handle is not None:
            return handle
    if start == "mosquitto":
        raise DemoError("mosquitto is not installed or did not start (apt-get install mosquitto)")
    from qcloop.mqtt_broker import Broker

    b = Broker(host, port).start()
    return BrokerHandle(host, b.port, "python", broker=b)
