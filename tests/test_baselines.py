"""Static baselines: masks against Block Influence recomputed from the base model's hidden states, and saved folders.

The reference Block Influence here never hooks into the model. Layer scores come from `output_hidden_states` of the
base model with its final norm swapped for the identity (so the last entry is the last layer's raw output). The
residual stream between a layer's attention and MLP sub-blocks comes from a second run in which that layer's MLP
adds zero, so the layer's output equals its post-attention stream.
"""

import json
import sys

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import ZeroMLP, tiny_base
from igp_training import cli
from igp_training.baselines import (
    BaselineConfig,
    block_influence_mask,
    calibration_batches,
    lowest_score_mask,
    make_baseline,
    num_skipped_blocks,
    random_mask,
)

NUM_LAYERS = 6
TEXTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "def add(a, b):\n    return a + b",
    "The castle stood on a hill above the river.",
    "Rain fell all night, and by morning the streets were rivers.",
    "SELECT name FROM users WHERE age > 30;",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from igp_training.assets import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def base(tokenizer):
    return tiny_base("llama", num_hidden_layers=NUM_LAYERS, vocab_size=len(tokenizer),
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def batches(tokenizer):
    return calibration_batches(TEXTS, tokenizer, max_length=32, batch_size=2)


# -- reference Block Influence ----------------------------------------------------------------------------------------


def _raw_hidden_states(model, batch):
    """Hidden states of every layer boundary, the last one before the final norm."""
    saved = model.model.norm
    model.model.norm = nn.Identity()
    try:
        with torch.no_grad():
            output = model(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    finally:
        model.model.norm = saved
    return output.hidden_states


def _post_attention_state(model, batch, layer_idx):
    """The residual stream after layer `layer_idx`'s attention: its output when its MLP adds zero."""
    layer = model.model.layers[layer_idx]
    saved = layer.mlp
    layer.mlp = ZeroMLP()
    try:
        return _raw_hidden_states(model, batch)[layer_idx + 1]
    finally:
        layer.mlp = saved


def reference_block_influence(model, batches, granularity):
    totals, count = None, 0
    for batch in batches:
        states = _raw_hidden_states(model, batch)
        if granularity == "layer":
            boundaries = list(states)
        else:
            boundaries = [states[0]]
            for layer_idx in range(NUM_LAYERS):
                boundaries += [_post_attention_state(model, batch, layer_idx), states[layer_idx + 1]]
        tokens = batch["attention_mask"].bool()
        scores = torch.stack([
            (1 - torch.cosine_similarity(before.double(), after.double(), dim=-1))[tokens].sum()
            for before, after in zip(boundaries[:-1], boundaries[1:])
        ])
        totals = scores if totals is None else totals + scores
        count += int(tokens.sum())
    return totals / count


def _expected_mask(scores, num_skipped, per_layer):
    order = sorted(range(len(scores)), key=lambda index: (float(scores[index]), index))
    mask = [1] * (2 * NUM_LAYERS)
    for index in order[: num_skipped // 2 if per_layer else num_skipped]:
        if per_layer:
            mask[2 * index] = mask[2 * index + 1] = 0
        else:
            mask[index] = 0
    return mask


# -- masks ------------------------------------------------------------------------------------------------------------


def test_num_skipped_blocks_rounds_to_whole_layers():
    assert num_skipped_blocks(30, 4 / 30) == 8
    assert num_skipped_blocks(30, 8 / 30) == 16
    assert num_skipped_blocks(30, 0.125) == 8  # 3.75 layers -> 4
    assert num_skipped_blocks(30, 0.25) == 16  # 7.5 layers -> 8: halves round up
    assert num_skipped_blocks(30, 0.0) == 0


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 0.99, 0.01])
def test_num_skipped_blocks_rejects_invalid(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        num_skipped_blocks(30, sparsity)


def test_shortgpt_mask_matches_reference(base, batches):
    mask, scores = block_influence_mask(base, batches, 4, "layer")
    expected_scores = reference_block_influence(base, batches, "layer")

    assert torch.allclose(torch.tensor(scores, dtype=torch.float64), expected_scores, atol=1e-6)
    assert mask == _expected_mask(expected_scores.tolist(), 4, per_layer=True)
    assert sum(mask) == 2 * NUM_LAYERS - 4
    assert all(mask[2 * layer] == mask[2 * layer + 1] for layer in range(NUM_LAYERS))


def test_block_bi_mask_matches_reference(base, batches):
    mask, scores = block_influence_mask(base, batches, 4, "block")
    expected_scores = reference_block_influence(base, batches, "block")

    assert torch.allclose(torch.tensor(scores, dtype=torch.float64), expected_scores, atol=1e-6)
    assert mask == _expected_mask(expected_scores.tolist(), 4, per_layer=False)
    assert sum(mask) == 2 * NUM_LAYERS - 4


def test_lowest_score_mask_breaks_ties_by_position():
    assert lowest_score_mask([0.5, 0.1, 0.1, 0.9], 2, 4) == [1, 0, 0, 1]
    assert lowest_score_mask([0.3, 0.3], 2, 4) == [0, 0, 1, 1]


def test_lowest_score_mask_rejects_odd_layer_count():
    with pytest.raises(ValueError, match="even"):
        lowest_score_mask([0.1, 0.2], 1, 4)


def test_random_mask_is_seeded():
    first, again, other = random_mask(60, 16, seed=1), random_mask(60, 16, seed=1), random_mask(60, 16, seed=2)

    assert first == again
    assert first != other
    assert sum(first) == 44
    assert sum(other) == 44


# -- saved baselines --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dir(base, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_base")
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def calibration_spec():
    from igp_training.evaluation import resolve_data_dir

    try:
        data_dir = resolve_data_dir(None)
    except FileNotFoundError:
        pytest.skip("benchmark data folder not found (set IGP_DATA_DIR)")
    return f"{data_dir / 'gsm8k' / 'train.jsonl'}:question+answer@6"


@pytest.mark.parametrize("method", ["dense", "shortgpt", "block-bi", "random"])
def test_make_baseline_saves_loadable_model(method, base_dir, calibration_spec, tmp_path):
    config = BaselineConfig(method=method, sparsity=2 / NUM_LAYERS, calibration=calibration_spec, max_length=32, seed=3)
    model, record = make_baseline(config, tmp_path / method, model=str(base_dir))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / method)
    saved_record = json.loads((tmp_path / method / "igp_run.json").read_text())

    expected_skipped = 0 if method == "dense" else 4
    assert loaded.config.mask_bank == record["masks"]["mask_bank"]
    assert loaded.config.num_clusters == 1
    assert saved_record["method"] == method
    assert saved_record["masks"]["sparsity"]["blocks_skipped"] == [expected_skipped]
    assert set(saved_record["masks"]["sparsity"]) >= {"blocks", "params", "flops"}
    input_ids, cluster = torch.tensor([[5, 6, 7, 8]]), torch.tensor([0])
    assert torch.allclose(loaded(input_ids, cluster_ids=cluster).logits, model(input_ids, cluster_ids=cluster).logits,
                          atol=1e-5)


def test_make_baseline_refuses_existing_folder(base_dir, tmp_path):
    make_baseline(BaselineConfig(method="dense"), tmp_path, model=str(base_dir))

    with pytest.raises(FileExistsError, match="overwrite"):
        make_baseline(BaselineConfig(method="dense"), tmp_path, model=str(base_dir))


def test_static_l0_runs_pipeline_with_one_cluster(base_dir, calibration_spec, tmp_path):
    from igp_training.l0 import MaskLearningConfig

    config = BaselineConfig(method="static-l0", sparsity=2 / NUM_LAYERS, calibration=calibration_spec, max_length=32)
    model, record = make_baseline(config, tmp_path / "l0", model=str(base_dir),
                                  mask_learning=MaskLearningConfig(max_steps=2, batch_size=2, influence_examples=4))

    assert record["method"] == "static-l0"
    assert len(record["masks"]["mask_bank"]) == 1
    assert record["masks"]["sparsity"]["blocks_skipped"] == [4]
    assert json.loads((tmp_path / "l0" / "igp_run.json").read_text())["method"] == "static-l0"


def test_static_l0_refine_matches_command(base_dir, calibration_spec, tmp_path):
    from igp_training.l0 import MaskLearningConfig
    from igp_training.refine import MaskRefinementConfig

    # The reference is the unrefined baseline refined afterwards by `igp refine` with the same settings. Both accept
    # any improvement, because on the tiny random model no swap lowers the loss by the default 0.2%.
    learning = MaskLearningConfig(max_steps=2, batch_size=2, influence_examples=4)
    config = BaselineConfig(method="static-l0", sparsity=2 / NUM_LAYERS, calibration=calibration_spec, max_length=32)
    make_baseline(config, tmp_path / "l0", model=str(base_dir), mask_learning=learning)
    assert cli.main(["refine", str(tmp_path / "l0"), "--output", str(tmp_path / "l0-refined"), "--examples", "6",
                     "--min-improvement", "0"]) == 0
    reference = json.loads((tmp_path / "l0-refined" / "igp_run.json").read_text())

    config.refine = MaskRefinementConfig(max_examples=6, min_improvement=0.0)
    _, record = make_baseline(config, tmp_path / "l0r", model=str(base_dir), mask_learning=learning)

    learned = json.loads((tmp_path / "l0" / "igp_run.json").read_text())["masks"]["mask_bank"]
    assert record["method"] == "static-l0"
    assert record["refinement"]["initial_mask_bank"] == learned
    assert record["refinement"]["clusters"][0]["examples"] == 6
    assert record["masks"]["mask_bank"] == reference["masks"]["mask_bank"]
    assert record["masks"]["mask_bank"] != learned, "choose a setting in which refinement changes the mask"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "l0r").config.mask_bank == record["masks"]["mask_bank"]


def test_baseline_command_writes_folder(base_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["igp", "baseline"])
    status = cli.main(["baseline", "--method", "random", "--sparsity", str(2 / NUM_LAYERS), "--model", str(base_dir),
                       "--output", str(tmp_path / "random"), "--seed", "5"])

    assert status == 0
    assert "skipped 4 blocks" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "random").config.mask_bank == [random_mask(12, 4, 5)]


def test_baseline_command_rejects_zero_sparsity(base_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["baseline", "--method", "shortgpt", "--sparsity", "0", "--model", str(base_dir),
                  "--output", str(tmp_path / "x")])

    assert exit_info.value.code == 2
    assert "--sparsity 0" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (["--method", "random", "--sparsity", "0.99"], "would skip all 6 layers"),
    (["--method", "shortgpt", "--calibration", "{empty}"], "is empty"),
    (["--method", "shortgpt", "--calibration", "{records}:body"], "no column 'body'"),
    (["--method", "static-l0", "--calibration", "{empty}", "--steps", "1"], "is empty"),
    (["--method", "shortgpt", "--refine-examples", "8"], "or run `igp refine` on the saved folder"),
])
def test_baseline_command_invalid_input_exit_2(arguments, message, base_dir, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "records.jsonl").write_text('{"text": "a calibration text"}\n')
    arguments = [argument.format(empty=tmp_path / "empty.txt", records=tmp_path / "records.jsonl")
                 for argument in arguments]

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["baseline", *arguments, "--model", str(base_dir), "--output", str(tmp_path / "x")])

    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
