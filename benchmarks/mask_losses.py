"""Score static masks on calibration texts by next-token loss and by KL divergence from the dense model.

Each mask runs the dense weights with `block_mask`, so no model folder per mask is needed. The KL divergence is
KL(dense || masked) of the next-token distributions, the loss that distillation to the dense logits would minimise.
Both are printed in nats per predicted token, over all texts and per calibration source.

    .venv/bin/python benchmarks/mask_losses.py --calibration "$CALIBRATION" \
        --mask static-l0=12,14,18,28,44,50,52,56 --mask swap=12,14,16,18,28,44,50,52
"""

import argparse
import logging
from collections import defaultdict

import torch
import torch.nn.functional as F
from tqdm import tqdm

from igp_training.data import load_calibration
from igp_training.pipeline import load_base_model
from modeling_igp import IGPruningForCausalLM

logger = logging.getLogger("mask_losses")


def parse_mask(spec: str, num_blocks: int) -> tuple[str, torch.BoolTensor]:
    """Turn NAME=B1,B2,... (the skipped block indices) into a name and a keep mask [num_blocks]."""
    name, separator, blocks = spec.partition("=")
    if not separator or not name:
        raise SystemExit(f"Invalid --mask {spec!r}: expected NAME=SKIPPED_BLOCKS, for example static=12,14,18.")
    keep = torch.ones(num_blocks, dtype=torch.bool)
    for block in filter(None, blocks.split(",")):
        if not block.strip().isdigit() or int(block) >= num_blocks:
            raise SystemExit(f"Invalid block {block!r} in --mask {spec!r}: give indices from 0 to {num_blocks - 1}.")
        keep[int(block)] = False
    return name, keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration", required=True, help="calibration SPEC, as for `igp prune`")
    parser.add_argument("--mask", action="append", required=True, metavar="NAME=SKIPPED_BLOCKS",
                        help="a mask to score, as its skipped block indices (block 2i: attention of layer i, "
                             "2i + 1: its MLP); repeat for several")
    parser.add_argument("--model", default=None, help="base model (default: the packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--seq-length", type=int, default=128, help="tokens per text (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default: 0)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    base, tokenizer = load_base_model(args.model)
    num_blocks = 2 * base.config.num_hidden_layers
    masks = dict(parse_mask(spec, num_blocks) for spec in args.mask)
    model = IGPruningForCausalLM.from_base(base, [[1] * num_blocks]).eval()
    calibration = load_calibration(args.calibration, seed=args.seed)
    logger.info("Scoring %d masks on %d calibration texts", len(masks), len(calibration.texts))

    # totals[mask][source] = [summed next-token loss, summed KL, predicted tokens]
    totals = {name: defaultdict(lambda: [0.0, 0.0, 0]) for name in masks}
    dense_keep = torch.ones(1, num_blocks, dtype=torch.bool)
    with torch.no_grad():
        for text, source in tqdm(zip(calibration.texts, calibration.sources), total=len(calibration.texts),
                                 desc="texts"):
            input_ids = tokenizer(text, truncation=True, max_length=args.seq_length, return_tensors="pt").input_ids
            if input_ids.shape[1] < 2:
                continue
            targets = input_ids[0, 1:]
            dense_log_probs = model(input_ids, block_mask=dense_keep, use_cache=False).logits[0, :-1].log_softmax(-1)
            for name, keep in masks.items():
                log_probs = model(input_ids, block_mask=keep[None], use_cache=False).logits[0, :-1].log_softmax(-1)
                row = totals[name][source]
                row[0] -= log_probs.gather(-1, targets[:, None]).sum().item()
                row[1] += F.kl_div(log_probs, dense_log_probs, log_target=True, reduction="sum").item()
                row[2] += targets.numel()

    sources = list(dict.fromkeys(calibration.sources))
    print("| mask | measure | all | " + " | ".join("/".join(source.split("/")[-2:]) for source in sources) + " |")
    print("|---|---|---|" + "---|" * len(sources))
    for name, per_source in totals.items():
        tokens = sum(row[2] for row in per_source.values())
        for column, measure in ((0, "next-token loss"), (1, "KL from dense")):
            overall = sum(row[column] for row in per_source.values()) / tokens
            cells = [f"{per_source[source][column] / per_source[source][2]:.4f}" for source in sources]
            print(f"| {name} | {measure} | {overall:.4f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
