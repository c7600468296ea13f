"""The prune pipeline end to end on a tiny random Llama with SmolLM2's tokenizer, real text and the packaged MiniLM."""

import json
from dataclasses import replace

import matplotlib.image
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import reference_logits, tiny_base
from igp_training import l0
from igp_training.data import load_calibration
from igp_training.l0 import MaskLearningConfig
from igp_training.pipeline import (
    MASK_BANK_PLOT,
    RUN_RECORD_FILE,
    TRAINING_PLOT,
    PruneConfig,
    PruneInputError,
    hamming_distances,
    plot_mask_bank,
    prune,
)

# Real GSM8K problems and HumanEval prompts: two domains that the router separates.
CALIBRATION = "embedded-gsm8k:question@12,embedded-humaneval:prompt@12"
STEPS = 6


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama with SmolLM2's vocabulary, saved with the tokenizer as a model folder."""
    tokenizer = smollm2_tokenizer
    base = tiny_base("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("tiny-llama")
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_config(tiny_model_dir, output_dir, **overrides) -> PruneConfig:
    settings = dict(output_dir=str(output_dir), model=str(tiny_model_dir), calibration=CALIBRATION, num_clusters=2,
                    sparsity=0.25, max_length=24, heldout_per_source=4, min_cluster_size=4, kmeans_restarts=2,
                    save_steps=3)
    settings.update(overrides)
    return PruneConfig(**settings)


LEARNING = MaskLearningConfig(max_steps=STEPS, batch_size=4, logging_steps=2, influence_examples=8)


@pytest.fixture(scope="module")
def pruned(tiny_model_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("pruned")
    result = prune(run_config(tiny_model_dir, output_dir), LEARNING, argv=["igp", "prune", "(test)"])
    return result, output_dir


def test_saved_model_loads_and_routes_domains(pruned):
    result, output_dir = pruned
    model = AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True)
    assert model.config.model_type == "igp"
    assert model.config.num_clusters == 2

    # Each domain's calibration texts form one cluster; find which.
    composition = result.record["clustering"]["composition"]
    math_cluster = next(c for c, sources in enumerate(composition) if "embedded-gsm8k:question" in sources)
    code_cluster = next(c for c, sources in enumerate(composition) if "embedded-humaneval:prompt" in sources)
    assert math_cluster != code_cluster

    # Held-out texts of the same domains (never used for calibration) go to their own domain's cluster.
    texts = load_calibration(CALIBRATION, seed=0, heldout_per_source=4)
    routed = model.route(texts.heldout_texts).tolist()
    for cluster, source in zip(routed, texts.heldout_sources):
        assert cluster == (math_cluster if "gsm8k" in source else code_cluster), source

    math_question = "A baker sells 24 muffins a day at $3 each. How much money does he make in a week?"
    code_prompt = 'def reverse_words(sentence: str) -> str:\n    """Return the words of sentence in reverse order."""\n'
    assert model.route([math_question, code_prompt]).tolist() == [math_cluster, code_cluster]


def test_saved_logits_match_identity_reference(pruned, tiny_model_dir):
    _, output_dir = pruned
    model = AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    input_ids = torch.tensor([[5, 17, 300, 4000, 12, 9]])
    for cluster, mask in enumerate(model.config.mask_bank):
        with torch.no_grad():
            logits = model(input_ids, cluster_ids=torch.tensor([cluster]), use_cache=False).logits
        torch.testing.assert_close(logits, reference_logits(base, input_ids, mask), atol=1e-5, rtol=1e-5)


def test_masks_meet_target_exactly(pruned):
    result, _ = pruned
    bank = np.asarray(result.record["masks"]["mask_bank"])
    assert bank.shape == (2, 8)
    # 25% of 8 blocks: every cluster skips exactly 2.
    assert (bank == 0).sum(axis=1).tolist() == [2, 2]
    assert result.record["masks"]["sparsity"]["blocks"] == [0.25, 0.25]
    assert result.model.config.mask_bank == bank.tolist()


def test_run_record_contents(pruned):
    result, output_dir = pruned
    record = json.loads((output_dir / RUN_RECORD_FILE).read_text())
    assert record["timings_s"] == result.record["timings_s"]

    assert record["settings"]["prune"]["num_clusters"] == 2
    assert record["settings"]["mask_learning"]["max_steps"] == STEPS
    assert record["versions"]["torch"] == torch.__version__
    assert record["calibration"]["num_texts"] == 24
    assert record["calibration"]["num_heldout_texts"] == 8
    assert sum(record["clustering"]["sizes"]) == 24
    assert record["clustering"]["heldout_routing"]["embedded-gsm8k:question"] in ([4, 0], [0, 4])

    bank = record["masks"]["mask_bank"]
    expected_hamming = [[sum(a != b for a, b in zip(first, second)) for second in bank] for first in bank]
    assert record["masks"]["hamming_distances"] == expected_hamming
    for unit in ("blocks", "params", "flops"):
        assert len(record["masks"]["sparsity"][unit]) == 2
    names = record["masks"]["block_names"]
    assert record["masks"]["skipped_blocks"] == [[names[k] for k, keep in enumerate(mask) if not keep] for mask in bank]

    history = record["mask_learning"]["history"]
    assert [row["step"] for row in history] == list(range(1, STEPS + 1))
    assert all(len(row["expected_sparsity"]) == 2 for row in history)
    for phase in ("load model", "calibration data", "clustering", "tokenisation", "mask learning", "save model",
                  "report", "total"):
        assert record["timings_s"][phase] >= 0, phase


def test_centroids_saved_normalised(pruned):
    result, _ = pruned
    centroids = np.asarray(result.model.config.centroids)
    assert centroids.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)


def test_plots_written(pruned):
    _, output_dir = pruned
    for name in (MASK_BANK_PLOT, TRAINING_PLOT):
        image = matplotlib.image.imread(output_dir / name)
        assert image.ndim == 3, name
        assert image.shape[0] > 100, name
        assert image.shape[1] > 300, name


def test_no_checkpoints_left(pruned):
    _, output_dir = pruned
    assert not (output_dir / "mask_learning").exists()


def test_refinement_keeps_block_counts_and_is_recorded(tiny_model_dir, tmp_path):
    from igp_training.prune_cmd import format_summary
    from igp_training.refine import MaskRefinementConfig

    refine = MaskRefinementConfig(rounds=1, window=2, min_improvement=0.0, max_examples=4, global_examples=8)
    result = prune(run_config(tiny_model_dir, tmp_path, refine=refine), LEARNING, argv=["igp", "prune", "(test)"])
    record = json.loads((tmp_path / RUN_RECORD_FILE).read_text())
    saved = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)

    learned, refined = record["refinement"]["initial_mask_bank"], record["masks"]["mask_bank"]
    assert saved.config.mask_bank == refined
    assert [sum(mask) for mask in refined] == [sum(mask) for mask in learned]
    for entry in record["refinement"]["clusters"]:
        assert entry["examples"] == 4
        assert entry["final_loss"] <= entry["initial_loss"]
    assert len(record["refinement"]["global_mask"]) == len(learned[0])
    assert record["refinement"]["global_search"]["examples"] == 8
    assert "refinement" in record["timings_s"]
    assert "refinement changed" in format_summary(result.record, tmp_path)


def test_resume_accepts_older_settings_file(tiny_model_dir, tmp_path):
    # A run saved before shared gates, influence scopes and balanced sampling existed used independent gates, one
    # sample and uniform draws.
    from igp_training import pipeline

    config = run_config(tiny_model_dir, tmp_path / "run", resume=True)
    learning_dir = tmp_path / "run" / "mask_learning"
    (learning_dir / "checkpoint-2").mkdir(parents=True)
    old_behaviour = replace(LEARNING, shared_gates=False, influence_scope="all")
    pipeline._record_resume_settings(learning_dir, replace(config, resume=False), old_behaviour)
    path = learning_dir / "run_settings.json"
    saved = json.loads(path.read_text())
    for name in ("shared_gates", "influence_scope", "balanced_sampling"):
        del saved["mask_learning"][name]
    path.write_text(json.dumps(saved))

    pipeline._record_resume_settings(learning_dir, config, old_behaviour)
    with pytest.raises(ValueError, match=r"shared_gates \(False -> True\)"):
        pipeline._record_resume_settings(learning_dir, config, replace(LEARNING, shared_gates=True))
    with pytest.raises(ValueError, match=r"balanced_sampling \(False -> True\)"):
        pipeline._record_resume_settings(learning_dir, config, replace(old_behaviour, balanced_sampling=True))


def test_resume_after_interruption(pruned, tiny_model_dir, tmp_path, monkeypatch):
    result, _ = pruned
    output_dir = tmp_path / "resumed"

    # Interrupt the run during step 5, after the checkpoint of step 3 was written.
    original_on_step_end = l0.MaskLearningCallback.on_step_end

    def interrupt_at_step_5(self, args, state, control, **kwargs):
        if state.global_step == 5:
            raise KeyboardInterrupt
        return original_on_step_end(self, args, state, control, **kwargs)

    monkeypatch.setattr(l0.MaskLearningCallback, "on_step_end", interrupt_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        prune(run_config(tiny_model_dir, output_dir), LEARNING)
    monkeypatch.setattr(l0.MaskLearningCallback, "on_step_end", original_on_step_end)
    assert (output_dir / "mask_learning" / "checkpoint-3").is_dir()
    assert not (output_dir / "config.json").exists()

    with pytest.raises(PruneInputError, match="--resume"):
        prune(run_config(tiny_model_dir, output_dir), LEARNING)
    with pytest.raises(PruneInputError, match=r"changed settings: sparsity \(0.25 -> 0.5\)"):
        prune(run_config(tiny_model_dir, output_dir, resume=True, sparsity=0.5), LEARNING)

    resumed = prune(run_config(tiny_model_dir, output_dir, resume=True), LEARNING)
    np.testing.assert_allclose(resumed.record["mask_learning"]["gate_scores"],
                               result.record["mask_learning"]["gate_scores"], rtol=0, atol=1e-6)
    assert resumed.record["masks"]["mask_bank"] == result.record["masks"]["mask_bank"]


def test_existing_output_needs_overwrite(pruned, tiny_model_dir):
    _, output_dir = pruned
    with pytest.raises(PruneInputError, match="already contains a saved model"):
        prune(run_config(tiny_model_dir, output_dir), LEARNING)
    with pytest.raises(PruneInputError, match="finished run and no checkpoint"):
        prune(run_config(tiny_model_dir, output_dir, resume=True), LEARNING)


@pytest.mark.parametrize("overrides, message", [
    (dict(sparsity=1.0), "strictly between 0 and 1"),
    (dict(sparsity=0.0), "strictly between 0 and 1"),
    (dict(sparsity_unit="layers"), "Unknown sparsity unit"),
    (dict(num_clusters=25), "more clusters than texts"),
    (dict(min_cluster_size=13), "fewer than the minimum of 13"),
    (dict(calibration="/nonexistent/texts.jsonl"), "not found"),
    (dict(model="/nonexistent/model-folder"), "not found|Could not load"),
])
def test_invalid_inputs(tiny_model_dir, tmp_path, overrides, message):
    config = run_config(tiny_model_dir, tmp_path / "out", **overrides)
    with pytest.raises(PruneInputError, match=message):
        prune(config, replace(LEARNING, max_steps=1))


def test_hamming_distances_table():
    bank = [[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 1, 1]]
    assert hamming_distances(bank) == [[0, 2, 4], [2, 0, 2], [4, 2, 0]]


def test_mask_bank_plot_colours(tmp_path):
    path = plot_mask_bank([[1, 0, 0, 1], [0, 1, 1, 0]], tmp_path / "bank.png")
    pixels = matplotlib.image.imread(path)[..., :3].reshape(-1, 3)
    # Both kept colours (attention blue #3b75af, MLP orange #ef8636) and the skipped white appear.
    for hex_colour in ("3b75af", "ef8636", "ffffff"):
        colour = np.array([int(hex_colour[i : i + 2], 16) / 255 for i in (0, 2, 4)])
        assert np.abs(pixels - colour).max(axis=1).min() < 0.02, hex_colour
