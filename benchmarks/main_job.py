"""Held-out evaluation of an `igp prune` run: Hamming distances between masks and the N x N perplexity matrix.

Row i of the matrix contains the held-out texts that the saved router sends to cluster i; column j runs them with mask j.
Input guidance works when the diagonal is the lowest value of most rows. A dense column (the base model, every block
run) is added for scale.

The held-out texts are drawn again from the run's own calibration SPEC, seed and held-out count (read from its
`igp_run.json`), so they are exactly the texts that calibration left out.

    python benchmarks/main_job.py --run DIR [--base MODEL] [--max-tokens 256] [--output results.json]
"""

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from igp_training.data import load_calibration
from igp_training.pipeline import hamming_distances, load_base_model
from modeling_igp import IGPruningForCausalLM

logger = logging.getLogger("main_job")


@torch.no_grad()
def sequence_nll(model, token_ids: list[list[int]], pad_token_id: int, **mask_kwargs) -> list[tuple[float, int]]:
    """Return (summed next-token NLL in nats, number of scored tokens) for each right-padded sequence of a batch."""
    length = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1

    logits = model(input_ids, attention_mask=attention_mask, use_cache=False, **mask_kwargs).logits.float()
    log_probs = F.log_softmax(logits[:, :-1], dim=-1)
    token_nll = -log_probs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    scored = attention_mask[:, 1:].bool()
    return [(float(token_nll[row][scored[row]].double().sum()), int(scored[row].sum())) for row in range(len(token_ids))]


def perplexity_matrix(model, base, tokenizer, texts, routed, max_tokens: int, batch_size: int) -> dict:
    """Compute perplexity for every (routed cluster i, mask j) pair, plus the dense base model per row."""
    num_clusters = model.config.num_clusters
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    token_ids = [tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens] for text in texts]
    keep = [index for index, ids in enumerate(token_ids) if len(ids) >= 2]

    nll = np.zeros((num_clusters, num_clusters + 1))  # last column: dense
    tokens = np.zeros((num_clusters, num_clusters + 1), dtype=np.int64)
    for column in tqdm(range(num_clusters + 1), desc="masks"):
        for start in range(0, len(keep), batch_size):
            batch = keep[start : start + batch_size]
            ids = [token_ids[index] for index in batch]
            if column == num_clusters:
                results = sequence_nll(base, ids, pad_token_id)
            else:
                results = sequence_nll(model, ids, pad_token_id, cluster_ids=torch.full((len(ids),), column))
            for index, (nll_sum, count) in zip(batch, results):
                nll[routed[index], column] += nll_sum
                tokens[routed[index], column] += count

    with np.errstate(invalid="ignore", divide="ignore"):
        perplexity = np.exp(nll / tokens)
    return {"perplexity": perplexity, "tokens": tokens[:, 0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="output folder of `igp prune`")
    parser.add_argument("--base", default=None, help="base model of the run (default: the packaged SmolLM2)")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens scored per held-out text (its first ones)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--output", default=None, help="JSON file for the results (default: RUN/main_job.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(0)

    run_dir = Path(args.run)
    record = json.loads((run_dir / "igp_run.json").read_text())
    settings = record["settings"]["prune"]

    start = time.perf_counter()
    texts = load_calibration(record["calibration"]["spec"], seed=settings["seed"],
                             heldout_per_source=settings["heldout_per_source"])
    if not texts.heldout_texts:
        raise SystemExit(f"The run in {run_dir} kept no held-out texts (heldout_per_source=0); rerun with --heldout.")
    model = IGPruningForCausalLM.from_pretrained(run_dir).eval()
    base, tokenizer = load_base_model(args.base if args.base is not None else settings["model"])
    routed = model.route(texts.heldout_texts).tolist()
    logger.info("Routed %d held-out texts in %.1f s", len(routed), time.perf_counter() - start)

    start = time.perf_counter()
    matrix = perplexity_matrix(model, base, tokenizer, texts.heldout_texts, routed, args.max_tokens, args.batch_size)
    seconds = time.perf_counter() - start
    num_clusters = model.config.num_clusters
    perplexity = matrix["perplexity"]

    rows_with_texts = [row for row in range(num_clusters) if matrix["tokens"][row] > 0]
    # A row counts when no mask beats its own; identical masks give ties, which are listed apart.
    diagonal_lowest = [row for row in rows_with_texts if perplexity[row, row] <= perplexity[row, :num_clusters].min()]
    tied = [row for row in diagonal_lowest if (perplexity[row, :num_clusters] == perplexity[row, row]).sum() > 1]
    routing = {}
    for source, cluster in zip(texts.heldout_sources, routed):
        routing.setdefault(source, [0] * num_clusters)[cluster] += 1

    results = {
        "run": str(run_dir),
        "num_heldout_texts": len(routed),
        "max_tokens_per_text": args.max_tokens,
        "hamming_distances": hamming_distances(model.config.mask_bank),
        "perplexity": [[None if math.isnan(value) else round(float(value), 3) for value in row] for row in perplexity],
        "columns": [f"mask {j}" for j in range(num_clusters)] + ["dense"],
        "scored_tokens_per_row": matrix["tokens"].tolist(),
        "heldout_routing": routing,
        "rows_with_texts": rows_with_texts,
        "rows_with_lowest_diagonal": diagonal_lowest,
        "rows_with_lowest_diagonal_tied": tied,
        "seconds": round(seconds, 1),
    }
    output = Path(args.output) if args.output else run_dir / "main_job.json"
    output.write_text(json.dumps(results, indent=1) + "\n")
    logger.info("Perplexity matrix in %.1f s; written to %s", seconds, output)
    print(markdown_tables(results))


def markdown_tables(results: dict) -> str:
    """Format the Hamming distances and the perplexity matrix as Markdown tables."""
    hamming = results["hamming_distances"]
    num_clusters = len(hamming)
    lines = ["Hamming distances between masks (blocks on which two masks differ):", "",
             "| | " + " | ".join(f"mask {j}" for j in range(num_clusters)) + " |",
             "|---" * (num_clusters + 1) + "|"]
    lines += [f"| mask {i} | " + " | ".join(str(value) for value in row) + " |" for i, row in enumerate(hamming)]

    lines += ["", "Held-out perplexity (row: texts routed to cluster i, column: mask j; lowest of each row in bold):", "",
              "| routed to | tokens | " + " | ".join(results["columns"]) + " |",
              "|---" * (num_clusters + 3) + "|"]
    for i, row in enumerate(results["perplexity"]):
        tokens = results["scored_tokens_per_row"][i]
        if tokens == 0:
            lines.append(f"| cluster {i} | 0 | " + " | ".join("-" for _ in row) + " |")
            continue
        lowest = min(row[:num_clusters])
        cells = [f"**{value:.2f}**" if j < num_clusters and value == lowest else f"{value:.2f}"
                 for j, value in enumerate(row)]
        lines.append(f"| cluster {i} | {tokens} | " + " | ".join(cells) + " |")
    tied = results["rows_with_lowest_diagonal_tied"]
    lines += ["", f"Diagonal lowest in {len(results['rows_with_lowest_diagonal'])} of "
                  f"{len(results['rows_with_texts'])} rows with held-out texts"
                  + (f" ({len(tied)} of them tied with an identical mask)." if tied else ".")]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
