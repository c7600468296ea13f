"""`igp baseline`: build a static depth-pruning baseline and save it as a loadable model folder."""

import argparse
import logging
import sys

from .cli import UsageError

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    from .baselines import METHODS

    parser = subparsers.add_parser(
        "baseline",
        help="build a static baseline (dense, ShortGPT, block Block Influence, static L0, random) and save it",
        description=(
            "Build one static depth-pruning baseline as an IGPruningForCausalLM with a single mask and save it to "
            "--output, with its run record (igp_run.json). Every method skips 2 * round(sparsity * L) blocks, so "
            "ShortGPT's whole layers and the sub-block methods skip the same number of blocks."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--method", required=True, choices=METHODS,
                        help="dense: all blocks; shortgpt: lowest layer Block Influence; block-bi: lowest sub-block "
                             "Block Influence; static-l0: the L0 pipeline with one cluster; random: seeded random blocks")
    parser.add_argument("--sparsity", type=float, default=0.25,
                        help="fraction of blocks to skip, in [0, 1), rounded to whole layers")
    parser.add_argument("--output", required=True, help="folder to save the model and igp_run.json to")
    parser.add_argument("--model", default=None,
                        help="base model: local folder, .gguf file or hub name (default: packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--calibration", default=None, metavar="SPEC",
                        help="calibration SPEC, as for `igp prune` (default: the embedded mix); used by shortgpt, "
                             "block-bi and static-l0")
    parser.add_argument("--num-texts", type=int, default=None,
                        help="use at most this many calibration texts for Block Influence (default: all drawn)")
    parser.add_argument("--seq-length", type=int, default=128, help="maximum tokens per calibration text")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration texts per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration draw and of the random mask")
    parser.add_argument("--steps", type=int, default=None,
                        help="static-l0 only: mask-learning optimizer steps (default: the MaskLearningConfig default)")
    parser.add_argument("--refine-examples", type=int, default=None, metavar="N",
                        help="static-l0 only: refine the learned mask on N calibration texts by measured loss, as "
                             "`igp prune --refine` does. Without it the mask is not refined")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already saved in --output")
    parser.set_defaults(func=run)


def run(args) -> int:
    from .baselines import BaselineConfig, make_baseline
    from .refine import MaskRefinementConfig

    if not 0.0 <= args.sparsity < 1.0:
        raise UsageError(f"--sparsity must be in [0, 1), got {args.sparsity}.")
    if args.method != "dense" and args.sparsity == 0.0:
        raise UsageError(f"--method {args.method} with --sparsity 0 skips nothing; give a sparsity above 0.")
    for option, value in (("--seq-length", args.seq_length), ("--batch-size", args.batch_size),
                          ("--num-texts", args.num_texts), ("--steps", args.steps),
                          ("--refine-examples", args.refine_examples)):
        if value is not None and value < 1:
            raise UsageError(f"{option} must be at least 1, got {value}.")

    mask_learning = None
    if args.method == "static-l0" and args.steps is not None:
        from .l0 import MaskLearningConfig

        mask_learning = MaskLearningConfig(max_steps=args.steps)

    config = BaselineConfig(
        method=args.method,
        sparsity=args.sparsity,
        calibration=args.calibration,
        num_calibration_texts=args.num_texts,
        max_length=args.seq_length,
        batch_size=args.batch_size,
        seed=args.seed,
        refine=None if args.refine_examples is None else MaskRefinementConfig(max_examples=args.refine_examples),
    )
    try:
        _, record = make_baseline(config, args.output, model=args.model, mask_learning=mask_learning,
                                  overwrite=args.overwrite, argv=sys.argv)
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        # make_baseline raises ValueError for invalid input: an unknown model, an unreadable calibration source, or a
        # sparsity that rounds to every layer of this model.
        raise UsageError(str(error)) from error

    sparsity = record["masks"]["sparsity"]
    print(f"{args.method}: skipped {_first(sparsity['blocks_skipped'])} blocks "
          f"({_first(sparsity['blocks']):.1%} of blocks, {_first(sparsity['params']):.1%} of block parameters, "
          f"{_first(sparsity['flops']):.1%} of block FLOPs at {sparsity['context_length']} tokens) -> {args.output}")
    return 0


def _first(value):
    return value[0] if isinstance(value, list) else value
