"""`igp compare`: put the evaluations of several models side by side (table, JSON, Markdown and plots)."""

import argparse
import json
import logging
import math
import statistics
from pathlib import Path

from .cli import UsageError

logger = logging.getLogger(__name__)

# The figure of each task that tables and plots use: lm-eval's length-normalised accuracy where the choices differ in
# length, plain accuracy otherwise.
MAIN_METRIC = {
    "hellaswag": "acc_norm",
    "piqa": "acc_norm",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
    "winogrande": "acc",
    "boolq": "acc",
    "lambada": "acc",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="compare evaluated models: table, JSON, Markdown and plots",
        description=(
            "Read the evaluation (igp_eval.json) and run record (igp_run.json) of each model folder and write a "
            "comparison: a table on stdout, compare.json, compare.md, and plots of accuracy against sparsity, "
            "perplexity per domain and the mask banks side by side (a plot without results is left out). Models of "
            "the same method and sparsity (random "
            "masks with different seeds) are also summarised by their mean and standard deviation."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("models", nargs="+", metavar="DIR", help="evaluated model folders")
    parser.add_argument("--eval-dir", action="append", default=None,
                        help="read NAME.json from this folder (as written by `igp eval --output-dir`) instead of "
                             "DIR/igp_eval.json. Repeat it to merge each model's results from several folders: "
                             "zero-shot results of disjoint document samples (`igp eval --exclude-limits`) are "
                             "pooled per task")
    parser.add_argument("--output-dir", default="igp-compare", help="folder for compare.json, compare.md and plots")
    parser.add_argument("--reference", default=None, metavar="DIR",
                        help="model whose speed the others are divided by (default: the first dense model)")
    parser.add_argument("--paired", default=None, metavar="DIR",
                        help="also compare every model with this one, text by text and document by document: "
                             "perplexity ratio and zero-shot accuracy difference with paired standard errors. The "
                             "models need results on the same held-out texts, and zero-shot results written with "
                             "`igp eval --log-samples`")
    parser.set_defaults(func=run)


# -- reading -------------------------------------------------------------------------------------------------------


def load_evaluation(model_dir: Path, eval_dirs: list[Path] | None) -> dict:
    """Read the `igp eval` results of one model folder, merged over `eval_dirs` when there are several."""
    from .eval_cmd import EVAL_FILE, result_path

    paths = [result_path(model_dir, eval_dir) for eval_dir in eval_dirs] if eval_dirs else [model_dir / EVAL_FILE]
    for path in paths:
        if not path.is_file():
            raise UsageError(f"No evaluation for {model_dir}: {path} is missing. Run `igp eval --model {model_dir}"
                             + (f" --output-dir {path.parent}`." if eval_dirs else "`."))
    parts = [json.loads(path.read_text()) for path in paths]
    if len(parts) == 1:
        return parts[0]
    try:
        return merge_evaluations(parts)
    except ValueError as error:
        raise UsageError(f"{model_dir.name}: {error}") from error


def merge_evaluations(parts: list[dict]) -> dict:
    """Merge several `igp eval` results of one model: pool each zero-shot task over the parts that scored it
    (`pool_zero_shot`), and take each perplexity domain from the part that scored it. A domain scored in two parts
    must have the same result in both, so that no figure is chosen silently."""
    from .evaluation import pool_zero_shot

    merged = {"model": parts[0].get("model"), "perplexity": {}, "zero_shot": {},
              "speed": next((part["speed"] for part in parts if part.get("speed")), None)}
    for part in parts:
        for domain, entry in part.get("perplexity", {}).items():
            earlier = merged["perplexity"].setdefault(domain, entry)
            if (earlier.get("texts_sha256") != entry.get("texts_sha256")
                    or not math.isclose(earlier["perplexity"], entry["perplexity"], rel_tol=1e-6)):
                raise ValueError(f"two evaluation folders contain different {domain} perplexities "
                                 f"({earlier['perplexity']:.4g} and {entry['perplexity']:.4g}). Pass only one folder "
                                 "with that domain.")
    tasks = dict.fromkeys(task for part in parts for task in part.get("zero_shot", {}))
    for task in tasks:
        entries = [part["zero_shot"][task] for part in parts if task in part.get("zero_shot", {})]
        try:
            merged["zero_shot"][task] = entries[0] if len(entries) == 1 else pool_zero_shot(entries)
        except ValueError as error:
            raise ValueError(f"{task}: {error}") from error
    return merged


def describe_model(model_dir: Path, evaluation: dict) -> dict:
    """Collect one model's method, sparsity, masks and evaluation (its `load_evaluation` result) into a flat row."""
    config = json.loads((model_dir / "config.json").read_text())
    record_path = model_dir / "igp_run.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}

    mask_bank = config.get("mask_bank") or [[1] * (2 * config.get("text_config", config)["num_hidden_layers"])]
    num_blocks = len(mask_bank[0])
    skipped = [num_blocks - sum(mask) for mask in mask_bank]
    method = record.get("method") or _method_from_bank(mask_bank)
    if "refinement" in record:
        # A refined bank is a different recipe, not another seed of the method it started from.
        method += "+refine"
    sparsity = record.get("masks", {}).get("sparsity", {})
    row = {
        "name": model_dir.name,
        "path": str(model_dir),
        "method": method,
        "num_clusters": len(mask_bank),
        "blocks_skipped": skipped,
        "sparsity_blocks": statistics.mean(skipped) / num_blocks,
        "sparsity_params": _mean(sparsity.get("params")),
        "sparsity_flops": _mean(sparsity.get("flops")),
        "mask_bank": mask_bank,
        "perplexity": {domain: entry["perplexity"] for domain, entry in evaluation.get("perplexity", {}).items()},
        "perplexity_texts": {domain: entry.get("texts_sha256") for domain, entry in
                             evaluation.get("perplexity", {}).items()},
        "accuracy": {task: entry[MAIN_METRIC[task]] for task, entry in evaluation.get("zero_shot", {}).items()},
        "accuracy_stderr": {task: entry.get(f"{MAIN_METRIC[task]}_stderr") for task, entry in
                            evaluation.get("zero_shot", {}).items()},
        "num_docs": {task: entry["num_docs"] for task, entry in evaluation.get("zero_shot", {}).items()},
        "speed": evaluation.get("speed"),
    }
    row["mean_accuracy"] = statistics.mean(row["accuracy"].values()) if row["accuracy"] else None
    return row


def _method_from_bank(mask_bank) -> str:
    if len(mask_bank) > 1:
        return f"igp-N{len(mask_bank)}"
    return "dense" if all(mask_bank[0]) else "static"


def _mean(value):
    if value is None:
        return None
    return statistics.mean(value) if isinstance(value, list) else value


def check_same_texts(rows: list[dict]) -> list[str]:
    """Return the perplexity domains on which the models did not all score the same held-out text."""
    mismatched = []
    domains = {domain for row in rows for domain in row["perplexity_texts"]}
    for domain in sorted(domains):
        digests = {row["perplexity_texts"].get(domain) for row in rows if domain in row["perplexity_texts"]}
        if len(digests) > 1:
            mismatched.append(domain)
    return mismatched


def group_rows(rows: list[dict]) -> list[dict]:
    """Summarise models of the same method and sparsity by the mean and sample standard deviation of each figure."""
    groups = {}
    for row in rows:
        groups.setdefault((row["method"], round(row["sparsity_blocks"], 6)), []).append(row)

    summaries = []
    for (method, sparsity), members in groups.items():
        summary = {"method": method, "sparsity_blocks": sparsity, "count": len(members),
                   "members": [row["name"] for row in members]}
        for field in ("perplexity", "accuracy"):
            keys = sorted(set.intersection(*(set(row[field]) for row in members)))
            summary[field] = {key: statistics.mean(row[field][key] for row in members) for key in keys}
            summary[f"{field}_sd"] = {
                key: statistics.stdev(row[field][key] for row in members) if len(members) > 1 else None for key in keys
            }
        means = [row["mean_accuracy"] for row in members if row["mean_accuracy"] is not None]
        summary["mean_accuracy"] = statistics.mean(means) if means else None
        summary["mean_accuracy_sd"] = statistics.stdev(means) if len(means) > 1 else None
        summaries.append(summary)
    return summaries


# -- paired comparison -----------------------------------------------------------------------------------------------


def paired_against(evaluations: dict, reference_dir: Path) -> dict:
    """Return each model's perplexity ratio per domain and accuracy difference per task against `reference_dir`.

    `evaluations` maps each model folder, the reference's included, to its `load_evaluation` result."""
    from .evaluation import mean_difference, paired_perplexity, paired_zero_shot

    reference = evaluations[reference_dir]
    paired = {}
    for model_dir, evaluation in evaluations.items():
        if model_dir == reference_dir:
            continue

        perplexity = {}
        for domain, entry in evaluation.get("perplexity", {}).items():
            if domain in reference.get("perplexity", {}):
                try:
                    perplexity[domain] = paired_perplexity(entry, reference["perplexity"][domain])
                except ValueError as error:
                    raise UsageError(f"{model_dir.name} against {reference_dir.name} on {domain}: {error}") from error
        zero_shot = {}
        for task, entry in evaluation.get("zero_shot", {}).items():
            if task in reference.get("zero_shot", {}):
                zero_shot[task] = paired_zero_shot(entry, reference["zero_shot"][task], MAIN_METRIC[task])
        tasks = [item for item in zero_shot.values() if item is not None]
        paired[model_dir.name] = {
            "perplexity": perplexity,
            "zero_shot": zero_shot,
            # Like the table's mean accuracy, the mean difference needs all eight tasks.
            "zero_shot_mean": mean_difference(tasks) if len(tasks) == len(MAIN_METRIC) else None,
        }
    return paired


def paired_table(paired: dict) -> tuple[list[str], list[list[str]]]:
    """Return the header and cells of the paired table: perplexity change per domain, then mean accuracy difference,
    each ± one standard error."""
    domains = sorted({domain for item in paired.values() for domain in item["perplexity"]})
    header = ["model"] + [f"ppl {domain}" for domain in domains] + ["mean acc diff"]
    cells = []
    for name, item in paired.items():
        line = [name]
        for domain in domains:
            entry = item["perplexity"].get(domain)
            if entry is None or entry["log_ratio_stderr"] is None:
                line.append("-")
            else:
                line.append(f"{entry['ratio'] - 1:+.1%} ± {entry['log_ratio_stderr']:.1%}")
        mean = item["zero_shot_mean"]
        line.append("-" if mean is None else f"{100 * mean['difference']:+.1f} ± {100 * mean['stderr']:.1f}")
        cells.append(line)
    return header, cells


# -- table -----------------------------------------------------------------------------------------------------------


def speed_figures(row: dict, reference: dict | None) -> dict:
    """Decode and prefill throughput at each batch size, and their ratio to the reference model."""
    figures = {}
    speed = row.get("speed") or {}
    reference_speed = (reference or {}).get("speed") or {}
    for batch_key in ("batch_1", "batch_8"):
        if batch_key not in speed:
            continue
        for metric, label in (("decode_tokens_per_s", "decode"), ("prefill_tokens_per_s", "prefill")):
            value = speed[batch_key][metric]
            figures[f"{label}_{batch_key}"] = value
            if batch_key in reference_speed:
                figures[f"{label}_{batch_key}_ratio"] = value / reference_speed[batch_key][metric]
    return figures


def table_rows(rows: list[dict], groups: list[dict], reference: dict | None) -> tuple[list[str], list[list[str]]]:
    """Build the header and cells of the comparison table: one line per model, then the multi-model group means."""
    domains = sorted({domain for row in rows for domain in row["perplexity"]})
    tasks = [task for task in MAIN_METRIC if any(task in row["accuracy"] for row in rows)]
    header = ["model", "method", "N", "skipped", "params", "flops"] + [f"ppl {d}" for d in domains] + \
             [f"{t} ({MAIN_METRIC[t]})" for t in tasks] + ["mean acc", "decode b1", "decode b8"]

    cells = []
    for row in rows:
        speed = speed_figures(row, reference)
        line = [row["name"], row["method"], str(row["num_clusters"]), f"{row['sparsity_blocks']:.1%}",
                _percent(row["sparsity_params"]), _percent(row["sparsity_flops"])]
        line += [_number(row["perplexity"].get(domain)) for domain in domains]
        line += [_number(row["accuracy"].get(task), 100) for task in tasks]
        line += [_number(row["mean_accuracy"], 100)]
        for batch_key in ("batch_1", "batch_8"):
            value, ratio = speed.get(f"decode_{batch_key}"), speed.get(f"decode_{batch_key}_ratio")
            if value is None:
                line.append("-")
            elif ratio is None:
                line.append(f"{value:.0f}")
            else:
                line.append(f"{value:.0f} ({ratio:.2f}x)")
        cells.append(line)

    for group in groups:
        if group["count"] < 2:
            continue
        line = [f"{group['method']} mean of {group['count']}", group["method"], "1",
                f"{group['sparsity_blocks']:.1%}", "", ""]
        line += [_mean_sd(group["perplexity"].get(d), group["perplexity_sd"].get(d)) for d in domains]
        line += [_mean_sd(group["accuracy"].get(t), group["accuracy_sd"].get(t), 100) for t in tasks]
        line += [_mean_sd(group["mean_accuracy"], group["mean_accuracy_sd"], 100), "", ""]
        cells.append(line)
    return header, cells


def _percent(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def _number(value, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.2f}"


def _mean_sd(mean, sd, scale: float = 1.0) -> str:
    if mean is None:
        return "-"
    return f"{mean * scale:.2f}" + (f" ± {sd * scale:.2f}" if sd is not None else "")


def format_text_table(header: list[str], cells: list[list[str]]) -> str:
    widths = [max(len(line[column]) for line in [header] + cells) for column in range(len(header))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(line, widths)) for line in [header] + cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_markdown_table(header: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(line) + " |" for line in cells]
    return "\n".join(lines)


# -- plots -----------------------------------------------------------------------------------------------------------


def plot_accuracy_vs_sparsity(rows: list[dict], groups: list[dict], path: Path) -> Path:
    """Plot mean zero-shot accuracy against the fraction of blocks skipped, one line per method (error bars: sd)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = [row for row in rows if row["method"] == "dense" and row["mean_accuracy"] is not None]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    methods = sorted({group["method"] for group in groups if group["method"] != "dense"})
    for method in methods:
        points = sorted((group["sparsity_blocks"], group["mean_accuracy"], group["mean_accuracy_sd"] or 0.0)
                        for group in groups if group["method"] == method and group["mean_accuracy"] is not None)
        if dense:
            points = [(0.0, dense[0]["mean_accuracy"], 0.0)] + points
        if points:
            x, y, error = zip(*points)
            axes.errorbar([100 * value for value in x], [100 * value for value in y],
                          yerr=[100 * value for value in error], marker="o", capsize=3, label=method)
    if dense:
        axes.axhline(100 * dense[0]["mean_accuracy"], color="gray", linestyle=":", label="dense")
    axes.set_xlabel("blocks skipped (%)")
    axes.set_ylabel("mean zero-shot accuracy (%)")
    axes.set_title("Accuracy against sparsity")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_perplexity(rows: list[dict], path: Path) -> Path:
    """Plot perplexity per domain per model as grouped bars on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted({domain for row in rows for domain in row["perplexity"]})
    figure, axes = plt.subplots(figsize=(max(7, 1.2 * len(domains) * max(1, len(rows)) / 4), 4.5))
    width = 0.8 / max(1, len(rows))
    for index, row in enumerate(rows):
        values = [row["perplexity"].get(domain, float("nan")) for domain in domains]
        positions = [domain_index + index * width for domain_index in range(len(domains))]
        axes.bar(positions, values, width=width, label=row["name"])
    axes.set_xticks([domain_index + 0.4 - width / 2 for domain_index in range(len(domains))])
    axes.set_xticklabels(domains)
    axes.set_yscale("log")
    axes.set_ylabel("perplexity (log scale)")
    axes.set_title("Held-out perplexity per domain")
    axes.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_masks(rows: list[dict], path: Path) -> Path:
    """Draw each model's mask bank as a heatmap (rows: clusters, columns: blocks, black: skipped), one under another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(rows), 1, figsize=(10, 0.6 + 0.45 * sum(row["num_clusters"] + 1 for row in rows)),
                                squeeze=False)
    for axis, row in zip(axes[:, 0], rows):
        axis.imshow(row["mask_bank"], cmap="Greys_r", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        axis.set_yticks(range(row["num_clusters"]))
        axis.set_ylabel(row["name"], rotation=0, ha="right", va="center", fontsize=7)
        axis.set_xticks(range(0, len(row["mask_bank"][0]), 2))
        axis.set_xticklabels([str(block // 2) for block in range(0, len(row["mask_bank"][0]), 2)], fontsize=6)
        axis.tick_params(axis="y", labelsize=6)
    axes[-1, 0].set_xlabel("layer (each layer: attention block, then MLP block; black = skipped)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# -- command -------------------------------------------------------------------------------------------------------


def compare(model_dirs: list[str | Path], output_dir: str | Path, eval_dir: str | Path | list | None = None,
            reference: str | Path | None = None, paired: str | Path | None = None) -> dict:
    """Write compare.json, compare.md and the plots that have data for the evaluated models.

    With `paired`, compare.json gains `paired` (every model against that one, see `paired_against`) and compare.md
    a second table. Returns the JSON content, with the names of the written files under `files`."""
    if isinstance(eval_dir, (str, Path)):
        eval_dir = [eval_dir]
    eval_dirs = [Path(folder) for folder in eval_dir] if eval_dir else None
    loaded = [(Path(model_dir), load_evaluation(Path(model_dir), eval_dirs)) for model_dir in model_dirs]
    rows = [describe_model(model_dir, evaluation) for model_dir, evaluation in loaded]
    groups = group_rows(rows)
    if reference is not None:
        matches = [row for row in rows if Path(row["path"]).resolve() == Path(reference).resolve()]
        if not matches:
            raise UsageError(f"--reference {reference} is not one of the compared models.")
        reference_row = matches[0]
    else:
        reference_row = next((row for row in rows if row["method"] == "dense"), None)

    mismatched = check_same_texts(rows)
    if mismatched:
        logger.warning("The models were not scored on the same held-out text for %s; their perplexities do not "
                       "compare. Evaluate them in one `igp eval` call.", ", ".join(mismatched))

    header, cells = table_rows(rows, groups, reference_row)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    content = {
        "models": [dict(row, speed_relative=speed_figures(row, reference_row)) for row in rows],
        "groups": groups,
        "reference": reference_row["name"] if reference_row else None,
        "main_metric": MAIN_METRIC,
        "mismatched_perplexity_texts": mismatched,
    }
    markdown = format_markdown_table(header, cells) + "\n"
    if paired is not None:
        evaluations = dict(loaded)
        matches = [model_dir for model_dir in evaluations if model_dir.resolve() == Path(paired).resolve()]
        if not matches:
            raise UsageError(f"--paired {paired} is not one of the compared models; add it to the model folders.")
        content["paired_reference"] = matches[0].name
        content["paired"] = paired_against(evaluations, matches[0])
        paired_header, paired_cells = paired_table(content["paired"])
        content["paired_table"] = format_text_table(paired_header, paired_cells)
        markdown += (f"\nAgainst {content['paired_reference']}, on the same texts and documents: perplexity change "
                     "and mean accuracy difference (points), each ± one paired standard error.\n\n"
                     + format_markdown_table(paired_header, paired_cells) + "\n")
    (output_dir / "compare.json").write_text(json.dumps(content, indent=2) + "\n")
    (output_dir / "compare.md").write_text(markdown)

    # A plot without data would be an empty frame, so it is left out with a log line. An earlier comparison's plot
    # of the same name is removed too, because it would not match this compare.json.
    written = ["compare.json", "compare.md"]
    if any(row["mean_accuracy"] is not None for row in rows):
        written.append(plot_accuracy_vs_sparsity(rows, groups, output_dir / "accuracy_vs_sparsity.png").name)
    else:
        (output_dir / "accuracy_vs_sparsity.png").unlink(missing_ok=True)
        logger.info("No model has zero-shot results; accuracy_vs_sparsity.png is not drawn (run igp eval --tasks).")
    if any(row["perplexity"] for row in rows):
        written.append(plot_perplexity(rows, output_dir / "perplexity.png").name)
    else:
        (output_dir / "perplexity.png").unlink(missing_ok=True)
        logger.info("No model has perplexity results; perplexity.png is not drawn (run igp eval --ppl).")
    written.append(plot_masks(rows, output_dir / "masks.png").name)
    content["table"] = format_text_table(header, cells)
    content["files"] = written
    return content


def run(args) -> int:
    for model_dir in args.models:
        if not (Path(model_dir) / "config.json").is_file():
            raise UsageError(f"No saved model in {model_dir} (config.json is missing).")
    content = compare(args.models, args.output_dir, eval_dir=args.eval_dir, reference=args.reference,
                      paired=args.paired)
    print(content["table"])
    if "paired_table" in content:
        print(f"\nAgainst {content['paired_reference']} (paired, ± one standard error):")
        print(content["paired_table"])
    print(f"\nWrote {', '.join(content['files'])} to {args.output_dir}")
    return 0
