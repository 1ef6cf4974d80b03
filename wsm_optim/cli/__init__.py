"""``wsm-optim`` command line (also ``python -m wsm_optim``).

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them. Bad input is reported as a
one-line message with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help)
SUBCOMMANDS = {
    "demo": ("wsm_optim.demo", "train a small char-level transformer: WSM merges vs WSD decays, EMA and schedule-free"),
    "weights": ("wsm_optim.cli.weights", "print (and plot) the decay / merge weights of a schedule"),
    "merge": ("wsm_optim.cli.merge", "merge saved checkpoint files with a WSM schedule"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the subcommand named in ``argv`` is imported (all of them without ``argv``).

    Importing a subcommand can be slow (``torch``): ``wsm-optim weights`` needs
    only numpy, so it answers in well under a second.
    """
    parser = argparse.ArgumentParser(
        prog="wsm-optim", description="Warmup-Stable and Merge: decay-free LR training by checkpoint merging."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = None if argv is None else next((a for a in argv if a in SUBCOMMANDS), "")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if wanted is None or name == wanted:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # bad input: one line, exit 2
        print(f"wsm-optim {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`, which exited early
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
