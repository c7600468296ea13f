"""Block costs in blocks, parameters and FLOPs, checked against the real modules of tiny random models."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_base, tiny_config
from igp_training.sparsity import block_cost_counts, block_costs, sparsity_report


def real_block_parameters(model) -> list[int]:
    """Count each block's parameters from the instantiated modules."""
    counts = []
    for layer in model.model.layers:
        attention = sum(p.numel() for module in (layer.input_layernorm, layer.self_attn) for p in module.parameters())
        mlp = sum(p.numel() for module in (layer.post_attention_layernorm, layer.mlp) for p in module.parameters())
        counts += [attention, mlp]
    return counts


@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("llama", {}),
        ("llama", {"attention_bias": True, "mlp_bias": True}),
        ("qwen2", {}),
        ("qwen3", {}),
        ("qwen3", {"attention_bias": True}),
        ("mistral", {}),
    ],
)
def test_parameter_costs_match_modules(arch, overrides):
    model = tiny_base(arch, **overrides)
    expected = torch.tensor(real_block_parameters(model), dtype=torch.float64)

    counts = block_cost_counts(model.config, "params")
    assert counts.tolist() == expected.tolist()
    assert torch.allclose(block_costs(model.config, "params"), expected / expected.sum())


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_flop_costs_match_flop_counter(arch):
    # Eager attention multiplies the full T x T score matrix (the causal mask is added afterwards), so a forward
    # over T tokens costs T times the per-token FLOPs at context T, as torch's FlopCounterMode counts them.
    model = tiny_base(arch, attn_implementation="eager")
    length = 24
    input_ids = torch.randint(3, 96, (1, length))
    with FlopCounterMode(display=False) as counter:
        model(input_ids, use_cache=False)
    per_module = counter.get_flop_counts()

    def measured(path):
        key = next(name for name in per_module if name.endswith(path))
        return sum(per_module[key].values()) / length

    counts = block_cost_counts(model.config, "flops", context_length=length)
    for layer_idx in range(model.config.num_hidden_layers):
        assert counts[2 * layer_idx].item() == measured(f"layers.{layer_idx}.self_attn")
        assert counts[2 * layer_idx + 1].item() == measured(f"layers.{layer_idx}.mlp")


def test_flop_costs_grow_with_context():
    config = tiny_config("llama")
    short = block_cost_counts(config, "flops", context_length=16)
    long = block_cost_counts(config, "flops", context_length=1024)
    assert torch.all(long[0::2] > short[0::2])
    assert torch.equal(long[1::2], short[1::2])
    # Attention's share of the FLOPs rises with the context.
    assert block_costs(config, "flops", 1024)[0] > block_costs(config, "flops", 16)[0]


def test_sliding_layers_cap_attended_keys():
    # Layers 2 and 3 of the sliding config use a window of 4 tokens; layers 0 and 1 attend to the whole context.
    config = tiny_config("qwen2_sliding")
    capped = block_cost_counts(config, "flops", context_length=100)
    at_window = block_cost_counts(config, "flops", context_length=4)
    full = tiny_config("qwen2")
    uncapped = block_cost_counts(full, "flops", context_length=100)
    assert capped[0].item() == uncapped[0].item()
    assert capped[2].item() == uncapped[2].item()
    assert capped[4].item() == at_window[4].item()
    assert capped[6].item() == at_window[6].item()


def test_block_costs_are_uniform_for_blocks():
    costs = block_costs(tiny_config("mistral"), "blocks")
    assert costs.tolist() == [1 / 8] * 8


def test_sparsity_report_single_mask():
    model = tiny_base("llama")
    config = model.config
    mask = [1, 0, 1, 1, 0, 1, 1, 1]  # skips layer 0's MLP and layer 2's attention
    report = sparsity_report(mask, config, context_length=64)

    parameters = real_block_parameters(model)
    skipped_parameters = parameters[1] + parameters[4]
    assert report["blocks"] == pytest.approx(2 / 8)
    assert report["blocks_skipped"] == 2
    assert report["params"] == pytest.approx(skipped_parameters / sum(parameters))
    all_parameters = sum(p.numel() for p in model.parameters())  # tied or not, each tensor counted once
    assert report["params_of_model"] == pytest.approx(skipped_parameters / all_parameters)
    flops = block_cost_counts(config, "flops", context_length=64)
    assert report["flops"] == pytest.approx(float((flops[1] + flops[4]) / flops.sum()))
    assert report["flops_of_model"] < report["flops"]
    assert report["context_length"] == 64


def test_sparsity_report_bank_gives_lists():
    config = tiny_config("qwen3")
    bank = [[1] * 8, [0, 0] + [1] * 6]
    report = sparsity_report(bank, config)
    assert report["blocks"] == [0.0, 0.25]
    assert report["blocks_skipped"] == [0, 2]
    assert len(report["params"]) == 2 and report["params"][0] == 0.0


def test_invalid_inputs_raise():
    config = tiny_config("llama")
    with pytest.raises(ValueError, match="Unknown sparsity unit"):
        block_costs(config, "layers")
    with pytest.raises(ValueError, match="context_length"):
        block_costs(config, "flops", context_length=0)
    with pytest.raises(ValueError, match="8 entries"):
        sparsity_report([1, 0, 1], config)
    with pytest.raises(ValueError, match="only 0/1"):
        sparsity_report([2] * 8, config)
