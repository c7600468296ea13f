"""Cost of each block in the three sparsity units: blocks, parameters and FLOPs per token.

A model with L decoder layers has 2L blocks: block `2*i` is layer i's attention sub-block (input norm + self-attention),
block `2*i + 1` its MLP sub-block (post-attention norm + MLP). A sparsity figure is the cost of the skipped blocks
divided by the cost of all blocks, in one of these units:

- `blocks`: every block costs the same.
- `params`: the block's parameters, counted from the config the way the supported architectures (Llama, Mistral,
  Qwen2, Qwen3 in transformers 5.x) build their modules: norm weights, projection weights and biases, and Qwen3's
  per-head query and key norms.
- `flops`: multiply-add FLOPs (2 per multiply-accumulate) of the block's matrix products for one token whose
  attention covers `context_length` keys (`min(context_length, sliding_window)` in sliding-window layers). This is
  the cost of one decoding step at that context length. Norms, rotary embeddings, softmax, activation functions and
  bias additions are O(hidden_size) per token and are left out.

Embeddings, the final norm and the output projection belong to no block, so block sparsity figures leave them out.
`sparsity_report` also gives the skipped share of the whole model.
"""

import torch


SPARSITY_UNITS = ("blocks", "params", "flops")

DEFAULT_CONTEXT_LENGTH = 2048


def block_costs(text_config, unit: str = "blocks", context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
    """
    Return the cost of each of the 2L blocks in `unit`, as a float64 tensor [2L] that sums to 1.

    Args:
        text_config: the base model's config (an `IGPruningConfig` is accepted too; its `text_config` is used).
        unit: `"blocks"`, `"params"` or `"flops"`.
        context_length: number of keys each token attends to, for `"flops"`.
    """
    costs = block_cost_counts(text_config, unit, context_length)
    return costs / costs.sum()


def block_cost_counts(text_config, unit: str = "blocks", context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
    """Return the unnormalised cost of each block: 1 per block, its parameter count, or its FLOPs per token."""
    text_config = _text_config(text_config)
    if unit not in SPARSITY_UNITS:
        raise ValueError(f"Unknown sparsity unit {unit!r}; use one of {', '.join(SPARSITY_UNITS)}.")
    if not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"context_length must be a positive integer, got {context_length!r}.")

    num_layers = text_config.num_hidden_layers
    costs = torch.empty(2 * num_layers, dtype=torch.float64)
    for layer_idx in range(num_layers):
        if unit == "blocks":
            attention, mlp = 1, 1
        elif unit == "params":
            attention, mlp = attention_parameters(text_config), mlp_parameters(text_config)
        else:
            keys = _attended_keys(text_config, layer_idx, context_length)
            attention, mlp = attention_flops(text_config, keys), mlp_flops(text_config)
        costs[2 * layer_idx] = attention
        costs[2 * layer_idx + 1] = mlp
    return costs


def attention_parameters(text_config) -> int:
    """Count the parameters of one attention sub-block.

    They are the input norm, the q/k/v/o projections with their biases, and Qwen3's per-head q/k norms.
    """
    hidden, query_width, key_value_width, head_dim = _attention_shapes(text_config)
    model_type = text_config.model_type

    weights = hidden * query_width + 2 * hidden * key_value_width + query_width * hidden
    if model_type == "qwen2":
        # Qwen2 always has q/k/v biases and never an output bias.
        biases = query_width + 2 * key_value_width
    elif getattr(text_config, "attention_bias", False):
        biases = query_width + 2 * key_value_width + hidden
    else:
        biases = 0
    norms = hidden + (2 * head_dim if model_type == "qwen3" else 0)
    return weights + biases + norms


def mlp_parameters(text_config) -> int:
    """Count the parameters of one MLP sub-block: post-attention norm and gate/up/down projections (with biases)."""
    hidden, intermediate = text_config.hidden_size, text_config.intermediate_size
    weights = 3 * hidden * intermediate
    biases = 2 * intermediate + hidden if getattr(text_config, "mlp_bias", False) else 0
    return weights + biases + hidden


def attention_flops(text_config, attended_keys: int) -> int:
    """Count the matrix-product FLOPs of one attention sub-block for one token attending to `attended_keys` keys."""
    hidden, query_width, key_value_width, _ = _attention_shapes(text_config)
    projections = 2 * (hidden * query_width + 2 * hidden * key_value_width + query_width * hidden)
    # QK^T and AV: each query head takes a dot product with every key, then a weighted sum of every value.
    scores_and_values = 2 * 2 * query_width * attended_keys
    return projections + scores_and_values


def mlp_flops(text_config) -> int:
    """Count the FLOPs of one MLP sub-block for one token (gate, up and down projections)."""
    return 2 * 3 * text_config.hidden_size * text_config.intermediate_size


def sparsity_report(mask, text_config, context_length: int = DEFAULT_CONTEXT_LENGTH) -> dict:
    """
    Return the skipped share of a mask (or of every mask of a bank) in all three units.

    Args:
        mask: 2L values (1/True = run), or a bank of N such masks (list of lists, array or tensor).
        text_config: the base model's config.
        context_length: number of attended keys for the FLOPs figures.

    Returns:
        A JSON-ready dict with `blocks`, `params` and `flops` (skipped fraction of the decoder blocks' total),
        `params_of_model` and `flops_of_model` (skipped fraction of the whole model, embeddings and output projection
        included), `blocks_skipped` (count) and `context_length`. For a bank every value except `context_length` is a
        list with one entry per mask.
    """
    text_config = _text_config(text_config)
    keep = torch.as_tensor(mask).to(torch.float64)
    single = keep.dim() == 1
    keep = keep.unsqueeze(0) if single else keep
    num_blocks = 2 * text_config.num_hidden_layers
    if keep.dim() != 2 or keep.shape[1] != num_blocks:
        raise ValueError(f"mask must have {num_blocks} entries per mask (2 per layer), got shape {tuple(keep.shape)}.")
    if not bool(((keep == 0) | (keep == 1)).all()):
        raise ValueError("mask must contain only 0/1 or False/True values.")
    skipped = 1.0 - keep

    report = {"context_length": context_length}
    for unit in SPARSITY_UNITS:
        report[unit] = (skipped @ block_costs(text_config, unit, context_length)).tolist()
    report["blocks_skipped"] = skipped.sum(dim=1).long().tolist()

    # Shares of the whole model: the parts outside the blocks never skip.
    parameter_counts = block_cost_counts(text_config, "params")
    model_parameters = _model_parameters(text_config, parameter_counts)
    report["params_of_model"] = ((skipped @ parameter_counts) / model_parameters).tolist()
    flop_counts = block_cost_counts(text_config, "flops", context_length)
    output_projection_flops = 2 * text_config.hidden_size * text_config.vocab_size
    report["flops_of_model"] = ((skipped @ flop_counts) / (flop_counts.sum() + output_projection_flops)).tolist()

    if single:
        report = {key: value[0] if isinstance(value, list) else value for key, value in report.items()}
    return report


def _model_parameters(text_config, block_parameter_counts: torch.Tensor) -> float:
    embeddings = text_config.vocab_size * text_config.hidden_size
    output_projection = 0 if text_config.tie_word_embeddings else embeddings
    final_norm = text_config.hidden_size
    return float(block_parameter_counts.sum()) + embeddings + output_projection + final_norm


def _attention_shapes(text_config):
    hidden = text_config.hidden_size
    num_heads = text_config.num_attention_heads
    num_key_value_heads = getattr(text_config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // num_heads
    return hidden, num_heads * head_dim, num_key_value_heads * head_dim, head_dim


def _attended_keys(text_config, layer_idx: int, context_length: int) -> int:
    # Same layer-type rule as the model's block loop: `layer_types` if the config has it, else a set sliding window.
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None:
        sliding = layer_types[layer_idx] == "sliding_attention"
    else:
        sliding = bool(getattr(text_config, "sliding_window", None))
    if sliding:
        return min(context_length, text_config.sliding_window)
    return context_length


def _text_config(config):
    return config.text_config if getattr(config, "model_type", None) == "igp" else config


__all__ = [
    "SPARSITY_UNITS",
    "attention_flops",
    "attention_parameters",
    "block_cost_counts",
    "block_costs",
    "mlp_flops",
    "mlp_parameters",
    "sparsity_report",
]
