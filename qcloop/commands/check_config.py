"""``qcloop check-config FILE``: load and validate a configuration without starting anything.

Prints one line per problem (the field's dotted path and the reason) and exits 2, or prints a
short summary of the effective settings and exits 0. Besides the schema (unknown keys, bad
values), it checks what the daemon needs at start: the watched folder exists, the state folder
can be created, TLS and password files are readable, target metric names are known.
Environment overrides (``QCLOOP_<SECTION>__<KEY>``) are applied unless ``--no-env``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from qcloop.config import Settings, load_settings
from qcloop.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-config", help="validate a configuration file and exit",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, nargs="?", metavar="FILE",
                   help="YAML configuration (default: $QCLOOP_CONFIG)")
    p.add_argument("--no-env", action="store_true", help="ignore QCLOOP_* environment overrides")
    p.set_defaults(func=run)


def daemon_problems(s: Settings) -> list[str]:
    """What would stop ``qcloop run`` at start, as ``field.path: reason`` lines."""
    problems: list[str] = []
    d = s.watch.directory
    if d is None:
        problems.append("watch.directory: required to run the daemon")
    elif not Path(d).is_dir():
        problems.append(f"watch.directory: {d} is not an existing folder")
    elif not os.access(d, os.R_OK | os.X_OK):
        problems.append(f"watch.directory: {d} is not readable")
    state = Path(s.state_dir)
    probe = state
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        problems.append(f"state_dir: {state} cannot be created or written ({probe} is not writable)")
    if s.mqtt.enabled:
        for name in ("ca", "cert", "key"):
            p = getattr(s.mqtt.tls, name)
            if p is not None and not Path(p).is_file():
                problems.append(f"mqtt.tls.{name}: no such file {p}")
        if (s.mqtt.tls.cert is None) != (s.mqtt.tls.key is None):
            problems.append("mqtt.tls: cert and key must be given together")
        if s.mqtt.password_file is not None:
            try:
                Path(s.mqtt.password_file).read_text(encoding="utf-8")
            except OSError as exc:
                problems.append(f"mqtt.password_file: cannot read {s.mqtt.password_file}: "
                                f"{exc.strerror or exc}")
        if (s.mqtt.password_file is not None or s.mqtt.password is not None) and s.mqtt.username is None:
            problems.append("mqtt.username: required when a password is given")
        if s.mqtt.reconnect_max_s < s.mqtt.reconnect_min_s:
            problems.append("mqtt.reconnect_max_s: must not be below mqtt.reconnect_min_s")
    try:
        from qcloop.targets import validate_target_names

        validate_target_names(s.targets)
    except ConfigError as exc:
        problems.extend(f"targets: {line.strip()}" for line in str(exc).splitlines() if line.strip())
    except ImportError:
        pass
    return problems


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, use_env=not args.no_env)  # ConfigError -> exit 2
    problems = daemon_problems(settings)
    source = args.config or os.environ.get("QCLOOP_CONFIG") or "embedded defaults"
    if problems:
        raise ConfigError(f"invalid configuration ({source}):\n" + "\n".join(f"  {p}" for p in problems))
    print(f"{source}: OK (config hash {settings.config_hash()})")
    print(f"  line_id        {settings.line_id}")
    print(f"  watch          {settings.watch.directory} (settle {settings.watch.settle_seconds} s, "
          f"{'polling' if settings.watch.polling else 'inotify'})")
    print(f"  state_dir      {settings.state_dir}")
    print(f"  batch.key      {settings.batch.key}")
    if settings.mqtt.enabled:
        print(f"  mqtt           {settings.mqtt.host}:{settings.mqtt.port} prefix "
              f"{settings.topic_prefix}{' TLS' if settings.mqtt.tls.active else ''}")
    else:
        print("  mqtt           disabled")
    if settings.metrics.enabled:
        print(f"  metrics        http://{settings.metrics.host}:{settings.metrics.port}/metrics")
    print(f"  targets        {len(settings.targets)}")
    return 0
