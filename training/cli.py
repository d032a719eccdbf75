"""The ``boxteacher`` command line.

Each package contributes its subcommands through a ``register(subparsers)``
function in its own ``cli`` module, imported here by name so that, e.g.,
``boxteacher train`` works without the serving extras installed. Handlers import
their heavy dependencies when they run, not at start-up.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMAND_MODULES = ["training.commands", "export.cli", "serving.cli", "labelstudio_backend.cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="boxteacher", description="Instance segmentation from boxes (BoxTeacher on CondInst).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # a missing dependency inside the module is a real error
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        # User-facing errors (bad config key, missing file, unreadable checkpoint ...):
        # one clear line instead of a traceback; --verbose shows the traceback.
        if args.verbose:
            raise
        print(f"boxteacher {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
