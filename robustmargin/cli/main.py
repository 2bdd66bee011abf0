"""`robustmargin COMMAND ...`: builds the parser from the command modules, runs one, and turns user errors
into one line and exit code 2. Parsing imports no stage module (and so no torch): --help and a bad flag
answer at once."""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys

from robustmargin import __version__
from robustmargin.cli.common import check_out_dir
from robustmargin.errors import UserError

COMMANDS = ("train", "attack", "analyze", "report", "reproduce", "status", "sweep", "compare", "theory")

DESCRIPTION = """\
Adversarial robustness of homogeneous neural networks: train ReLU networks far past 100 % training accuracy
(to losses like 1e-800), attack their checkpoints with minimal-L2 attacks, and relate normalized margin,
Lipschitz bounds, certified radii and attack distances. A run goes train → attack → analyze → report
(`reproduce` does all four); `sweep` and `compare` cover a grid of runs; `attack --model` takes any
PyTorch classifier; `theory` checks the theorems on small cases; `status` tells what a run has done."""

# what to do after Ctrl-C, per command; train's own hint is built from its command line
CONTINUE = {
    "attack": "rerun the same command to continue; finished batches are kept",
    "sweep": "rerun the same command to continue; finished runs and stages are kept",
    "reproduce": "rerun the same command to continue; finished stages and epochs are kept",
}
RERUN = "rerun the command to finish"


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit 2) instead of usage plus message."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="robustmargin", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"robustmargin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"robustmargin.cli.{name}").add_parser(sub)
    return parser


def _interrupted(command: str, argv: list[str]) -> str:
    if command == "train":
        again = argv if "--resume" in argv else [*argv, "--resume"]
        how = f"continue from the last accepted epoch with: robustmargin {shlex.join(again)}"
    else:
        how = CONTINUE.get(command, RERUN)
    return f"robustmargin {command}: interrupted; {how}"


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has left (so a BrokenPipeError is that, not another socket's)."""
    try:
        import select

        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows) or no real stdout: assume so
        return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m robustmargin -- COMMAND ...` keeps torchrun off our flags
        argv = argv[1:]
    command = None
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        try:
            check_out_dir(getattr(args, "out", None))
            code = int(args.run(args) or 0)
            sys.stdout.flush()  # a reader that left shows here, not at exit
            return code
        except UserError as err:
            print(f"robustmargin {command}: error: {err}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        if command is None:
            return 130
        print(_interrupted(command, argv), file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        # `robustmargin status ... | head`: the reader has what it wanted. Point stdout at devnull so the
        # flush at exit does not fail again, and exit as a program killed by SIGPIPE would (128 + 13).
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (AttributeError, OSError, ValueError):  # stdout is no file descriptor: nothing will flush it
            pass
        return 141


if __name__ == "__main__":
    sys.exit(main())
