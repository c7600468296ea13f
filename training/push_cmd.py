"""`igp push`: upload a saved pruned model, its full model card, plots and run record to the Hub in one commit."""

import argparse
import logging
import time
from pathlib import Path

from .cli import UsageError

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "push",
        help="upload a pruned model folder to the Hugging Face Hub with its model card",
        description=(
            "Load the pruned model in DIR, render its model card from config.json, igp_run.json, the plots and any "
            "evaluation results, and upload the model (config, remote code, weights, tokenizer, router/), the card, "
            "its images and igp_run.json to the Hub in one commit. The token comes from HF_TOKEN or the stored "
            "login and the endpoint from HF_ENDPOINT; with HF_HUB_OFFLINE set nothing is uploaded."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model_dir", metavar="DIR", help="folder written by `igp prune` or save_pretrained")
    parser.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="Hub repository to create or update")
    parser.add_argument("--private", action="store_true",
                        help="create the repository as private (an existing repository keeps its visibility)")
    parser.add_argument("--revision", default=None, help="branch to commit to; created from main if missing")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit-message", default=None, help="commit message (default: Upload IGPruningForCausalLM)")
    parser.add_argument("--compare", default=None, metavar="FILE",
                        help="compare.json written by `igp compare` for this model, the dense model and baselines, "
                             "shown as the card's evaluation table (default: DIR/compare.json if present)")
    parser.add_argument("--context-length", type=int, default=None,
                        help="context length in tokens for the FLOP sparsity in the card (default: the run's)")
    parser.add_argument("--keep-readme", action="store_true",
                        help="upload DIR/README.md as it is (and the files it links to) instead of rendering the card")
    parser.set_defaults(func=run)


def run(args) -> int:
    from igp_hub_cards import render_card
    from modeling_igp import IGPruningForCausalLM
    from huggingface_hub.errors import OfflineModeIsEnabled

    from modeling_igp.hub_igp import require_online

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"{model_dir} has no config.json; give the folder written by `igp prune` or save_pretrained.")
    if args.compare is not None and not Path(args.compare).is_file():
        raise UsageError(f"--compare {args.compare} is not a file; give the compare.json that `igp compare` wrote.")
    if args.context_length is not None and args.context_length < 1:
        raise UsageError(f"--context-length must be a positive number of tokens, got {args.context_length}.")
    if args.keep_readme and not (model_dir / "README.md").is_file():
        raise UsageError(f"--keep-readme needs {model_dir / 'README.md'}; write it with `igp card {model_dir}`.")
    try:
        # Fail before loading the model: the upload would be refused anyway.
        require_online()
    except OfflineModeIsEnabled as error:
        raise UsageError(str(error)) from error

    model_card, extra_files = None, None
    if not args.keep_readme:
        try:
            rendered = render_card(model_dir, repo_id=args.repo_id, context_length=args.context_length,
                                   compare_path=args.compare)
        except ValueError as error:
            raise UsageError(str(error)) from error
        model_card, extra_files = rendered.text, rendered.files
        logger.info("Rendered the model card with %d linked files: %s", len(extra_files), ", ".join(extra_files))

    start = time.perf_counter()
    try:
        model = IGPruningForCausalLM.from_pretrained(str(model_dir), dtype="auto")
    except (OSError, ValueError) as error:
        raise UsageError(f"Could not load a pruned model from {model_dir}: {error}") from error
    logger.info("Loaded %s in %.1f s", model_dir, time.perf_counter() - start)

    start = time.perf_counter()
    commit = model.push_to_hub(
        args.repo_id,
        private=args.private or None,
        commit_message=args.commit_message,
        model_card=model_card,
        revision=args.revision,
        create_pr=args.create_pr,
        extra_files=extra_files,
    )
    logger.info("Pushed %s to %s in %.1f s", model_dir, args.repo_id, time.perf_counter() - start)
    print(commit.pr_url or commit.commit_url)
    return 0
