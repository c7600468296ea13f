"""IGPruningForCausalLM against independent references: the base model, the identity reference and rows run alone."""

import random

import pytest
import torch
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    PhiConfig,
    PhiForCausalLM,
)

from conftest import (
    ARCHITECTURES,
    hard_masks,
    identity_blocks,
    left_pad,
    random_mask,
    reference_greedy,
    reference_logits,
    tiny_base,
)
from modeling_igp import IGPruningForCausalLM


ATOL = 1e-5
SMOLLM2_BATCH_ATOL = 5e-4


def masks_for(num_layers: int, seed: int, count: int = 4) -> list[list[int]]:
    generator = random.Random(seed)
    return hard_masks(num_layers) + [random_mask(num_layers, generator) for _ in range(count)]


def random_ids(batch_size: int, length: int, seed: int = 0, vocab_size: int = 96) -> torch.LongTensor:
    # Ids from 3 up: 0, 1 and 2 are the tiny configs' pad, bos and eos tokens.
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch_size, length), generator=generator)


def prompts_of_lengths(lengths, seed: int = 0) -> list[torch.LongTensor]:
    return [random_ids(1, length, seed + index)[0] for index, length in enumerate(lengths)]


# -- forward against the base model and the identity reference ----------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.no_grad()
def test_all_ones_mask_matches_base(arch, attn_implementation):
    base = tiny_base(arch, attn_implementation)
    model = IGPruningForCausalLM.from_base(base, [[1] * 8])
    input_ids = random_ids(2, 9)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0

    expected = base(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    output = model(input_ids, attention_mask=attention_mask, cluster_ids=torch.tensor([0, 0]), output_hidden_states=True)

    torch.testing.assert_close(output.logits, expected.logits, atol=ATOL, rtol=0)
    assert len(output.hidden_states) == len(expected.hidden_states) == 5
    for index, (ours, theirs) in enumerate(zip(output.hidden_states, expected.hidden_states)):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0, msg=f"hidden_states[{index}] differ")


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.no_grad()
def test_masks_match_identity_reference(arch, attn_implementation):
    base = tiny_base(arch, attn_implementation)
    masks = masks_for(4, seed=len(arch))
    model = IGPruningForCausalLM.from_base(base, masks)
    # 9 tokens: longer than the 4-token sliding window of Mistral and of Qwen2's sliding layers.
    input_ids = random_ids(len(masks), 9, seed=1)

    # Every row its own mask, all in one batch.
    output = model(input_ids, cluster_ids=torch.arange(len(masks)))

    for row, mask in enumerate(masks):
        expected = reference_logits(base, input_ids[row : row + 1], mask)
        torch.testing.assert_close(output.logits[row : row + 1], expected, atol=ATOL, rtol=0, msg=f"mask {mask}")


@torch.no_grad()
def test_identity_reference_detects_a_wrong_mask():
    # The reference must be sensitive to the mask, or the comparisons above would prove nothing.
    base = tiny_base("llama")
    input_ids = random_ids(1, 7)
    dense = reference_logits(base, input_ids, [1] * 8)
    for block in range(8):
        mask = [1] * 8
        mask[block] = 0
        assert (reference_logits(base, input_ids, mask) - dense).abs().max() > 1e-3, f"block {block} has no effect"


@torch.no_grad()
def test_hidden_states_match_identity_reference():
    base = tiny_base("qwen3")
    mask = [0, 1, 1, 0, 0, 0, 1, 1]
    model = IGPruningForCausalLM.from_base(base, [mask])
    input_ids = random_ids(2, 6)

    output = model(input_ids, block_mask=torch.tensor([mask, mask], dtype=torch.bool), output_hidden_states=True)
    with identity_blocks(base, mask):
        expected = base(input_ids, output_hidden_states=True)

    assert len(output.hidden_states) == 5
    for index, (ours, theirs) in enumerate(zip(output.hidden_states, expected.hidden_states)):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0, msg=f"hidden_states[{index}] differ")


@torch.no_grad()
def test_skipped_blocks_are_not_called():
    base = tiny_base("llama")
    masks = [[1, 1, 0, 1, 0, 0, 1, 1], [0, 1, 0, 1, 1, 0, 1, 1], [1, 1, 0, 0, 1, 0, 1, 1]]
    model = IGPruningForCausalLM.from_base(base, masks)

    # Record the batch size each attention and MLP module is called with.
    calls = {}
    handles = []
    for layer_idx, layer in enumerate(base.model.layers):
        for block, module in ((2 * layer_idx, layer.self_attn), (2 * layer_idx + 1, layer.mlp)):
            hook = lambda module, args, kwargs, block=block: calls.setdefault(block, []).append(
                (args[0] if args else kwargs["hidden_states"]).shape[0]
            )
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        model(random_ids(3, 5), cluster_ids=torch.tensor([0, 1, 2]))
    finally:
        for handle in handles:
            handle.remove()

    for block in range(8):
        rows = sum(mask[block] for mask in masks)
        if rows == 0:
            assert block not in calls, f"block {block} is kept by no row but was called"
        else:
            assert calls[block] == [rows], f"block {block} ran on {calls[block]} rows, expected one call on {rows}"


def test_from_base_shares_weights():
    base = tiny_base("llama")
    model = IGPruningForCausalLM.from_base(base, [[1, 1, 0, 1, 1, 1, 1, 1]])

    assert model.model.embed_tokens.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()
    assert model.lm_head.weight.data_ptr() == base.lm_head.weight.data_ptr()
    assert model.model.layers[0].self_attn is base.model.layers[0].self_attn
    # Layer 1's attention is kept by no mask, so the wrapper has no module for it.
    assert model.model.layers[1].self_attn is None
    assert model.model.layers[1].input_layernorm is None


# -- soft gates ------------------------------------------------------------------------------------------------------


class ScaledModule(torch.nn.Module):
    """Wraps a sub-block so that its residual update is multiplied by `scale`."""

    def __init__(self, module, scale):
        super().__init__()
        self.module, self.scale = module, scale

    def forward(self, *args, **kwargs):
        output = self.module(*args, **kwargs)
        if isinstance(output, tuple):
            return (output[0] * self.scale,) + output[1:]
        return output * self.scale


def test_block_gates_scale_block_updates():
    base = tiny_base("llama")
    model = IGPruningForCausalLM.from_base(base, [[1] * 8])
    gates = torch.tensor([[1.0, 0.5, 0.0, 0.25, 1.0, 0.0, 0.75, 1.0]])
    input_ids = random_ids(1, 6)

    output = model(input_ids, block_gates=gates)

    # Reference: the base model with each sub-block's output scaled by its gate.
    layers = base.model.layers
    saved = [(layer.self_attn, layer.mlp) for layer in layers]
    try:
        for layer_idx, layer in enumerate(layers):
            layer.self_attn = ScaledModule(layer.self_attn, gates[0, 2 * layer_idx].item())
            layer.mlp = ScaledModule(layer.mlp, gates[0, 2 * layer_idx + 1].item())
        with torch.no_grad():
            expected = base(input_ids, use_cache=False).logits
    finally:
        for layer, (attention, mlp) in zip(layers, saved):
            layer.self_attn, layer.mlp = attention, mlp

    torch.testing.assert_close(output.logits.detach(), expected, atol=ATOL, rtol=0)


def test_block_gates_gradient_matches_reference():
    base = tiny_base("llama")
    model = IGPruningForCausalLM.from_base(base, [[1] * 8])
    input_ids = random_ids(2, 5)
    gates = torch.tensor([[1.0, 0.5, 0.3, 0.25, 1.0, 0.6, 0.75, 1.0], [0.2, 1.0, 0.9, 0.4, 0.7, 1.0, 0.1, 0.5]])

    def row_loss(logits, row_ids):
        return torch.nn.functional.cross_entropy(logits[0, :-1], row_ids[0, 1:])

    model_gates = gates.clone().requires_grad_()
    logits = model(input_ids, block_gates=model_gates, use_cache=False).logits
    sum(row_loss(logits[row : row + 1], input_ids[row : row + 1]) for row in range(2)).backward()

    # Reference: each row alone through the base model, each sub-block's output scaled by a gate that needs grad.
    layers = base.model.layers
    saved = [(layer.self_attn, layer.mlp) for layer in layers]
    for row in range(2):
        reference_gates = gates[row].clone().requires_grad_()
        try:
            for layer_idx, (attention, mlp) in enumerate(saved):
                layers[layer_idx].self_attn = ScaledModule(attention, reference_gates[2 * layer_idx])
                layers[layer_idx].mlp = ScaledModule(mlp, reference_gates[2 * layer_idx + 1])
            row_ids = input_ids[row : row + 1]
            row_loss(base(row_ids, use_cache=False).logits, row_ids).backward()
        finally:
            for layer, (attention, mlp) in zip(layers, saved):
                layer.self_attn, layer.mlp = attention, mlp

        torch.testing.assert_close(model_gates.grad[row], reference_gates.grad, atol=1e-6, rtol=1e-4)


def test_zero_gate_skips_block_without_gradient():
    base = tiny_base("llama")
    model = IGPruningForCausalLM.from_base(base, [[1] * 8])
    gates = torch.ones(2, 8)
    gates[0, 2] = 0.0
    gates.requires_grad_()

    model(random_ids(2, 5), block_gates=gates, labels=random_ids(2, 5), use_cache=False).loss.backward()

    # The block is not computed for that row, so its gate gets no gradient; the other row's gate does.
    assert gates.grad[0, 2].item() == 0.0
    assert gates.grad[1, 2].item() != 0.0


# -- batches of mixed masks and left padding --------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.no_grad()
def test_left_padded_mixed_batch_matches_rows_alone(arch, attn_implementation):
    base = tiny_base(arch, attn_implementation)
    masks = [[1] * 8, [0, 1, 1, 0, 1, 1, 0, 1], [0, 0, 1, 1, 0, 1, 1, 1]]
    model = IGPruningForCausalLM.from_base(base, masks)
    rows = prompts_of_lengths([9, 5, 7], seed=3)
    input_ids, attention_mask = left_pad(rows, base.config.pad_token_id)
    cluster_ids = torch.tensor([0, 1, 2])

    logits = model(input_ids, attention_mask=attention_mask, cluster_ids=cluster_ids).logits
    generated = model.generate(
        input_ids, attention_mask=attention_mask, cluster_ids=cluster_ids, max_new_tokens=6, do_sample=False
    )

    length = input_ids.shape[1]
    for row, prompt in enumerate(rows):
        alone_ids = prompt.unsqueeze(0)
        alone_cluster = cluster_ids[row : row + 1]
        alone_logits = model(alone_ids, cluster_ids=alone_cluster).logits
        torch.testing.assert_close(logits[row : row + 1, length - prompt.numel() :], alone_logits, atol=ATOL, rtol=0)

        alone_generated = model.generate(alone_ids, cluster_ids=alone_cluster, max_new_tokens=6, do_sample=False)
        assert generated[row, length:].tolist() == alone_generated[0, prompt.numel() :].tolist(), f"row {row}"


# -- generation ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.no_grad()
def test_generate_with_cache_matches_without(arch):
    base = tiny_base(arch)
    masks = hard_masks(4)[:4]  # dense, layer-0 attention skipped, layer 0 skipped, alternate layers skipped
    model = IGPruningForCausalLM.from_base(base, masks)
    rows = prompts_of_lengths([6, 8, 5, 7], seed=5)
    input_ids, attention_mask = left_pad(rows, base.config.pad_token_id)
    cluster_ids = torch.arange(4)
    settings = dict(attention_mask=attention_mask, cluster_ids=cluster_ids, max_new_tokens=8, do_sample=False)

    with_cache = model.generate(input_ids, **settings)
    without_cache = model.generate(input_ids, use_cache=False, **settings)

    assert with_cache.shape == (4, input_ids.shape[1] + 8)
    assert with_cache.tolist() == without_cache.tolist()


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@torch.no_grad()
def test_generate_matches_identity_reference(arch):
    base = tiny_base(arch)
    masks = [[0, 1, 1, 1, 1, 0, 1, 1], [0, 0, 1, 1, 0, 0, 1, 1]]
    model = IGPruningForCausalLM.from_base(base, masks)
    prompt = random_ids(1, 6, seed=7)

    for cluster, mask in enumerate(masks):
        generated = model.generate(
            prompt, cluster_ids=torch.tensor([cluster]), max_new_tokens=8, do_sample=False, eos_token_id=None
        )
        expected = reference_greedy(base, prompt, mask, max_new_tokens=8)
        assert generated.tolist() == expected.tolist(), f"mask {mask}"


@pytest.mark.parametrize("num_beams", [2, 3])
@torch.no_grad()
def test_beam_search_mixed_masks_matches_rows_alone(num_beams):
    base = tiny_base("qwen2_sliding")
    masks = [[0, 1, 1, 1, 1, 0, 1, 1], [1, 1, 0, 0, 1, 1, 0, 1], [1, 0, 1, 1, 0, 1, 1, 1]]
    model = IGPruningForCausalLM.from_base(base, masks)
    rows = prompts_of_lengths([7, 4, 6], seed=11)
    input_ids, attention_mask = left_pad(rows, base.config.pad_token_id)
    cluster_ids = torch.tensor([0, 1, 2])
    # No end-of-sequence token, so every beam runs the full length and the batch and row runs stay comparable.
    settings = dict(
        num_beams=num_beams, num_return_sequences=2, max_new_tokens=5, do_sample=False, eos_token_id=None,
        return_dict_in_generate=True, output_scores=True,
    )

    batch = model.generate(input_ids, attention_mask=attention_mask, cluster_ids=cluster_ids, **settings)

    length = input_ids.shape[1]
    assert batch.sequences.shape == (6, length + 5)
    for row, prompt in enumerate(rows):
        alone = model.generate(prompt.unsqueeze(0), cluster_ids=cluster_ids[row : row + 1], **settings)
        for beam in range(2):
            assert batch.sequences[2 * row + beam, length:].tolist() == alone.sequences[beam, prompt.numel():].tolist()
        torch.testing.assert_close(batch.sequences_scores[2 * row : 2 * row + 2], alone.sequences_scores, atol=1e-4, rtol=0)


@torch.no_grad()
def test_sampling_with_seed_and_return_sequences():
    base = tiny_base("mistral")
    masks = [[1] * 8, [0, 1, 0, 1, 1, 1, 1, 0]]
    model = IGPruningForCausalLM.from_base(base, masks)
    rows = prompts_of_lengths([5, 8], seed=13)
    input_ids, attention_mask = left_pad(rows, base.config.pad_token_id)
    settings = dict(
        attention_mask=attention_mask, cluster_ids=torch.tensor([0, 1]), max_new_tokens=6, do_sample=True,
        num_return_sequences=3, top_k=0, temperature=1.0, eos_token_id=None,
    )

    torch.manual_seed(0)
    first = model.generate(input_ids, **settings)
    torch.manual_seed(0)
    second = model.generate(input_ids, **settings)

    assert first.shape == (6, input_ids.shape[1] + 6)
    assert first.tolist() == second.tolist()
    assert bool((first >= 0).all())
    assert bool((first < base.config.vocab_size).all())
    # Each prompt is repeated in front of its three samples.
    for index in range(6):
        assert first[index, : input_ids.shape[1]].tolist() == input_ids[index // 3].tolist()


# -- invalid input -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model():
    base = tiny_base("llama")
    return IGPruningForCausalLM.from_base(base, [[1] * 8, [0, 1, 1, 0, 1, 1, 1, 1]])


@pytest.mark.parametrize(
    "block_mask, shown",
    [
        (torch.ones(2, 7, dtype=torch.bool), r"\(2, 7\)"),
        (torch.ones(2, 8, 1, dtype=torch.bool), r"\(2, 8, 1\)"),
        (torch.ones(3, 8, dtype=torch.bool), r"\(3, 8\)"),
        (torch.ones(8, dtype=torch.bool), r"\(8,\)"),
    ],
)
def test_block_mask_wrong_shape_raises(small_model, block_mask, shown):
    with pytest.raises(ValueError, match=shown):
        small_model(random_ids(2, 4), block_mask=block_mask)


def test_block_mask_values_not_binary_raise(small_model):
    block_mask = torch.ones(2, 8, dtype=torch.long)
    block_mask[1, 3] = 2
    with pytest.raises(ValueError, match="block_mask"):
        small_model(random_ids(2, 4), block_mask=block_mask)


def test_block_mask_running_removed_block_raises():
    base = tiny_base("llama")
    model = IGPruningForCausalLM.from_base(base, [[0, 1, 1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match=r"\[0\]"):
        model(random_ids(1, 4), block_mask=torch.ones(1, 8, dtype=torch.bool))


@pytest.mark.parametrize("cluster_id", [2, -1, 17])
def test_cluster_id_out_of_range_raises(small_model, cluster_id):
    with pytest.raises(ValueError, match=rf"{cluster_id}\b"):
        small_model(random_ids(2, 4), cluster_ids=torch.tensor([0, cluster_id]))
    with pytest.raises(ValueError, match=rf"{cluster_id}\b"):
        small_model.generate(random_ids(2, 4), cluster_ids=torch.tensor([cluster_id, 0]), max_new_tokens=2)


def test_cluster_ids_wrong_count_raises(small_model):
    with pytest.raises(ValueError, match="3 entries"):
        small_model(random_ids(2, 4), cluster_ids=torch.tensor([0, 1, 1]))


def test_cluster_ids_float_raises(small_model):
    with pytest.raises(ValueError, match="integer cluster ids.*float32"):
        small_model(random_ids(1, 4), cluster_ids=torch.tensor([0.7]))
    with pytest.raises(ValueError, match="integer cluster ids.*float32"):
        small_model.generate(random_ids(1, 4), cluster_ids=torch.tensor([1.0]), max_new_tokens=2)


def test_two_mask_sources_raise(small_model):
    with pytest.raises(ValueError, match="block_mask, cluster_ids"):
        small_model(random_ids(1, 4), block_mask=torch.ones(1, 8, dtype=torch.bool), cluster_ids=torch.tensor([0]))


def test_routing_without_router_raises(small_model):
    with pytest.raises(ValueError, match="block_mask or cluster_ids"):
        small_model(random_ids(1, 4))


@pytest.mark.parametrize("cache_implementation", ["static", "offloaded", "quantized", "sliding_window", "hybrid"])
def test_generate_unsupported_cache_implementation_raises(small_model, cache_implementation):
    with pytest.raises(ValueError, match=repr(cache_implementation)):
        small_model.generate(
            random_ids(1, 4), cluster_ids=torch.tensor([1]), max_new_tokens=2, cache_implementation=cache_implementation
        )


def test_generate_with_plain_dynamic_cache_raises(small_model):
    with pytest.raises(ValueError, match="DynamicCache"):
        small_model.generate(random_ids(1, 4), cluster_ids=torch.tensor([1]), max_new_tokens=2, cache=DynamicCache())
    with pytest.raises(ValueError, match="DynamicCache"):
        small_model.generate(
            random_ids(1, 4), cluster_ids=torch.tensor([1]), max_new_tokens=2, past_key_values=DynamicCache()
        )


def test_forward_with_plain_dynamic_cache_raises(small_model):
    with pytest.raises(ValueError, match="DynamicCache"):
        small_model(random_ids(1, 4), cluster_ids=torch.tensor([1]), cache=DynamicCache(), use_cache=True)


def test_generate_assistant_early_exit_raises(small_model):
    with pytest.raises(ValueError, match="assistant_early_exit"):
        small_model.generate(random_ids(1, 4), cluster_ids=torch.tensor([0]), max_new_tokens=2, assistant_early_exit=1)


def test_unsupported_architecture_raises():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    with pytest.raises(ValueError, match="gpt2"):
        IGPruningForCausalLM.from_base(gpt2, [[1] * 4])

    phi = PhiForCausalLM(
        PhiConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    ).eval()
    with pytest.raises(ValueError, match="phi"):
        IGPruningForCausalLM.from_base(phi, [[1] * 4])


# -- the real model -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_all_ones_matches_base(smollm2):
    base, tokenizer = smollm2
    model = IGPruningForCausalLM.from_base(base, [[1] * 60])
    batch = tokenizer(["The capital of France is", "def add(a, b):"], return_tensors="pt", padding=True, padding_side="left")

    expected = base(**batch).logits
    output = model(**batch, cluster_ids=torch.tensor([0, 0])).logits

    torch.testing.assert_close(output, expected, atol=ATOL, rtol=0)


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_masks_match_reference_and_cache(smollm2):
    base, tokenizer = smollm2
    generator = random.Random(0)
    # 25% of blocks skipped; the second mask also skips layer 0's attention and the whole of layer 5.
    masks = [random_mask(30, generator, skip_probability=0.25) for _ in range(2)]
    masks[1][0] = 0
    masks[1][10] = masks[1][11] = 0
    model = IGPruningForCausalLM.from_base(base, masks)
    prompt = tokenizer("Write a short poem about the sea.", return_tensors="pt").input_ids

    # The rows run blocks in batches of 1 and 2, which some CPUs (AVX-512 ones here) sum in different orders, so the
    # logits drift by about 1e-4 over 30 layers. Flipping any one block moves some logit by more than 4 here.
    logits = model(prompt.repeat(2, 1), cluster_ids=torch.tensor([0, 1])).logits
    for cluster, mask in enumerate(masks):
        expected = reference_logits(base, prompt, mask)
        torch.testing.assert_close(logits[cluster : cluster + 1], expected, atol=SMOLLM2_BATCH_ATOL, rtol=0)

    settings = dict(cluster_ids=torch.tensor([1]), max_new_tokens=8, do_sample=False)
    with_cache = model.generate(prompt, **settings)
    without_cache = model.generate(prompt, use_cache=False, **settings)
    assert with_cache.tolist() == without_cache.tolist()
    assert with_cache.tolist() == reference_greedy(base, prompt, masks[1], max_new_tokens=8).tolist()
