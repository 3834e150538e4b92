"""Closing the loop: setpoint suggestions from batch metrics.

* :mod:`qcloop.control.setpoints` -- setpoint / rule models (defined in :mod:`qcloop.config`)
* :mod:`qcloop.control.pi` -- incremental PI rules
* :mod:`qcloop.control.bayes` -- Gaussian-process planner (expected improvement in a trust region)
* :mod:`qcloop.control.safety` -- bounds, ``max_step`` and hold checks every proposal goes through
* :mod:`qcloop.control.suggestions` -- message building and parsing, topics
* :mod:`qcloop.control.controller` -- the state machine the daemon calls with plain data
* :mod:`qcloop.control.hook` -- wiring into the daemon (MQTT subscriptions, ledger, metrics)
"""

from qcloop.control.controller import Controller, Decision
from qcloop.control.suggestions import Ack, Suggestion, parse_ack

__all__ = ["Ack", "Controller", "Decision", "Suggestion", "parse_ack"]
