"""The ``passreid`` command: one subcommand per module of ``passreid.commands``."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
import traceback
from collections.abc import Sequence
from types import ModuleType

from passreid import __version__
from passreid.errors import PassReIDError


def discover_commands() -> list[ModuleType]:
    """Every module in ``passreid.commands`` that defines ``NAME``, ``add_arguments`` and ``run``."""
    import passreid.commands as package

    modules = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if all(hasattr(module, attr) for attr in ("NAME", "add_arguments", "run")):
            modules.append(module)
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="passreid",
        description="Part-aware self-supervised pre-training (PASS) for person re-identification.",
    )
    parser.add_argument("--version", action="version", version=f"passreid {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging and full tracebacks (the exit status stays the same)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in sorted(discover_commands(), key=lambda m: m.NAME):
        cmd = sub.add_parser(module.NAME, help=getattr(module, "HELP", ""), description=getattr(module, "HELP", ""))
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


QUIET_LOGGERS: tuple[str, ...] = ("faiss", "faiss.loader")
"""Third-party loggers held at WARNING unless ``-v``."""

EXIT_ERROR = 2
"""Exit status of a refused input or a failed run (one line on stderr; ``-v`` adds the traceback)."""

EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C outside a training loop (128 + SIGINT), as a shell reports it."""


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; a :class:`PassReIDError` or Ctrl-C becomes one line and an exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in QUIET_LOGGERS:  # their INFO lines are about themselves, not the run ("Could not load library ...")
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return int(args._run(args) or 0)
    except PassReIDError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"passreid {args.command}: error: {user_message(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as exc:
        if args.verbose:
            traceback.print_exc()
        detail = f"; {exc}" if str(exc) else ""
        print(f"\npassreid {args.command}: interrupted{detail}", file=sys.stderr)
        return EXIT_INTERRUPTED


def user_message(exc: BaseException) -> str:
    """The error's own message; for one raised in a DataLoader worker, torch prepends the
    worker's traceback, of which only the last line (the original message) is kept."""
    message = str(exc)
    if "in DataLoader worker process" in message.split("\n", 1)[0]:
        return message.rstrip().rsplit("\n", 1)[-1].split(": ", 1)[-1]
    return message


if __name__ == "__main__":
    sys.exit(main())
