"""`igp eval`: perplexity per domain, zero-shot accuracy with lm-eval, and speed, for one or more saved models."""

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

from .cli import UsageError

logger = logging.getLogger(__name__)

EVAL_FILE = "igp_eval.json"


def register(subparsers) -> None:
    from .evaluation import PERPLEXITY_DOMAINS, ZERO_SHOT_TASKS

    parser = subparsers.add_parser(
        "eval",
        help="evaluate saved models: perplexity per domain, zero-shot accuracy (lm-eval), speed and memory",
        description=(
            "Evaluate one or more saved models. Perplexity is token-weighted on held-out text that no model's "
            "calibration drew (each model's igp_run.json names its calibration). Zero-shot tasks run in "
            "lm-evaluation-harness on the local benchmark files, with each document routed once. Speed is measured "
            "for all models in one run, in turn, so the ratios between them are comparable. Results go to "
            f"DIR/{EVAL_FILE} (or --output-dir); finished parts are kept and skipped when the command runs again."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, nargs="+", metavar="DIR", help="saved model folders")
    parser.add_argument("--tasks", default="all",
                        help=f"comma-separated zero-shot tasks ({', '.join(ZERO_SHOT_TASKS)}), 'all' or 'none'")
    parser.add_argument("--ppl", default="all",
                        help=f"comma-separated perplexity domains ({', '.join(PERPLEXITY_DOMAINS)}), 'all' or 'none'")
    parser.add_argument("--speed", action="store_true", help="also measure speed and memory")
    parser.add_argument("--limit", type=int, default=None,
                        help="documents per zero-shot task: a fixed random subset of this size (default: all)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the zero-shot subsets")
    parser.add_argument("--exclude-limits", default=None, metavar="N[,N...]",
                        help="leave out the documents of the --limit N subsets (same seed) before drawing, e.g. "
                             "'200' for a second sample of documents disjoint from the --limit 200 one")
    parser.add_argument("--log-samples", action="store_true",
                        help="keep each zero-shot document's log-likelihoods, metric values and routed cluster, so "
                             "that models scored on the same documents can be compared document by document (igp "
                             "compare --paired)")
    parser.add_argument("--batch-size", type=int, default=16, help="requests (or perplexity windows) per forward pass")
    parser.add_argument("--ppl-max-tokens", type=int, default=None,
                        help="tokens scored per perplexity domain, texts taken in file order (default: all held-out)")
    parser.add_argument("--ppl-window", type=int, default=512, help="tokens per perplexity window")
    parser.add_argument("--speed-repeats", type=int, default=3, help="speed measurements per model (median reported)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for the speed measurement")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy decoding steps timed per speed measurement")
    parser.add_argument("--calibration", default=None, metavar="SPEC",
                        help="also exclude the texts of this calibration SPEC from the held-out text (the calibration "
                             "texts named in each model's igp_run.json are always excluded)")
    parser.add_argument("--calibration-seed", type=int, default=0, help="seed the --calibration texts were drawn with")
    parser.add_argument("--data-dir", default=None,
                        help="benchmark data folder (default: $IGP_DATA_DIR, else ../shared/data from the current "
                             "directory)")
    parser.add_argument("--output-dir", default=None,
                        help=f"write NAME.json per model here instead of DIR/{EVAL_FILE}")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--overwrite", action="store_true", help="recompute parts already in the result file")
    parser.add_argument("--write-tasks", default=None, metavar="DIR",
                        help="only write the offline lm-eval task configs to DIR (for `lm_eval --include_path DIR`) "
                             "and exit")
    parser.set_defaults(func=run)


def result_path(model_dir: str | Path, output_dir: str | Path | None) -> Path:
    """Return the path of the result file of `model_dir`."""
    if output_dir is None:
        return Path(model_dir) / EVAL_FILE
    return Path(output_dir) / f"{Path(model_dir).resolve().name}.json"


def load_result(path: Path, model_dir: str | Path) -> dict:
    """Read an earlier result file, or start a new one."""
    if path.is_file():
        return json.loads(path.read_text())
    return {"model": str(Path(model_dir).resolve()), "perplexity": {}, "zero_shot": {}, "speed": None}


def write_result(result: dict, path: Path) -> None:
    """Write the result atomically, so an interrupted run never leaves a truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    partial.replace(path)


def _parse_exclude_limits(text: str | None) -> tuple[int, ...]:
    """Parse `--exclude-limits 50,200` into (50, 200)."""
    if text is None:
        return ()
    try:
        limits = tuple(int(item) for item in text.split(","))
    except ValueError:
        limits = ()
    if not limits or min(limits) < 1:
        raise UsageError(f"--exclude-limits must be positive subset sizes separated by commas, e.g. 200 or 50,200; "
                         f"got {text!r}.")
    return limits


def _validate(args) -> tuple[list[str], list[str]]:
    from .evaluation import parse_domains, parse_task_names

    for option, value in (("--limit", args.limit), ("--batch-size", args.batch_size),
                          ("--ppl-max-tokens", args.ppl_max_tokens), ("--speed-repeats", args.speed_repeats),
                          ("--prompt-tokens", args.prompt_tokens), ("--new-tokens", args.new_tokens)):
        if value is not None and value < 1:
            raise UsageError(f"{option} must be at least 1, got {value}.")
    if args.ppl_window < 2:
        raise UsageError(f"--ppl-window must be at least 2 tokens, got {args.ppl_window}.")
    args.exclude_limits = _parse_exclude_limits(args.exclude_limits)
    try:
        tasks = [] if args.tasks == "none" else parse_task_names(args.tasks)
        domains = [] if args.ppl == "none" else parse_domains(args.ppl)
    except ValueError as error:
        raise UsageError(str(error)) from error
    for model_dir in args.model:
        config_path = Path(model_dir) / "config.json"
        if not config_path.is_file():
            raise UsageError(f"No saved model in {model_dir} (config.json is missing).")
        # Routing and the per-cluster forward need IGPruningForCausalLM; speed alone also runs a plain causal LM.
        model_type = json.loads(config_path.read_text()).get("model_type")
        if model_type != "igp" and (tasks or domains):
            raise UsageError(
                f"{model_dir} is a {model_type!r} model, not a pruned model (model_type 'igp'). To evaluate a dense "
                f"base model, save it with `igp baseline --method dense --model {model_dir} --output DIR` first "
                "(speed alone, with --tasks none --ppl none --speed, accepts any causal LM)."
            )
    if not (tasks or domains or args.speed):
        raise UsageError("Nothing to evaluate: --tasks none and --ppl none without --speed. Name tasks, domains, or "
                         "add --speed.")
    return tasks, domains


def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from . import evaluation

    if args.write_tasks:
        try:
            folder = evaluation.write_task_configs(args.write_tasks, args.data_dir)
        except FileNotFoundError as error:
            raise UsageError(str(error)) from error
        print(f"Wrote the lm-eval task configs to {folder}; run lm_eval with --include_path {folder}")
        return 0

    tasks, domains = _validate(args)
    try:
        data_dir = evaluation.resolve_data_dir(args.data_dir)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from error

    # Every model is scored on the same held-out text: none that any of them was calibrated on.
    exclude = set()
    if domains:
        for model_dir in args.model:
            exclude |= evaluation.calibration_texts_of(model_dir)
        if args.calibration:
            from .data import load_calibration

            try:
                exclude |= set(load_calibration(args.calibration, seed=args.calibration_seed).texts)
            except (ValueError, FileNotFoundError, KeyError) as error:
                raise UsageError(f"--calibration: {error}") from error
        logger.info("Held-out text excludes %d calibration texts of the %d models", len(exclude), len(args.model))

    # A stored result is reused only if it scored the same held-out texts, so a changed data folder, calibration or
    # held-out count is scored again. The texts are the same for every model.
    ppl_settings = {domain: evaluation.perplexity_settings(evaluation.heldout_texts(domain, data_dir, exclude=exclude),
                                                           args.ppl_window, args.ppl_max_tokens) for domain in domains}
    paths = {model_dir: result_path(model_dir, args.output_dir) for model_dir in args.model}
    for model_dir in args.model:
        _evaluate_quality(model_dir, paths[model_dir], tasks, ppl_settings, exclude, data_dir, args, evaluation)

    if args.speed:
        speed_config = evaluation.SpeedConfig(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                              repeats=args.speed_repeats)
        start = time.perf_counter()
        speeds = evaluation.measure_speed_many(args.model, speed_config, data_dir, device=args.device)
        logger.info("Speed of %d models measured in %.1f s", len(args.model), time.perf_counter() - start)
        for model_dir in args.model:
            result = load_result(paths[model_dir], model_dir)
            result["speed"] = dict(speeds[str(model_dir)], models_in_run=[str(Path(d).resolve()) for d in args.model])
            write_result(result, paths[model_dir])

    for model_dir in args.model:
        print_summary(load_result(paths[model_dir], model_dir))
    return 0


def _evaluate_quality(model_dir, path, tasks, ppl_settings, exclude, data_dir, args, evaluation) -> None:
    """Score perplexity and zero-shot accuracy of one model, skipping parts already in its result file.

    `ppl_settings` maps each requested domain to the `perplexity_settings` a stored result must match."""
    result = load_result(path, model_dir)
    result["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": args.device,
                         "python": platform.python_version()}
    result["command"] = sys.argv
    todo_domains = [domain for domain, settings in ppl_settings.items() if args.overwrite or
                    result["perplexity"].get(domain, {}).get("settings") != settings]
    zero_shot_settings = {"limit": args.limit, "seed": args.seed}
    if args.exclude_limits:
        zero_shot_settings["exclude_limits"] = list(args.exclude_limits)
    todo_tasks = [task for task in tasks if args.overwrite or
                  result["zero_shot"].get(task, {}).get("settings") != zero_shot_settings or
                  (args.log_samples and "samples" not in result["zero_shot"][task])]
    if not todo_domains and not todo_tasks:
        logger.info("%s: every requested result is already in %s", model_dir, path)
        return

    model, tokenizer = evaluation.load_for_eval(model_dir, args.device)
    if todo_domains:
        start = time.perf_counter()
        scores = evaluation.evaluate_perplexity(model, tokenizer, todo_domains, data_dir, exclude=exclude,
                                                max_tokens=args.ppl_max_tokens, window=args.ppl_window,
                                                batch_size=args.batch_size)
        result["perplexity"].update(scores)
        result.setdefault("wall_time_s", {})["perplexity"] = round(time.perf_counter() - start, 1)
        write_result(result, path)

    if todo_tasks:
        start = time.perf_counter()
        lm = _lm_eval_model(model, tokenizer, args.batch_size, evaluation)
        # Each task is written as soon as it finishes, so an interrupted run keeps the finished ones.
        for task in todo_tasks:
            config = evaluation.ZeroShotConfig(tasks=(task,), limit=args.limit, seed=args.seed,
                                               exclude_limits=args.exclude_limits,
                                               batch_size=args.batch_size, log_samples=args.log_samples)
            scores = evaluation.evaluate_zero_shot(lm, config, data_dir)[task]
            scores["settings"] = zero_shot_settings
            result["zero_shot"][task] = scores
            write_result(result, path)
        if getattr(lm, "routing_seconds", None) is not None:
            result["zero_shot_routing_s"] = round(lm.routing_seconds, 2)
        result.setdefault("wall_time_s", {})["zero_shot"] = round(time.perf_counter() - start, 1)
        write_result(result, path)


def _lm_eval_model(model, tokenizer, batch_size, evaluation):
    if getattr(model.config, "model_type", None) == "igp":
        return evaluation.IGPruningLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return evaluation.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def print_summary(result: dict) -> None:
    """Print one model's figures as aligned lines."""
    print(f"== {result['model']}")
    for domain, entry in result.get("perplexity", {}).items():
        print(f"  ppl {domain:<14} {entry['perplexity']:10.3f}   ({entry['num_tokens']} tokens, {entry['num_texts']} texts)")
    for task, entry in result.get("zero_shot", {}).items():
        figures = []
        for metric in ("acc", "acc_norm", "perplexity"):
            if metric in entry:
                stderr = entry.get(f"{metric}_stderr")
                figures.append(f"{metric} {entry[metric]:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
        print(f"  {task:<18} {', '.join(figures)}   (n={entry['num_docs']})")
    speed = result.get("speed")
    if speed:
        for key, entry in speed.items():
            if key.startswith("batch_"):
                print(f"  speed {key:<9} prefill {entry['prefill_tokens_per_s']:8.1f} tok/s, decode "
                      f"{entry['decode_tokens_per_s']:7.1f} tok/s, KV cache {entry['kv_cache_bytes'] / 2**20:.2f} MiB, "
                      f"router {entry['router_ms']:.1f} ms")
        print(f"  peak memory {speed['peak_memory_bytes'] / 2**20:.0f} MiB, weights {speed['weight_bytes'] / 2**20:.0f} MiB")
