"""Write calibration texts in the format of the zero-shot tasks, from documents the evaluation never scores.

Each text is one or more solved examples of one task, as lm-eval prompts them: the context the model reads and the
gold continuation, several examples joined by a blank line while they fit in `--max-chars`. The documents come from
the same evaluation files as the zero-shot scores, so every document in the seeded subset that `igp eval --limit L`
scores (for each L of `--exclude-limits`) is left out, and the script checks that no excluded document slipped in.

    .venv/bin/python benchmarks/task_calibration.py --output runs/task_calibration.jsonl
    igp prune --calibration "$CALIBRATION,runs/task_calibration.jsonl:text" ...

Each output line contains `text`, `task` and `doc_ids` (the document indices the text was built from).
"""

import argparse
import json
import logging
import random
import tempfile
from pathlib import Path

from igp_training.evaluation import ZERO_SHOT_TASKS, ZeroShotConfig, build_tasks, seeded_subset, write_task_configs

logger = logging.getLogger("task_calibration")


def gold_text(task, doc, doc_id: int) -> str:
    """Return the context and gold continuation of one document, as lm-eval's request for the gold choice contains them."""
    context = task.fewshot_context(doc, 0)
    requests = task.construct_requests(doc, context, metadata=(task.config.task, doc_id, 1))
    if not isinstance(requests, list):
        requests = [requests]

    if task.OUTPUT_TYPE == "loglikelihood":
        gold = 0
    else:
        # With several contexts and one continuation (WinoGrande), lm-eval reads the gold index from doc_to_text.
        gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
        if isinstance(gold, str):
            gold = task.doc_to_choice(doc).index(gold)
    prompt, continuation = requests[gold].arguments[:2]
    return prompt + continuation


def last_chars(text: str, max_chars: int) -> str:
    """Keep the end of a text that is too long, cut at a word boundary, so that the gold continuation survives truncation."""
    if len(text) <= max_chars:
        return text
    tail = text[-max_chars:]
    return tail.split(" ", 1)[-1] if " " in tail else tail


def pack(examples: list[tuple[int, str]], num_texts: int, max_chars: int) -> list[dict]:
    """Join consecutive examples into at most `num_texts` texts of at most `max_chars` characters each."""
    texts, current, ids = [], [], []
    for doc_id, example in examples:
        example = last_chars(example, max_chars)
        if current and len("\n\n".join(current + [example])) > max_chars:
            texts.append({"text": "\n\n".join(current), "doc_ids": ids})
            current, ids = [], []
            if len(texts) == num_texts:
                return texts
        current.append(example)
        ids.append(doc_id)
    if current and len(texts) < num_texts:
        texts.append({"text": "\n\n".join(current), "doc_ids": ids})
    return texts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="JSONL file to write.")
    parser.add_argument("--data-dir", default=None, help="Benchmark data folder (default: $IGP_DATA_DIR or ../shared/data).")
    parser.add_argument("--tasks", default="all", help="Comma-separated zero-shot tasks, or 'all'.")
    parser.add_argument("--texts-per-task", type=int, default=16, help="Calibration texts written for each task.")
    parser.add_argument("--max-chars", type=int, default=480,
                        help="Maximum characters of a text; 480 is about the 128 tokens mask learning reads.")
    parser.add_argument("--exclude-limits", default="50,200",
                        help="Comma-separated `igp eval --limit` values whose scored documents are left out.")
    parser.add_argument("--eval-seed", type=int, default=ZeroShotConfig.seed,
                        help="The `igp eval` seed of those subsets.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the draw among the remaining documents.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    names = list(ZERO_SHOT_TASKS) if args.tasks == "all" else [name.strip() for name in args.tasks.split(",")]
    limits = [int(limit) for limit in args.exclude_limits.split(",") if limit.strip()]
    _, tasks = build_tasks(names, write_task_configs(tempfile.mkdtemp(prefix="igp-tasks-"), args.data_dir))

    rows = []
    for name, task in tasks.items():
        docs = task.eval_docs
        excluded = set()
        for limit in limits:
            excluded.update(seeded_subset(len(docs), limit, args.eval_seed, name))
        candidates = seeded_subset(len(docs), None, args.eval_seed, name, exclude_limits=tuple(limits))
        random.Random(f"{args.seed}:{name}").shuffle(candidates)

        # Enough documents for the texts even if each contains one example.
        chosen = candidates[: args.texts_per_task * 8]
        examples = [(index, gold_text(task, docs[index], index)) for index in chosen]
        texts = pack(examples, args.texts_per_task, args.max_chars)
        used = [index for text in texts for index in text["doc_ids"]]
        if excluded.intersection(used):
            overlap = sorted(excluded.intersection(used))[:5]
            raise RuntimeError(f"{name}: documents {overlap} are in an evaluated subset; the exclusion is broken, so "
                               "no file was written.")
        logger.info("%s: %d texts from %d documents (%d of %d documents excluded)", name, len(texts), len(used),
                    len(excluded), len(docs))
        rows.extend({"text": text["text"], "task": name, "doc_ids": text["doc_ids"]} for text in texts)

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    logger.info("Wrote %d texts to %s", len(rows), output)


if __name__ == "__main__":
    main()
