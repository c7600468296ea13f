"""`igp refine`: refine the mask bank of a saved model by each cluster's measured loss, and save a refined copy."""

import argparse
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

from .cli import UsageError

logger = logging.getLogger(__name__)

RECORD_FILE = "igp_run.json"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "refine",
        help="refine a saved model's masks by each cluster's calibration loss (bank choice, then block swaps)",
        description=(
            "Load a model saved by `igp prune` or `igp baseline`, route its calibration texts to their clusters, and "
            "refine each cluster's mask on a sample of its own texts: first the bank's best mask for the cluster, "
            "then swaps of one kept block for one skipped block near the cut while the loss falls, and last the "
            "best of the masks the other clusters ended with. No mask skips "
            "less than before, in the run's sparsity unit. The dense weights come from the base model named in the "
            "folder's config (or --base), because the saved folder has no weights for blocks that no mask runs; the "
            "saved blocks must equal the base model's, so a fine-tuned folder is rejected."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    parser.add_argument("model", help="folder written by `igp prune` or `igp baseline`")
    parser.add_argument("--output", required=True, help="new folder to save the refined model to")
    parser.add_argument("--base", default=None,
                        help="base model with every block (default: text_config._name_or_path of the folder's config)")
    parser.add_argument("--calibration", default=None, metavar="SPEC",
                        help="calibration SPEC (default: the one in the folder's igp_run.json)")

    parser.add_argument("--rounds", type=int, default=2, help="swap rounds per cluster (0: bank choice only)")
    parser.add_argument("--window", type=int, default=3,
                        help="blocks on each side of the cut that may swap, ranked by the gate scores of mask learning "
                             "(Block Influence for a baseline without them)")
    parser.add_argument("--examples", type=int, default=16, help="calibration texts per cluster that score masks")
    parser.add_argument("--exchange-examples", type=int, default=64,
                        help="calibration texts per cluster that score the other clusters' refined masks")
    parser.add_argument("--from-learned", action="store_true",
                        help="start from the masks the folder had before its first refinement (those of mask "
                             "learning or of the baseline, kept in igp_run.json) instead of its refined masks")
    parser.add_argument("--min-improvement", type=float, default=0.002,
                        help="relative loss decrease, in [0, 1), that a candidate needs to replace the current mask")
    parser.add_argument("--no-bank", action="store_true",
                        help="skip the choices among the bank's masks (before the swaps and after them)")
    parser.add_argument("--global-examples", type=int, default=0,
                        help="with several clusters: first refine one global mask on this many texts of all clusters "
                             "and offer it to every cluster (0: no global mask)")

    parser.add_argument("--seq-length", type=int, default=None,
                        help="maximum tokens per calibration text (default: the run's, else 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the example sample")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already saved in --output")
    parser.set_defaults(func=run)


def run(args) -> int:
    from .refine import MaskRefinementConfig

    source, output = Path(args.model), Path(args.output)
    check_folders(source, output, args.overwrite)
    for option, value, minimum in (("--rounds", args.rounds, 0), ("--window", args.window, 1),
                                   ("--examples", args.examples, 1), ("--seq-length", args.seq_length, 2),
                                   ("--exchange-examples", args.exchange_examples, 1),
                                   ("--global-examples", args.global_examples, 0)):
        if value is not None and value < minimum:
            raise UsageError(f"{option} must be at least {minimum}, got {value}.")
    if not 0 <= args.min_improvement < 1 or math.isnan(args.min_improvement):
        raise UsageError(f"--min-improvement must be in [0, 1), got {args.min_improvement}.")

    record_path = source / RECORD_FILE
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    settings = record.get("settings", {}).get("prune", {})
    spec = args.calibration or settings.get("calibration") or record.get("calibration", {}).get("spec")
    if not spec:
        missing = "is missing" if not record_path.is_file() else "records no calibration SPEC"
        raise UsageError(f"{record_path} {missing}; pass the texts to refine on with --calibration SPEC.")
    # Refinement must cost blocks in the unit the masks were learned in, or a swap could undercut the target.
    config = MaskRefinementConfig(rounds=args.rounds, window=args.window, max_examples=args.examples,
                                  exchange_examples=args.exchange_examples,
                                  min_improvement=args.min_improvement, use_bank=not args.no_bank, seed=args.seed,
                                  global_examples=args.global_examples,
                                  sparsity_unit=settings.get("sparsity_unit", "blocks"),
                                  context_length=settings.get("context_length", 2048))
    start_bank = unrefined_mask_bank(record, record_path) if args.from_learned else None
    refine_saved_model(source, output, config, record, spec, base=args.base,
                       max_length=args.seq_length or settings.get("max_length") or 128, argv=["igp", *sys.argv[1:]],
                       start_bank=start_bank)
    return 0


def unrefined_mask_bank(record: dict, record_path: Path) -> list[list[int]]:
    """Return the masks the folder had before its first refinement, as its run record keeps them."""
    if not record_path.is_file():
        raise UsageError(f"{record_path} is missing, so the masks before refinement are unknown; drop --from-learned "
                         "to refine the folder's masks.")
    refinement = record.get("refinement")
    if not refinement:
        raise UsageError(f"{record_path} records no refinement, so the folder's masks are the ones it was built with; "
                         "drop --from-learned.")
    while refinement.get("previous"):
        refinement = refinement["previous"]
    if "initial_mask_bank" not in refinement:
        raise UsageError(f"The refinement recorded in {record_path} keeps no initial_mask_bank; drop --from-learned "
                         "to refine the folder's masks.")
    return refinement["initial_mask_bank"]


def check_folders(source: Path, output: Path, overwrite: bool) -> None:
    """Raise `UsageError` unless `source` is a model folder and writing `output` cannot touch it or other files."""
    if not (source / "config.json").is_file():
        raise UsageError(f"{source} has no config.json; give a folder written by `igp prune` or `igp baseline`.")
    source_path, output_path = source.resolve(), output.resolve()
    if output_path == source_path or source_path in output_path.parents or output_path in source_path.parents:
        raise UsageError(f"--output {output} is, contains or lies inside the input folder {source}; give a separate "
                         "folder so the original model stays as it was saved.")
    if output.exists() and any(output.iterdir()):
        if not (output / "config.json").is_file():
            raise UsageError(f"--output {output} is a non-empty folder without a model; give a new folder.")
        if not overwrite:
            raise UsageError(f"{output} already contains a model; pass --overwrite to replace it or choose another "
                             "--output.")


def refine_saved_model(source: Path, output: Path, config, record: dict, spec: str, base: str | None = None,
                       max_length: int = 128, argv=None, start_bank: list[list[int]] | None = None):
    """Refine the bank of the model saved in `source` (or `start_bank`, masks of the same model) and save the refined
    model and its run record to `output`."""
    import torch
    from transformers import AutoModelForCausalLM

    from modeling_igp import IGPruningForCausalLM

    from .data import load_calibration, tokenize_calibration
    from .pipeline import (
        block_names,
        hamming_distances,
        load_base_model,
        plot_mask_bank,
        refinement_summary,
        write_run_record,
    )
    from .refine import refine_masks
    from .sparsity import sparsity_report

    start = time.perf_counter()
    pruned = AutoModelForCausalLM.from_pretrained(str(source), trust_remote_code=True, dtype=torch.float32)
    base_path = base or getattr(pruned.config.text_config, "_name_or_path", None)
    if not base_path:
        raise UsageError(f"{source}/config.json names no base model (text_config._name_or_path is empty); pass --base.")
    try:
        dense, tokenizer = load_base_model(base_path)
    except (ValueError, FileNotFoundError, OSError) as error:
        raise UsageError(f"Could not load the base model {base_path}: {error} Pass the base model with --base.") from error
    _check_same_weights(pruned, dense, source, base_path)

    settings = record.get("settings", {}).get("prune", {})
    try:
        texts = load_calibration(spec, seed=settings.get("seed", 0),
                                 heldout_per_source=settings.get("heldout_per_source", 0)).texts
    except (ValueError, FileNotFoundError, KeyError) as error:
        raise UsageError(f"Could not read the calibration SPEC {spec!r}: {error}") from error
    num_clusters = pruned.config.num_clusters
    if num_clusters > 1 and pruned.router is None:
        raise UsageError(f"{source} has {num_clusters} clusters but no router folder, so its calibration texts cannot "
                         "be routed; refine the folder that `igp prune` saved, router/ included.")
    clusters = pruned.route(texts).tolist() if num_clusters > 1 else [0] * len(texts)
    logger.info("Routed %d calibration texts to %d clusters (sizes %s)", len(texts), num_clusters,
                torch.bincount(torch.tensor(clusters), minlength=num_clusters).tolist())
    dataset = tokenize_calibration(texts, tokenizer, max_length, cluster_ids=clusters)

    bank = start_bank or pruned.config.mask_bank
    scores = record.get("mask_learning", {}).get("gate_scores")
    if scores is None:
        # Static baselines keep no gate scores, so each cluster's Block Influence ranks its blocks instead.
        scores = _influence_scores(dense, dataset, num_clusters, config.batch_size)
    result = refine_masks(dense, dataset, bank, scores, config, num_clusters=num_clusters)

    # Write everything into a sibling folder first, so an interrupted run leaves the previous --output intact.
    refined = IGPruningForCausalLM.from_base(dense, result.mask_bank, centroids=pruned.config.centroids,
                                             router=pruned.router, tokenizer=tokenizer)
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    refined.save_pretrained(partial)

    names = block_names(refined.config.num_layers)
    record = dict(record)
    record["command"] = argv or record.get("command")
    record["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    record["masks"] = {
        "block_names": names,
        "mask_bank": result.mask_bank,
        "skipped_blocks": [[names[k] for k, keep in enumerate(mask) if not keep] for mask in result.mask_bank],
        "sparsity": sparsity_report(result.mask_bank, refined.config.text_config, config.context_length),
        "hamming_distances": hamming_distances(result.mask_bank),
    }
    record["refinement"] = {
        "source": str(source),
        "base_model": str(base_path),
        **refinement_summary(result, bank),
        "previous": record.get("refinement"),
    }
    sizes = torch.bincount(torch.tensor(clusters), minlength=num_clusters).tolist()
    plot_mask_bank(torch.tensor(result.mask_bank).numpy(), partial / "mask_bank.png", cluster_sizes=sizes,
                   sparsity=record["masks"]["sparsity"]["blocks"])
    # The training curves belong to the source run and stay there.
    record["files"] = {"mask_bank_plot": "mask_bank.png"}
    # The new refinement replaces the recorded one, so the total changes by the difference.
    timings = dict(record.get("timings_s", {}))
    seconds = round(time.perf_counter() - start, 2)
    if "total" in timings:
        timings["total"] = round(timings["total"] - timings.get("refinement", 0.0) + seconds, 2)
    record["timings_s"] = dict(timings, refinement=seconds)
    write_run_record(record, partial)

    if output.exists():
        shutil.rmtree(output)
    partial.replace(output)
    changed = sum(old != new for old, new in zip(bank, result.mask_bank))
    logger.info("Refined %d of %d masks in %.1f s (%d masks scored); saved to %s", changed, len(bank),
                result.wall_time_s, result.candidates_scored, output)
    return result


def _check_same_weights(pruned, dense, source: Path, base_path: str) -> None:
    """Raise `UsageError` unless every weight saved in `pruned` equals the dense model's, so that refining keeps the
    model the user saved (a fine-tuned folder would silently lose its fine-tuning)."""
    import torch

    from modeling_igp import IGPruningForCausalLM

    if pruned.config.num_blocks != 2 * dense.config.num_hidden_layers:
        raise UsageError(f"{source} has {pruned.config.num_blocks} blocks but the base model {base_path} has "
                         f"{2 * dense.config.num_hidden_layers}; pass the model it was pruned from with --base.")
    reference = IGPruningForCausalLM.from_base(dense, pruned.config.mask_bank).state_dict()
    for name, tensor in pruned.state_dict().items():
        if name not in reference or reference[name].shape != tensor.shape or not torch.equal(reference[name], tensor):
            raise UsageError(f"The weight {name} of {source} differs from the base model {base_path}, so refining would "
                             "replace it. Refine the model before fine-tuning it, or pass the base it was pruned from "
                             "with --base.")


def _influence_scores(model, dataset, num_clusters: int, batch_size: int):
    """Return the Block Influence of each cluster's examples [N][2L]."""
    import torch

    from .block_influence import influence_scores
    from .l0 import pad_batch

    clusters = torch.tensor(dataset["cluster_ids"])
    scores = []
    for cluster in range(num_clusters):
        rows = [dataset[int(index)] for index in (clusters == cluster).nonzero().flatten()]
        if not rows:
            scores.append([0.0] * (2 * model.config.num_hidden_layers))
            continue
        batches = [pad_batch(rows[start:start + batch_size]) for start in range(0, len(rows), batch_size)]
        scores.append(influence_scores(model, batches)["block"].tolist())
    return scores
