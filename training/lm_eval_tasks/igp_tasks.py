"""Document loaders and preprocessing for the offline lm-eval tasks in this folder.

Each function turns a local copy of a benchmark into the fields that lm-eval's own task of the same name reads, so
the prompts, choices and metrics match lm-eval's `hellaswag`, `piqa`, `arc_easy`, `arc_challenge`, `winogrande`,
`boolq` and `openbookqa`. Only the standard library and `datasets` are used: lm-eval imports this file by path.
"""

import json
import re

import datasets


# -- HellaSwag ------------------------------------------------------------------------------------------------------

HELLASWAG_LINES_PER_EXAMPLE = 6


def _clean_hellaswag(text: str) -> str:
    """Strip WikiHow bracket markup the way lm-eval's `hellaswag` preprocessing does."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def process_hellaswag(dataset: datasets.Dataset) -> datasets.Dataset:
    """Group the text file's lines into examples: context, gold label, then 4 endings.

    NOTE: this file stores `ctx_a + " " + ctx_b` without the capitalisation of `ctx_b` that lm-eval applies, so
    scores can differ from lm-eval's `hellaswag` by a few tenths of a point.
    """
    lines = dataset["text"]
    if len(lines) % HELLASWAG_LINES_PER_EXAMPLE:
        raise ValueError(
            f"The HellaSwag text file has {len(lines)} lines, not a multiple of {HELLASWAG_LINES_PER_EXAMPLE}: "
            "it must hold one context line, one label line and 4 ending lines per example."
        )
    examples = {"query": [], "choices": [], "label": []}
    for start in range(0, len(lines), HELLASWAG_LINES_PER_EXAMPLE):
        context, label, *endings = lines[start : start + HELLASWAG_LINES_PER_EXAMPLE]
        examples["query"].append(_clean_hellaswag(context))
        examples["choices"].append([_clean_hellaswag(ending) for ending in endings])
        examples["label"].append(int(label))
    return datasets.Dataset.from_dict(examples)


# -- PIQA -----------------------------------------------------------------------------------------------------------


def load_piqa(data_files: dict, **metadata) -> datasets.DatasetDict:
    """Join PIQA's question file with its label file (line i of the labels is the answer to line i)."""
    with open(data_files["test"], encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    with open(data_files["labels"], encoding="utf-8") as handle:
        labels = [int(line) for line in handle if line.strip()]
    if len(records) != len(labels):
        raise ValueError(
            f"PIQA has {len(records)} questions in {data_files['test']} but {len(labels)} labels in "
            f"{data_files['labels']}; use the label file that belongs to the question file."
        )
    rows = {
        "goal": [record["goal"] for record in records],
        "sol1": [record["sol1"] for record in records],
        "sol2": [record["sol2"] for record in records],
        "label": labels,
    }
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)})


# -- ARC and OpenBookQA: the AI2 jsonl format --------------------------------------------------------------------


def _ai2_question(record: dict) -> dict:
    """Flatten an AI2 record into the fields of the hub datasets: question text, choices {text, label}, answer."""
    choices = record["question"]["choices"]
    return {
        "id": record["id"],
        "question": record["question"]["stem"],
        "choices": {"text": [choice["text"] for choice in choices], "label": [choice["label"] for choice in choices]},
        "answerKey": record["answerKey"],
    }


def process_arc(dataset: datasets.Dataset) -> datasets.Dataset:
    """Turn AI2 ARC records into the fields of `allenai/ai2_arc` (the retrieved `para` of each choice is dropped)."""
    return datasets.Dataset.from_list([_ai2_question(record) for record in dataset])


def load_arc_challenge(data_files: dict, **metadata) -> datasets.DatasetDict:
    """Merge ARC-Challenge copies by question id, in the order of the answer key, and check every answer."""
    questions = {}
    for path in data_files["test"]:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    record = json.loads(line)
                    questions.setdefault(record["id"], record)

    with open(data_files["key"], encoding="utf-8") as handle:
        key = [json.loads(line) for line in handle if line.strip()]
    missing = [entry["id"] for entry in key if entry["id"] not in questions]
    if missing:
        raise ValueError(f"ARC-Challenge question {missing[0]} of the answer key is in none of {data_files['test']}.")

    rows = []
    for entry in key:
        record = questions[entry["id"]]
        if record.get("answerKey", entry["answerKey"]) != entry["answerKey"]:
            raise ValueError(
                f"ARC-Challenge question {entry['id']} has answer {record['answerKey']!r} but the key says "
                f"{entry['answerKey']!r}."
            )
        rows.append(_ai2_question(dict(record, answerKey=entry["answerKey"])))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_openbookqa(dataset: datasets.Dataset) -> datasets.Dataset:
    """Turn OpenBookQA records into the fields of `allenai/openbookqa`: question_stem, choices, answerKey."""
    rows = []
    for record in dataset:
        row = _ai2_question(record)
        row["question_stem"] = row.pop("question")
        rows.append(row)
    return datasets.Dataset.from_list(rows)


# -- WinoGrande and BoolQ --------------------------------------------------------------------------------------------


def winogrande_gold(doc: dict) -> int:
    """Return the gold option: with several contexts and one continuation, lm-eval takes the target index here."""
    return int(doc["gold"])


def process_boolq(dataset: datasets.Dataset) -> datasets.Dataset:
    """Turn the string labels "true"/"false" into the choice index (1 = yes, 0 = no)."""

    def to_index(doc):
        label = doc["label"]
        if isinstance(label, str):
            if label not in ("true", "false"):
                raise ValueError(f"BoolQ label {label!r} of question {doc['question']!r} is neither 'true' nor 'false'.")
            return {"label": int(label == "true")}
        return {"label": int(label)}

    return dataset.map(to_index)
