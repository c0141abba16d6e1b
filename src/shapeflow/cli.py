"""`shapeflow <command>`: the one console script.

Each stage module (and evaluate_recon, which composes stages) registers its own sub-command
(`add_parser`) and runs it (`main(args) -> int`), so the command line of a stage lives beside its code.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from shapeflow import __version__, compare, evaluate_recon
from shapeflow.config import ParamsError
from shapeflow.interrupts import interrupt_on_sigterm
from shapeflow.manifest import FolderBusyError, ManifestError, storage_error
from shapeflow.stages import evaluate, fetch, generate, sample, train_dit, train_vae, watertight


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shapeflow", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"shapeflow {__version__}")
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (fetch, watertight, sample, train_vae, train_dit, evaluate, evaluate_recon, generate, compare):
        module.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM (a stopped worker, a cancelled flow run, `kill`) ends a command as Ctrl-C does: its
    # MLflow run is marked KILLED and half-written files are removed, instead of an abrupt exit.
    interrupt_on_sigterm()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"shapeflow {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGTERM
    except (ParamsError, ManifestError, FolderBusyError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"shapeflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        storage = storage_error(exc)
        if storage is None:
            raise
        print(f"shapeflow {args.command}: error: {storage}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
