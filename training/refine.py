"""Per-cluster mask refinement: a local search that checks the learned masks against each cluster's real loss.

L0 training ranks blocks through sampled gates, and with few examples per cluster the binarised masks near the cut
are noisy. This step measures the loss instead. Candidates are scored on a seeded sample of the cluster's own
calibration examples: first the bank's other masks, then swaps of one kept block for one skipped block near the cut,
and last, on a larger sample, the masks that the other clusters' searches ended with. Near the cut means the kept
blocks with the lowest gate scores and the skipped blocks with the highest. The cluster takes the best candidate as
long as it lowers the loss by at least `min_improvement`. A swap never lowers the skipped cost, so every refined mask
still meets the sparsity target.
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
    """Score the bank's other masks for each cluster twice: before the swaps, to start from the one with the lowest
    loss, and after every cluster's search, to take another cluster's refined mask. Either time a mask replaces the
    cluster's own only if it lowers the loss by `min_improvement`. Masks that skip less cost than the cluster's own
    are not candidates."""

    max_examples: int = 16
    """Calibration examples per cluster (seeded sample) on which candidates are scored. Each candidate costs one
    forward pass over them, so this sets the run time."""

    exchange_examples: int = 64
    """Calibration examples per cluster on which it scores the other clusters' refined masks, drawn in the same seeded
    order as the search sample, so they include it (a value below `max_examples` counts as `max_examples`). Refined
    masks that differ in two blocks can differ in loss by less than a percent, and on SmolLM2 a 16-text sample ranked
    two such masks the other way round from the cluster's full 26 texts."""

    global_examples: int = 0
    """Examples of all clusters for a global search, or 0 for none. With more than one cluster and a value above 0,
    one global mask is refined first, starting from the bank's most common mask. It is then offered to every cluster
    as one more bank mask, so a cluster keeps its own mask only where that beats the global one on its own texts."""

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
        for name in ("rounds", "window", "max_examples", "exchange_examples", "batch_size", "global_examples"):
            minimum = 0 if name in ("rounds", "global_examples") else 1
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
            mask it started the swaps from, or `"global"`), `swaps` (`{"skip", "run", "loss"}` per applied swap,
            block indices) and `exchange` (None if no other cluster's mask could be offered, else `{"examples",
            "own_loss", "candidates", "took"}`: on the exchange sample, the loss of the mask the search ended with
            and `{"cluster", "loss"}` for each other cluster's mask, and the cluster whose mask it took, or None).
            `initial_loss` and `final_loss` are those of the search, on the search sample.
        global_mask: the global mask offered to every cluster (`config.global_examples > 0`), else None.
        global_record: the global search's record, in the form of a cluster's without `exchange`, else None.
        candidates_scored: passes over a sample, in all: every mask scored, the starting masks included, and the
            passes that store a mask's layer inputs for the swaps.
        wall_time_s: seconds for the whole call.
        config: the settings, as a dict.
    """

    mask_bank: list[list[int]]
    clusters: list[dict] = field(default_factory=list)
    candidates_scored: int = 0
    wall_time_s: float = 0.0
    config: dict = field(default_factory=dict)
    global_mask: list[int] | None = None
    global_record: dict | None = None


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
    search = _LocalSearch(igp_model, costs, config)

    offered, global_mask, global_record = {}, None, None
    if config.global_examples and num_clusters > 1:
        # The global search scores on texts of every cluster, so it finds the swaps that help all of them with less
        # noise than one cluster's sample.
        sample = torch.randperm(len(cluster_column), generator=generator)[:config.global_examples].tolist()
        batches = _length_sorted_batches([dataset[index] for index in sample], config.batch_size)
        keep = _most_common(bank)
        global_record = search.run(batches, keep, scores.mean(dim=0), {}, "global")
        global_mask = global_record.pop("mask")
        offered["global"] = torch.tensor(global_mask, dtype=torch.bool)
        logger.info("Refined the global mask on %d examples: loss %.4f -> %.4f (%d swaps)", len(sample),
                    global_record["initial_loss"], global_record["final_loss"], len(global_record["swaps"]))

    refined, records, exchange_samples = bank.clone(), [], {}
    exchange = config.use_bank and num_clusters > 1
    for cluster in range(num_clusters):
        members = (cluster_column == cluster).nonzero().flatten()
        if members.numel() == 0:
            logger.warning("Cluster %d has no calibration examples; its mask is kept as it is.", cluster)
            records.append({"examples": 0, "initial_loss": None, "final_loss": None, "start": cluster, "swaps": [],
                            "exchange": None})
            continue
        # NOTE: candidates are scored on texts the gates were trained on, and the best of about 20 is kept, so the
        # logged loss decrease is in-sample and overstates the held-out gain.
        order = members[torch.randperm(members.numel(), generator=generator)].tolist()
        sample = order[:config.max_examples]
        batches = _length_sorted_batches([dataset[index] for index in sample], config.batch_size)
        others = {index: bank[index] for index in _distinct_others(bank, cluster)} if config.use_bank else {}
        record = search.run(batches, bank[cluster].clone(), scores[cluster], {**others, **offered}, cluster,
                            desc=f"refine cluster {cluster}")
        refined[cluster] = torch.tensor(record.pop("mask"), dtype=torch.bool)
        records.append({**record, "exchange": None})
        if exchange:
            exchange_sample = order[:max(config.exchange_examples, config.max_examples)]
            exchange_batches = batches
            if exchange_sample != sample:
                exchange_batches = _length_sorted_batches([dataset[index] for index in exchange_sample],
                                                          config.batch_size)
            exchange_samples[cluster] = exchange_batches
        logger.info("Refined cluster %d on %d examples: loss %.4f -> %.4f (start from mask %s, %d swaps)", cluster,
                    len(sample), record["initial_loss"], record["final_loss"], record["start"], len(record["swaps"]))

    if exchange:
        exchange_start = time.perf_counter()
        refined = _exchange_masks(search, refined, records, exchange_samples, config.min_improvement)
        logger.info("Exchange of refined masks: %d of %d clusters took another cluster's mask in %.1f s",
                    count_exchanges(records), num_clusters, time.perf_counter() - exchange_start)

    return MaskRefinementResult(
        mask_bank=refined.int().tolist(), clusters=records, candidates_scored=search.scored,
        wall_time_s=time.perf_counter() - start, config=asdict(config), global_mask=global_mask,
        global_record=global_record,
    )


def _exchange_masks(search, searched: torch.BoolTensor, records: list[dict], samples: dict,
                    min_improvement: float) -> torch.BoolTensor:
    """
    Return the bank after each cluster has scored the masks the other clusters ended their searches with, and taken
    the best one where it lowers the loss by `min_improvement`. Fills each scored cluster's `exchange` record.

    A swap that one cluster's search found can suit another cluster whose window did not reach it. Every cluster
    scores against `searched`, the bank as the searches left it, so the order of the clusters does not matter.
    """
    exchanged = searched.clone()
    for cluster, exchange_batches in tqdm(samples.items(), desc="exchange", leave=False):
        others = search.eligible(searched[cluster], {index: searched[index] for index in
                                                     _distinct_others(searched, cluster)})
        if not others:
            continue

        # Refined masks mostly differ near the cut, deep in the model. Each candidate therefore starts from the layer
        # inputs of the cluster's own mask at its first differing block instead of the embeddings.
        own_loss, prefix = search.loss(exchange_batches, searched[cluster], keep_states=True)
        losses = search.score(exchange_batches, searched[cluster], others, prefix=prefix)
        took = min(losses, key=losses.get)
        if losses[took] >= own_loss * (1 - min_improvement):
            took = None

        records[cluster]["exchange"] = {
            "examples": _num_examples(exchange_batches), "own_loss": own_loss,
            "candidates": [{"cluster": index, "loss": loss} for index, loss in losses.items()], "took": took,
        }
        if took is not None:
            exchanged[cluster] = searched[took]
            logger.info("Cluster %d takes the refined mask of cluster %d: loss %.4f -> %.4f on %d examples", cluster,
                        took, own_loss, losses[took], _num_examples(exchange_batches))
    return exchanged


def count_exchanges(cluster_records: list[dict]) -> int:
    """Return how many clusters took another cluster's refined mask, from `MaskRefinementResult.clusters`."""
    return sum(bool(record.get("exchange")) and record["exchange"]["took"] is not None for record in cluster_records)


class _LocalSearch:
    """Local search of one mask on one sample: a choice among offered masks, then rounds of single swaps."""

    def __init__(self, igp_model, costs: torch.Tensor, config: MaskRefinementConfig):
        self.igp_model, self.costs, self.config = igp_model, costs, config
        self.scored = 0

    def loss(self, batches, keep, prefix=None, first_block=0, keep_states=False):
        self.scored += 1
        return _mean_loss(self.igp_model, batches, keep, prefix, first_block, keep_states)

    def eligible(self, keep: torch.BoolTensor, offered: dict) -> dict:
        """Return the offered masks that skip at least the cost `keep` skips, because the others would undercut the
        target."""
        own_cost = _skipped_cost(keep, self.costs)
        return {name: mask for name, mask in offered.items() if _skipped_cost(mask, self.costs) >= own_cost - 1e-9}

    def score(self, batches, keep: torch.BoolTensor, offered: dict, prefix=None) -> dict:
        """Return the loss of each eligible offered mask. With `prefix` (the layer inputs of `keep`), each mask runs
        from its first block that differs from `keep`."""
        losses = {}
        for name, mask in self.eligible(keep, offered).items():
            differs = (mask != keep).nonzero()
            first_block = int(differs[0]) if prefix is not None and len(differs) else 0
            losses[name] = self.loss(batches, mask, prefix if first_block else None, first_block)[0]
        return losses

    def choose(self, batches, keep: torch.BoolTensor, current: float, offered: dict, prefix=None):
        """Return (name, loss) of the offered mask with the lowest loss if it beats `current` by `min_improvement`,
        else None."""
        losses = self.score(batches, keep, offered, prefix)
        if not losses:
            return None
        name = min(losses, key=losses.get)
        return (name, losses[name]) if losses[name] < current * (1 - self.config.min_improvement) else None

    def run(self, batches, keep: torch.BoolTensor, scores: torch.Tensor, offered: dict, own, desc: str = "refine"):
        """Return a record with the final `mask`, `examples`, `initial_loss`, `final_loss`, `start` and `swaps`."""
        config, threshold = self.config, 1 - self.config.min_improvement
        start = own
        current, prefix = self.loss(batches, keep, keep_states=True)
        initial = current

        choice = self.choose(batches, keep, current, offered, prefix)
        if choice is not None:
            start, current = choice
            keep = offered[start].clone()
            prefix = self.loss(batches, keep, keep_states=True)[1]

        swaps = []
        for round_index in range(config.rounds):
            best = None
            for skip, run in tqdm(_candidate_swaps(keep, scores, self.costs, config.window), desc=desc, leave=False):
                candidate = keep.clone()
                candidate[skip], candidate[run] = False, True
                # Blocks before the first swapped one compute what they did for `keep`, so scoring resumes there.
                loss = self.loss(batches, candidate, prefix, min(skip, run))[0]
                if best is None or loss < best[0]:
                    best = (loss, skip, run)
            if best is None or best[0] >= current * threshold:
                break
            current, skip, run = best
            keep[skip], keep[run] = False, True
            swaps.append({"skip": skip, "run": run, "loss": current})
            if round_index + 1 < config.rounds:
                prefix = self.loss(batches, keep, keep_states=True)[1]

        return {"mask": keep.int().tolist(), "examples": _num_examples(batches),
                "initial_loss": initial, "final_loss": current, "start": start, "swaps": swaps}


def _most_common(bank: torch.BoolTensor) -> torch.BoolTensor:
    """Return the mask that occurs most often in `bank` (the first of them on a tie)."""
    keys = [tuple(mask.tolist()) for mask in bank]
    return bank[max(range(len(keys)), key=lambda index: (keys.count(keys[index]), -index))].clone()


def _candidate_swaps(keep: torch.BoolTensor, scores: torch.Tensor, costs: torch.Tensor, window: int):
    """
    Return up to `window ** 2` (skip, run) pairs nearest the cut whose swap does not lower the skipped cost.

    A pair's distance from the cut is the larger of two ranks: that of `skip` among the kept blocks (lowest score
    first) and that of `run` among the skipped blocks (highest score first). With equal costs this gives the
    `window` x `window` square. With unequal costs, pairs that would lower the skipped cost are left out before the
    nearest ones are taken, so a narrow window cannot end up empty while valid swaps exist.
    """
    # NOTE: after mask learning the gate scores of the kept blocks near the cut can lie close together (log-alpha
    # 3.2 to 3.7 for the 2nd to 7th lowest of static L0 at 8/60 on SmolLM2). Which of them enter a narrow window is
    # then partly arbitrary, and the best single swap can lie outside it.
    kept = keep.nonzero().flatten()
    skipped = (~keep).nonzero().flatten()
    kept = kept[scores[kept].argsort(stable=True)].tolist()
    skipped = skipped[scores[skipped].argsort(descending=True, stable=True)].tolist()
    pairs = [(max(kept_rank, skipped_rank), kept_rank + skipped_rank, skip, run)
             for kept_rank, skip in enumerate(kept) for skipped_rank, run in enumerate(skipped)
             if costs[skip] >= costs[run] - 1e-12]
    return [(skip, run) for *_, skip, run in sorted(pairs)[:window ** 2]]


def _distinct_others(bank: torch.BoolTensor, cluster: int) -> list[int]:
    """Return the index of the first occurrence of each mask of the bank that differs from `bank[cluster]`."""
    seen, others = {tuple(bank[cluster].tolist())}, []
    for index in range(bank.shape[0]):
        key = tuple(bank[index].tolist())
        if key not in seen:
            seen.add(key)
            others.append(index)
    return others


def _num_examples(batches: list[dict]) -> int:
    return sum(len(batch["input_ids"]) for batch in batches)


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

__all__ = ["MaskRefinementConfig", "MaskRefinementResult", "count_exchanges", "refine_masks"]
