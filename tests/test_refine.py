"""Mask refinement against a brute-force search scored by an independent reference loss.

The reference loss runs the plain base model with skipped blocks replaced by zero-update modules (never the IGP model
that `refine_masks` uses), one text at a time, and averages the next-token loss over all tokens.
"""

import hashlib
import json
import shutil
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import identity_blocks, tiny_base
from igp_training import cli
from igp_training.data import load_calibration, tokenize_calibration
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
    # A wider initialisation than the default spreads the candidates' losses over a few percent, so the best one is
    # clear of float rounding.
    return tiny_base("llama", num_hidden_layers=NUM_LAYERS, vocab_size=len(tokenizer), initializer_range=0.3,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return tokenize_calibration(TEXTS, tokenizer, max_length=32, cluster_ids=CLUSTERS)


@torch.no_grad()
def reference_loss(base, dataset, cluster, mask) -> float:
    """Mean next-token loss over every token of the cluster's texts (all texts for None), with skipped blocks as the
    identity."""
    total, count = 0.0, 0
    with identity_blocks(base, mask):
        for row in dataset:
            if cluster is not None and row["cluster_ids"] != cluster:
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
FULL_WINDOW = dict(window=2 * NUM_LAYERS, max_examples=len(TEXTS))


def test_full_window_finds_best_swap(base, dataset):
    scores = torch.randn(2, 2 * NUM_LAYERS, generator=torch.Generator().manual_seed(0))
    config = MaskRefinementConfig(rounds=1, use_bank=False, min_improvement=0.0, **FULL_WINDOW)

    result = refine_masks(base, dataset, BANK, scores, config)

    for cluster, mask in enumerate(BANK):
        candidates = [mask, *single_swaps(mask)]
        losses = [reference_loss(base, dataset, cluster, candidate) for candidate in candidates]
        assert result.mask_bank[cluster] == candidates[losses.index(min(losses))]
        assert result.clusters[cluster]["final_loss"] == pytest.approx(min(losses), rel=1e-5)
        assert result.clusters[cluster]["initial_loss"] == pytest.approx(losses[0], rel=1e-5)


def test_min_improvement_gates_the_swap(base, dataset):
    # The best swap of cluster 0 improves its loss by a relative `gain`: a threshold just above it keeps the mask,
    # one just below applies the swap.
    losses = {tuple(swap): reference_loss(base, dataset, 0, swap) for swap in single_swaps(BANK[0])}
    best = min(losses, key=losses.get)
    gain = 1 - losses[best] / reference_loss(base, dataset, 0, BANK[0])
    assert gain > 0.001

    kept = refine_masks(base, dataset, BANK, torch.zeros(2, 2 * NUM_LAYERS),
                        MaskRefinementConfig(rounds=1, use_bank=False, min_improvement=gain * 1.01, **FULL_WINDOW))
    swapped = refine_masks(base, dataset, BANK, torch.zeros(2, 2 * NUM_LAYERS),
                           MaskRefinementConfig(rounds=1, use_bank=False, min_improvement=gain * 0.99, **FULL_WINDOW))

    assert kept.mask_bank[0] == BANK[0]
    assert swapped.mask_bank[0] == list(best)


def test_bank_choice_picks_lowest_loss(base, dataset):
    # Four masks: three that skip 2 blocks and one that skips only 1, which may not be chosen because it skips less.
    bank = [*BANK, [1, 1, 1, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 0, 1, 1]]
    config = MaskRefinementConfig(rounds=0, min_improvement=0.0, max_examples=len(TEXTS))

    result = refine_masks(base, dataset, bank, torch.zeros(4, 2 * NUM_LAYERS), config, num_clusters=4)

    for cluster in range(2):
        losses = [reference_loss(base, dataset, cluster, mask) for mask in bank[:3]]
        assert result.mask_bank[cluster] == bank[losses.index(min(losses))]
        assert result.clusters[cluster]["start"] == losses.index(min(losses))
    assert result.clusters[2]["examples"] == 0
    assert result.mask_bank[2:] == bank[2:]


def test_global_mask_offered_to_every_cluster(base, dataset):
    # The bank's two masks occur once each, so the global search starts from the first and takes its best single swap
    # over all texts. Each cluster then starts from whichever of its own, the other and the global mask is best.
    config = MaskRefinementConfig(rounds=1, min_improvement=0.0, global_examples=len(TEXTS), **FULL_WINDOW)

    result = refine_masks(base, dataset, BANK, torch.zeros(2, 2 * NUM_LAYERS), config)

    candidates = [BANK[0], *single_swaps(BANK[0])]
    losses = [reference_loss(base, dataset, None, candidate) for candidate in candidates]
    assert result.global_mask == candidates[losses.index(min(losses))]
    assert result.global_record["final_loss"] == pytest.approx(min(losses), rel=1e-5)
    for cluster in range(2):
        offered = {cluster: BANK[cluster], 1 - cluster: BANK[1 - cluster], "global": result.global_mask}
        start_losses = {name: reference_loss(base, dataset, cluster, mask) for name, mask in offered.items()}
        assert result.clusters[cluster]["start"] == min(start_losses, key=start_losses.get)


def window_scores(mask, skip, run):
    """Return gate scores that make (skip, run) the only swap of `mask` in a window of 1."""
    scores = torch.tensor(mask, dtype=torch.float) * 2
    scores[skip] = scores[run] = 1.0
    return scores


def test_clusters_exchange_refined_masks(base, dataset):
    # Both clusters start from one mask, and a window of 1 lets each reach one swap only: X for cluster 0, Y for
    # cluster 1. X and Y are chosen by the reference loss so that each lowers its own cluster's loss, and Y lowers
    # cluster 0's loss more than X does, which cluster 0 can only learn by scoring cluster 1's result.
    start = BANK[0]
    swaps = [tuple(swap) for swap in single_swaps(start)]
    loss = {(cluster, swap): reference_loss(base, dataset, cluster, swap) for cluster in (0, 1) for swap in swaps}
    own = [reference_loss(base, dataset, cluster, start) for cluster in (0, 1)]
    pairs = [(x, y) for x in swaps for y in swaps
             if loss[0, y] < loss[0, x] < own[0] and loss[1, y] < own[1] and loss[1, y] < loss[1, x]]
    assert pairs, "the tiny model offers no pair of swaps that tests the exchange"
    x, y = pairs[0]
    scores = torch.stack([window_scores(start, *_swapped_blocks(start, x)),
                          window_scores(start, *_swapped_blocks(start, y))])
    config = MaskRefinementConfig(rounds=1, window=1, min_improvement=0.0, max_examples=len(TEXTS))

    exchanged = refine_masks(base, dataset, [start, start], scores, config)
    searched_only = refine_masks(base, dataset, [start, start], scores, replace(config, use_bank=False))

    assert searched_only.mask_bank == [list(x), list(y)]
    assert exchanged.mask_bank == [list(y), list(y)]
    assert exchanged.clusters[0]["exchange"]["took"] == 1
    assert exchanged.clusters[0]["exchange"]["own_loss"] == pytest.approx(loss[0, x], rel=1e-5)
    assert exchanged.clusters[0]["exchange"]["candidates"] == [{"cluster": 1,
                                                                "loss": pytest.approx(loss[0, y], rel=1e-5)}]
    assert exchanged.clusters[0]["final_loss"] == pytest.approx(loss[0, x], rel=1e-5)
    assert exchanged.clusters[1]["exchange"]["took"] is None

    # A threshold just above cluster 0's gain keeps its own mask.
    gain = 1 - loss[0, y] / loss[0, x]
    unchanged = refine_masks(base, dataset, [start, start], scores, replace(config, min_improvement=gain * 1.01))
    assert unchanged.mask_bank[0] == list(x)
    assert unchanged.clusters[0]["exchange"]["took"] is None


def test_exchange_keeps_skipped_parameters(base, dataset):
    # Cluster 1 skips two attention blocks, fewer parameters than cluster 0's two MLP blocks, so cluster 0 may not
    # take it in the exchange, whatever its loss.
    bank = [[1, 0, 1, 1, 1, 0, 1, 1], [0, 1, 1, 1, 0, 1, 1, 1]]
    config = MaskRefinementConfig(rounds=0, min_improvement=0.0, max_examples=len(TEXTS), sparsity_unit="params")

    result = refine_masks(base, dataset, bank, torch.zeros(2, 2 * NUM_LAYERS), config)

    assert result.mask_bank[0] == bank[0]
    assert result.clusters[0]["exchange"] is None


def test_exchange_scores_a_larger_sample(base, dataset):
    # Each cluster searches on 1 of its 3 texts but weighs the other cluster's mask on all 3, so the exchange follows
    # the loss over the whole cluster.
    config = MaskRefinementConfig(rounds=0, min_improvement=0.0, max_examples=1, exchange_examples=3)

    result = refine_masks(base, dataset, BANK, torch.zeros(2, 2 * NUM_LAYERS), config)

    for cluster in range(2):
        exchange = result.clusters[cluster]["exchange"]
        searched = BANK[1 - cluster] if result.clusters[cluster]["start"] == 1 - cluster else BANK[cluster]
        other = BANK[cluster] if searched == BANK[1 - cluster] else BANK[1 - cluster]
        assert result.clusters[cluster]["examples"] == 1
        assert exchange["examples"] == 3
        assert exchange["own_loss"] == pytest.approx(reference_loss(base, dataset, cluster, searched), rel=1e-5)
        other_loss = reference_loss(base, dataset, cluster, other)
        assert [candidate["loss"] for candidate in exchange["candidates"]] == [pytest.approx(other_loss, rel=1e-5)]
        assert result.mask_bank[cluster] == (other if other_loss < exchange["own_loss"] else searched)
        # The search's final loss stays that of `searched` on the one sampled text, whichever text it was.
        final = result.clusters[cluster]["final_loss"]
        single = [reference_loss(base, dataset.select([index]), cluster, searched)
                  for index in range(len(dataset)) if dataset[index]["cluster_ids"] == cluster]
        assert final == pytest.approx(min(single, key=lambda value: abs(value - final)), rel=1e-5)


def _swapped_blocks(mask, swapped):
    """Return (skip, run): the block that `swapped` skips and `mask` runs, and the block it runs that `mask` skips."""
    skip = next(index for index, (a, b) in enumerate(zip(mask, swapped)) if a and not b)
    run = next(index for index, (a, b) in enumerate(zip(mask, swapped)) if b and not a)
    return skip, run


def test_swaps_keep_skipped_parameters(base, dataset):
    # In parameters, an MLP block costs more than an attention block, so only swaps that skip a block at least as
    # large as the one they restore are allowed.
    sizes = []
    for layer in base.model.layers:
        sizes += [sum(p.numel() for p in layer.self_attn.parameters()), sum(p.numel() for p in layer.mlp.parameters())]
    scores = torch.randn(2, 2 * NUM_LAYERS, generator=torch.Generator().manual_seed(1))
    config = MaskRefinementConfig(rounds=3, use_bank=False, min_improvement=0.0, sparsity_unit="params", **FULL_WINDOW)

    result = refine_masks(base, dataset, BANK, scores, config)

    assert any(record["swaps"] for record in result.clusters)
    for before, after in zip(BANK, result.mask_bank):
        skipped = lambda mask: sum(size for size, keep in zip(sizes, mask) if not keep)  # noqa: E731
        assert skipped(after) >= skipped(before)
        assert sum(after) == sum(before)


def test_narrow_window_finds_valid_swap(base, dataset):
    # With window 1 in parameters, the weakest kept block (an attention block) cannot take the place of the strongest
    # skipped one (an MLP block), so the window must reach the nearest valid pair instead of coming up empty.
    scores = torch.tensor([[-1.0, 5.0, 4.0, 3.0, 5.0, 2.0, 5.0, 5.0]] * 2)
    mask = [1, 1, 0, 1, 1, 0, 1, 1]
    config = MaskRefinementConfig(rounds=1, window=1, use_bank=False, min_improvement=0.0, sparsity_unit="params")

    result = refine_masks(base, dataset, [mask, mask], scores, config)

    # Each cluster scores its own mask and one swap.
    assert result.candidates_scored == 2 * 2


def test_refine_rejects_mismatched_scores(base, dataset):
    with pytest.raises(ValueError, match=r"gate_scores \(2, 5\)"):
        refine_masks(base, dataset, BANK, torch.zeros(2, 5))


@pytest.mark.parametrize("field, value", [("rounds", -1), ("window", 0), ("max_examples", 0), ("global_examples", -1),
                                          ("min_improvement", -0.1), ("min_improvement", 1.0),
                                          ("min_improvement", float("nan")), ("sparsity_unit", "layers")])
def test_config_rejects_invalid_values(field, value):
    with pytest.raises(ValueError, match=field):
        MaskRefinementConfig(**{field: value})


# -- the command ------------------------------------------------------------------------------------------------------

CALIBRATION = "embedded-gsm8k:question@10,embedded-humaneval:prompt@10"


@pytest.fixture(scope="module")
def base_folder(base, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_base")
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pruned_dir(base_folder, tmp_path_factory):
    """Two clusters learned by the real pipeline, with a target in parameters."""
    from igp_training.l0 import MaskLearningConfig
    from igp_training.pipeline import PruneConfig, prune

    folder = tmp_path_factory.mktemp("pruned")
    config = PruneConfig(output_dir=str(folder), model=str(base_folder), calibration=CALIBRATION, num_clusters=2,
                         sparsity=0.25, sparsity_unit="params", max_length=24, heldout_per_source=2,
                         min_cluster_size=4, kmeans_restarts=2, save_steps=None, overwrite=True)
    prune(config, MaskLearningConfig(max_steps=2, batch_size=4, influence_examples=8), argv=["igp", "prune"])
    return folder


@pytest.fixture(scope="module")
def baseline_dir(base_folder, tmp_path_factory):
    from igp_training.baselines import BaselineConfig, make_baseline

    folder = tmp_path_factory.mktemp("block_bi")
    config = BaselineConfig(method="block-bi", sparsity=1 / NUM_LAYERS, calibration=CALIBRATION, max_length=24)
    make_baseline(config, folder, model=str(base_folder), overwrite=True)
    return folder


def folder_digest(folder) -> dict:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def refine_command(source, output, *options):
    return cli.main(["refine", str(source), "--output", str(output), *options])


def test_refine_command_lowers_each_cluster_loss(pruned_dir, base, tokenizer, tmp_path):
    before = folder_digest(pruned_dir)
    source = AutoModelForCausalLM.from_pretrained(pruned_dir, trust_remote_code=True)

    code = refine_command(pruned_dir, tmp_path / "refined", "--examples", "100", "--window", "2",
                          "--min-improvement", "0")

    assert code == 0
    assert folder_digest(pruned_dir) == before
    refined = AutoModelForCausalLM.from_pretrained(tmp_path / "refined", trust_remote_code=True)
    record = json.loads((tmp_path / "refined" / "igp_run.json").read_text())
    texts = load_calibration(CALIBRATION, heldout_per_source=2).texts
    routed = source.route(texts).tolist()
    assert refined.route(texts).tolist() == routed
    dataset = tokenize_calibration(texts, tokenizer, 24, cluster_ids=routed)
    for cluster, (old, new) in enumerate(zip(source.config.mask_bank, refined.config.mask_bank)):
        assert reference_loss(base, dataset, cluster, new) <= reference_loss(base, dataset, cluster, old) + 1e-6
    assert min(record["masks"]["sparsity"]["params"]) >= 0.25
    assert record["masks"]["mask_bank"] == refined.config.mask_bank
    assert record["refinement"]["initial_mask_bank"] == source.config.mask_bank
    assert record["refinement"]["config"]["sparsity_unit"] == "params"
    before_timings = json.loads((pruned_dir / "igp_run.json").read_text())["timings_s"]
    after_timings = record["timings_s"]
    assert after_timings["total"] - before_timings["total"] == pytest.approx(
        after_timings["refinement"] - before_timings.get("refinement", 0.0), abs=0.02)
    assert (tmp_path / "refined" / "mask_bank.png").is_file()


def test_refine_command_restarts_from_learned_masks(pruned_dir, tmp_path):
    # The second refinement starts from refined masks, so only a walk back to the first record finds the masks that
    # mask learning gave. Starting again from them repeats the first refinement.
    options = ["--examples", "100", "--window", "2", "--min-improvement", "0"]
    learned = json.loads((pruned_dir / "config.json").read_text())["mask_bank"]

    refine_command(pruned_dir, tmp_path / "once", *options)
    refine_command(tmp_path / "once", tmp_path / "twice", *options, "--rounds", "0")
    refine_command(tmp_path / "twice", tmp_path / "again", *options, "--from-learned")

    once = json.loads((tmp_path / "once" / "igp_run.json").read_text())
    twice = json.loads((tmp_path / "twice" / "igp_run.json").read_text())
    again = json.loads((tmp_path / "again" / "igp_run.json").read_text())
    assert once["masks"]["mask_bank"] != learned
    assert twice["refinement"]["initial_mask_bank"] == once["masks"]["mask_bank"]
    assert again["refinement"]["initial_mask_bank"] == learned
    assert again["masks"]["mask_bank"] == once["masks"]["mask_bank"]


def test_from_learned_needs_a_refinement(pruned_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        refine_command(pruned_dir, tmp_path / "out", "--from-learned")

    assert "records no refinement" in capsys.readouterr().err


def test_refine_command_scores_static_baseline(baseline_dir, tmp_path):
    code = refine_command(baseline_dir, tmp_path / "refined", "--examples", "4", "--window", "2")

    assert code == 0
    record = json.loads((tmp_path / "refined" / "igp_run.json").read_text())
    assert record["refinement"]["clusters"][0]["examples"] == 4
    assert sum(record["masks"]["mask_bank"][0]) == sum(record["refinement"]["initial_mask_bank"][0])


def test_refine_command_rejects_fine_tuned_weights(pruned_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    changed = tmp_path / "changed"
    shutil.copytree(pruned_dir, changed)
    weights = load_file(changed / "model.safetensors")
    name = next(name for name in weights if "mlp.down_proj" in name)
    weights[name] = weights[name] * 2
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})

    with pytest.raises(SystemExit) as exit_info:
        refine_command(changed, tmp_path / "out")

    assert exit_info.value.code == 2
    assert "differs from the base model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("output, message", [
    ("{parent}", "is, contains or lies inside the input folder"),
    ("{source}", "is, contains or lies inside the input folder"),
    ("{source}/refined", "is, contains or lies inside the input folder"),
    ("{other}", "non-empty folder without a model"),
])
def test_refine_command_protects_folders(output, message, pruned_dir, tmp_path, capsys):
    source = tmp_path / "models" / "source"
    shutil.copytree(pruned_dir, source)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    before = folder_digest(tmp_path)

    with pytest.raises(SystemExit) as exit_info:
        refine_command(source, output.format(parent=source.parent, source=source, other=tmp_path / "other"))

    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert folder_digest(tmp_path) == before


@pytest.mark.parametrize("options, message", [
    (["--rounds", "-1"], "--rounds must be at least 0"),
    (["--examples", "0"], "--examples must be at least 1"),
    (["--exchange-examples", "0"], "--exchange-examples must be at least 1"),
    (["--seq-length", "1"], "--seq-length must be at least 2"),
    (["--min-improvement", "nan"], "--min-improvement must be in [0, 1)"),
    (["--base", "/nonexistent/base"], "Could not load the base model /nonexistent/base"),
])
def test_refine_command_rejects_bad_options(options, message, pruned_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        refine_command(pruned_dir, tmp_path / "out", *options)

    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_refine_command_rejects_other_base(pruned_dir, tokenizer, tmp_path, capsys):
    other = tmp_path / "other_base"
    tiny_base("llama", num_hidden_layers=NUM_LAYERS + 2, vocab_size=len(tokenizer)).save_pretrained(other)
    tokenizer.save_pretrained(other)

    with pytest.raises(SystemExit):
        refine_command(pruned_dir, tmp_path / "out", "--base", str(other))

    assert "has 8 blocks but the base model" in capsys.readouterr().err


def test_refine_command_needs_calibration(pruned_dir, tmp_path, capsys):
    source = tmp_path / "source"
    shutil.copytree(pruned_dir, source)
    (source / "igp_run.json").unlink()

    with pytest.raises(SystemExit):
        refine_command(source, tmp_path / "out")

    assert "igp_run.json is missing; pass the texts to refine on with --calibration" in capsys.readouterr().err


def test_refine_command_refuses_existing_output(pruned_dir, tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        refine_command(pruned_dir, tmp_path)

    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "config.json").read_text() == "{}"


def test_refine_command_needs_a_model_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        refine_command(tmp_path / "nowhere", tmp_path / "out")

    assert "no config.json" in capsys.readouterr().err
