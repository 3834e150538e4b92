"""``qcloop run --config FILE``: the daemon (watch, analyse, score batches, publish).

The configuration file may also come from ``$QCLOOP_CONFIG``; ``QCLOOP_<SECTION>__<KEY>``
environment variables override it. SIGTERM/SIGINT stop gracefully (the current image is
finished, the outbox flushed for ``mqtt.flush_timeout_s``, ``offline`` published); a second
signal abandons the current image at once (it is redone at the next start). Under systemd
(``Type=notify``) READY=1 is sent once the ledger, the watcher and the MQTT connection are up,
and WATCHDOG=1 while healthy. Exit codes: 0 after a stop, 2 for a configuration problem (the
field named: also a state folder inside or above the watched folder, TLS files that do not load),
1 when a daemon thread died (systemd's ``Restart=on-failure`` starts it again). See docs/daemon.md.
"""

from __future__ import annotations

import argparse
import faulthandler
import io
import logging
import signal
from pathlib import Path

from qcloop.config import load_settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the QC daemon on a watched export folder",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="YAML configuration (default: $QCLOOP_CONFIG)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qcloop.daemon.service import Daemon

    settings = load_settings(args.config)
    if logging.getLogger().level > logging.INFO:
        logging.getLogger("qcloop").setLevel(logging.INFO)
    daemon = Daemon(settings)
    daemon.install_signal_handlers()
    # `kill -USR1 <pid>` writes every thread's stack to stderr (the journal): for stuck daemons
    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    except (io.UnsupportedOperation, AttributeError, ValueError):
        pass  # stderr is not a real file (embedded use); no stack dumps then
    return daemon.run()
