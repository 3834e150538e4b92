"""Fixtures for the daemon tests: brokers, recorders, unique topic prefixes."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from daemon_helpers import MACHINE_BROKER, Broker, make_certs, port_open, reap



@pytest.fixture
def prefix() -> str:
    return f"qctest/{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def machine_broker() -> tuple[str, int]:
    """The machine's Mosquitto on 127.0.0.1:1883 (skips when it is not running)."""
    if not port_open(*MACHINE_BROKER):
        pytest.skip("no Mosquitto on 127.0.0.1:1883")
    return MACHINE_BROKER


@pytest.fixture
def own_broker(tmp_path: Path):
    """A private plain Mosquitto on a free port (the test may stop and restart it)."""
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(autouse=True)
def _reap_daemons():
    """No daemon subprocess outlives its test, even when the test fails."""
    yield
    reap()
