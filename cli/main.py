"""Entry point of the `harden` console script."""

from __future__ import annotations

import argparse
import logging
import sys

from core.errors import HardeningError

from cli import core_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harden",
        description="Harden a trained image classifier for out-of-distribution detection (UM and UMAP).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level instead of INFO")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    core_commands.add_commands(subparsers)
    try:
        from cli import service_commands
    except ImportError as error:  # the service extras are part of the default install
        logging.getLogger(__name__).debug("service commands unavailable: %s", error)
    else:
        service_commands.add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except HardeningError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
