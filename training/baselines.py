"""Static depth-pruning baselines, each saved as an `IGPruningForCausalLM` with a one-mask bank.

All baselines skip the same number of blocks for a given sparsity, so they compare with input-guided pruning at equal
cost:

- `dense`: every block runs.
- `shortgpt`: whole decoder layers with the lowest layer Block Influence on the calibration text are skipped
  (ShortGPT, Men et al., 2024).
- `block-bi`: attention and MLP sub-blocks with the lowest Block Influence are skipped (the sub-block granularity of
  BlockPruner and LLM-Drop, scored in one shot).
- `static-l0`: the mask-discovery pipeline (L0 hard-concrete gates) with a single cluster, so the only difference to
  input-guided pruning is the input guidance.
- `random`: a seeded uniformly random set of blocks.

The number of skipped blocks is `2 * round(sparsity * L)` for every method, so ShortGPT, which can only skip whole
layers, skips exactly as many blocks as the others. A sparsity of 4/30 on a 30-layer model skips 8 of 60 blocks.
"""

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from modeling_igp import IGPruningForCausalLM

from .block_influence import block_influence
from .sparsity import sparsity_report

if TYPE_CHECKING:
    from .refine import MaskRefinementConfig

logger = logging.getLogger(__name__)

METHODS = ("dense", "shortgpt", "block-bi", "static-l0", "random")
RUN_RECORD_FILE = "igp_run.json"


@dataclass
class BaselineConfig:
    """Settings of one static baseline."""

    method: str
    """One of `METHODS`."""

    sparsity: float = 0.25
    """Fraction of blocks to skip; rounded to whole layers (see `num_skipped_blocks`). Ignored by `dense`."""

    calibration: str | None = None
    """Calibration SPEC (syntax of `igp_training.data`) for the Block Influence and L0 methods; None uses the
    embedded default mix."""

    num_calibration_texts: int | None = None
    """Only for Block Influence: use at most this many calibration texts (all drawn texts when None)."""

    max_length: int = 128
    """Maximum tokens per calibration text."""

    batch_size: int = 8
    """Calibration texts per forward pass for Block Influence."""

    seed: int = 0
    """Seed of the calibration draw, and of the blocks `random` picks."""

    context_length: int = 2048
    """Context length at which FLOPs sparsity is reported."""

    refine: "MaskRefinementConfig | None" = None
    """Refinement of the learned mask by its measured calibration loss before saving, as `igp prune --refine` runs it
    for every cluster. Only `static-l0` learns a mask to refine, and None skips refinement. A static baseline refined
    like the input-guided run it is compared with differs from that run only in the routing."""


def num_skipped_blocks(num_layers: int, sparsity: float) -> int:
    """Return the number of blocks every baseline skips: twice the nearest whole number of layers (halves round up)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}.")
    layers = math.floor(sparsity * num_layers + 0.5)
    if layers >= num_layers:
        raise ValueError(f"sparsity {sparsity} would skip all {num_layers} layers; use a smaller sparsity.")
    if layers == 0 and sparsity > 0.0:
        raise ValueError(
            f"sparsity {sparsity} rounds to 0 of {num_layers} layers, so the baseline would skip nothing; use at least "
            f"{0.5 / num_layers:.3g} (half a layer)."
        )
    return 2 * layers


def lowest_score_mask(scores, num_skipped: int, num_blocks: int) -> list[int]:
    """Skip the entries with the lowest scores; `scores` has one value per block (2L) or per layer (L).

    With layer scores, `num_skipped` counts blocks and must be even; each chosen layer skips both of its blocks. Ties
    are broken by position (the earlier block or layer is skipped first), so the mask is deterministic.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    per_layer = scores.numel() * 2 == num_blocks
    if not per_layer and scores.numel() != num_blocks:
        raise ValueError(f"Expected {num_blocks} block scores or {num_blocks // 2} layer scores, got {scores.numel()}.")
    if per_layer and num_skipped % 2:
        raise ValueError(f"Layer scores skip whole layers, so the number of skipped blocks must be even, got {num_skipped}.")

    count = num_skipped // 2 if per_layer else num_skipped
    # A stable sort keeps equal scores in position order.
    order = torch.sort(scores, stable=True).indices[:count].tolist()
    mask = [1] * num_blocks
    for index in order:
        if per_layer:
            mask[2 * index] = mask[2 * index + 1] = 0
        else:
            mask[index] = 0
    return mask


def random_mask(num_blocks: int, num_skipped: int, seed: int) -> list[int]:
    """Skip `num_skipped` blocks drawn uniformly at random with a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    mask = [1] * num_blocks
    for block in torch.randperm(num_blocks, generator=generator)[:num_skipped].tolist():
        mask[block] = 0
    return mask


def calibration_batches(texts: list[str], tokenizer, max_length: int, batch_size: int) -> list[dict]:
    """Tokenise texts (truncated to `max_length`) into right-padded batches of `input_ids` and `attention_mask`."""
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token (e.g. to the EOS token).")
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start : start + batch_size], truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt")
        batches.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    return batches


def block_influence_mask(model, batches, num_skipped: int, granularity: str) -> tuple[list[int], list[float]]:
    """Return the mask that skips the lowest Block Influence layers (`"layer"`) or sub-blocks (`"block"`)."""
    scores = block_influence(model, batches, granularity=granularity)
    mask = lowest_score_mask(scores, num_skipped, 2 * model.config.num_hidden_layers)
    return mask, scores.tolist()


def baseline_model(base_model, mask: list[int], tokenizer=None) -> IGPruningForCausalLM:
    """Wrap the base model with a one-mask bank (shared weights; the skipped blocks are dropped from the wrapper)."""
    return IGPruningForCausalLM.from_base(base_model, [mask], tokenizer=tokenizer)


def build_run_record(config: BaselineConfig, base_model, mask: list[int], scores=None, calibration=None,
                     timings=None, argv=None) -> dict:
    """Describe a baseline in the layout of the pipeline's `igp_run.json` (settings, calibration, masks)."""
    text_config = base_model.config
    num_layers = text_config.num_hidden_layers
    names = [f"L{layer}.{kind}" for layer in range(num_layers) for kind in ("attn", "mlp")]
    record = {
        "format_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": argv,
        "method": config.method,
        "settings": {
            "baseline": asdict(config),
            # The same keys as the pipeline's record, so evaluation finds the calibration texts the same way.
            "prune": {"calibration": config.calibration, "seed": config.seed, "heldout_per_source": 0,
                      "sparsity": config.sparsity, "num_clusters": 1, "context_length": config.context_length},
        },
        "base_model": {
            "name_or_path": getattr(base_model, "name_or_path", None),
            "model_type": text_config.model_type,
            "num_layers": num_layers,
            "num_blocks": 2 * num_layers,
        },
        "masks": {
            "block_names": names,
            "mask_bank": [mask],
            "skipped_blocks": [[names[block] for block, keep in enumerate(mask) if not keep]],
            "sparsity": sparsity_report([mask], text_config, config.context_length),
        },
        "timings_s": dict(timings or {}),
    }
    if scores is not None:
        record["block_influence"] = {"granularity": "layer" if config.method == "shortgpt" else "block",
                                     "scores": scores}
    if calibration is not None:
        record["calibration"] = {"spec": config.calibration, "num_texts": len(calibration)}
    return record


def write_run_record(record: dict, output_dir: Path) -> Path:
    """Write `igp_run.json` atomically."""
    path = Path(output_dir) / RUN_RECORD_FILE
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(path)
    return path


def make_baseline(config: BaselineConfig, output_dir: str | Path, model: str | None = None, mask_learning=None,
                  overwrite: bool = False, argv: list[str] | None = None) -> tuple[IGPruningForCausalLM, dict]:
    """Build one baseline from the base model `model` (None: the packaged SmolLM2) and save it to `output_dir`.

    Returns the model and its run record (also written to `igp_run.json`). `mask_learning` (a `MaskLearningConfig`)
    is used by `static-l0` only.
    """
    if config.method not in METHODS:
        raise ValueError(f"Unknown baseline method {config.method!r}; choose from {', '.join(METHODS)}.")
    if config.refine is not None and config.method != "static-l0":
        raise ValueError(f"Invalid refinement for method {config.method!r}: refinement (--refine-examples) needs a "
                         "learned mask, which only static-l0 has. Use --method static-l0, or run `igp refine` on the "
                         "saved folder.")
    output_dir = Path(output_dir)
    if (output_dir / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already contains a saved model; pass overwrite=True (--overwrite) to replace it.")

    if config.method == "static-l0":
        return _static_l0(config, output_dir, model, mask_learning, overwrite, argv)

    from .data import DEFAULT_CALIBRATION, load_calibration
    from .pipeline import load_base_model

    timings = {}
    start = time.perf_counter()
    base, tokenizer = load_base_model(model)
    timings["load model"] = round(time.perf_counter() - start, 2)
    num_layers = base.config.num_hidden_layers
    num_blocks = 2 * num_layers
    num_skipped = 0 if config.method == "dense" else num_skipped_blocks(num_layers, config.sparsity)
    logger.info("Baseline %s: skipping %d of %d blocks", config.method, num_skipped, num_blocks)

    scores, texts = None, None
    if config.method in ("shortgpt", "block-bi"):
        start = time.perf_counter()
        config.calibration = config.calibration or DEFAULT_CALIBRATION
        texts = load_calibration(config.calibration, seed=config.seed).texts[: config.num_calibration_texts]
        batches = calibration_batches(texts, tokenizer, config.max_length, config.batch_size)
        granularity = "layer" if config.method == "shortgpt" else "block"
        mask, scores = block_influence_mask(base, batches, num_skipped, granularity)
        timings["block influence"] = round(time.perf_counter() - start, 2)
    elif config.method == "random":
        mask = random_mask(num_blocks, num_skipped, config.seed)
    else:
        mask = [1] * num_blocks

    start = time.perf_counter()
    pruned = baseline_model(base, mask, tokenizer)
    pruned.save_pretrained(output_dir)
    timings["save model"] = round(time.perf_counter() - start, 2)

    record = build_run_record(config, base, mask, scores=scores, calibration=texts, timings=timings, argv=argv)
    record["base_model"]["name_or_path"] = model or "SmolLM2-135M-Instruct (packaged)"
    write_run_record(record, output_dir)
    logger.info("Saved the %s baseline (%d blocks skipped) to %s", config.method, num_skipped, output_dir)
    return pruned, record


def _static_l0(config, output_dir, model, mask_learning, overwrite, argv):
    """Run the mask-discovery pipeline with one cluster; the target is the baseline's whole-layer block count."""
    from .pipeline import PruneConfig, prune
    from .pipeline import write_run_record as write_pipeline_record

    # The pipeline binarises to round(target * 2L) blocks, so the exact fraction gives the same count as the others.
    num_layers = _num_layers(model)
    target = num_skipped_blocks(num_layers, config.sparsity) / (2 * num_layers)

    prune_config = PruneConfig(
        output_dir=str(output_dir),
        model=model,
        calibration=config.calibration,
        num_clusters=1,
        sparsity=target,
        max_length=config.max_length,
        seed=config.seed,
        min_cluster_size=1,
        context_length=config.context_length,
        overwrite=overwrite,
        refine=config.refine,
    )
    result = prune(prune_config, mask_learning=mask_learning, argv=argv)
    record = result.record
    record["method"] = "static-l0"
    record["settings"]["baseline"] = asdict(config)
    write_pipeline_record(record, output_dir)
    return result.model, record


def _num_layers(model: str | None) -> int:
    """Read the number of decoder layers of a base model from its config, without loading the weights."""
    from transformers import AutoConfig

    from .assets import default_model_path

    if model is None:
        return AutoConfig.from_pretrained(default_model_path()).num_hidden_layers
    if str(model).endswith(".gguf"):
        path = Path(model)
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name).num_hidden_layers
    return AutoConfig.from_pretrained(model).num_hidden_layers
