"""``qcloop check-config FILE``: load and validate a configuration without starting anything.

Prints one line per problem (the field's dotted path and the reason) and exits 2, or prints a
short summary of the effective settings and exits 0. Besides the schema (unknown keys, bad
values), it checks what the daemon needs at start (``qcloop run`` runs the same checks and
exits 2 too): the watched folder exists, the state folder can be created and lies neither
inside nor above the watched folder, TLS files load (with OpenSSL's reason when they do not),
the password file is readable, target metric names are known. ``--connect`` also connects to
the broker once, in ``mqtt.protocol`` (MQTT v5 or 3.1.1), and reports a refused connection, a TLS
failure (OpenSSL's reason), a refused login or a broker that does not speak that version (the
CONNACK reason code; in 3.1.1 its return code). Environment overrides (``QCLOOP_<SECTION>__<KEY>``) are applied unless ``--no-env``.
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
    p.add_argument("--connect", action="store_true",
                   help="also connect to the MQTT broker once (TLS, login) and report why it fails")
    p.set_defaults(func=run)


def state_dir_problem(s: Settings) -> str | None:
    """``state_dir`` equal to, inside or above ``watch.directory`` (the daemon would watch its own
    ledger and quarantine, or ignore every file): the problem line, else None."""
    if s.watch.directory is None:
        return None
    state, watch = Path(s.state_dir).resolve(), Path(s.watch.directory).resolve()
    if state == watch:
        where = "is the watched folder"
    elif watch in state.parents:
        where = f"lies inside the watched folder {watch}"
    elif state in watch.parents:
        where = f"lies above the watched folder {watch}"
    else:
        return None
    return f"state_dir: {state} {where}; put the state folder outside watch.directory"


def _tls_problems(s: Settings) -> list[str]:
    from qcloop.daemon.mqtt import tls_context

    out = [f"mqtt.tls.{name}: no such file {p}" for name in ("ca", "cert", "key")
           if (p := getattr(s.mqtt.tls, name)) is not None and not Path(p).is_file()]
    if out or not s.mqtt.tls.active:
        return out
    try:
        tls_context(s.mqtt)
    except ConfigError as exc:
        out.append(str(exc))
    return out


def daemon_problems(s: Settings) -> list[str]:
    """What would stop ``qcloop run`` at start, as ``field.path: reason`` lines."""
    problems: list[str] = []
    problem = state_dir_problem(s)
    if problem:
        problems.append(problem)
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
        problems.extend(_tls_problems(s))
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


def connect_problem(s: Settings) -> str | None:
    """Connect to the broker once; the problem line (field named, OpenSSL's reason) or None."""
    from qcloop.daemon.mqtt import probe_connect

    failure = probe_connect(s.mqtt, timeout=max(5.0, 2 * s.mqtt.connect_timeout_s))
    return None if failure is None else f"mqtt ({failure[0]}): {failure[1]}"


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, use_env=not args.no_env)  # ConfigError -> exit 2
    problems = daemon_problems(settings)
    if args.connect and settings.mqtt.enabled and not problems:
        problem = connect_problem(settings)
        problems += [problem] if problem else []
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
        print(f"  mqtt           {settings.mqtt.host}:{settings.mqtt.port} (MQTT {settings.mqtt.protocol}) prefix "
              f"{settings.topic_prefix}{' TLS' if settings.mqtt.tls.active else ''}"
              f"{' (connected and logged in)' if args.connect else ''}")
    else:
        print("  mqtt           disabled")
    if settings.metrics.enabled:
        print(f"  metrics        http://{settings.metrics.host}:{settings.metrics.port}/metrics")
    print(f"  targets        {len(settings.targets)}")
    return 0
