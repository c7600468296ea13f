"""Block Influence against residual states taken independently: decoder-layer outputs and MLP-less layers."""

import pytest
import torch

from conftest import identity_blocks, tiny_base
from igp_training.block_influence import block_influence
from modeling_igp import IGPruningForCausalLM


# Tiny models run faster on one torch thread.
pytestmark = pytest.mark.usefixtures("one_thread")


def layer_outputs(model, input_ids, attention_mask):
    """Residual stream before layer 0 and after every decoder layer, from forward hooks on the layers."""
    outputs = []
    handles = [layer.register_forward_hook(lambda module, args, output: outputs.append(output))
               for layer in model.model.layers]
    try:
        with torch.no_grad():
            hidden = model(input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    outputs = [output[0] if isinstance(output, tuple) else output for output in outputs]
    return [hidden.hidden_states[0]] + outputs, hidden.hidden_states


def reference_states(model, input_ids, attention_mask):
    """x_0 .. x_2L: x_2i before layer i, x_2i+1 after its attention, x_2i+2 after its MLP."""
    dense, hidden_states = layer_outputs(model, input_ids, attention_mask)
    num_layers = len(model.model.layers)
    states = [dense[0]]
    for layer_idx in range(num_layers):
        # With only this layer's MLP replaced by the identity, the layer's output is its post-attention state.
        mask = [1] * (2 * num_layers)
        mask[2 * layer_idx + 1] = 0
        with identity_blocks(model, mask):
            mlp_less, _ = layer_outputs(model, input_ids, attention_mask)
        states += [mlp_less[layer_idx + 1], dense[layer_idx + 1]]
    # Sanity: the hooked layer outputs are the (un-normed) hidden states transformers returns for inner layers.
    for layer_idx in range(num_layers - 1):
        assert torch.allclose(dense[layer_idx + 1], hidden_states[layer_idx + 1])
    return states


def reference_influence(model, batches, stride):
    totals, count = None, 0
    for batch in batches:
        states = reference_states(model, batch["input_ids"], batch["attention_mask"])
        tokens = batch["attention_mask"].bool()
        scores = []
        for index in range(0, len(states) - 1, stride):
            before, after = states[index].double(), states[index + stride].double()
            cosine = torch.nn.functional.cosine_similarity(before, after, dim=-1)
            scores.append((1 - cosine)[tokens].sum())
        scores = torch.stack(scores)
        totals = scores if totals is None else totals + scores
        count += int(tokens.sum())
    return totals / count


def make_batches(seed=0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for length in (9, 6):
        input_ids = torch.randint(3, 96, (2, length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, length - 2:] = 0  # right padding on the second row
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return batches


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
@pytest.mark.parametrize("granularity, stride", [("block", 1), ("layer", 2)])
def test_influence_matches_reference(arch, granularity, stride):
    model = tiny_base(arch)
    batches = make_batches()
    scores = block_influence(model, batches, granularity=granularity, show_progress=False)
    expected = reference_influence(model, batches, stride)
    assert scores.shape == (8 // stride,)
    assert torch.allclose(scores, expected, atol=1e-6)


def test_padding_tokens_are_ignored():
    # Right padding leaves the real tokens' states unchanged, so a padded batch scores like its rows run alone,
    # weighted by their token counts.
    model = tiny_base("llama")
    long_row = torch.randint(3, 96, (1, 8))
    short_row = torch.randint(3, 96, (1, 5))
    padded = {
        "input_ids": torch.cat([long_row, torch.cat([short_row, torch.zeros(1, 3, dtype=torch.long)], dim=1)]),
        "attention_mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3]),
    }
    together = block_influence(model, [padded], show_progress=False)
    long_alone = block_influence(model, [{"input_ids": long_row}], show_progress=False)
    short_alone = block_influence(model, [{"input_ids": short_row}], show_progress=False)
    assert torch.allclose(together, (8 * long_alone + 5 * short_alone) / 13, atol=1e-6)


def test_igp_model_scores_like_base():
    base = tiny_base("qwen2")
    wrapped = IGPruningForCausalLM.from_base(base, [[1] * 8, [0, 1] * 4])
    batches = make_batches(seed=1)
    assert torch.allclose(block_influence(wrapped, batches, show_progress=False),
                          block_influence(base, batches, show_progress=False), atol=1e-6)


def test_invalid_arguments_raise():
    base = tiny_base("llama")
    with pytest.raises(ValueError, match="granularity"):
        block_influence(base, make_batches(), granularity="head")
    with pytest.raises(ValueError, match="no tokens"):
        block_influence(base, [], show_progress=False)
    pruned = IGPruningForCausalLM.from_base(base, [[0, 1] * 4])
    with pytest.raises(ValueError, match="every block"):
        block_influence(pruned, make_batches(), show_progress=False)
