"""Split the paired zero-shot difference of an input-guided model from a reference by the cluster each document
routed to.

Both models must be evaluated with `igp eval --log-samples` on the same documents. When every task has the same
number of documents, each document weighs the same in the mean over tasks. A cluster's contribution is then the sum of
its documents' differences divided by all documents, and the contributions add up to the overall difference.

    .venv/bin/python benchmarks/zero_shot_by_cluster.py runs/bench/igp-n8lx-0.125 runs/bench/static-l0-0.125 \\
        --eval-dir runs/bench/eval-first --eval-dir runs/bench/eval-second
"""

import argparse
import json
import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from igp_training.compare_cmd import MAIN_METRIC, load_evaluation
from igp_training.pipeline import block_names


def document_differences(model: dict, reference: dict) -> list[tuple[str, int, int, float]]:
    """Return (task, document, cluster, difference of the task's main metric) for every document both scored."""
    rows = []
    for task, metric in MAIN_METRIC.items():
        if task not in model["zero_shot"] or task not in reference["zero_shot"]:
            continue
        reference_values = {sample["doc_id"]: sample["metrics"][metric]
                            for sample in reference["zero_shot"][task].get("samples", [])}
        for sample in model["zero_shot"][task].get("samples", []):
            if "cluster" not in sample:
                raise SystemExit(f"{task} document {sample['doc_id']} has no routed cluster. Evaluate the model again "
                                 "with `igp eval --log-samples`, which logs the cluster of a model with several.")
            if sample["doc_id"] in reference_values:
                rows.append((task, sample["doc_id"], sample["cluster"],
                             sample["metrics"][metric] - reference_values[sample["doc_id"]]))
    if not rows:
        raise SystemExit("The two models share no zero-shot document with logged samples.")
    return rows


def mask_changes(mask: list[int], reference: list[int], names: list[str]) -> str:
    """Return the blocks a mask runs or skips unlike the reference mask, such as 'skip L8.attn, run L28.attn'."""
    changes = [("run " if keep else "skip ") + names[block]
               for block, (keep, other) in enumerate(zip(mask, reference)) if keep != other]
    return ", ".join(changes) or "same mask"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="folder of the input-guided model")
    parser.add_argument("reference", type=Path, help="folder of a one-mask reference model, such as static L0")
    parser.add_argument("--eval-dir", type=Path, action="append",
                        help="igp eval output folder; give it twice to pool two disjoint samples")
    args = parser.parse_args()

    model_config = json.loads((args.model / "config.json").read_text())
    reference_config = json.loads((args.reference / "config.json").read_text())
    bank, reference_mask = model_config["mask_bank"], reference_config["mask_bank"][0]
    names = block_names(len(reference_mask) // 2)
    rows = document_differences(load_evaluation(args.model, args.eval_dir),
                                load_evaluation(args.reference, args.eval_dir))

    total = len(rows)
    counts = Counter(task for task, *_ in rows)
    if len(set(counts.values())) > 1:
        print(f"NOTE: the tasks have different document counts ({dict(counts)}), so the contributions below weigh "
              "documents equally and do not add up to the mean over tasks.\n")
    print(f"{args.model.name} against {args.reference.name}: {100 * statistics.mean(d for *_, d in rows):+.2f} "
          f"points over {total} documents\n")
    print("| cluster | documents | most frequent tasks | difference (points) | contribution (points) | mask against the "
          "reference |")
    print("|---|---|---|---|---|---|")
    by_cluster = defaultdict(list)
    for task, _, cluster, difference in rows:
        by_cluster[cluster].append((task, difference))
    for cluster in sorted(by_cluster):
        differences = [difference for _, difference in by_cluster[cluster]]
        stderr = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else float("nan")
        tasks = ", ".join(f"{task} {count}" for task, count in Counter(t for t, _ in by_cluster[cluster]).most_common(3))
        print(f"| {cluster} | {len(differences)} | {tasks} | {100 * statistics.mean(differences):+.1f} ± "
              f"{100 * stderr:.1f} | {100 * sum(differences) / total:+.2f} | "
              f"{mask_changes(bank[cluster], reference_mask, names)} |")


if __name__ == "__main__":
    main()
