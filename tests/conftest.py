"""Shared fixtures: tiny random base models of each supported architecture, the packaged SmolLM2, and references.

The reference for a masked model is the *base* model with its skipped sub-blocks replaced by modules that return a
zero residual update, run through the base architecture's own decoder-layer forward. Adding zero to the residual
stream leaves it unchanged exactly, so a skipped block is the identity there, computed without any code from
`modeling_igp`.
"""

import contextlib
import os
import random

# The tests use only local files. huggingface_hub reads this when it is first imported, so it is set before the
# transformers import below.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)


# Tiny shapes: 4 layers (8 blocks), grouped-query attention, a vocabulary small enough for fast logits.
TINY_SHAPES = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# Every architecture the model supports, plus Qwen2 with sliding-window layers and Mistral with a window of 4
# tokens, so prompts longer than the window exercise the sliding mask.
ARCHITECTURES = ("llama", "qwen2", "qwen2_sliding", "qwen3", "mistral")


def tiny_config(arch: str, attn_implementation: str = "sdpa", **overrides):
    """Return a tiny random-weight config of `arch` (one of `ARCHITECTURES`)."""
    shapes = dict(TINY_SHAPES, **overrides)
    if arch == "llama":
        config = LlamaConfig(**shapes)
    elif arch == "qwen2":
        config = Qwen2Config(**shapes, tie_word_embeddings=True)
    elif arch == "qwen2_sliding":
        # Layers 2 and 3 use a 4-token sliding window, layers 0 and 1 full attention.
        config = Qwen2Config(**shapes, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    elif arch == "qwen3":
        config = Qwen3Config(**shapes, head_dim=16)
    elif arch == "mistral":
        config = MistralConfig(**shapes, sliding_window=4)
    else:
        raise ValueError(f"Unknown test architecture {arch!r}; expected one of {ARCHITECTURES}.")
    config._attn_implementation = attn_implementation
    return config


MODEL_CLASSES = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen2_sliding": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "mistral": MistralForCausalLM,
}


def tiny_base(arch: str, attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    """Build a tiny random base causal LM in float32 and eval mode."""
    torch.manual_seed(seed)
    config = tiny_config(arch, attn_implementation, **overrides)
    model = MODEL_CLASSES[arch](config).eval()
    # Random init gives RMSNorm weights of exactly one; perturb them so a norm that is skipped or misplaced shows.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.fixture(params=ARCHITECTURES)
def arch(request):
    return request.param


# -- masks -------------------------------------------------------------------------------------------------------------


def random_mask(num_layers: int, generator: random.Random, skip_probability: float = 0.35) -> list[int]:
    """Return a random 0/1 mask of 2 * num_layers blocks that keeps at least one block."""
    while True:
        mask = [0 if generator.random() < skip_probability else 1 for _ in range(2 * num_layers)]
        if any(mask):
            return mask


def hard_masks(num_layers: int) -> list[list[int]]:
    """Masks that stress the cache and the block loop: layer 0's attention skipped, whole layers skipped, etc."""
    num_blocks = 2 * num_layers
    ones = [1] * num_blocks
    layer0_attention_skipped = [0] + [1] * (num_blocks - 1)
    layer0_skipped = [0, 0] + [1] * (num_blocks - 2)
    # Every other whole layer skipped, starting with layer 1.
    alternate_layers_skipped = [value for layer in range(num_layers) for value in ((0, 0) if layer % 2 else (1, 1))]
    only_mlps = [block % 2 for block in range(num_blocks)]
    only_last_attention = [0] * (num_blocks - 2) + [1, 0]
    return [ones, layer0_attention_skipped, layer0_skipped, alternate_layers_skipped, only_mlps, only_last_attention]


# -- identity reference --------------------------------------------------------------------------------------------


class ZeroAttention(nn.Module):
    """Stands in for a skipped self-attention: a zero residual update and no cache write."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class ZeroMLP(nn.Module):
    """Stands in for a skipped MLP: a zero residual update."""

    def forward(self, hidden_states):
        return torch.zeros_like(hidden_states)


@contextlib.contextmanager
def identity_blocks(base_model, mask):
    """Temporarily replace the sub-blocks that `mask` skips in `base_model` by zero-update modules."""
    layers = base_model.model.layers
    saved = [(layer.self_attn, layer.mlp) for layer in layers]
    try:
        for layer_idx, layer in enumerate(layers):
            if not mask[2 * layer_idx]:
                layer.self_attn = ZeroAttention()
            if not mask[2 * layer_idx + 1]:
                layer.mlp = ZeroMLP()
        yield base_model
    finally:
        for layer, (attention, mlp) in zip(layers, saved):
            layer.self_attn, layer.mlp = attention, mlp


@torch.no_grad()
def reference_logits(base_model, input_ids, mask, attention_mask=None):
    """Logits of the base model with the blocks that `mask` skips replaced by the identity (no cache)."""
    with identity_blocks(base_model, mask):
        return base_model(input_ids, attention_mask=attention_mask, use_cache=False).logits


@torch.no_grad()
def reference_greedy(base_model, input_ids, mask, max_new_tokens):
    """Greedy continuation of a single unpadded row by the identity reference, recomputing the prefix each step."""
    sequence = input_ids
    for _ in range(max_new_tokens):
        logits = reference_logits(base_model, sequence, mask)
        sequence = torch.cat([sequence, logits[:, -1:].argmax(dim=-1)], dim=1)
    return sequence


def left_pad(rows: list[torch.Tensor], pad_token_id: int):
    """Left-pad 1D token tensors into (input_ids, attention_mask)."""
    length = max(row.numel() for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, length - row.numel() :] = row
        attention_mask[index, length - row.numel() :] = 1
    return input_ids, attention_mask


# -- packaged real components ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2():
    """The packaged SmolLM2-135M-Instruct (float32, eval) and its tokenizer, loaded once per session."""
    from igp_training.assets import load_default_model

    model, tokenizer = load_default_model()
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer alone (no weights loaded)."""
    from igp_training.assets import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="session")
def router_path():
    from igp_training.assets import default_router_path

    return default_router_path()


@pytest.fixture(scope="session")
def router(router_path):
    """The packaged all-MiniLM-L6-v2 as an `IGPRouter`."""
    from modeling_igp import IGPRouter

    return IGPRouter.from_pretrained(str(router_path))


# Prompts from different domains, so their router embeddings are far apart.
PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
    "The castle stood on a hill above the river, and its towers caught the last light of the evening.",
]


@pytest.fixture(scope="session")
def routed_llama(router, smollm2_tokenizer):
    """A tiny Llama with SmolLM2's vocabulary, three clusters whose centroids are the embeddings of `PROMPTS`."""
    from modeling_igp import IGPruningForCausalLM

    base = tiny_base("llama", vocab_size=len(smollm2_tokenizer), pad_token_id=smollm2_tokenizer.pad_token_id,
                     bos_token_id=smollm2_tokenizer.bos_token_id, eos_token_id=smollm2_tokenizer.eos_token_id)
    bank = [[1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1, 1, 1], [1, 1, 0, 0, 1, 0, 1, 1]]
    centroids = router.embed(PROMPTS)
    model = IGPruningForCausalLM.from_base(base, bank, centroids=centroids, router=router, tokenizer=smollm2_tokenizer)
    return model, base



# -- one saved checkpoint shared by the save/load and ecosystem tests ---------------------------------------------------

# Blocks 0 (layer 0's attention) and 5 (layer 2's MLP) are kept by no mask, so the checkpoint omits them.
CHECKPOINT_BANK = [
    [0, 1, 1, 1, 1, 0, 1, 1],
    [0, 1, 0, 0, 1, 0, 1, 1],
    [0, 0, 1, 1, 1, 0, 1, 0],
]
CHECKPOINT_REMOVED_BLOCKS = (0, 5)


@pytest.fixture(scope="session")
def checkpoint_base(smollm2_tokenizer):
    """A tiny Llama with SmolLM2's vocabulary and a generation config of its own."""
    tokenizer = smollm2_tokenizer
    base = tiny_base(
        "llama", seed=3, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    base.generation_config.max_new_tokens = 7
    base.generation_config.repetition_penalty = 1.3
    base.generation_config.pad_token_id = tokenizer.pad_token_id
    return base


@pytest.fixture(scope="session")
def saved_checkpoint(tmp_path_factory, checkpoint_base, router, smollm2_tokenizer):
    """(path, model): the routed model of `CHECKPOINT_BANK` saved once with its router and tokenizer."""
    from modeling_igp import IGPruningForCausalLM

    model = IGPruningForCausalLM.from_base(
        checkpoint_base, CHECKPOINT_BANK, centroids=router.embed(PROMPTS), router=router, tokenizer=smollm2_tokenizer
    )
    path = tmp_path_factory.mktemp("checkpoint") / "igp-tiny-llama"
    model.save_pretrained(path)
    return path, model


@pytest.fixture(autouse=True)
def _offline_environment(monkeypatch):
    # Restores the offline setting for each test, in case an earlier one removed it, and for the subprocesses a
    # test starts, which inherit the environment.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


@pytest.fixture
def one_thread():
    """Run the test on one torch thread: tiny models spend their time in thread synchronisation, so one thread runs
    them faster on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
