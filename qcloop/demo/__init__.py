"""``qcloop demo``: the product's idea end to end on one machine (see :mod:`qcloop.demo.run`).

* :mod:`qcloop.demo.config` -- targets, rules, setpoints, the start point (``configs/demo.yaml``)
* :mod:`qcloop.demo.broker` -- the MQTT broker (an existing one, or mosquitto / amqtt started for the demo)
* :mod:`qcloop.demo.labelling` -- labelling batch -> crops export -> sorting -> ``qcloop train``; F1
* :mod:`qcloop.demo.display` -- the live table, ``demo.png``
* :mod:`qcloop.demo.run` -- the campaign: daemon subprocess, simulated line, report
"""

from qcloop.demo.broker import BrokerHandle, DemoError, ensure_broker, free_port, mqtt_answers, port_free
from qcloop.demo.config import DEMO_CONFIG, START_SETPOINTS, demo_config, write_config

__all__ = ["BrokerHandle", "DEMO_CONFIG", "DemoError", "START_SETPOINTS", "demo_config", "ensure_broker",
           "free_port", "mqtt_answers", "port_free", "write_config"]
