"""The `gpt2mh` command: one module per command group, each with `add_parsers(add)` beside its
handlers; this module only assembles them and turns an error into one line and an exit code.

Imports of the library happen inside the handlers, so `gpt2mh --help` stays fast (no torch)."""
from __future__ import annotations

import argparse
import logging
import sys

from . import files, generate, quickstart, serve, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpt2mh", description="One GPT-2 trunk, N output heads: train, generate, export.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    common = argparse.ArgumentParser(add_help=False)  # --debug before or after the subcommand
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    for module in (files, train, generate, serve, quickstart):  # the order of `gpt2mh --help`
        module.add_parsers(add)
    return p


class _Stderr(logging.StreamHandler):
    """Log records to whatever sys.stderr is now (pytest swaps it per test)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging() -> None:
    """gpt2mh's log lines (progress, "resumed from step N", warnings) on stderr, as plain lines."""
    log = logging.getLogger("gpt2mh")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)  # records still propagate (pytest's caplog listens at the root)
    log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("gpt2mh: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        msg = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
        print(f"gpt2mh {args.command}: error: {' '.join(msg.split())}", file=sys.stderr)
        usage = (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError,
                 NotADirectoryError)  # what the user gave is wrong: the usage exit code, as argparse's
        return 2 if isinstance(e, usage) else 1
    return 0
