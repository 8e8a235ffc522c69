"""Command line: ``vtprune <command>`` (or ``python -m vtprune <command>``).

Every refused argument ends in one line on stderr naming the argument and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vtprune.cli._args import Parser, UsageError

# command -> module with HELP, add_arguments(parser), run(args); imported only when the command runs, so
# ``--help`` and ``--version`` stay quick.
COMMANDS = {
    "demo": "vtprune.cli.demo",
    "ops": "vtprune.ops_demo",
    "calibrate": "vtprune.cli.calibrate",
    "eval": "vtprune.cli.eval",
}
# one-line summaries for ``vtprune --help`` without importing every command module (torch, transformers)
SUMMARIES = {
    "demo": "run a model with and without a method: tokens per layer, FLOPs, prefill latency",
    "ops": "run the raw ops at real-model shapes: what they select, time per backend",
    "calibrate": "fit ALVTS selector factors to a model on local image/question data",
    "eval": "evaluate a method config on lmms-eval tasks (accuracy; needs the eval extra)",
}


def _version() -> str:
    from vtprune import __version__  # the package import (torch) is paid by ``python -m vtprune`` anyway

    return __version__


def build_parser(commands=None) -> Parser:
    p = Parser(prog="vtprune", description="Visual token reduction for Hugging Face vision-language models.")
    p.add_argument("--version", action="version", version=f"vtprune {_version()}")
    sub = p.add_subparsers(dest="command", metavar="command", title="commands")
    for name in COMMANDS if commands is None else commands:
        module = importlib.import_module(COMMANDS[name])
        doc = (module.__doc__ or "").strip()
        sp = sub.add_parser(name, help=SUMMARIES[name], description=doc)
        module.add_arguments(sp)
        sp.set_defaults(_run=module.run)
    return p


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Import only the module of the command asked for; ``--help`` lists the summaries of all of them.
    name = next((a for a in argv if not a.startswith("-")), None)
    if name is None or name not in COMMANDS:
        p = Parser(prog="vtprune", description="Visual token reduction for Hugging Face vision-language models.",
                   epilog="commands:\n" + "\n".join(f"  {k:<10} {v}" for k, v in SUMMARIES.items())
                   + "\n\n`vtprune <command> --help` for a command's options.",
                   formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--version", action="version", version=f"vtprune {_version()}")
        p.add_argument("command", choices=tuple(COMMANDS), help="one of: " + ", ".join(COMMANDS))
        p.parse_args(argv)  # prints help / version, or a one-line error, and exits
        return
    args = build_parser([name]).parse_args(argv)
    try:
        args._run(args)
    except UsageError as e:
        print(f"vtprune {name}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except SystemExit as e:  # a command that ends with a message (SystemExit(str)) was refused: exit code 2
        if isinstance(e.code, str):
            print(f"vtprune {name}: error: {e.code}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
