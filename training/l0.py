"""L0 mask learning: hard-concrete gates on a frozen model, a Lagrangian sparsity constraint, and its Trainer.

Each cluster c has one hard-concrete gate per block (Louizos, Welling and Kingma, "Learning Sparse Neural Networks
through L0 Regularization", ICLR 2018). During training each example runs the frozen model with a gate vector sampled
from its own cluster's distribution, and block k adds `gate_k * block(h)` to the residual stream. The loss is

    task loss + sum_c [lambda_1[c] * (s_c - t) + lambda_2[c] * (s_c - t) ** 2]

Here s_c is cluster c's expected sparsity (the cost-weighted probability that a gate is exactly zero) and t is the
target, warmed up from the initial expected sparsity. The task loss is next-token cross-entropy, or the KL divergence
from the dense model's next-token distribution. The gates minimise this loss and the multipliers maximise it, which
drives every cluster's expected sparsity to the target. `binarize` then turns the gate scores into one 0/1 mask per
cluster.

`L0MaskObjective` is a plain `nn.Module` whose forward returns the loss, so a `transformers.Trainer` trains it;
`MaskLearningTrainer` adds the optimizer parameter groups, the target schedule and the logged metrics, and
`learn_masks` runs the whole step for the pipeline.
"""

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import ModelOutput

from modeling_igp import IGPruningForCausalLM

from .block_influence import influence_scores
from .checkpointing import SafeCheckpointMixin
from .sparsity import DEFAULT_CONTEXT_LENGTH, SPARSITY_UNITS, block_costs, sparsity_report


logger = logging.getLogger(__name__)

LOSSES = ("lm", "kl")
INITS = ("constant", "block_influence")
INIT_GRANULARITIES = ("block", "layer", "best")
INFLUENCE_SCOPES = ("all", "cluster")


# -- configuration ---------------------------------------------------------------------------------------------------


@dataclass
class MaskLearningConfig:
    """
    Settings of one L0 mask-learning run.

    The defaults start every cluster from the static Block Influence solution at the target expected sparsity, so the
    multipliers only have to keep the sparsity at the target while the gates refine the ranking per cluster. With a
    large initial `lambda_2`, the expected sparsity of SmolLM2-135M-Instruct for a 0.25 target (4 x 128 tokens a
    step) dipped to 0.237 in the first 4 steps, then stayed between 0.240 and 0.258 up to step 300. On tiny random
    models it stayed within 0.005 of the target.
    """

    target_sparsity: float = 0.25
    """Fraction of the model to skip, in `sparsity_unit`, in (0, 1)."""

    sparsity_unit: str = "blocks"
    """Unit of the target: `"blocks"` (fraction of the 2L blocks), `"params"` (of the blocks' parameters) or `"flops"`
    (of the blocks' FLOPs per token at `context_length`)."""

    context_length: int = DEFAULT_CONTEXT_LENGTH
    """Number of keys each token attends to when costing blocks in FLOPs (only used with `sparsity_unit="flops"`)."""

    loss: str = "lm"
    """Task loss: `"lm"` (next-token cross-entropy on the labels) or `"kl"` (KL divergence from the dense model's
    next-token distribution to the gated model's, on the label positions). The dense logits come from the same frozen
    model with every block run, under `torch.no_grad`, which costs one extra forward pass per step."""
    # NOTE: on SmolLM2 with the default multipliers, "kl" gave the same binarised mask as "lm" after 300 steps, but its
    # expected sparsity oscillated with a growing amplitude (0.239 to 0.261 in the last 100 steps).

    temperature: float = 2.0 / 3.0
    """Hard-concrete temperature beta; lower values give gates closer to 0 or 1."""

    limit_left: float = -0.1
    """Left end l < 0 of the stretched interval (l, r); the mass below 0 becomes exact zeros."""

    limit_right: float = 1.1
    """Right end r > 1 of the stretched interval (l, r); the mass above 1 becomes exact ones."""

    init: str = "block_influence"
    """Initial log-alpha: `"constant"` (`init_log_alpha` for every gate, then the target warms up from the resulting
    expected sparsity) or `"block_influence"` (gates ranked by Block Influence and shifted so that each cluster starts
    at exactly the target expected sparsity). Binarising a Block Influence start gives the static Block Influence
    mask."""

    init_granularity: str = "best"
    """Static ranking the gates start from, with `init="block_influence"` and no `init_scores` given. `"block"` ranks
    the 2L blocks by their own Block Influence (BlockPruner). `"layer"` ranks whole layers by their Block Influence and
    the two blocks of a layer by theirs (ShortGPT). `"best"` binarises both rankings at the target and keeps the one
    whose mask gives the lower task loss on the Block Influence examples: per cluster with independent gates or with
    `influence_scope="cluster"`, and one for all clusters (summed over them) with shared gates."""
    # NOTE: on SmolLM2 with 16 of 60 blocks skipped, the layer ranking (ShortGPT) gave half the held-out perplexity of
    # the block ranking (WikiText-2 99.6 against 201.3). At 8 of 60 the block ranking was better on most domains, so
    # "best" measures the choice for each run instead of fixing it.

    influence_scope: str = "all"
    """Texts whose Block Influence ranks each cluster's initial gates. `"all"`: one sample of every cluster's
    examples, so all clusters start from one static mask. `"cluster"`: each cluster's own examples
    (`influence_examples` of them at most), so each cluster starts from the static mask of its own texts."""

    shared_gates: bool = True
    """Parameterise cluster c's log-alpha as a shared vector plus an offset of its own, both trained. The shared part
    learns from every example and each offset only from its cluster's examples, so the clusters keep the static
    solution that the whole calibration set supports and leave it only where their own examples keep pushing. With
    `init="block_influence"`, `influence_scope="all"` and `init_granularity="best"`, all clusters then start from
    the one ranking whose loss summed over the clusters is lower. Ignored with one cluster.

    Both parts move by up to `lr_gates` a step, so a cluster's log-alpha moves by up to twice that."""
    # NOTE: on SmolLM2 with 16 of 60 blocks skipped and N = 8, shared gates beat independent ones on 4 of 5 held-out
    # domains and on zero-shot mean, but 7 of the 8 masks came out identical, so the bank is close to one static mask.

    init_log_alpha: float = 3.0
    """Log-alpha of every gate with `init="constant"`; 3.0 gives P(gate != 0) = 0.99."""
    # NOTE: with init="constant" the warmed-up target was overshot by 0.03 to 0.09 on tiny random models, because
    # saturated gates respond slowly while lambda_1 builds up; Block Influence initialisation avoids the warm-up.

    init_spread: float = 12.0
    """With `init="block_influence"`: log-alpha difference between the most and the least influential block. The
    ranks in between are spaced evenly, so blocks far from the cut start near 0 or 1 and those near it stay open to
    change."""

    lr_gates: float = 0.1
    """AdamW learning rate of the log-alpha parameters."""

    lr_lambdas: float = 0.5
    """AdamW learning rate of the Lagrange multipliers (maximised)."""

    init_lambda_2: float = 500.0
    """Initial value of the quadratic-penalty multiplier lambda_2, which the ascent then only grows. A large start
    makes the penalty pull the expected sparsity back to the target from the first step, which damps the oscillation
    that the linear multiplier alone causes. The multipliers scale with the number of blocks, because each block's
    cost is about 1 / 2L of the total."""

    betas_gates: tuple[float, float] = (0.9, 0.999)
    """AdamW betas of the log-alpha parameters."""

    betas_lambdas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas of the Lagrange multipliers."""

    target_warmup_fraction: float = 0.3
    """Fraction of `max_steps` over which the target rises linearly from the initial expected sparsity to
    `target_sparsity`. A warm-up of 0 applies the full target from the first step."""

    max_steps: int = 300
    """Number of optimizer steps."""

    batch_size: int = 4
    """Examples per micro-batch."""

    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step; the effective regulariser is the same for any value."""

    lr_scheduler_type: str = "linear"
    """Learning-rate schedule of both parameter groups, any `transformers.SchedulerType` name. Under a constant rate
    the expected sparsity swings around the target (periods of 80 to 130 steps on SmolLM2), and the swing grows late
    in the run. A linear decay shrinks the last steps: with N = 8 and 8 of 60 blocks on SmolLM2, the last step's
    expected sparsity was within 0.002 of the target for every cluster, against a worst cluster 0.011 off under a
    constant rate."""

    seed: int = 0
    """Seed of the data order (Trainer) and of the gate noise."""

    logging_steps: int = 10
    """Steps between Trainer log lines; the history keeps every step regardless."""

    save_steps: int | None = None
    """Steps between resumable checkpoints in the output folder, or None for no checkpoints."""

    balanced_sampling: bool = False
    """Draw the training examples so that every cluster gets the same expected share of each batch (with replacement,
    each example weighted by one over its cluster's size) instead of a share proportional to its size. Small clusters
    then train their offsets (or their gates) as often as large ones, and with shared gates every cluster weighs the
    same in the shared part. Ignored with one cluster."""
    # NOTE: on SmolLM2 with N = 8 and 8 of 60 blocks skipped, balanced draws left the zero-shot mean 1.3 points below
    # static L0 after refinement (0.8 with draws proportional to cluster size), so they stay off by default.

    same_count: bool = True
    """Binarisation: every cluster meets the target on its own (True), or the clusters share one budget so their
    mean meets it (False)."""

    influence_examples: int = 64
    """Calibration examples (seeded sample) used to compute Block Influence for `init="block_influence"`: in all, or
    per cluster with `influence_scope="cluster"`."""

    def __post_init__(self):
        if not 0.0 < self.target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in (0, 1), got {self.target_sparsity}.")
        if self.sparsity_unit not in SPARSITY_UNITS:
            raise ValueError(f"sparsity_unit must be one of {', '.join(SPARSITY_UNITS)}, got {self.sparsity_unit!r}.")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be 'lm' or 'kl', got {self.loss!r}.")
        if self.init not in INITS:
            raise ValueError(f"init must be 'constant' or 'block_influence', got {self.init!r}.")
        if self.influence_scope not in INFLUENCE_SCOPES:
            raise ValueError(f"influence_scope must be 'all' or 'cluster', got {self.influence_scope!r}.")
        if self.init_granularity not in INIT_GRANULARITIES:
            raise ValueError(f"init_granularity must be 'block', 'layer' or 'best', got {self.init_granularity!r}.")
        if not self.limit_left < 0.0 < 1.0 < self.limit_right:
            raise ValueError(
                f"The stretch limits must satisfy limit_left < 0 < 1 < limit_right, got ({self.limit_left}, "
                f"{self.limit_right})."
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}.")
        if not 0.0 <= self.target_warmup_fraction <= 1.0:
            raise ValueError(f"target_warmup_fraction must be in [0, 1], got {self.target_warmup_fraction}.")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "logging_steps", "context_length",
                     "influence_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.save_steps is not None and self.save_steps < 1:
            raise ValueError(f"save_steps must be at least 1 or None, got {self.save_steps}.")
        if self.lr_gates <= 0 or self.lr_lambdas <= 0:
            raise ValueError(f"Learning rates must be positive, got lr_gates={self.lr_gates}, "
                             f"lr_lambdas={self.lr_lambdas}.")

    def to_dict(self) -> dict:
        return asdict(self)


# -- hard-concrete gates ---------------------------------------------------------------------------------------------


class HardConcreteGates(nn.Module):
    """
    One hard-concrete gate per cluster and block, parameterised by `log_alpha` [num_clusters, num_blocks].

    A training sample draws u ~ U(0, 1), sets s = sigmoid((log u - log(1 - u) + log_alpha) / beta), stretches it to
    s * (r - l) + l and clamps it to [0, 1], so the gate is exactly 0 or 1 with positive probability. In eval mode the
    gate is the deterministic clamp(sigmoid(log_alpha) * (r - l) + l, 0, 1).

    With `shared=True`, cluster c's log-alpha is `shared_log_alpha + log_alpha[c]`: a vector every example trains plus
    an offset that only cluster c's examples train. `cluster_log_alpha()` returns the sum in either case.

    The noise of row j of the n-th training row drawn is seeded from (`seed`, n) alone; the counter `rows_sampled` is
    a buffer. So resuming from a saved state dict, or splitting a batch into gradient-accumulation micro-batches or
    across data-parallel processes (each with the same micro-batch size), draws the same noise for the same rows.
    """

    def __init__(
        self,
        num_clusters: int,
        num_blocks: int,
        temperature: float = 2.0 / 3.0,
        limit_left: float = -0.1,
        limit_right: float = 1.1,
        init_log_alpha: float = 0.0,
        seed: int = 0,
        shared: bool = False,
    ):
        super().__init__()
        if num_clusters < 1 or num_blocks < 1:
            raise ValueError(f"Need at least one cluster and one block, got {num_clusters} and {num_blocks}.")
        self.temperature = temperature
        self.limit_left = limit_left
        self.limit_right = limit_right
        self.seed = seed
        if shared:
            self.shared_log_alpha = nn.Parameter(torch.full((num_blocks,), float(init_log_alpha)))
            self.log_alpha = nn.Parameter(torch.zeros(num_clusters, num_blocks))
        else:
            self.shared_log_alpha = None
            self.log_alpha = nn.Parameter(torch.full((num_clusters, num_blocks), float(init_log_alpha)))
        self.register_buffer("rows_sampled", torch.zeros((), dtype=torch.long))

    @property
    def num_clusters(self) -> int:
        return self.log_alpha.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.log_alpha.shape[1]

    def cluster_log_alpha(self) -> torch.Tensor:
        """Return the log-alpha of every cluster's gates [num_clusters, num_blocks]."""
        if self.shared_log_alpha is None:
            return self.log_alpha
        return self.shared_log_alpha + self.log_alpha

    def set_cluster_log_alpha(self, log_alpha: torch.Tensor) -> None:
        """Set every cluster's log-alpha [num_clusters, num_blocks]. With sharing, the mean over clusters becomes the
        shared part and the rest the offsets."""
        with torch.no_grad():
            log_alpha = log_alpha.to(self.log_alpha)
            if self.shared_log_alpha is None:
                self.log_alpha.copy_(log_alpha)
            else:
                self.shared_log_alpha.copy_(log_alpha.mean(dim=0))
                self.log_alpha.copy_(log_alpha - self.shared_log_alpha)

    def sample(self, cluster_ids: torch.LongTensor) -> torch.Tensor:
        """Return gates [B, num_blocks] for a batch: row b uses cluster `cluster_ids[b]` (random in training mode)."""
        cluster_ids = torch.as_tensor(cluster_ids, device=self.log_alpha.device).long().flatten()
        if cluster_ids.numel() and (cluster_ids.min() < 0 or cluster_ids.max() >= self.num_clusters):
            raise ValueError(
                f"cluster_ids must be in [0, {self.num_clusters - 1}], got values from {int(cluster_ids.min())} to "
                f"{int(cluster_ids.max())}."
            )
        if not self.training:
            return self.deterministic_gates()[cluster_ids]

        log_alpha = self.cluster_log_alpha()[cluster_ids]
        uniform = self._uniform_noise(cluster_ids.numel()).to(log_alpha)
        logistic = torch.log(uniform) - torch.log1p(-uniform)
        concrete = torch.sigmoid((logistic + log_alpha) / self.temperature)
        stretched = concrete * (self.limit_right - self.limit_left) + self.limit_left
        return stretched.clamp(0.0, 1.0)

    def deterministic_gates(self) -> torch.Tensor:
        """Return the eval-mode gates [num_clusters, num_blocks]."""
        stretched = torch.sigmoid(self.cluster_log_alpha()) * (self.limit_right - self.limit_left) + self.limit_left
        return stretched.clamp(0.0, 1.0)

    def prob_nonzero(self) -> torch.Tensor:
        """Return P(gate != 0) [num_clusters, num_blocks] = sigmoid(log_alpha - beta * log(-l / r))."""
        shift = self.temperature * math.log(-self.limit_left / self.limit_right)
        return torch.sigmoid(self.cluster_log_alpha() - shift)

    def expected_sparsity(self, costs: torch.Tensor) -> torch.Tensor:
        """Return each cluster's expected skipped cost [num_clusters] = sum_k cost_k * P(gate_k == 0)."""
        return ((1.0 - self.prob_nonzero()) * costs.to(self.log_alpha)).sum(dim=-1)

    def _uniform_noise(self, num_rows: int) -> torch.Tensor:
        # Under data parallelism, process r gets rows [r * B, (r + 1) * B) of a global batch of world_size * B rows.
        # It draws the noise of those rows, and every process advances the counter past the whole global batch, so
        # one process with the global batch draws the same noise for the same rows.
        rank, world_size = _data_parallel_position()
        start = int(self.rows_sampled) + rank * num_rows
        noise = torch.empty(num_rows, self.num_blocks)
        for row in range(num_rows):
            generator = torch.Generator().manual_seed((self.seed << 32) + start + row)
            noise[row] = torch.rand(self.num_blocks, generator=generator)
        self.rows_sampled += num_rows * world_size
        # Keep log(u) and log(1 - u) finite.
        return noise.clamp(1e-6, 1.0 - 1e-6)

    def extra_repr(self) -> str:
        return (
            f"num_clusters={self.num_clusters}, num_blocks={self.num_blocks}, temperature={self.temperature:.4g}, "
            f"limits=({self.limit_left}, {self.limit_right}), shared={self.shared_log_alpha is not None}"
        )


def log_alpha_from_scores(
    scores: torch.Tensor,
    costs: torch.Tensor,
    target: float,
    spread: float,
    temperature: float = 2.0 / 3.0,
    limit_left: float = -0.1,
    limit_right: float = 1.1,
) -> torch.Tensor:
    """
    Map importance scores [N, 2L] to log-alpha whose order is the score order and whose expected sparsity is `target`.

    Each row's blocks get log-alpha `offset + spread * (rank / (2L - 1) - 0.5)`, rank 0 being the lowest score, and
    the offset is found by bisection so that the row's expected skipped cost equals `target`.
    """
    num_blocks = scores.shape[-1]
    ranks = scores.argsort(dim=-1).argsort(dim=-1).to(torch.float64)
    ramp = spread * (ranks / max(num_blocks - 1, 1) - 0.5)
    shift = temperature * math.log(-limit_left / limit_right)
    costs = costs.to(torch.float64)

    def expected(offset):
        return ((1.0 - torch.sigmoid(ramp + offset.unsqueeze(-1) - shift)) * costs).sum(dim=-1)

    # Expected sparsity falls as the offset rises; [-60, 60] brackets any target in (0, 1) for spreads up to 60.
    low = torch.full(ramp.shape[:-1], -60.0, dtype=torch.float64)
    high = torch.full(ramp.shape[:-1], 60.0, dtype=torch.float64)
    for _ in range(100):
        middle = (low + high) / 2
        too_sparse = expected(middle) > target
        low = torch.where(too_sparse, middle, low)
        high = torch.where(too_sparse, high, middle)
    return (ramp + ((low + high) / 2).unsqueeze(-1)).to(torch.float32)


def _data_parallel_position() -> tuple[int, int]:
    """(rank, world size) of this process in the default process group, or (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# -- the objective ---------------------------------------------------------------------------------------------------


@dataclass
class MaskLearningOutput(ModelOutput):
    """
    Output of `L0MaskObjective.forward`.

    Args:
        loss: task loss plus this micro-batch's share of the Lagrangian; the quantity to minimise.
        task_loss: mean next-token cross-entropy (or KL) per target token of this micro-batch.
        lagrangian: sum over clusters of lambda_1 (s - t) + lambda_2 (s - t)^2, before the micro-batch share.
        expected_sparsity: expected sparsity of each cluster [N].
        target: the target each cluster is held to at this step [N].
        num_targets: number of target tokens in this micro-batch.
        logits: logits of the gated model [B, T, vocab].
    """

    loss: torch.Tensor | None = None
    task_loss: torch.Tensor | None = None
    lagrangian: torch.Tensor | None = None
    expected_sparsity: torch.Tensor | None = None
    target: torch.Tensor | None = None
    num_targets: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class L0MaskObjective(nn.Module):
    """
    Frozen causal LM + hard-concrete gates + Lagrange multipliers: the model-side loss of L0 mask learning.

    Its state dict contains only what training changes (`gates.log_alpha`, `gates.shared_log_alpha` with shared gates,
    `lambda_1`, `lambda_2`) and the buffers
    that make a resumed run exact (`gates.rows_sampled`, `initial_sparsity`). The frozen model is left out, so a
    Trainer checkpoint stores a few kilobytes.

    A stock `transformers.Trainer` can train it, given the optimizer from `create_optimizer` (the multipliers are
    maximised) and a `MaskLearningCallback` (the target warm-up follows the Trainer's step); `MaskLearningTrainer`
    sets both up.
    """

    # Trainer passes `num_items_in_batch` (the target-token count of the whole accumulated batch) to a model that
    # accepts loss kwargs, and counts labels[..., 1:] only for causal-LM losses, which it recognises by `loss_type`.
    accepts_loss_kwargs = True
    loss_type = "ForCausalLM"

    def __init__(
        self,
        model,
        config: MaskLearningConfig,
        num_clusters: int = 1,
        init_scores: torch.Tensor | None = None,
    ):
        """
        Args:
            model: a causal LM (Llama, Mistral, Qwen2, Qwen3) or an `IGPruningForCausalLM` whose bank keeps every
                block. Its parameters are frozen (`requires_grad=False`) in place.
            config: the run's settings.
            num_clusters: number of clusters N, each with its own gates and multipliers.
            init_scores: importance scores [2L] or [N, 2L] (higher = keep) for `config.init="block_influence"`,
                usually from `block_influence`.
        """
        super().__init__()
        # Not `config`: Trainer treats a model's `config` attribute as a transformers config.
        self.learning_config = config
        self.model = _dense_igp_model(model)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.model.eval()

        text_config = self.model.config.text_config
        num_blocks = self.model.config.num_blocks
        costs = block_costs(text_config, config.sparsity_unit, config.context_length).to(torch.float32)
        self.register_buffer("costs", costs, persistent=False)

        self.gates = HardConcreteGates(
            num_clusters,
            num_blocks,
            temperature=config.temperature,
            limit_left=config.limit_left,
            limit_right=config.limit_right,
            init_log_alpha=config.init_log_alpha,
            seed=config.seed,
            # One cluster has nothing to share, and a second parameter on the same gates would double their step.
            shared=config.shared_gates and num_clusters > 1,
        )
        if config.init == "block_influence":
            if init_scores is None:
                raise ValueError(
                    "init='block_influence' needs init_scores (for example from block_influence(model, batches)); "
                    "pass them, or use init='constant'."
                )
            scores = torch.as_tensor(init_scores, dtype=torch.float64)
            if scores.shape not in ((num_blocks,), (num_clusters, num_blocks)):
                raise ValueError(
                    f"init_scores must have shape ({num_blocks},) or ({num_clusters}, {num_blocks}), got "
                    f"{tuple(scores.shape)}."
                )
            scores = scores.expand(num_clusters, num_blocks)
            log_alpha = log_alpha_from_scores(
                scores, costs, config.target_sparsity, config.init_spread,
                config.temperature, config.limit_left, config.limit_right,
            )
            self.gates.set_cluster_log_alpha(log_alpha)

        self.lambda_1 = nn.Parameter(torch.zeros(num_clusters))
        self.lambda_2 = nn.Parameter(torch.full((num_clusters,), float(config.init_lambda_2)))
        with torch.no_grad():
            self.register_buffer("initial_sparsity", self.gates.expected_sparsity(costs).clone())

        # Set by MaskLearningCallback from the Trainer state; None means no schedule (full target).
        self.global_step: int | None = None
        self.warmup_steps: int = 0
        self._warned_no_schedule = False
        # Token-weighted task loss of the training micro-batches since the last `pop_task_loss`.
        self._loss_sum = 0.0
        self._target_count = 0

        self.register_state_dict_post_hook(_drop_frozen_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_frozen_keys)

    @property
    def num_clusters(self) -> int:
        return self.gates.num_clusters

    def train(self, mode: bool = True):
        # The frozen model stays in eval mode, so dropout (if any) never changes the target being learned.
        super().train(mode)
        self.model.eval()
        return self

    def current_target(self) -> torch.Tensor:
        """Return the target of each cluster [N] at the current step: linear warm-up from the initial sparsity."""
        target = torch.full_like(self.initial_sparsity, self.learning_config.target_sparsity)
        if self.warmup_steps <= 0:
            return target
        if self.global_step is None:
            if not self._warned_no_schedule:
                logger.warning(
                    "L0MaskObjective has no step counter, so the target warm-up is off and the full target applies. "
                    "Add MaskLearningCallback(objective) to the Trainer's callbacks, or use MaskLearningTrainer."
                )
                self._warned_no_schedule = True
            return target
        progress = min(1.0, self.global_step / self.warmup_steps)
        return self.initial_sparsity + progress * (target - self.initial_sparsity)

    def pop_task_loss(self) -> float | None:
        """Return the mean task loss per target token of the training micro-batches since the last call, and reset."""
        mean = self._loss_sum / self._target_count if self._target_count else None
        self._loss_sum, self._target_count = 0.0, 0
        return mean

    def expected_sparsity(self) -> torch.Tensor:
        """Return each cluster's expected sparsity [N] in the configured unit."""
        return self.gates.expected_sparsity(self.costs)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cluster_ids: torch.LongTensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> MaskLearningOutput:
        """
        Run the frozen model with each row gated by its cluster's gates, and return task loss + Lagrangian share.

        Args:
            input_ids, attention_mask: the batch [B, T].
            labels: next-token targets [B, T] (-100 = ignored), unshifted as for a causal LM. Defaults to `input_ids`
                with padding ignored.
            cluster_ids: cluster of each row [B]; may be omitted when there is one cluster.
            num_items_in_batch: target tokens in the whole accumulated batch (Trainer passes it). The task loss is
                summed over this micro-batch's targets and divided by it, and the Lagrangian is weighted by this
                micro-batch's share of the targets, so the micro-batches of one step add up to one Lagrangian.
        """
        batch_size = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if labels is None:
            labels = input_ids.masked_fill(attention_mask == 0, -100)
        if cluster_ids is None:
            if self.num_clusters != 1:
                raise ValueError(f"cluster_ids is required with {self.num_clusters} clusters.")
            cluster_ids = torch.zeros(batch_size, dtype=torch.long, device=input_ids.device)

        gates = self.gates.sample(cluster_ids)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, block_gates=gates, use_cache=False)
        logits = outputs.logits

        # Position i predicts labels[i + 1], as in transformers' causal-LM loss.
        shifted_labels = labels[:, 1:]
        targets = shifted_labels != -100
        num_targets = targets.sum()
        denominator = num_items_in_batch if num_items_in_batch is not None else num_targets.clamp(min=1)

        if self.learning_config.loss == "lm":
            task_sum = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), shifted_labels.flatten(), ignore_index=-100, reduction="sum"
            )
        else:
            task_sum = self._kl_to_dense(input_ids, attention_mask, logits, targets)
        task_loss = task_sum / denominator

        expected = self.expected_sparsity()
        target = self.current_target()
        gap = expected - target
        lagrangian = (self.lambda_1 * gap + self.lambda_2 * gap**2).sum()
        share = num_targets.to(expected.dtype) / denominator
        loss = task_loss + share * lagrangian

        if self.training:
            self._loss_sum += float(task_sum.detach())
            self._target_count += int(num_targets)

        return MaskLearningOutput(
            loss=loss,
            task_loss=(task_sum / num_targets.clamp(min=1)).detach(),
            lagrangian=lagrangian.detach(),
            expected_sparsity=expected.detach(),
            target=target.detach(),
            num_targets=num_targets.detach(),
            logits=logits,
        )

    def _kl_to_dense(self, input_ids, attention_mask, logits, targets) -> torch.Tensor:
        """Sum over target positions of KL(dense || gated) of the next-token distributions."""
        with torch.no_grad():
            keep = torch.ones(input_ids.shape[0], self.model.config.num_blocks, dtype=torch.bool)
            dense_logits = self.model(
                input_ids=input_ids, attention_mask=attention_mask, block_mask=keep, use_cache=False
            ).logits
            dense_log_probs = F.log_softmax(dense_logits[:, :-1][targets].float(), dim=-1)
        log_probs = F.log_softmax(logits[:, :-1][targets].float(), dim=-1)
        return F.kl_div(log_probs, dense_log_probs, log_target=True, reduction="sum")

    def create_optimizer(self) -> torch.optim.AdamW:
        """Build AdamW with two groups: the gates (`lr_gates`, `betas_gates`, minimised) and the multipliers
        (`lr_lambdas`, `betas_lambdas`, maximised). Neither has weight decay, which would pull them towards zero."""
        config = self.learning_config
        groups = [
            {"params": [p for p in (self.gates.shared_log_alpha, self.gates.log_alpha) if p is not None],
             "lr": config.lr_gates, "betas": tuple(config.betas_gates),
             "weight_decay": 0.0},
            {"params": [self.lambda_1, self.lambda_2], "lr": config.lr_lambdas, "betas": tuple(config.betas_lambdas),
             "weight_decay": 0.0, "maximize": True},
        ]
        return torch.optim.AdamW(groups)


def _dense_igp_model(model) -> IGPruningForCausalLM:
    if getattr(getattr(model, "config", None), "model_type", None) == "igp":
        if not all(model.config.blocks_kept_by_bank()):
            raise ValueError(
                "Mask learning needs every block, but this IGPruningForCausalLM has removed blocks that its bank never "
                "keeps. Pass the base model, or IGPruningForCausalLM.from_base(base_model, [[1] * num_blocks])."
            )
        return model
    num_blocks = 2 * model.config.num_hidden_layers
    return IGPruningForCausalLM.from_base(model, [[1] * num_blocks])


def _drop_frozen_keys(module, state_dict, prefix, local_metadata):
    for key in [key for key in state_dict if key.startswith(prefix + "model.")]:
        del state_dict[key]


def _ignore_missing_frozen_keys(module, incompatible_keys):
    frozen = [key for key in incompatible_keys.missing_keys if key.startswith("model.")]
    for key in frozen:
        incompatible_keys.missing_keys.remove(key)


# -- Trainer integration ---------------------------------------------------------------------------------------------


class MaskLearningCallback(TrainerCallback):
    """
    Keep an `L0MaskObjective` in step with the Trainer: the target warm-up follows `state.global_step`, and after
    every optimizer step a record of the gates is appended to `state.log_history` (saved in checkpoints, so the
    history of a resumed run is complete).

    A history record is `{"step": k, "mask_learning": {"task_loss", "expected_sparsity", "target", "lambda_1",
    "lambda_2"}}`, with one list entry per cluster.
    """

    def __init__(self, objective: L0MaskObjective):
        self.objective = objective

    def on_train_begin(self, args, state, control, **kwargs):
        self.objective.warmup_steps = round(self.objective.learning_config.target_warmup_fraction * state.max_steps)
        self.objective.global_step = state.global_step

    def on_step_begin(self, args, state, control, **kwargs):
        self.objective.global_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        objective = self.objective
        with torch.no_grad():
            record = {
                "task_loss": objective.pop_task_loss(),
                "expected_sparsity": objective.expected_sparsity().tolist(),
                "target": objective.current_target().tolist(),
                "lambda_1": objective.lambda_1.tolist(),
                "lambda_2": objective.lambda_2.tolist(),
            }
        state.log_history.append({"step": state.global_step, "mask_learning": record})


class ClusterBalancedSampler(torch.utils.data.Sampler):
    """
    Draw `num_samples` dataset indices with replacement so that each cluster's expected share is the same.

    Example i is drawn with probability proportional to 1 / size(cluster of i). The whole run is one pass over this
    sampler (`num_samples` covers every step), and each pass starts from a generator seeded with `seed`. A resumed
    Trainer skips the batches it already trained on by drawing the pass again, so it gets the same indices.
    """

    def __init__(self, cluster_ids: list[int], num_samples: int, seed: int = 0):
        cluster_ids = torch.as_tensor(cluster_ids, dtype=torch.long)
        if cluster_ids.dim() != 1 or cluster_ids.numel() == 0:
            raise ValueError(f"cluster_ids must be a non-empty list of ints, got shape {tuple(cluster_ids.shape)}.")
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
        sizes = torch.bincount(cluster_ids)
        self.weights = 1.0 / sizes[cluster_ids].to(torch.float64)
        self.num_samples = num_samples
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        yield from torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator).tolist()


class MaskLearningTrainer(SafeCheckpointMixin, Trainer):
    """
    `transformers.Trainer` for an `L0MaskObjective`.

    It adds AdamW with a gate group and a maximised multiplier group, and the target warm-up and per-step history of
    `MaskLearningCallback`. Every log gains the expected sparsity, target and multipliers per cluster and the mean task
    loss since the last log. With `MaskLearningConfig.balanced_sampling` it draws the examples with a
    `ClusterBalancedSampler`.

    Checkpoints hold the objective's state dict (gates, multipliers, noise counter) as safetensors, plus the optimizer,
    scheduler, RNG state, trainer state and training arguments as safetensors and JSON (see `SafeCheckpointMixin`).
    """

    def __init__(self, model: L0MaskObjective, args: TrainingArguments, **kwargs):
        if not isinstance(model, L0MaskObjective):
            raise TypeError(f"MaskLearningTrainer trains an L0MaskObjective, got {type(model).__name__}.")
        super().__init__(model=model, args=args, **kwargs)
        self.add_callback(MaskLearningCallback(model))

    def _get_train_sampler(self, train_dataset=None):
        config = self.model.learning_config
        if not config.balanced_sampling or self.model.gates.num_clusters == 1:
            return super()._get_train_sampler(train_dataset)

        dataset = train_dataset if train_dataset is not None else self.train_dataset
        cluster_ids = _cluster_column(dataset)
        # One pass of the sampler covers the whole run on every process, so a resumed run redraws the same indices.
        num_samples = (self.args.max_steps * self.args.per_device_train_batch_size
                       * self.args.gradient_accumulation_steps * self.args.world_size)
        return ClusterBalancedSampler(cluster_ids, num_samples, seed=config.seed)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            # The betas and learning rates come from the MaskLearningConfig, not from TrainingArguments.
            self.optimizer = self.model.create_optimizer()
        return self.optimizer

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:
            objective = self.model
            with torch.no_grad():
                expected = objective.expected_sparsity().tolist()
                target = objective.current_target().tolist()
            recent = [
                entry["mask_learning"]["task_loss"]
                for entry in self.state.log_history
                if "mask_learning" in entry and entry["mask_learning"]["task_loss"] is not None
            ][-max(self.args.logging_steps, 1):]
            if recent:
                logs[f"{objective.learning_config.loss}_loss"] = sum(recent) / len(recent)
            logs["target"] = target[0]
            logs["expected_sparsity_mean"] = sum(expected) / len(expected)
            for cluster, value in enumerate(expected):
                logs[f"expected_sparsity_{cluster}"] = value
            for cluster, (first, second) in enumerate(zip(objective.lambda_1.tolist(), objective.lambda_2.tolist())):
                logs[f"lambda_1_{cluster}"] = first
                logs[f"lambda_2_{cluster}"] = second
        super().log(logs, start_time)


# -- binarisation ----------------------------------------------------------------------------------------------------


def binarize(gates_or_scores, costs=None, target: float = 0.25, same_count: bool = True) -> list[list[int]]:
    """
    Turn gate scores into one 0/1 mask per cluster (1 = run) that meets the sparsity target.

    Each cluster skips its lowest-scoring blocks. What "meets the target" means depends on the costs:

    - Equal costs (unit `blocks`, or `costs=None`): exactly `round(target * 2L)` blocks are skipped per cluster.
    - Unequal costs (units `params`, `flops`): blocks are skipped in ascending score order until the skipped cost
      reaches `target`. The skipped fraction is then at least `target`, and exceeds it by less than the cost of the
      last block skipped.

    With `same_count=False` the clusters share one budget: all (cluster, block) pairs are ranked by score together,
    and the lowest are skipped until N times the per-cluster budget (in blocks, or in cost) is reached. Clusters
    then skip different numbers of blocks, but their mean meets the target as above.

    Every cluster keeps at least one block; a target that would skip all of them raises a ValueError.

    Args:
        gates_or_scores: `HardConcreteGates` (its `cluster_log_alpha()` is used) or scores [N, 2L] or [2L],
            higher = keep.
        costs: cost of each block [2L] (any positive scale), e.g. from `block_costs`; None for equal costs.
        target: fraction to skip, in (0, 1).
        same_count: every cluster meets the target on its own (True) or the clusters share the budget (False).
    """
    if isinstance(gates_or_scores, HardConcreteGates):
        scores = gates_or_scores.cluster_log_alpha().detach()
    else:
        scores = torch.as_tensor(gates_or_scores)
    scores = scores.detach().to(torch.float64).cpu()
    if scores.dim() == 1:
        scores = scores.unsqueeze(0)
    if scores.dim() != 2:
        raise ValueError(f"Scores must have shape [N, 2L] or [2L], got {tuple(scores.shape)}.")
    num_clusters, num_blocks = scores.shape
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be in (0, 1), got {target}.")

    if costs is None:
        costs = torch.ones(num_blocks, dtype=torch.float64)
    costs = torch.as_tensor(costs, dtype=torch.float64).cpu()
    if costs.shape != (num_blocks,) or bool((costs <= 0).any()):
        raise ValueError(f"costs must be {num_blocks} positive values, got shape {tuple(costs.shape)}.")
    costs = costs / costs.sum()
    equal_costs = bool(torch.allclose(costs, costs[0].expand_as(costs), rtol=1e-9, atol=0.0))

    if equal_costs:
        per_cluster_blocks = round(target * num_blocks)
        if per_cluster_blocks >= num_blocks:
            raise ValueError(
                f"target {target} skips {per_cluster_blocks} of {num_blocks} blocks, which leaves none to run; use a "
                "smaller target."
            )
    skip = torch.zeros(num_clusters, num_blocks, dtype=torch.bool)

    if same_count:
        for cluster in range(num_clusters):
            order = scores[cluster].argsort(stable=True).tolist()
            if equal_costs:
                chosen = order[:per_cluster_blocks]
            else:
                chosen = _cover_target(order, costs, target)
            skip[cluster, chosen] = True
    else:
        # One ranking over all clusters; the budget is N times the per-cluster one.
        order = scores.flatten().argsort(stable=True).tolist()
        kept = torch.full((num_clusters,), num_blocks)
        budget = num_clusters * (per_cluster_blocks if equal_costs else target)
        spent = 0.0
        for flat_index in order:
            if spent >= budget - 1e-12:
                break
            cluster, block = divmod(flat_index, num_blocks)
            if kept[cluster] == 1:
                continue
            skip[cluster, block] = True
            kept[cluster] -= 1
            spent += 1 if equal_costs else float(costs[block])

    masks = (~skip).long()
    if bool((masks.sum(dim=1) == 0).any()):
        raise ValueError(f"target {target} leaves a cluster with no block to run; use a smaller target.")
    return masks.tolist()


def _cover_target(order: list[int], costs: torch.Tensor, target: float) -> list[int]:
    """Return the shortest prefix of `order` whose cost reaches `target` (always leaving one block)."""
    chosen, spent = [], 0.0
    for block in order[:-1]:
        if spent >= target - 1e-12:
            break
        chosen.append(block)
        spent += float(costs[block])
    if spent < target - 1e-12:
        raise ValueError(f"target {target} cannot be reached without skipping every block; use a smaller target.")
    return chosen


# -- the pipeline entry point ----------------------------------------------------------------------------------------


@dataclass
class MaskLearningResult:
    """
    Outcome of `learn_masks`.

    Args:
        mask_bank: N masks of 2L 0/1 ints (1 = run), binarised to meet the target.
        gate_scores: log-alpha [N][2L] at the end of training (higher = keep).
        prob_nonzero: P(gate != 0) [N][2L] at the end of training.
        expected_sparsity: final expected sparsity of each cluster in `config.sparsity_unit`.
        sparsity: `sparsity_report` of the mask bank (blocks, params and flops per cluster).
        history: one record per optimizer step: `{"step", "task_loss", "expected_sparsity", "target", "lambda_1",
            "lambda_2"}` (lists have one entry per cluster).
        wall_time_s: seconds for the whole call, Block Influence included.
        config: the settings, as a dict.
    """

    mask_bank: list[list[int]]
    gate_scores: list[list[float]]
    prob_nonzero: list[list[float]]
    expected_sparsity: list[float]
    sparsity: dict
    history: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {item.name: getattr(self, item.name) for item in fields(self)}

    def save_json(self, path) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=1)


def learn_masks(
    model,
    train_dataset,
    config: MaskLearningConfig,
    output_dir: str,
    num_clusters: int | None = None,
    init_scores: torch.Tensor | None = None,
    resume_from_checkpoint: str | bool | None = None,
    callbacks: list | None = None,
) -> MaskLearningResult:
    """
    Learn one block mask per cluster with L0 regularisation on the frozen `model`, and binarise them.

    Args:
        model: a causal LM (Llama, Mistral, Qwen2, Qwen3) or an `IGPruningForCausalLM` that keeps every block. Its
            weights are not changed; their `requires_grad` flags are restored on return.
        train_dataset: a map-style dataset (such as `datasets.Dataset`) whose rows hold `input_ids` (list of token
            ids), `attention_mask` (same length, 1 = token), `labels` (same length, -100 = ignored; unshifted, as
            for a causal LM) and `cluster_ids` (int in [0, N)). Rows may differ in length: each batch is right-padded
            to its longest row. `training.data.tokenize_calibration` builds such a dataset.
        config: the run's settings.
        output_dir: folder for Trainer checkpoints (if `config.save_steps`) and `mask_learning.json`.
        num_clusters: N; defaults to the largest cluster id + 1.
        init_scores: scores [2L] or [N, 2L] for `init="block_influence"`. By default Block Influence is computed on
            `config.influence_examples` examples drawn from `train_dataset` (from each cluster with
            `config.influence_scope="cluster"`) and ranked as `config.init_granularity` selects.
        resume_from_checkpoint: a checkpoint folder, or True for the latest in `output_dir`, to continue a run.
        callbacks: extra `TrainerCallback`s.
    """
    start = time.perf_counter()
    _check_dataset(train_dataset)
    cluster_column = _cluster_column(train_dataset)
    if num_clusters is None:
        num_clusters = max(cluster_column) + 1
    sizes = torch.bincount(torch.tensor(cluster_column), minlength=num_clusters)
    if sizes.numel() > num_clusters:
        raise ValueError(f"train_dataset has cluster ids up to {sizes.numel() - 1} but num_clusters is {num_clusters}.")
    if bool((sizes == 0).any()):
        empty = (sizes == 0).nonzero().flatten().tolist()
        raise ValueError(f"Clusters {empty} have no training examples; their masks could not be learned. Use fewer "
                         "clusters or more calibration texts.")
    logger.info("Mask learning: %d examples in %d clusters (sizes %s)", len(cluster_column), num_clusters,
                sizes.tolist())

    requires_grad = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    try:
        if config.init == "block_influence" and init_scores is None:
            init_scores = _initial_scores(model, train_dataset, config, num_clusters)

        objective = L0MaskObjective(model, config, num_clusters=num_clusters, init_scores=init_scores)
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=config.max_steps,
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            lr_scheduler_type=config.lr_scheduler_type,
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=0.0,
            logging_steps=config.logging_steps,
            save_strategy="steps" if config.save_steps else "no",
            save_steps=config.save_steps or 500,
            seed=config.seed,
            report_to="none",
            remove_unused_columns=False,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            # Without an accelerator, TrainingArguments leaves a torchrun launch undistributed unless use_cpu is set.
            use_cpu=not torch.accelerator.is_available(),
        )
        trainer = MaskLearningTrainer(
            model=objective, args=args, train_dataset=train_dataset, data_collator=pad_batch, callbacks=callbacks
        )
        train_start = time.perf_counter()
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        logger.info("Trained the gates for %d steps in %.1f s", config.max_steps, time.perf_counter() - train_start)
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(requires_grad[name])

    text_config = objective.model.config.text_config
    bank = binarize(objective.gates, objective.costs, config.target_sparsity, same_count=config.same_count)
    with torch.no_grad():
        result = MaskLearningResult(
            mask_bank=bank,
            gate_scores=objective.gates.cluster_log_alpha().tolist(),
            prob_nonzero=objective.gates.prob_nonzero().tolist(),
            expected_sparsity=objective.expected_sparsity().tolist(),
            sparsity=sparsity_report(bank, text_config, config.context_length),
            history=[{"step": entry["step"], **entry["mask_learning"]}
                     for entry in trainer.state.log_history if "mask_learning" in entry],
            wall_time_s=time.perf_counter() - start,
            config=config.to_dict(),
        )
    os.makedirs(output_dir, exist_ok=True)
    result.save_json(os.path.join(output_dir, "mask_learning.json"))
    logger.info("Mask learning finished in %.1f s; expected sparsity per cluster %s", result.wall_time_s,
                [round(value, 4) for value in result.expected_sparsity])
    return result


def pad_batch(rows: list[dict]) -> dict:
    """Collate dataset rows into right-padded tensors: input_ids padded with 0, attention_mask with 0, labels with
    -100, and `cluster_ids` stacked."""
    length = max(len(row["input_ids"]) for row in rows)
    batch = {
        "input_ids": torch.zeros(len(rows), length, dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), length, dtype=torch.long),
        "labels": torch.full((len(rows), length), -100, dtype=torch.long),
    }
    for index, row in enumerate(rows):
        size = len(row["input_ids"])
        batch["input_ids"][index, :size] = torch.as_tensor(row["input_ids"])
        batch["attention_mask"][index, :size] = torch.as_tensor(row.get("attention_mask", [1] * size))
        batch["labels"][index, :size] = torch.as_tensor(row.get("labels", row["input_ids"]))
    if "cluster_ids" in rows[0]:
        batch["cluster_ids"] = torch.tensor([int(row["cluster_ids"]) for row in rows], dtype=torch.long)
    return batch


def _cluster_column(train_dataset) -> list[int]:
    """Return the cluster id of every row of `train_dataset`, reading the column at once where it has columns."""
    if hasattr(train_dataset, "column_names"):
        return [int(cluster) for cluster in train_dataset["cluster_ids"]]
    return [int(train_dataset[index]["cluster_ids"]) for index in range(len(train_dataset))]


def _check_dataset(train_dataset) -> None:
    if len(train_dataset) == 0:
        raise ValueError("train_dataset is empty; mask learning needs calibration examples.")
    first = train_dataset[0]
    missing = [name for name in ("input_ids", "attention_mask", "labels", "cluster_ids") if name not in first]
    if missing:
        raise ValueError(
            f"train_dataset rows lack {missing}; each row needs input_ids, attention_mask, labels and cluster_ids "
            "(training.data.tokenize_calibration builds them)."
        )


def layer_ranked_scores(block_scores: torch.Tensor, layer_scores: torch.Tensor) -> torch.Tensor:
    """
    Scores [2L] whose order ranks whole layers by `layer_scores` [L] first and the two blocks of a layer by
    `block_scores` [2L] second, so that skipping the lowest 2k blocks skips the k least influential layers.
    """
    layer_rank = layer_scores.argsort().argsort().to(torch.float64)
    block_rank = block_scores.argsort().argsort().to(torch.float64)
    return layer_rank.repeat_interleave(2) * block_scores.numel() + block_rank


def _initial_scores(model, train_dataset, config: MaskLearningConfig, num_clusters: int) -> torch.Tensor:
    """Compute initial importance scores [N, 2L] from the dense model's Block Influence on seeded samples of the
    training examples (one sample, or one per cluster with `influence_scope="cluster"`), ranked as
    `config.init_granularity` selects."""
    generator = torch.Generator().manual_seed(config.seed)
    if config.influence_scope == "all":
        count = min(config.influence_examples, len(train_dataset))
        samples = [torch.randperm(len(train_dataset), generator=generator)[:count].tolist()]
    else:
        clusters = torch.tensor([int(train_dataset[index]["cluster_ids"]) for index in range(len(train_dataset))])
        samples = []
        for cluster in range(num_clusters):
            members = (clusters == cluster).nonzero().flatten()
            order = torch.randperm(members.numel(), generator=generator)[:config.influence_examples]
            samples.append(members[order].tolist())

    igp_model = _dense_igp_model(model)
    costs = block_costs(igp_model.config.text_config, config.sparsity_unit, config.context_length)
    candidates, losses = [], []
    for indices in samples:
        rows = [train_dataset[index] for index in indices]
        batches = [pad_batch(rows[start:start + config.batch_size]) for start in range(0, len(rows), config.batch_size)]
        influence = influence_scores(model, batches)
        ranking = {"block": influence["block"], "layer": layer_ranked_scores(influence["block"], influence["layer"])}
        candidates.append(ranking)
        if config.init_granularity == "best":
            # Each ranking, binarised at the target, is scored by the next-token loss it gives each cluster's
            # sampled examples.
            losses.append({name: _cluster_losses(igp_model, batches, _static_keep(scores, costs, config),
                                                 num_clusters) for name, scores in ranking.items()})
    if config.influence_scope == "all":
        candidates, losses = candidates * num_clusters, losses * num_clusters
    if config.init_granularity != "best":
        return torch.stack([ranking[config.init_granularity] for ranking in candidates])

    if config.shared_gates and config.influence_scope == "all":
        # Shared gates start every cluster from one ranking: the one whose mean losses, summed over the clusters, are
        # lower, so that every cluster weighs the same whatever its size.
        totals = {name: float(values.nansum()) for name, values in losses[0].items()}
        name = "layer" if totals["layer"] < totals["block"] else "block"
        logger.info("Initial ranking of the shared gates (lower loss over all clusters wins): %s", name)
        return candidates[0][name].expand(num_clusters, -1)
    chosen = []
    for cluster in range(num_clusters):
        # losses[cluster] comes from the sample that ranked this cluster, and entry `cluster` is its own loss there.
        own = {name: values[cluster] for name, values in losses[cluster].items()}
        if own["block"].isnan():
            # A cluster without sampled examples takes the ranking that is best over all clusters.
            own = {name: values.nansum() for name, values in losses[cluster].items()}
        chosen.append("layer" if own["layer"] < own["block"] else "block")
    logger.info("Initial ranking per cluster (block or layer Block Influence, lower loss wins): %s", chosen)
    return torch.stack([candidates[cluster][name] for cluster, name in enumerate(chosen)])


def _static_keep(scores: torch.Tensor, costs: torch.Tensor, config: MaskLearningConfig) -> torch.BoolTensor:
    """Return the static mask [2L] that `scores` give when binarised at the target."""
    return torch.tensor(binarize(scores.unsqueeze(0), costs, config.target_sparsity)[0], dtype=torch.bool)


@torch.no_grad()
def _cluster_losses(igp_model, batches: list[dict], keep: torch.BoolTensor, num_clusters: int) -> torch.Tensor:
    """Mean next-token loss per cluster [N] of the model run with the static mask `keep` [2L] (NaN for a cluster
    without examples)."""
    sums = torch.zeros(num_clusters, dtype=torch.float64)
    counts = torch.zeros(num_clusters, dtype=torch.float64)
    device = next(igp_model.parameters()).device
    for batch in batches:
        input_ids = batch["input_ids"].to(device)
        logits = igp_model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device),
                           block_mask=keep.expand(input_ids.shape[0], -1).to(device), use_cache=False).logits
        labels = batch["labels"][:, 1:].to(device)
        token_losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                       reduction="none").view_as(labels)
        clusters = batch["cluster_ids"]
        sums.index_add_(0, clusters, token_losses.sum(dim=1).double().cpu())
        counts.index_add_(0, clusters, (labels != -100).sum(dim=1).double().cpu())
    return sums / counts


__all__ = [
    "ClusterBalancedSampler",
    "HardConcreteGates",
    "L0MaskObjective",
    "MaskLearningCallback",
    "MaskLearningConfig",
    "MaskLearningOutput",
    "MaskLearningResult",
    "MaskLearningTrainer",
    "binarize",
    "layer_ranked_scores",
    "learn_masks",
    "log_alpha_from_scores",
    "pad_batch",
]
