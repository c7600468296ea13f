"""Per-cluster mask refinement: a local search that checks the learned masks against each cluster's real loss.

L0 training ranks blocks through sampled gates, and with few examples per cluster the binarised masks near the cut
are noisy. This step measures the loss instead. Candidates are scored on a seeded sample of the cluster's own
calibration examples: first the bank's other masks, then swaps of one kept block for one skipped block near the cut.
Near the cut means the kept blocks with the lowest gate scores and the skipped blocks with the highest. The cluster
takes the best candidate as long as it lowers the loss by at least `min_improvement`. A swap never lowers the skipped
cost, so every refined mask still meets the sparsity target.
"""

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .l0 import _dense_igp_model, pad_batch
from .sparsity import DEFAULT_CONTEXT_LENGTH, SPARSITY_UNITS, block_costs


logger = logging.getLogger(__name__)


@dataclass
class MaskRefinementConfig:
    """Settings of `refine_masks`."""

    rounds: int = 2
    """Swap rounds per cluster. Each round scores every candidate swap and applies the best one, and 0 turns swaps
    off."""

    window: int = 3
    """Blocks on each side of the cut that may swap: the `window` kept blocks with the lowest gate scores and the
    `window` skipped blocks with the highest, so one round scores up to `window ** 2` swaps."""

    use_bank: bool = True
    """Score the bank's other masks for each cluster before the swaps, and start from the one with the lowest loss
    if it beats the cluster's own mask by `min_improvement`. Masks that skip less cost than the cluster's own are not
    candidates."""

    max_examples: int = 16
    """Calibration examples per cluster (seeded sample) on which candidates are scored. Each candidate costs one
    forward pass over them, so this sets the run time."""

    min_improvement: float = 0.002
    """Relative decrease of the mean next-token loss that a candidate needs to replace the current mask, so that
    differences within noise do not move a mask."""

    batch_size: int = 8
    """Examples per forward pass."""

    sparsity_unit: str = "blocks"
    """Unit that costs the blocks, as in `MaskLearningConfig`. A swap may not lower the skipped cost in it."""

    context_length: int = DEFAULT_CONTEXT_LENGTH
    """Keys per token when costing blocks in FLOPs."""

    seed: int = 0
    """Seed of the example sample."""

    def __post_init__(self):
        for name in ("rounds", "window", "max_examples", "batch_size"):
            minimum = 0 if name == "rounds" else 1
            if getattr(self, name) < minimum:
                raise ValueError(f"{name} must be at least {minimum}, got {getattr(self, name)}.")
        if not 0 <= self.min_improvement < 1:
            raise ValueError(f"min_improvement must be in [0, 1) (a relative loss decrease), got {self.min_improvement}.")
        if self.sparsity_unit not in SPARSITY_UNITS:
            raise ValueError(f"sparsity_unit must be one of {', '.join(SPARSITY_UNITS)}, got {self.sparsity_unit!r}.")


@dataclass
class MaskRefinementResult:
    """
    Outcome of `refine_masks`.

    Args:
        mask_bank: the refined N masks of 2L 0/1 ints.
        clusters: one record per cluster: `examples`, `initial_loss`, `final_loss`, `start` (the bank index of the
            mask it started the swaps from) and `swaps` (`{"skip", "run", "loss"}` per applied swap, block indices).
        candidates_scored: masks scored, each by one pass over its cluster's sample, the starting masks included.
        wall_time_s: seconds for the whole call.
        config: the settings, as a dict.
    """

    mask_bank: list[list[int]]
    clusters: list[dict] = field(default_factory=list)
    candidates_scored: int = 0
    wall_time_s: float = 0.0
    config: dict = field(default_factory=dict)


def refine_masks(model, dataset, mask_bank, gate_scores, config: MaskRefinementConfig | None = None,
                 num_clusters: int | None = None) -> MaskRefinementResult:
    """
    Refine each cluster's mask by the real loss on its own calibration examples.

    Args:
        model: the dense base model (every block's weights), or an `IGPruningForCausalLM` that keeps every block.
        dataset: rows with `input_ids`, `labels` and `cluster_ids`, as for `learn_masks`.
        mask_bank: N masks of 2L 0/1 ints to start from.
        gate_scores: [N][2L] scores ranking the blocks of each cluster (higher = keep), such as the final log-alpha
            of mask learning. They only choose which blocks near the cut may swap.
        config: the settings.
        num_clusters: N; defaults to the number of masks.
    """
    config = config or MaskRefinementConfig()
    start = time.perf_counter()
    igp_model = _dense_igp_model(model).eval()
    bank = torch.as_tensor(mask_bank, dtype=torch.bool)
    scores = torch.as_tensor(gate_scores, dtype=torch.float64)
    num_clusters = num_clusters or bank.shape[0]
    if bank.shape != (num_clusters, igp_model.config.num_blocks) or scores.shape != bank.shape:
        raise ValueError(
            f"mask_bank {tuple(bank.shape)} and gate_scores {tuple(scores.shape)} must both be [N, 2L] = "
            f"[{num_clusters}, {igp_model.config.num_blocks}]."
        )
    costs = block_costs(igp_model.config.text_config, config.sparsity_unit, config.context_length).double()

    cluster_column = torch.as_tensor([int(cluster) for cluster in dataset["cluster_ids"]])
    generator = torch.Generator().manual_seed(config.seed)
    refined, records, scored = bank.clone(), [], 0
    for cluster in range(num_clusters):
        members = (cluster_column == cluster).nonzero().flatten()
        if members.numel() == 0:
            logger.warning("Cluster %d has no calibration examples; its mask is kept as it is.", cluster)
            records.append({"examples": 0, "initial_loss": None, "final_loss": None, "start": cluster, "swaps": []})
            continue
        # NOTE: candidates are scored on texts the gates were trained on, and the best of about 20 is kept, so the
        # logged loss decrease is in-sample and overstates the held-out gain.
        sample = members[torch.randperm(members.numel(), generator=generator)[:config.max_examples]].tolist()
        batches = _length_sorted_batches([dataset[index] for index in sample], config.batch_size)

        def loss_of(keep, prefix=None, first_block=0):
            nonlocal scored
            scored += 1
            return _mean_loss(igp_model, batches, keep, prefix, first_block)[0]

        # The swaps start from the cluster's own mask, or from the bank's best other mask if that scores better.
        keep, start_index = bank[cluster].clone(), cluster
        scored += 1
        current, prefix = _mean_loss(igp_model, batches, keep, keep_states=True)
        initial = current
        if config.use_bank:
            own_cost = _skipped_cost(keep, costs)
            others = [index for index in _distinct_others(bank, cluster)
                      if _skipped_cost(bank[index], costs) >= own_cost - 1e-9]
            if others:
                loss, index = min((loss_of(bank[index]), index) for index in others)
                if loss < current * (1 - config.min_improvement):
                    keep, start_index, current = bank[index].clone(), index, loss
                    prefix = _mean_loss(igp_model, batches, keep, keep_states=True)[1]

        swaps = []
        for round_index in range(config.rounds):
            best = None
            for skip, run in tqdm(_candidate_swaps(keep, scores[cluster], costs, config.window),
                                  desc=f"refine cluster {cluster}", leave=False):
                candidate = keep.clone()
                candidate[skip], candidate[run] = False, True
                # Blocks before the first swapped one compute what they did for `keep`, so scoring resumes there.
                loss = loss_of(candidate, prefix, min(skip, run))
                if best is None or loss < best[0]:
                    best = (loss, skip, run)
            if best is None or best[0] >= current * (1 - config.min_improvement):
                break
            current, skip, run = best
            keep[skip], keep[run] = False, True
            swaps.append({"skip": skip, "run": run, "loss": current})
            if round_index + 1 < config.rounds:
                prefix = _mean_loss(igp_model, batches, keep, keep_states=True)[1]

        refined[cluster] = keep
        records.append({"examples": len(sample), "initial_loss": initial, "final_loss": current, "start": start_index,
                        "swaps": swaps})
        logger.info("Refined cluster %d on %d examples: loss %.4f -> %.4f (start from mask %d, %d swaps)", cluster,
                    len(sample), initial, current, start_index, len(swaps))

    return MaskRefinementResult(
        mask_bank=refined.int().tolist(), clusters=records, candidates_scored=scored,
        wall_time_s=time.perf_counter() - start, config=asdict(config),
    )


def _candidate_swaps(keep: torch.BoolTensor, scores: torch.Tensor, costs: torch.Tensor, window: int):
    """
    Return up to `window ** 2` (skip, run) pairs nearest the cut whose swap does not lower the skipped cost.

    A pair's distance from the cut is the larger of two ranks: that of `skip` among the kept blocks (lowest score
    first) and that of `run` among the skipped blocks (highest score first). With equal costs this gives the
    `window` x `window` square. With unequal costs, pairs that would lower the skipped cost are left out before the
    nearest ones are taken, so a narrow window cannot end up empty while valid swaps exist.
    """
    kept = keep.nonzero().flatten()
    skipped = (~keep).nonzero().flatten()
    kept = kept[scores[kept].argsort(stable=True)].tolist()
    skipped = skipped[scores[skipped].argsort(descending=True, stable=True)].tolist()
    pairs = [(max(kept_rank, skipped_rank), kept_rank + skipped_rank, skip, run)
             for kept_rank, skip in enumerate(kept) for skipped_rank, run in enumerate(skipped)
             if costs[skip] >= costs[run] - 1e-12]
    return [(skip, run) for *_, skip, run in sorted(pairs)[:window ** 2]]


def _distinct_others(bank: torch.BoolTensor, cluster: int) -> list[int]:
    """Indices of the first occurrence of each mask of the bank that differs from `bank[cluster]`."""
    seen, others = {tuple(bank[cluster].tolist())}, []
    for index in range(bank.shape[0]):
        key = tuple(bank[index].tolist())
        if key not in seen:
            seen.add(key)
            others.append(index)
    return others


def _skipped_cost(keep: torch.BoolTensor, costs: torch.Tensor) -> float:
    return float(costs[~keep].sum())


def _length_sorted_batches(rows: list[dict], batch_size: int) -> list[dict]:
    # Rows of similar length share a batch, so padding wastes little compute.
    rows = sorted(rows, key=lambda row: len(row["input_ids"]))
    return [pad_batch(rows[start:start + batch_size]) for start in range(0, len(rows), batch_size)]


@torch.no_grad()
def _mean_loss(igp_model, batches: list[dict], keep: torch.BoolTensor, prefix: list | None = None,
               first_block: int = 0, keep_states: bool = False) -> tuple[float, list | None]:
    """
    Return the mean next-token loss over every scored token of `batches` with the blocks of `keep` [2L] run, and,
    with `keep_states`, each batch's input to every layer (a list of L+1 [B, T, d] tensors per batch).

    With `prefix` (the layer inputs of a mask that agrees with `keep` before `first_block`), each batch starts from
    the input to the layer of `first_block` instead of the embeddings. The blocks before it are masked off, which
    makes them the identity, so the result equals a full pass.
    """
    device = next(igp_model.parameters()).device
    start_layer = first_block // 2
    total, count, states = 0.0, 0, [] if keep_states else None
    for index, batch in enumerate(batches):
        attention_mask = batch["attention_mask"].to(device)
        block_mask = keep.clone().to(device)
        if prefix is not None:
            inputs = {"inputs_embeds": prefix[index][start_layer]}
            block_mask[:2 * start_layer] = False
        else:
            inputs = {"input_ids": batch["input_ids"].to(device)}
        output = igp_model(**inputs, attention_mask=attention_mask, block_mask=block_mask.expand(len(attention_mask), -1),
                           use_cache=False, output_hidden_states=keep_states)
        if keep_states:
            states.append(output.hidden_states)
        labels = batch["labels"][:, 1:].to(device)
        total += float(F.cross_entropy(output.logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                       ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    if count == 0:
        raise ValueError("The sampled examples have no next-token targets (every text is one token long); give "
                         "longer calibration texts.")
    return total / count, states

__all__ = ["MaskRefinementConfig", "MaskRefinementResult", "refine_masks"]
