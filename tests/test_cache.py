"""IGPruningCache: what each attention layer stores, its token counter, batch surgery and mask changes."""

import pytest
import torch

from conftest import left_pad, tiny_base
from modeling_igp import IGPruningCache, IGPruningForCausalLM


MASKS = [
    [1, 1, 1, 1, 1, 1, 1, 1],
    [0, 1, 1, 1, 0, 0, 1, 1],  # layer 0's attention and the whole of layer 2 skipped
    [0, 1, 0, 1, 1, 1, 1, 0],
]


def random_ids(batch_size, length, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 96, (batch_size, length), generator=generator)


def stored(cache, layer_idx):
    """The (keys, values) a cache layer stores, or None if it stores nothing."""
    if layer_idx >= len(cache.layers):
        return None
    layer = cache.layers[layer_idx]
    if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0:
        return None
    return layer.keys, layer.values


def rows_running(masks, cluster_ids, block):
    return [row for row, cluster in enumerate(cluster_ids) if masks[cluster][block]]


@pytest.fixture
def model():
    return IGPruningForCausalLM.from_base(tiny_base("qwen3"), MASKS)


@torch.no_grad()
def test_cache_stores_only_rows_that_run_attention(model):
    cluster_ids = [0, 1, 2, 1]
    input_ids = random_ids(4, 6)

    cache = model(input_ids, cluster_ids=torch.tensor(cluster_ids), use_cache=True).cache

    assert isinstance(cache, IGPruningCache)
    for layer_idx in range(4):
        rows = rows_running(MASKS, cluster_ids, 2 * layer_idx)
        content = stored(cache, layer_idx)
        if not rows:
            assert content is None, f"layer {layer_idx} is skipped by every row but stores keys"
            continue
        keys, values = content
        assert keys.shape[0] == values.shape[0] == len(rows), f"layer {layer_idx} stores {keys.shape[0]} rows"

        # Each stored row equals that row's cache when it runs alone.
        for position, row in enumerate(rows):
            alone = model(input_ids[row : row + 1], cluster_ids=torch.tensor([cluster_ids[row]]), use_cache=True).cache
            alone_keys, alone_values = stored(alone, layer_idx)
            torch.testing.assert_close(keys[position : position + 1], alone_keys, atol=1e-6, rtol=0)
            torch.testing.assert_close(values[position : position + 1], alone_values, atol=1e-6, rtol=0)


@torch.no_grad()
def test_cache_bytes_match_kept_attention_blocks(model):
    cluster_ids = [0, 1, 2, 2]
    prompt_length, new_tokens = 7, 5
    text_config = model.config.text_config

    output = model.generate(
        random_ids(4, prompt_length), cluster_ids=torch.tensor(cluster_ids), max_new_tokens=new_tokens,
        do_sample=False, eos_token_id=None, return_dict_in_generate=True,
    )

    # Keys and values of every token but the last generated one, for each (row, layer) whose attention runs.
    tokens = prompt_length + new_tokens - 1
    kept_attention = sum(len(rows_running(MASKS, cluster_ids, 2 * layer)) for layer in range(4))
    per_row_layer = 2 * text_config.num_key_value_heads * tokens * text_config.head_dim * 4  # float32
    assert output.cache.memory_bytes() == kept_attention * per_row_layer

    dense = IGPruningForCausalLM.from_base(tiny_base("qwen3"), [[1] * 8]).generate(
        random_ids(4, prompt_length), cluster_ids=torch.zeros(4, dtype=torch.long), max_new_tokens=new_tokens,
        do_sample=False, eos_token_id=None, return_dict_in_generate=True,
    )
    assert dense.cache.memory_bytes() == 4 * 4 * per_row_layer


@torch.no_grad()
def test_token_counter_with_layer_zero_skipped(model):
    # Cluster 1 skips layer 0's attention, so layer 0 of the cache stays empty.
    cache = model(random_ids(1, 6), cluster_ids=torch.tensor([1]), use_cache=True).cache
    assert stored(cache, 0) is None
    assert cache.get_seq_length() == 6

    model(random_ids(1, 1, seed=1), cluster_ids=torch.tensor([1]), cache=cache, use_cache=True)
    assert cache.get_seq_length() == 7
    assert stored(cache, 1)[0].shape[-2] == 7


@torch.no_grad()
def test_left_padded_decode_step_matches_full_forward(model):
    # One cached decode step on a padded, mixed batch equals the forward over the whole sequence.
    rows = [random_ids(1, length, seed)[0] for seed, length in enumerate([6, 3, 5])]
    input_ids, attention_mask = left_pad(rows, 0)
    cluster_ids = torch.tensor([1, 2, 0])
    next_ids = random_ids(3, 1, seed=9)
    full_ids = torch.cat([input_ids, next_ids], dim=1)
    full_mask = torch.cat([attention_mask, torch.ones(3, 1, dtype=torch.long)], dim=1)

    # Positions count real tokens only, as generate computes them for left padding.
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)

    cache = model(
        input_ids, attention_mask=attention_mask, position_ids=positions[:, :-1], cluster_ids=cluster_ids, use_cache=True
    ).cache
    step = model(
        next_ids, attention_mask=full_mask, position_ids=positions[:, -1:], cluster_ids=cluster_ids, cache=cache
    )
    full = model(full_ids, attention_mask=full_mask, position_ids=positions, cluster_ids=cluster_ids, use_cache=False)

    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=0)


# -- batch surgery -------------------------------------------------------------------------------------------------


def assert_same_content(cache, expected, num_layers=4):
    for layer_idx in range(num_layers):
        ours, theirs = stored(cache, layer_idx), stored(expected, layer_idx)
        assert (ours is None) == (theirs is None), f"layer {layer_idx}"
        if ours is not None:
            torch.testing.assert_close(ours[0], theirs[0], atol=1e-6, rtol=0, msg=f"keys of layer {layer_idx}")
            torch.testing.assert_close(ours[1], theirs[1], atol=1e-6, rtol=0, msg=f"values of layer {layer_idx}")


@torch.no_grad()
def test_batch_repeat_interleave_matches_repeated_batch(model):
    input_ids = random_ids(3, 5)
    cluster_ids = torch.tensor([1, 0, 2])

    cache = model(input_ids, cluster_ids=cluster_ids, use_cache=True).cache
    cache.batch_repeat_interleave(2)
    expected = model(
        input_ids.repeat_interleave(2, dim=0), cluster_ids=cluster_ids.repeat_interleave(2), use_cache=True
    ).cache

    assert cache.batch_size == 6
    assert_same_content(cache, expected)


@torch.no_grad()
def test_reorder_and_select_match_reindexed_batch(model):
    # Rows 0-1 share cluster 1 and rows 2-3 cluster 2, like the beams of two prompts.
    input_ids = random_ids(4, 5)
    cluster_ids = torch.tensor([1, 1, 2, 2])
    beam_idx = torch.tensor([1, 1, 3, 2])

    cache = model(input_ids, cluster_ids=cluster_ids, use_cache=True).cache
    cache.reorder_cache(beam_idx)
    expected = model(input_ids[beam_idx], cluster_ids=cluster_ids, use_cache=True).cache
    assert_same_content(cache, expected)

    # The reordered cache accepts the next step of the same clusters.
    model(random_ids(4, 1, seed=2), cluster_ids=cluster_ids, cache=cache, use_cache=True)
    assert cache.get_seq_length() == 6

    selected = model(input_ids, cluster_ids=cluster_ids, use_cache=True).cache
    selected.batch_select_indices(torch.tensor([0, 3]))
    expected = model(input_ids[[0, 3]], cluster_ids=cluster_ids[[0, 3]], use_cache=True).cache
    assert selected.batch_size == 2
    assert_same_content(selected, expected)


@torch.no_grad()
def test_crop_for_prompt_lookup_decoding(model):
    # Prompt lookup decoding drafts tokens, then crops the rejected ones from the cache.
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    settings = dict(cluster_ids=torch.tensor([1]), max_new_tokens=10, do_sample=False, eos_token_id=None)

    greedy = model.generate(prompt, **settings)
    assisted = model.generate(prompt, prompt_lookup_num_tokens=3, **settings)

    assert assisted.tolist() == greedy.tolist()


@torch.no_grad()
def test_crop_removes_tokens_from_every_layer(model):
    cache = model(random_ids(2, 6), cluster_ids=torch.tensor([1, 2]), use_cache=True).cache
    cache.crop(-2)

    assert cache.get_seq_length() == 4
    for layer_idx in range(4):
        content = stored(cache, layer_idx)
        if content is not None:
            assert content[0].shape[-2] == 4, f"layer {layer_idx}"


# -- masks must stay fixed -------------------------------------------------------------------------------------------


@torch.no_grad()
def test_changed_rows_mid_generation_raise(model):
    cache = model(random_ids(2, 5), cluster_ids=torch.tensor([0, 1]), use_cache=True).cache
    # Layer 0's attention ran on row 0 only; now row 1 runs it too.
    with pytest.raises(ValueError, match="layer 0"):
        model(random_ids(2, 1), cluster_ids=torch.tensor([0, 0]), cache=cache, use_cache=True)


@torch.no_grad()
def test_layer_skipped_mid_generation_raises(model):
    cache = model(random_ids(1, 5), cluster_ids=torch.tensor([0]), use_cache=True).cache
    with pytest.raises(ValueError, match="layer 0"):
        model(random_ids(1, 1), cluster_ids=torch.tensor([1]), cache=cache, use_cache=True)


@torch.no_grad()
def test_layer_run_after_being_skipped_raises(model):
    # Cluster 1 skips layer 0's attention for the prompt, so that layer has no keys for those tokens.
    cache = model(random_ids(1, 5), cluster_ids=torch.tensor([1]), use_cache=True).cache
    with pytest.raises(ValueError, match="layer 0"):
        model(random_ids(1, 1), cluster_ids=torch.tensor([0]), cache=cache, use_cache=True)


@torch.no_grad()
def test_batch_size_change_raises(model):
    cache = model(random_ids(2, 5), cluster_ids=torch.tensor([0, 0]), use_cache=True).cache
    with pytest.raises(ValueError, match="2 rows"):
        model(random_ids(3, 1), cluster_ids=torch.tensor([0, 0, 0]), cache=cache, use_cache=True)


@torch.no_grad()
def test_generate_accepts_igp_cache(model):
    prompt = random_ids(1, 5)
    settings = dict(cluster_ids=torch.tensor([2]), max_new_tokens=4, do_sample=False, eos_token_id=None)

    given = model.generate(prompt, cache=IGPruningCache(model.config.num_layers), **settings)
    default = model.generate(prompt, **settings)

    assert given.tolist() == default.tolist()


@torch.no_grad()
def test_generate_accepts_dynamic_cache_implementation(model):
    prompt = random_ids(1, 5)
    settings = dict(cluster_ids=torch.tensor([2]), max_new_tokens=4, do_sample=False, eos_token_id=None)
    default = model.generate(prompt, **settings)

    # "dynamic" names the cache generate builds anyway, from the argument or from the saved generation config.
    assert model.generate(prompt, cache_implementation="dynamic", **settings).tolist() == default.tolist()
    model.generation_config.cache_implementation = "dynamic"
    try:
        assert model.generate(prompt, **settings).tolist() == default.tolist()
    finally:
        model.generation_config.cache_implementation = None
