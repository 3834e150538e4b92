"""The ``qcloop`` command: a thin argparse front over the library.

Each sub-command lives in ``qcloop/commands/<name>.py`` and exposes ``register(subparsers)``,
which adds its parser and sets ``func(args) -> int``. User-facing errors (QcloopError) print one
clear message and exit 2; nothing prints a traceback for bad input.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from qcloop import __version__
from qcloop.errors import QcloopError

COMMAND_MODULES = (
    "qcloop.commands.analyze",
    "qcloop.commands.batch", "qcloop.commands.archive",
    "qcloop.commands.run", "qcloop.commands.check_config",
    "qcloop.commands.synth", "qcloop.commands.eval", "qcloop.commands.crops", "qcloop.commands.train",
    "qcloop.commands.models", "qcloop.commands.embed",
    "qcloop.commands.demo", "qcloop.commands.files",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qcloop",
        description="Closed-loop quality control for nanoparticle synthesis from SEM images.",
    )
    parser.add_argument("--version", action="version", version=f"qcloop {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except QcloopError as exc:
        print(f"qcloop: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qcloop: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `qcloop files | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
