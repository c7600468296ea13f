"""`prune`: from a base model and calibration text to a saved `IGPruningForCausalLM`.

The run has seven phases, each logged with its wall time. It loads the base model and draws the calibration texts.
It embeds and clusters them with the router encoder, then tokenises them with their cluster ids. It learns one block
mask per cluster with L0 gates. It bundles the masks, centroids, router and tokenizer into an `IGPruningForCausalLM`
and saves it. Last, it writes `igp_run.json` (every setting and figure of the run) and the PNG plots.
"""

import contextlib
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .data import DEFAULT_CALIBRATION, load_calibration, tokenize_calibration

if TYPE_CHECKING:
    from .refine import MaskRefinementConfig

logger = logging.getLogger(__name__)

RUN_RECORD_FILE = "igp_run.json"
MASK_BANK_PLOT = "mask_bank.png"
TRAINING_PLOT = "training_curves.png"
# Settings of a run, written beside its mask-learning checkpoints so that a resume can check them.
RESUME_SETTINGS = "run_settings.json"
# Mask-learning settings that igp added later, with the behaviour of the versions before them.
RESUME_SETTINGS_ADDED = {"shared_gates": False, "influence_scope": "all", "balanced_sampling": False}
MASK_LEARNING_SUBFOLDER = "mask_learning"


class PruneInputError(ValueError):
    """Invalid input to `prune` (model, calibration, clustering or output folder): the user can fix it."""


@dataclass
class PruneConfig:
    """Settings of one `prune` run that are not mask-learning hyperparameters (those live in `MaskLearningConfig`)."""

    output_dir: str
    """Folder the pruned model, its router, tokenizer, run record and plots are written to."""

    model: str | None = None
    """Base model: hub name, local folder, or `.gguf` file. None loads the packaged SmolLM2-135M-Instruct."""

    calibration: str | None = None
    """Calibration SPEC (see `igp_training.data`). None uses the embedded default mix, which needs no network."""

    num_clusters: int = 3
    """Number of input clusters, and so of masks in the bank."""

    sparsity: float = 0.25
    """Target fraction to skip, in `sparsity_unit`, for every cluster."""

    sparsity_unit: str = "blocks"
    """Unit of the target: `blocks`, `params` or `flops`."""

    max_length: int = 128
    """Maximum tokens per calibration text; longer texts are truncated."""

    heldout_per_source: int = 16
    """Texts per source kept out of calibration, recorded for evaluation (routing agreement, perplexity)."""

    seed: int = 0
    """Seed of text sampling, k-means and mask learning."""

    min_cluster_size: int = 8
    """Smallest number of calibration texts a cluster may have; a smaller cluster is an error."""

    kmeans_restarts: int = 10
    """Number of k-means restarts (the one with the lowest inertia is kept)."""

    router: str | None = None
    """Router encoder (a sentence-transformers folder or hub name). None uses the packaged all-MiniLM-L6-v2."""

    router_max_length: int = 256
    """Maximum router tokens per text, for clustering and for routing at inference."""

    context_length: int = 2048
    """Context length at which FLOPs sparsity is reported."""

    resume: bool = False
    """Continue mask learning from the last checkpoint in `output_dir/mask_learning` instead of starting over."""

    save_steps: int | None = 50
    """Optimizer steps between resumable mask-learning checkpoints; None saves none."""

    keep_checkpoints: bool = False
    """Keep the `mask_learning` folder (checkpoints and `mask_learning.json`) after a successful run."""

    overwrite: bool = False
    """Allow writing into an `output_dir` that already contains a saved model."""

    refine: "MaskRefinementConfig | None" = None
    """Refine the learned masks by each cluster's measured calibration loss (`igp_training.refine`) before saving,
    or None to save the binarised masks as learned. Its sparsity unit, context length and seed come from this
    config."""


@dataclass
class PruneResult:
    """Result of `prune`: the bundled model and the run record written to `igp_run.json`."""

    model: object
    record: dict
    output_dir: Path
    timings: dict = field(default_factory=dict)


class PhaseTimer:
    """Time each phase of the run and log one line per phase with its wall time."""

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        logger.debug("Phase %s: started", name)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)
        logger.info("Phase %s: done in %.1f s", name, self.seconds[name])


# -- base model --------------------------------------------------------------------------------------------------


def load_base_model(model: str | None):
    """Load a causal LM and its tokenizer in float32: the packaged default, a `.gguf` file, a folder or a hub name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modeling_igp import SUPPORTED_MODEL_TYPES

    from .assets import load_default_model, load_gguf

    if model is None:
        base, tokenizer = load_default_model(dtype=torch.float32)
    elif str(model).endswith(".gguf"):
        if not Path(model).is_file():
            raise FileNotFoundError(f"GGUF file not found: {model}. Give an existing .gguf file, folder or hub name.")
        base, tokenizer = load_gguf(model)
    else:
        if str(model).startswith((".", "/", "~")) and not Path(model).expanduser().exists():
            raise FileNotFoundError(f"Model folder not found: {model}.")
        try:
            base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(model)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Could not load the model {model!r}: it is not a local folder with a config.json, and loading it as "
                f"a hub name failed ({error}). Give a local folder, a .gguf file, or a hub name when online."
            ) from error

    model_type = base.config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"The model {model!r} has model_type {model_type!r}; IGPruningForCausalLM supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    if tokenizer.pad_token_id is None:
        # Batches of calibration texts need padding; the labels of padded positions are ignored anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return base.float().eval(), tokenizer


# -- the run -----------------------------------------------------------------------------------------------------


def prune(config: PruneConfig, mask_learning=None, argv: list[str] | None = None) -> PruneResult:
    """Run the whole pipeline and save the pruned model to `config.output_dir`.

    Args:
        config: the run's settings.
        mask_learning: a `MaskLearningConfig`; its target sparsity and unit are taken from `config`.
        argv: the command line that started the run, kept in the run record.
    """
    from modeling_igp import IGPRouter, IGPruningForCausalLM

    from . import l0
    from .clustering import cluster_texts, load_encoder
    from .refine import refine_masks

    try:
        validate_prune_config(config)
        output_dir = Path(config.output_dir)
        _prepare_output_dir(output_dir, config)
        mask_learning = _mask_learning_config(mask_learning, config)
        _record_resume_settings(output_dir / MASK_LEARNING_SUBFOLDER, config, mask_learning)
    except (ValueError, FileExistsError) as error:
        raise PruneInputError(str(error)) from error
    timer = PhaseTimer()
    run_start = time.perf_counter()

    with timer("load model"):
        try:
            base, tokenizer = load_base_model(config.model)
        except (ValueError, FileNotFoundError) as error:
            raise PruneInputError(str(error)) from error
    logger.info("Base model: %s (%s, %d layers, %d blocks)", config.model or "packaged SmolLM2-135M-Instruct",
                base.config.model_type, base.config.num_hidden_layers, 2 * base.config.num_hidden_layers)

    with timer("calibration data"):
        try:
            calibration = load_calibration(config.calibration or DEFAULT_CALIBRATION, seed=config.seed,
                                           heldout_per_source=config.heldout_per_source)
        except (ValueError, FileNotFoundError, KeyError) as error:
            raise PruneInputError(str(error)) from error
    if config.num_clusters > len(calibration.texts):
        raise PruneInputError(
            f"Cannot split {len(calibration.texts)} calibration texts into {config.num_clusters} clusters: there are "
            f"more clusters than texts. Use at most {len(calibration.texts)} clusters, or give more calibration texts."
        )

    with timer("clustering"):
        router_path = config.router if config.router is not None else str(_default_router_path())
        try:
            encoder = load_encoder(router_path, max_length=config.router_max_length)
        except (OSError, ValueError) as error:
            # transformers' message for an unknown config lists every model class, so keep only its first line.
            raise PruneInputError(
                f"Could not load the router encoder {router_path!r}: {str(error).splitlines()[0]} Give a "
                f"sentence-transformers folder or hub name, such as all-MiniLM-L6-v2."
            ) from error
        try:
            clustering, _ = cluster_texts(calibration.texts, config.num_clusters, encoder=encoder, seed=config.seed,
                                          n_init=config.kmeans_restarts, min_cluster_size=config.min_cluster_size)
        except ValueError as error:
            raise PruneInputError(str(error)) from error
        router = IGPRouter.from_pretrained(router_path, max_length=config.router_max_length)
        heldout_routing = _route_heldout(router, clustering, calibration)

    with timer("tokenisation"):
        dataset = tokenize_calibration(calibration.texts, tokenizer, config.max_length, cluster_ids=clustering.labels)
    num_tokens = int(sum(len(ids) for ids in dataset["input_ids"]))
    logger.info("Tokenised %d calibration texts into %d tokens (at most %d per text)", len(dataset), num_tokens,
                config.max_length)

    learning_dir = output_dir / MASK_LEARNING_SUBFOLDER
    resume_from = _last_checkpoint(learning_dir) if config.resume else None
    if config.resume:
        logger.info("Resuming mask learning from %s", resume_from or "scratch (no checkpoint found)")
    with timer("mask learning"):
        learned = l0.learn_masks(base, dataset, mask_learning, str(learning_dir), num_clusters=config.num_clusters,
                                 resume_from_checkpoint=resume_from)
    refined = None
    if config.refine is not None:
        with timer("refinement"):
            refined = refine_masks(base, dataset, learned.mask_bank, learned.gate_scores,
                                   replace(config.refine, sparsity_unit=config.sparsity_unit,
                                           context_length=config.context_length, seed=config.seed),
                                   num_clusters=config.num_clusters)
    mask_bank = np.asarray(refined.mask_bank if refined else learned.mask_bank, dtype=np.int64)
    if not config.keep_checkpoints:
        # The run record keeps everything mask_learning.json has; the folder only mattered for resuming.
        shutil.rmtree(learning_dir, ignore_errors=True)

    with timer("save model"):
        model = IGPruningForCausalLM.from_base(base, mask_bank.tolist(), centroids=clustering.centroids,
                                               router=router, tokenizer=tokenizer)
        model.save_pretrained(output_dir)

    with timer("report"):
        record = build_run_record(
            config=config, mask_learning=mask_learning, argv=argv, base=base, calibration=calibration,
            clustering=clustering, heldout_routing=heldout_routing, num_tokens=num_tokens, learned=learned,
            mask_bank=mask_bank, timings=timer.seconds,
        )
        if refined is not None:
            record["refinement"] = refinement_summary(refined, learned.mask_bank)
        plot_mask_bank(mask_bank, output_dir / MASK_BANK_PLOT, cluster_sizes=clustering.sizes,
                       sparsity=record["masks"]["sparsity"]["blocks"])
        plot_training_curves(record["mask_learning"]["history"], config.sparsity, output_dir / TRAINING_PLOT)
        record["files"] = {"mask_bank_plot": MASK_BANK_PLOT, "training_plot": TRAINING_PLOT}

    record["timings_s"] = dict(timer.seconds, total=round(time.perf_counter() - run_start, 2))
    write_run_record(record, output_dir)
    logger.info("Saved the pruned model to %s in %.1f s", output_dir, record["timings_s"]["total"])
    return PruneResult(model=model, record=record, output_dir=output_dir, timings=record["timings_s"])


def validate_prune_config(config: PruneConfig) -> None:
    """Raise `ValueError` naming the setting and its valid range for any invalid setting."""
    from .sparsity import SPARSITY_UNITS

    if not 0.0 < config.sparsity < 1.0:
        raise ValueError(f"The target sparsity must lie strictly between 0 and 1, got {config.sparsity}.")
    if config.sparsity_unit not in SPARSITY_UNITS:
        raise ValueError(f"Unknown sparsity unit {config.sparsity_unit!r}; use one of {', '.join(SPARSITY_UNITS)}.")
    checks = {
        "num_clusters": (config.num_clusters, 1),
        "max_length": (config.max_length, 2),
        "heldout_per_source": (config.heldout_per_source, 0),
        "min_cluster_size": (config.min_cluster_size, 1),
        "kmeans_restarts": (config.kmeans_restarts, 1),
        "router_max_length": (config.router_max_length, 1),
        "context_length": (config.context_length, 1),
    }
    for name, (value, minimum) in checks.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}.")


def _prepare_output_dir(output_dir: Path, config: PruneConfig) -> None:
    if (output_dir / "config.json").exists() and not (config.overwrite or config.resume):
        raise FileExistsError(
            f"{output_dir} already contains a saved model. Choose another output folder, or pass overwrite=True "
            "(--overwrite) to replace it."
        )
    learning_dir = output_dir / MASK_LEARNING_SUBFOLDER
    if (output_dir / "config.json").exists() and config.resume and not config.overwrite \
            and not _last_checkpoint(learning_dir):
        raise FileExistsError(
            f"{output_dir} contains a finished run and no checkpoint to resume from. Choose another output folder, or "
            "pass overwrite=True (--overwrite) to run again and replace it."
        )
    if _last_checkpoint(learning_dir) and not (config.resume or config.overwrite):
        raise FileExistsError(
            f"{learning_dir} contains checkpoints of an interrupted run. Pass resume=True (--resume) to continue it, or "
            "overwrite=True (--overwrite) to start over."
        )
    if config.overwrite and not config.resume:
        _remove_checkpoints(learning_dir)
    output_dir.mkdir(parents=True, exist_ok=True)


def _last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def _remove_checkpoints(folder: Path) -> None:
    if folder.is_dir():
        for checkpoint in folder.glob("checkpoint-*"):
            shutil.rmtree(checkpoint)


def _default_router_path():
    from .assets import default_router_path

    return default_router_path()


def _record_resume_settings(learning_dir: Path, config: PruneConfig, mask_learning) -> None:
    """Write the settings that shape mask learning beside its checkpoints, or, when resuming from a checkpoint, raise
    `ValueError` naming each setting that differs from the interrupted run's."""
    # Checkpointing and output handling do not change what is learned, so they may differ between the two runs.
    # Refinement runs after mask learning, so it does not change what a checkpoint contains either.
    ignored = {"output_dir", "resume", "overwrite", "keep_checkpoints", "save_steps", "logging_steps", "refine"}
    settings = {
        "prune": {name: value for name, value in asdict(config).items() if name not in ignored},
        "mask_learning": {name: value for name, value in mask_learning.to_dict().items() if name not in ignored},
    }
    settings = json.loads(json.dumps(settings))  # tuples become lists, as they are when read back
    path = learning_dir / RESUME_SETTINGS

    if config.resume and _last_checkpoint(learning_dir) and path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        # Settings added after a run was saved take the value that the run's version of igp used.
        for name, value in RESUME_SETTINGS_ADDED.items():
            saved.setdefault("mask_learning", {}).setdefault(name, value)
        changed = [
            f"{name} ({saved.get(section, {}).get(name)!r} -> {value!r})"
            for section, values in settings.items()
            for name, value in values.items()
            if saved.get(section, {}).get(name) != value
        ]
        if changed:
            raise ValueError(
                f"Cannot resume the run in {learning_dir.parent} with changed settings: {', '.join(changed)}. Rerun "
                "with the interrupted run's settings, or pass overwrite=True (--overwrite) without --resume to start "
                "over."
            )
        return

    learning_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")


def _mask_learning_config(mask_learning, config: PruneConfig):
    """Return a `MaskLearningConfig` whose target, unit, context length, seed and checkpointing come from `config`."""
    from .l0 import MaskLearningConfig

    mask_learning = mask_learning if mask_learning is not None else MaskLearningConfig()
    return replace(mask_learning, target_sparsity=config.sparsity, sparsity_unit=config.sparsity_unit,
                   context_length=config.context_length, seed=config.seed, save_steps=config.save_steps)


def _route_heldout(router, clustering, calibration) -> dict:
    """Route the held-out texts and count, per source, how many land in each cluster."""
    if not calibration.heldout_texts:
        return {}
    routed = router.route(calibration.heldout_texts, torch.from_numpy(clustering.centroids)).tolist()
    counts = {}
    for source, cluster in zip(calibration.heldout_sources, routed):
        per_cluster = counts.setdefault(source, [0] * clustering.num_clusters)
        per_cluster[cluster] += 1
    return counts


# -- run record --------------------------------------------------------------------------------------------------


def block_names(num_layers: int) -> list[str]:
    """Return readable block names: `L0.attn`, `L0.mlp`, `L1.attn`, ..."""
    return [f"L{layer}.{kind}" for layer in range(num_layers) for kind in ("attn", "mlp")]


def hamming_distances(mask_bank) -> list[list[int]]:
    """Return the N x N matrix of the number of blocks on which two masks differ."""
    bank = np.asarray(mask_bank, dtype=np.int64)
    return (bank[:, None, :] != bank[None, :, :]).sum(axis=-1).tolist()


def cluster_composition(sources: list[str], labels, num_clusters: int) -> list[dict]:
    """Return, for each cluster, the number of its calibration texts from each source."""
    composition = [{} for _ in range(num_clusters)]
    for source, cluster in zip(sources, labels):
        composition[int(cluster)][source] = composition[int(cluster)].get(source, 0) + 1
    return composition


def package_versions() -> dict:
    """Return the versions of Python and of the packages a run depends on."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("igp", "torch", "transformers", "datasets", "sentence-transformers", "scikit-learn",
                    "accelerate", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def build_run_record(*, config, mask_learning, argv, base, calibration, clustering, heldout_routing, num_tokens,
                     learned, mask_bank, timings) -> dict:
    """Collect every setting and figure of the run into one JSON-ready dict."""
    from .sparsity import sparsity_report

    text_config = base.config
    num_layers = text_config.num_hidden_layers
    names = block_names(num_layers)
    report = sparsity_report(mask_bank.tolist(), text_config, config.context_length)

    return {
        "format_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": argv,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(base.device),
        },
        "versions": package_versions(),
        "settings": {"prune": asdict(config), "mask_learning": _jsonable(asdict(mask_learning))},
        "base_model": {
            "name_or_path": config.model or "SmolLM2-135M-Instruct (packaged)",
            "model_type": text_config.model_type,
            "num_layers": num_layers,
            "num_blocks": 2 * num_layers,
            "num_parameters": int(base.num_parameters()),
        },
        "calibration": {
            "spec": config.calibration or DEFAULT_CALIBRATION,
            "num_texts": len(calibration.texts),
            "num_tokens": num_tokens,
            "num_heldout_texts": len(calibration.heldout_texts),
            "sources": calibration.summary(),
        },
        "clustering": {
            "router": config.router or "all-MiniLM-L6-v2 (packaged)",
            "num_clusters": clustering.num_clusters,
            "sizes": clustering.sizes,
            "inertia": clustering.inertia,
            "reassigned_to_cosine_nearest": clustering.reassigned,
            "composition": cluster_composition(calibration.sources, clustering.labels, clustering.num_clusters),
            "heldout_routing": heldout_routing,
        },
        "mask_learning": _learning_summary(learned),
        "masks": {
            "block_names": names,
            "mask_bank": mask_bank.tolist(),
            "skipped_blocks": [[names[block] for block in np.flatnonzero(mask == 0)] for mask in mask_bank],
            "sparsity": report,
            "hamming_distances": hamming_distances(mask_bank),
        },
        "timings_s": dict(timings),
    }


def _learning_summary(learned) -> dict:
    history = learned.history
    return {
        "wall_time_s": round(learned.wall_time_s, 2),
        "num_steps": history[-1]["step"] if history else 0,
        "expected_sparsity": learned.expected_sparsity,
        "gate_scores": learned.gate_scores,
        "prob_nonzero": learned.prob_nonzero,
        "final_lambda_1": history[-1]["lambda_1"] if history else None,
        "final_lambda_2": history[-1]["lambda_2"] if history else None,
        "history": history,
    }


def refinement_summary(refined, initial_mask_bank) -> dict:
    """Return the run-record entry of a mask refinement: the masks it started from and what it did per cluster."""
    return {
        "initial_mask_bank": [list(map(int, mask)) for mask in initial_mask_bank],
        "clusters": refined.clusters,
        "candidates_scored": refined.candidates_scored,
        "wall_time_s": round(refined.wall_time_s, 2),
        "config": refined.config,
        "global_mask": refined.global_mask,
        "global_search": refined.global_record,
    }


def _jsonable(value):
    """Convert tensors, arrays and numpy scalars (nested in dicts and lists) into JSON types."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_run_record(record: dict, output_dir: Path) -> Path:
    """Write `igp_run.json` atomically (a partial file never replaces a complete one)."""
    path = Path(output_dir) / RUN_RECORD_FILE
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(_jsonable(record), indent=2) + "\n")
    partial.replace(path)
    return path


# -- plots -------------------------------------------------------------------------------------------------------


def plot_mask_bank(mask_bank, path, cluster_sizes=None, sparsity=None) -> Path:
    """Draw the mask bank as a clusters x blocks heatmap: kept attention and MLP blocks in two colours, skipped white."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    bank = np.asarray(mask_bank, dtype=np.int64)
    num_clusters, num_blocks = bank.shape
    # 0: skipped, 1: kept attention block (even index), 2: kept MLP block (odd index).
    kinds = np.tile(np.arange(num_blocks) % 2 + 1, (num_clusters, 1))
    image = bank * kinds
    colours = ListedColormap(["#ffffff", "#3b75af", "#ef8636"])

    figure, axes = plt.subplots(figsize=(max(7.0, num_blocks * 0.2), 2.0 + 0.45 * num_clusters))
    axes.imshow(image, cmap=colours, vmin=0, vmax=2, aspect="auto", interpolation="nearest")
    for boundary in range(2, num_blocks, 2):
        axes.axvline(boundary - 0.5, color="#555555", linewidth=0.8)
    axes.set_xticks(np.arange(num_blocks // 2) * 2 + 0.5)
    axes.set_xticklabels([str(layer) for layer in range(num_blocks // 2)], fontsize=7)
    axes.set_xticks(np.arange(num_blocks + 1) - 0.5, minor=True)
    axes.set_yticks(np.arange(num_clusters + 1) - 0.5, minor=True)
    axes.grid(which="minor", color="#cccccc", linewidth=0.4)
    axes.tick_params(which="minor", length=0)
    labels = []
    for cluster in range(num_clusters):
        label = f"cluster {cluster}"
        if cluster_sizes is not None:
            label += f" (n={cluster_sizes[cluster]})"
        if sparsity is not None:
            label += f", {100 * sparsity[cluster]:.0f}% skipped"
        labels.append(label)
    axes.set_yticks(np.arange(num_clusters))
    axes.set_yticklabels(labels, fontsize=8)
    axes.set_xlabel("decoder layer (attention block, then MLP block)")
    axes.set_title("Mask bank: blocks each cluster runs")
    figure.legend(handles=[Patch(color="#3b75af", label="attention kept"), Patch(color="#ef8636", label="MLP kept"),
                           Patch(facecolor="#ffffff", edgecolor="#999999", label="skipped")],
                  loc="lower center", ncol=3, fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def plot_training_curves(history: list[dict], target: float, path) -> Path:
    """Plot each cluster's expected sparsity (with the warmed-up target) and the task loss against the step.

    `history` contains one record per optimizer step, as `MaskLearningResult.history` does: `step`, `task_loss`, and
    per-cluster lists `expected_sparsity` and `target`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (sparsity_axes, loss_axes) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [row["step"] for row in history]
    if history:
        expected = np.asarray([row["expected_sparsity"] for row in history], dtype=np.float64)
        for cluster in range(expected.shape[1]):
            sparsity_axes.plot(steps, expected[:, cluster], linewidth=1.2, label=f"cluster {cluster}")
        # Every cluster's target follows the same warm-up shape, so cluster 0's stands for all.
        scheduled = [row["target"][0] for row in history]
        sparsity_axes.plot(steps, scheduled, color="black", linestyle=":", linewidth=1, label="scheduled target")
    sparsity_axes.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:g}")
    sparsity_axes.set_xlabel("optimizer step")
    sparsity_axes.set_ylabel("expected sparsity")
    sparsity_axes.set_title("Expected sparsity per cluster")
    sparsity_axes.legend(fontsize=8)

    loss_rows = [row for row in history if row.get("task_loss") is not None]
    if loss_rows:
        loss_axes.plot([row["step"] for row in loss_rows], [row["task_loss"] for row in loss_rows], linewidth=0.8,
                       color="#999999", label="per step")
        window = max(1, len(loss_rows) // 20)
        smoothed = np.convolve([row["task_loss"] for row in loss_rows], np.ones(window) / window, mode="valid")
        loss_axes.plot([row["step"] for row in loss_rows][window - 1:], smoothed, color="#3b75af",
                       label=f"mean of {window} steps")
        loss_axes.legend(fontsize=8)
    loss_axes.set_xlabel("optimizer step")
    loss_axes.set_ylabel("task loss (nats per token)")
    loss_axes.set_title("Task loss of the gated model")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)
