"""L0 mask learning: hard-concrete statistics, the Lagrangian, Trainer integration, resume and binarisation."""

import json
import math
import os

import datasets
import pytest
import safetensors.torch
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from conftest import identity_blocks, tiny_base
from igp_training.block_influence import block_influence
from igp_training.l0 import (
    ClusterBalancedSampler,
    HardConcreteGates,
    L0MaskObjective,
    MaskLearningCallback,
    MaskLearningConfig,
    MaskLearningTrainer,
    binarize,
    layer_ranked_scores,
    learn_masks,
    pad_batch,
)
from igp_training.pipeline import plot_training_curves
from igp_training.sparsity import block_costs


# Tiny models run faster on one torch thread.
pytestmark = pytest.mark.usefixtures("one_thread")


BETA, LEFT, RIGHT = 2.0 / 3.0, -0.1, 1.1


def make_dataset(num_rows=64, length=16, num_clusters=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 96, (num_rows, length), generator=generator).tolist()
    return datasets.Dataset.from_dict({
        "input_ids": input_ids,
        "attention_mask": [[1] * length] * num_rows,
        "labels": input_ids,
        "cluster_ids": [row % num_clusters for row in range(num_rows)],
    })


def quick_config(**overrides):
    settings = dict(max_steps=4, batch_size=4, logging_steps=2, influence_examples=8)
    settings.update(overrides)
    return MaskLearningConfig(**settings)


def training_args(output_dir, **overrides):
    settings = dict(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=4, report_to="none",
                    max_grad_norm=0.0, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", seed=0,
                    remove_unused_columns=False, dataloader_pin_memory=False)
    settings.update(overrides)
    return TrainingArguments(**settings)


# -- hard-concrete gates ---------------------------------------------------------------------------------------------


def gates_with_values(values, copies, **kwargs):
    gates = HardConcreteGates(1, len(values) * copies, **kwargs)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor(values).repeat_interleave(copies).unsqueeze(0))
    return gates


def test_gate_probabilities_match_closed_forms():
    values = [-3.0, -1.0, 0.0, 1.0, 3.0]
    gates = gates_with_values(values, copies=400).train()
    samples = gates.sample(torch.zeros(50, dtype=torch.long)).detach().reshape(50, len(values), 400)

    for index, log_alpha in enumerate(values):
        drawn = samples[:, index]  # 20000 draws
        nonzero = 1 / (1 + math.exp(-(log_alpha - BETA * math.log(-LEFT / RIGHT))))
        one = 1 / (1 + math.exp(-(log_alpha - BETA * math.log((1 - LEFT) / (RIGHT - 1)))))
        assert abs(float((drawn > 0).float().mean()) - nonzero) < 0.01
        assert abs(float((drawn == 1).float().mean()) - one) < 0.01
        assert gates.prob_nonzero()[0, index * 400].item() == pytest.approx(nonzero, rel=1e-5)
    assert float(samples.min()) >= 0.0
    assert float(samples.max()) <= 1.0


def test_expected_sparsity_matches_monte_carlo():
    gates = gates_with_values([-2.0, -0.5, 0.5, 2.0], copies=1).train()
    costs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    samples = gates.sample(torch.zeros(20000, dtype=torch.long)).detach()
    monte_carlo = float(((samples == 0).float() * costs).sum(dim=1).mean())
    assert gates.expected_sparsity(costs).item() == pytest.approx(monte_carlo, abs=0.01)


def test_eval_gates_are_deterministic():
    gates = gates_with_values([-3.0, 0.0, 0.5, 3.0], copies=1).eval()
    first = gates.sample(torch.zeros(2, dtype=torch.long))
    second = gates.sample(torch.zeros(2, dtype=torch.long))
    expected = (torch.sigmoid(torch.tensor([-3.0, 0.0, 0.5, 3.0])) * (RIGHT - LEFT) + LEFT).clamp(0, 1)
    assert torch.equal(first, second)
    assert torch.allclose(first[0], expected)
    assert int(gates.rows_sampled) == 0


def test_noise_depends_only_on_row_count():
    whole = HardConcreteGates(3, 6, seed=5).train()
    split = HardConcreteGates(3, 6, seed=5).train()
    ids = torch.tensor([0, 2, 1, 1])
    together = whole.sample(ids)
    parts = torch.cat([split.sample(ids[:2]), split.sample(ids[2:])])
    assert torch.equal(together, parts)

    # A copy restored from the state dict continues with the same noise.
    restored = HardConcreteGates(3, 6, seed=5).train()
    restored.load_state_dict(whole.state_dict())
    assert torch.equal(restored.sample(ids), whole.sample(ids))
    assert not torch.equal(whole.sample(ids), together)


def test_gates_reject_bad_cluster_ids():
    gates = HardConcreteGates(2, 4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        gates.sample(torch.tensor([0, 2]))


# -- the objective ---------------------------------------------------------------------------------------------------


def test_open_gates_give_dense_losses():
    base = tiny_base("llama")
    batch = pad_batch([make_dataset(num_rows=3)[index] for index in range(3)])
    with torch.no_grad():
        dense_loss = base(batch["input_ids"], labels=batch["labels"]).loss

    for loss, expected in (("lm", dense_loss.item()), ("kl", 0.0)):
        config = MaskLearningConfig(init="constant", init_log_alpha=10.0, loss=loss)
        objective = L0MaskObjective(base, config, num_clusters=2).eval()
        with torch.no_grad():
            output = objective(**batch)
        assert output.task_loss.item() == pytest.approx(expected, abs=1e-5)


def test_state_dict_excludes_frozen_model():
    base = tiny_base("qwen3")
    objective = L0MaskObjective(base, MaskLearningConfig(init="constant", shared_gates=False), num_clusters=3)
    assert not any(parameter.requires_grad for parameter in base.parameters())
    trainable = {name for name, parameter in objective.named_parameters() if parameter.requires_grad}
    assert trainable == {"gates.log_alpha", "lambda_1", "lambda_2"}
    state = objective.state_dict()
    assert set(state) == {"gates.log_alpha", "gates.rows_sampled", "lambda_1", "lambda_2", "initial_sparsity"}

    fresh = L0MaskObjective(base, MaskLearningConfig(init="constant", init_log_alpha=0.0, shared_gates=False),
                            num_clusters=3)
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.gates.log_alpha, objective.gates.log_alpha)


def test_shared_gates_gradient_split():
    # With sharing, every example trains the shared log-alpha, and only a cluster's own examples train its offset.
    base = tiny_base("llama")
    config = MaskLearningConfig(init="constant", init_log_alpha=1.0, shared_gates=True)
    objective = L0MaskObjective(base, config, num_clusters=3).train()
    assert {name for name, parameter in objective.named_parameters() if parameter.requires_grad} == {
        "gates.shared_log_alpha", "gates.log_alpha", "lambda_1", "lambda_2"}
    # At the first step of the target warm-up the target is the initial sparsity, so the Lagrangian's gradient is 0.
    objective.global_step, objective.warmup_steps = 0, 10
    rows = [make_dataset(num_rows=4, num_clusters=3)[index] for index in range(4)]
    for row in rows:
        row["cluster_ids"] = 1
    objective(**pad_batch(rows)).loss.backward()

    offsets = objective.gates.log_alpha.grad
    assert offsets[1].abs().sum() > 0
    assert torch.equal(offsets[0], torch.zeros_like(offsets[0]))
    assert torch.equal(offsets[2], torch.zeros_like(offsets[2]))
    # The cluster's log-alpha is shared + offset, so both parts receive the same gradient from its rows.
    assert torch.allclose(objective.gates.shared_log_alpha.grad, offsets[1])


def test_shared_gates_log_alpha_round_trip():
    gates = HardConcreteGates(3, 5, shared=True)
    log_alpha = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    gates.set_cluster_log_alpha(log_alpha)

    assert torch.allclose(gates.cluster_log_alpha(), log_alpha, atol=1e-6)
    assert torch.allclose(gates.shared_log_alpha, log_alpha.mean(dim=0))
    # Same log-alpha, same distribution: the eval gates match those of unshared gates.
    plain = HardConcreteGates(3, 5)
    plain.set_cluster_log_alpha(log_alpha)
    assert torch.allclose(gates.eval().sample(torch.arange(3)), plain.eval().sample(torch.arange(3)), atol=1e-6)


def whole_and_resumed_runs(base, dataset, config, tmp_path, stop):
    """Learn masks once without a break, and once stopped after step `stop` and resumed from its checkpoint."""
    uninterrupted = learn_masks(base, dataset, config, str(tmp_path / "whole"))
    learn_masks(base, dataset, config, str(tmp_path / "parts"), callbacks=[StopAt(stop)])
    resumed = learn_masks(base, dataset, config, str(tmp_path / "parts"),
                          resume_from_checkpoint=str(tmp_path / "parts" / f"checkpoint-{stop}"))
    return uninterrupted, resumed


def test_independent_gates_resume_exactly(tmp_path):
    base = tiny_base("qwen2")
    dataset = make_dataset(num_rows=20, num_clusters=2)
    config = quick_config(max_steps=6, save_steps=2, lr_gates=0.2, shared_gates=False)

    uninterrupted, resumed = whole_and_resumed_runs(base, dataset, config, tmp_path, stop=4)

    assert resumed.gate_scores == uninterrupted.gate_scores
    assert resumed.history == uninterrupted.history
    saved = safetensors.torch.load_file(tmp_path / "parts" / "checkpoint-4" / "model.safetensors")
    assert "gates.shared_log_alpha" not in saved


def test_balanced_sampler_equal_shares():
    # 30 examples of cluster 0 and 6 of cluster 1: uniform draws would give cluster 1 one sixth of the rows.
    sampler = ClusterBalancedSampler([0] * 30 + [1] * 6, num_samples=6000, seed=3)
    drawn = list(sampler)

    assert len(drawn) == 6000
    assert len(sampler) == 6000
    share = sum(index >= 30 for index in drawn) / len(drawn)
    assert abs(share - 0.5) < 0.03
    assert len(set(drawn)) == 36
    assert list(sampler) == drawn


def test_balanced_sampling_feeds_small_cluster(tmp_path):
    base = tiny_base("llama")
    dataset = make_dataset(num_rows=36).map(lambda row, index: {"cluster_ids": int(index >= 32)}, with_indices=True)
    seen = []

    def recording_collator(rows):
        seen.extend(int(row["cluster_ids"]) for row in rows)
        return pad_batch(rows)

    config = quick_config(max_steps=20, init="constant", balanced_sampling=True)
    objective = L0MaskObjective(base, config, num_clusters=2)
    args = training_args(tmp_path, max_steps=20, lr_scheduler_type="linear")
    MaskLearningTrainer(model=objective, args=args, train_dataset=dataset, data_collator=recording_collator).train()

    # 80 rows drawn: about 40 from the 4 texts of cluster 1, against about 9 under uniform draws.
    assert len(seen) == 80
    assert 25 <= seen.count(1) <= 55


def test_balanced_sampling_resumes_exactly(tmp_path):
    base = tiny_base("qwen2")
    dataset = make_dataset(num_rows=20).map(lambda row, index: {"cluster_ids": int(index >= 16)}, with_indices=True)
    config = quick_config(max_steps=6, save_steps=2, lr_gates=0.2, balanced_sampling=True)

    uninterrupted, resumed = whole_and_resumed_runs(base, dataset, config, tmp_path, stop=4)

    assert resumed.gate_scores == uninterrupted.gate_scores
    assert resumed.history == uninterrupted.history


def test_cluster_influence_scope_own_mask(tmp_path):
    base = tiny_base("qwen3")
    rows = make_dataset(num_rows=24, num_clusters=2)
    # Cluster 1 reads one repeated token, so its Block Influence differs from that of the random texts of cluster 0.
    rows = rows.map(lambda row: {"input_ids": [7] * 16, "labels": [7] * 16} if row["cluster_ids"] == 1 else {})
    # Zero steps are not allowed; one step at a negligible learning rate keeps the initial ranking.
    config = quick_config(max_steps=1, lr_gates=1e-9, lr_lambdas=1e-9, init_granularity="block",
                          influence_scope="cluster", target_sparsity=0.375)
    result = learn_masks(base, rows, config, str(tmp_path / "run"))

    costs = block_costs(base.config, "blocks")
    for cluster in range(2):
        own = [row for row in rows if row["cluster_ids"] == cluster]
        reference = block_influence(base, [pad_batch(own[start:start + 4]) for start in range(0, len(own), 4)],
                                    show_progress=False)
        assert result.mask_bank[cluster] == binarize(reference, costs, 0.375)[0]
    assert result.mask_bank[0] != result.mask_bank[1]


def test_lagrangian_share_sums_over_micro_batches():
    # Four micro-batches of one accumulated batch, each given the batch's target count, add up to one Lagrangian:
    # d(loss)/d(lambda_1) = s - t and d(loss)/d(lambda_2) = (s - t)^2 per cluster.
    base = tiny_base("llama")
    objective = L0MaskObjective(base, MaskLearningConfig(init="constant", init_log_alpha=1.0), num_clusters=2).train()
    rows = [make_dataset(num_rows=8)[index] for index in range(8)]
    rows[3]["labels"] = [-100] * 10 + rows[3]["labels"][10:]  # micro-batches with different target counts
    batches = [pad_batch(rows[start:start + 2]) for start in range(0, 8, 2)]
    total = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches)
    for batch in batches:
        objective(**batch, num_items_in_batch=torch.tensor(total)).loss.backward()

    gap = (objective.expected_sparsity() - objective.current_target()).detach()
    assert torch.allclose(objective.lambda_1.grad, gap, atol=1e-6)
    assert torch.allclose(objective.lambda_2.grad, gap**2, atol=1e-7)


def test_block_influence_init_binarizes_to_static_mask():
    base = tiny_base("mistral")
    batches = [pad_batch([make_dataset()[index] for index in range(4)])]
    scores = block_influence(base, batches, show_progress=False)

    for unit, target in (("blocks", 0.25), ("blocks", 0.5), ("params", 0.3)):
        config = MaskLearningConfig(init="block_influence", sparsity_unit=unit, target_sparsity=target)
        objective = L0MaskObjective(base, config, num_clusters=2, init_scores=scores)
        costs = block_costs(base.config, unit)
        assert torch.allclose(objective.expected_sparsity(), torch.tensor([target] * 2), atol=1e-4)

        # The static Block Influence mask: skip the least influential blocks until the target is reached.
        static = [1] * 8
        skipped_cost, skipped_count = 0.0, 0
        for block in scores.argsort().tolist():
            reached = skipped_count == round(target * 8) if unit == "blocks" else skipped_cost >= target
            if reached:
                break
            static[block] = 0
            skipped_cost += float(costs[block])
            skipped_count += 1
        assert binarize(objective.gates, costs, target) == [static, static]


def test_layer_ranking_binarizes_to_shortgpt_mask():
    base = tiny_base("qwen3")
    batches = [pad_batch([make_dataset()[index] for index in range(4)])]
    block_scores = block_influence(base, batches, granularity="block", show_progress=False)
    layer_scores = block_influence(base, batches, granularity="layer", show_progress=False)
    scores = layer_ranked_scores(block_scores, layer_scores)

    # Skipping 2k of the 2L blocks must skip exactly the k whole layers with the lowest layer Block Influence.
    for layers_skipped in (1, 2, 3):
        lowest = set(layer_scores.argsort()[:layers_skipped].tolist())
        expected = [0 if block // 2 in lowest else 1 for block in range(8)]
        assert binarize(scores, target=2 * layers_skipped / 8) == [expected]

    # An odd count skips the lowest layers, then the less influential block of the next layer.
    next_layer = int(layer_scores.argsort()[1])
    attention, mlp = 2 * next_layer, 2 * next_layer + 1
    half = binarize(scores, target=3 / 8)[0]
    assert half[attention] + half[mlp] == 1
    assert half[attention if block_scores[attention] < block_scores[mlp] else mlp] == 0


@pytest.mark.parametrize("shared", [False, True])
def test_best_init_picks_lower_loss_ranking(tmp_path, monkeypatch, shared):
    # Independent gates: each cluster takes the ranking with the lower loss on its examples. Shared gates: one ranking
    # for all, with the lower loss summed over the clusters.
    base = tiny_base("llama")
    # Clusters of 12 and 4 rows, so that a sum over all tokens and a sum of the two cluster means could disagree.
    dataset = make_dataset(num_rows=16).map(lambda row, index: {"cluster_ids": int(index >= 12)}, with_indices=True)
    config = quick_config(max_steps=1, influence_examples=16, target_sparsity=0.5, shared_gates=shared)
    captured = {}
    original = L0MaskObjective.__init__

    def capture(self, model, config, num_clusters=1, init_scores=None):
        captured["scores"] = init_scores
        original(self, model, config, num_clusters=num_clusters, init_scores=init_scores)

    monkeypatch.setattr(L0MaskObjective, "__init__", capture)
    learn_masks(base, dataset, config, str(tmp_path))

    # Independent reference: both static masks scored with the base model whose skipped sub-blocks add nothing.
    rows = [dataset[index] for index in range(16)]
    batch = pad_batch(rows)
    block_scores = block_influence(base, [batch], granularity="block", show_progress=False)
    layer_scores = block_influence(base, [batch], granularity="layer", show_progress=False)
    candidates = {"block": block_scores, "layer": layer_ranked_scores(block_scores, layer_scores)}
    losses = {}
    for name, scores in candidates.items():
        mask = binarize(scores, target=0.5)[0]
        with identity_blocks(base, mask), torch.no_grad():
            logits = base(input_ids=batch["input_ids"]).logits
        token_losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                         reduction="none").view(16, -1).sum(dim=1)
        # Mean loss per target token of each cluster (every row has 15 targets).
        losses[name] = [float(token_losses[batch["cluster_ids"] == cluster].mean()) / 15 for cluster in range(2)]
    for cluster in range(2):
        if shared:
            winner = "layer" if sum(losses["layer"]) < sum(losses["block"]) else "block"
        else:
            winner = "layer" if losses["layer"][cluster] < losses["block"][cluster] else "block"
        assert binarize(captured["scores"][cluster], target=0.5) == binarize(candidates[winner], target=0.5)


# -- training --------------------------------------------------------------------------------------------------------


def test_lagrangian_reaches_target_without_overshoot(tmp_path):
    # The default recipe on a random tiny model, whose task gradient is mostly noise, so the Lagrangian alone keeps
    # the expected sparsity at the target.
    base = tiny_base("llama")
    config = MaskLearningConfig(max_steps=100, batch_size=4, logging_steps=50, influence_examples=8)
    result = learn_masks(base, make_dataset(), config, str(tmp_path))

    trajectory = torch.tensor([record["expected_sparsity"] for record in result.history])
    assert trajectory.shape == (100, 2)
    assert float(trajectory.max()) <= config.target_sparsity + 0.02
    assert torch.allclose(trajectory[-1], torch.full((2,), config.target_sparsity), atol=0.01)
    assert result.sparsity["blocks_skipped"] == [2, 2]


def test_lagrangian_reaches_params_target(tmp_path):
    base = tiny_base("qwen2")
    config = MaskLearningConfig(max_steps=100, batch_size=4, logging_steps=50, influence_examples=8,
                                sparsity_unit="params", target_sparsity=0.4)
    result = learn_masks(base, make_dataset(), config, str(tmp_path))
    final = torch.tensor(result.history[-1]["expected_sparsity"])
    assert torch.allclose(final, torch.full((2,), 0.4), atol=0.01)
    for skipped in result.sparsity["params"]:
        assert skipped >= 0.4


class RecordGradients(TrainerCallback):
    """Keep the accumulated gradients that each optimizer step is about to apply."""

    def __init__(self, objective):
        self.objective = objective
        self.gradients = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        gates = self.objective.gates
        parameters = (gates.log_alpha, self.objective.lambda_1, self.objective.lambda_2, gates.shared_log_alpha)
        self.gradients.append([parameter.grad.detach().clone() for parameter in parameters])


def run_trainer(base, output_dir, batch_size, accumulation, steps=3):
    config = MaskLearningConfig(init="constant", init_log_alpha=1.0, lr_gates=0.05, target_warmup_fraction=0.0)
    objective = L0MaskObjective(base, config, num_clusters=2)
    args = training_args(output_dir, max_steps=steps, per_device_train_batch_size=batch_size,
                         gradient_accumulation_steps=accumulation)
    recorder = RecordGradients(objective)
    trainer = MaskLearningTrainer(model=objective, args=args, train_dataset=make_dataset(), data_collator=pad_batch,
                                  callbacks=[recorder])
    gap = (objective.expected_sparsity() - objective.current_target()).detach()
    trainer.train()
    return objective, trainer, recorder.gradients, gap


def test_gradient_accumulation_gives_same_update(tmp_path):
    # Same global batch (8 rows) as 1 x 8 and 4 x 2: the same rows, the same gate noise, the same Lagrangian weight.
    base = tiny_base("llama")
    single, _, single_gradients, gap = run_trainer(base, tmp_path / "single", batch_size=8, accumulation=1)
    accumulated, trainer, accumulated_gradients, _ = run_trainer(base, tmp_path / "accumulated", batch_size=2,
                                                                 accumulation=4)

    # The multipliers' gradient is the Lagrangian's alone: exactly (s - t) and (s - t)^2 at the first step.
    for gradients in (single_gradients, accumulated_gradients):
        assert torch.allclose(gradients[0][1], gap, atol=1e-6)
        assert torch.allclose(gradients[0][2], gap**2, atol=1e-6)
    # Tolerance: float32 sums taken in a different order.
    for step in range(3):
        for ours, theirs in zip(single_gradients[step], accumulated_gradients[step]):
            assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-7)

    assert int(single.gates.rows_sampled) == int(accumulated.gates.rows_sampled) == 24
    assert torch.allclose(single.gates.log_alpha, accumulated.gates.log_alpha, atol=1e-5)
    assert torch.allclose(single.gates.shared_log_alpha, accumulated.gates.shared_log_alpha, atol=1e-5)
    assert torch.allclose(single.lambda_1, accumulated.lambda_1, atol=1e-5)
    assert torch.allclose(single.lambda_2, accumulated.lambda_2, atol=1e-5)

    logged = [entry for entry in trainer.state.log_history if "lm_loss" in entry]
    assert logged
    assert {"expected_sparsity_0", "expected_sparsity_1", "lambda_1_0", "lambda_2_1", "target"} <= set(logged[0])


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_continues_exactly(tmp_path):
    base = tiny_base("llama")
    dataset = make_dataset(num_rows=20)  # 5 batches per epoch, so the run crosses epoch boundaries
    config = quick_config(max_steps=8, save_steps=3, lr_gates=0.2)

    uninterrupted = learn_masks(base, dataset, config, str(tmp_path / "whole"))
    learn_masks(base, dataset, config, str(tmp_path / "parts"), callbacks=[StopAt(6)])
    checkpoint = tmp_path / "parts" / "checkpoint-6"
    resumed = learn_masks(base, dataset, config, str(tmp_path / "parts"), resume_from_checkpoint=str(checkpoint))

    assert resumed.gate_scores == uninterrupted.gate_scores
    assert resumed.history == uninterrupted.history
    assert [record["step"] for record in resumed.history] == list(range(1, 9))
    assert resumed.mask_bank == uninterrupted.mask_bank

    # The checkpoint contains the objective's own state and Trainer's states as safetensors and JSON, no pickle.
    assert set(os.listdir(checkpoint)) == {
        "model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", "rng_state.safetensors",
        "rng_state.json", "trainer_state.json", "training_args.json",
    }
    saved = safetensors.torch.load_file(checkpoint / "model.safetensors")
    assert set(saved) == {"gates.shared_log_alpha", "gates.log_alpha", "gates.rows_sampled", "lambda_1", "lambda_2",
                          "initial_sparsity"}
    summary = json.loads((tmp_path / "parts" / "mask_learning.json").read_text())
    assert summary["mask_bank"] == resumed.mask_bank

    plot = tmp_path / "history.png"
    plot_training_curves(resumed.history, 0.25, plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stock_trainer_trains_objective(tmp_path):
    base = tiny_base("llama")
    config = MaskLearningConfig(init="constant", init_log_alpha=2.0, loss="kl", target_warmup_fraction=0.0)
    objective = L0MaskObjective(base, config, num_clusters=2)
    start = objective.gates.log_alpha.detach().clone()
    gap = (objective.expected_sparsity() - objective.current_target()).detach()
    trainer = Trainer(
        model=objective,
        args=training_args(tmp_path, max_steps=2),
        train_dataset=make_dataset(),
        data_collator=pad_batch,
        optimizers=(objective.create_optimizer(), None),
        callbacks=[MaskLearningCallback(objective)],
    )
    trainer.train()

    # The sparsity is below the target, so the ascent makes lambda_1 negative and lambda_2 larger.
    assert bool((gap < 0).all())
    assert bool((objective.lambda_1 < 0).all())
    assert bool((objective.lambda_2 > config.init_lambda_2).all())
    assert not torch.equal(objective.gates.log_alpha, start)
    history = [entry["mask_learning"] for entry in trainer.state.log_history if "mask_learning" in entry]
    assert len(history) == 2
    assert all(record["task_loss"] > 0 for record in history)


# -- binarisation ----------------------------------------------------------------------------------------------------


def test_binarize_blocks_skips_exact_count():
    scores = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    for target in (0.1, 0.25, 0.5, 0.85):
        bank = binarize(scores, None, target)
        count = round(target * 10)
        for cluster, mask in enumerate(bank):
            skipped = {block for block, keep in enumerate(mask) if not keep}
            assert len(skipped) == count
            assert skipped == set(scores[cluster].argsort()[:count].tolist())


def test_binarize_costs_reaches_target_minimally():
    config = tiny_base("llama").config
    costs = block_costs(config, "params")
    scores = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    for target in (0.2, 0.45, 0.7):
        for cluster, mask in enumerate(binarize(scores, costs, target)):
            keep = torch.tensor(mask, dtype=torch.bool)
            skipped_cost = float(costs[~keep].sum())
            assert skipped_cost >= target - 1e-12
            # The skipped blocks are the lowest scores, and without the last one the target is missed.
            order = scores[cluster].argsort().tolist()
            count = int((~keep).sum())
            assert set(order[:count]) == set((~keep).nonzero().flatten().tolist())
            assert skipped_cost - float(costs[order[count - 1]]) < target


def test_binarize_shared_budget():
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-5.0, -4.0, -3.0, 9.0]])
    bank = binarize(scores, None, 0.5, same_count=False)
    # Budget 2 x 2 blocks, taken from the lowest scores overall: three from cluster 1 (its last block stays) and
    # the lowest of cluster 0.
    assert bank == [[0, 1, 1, 1], [0, 0, 0, 1]]


def test_binarize_never_empties_a_cluster():
    scores = torch.tensor([[-9.0, -9.0, -9.0, -9.0], [5.0, 5.0, 5.0, 5.0]])
    bank = binarize(scores, None, 0.6, same_count=False)
    assert all(sum(mask) >= 1 for mask in bank)
    assert sum(4 - sum(mask) for mask in bank) == 2 * round(0.6 * 4)
    with pytest.raises(ValueError, match="leaves none"):
        binarize(scores, None, 0.9)
    with pytest.raises(ValueError, match="target must be in"):
        binarize(scores, None, 1.0)


def test_binarize_accepts_gates():
    gates = HardConcreteGates(2, 4)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor([[3.0, -1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0]]))
    assert binarize(gates, None, 0.5) == [[1, 0, 1, 0], [0, 0, 1, 1]]


# -- configuration and input checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"target_sparsity": 1.2}, "target_sparsity"),
        ({"sparsity_unit": "layers"}, "sparsity_unit"),
        ({"loss": "mse"}, "loss"),
        ({"init": "random"}, "init"),
        ({"limit_left": 0.1}, "stretch limits"),
        ({"max_steps": 0}, "max_steps"),
    ],
)
def test_config_rejects_invalid_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        MaskLearningConfig(**overrides)


def test_learn_masks_rejects_bad_datasets(tmp_path):
    base = tiny_base("llama")
    with pytest.raises(ValueError, match="cluster_ids"):
        learn_masks(base, make_dataset().remove_columns("cluster_ids"), quick_config(), str(tmp_path))
    with pytest.raises(ValueError, match=r"Clusters \[1\]"):
        learn_masks(base, make_dataset(num_clusters=1), quick_config(), str(tmp_path), num_clusters=2)
    with pytest.raises(ValueError, match="init_scores"):
        L0MaskObjective(base, MaskLearningConfig(init="block_influence"))
