"""The ``boxteacher`` command line.

Each package contributes its subcommands through a ``register(subparsers)`` function named
by an entry point of the group ``boxteacher.commands`` (and its benchmarks through the
group ``boxteacher.benchmarks``) in pyproject.toml, discovered with importlib.metadata.
training/ so names none of export/, serving/, labelstudio_backend/, and ``boxteacher
train`` works without the serving extras installed. Handlers import their heavy
dependencies when they run, not at start-up.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from importlib.metadata import entry_points

log = logging.getLogger(__name__)


def plugins(group: str) -> list[Callable[[argparse._SubParsersAction], None]]:
    """The ``register`` functions of an entry point group, training's first, then by name.

    An entry point whose package cannot be imported because an optional dependency is not
    installed (e.g. onnx without the ``export`` extra) is left out; any other error is raised.
    """
    found = sorted(entry_points(group=group), key=lambda ep: (ep.name != "training", ep.name))
    if not found:
        raise RuntimeError(f"no '{group}' entry points: install the package (pip install -e .) so that its commands are registered")
    loaded = []
    for ep in found:
        try:
            loaded.append(ep.load())
        except ModuleNotFoundError as err:
            if err.name and err.name.split(".")[0] == ep.value.split(".")[0]:
                raise  # the package itself is broken, not an optional dependency
            log.debug("%s: %s left out (%s is not installed)", group, ep.name, err.name)
    return loaded


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="boxteacher", description="Instance segmentation from boxes (BoxTeacher on CondInst).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in plugins("boxteacher.commands"):
        register(sub)
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
