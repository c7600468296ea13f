"""`igp refine`: refine the mask bank of a saved model by each cluster's real loss, and save the result."""

import argparse
import json
import logging
import shutil
import sys
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
            "refine each cluster's mask on a sample of its own texts: first the best mask of the bank, then swaps of "
            "one kept block for one skipped block near the cut while the loss falls. Every mask keeps its sparsity. "
            "The dense weights come from the base model named in the folder's config (or --base), because the "
            "saved folder has no weights for blocks that no mask runs."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model", help="folder written by `igp prune` or `igp baseline`")
    parser.add_argument("--output", required=True, help="folder to save the refined model to")
    parser.add_argument("--base", default=None,
                        help="base model with every block (default: text_config._name_or_path of the folder's config)")
    parser.add_argument("--calibration", default=None, metavar="SPEC",
                        help="calibration SPEC (default: the one in the folder's igp_run.json)")
    parser.add_argument("--rounds", type=int, default=2, help="swap rounds per cluster (0: bank choice only)")
    parser.add_argument("--window", type=int, default=3, help="blocks on each side of the cut that may swap")
    parser.add_argument("--examples", type=int, default=16, help="calibration examples per cluster that score masks")
    parser.add_argument("--min-improvement", type=float, default=0.002,
                        help="relative loss decrease a candidate needs to replace the current mask")
    parser.add_argument("--no-bank", action="store_true", help="skip the choice among the bank's masks")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="maximum tokens per calibration text (default: the run's, else 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the example sample")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already saved in --output")
    parser.set_defaults(func=run)


def run(args) -> int:
    from .refine import MaskRefinementConfig

    source, output = Path(args.model), Path(args.output)
    if not (source / "config.json").is_file():
        raise UsageError(f"{source} has no config.json; give a folder written by `igp prune` or `igp baseline`.")
    if output.resolve() == source.resolve():
        raise UsageError(f"--output {output} is the input folder; give a new folder so the original model stays as "
                         "it was saved.")
    if (output / "config.json").exists() and not args.overwrite:
        raise UsageError(f"{output} already holds a model; pass --overwrite to replace it or choose another --output.")
    try:
        config = MaskRefinementConfig(rounds=args.rounds, window=args.window, max_examples=args.examples,
                                      min_improvement=args.min_improvement, use_bank=not args.no_bank, seed=args.seed)
    except ValueError as error:
        raise UsageError(str(error)) from error
    record_path = source / RECORD_FILE
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    refine_saved_model(source, output, config, record, base=args.base, calibration=args.calibration,
                       max_length=args.seq_length, argv=["igp", *sys.argv[1:]])
    return 0


def refine_saved_model(source: Path, output: Path, config, record: dict, base: str | None = None,
                       calibration: str | None = None, max_length: int | None = None, argv=None):
    """Refine the bank of the model saved in `source` and save the refined model and its run record to `output`."""
    import torch
    from transformers import AutoModelForCausalLM

    from modeling_igp import IGPruningForCausalLM

    from .data import load_calibration, tokenize_calibration
    from .pipeline import block_names, hamming_distances, load_base_model
    from .refine import refine_masks
    from .sparsity import sparsity_report

    pruned = AutoModelForCausalLM.from_pretrained(str(source), trust_remote_code=True, dtype=torch.float32)
    base_path = base or getattr(pruned.config.text_config, "_name_or_path", None)
    if not base_path:
        raise UsageError(f"{source}/config.json names no base model (text_config._name_or_path is empty); pass --base.")
    dense, tokenizer = load_base_model(base_path)

    settings = record.get("settings", {}).get("prune", {})
    spec = calibration or settings.get("calibration") or record.get("calibration", {}).get("spec")
    if not spec:
        raise UsageError(f"{source}/{RECORD_FILE} records no calibration SPEC; pass --calibration.")
    texts = load_calibration(spec, seed=settings.get("seed", 0),
                             heldout_per_source=settings.get("heldout_per_source", 0)).texts
    num_clusters = pruned.config.num_clusters
    clusters = pruned.route(texts).tolist() if num_clusters > 1 else [0] * len(texts)
    logger.info("Routed %d calibration texts to %d clusters (sizes %s)", len(texts), num_clusters,
                torch.bincount(torch.tensor(clusters), minlength=num_clusters).tolist())
    length = max_length or settings.get("max_length") or 128
    dataset = tokenize_calibration(texts, tokenizer, length, cluster_ids=clusters)

    bank = pruned.config.mask_bank
    scores = record.get("mask_learning", {}).get("gate_scores")
    if scores is None:
        scores = _influence_scores(dense, dataset, num_clusters, config.batch_size)
    result = refine_masks(dense, dataset, bank, scores, config, num_clusters=num_clusters)

    refined = IGPruningForCausalLM.from_base(dense, result.mask_bank, centroids=pruned.config.centroids,
                                             router=pruned.router, tokenizer=tokenizer)
    if output.exists():
        shutil.rmtree(output)
    refined.save_pretrained(output)

    names = block_names(refined.config.num_layers)
    record = dict(record)
    record["command"] = argv or record.get("command")
    record["masks"] = {
        "block_names": names,
        "mask_bank": result.mask_bank,
        "skipped_blocks": [[names[k] for k, keep in enumerate(mask) if not keep] for mask in result.mask_bank],
        "sparsity": sparsity_report(result.mask_bank, refined.config.text_config, config.context_length),
        "hamming_distances": hamming_distances(result.mask_bank),
    }
    record["refinement"] = {
        "source": str(source),
        "initial_mask_bank": bank,
        "clusters": result.clusters,
        "candidates_scored": result.candidates_scored,
        "wall_time_s": round(result.wall_time_s, 2),
        "config": result.config,
    }
    (output / RECORD_FILE).write_text(json.dumps(record, indent=1))
    changed = sum(old != new for old, new in zip(bank, result.mask_bank))
    logger.info("Refined %d of %d masks in %.1f s (%d candidates scored); saved to %s", changed, len(bank),
                result.wall_time_s, result.candidates_scored, output)
    return result


def _influence_scores(model, dataset, num_clusters: int, batch_size: int):
    """Block Influence of each cluster's examples [N][2L], for models saved without gate scores (static baselines)."""
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

