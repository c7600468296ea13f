"""Block Influence: how much a block or layer changes the residual stream, the score of ShortGPT and BlockPruner.

The Block Influence of a block with input hidden states x and output hidden states y (the residual stream before and
after it) is `1 - cos(x_t, y_t)` averaged over every non-padding token t of the calibration batches. A block whose
output points the same way as its input changes little, so a low score marks a block that is cheap to skip. ShortGPT
(Men et al., 2024) scores whole decoder layers this way and BlockPruner (Zhong et al., 2024) attention and MLP
sub-blocks.
"""

import logging
import time

import torch
from tqdm.auto import tqdm


logger = logging.getLogger(__name__)

GRANULARITIES = ("block", "layer")


def block_influence(model, batches, granularity: str = "block", show_progress: bool = True) -> torch.Tensor:
    """
    Compute the Block Influence of every block (or every layer) over calibration batches.

    Args:
        model: a causal LM whose decoder layers have `input_layernorm`, `self_attn`, `post_attention_layernorm` and
            `mlp` (Llama, Mistral, Qwen2, Qwen3), or an `IGPruningForCausalLM` whose bank keeps every block. It runs
            dense (every block), in its current dtype and on its device.
        batches: an iterable of dicts with `input_ids` [B, T] and optionally `attention_mask` [B, T] (0 marks
            padding); other keys (`labels`, `cluster_ids`, ...) are ignored.
        granularity: `"block"` for 2L scores (block `2*i` = layer i's attention, `2*i + 1` its MLP) or `"layer"` for
            L scores.
        show_progress: show a progress bar over the batches.

    Returns:
        A float64 tensor of 2L or L scores in [0, 2], each the token-weighted mean of `1 - cos(input, output)`.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"Unknown granularity {granularity!r}; use 'block' or 'layer'.")
    return influence_scores(model, batches, show_progress)[granularity]


@torch.no_grad()
def influence_scores(model, batches, show_progress: bool = True) -> dict[str, torch.Tensor]:
    """
    Compute the Block Influence at both granularities in one pass over the calibration batches.

    Args and model requirements are those of `block_influence`.

    Returns:
        `{"block": [2L] scores, "layer": [L] scores}`, float64 tensors.
    """
    decoder = model.model
    layers = decoder.layers
    num_layers = len(layers)
    start = time.perf_counter()

    # The residual stream before block k is the input of the norm that opens it, and after the last block it is the
    # input of the final norm. Pre-hooks on those norms record the 2L + 1 states x_0 .. x_2L of the stream.
    states: list[torch.Tensor] = []
    norms = []
    for layer_idx, layer in enumerate(layers):
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, name, None)
            if norm is None:
                raise ValueError(
                    f"Layer {layer_idx} has no {name}: Block Influence needs every block. Pass the base model or a "
                    "model whose mask bank keeps every block."
                )
            norms.append(norm)
    norms.append(decoder.norm)
    handles = [norm.register_forward_pre_hook(_record_input(states)) for norm in norms]

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = {"block": torch.zeros(2 * num_layers, dtype=torch.float64),
              "layer": torch.zeros(num_layers, dtype=torch.float64)}
    token_count = 0
    try:
        for batch in tqdm(batches, desc="Block Influence", disable=not show_progress):
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch.get("attention_mask")
            attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)

            states.clear()
            _dense_forward(model, input_ids, attention_mask)
            if len(states) != 2 * num_layers + 1:
                raise RuntimeError(f"Recorded {len(states)} residual states, expected {2 * num_layers + 1}.")

            tokens = attention_mask.bool()
            for granularity, stride in (("block", 1), ("layer", 2)):
                for index in range(totals[granularity].numel()):
                    before, after = states[index * stride], states[(index + 1) * stride]
                    cosine = torch.nn.functional.cosine_similarity(before.double(), after.double(), dim=-1)
                    totals[granularity][index] += (1.0 - cosine)[tokens].sum().cpu()
            token_count += int(tokens.sum())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    if token_count == 0:
        raise ValueError("The calibration batches contain no tokens (empty or fully padded); pass non-empty batches.")
    elapsed = time.perf_counter() - start
    logger.info("Block Influence over %d tokens in %.1f s", token_count, elapsed)
    return {granularity: total / token_count for granularity, total in totals.items()}


def _record_input(states: list):
    def hook(module, args):
        states.append(args[0].detach())

    return hook


def _dense_forward(model, input_ids, attention_mask):
    # An IGPruningForCausalLM needs an explicit all-ones mask, or it would route each row to a cluster mask.
    if getattr(getattr(model, "config", None), "model_type", None) == "igp":
        keep = torch.ones(input_ids.shape[0], model.config.num_blocks, dtype=torch.bool)
        return model(input_ids=input_ids, attention_mask=attention_mask, block_mask=keep, use_cache=False)
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


__all__ = ["block_influence", "influence_scores"]
