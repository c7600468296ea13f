"""The `igp` command line: one subcommand per step of the pipeline.

Each subcommand lives in its own module, which exposes `register(subparsers)` to add its parser and sets
`func` on it. Bad arguments exit with status 2 and a one-line message, as argparse does.
"""

import argparse
import importlib
import logging
import sys

# Modules under igp_training that define subcommands, in the order `igp --help` lists them.
COMMAND_MODULES = [
    "prune_cmd",
    "generate_cmd",
    "finetune_cmd",
    "card_cmd",
    "push_cmd",
    "baseline_cmd",
    "refine_cmd",
    "eval_cmd",
    "compare_cmd",
]


class UsageError(ValueError):
    """An invalid argument found after parsing (missing file, value out of range); exits with status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="igp", description="Input-guided block pruning for transformers models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(f"igp_training.{module_name}").register(subparsers)
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
        return args.func(args) or 0
    except UsageError as error:
        parser.exit(2, f"igp {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
