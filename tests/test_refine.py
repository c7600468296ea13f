"""Mask refinement against a brute-force search scored by an independent reference loss.

The reference loss runs the plain base model with skipped blocks replaced by zero-update modules (never the IGP model
that `refine_masks` uses), one text at a time, and averages the next-token loss over all tokens.
"""

import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import identity_blocks, tiny_base
from igp_training import cli
from igp_training.data import tokenize_calibration
from igp_training.refine import MaskRefinementConfig, refine_masks

NUM_LAYERS = 4
TEXTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Weng earns 12 dollars an hour for babysitting. Yesterday she did 50 minutes of babysitting.",
    "Betty is saving money for a new wallet which costs 100 dollars.",
    "def add(a, b):\n    return a + b",
    "SELECT name FROM users WHERE age > 30 ORDER BY name;",
    "for index in range(10):\n    print(index * index)",
]
CLUSTERS = [0, 0, 0, 1, 1, 1]


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
def dataset(tokenizer):
    return tokenize_calibration(TEXTS, tokenizer, max_length=32, cluster_ids=CLUSTERS)


@torch.no_grad()
def reference_loss(base, dataset, cluster, mask) -> float:
    """Mean next-token loss over every token of the cluster's texts, with skipped blocks as the identity."""
    total, count = 0.0, 0
    with identity_blocks(base, mask):
        for row in dataset:
            if row["cluster_ids"] != cluster:
                continue
            input_ids = torch.tensor([row["input_ids"]])
            tokens = input_ids.shape[1] - 1
            total += float(base(input_ids, labels=input_ids, use_cache=False).loss) * tokens
            count += tokens
    return total / count


def single_swaps(mask):
    for skip in range(len(mask)):
        for run in range(len(mask)):
            if mask[skip] and not mask[run]:
                swapped = list(mask)
                swapped[skip], swapped[run] = 0, 1
                yield swapped


BANK = [[1, 1, 0, 1, 1, 0, 1, 1], [1, 0, 1, 1, 0, 1, 1, 1]]


def test_full_window_finds_best_swap(base, dataset):
    scores = torch.randn(2, 2 * NUM_LAYERS, generator=torch.Generator().manual_seed(0))
    config = MaskRefinementConfig(rounds=1, window=2 * NUM_LAYERS, use_bank=False, min_improvement=0.0,
                                  max_examples=len(TEXTS))

    result = refine_masks(base, dataset, BANK, scores, config)

    for cluster, mask in enumerate(BANK):
        candidates = [mask, *single_swaps(mask)]
        losses = [reference_loss(base, dataset, cluster, candidate) for candidate in candidates]
        assert result.mask_bank[cluster] == candidates[losses.index(min(losses))]
        assert result.clusters[cluster]["final_loss"] == pytest.approx(min(losses), rel=1e-4)
        assert result.clusters[cluster]["initial_loss"] == pytest.approx(losses[0], rel=1e-4)


def test_bank_choice_picks_lowest_loss(base, dataset):
    config = MaskRefinementConfig(rounds=0, min_improvement=0.0, max_examples=len(TEXTS))

    result = refine_masks(base, dataset, BANK, torch.zeros(2, 2 * NUM_LAYERS), config)

    for cluster in range(2):
        losses = [reference_loss(base, dataset, cluster, mask) for mask in BANK]
        assert result.mask_bank[cluster] == BANK[losses.index(min(losses))]
        assert result.clusters[cluster]["start"] == losses.index(min(losses))


def test_swaps_never_lower_the_skipped_parameter_count(base, dataset):
    # In parameters, an MLP block costs more than an attention block, so only swaps that skip a block at least as
    # large as the one they restore are allowed.
    sizes = []
    for layer in base.model.layers:
        sizes += [sum(p.numel() for p in layer.self_attn.parameters()), sum(p.numel() for p in layer.mlp.parameters())]
    scores = torch.randn(2, 2 * NUM_LAYERS, generator=torch.Generator().manual_seed(1))
    config = MaskRefinementConfig(rounds=3, window=2 * NUM_LAYERS, use_bank=False, min_improvement=0.0,
                                  sparsity_unit="params", max_examples=len(TEXTS))

    result = refine_masks(base, dataset, BANK, scores, config)

    for before, after in zip(BANK, result.mask_bank):
        skipped = lambda mask: sum(size for size, keep in zip(sizes, mask) if not keep)  # noqa: E731
        assert skipped(after) >= skipped(before)
        assert sum(after) == sum(before)


def test_no_candidate_beats_an_impossible_improvement(base, dataset):
    config = MaskRefinementConfig(rounds=2, window=2 * NUM_LAYERS, min_improvement=1.0)

    result = refine_masks(base, dataset, BANK, torch.zeros(2, 2 * NUM_LAYERS), config)

    assert result.mask_bank == BANK
    assert all(record["swaps"] == [] for record in result.clusters)


def test_refine_rejects_mismatched_scores(base, dataset):
    with pytest.raises(ValueError, match=r"gate_scores \(2, 5\)"):
        refine_masks(base, dataset, BANK, torch.zeros(2, 5))


@pytest.mark.parametrize("field, value", [("rounds", -1), ("window", 0), ("max_examples", 0),
                                          ("min_improvement", -0.1), ("sparsity_unit", "layers")])
def test_config_rejects_invalid_values(field, value):
    with pytest.raises(ValueError, match=field):
        MaskRefinementConfig(**{field: value})


# -- the command ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def baseline_dir(base, tokenizer, tmp_path_factory):
    from igp_training.baselines import BaselineConfig, make_baseline
    from igp_training.evaluation import resolve_data_dir

    try:
        data_dir = resolve_data_dir(None)
    except FileNotFoundError:
        pytest.skip("benchmark data folder not found (set IGP_DATA_DIR)")
    base_folder = tmp_path_factory.mktemp("tiny_base")
    base.save_pretrained(base_folder)
    tokenizer.save_pretrained(base_folder)
    folder = tmp_path_factory.mktemp("block_bi")
    spec = f"{data_dir / 'gsm8k' / 'train.jsonl'}:question+answer@6"
    make_baseline(BaselineConfig(method="block-bi", sparsity=1 / NUM_LAYERS, calibration=spec, max_length=32), folder,
                  model=str(base_folder), overwrite=True)
    return folder


def folder_digest(folder) -> dict:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.rglob("*"))
            if path.is_file()}


def test_refine_command_saves_a_refined_copy(baseline_dir, tmp_path):
    before = folder_digest(baseline_dir)
    output = tmp_path / "refined"

    code = cli.main(["refine", str(baseline_dir), "--output", str(output), "--examples", "4", "--window", "2",
                     "--min-improvement", "0"])

    assert code == 0
    assert folder_digest(baseline_dir) == before
    original = json.loads((baseline_dir / "config.json").read_text())["mask_bank"]
    refined = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True)
    record = json.loads((output / "igp_run.json").read_text())
    assert sum(refined.config.mask_bank[0]) == sum(original[0])
    assert record["masks"]["mask_bank"] == refined.config.mask_bank
    assert record["refinement"]["initial_mask_bank"] == original
    assert record["refinement"]["clusters"][0]["examples"] == 4
    assert record["refinement"]["clusters"][0]["final_loss"] <= record["refinement"]["clusters"][0]["initial_loss"]


@pytest.mark.parametrize("arguments, message", [
    (["--output", "{model}"], "is the input folder"),
    (["--output", "{model}/../missing", "--rounds", "-1"], "rounds must be at least 0"),
])
def test_refine_command_rejects_bad_input(arguments, message, baseline_dir, capsys):
    arguments = [argument.format(model=baseline_dir) for argument in arguments]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["refine", str(baseline_dir), *arguments])

    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_refine_command_refuses_existing_output(baseline_dir, tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        cli.main(["refine", str(baseline_dir), "--output", str(tmp_path)])

    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "config.json").read_text() == "{}"


def test_refine_command_needs_a_model_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["refine", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")])

    assert "no config.json" in capsys.readouterr().err
