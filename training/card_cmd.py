"""`igp card`: render the model card of a saved pruned model into its folder, to read before pushing."""

import argparse
import logging
from pathlib import Path

from .cli import UsageError

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "card",
        help="write the model card (README.md) of a pruned model folder",
        description=(
            "Render the model card of the pruned model in DIR from config.json, igp_run.json, the plots and any "
            "evaluation results, and write it to DIR/README.md (replacing an existing one). `igp push` uploads the "
            "same card."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model_dir", metavar="DIR", help="folder written by `igp prune` or save_pretrained")
    parser.add_argument("--repo-id", default=None, metavar="ORG/NAME",
                        help="Hub repository the card is for, used in the usage snippet (default: the folder name)")
    parser.add_argument("--compare", default=None, metavar="FILE",
                        help="compare.json written by `igp compare` for this model, the dense model and baselines, "
                             "shown as the card's evaluation table (default: DIR/compare.json if present)")
    parser.add_argument("--context-length", type=int, default=None,
                        help="context length in tokens for the FLOP sparsity (default: the run's)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from igp_hub_cards import write_card

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"{model_dir} has no config.json; give the folder written by `igp prune` or save_pretrained.")
    if args.compare is not None and not Path(args.compare).is_file():
        raise UsageError(f"--compare {args.compare} is not a file; give the compare.json that `igp compare` wrote.")
    if args.context_length is not None and args.context_length < 1:
        raise UsageError(f"--context-length must be a positive number of tokens, got {args.context_length}.")

    try:
        path = write_card(model_dir, repo_id=args.repo_id, context_length=args.context_length,
                          compare_path=args.compare)
    except ValueError as error:
        raise UsageError(str(error)) from error
    logger.info("Wrote the model card to %s", path)
    print(path)
    return 0
