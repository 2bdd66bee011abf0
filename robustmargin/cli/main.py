"""`robustmargin COMMAND ...`: dispatches to the command modules and turns user errors into exit code 2."""
from __future__ import annotations

import argparse
import importlib
import sys

from robustmargin.errors import UserError

COMMANDS = ("train", "attack", "analyze", "report", "reproduce", "status")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit 2) instead of usage plus message."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="robustmargin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"robustmargin.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m robustmargin -- COMMAND ...` keeps torchrun off our flags
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UserError as err:
        print(f"robustmargin {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"robustmargin {args.command}: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
