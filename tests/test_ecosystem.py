"""IGPruningForCausalLM inside the transformers ecosystem: pipeline, generation config, parameter counts,
gradient checkpointing, device_map and dtype loading."""

import pytest
import torch
from transformers import AutoModelForCausalLM, pipeline

from conftest import CHECKPOINT_BANK, CHECKPOINT_REMOVED_BLOCKS, PROMPTS, reference_logits, tiny_base
from modeling_igp import IGPruningForCausalLM


def block_parameter_count(base_model, blocks) -> int:
    """Parameters of the base model's modules that make up the given blocks."""
    total = 0
    for block in blocks:
        layer = base_model.model.layers[block // 2]
        modules = (layer.input_layernorm, layer.self_attn) if block % 2 == 0 else (layer.post_attention_layernorm, layer.mlp)
        total += sum(parameter.numel() for module in modules for parameter in module.parameters())
    return total


@torch.no_grad()
def test_text_generation_pipeline(saved_checkpoint, smollm2_tokenizer):
    path, model = saved_checkpoint
    generator = pipeline("text-generation", model=str(path), trust_remote_code=True)

    outputs = generator(PROMPTS, do_sample=False, max_new_tokens=6, return_full_text=False, batch_size=1)

    assert type(generator.model).__name__ == "IGPruningForCausalLM"
    for prompt, output in zip(PROMPTS, outputs):
        # The pipeline routes through generate; the same prompt routed in memory gives the same tokens.
        input_ids = smollm2_tokenizer(prompt, return_tensors="pt").input_ids
        expected = model.generate(input_ids, do_sample=False, max_new_tokens=6)
        expected_text = smollm2_tokenizer.decode(expected[0, input_ids.shape[1] :], skip_special_tokens=True)
        assert output[0]["generated_text"] == expected_text


def test_generation_config_carried_over(saved_checkpoint, checkpoint_base):
    path, model = saved_checkpoint
    loaded = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

    for candidate in (model, loaded):
        assert candidate.generation_config.max_new_tokens == 7
        assert candidate.generation_config.repetition_penalty == 1.3
        assert candidate.generation_config.eos_token_id == checkpoint_base.generation_config.eos_token_id

    # generate() takes its defaults from it: 7 new tokens when no end-of-sequence token can stop it.
    prompt = torch.tensor([[100, 200, 300]])
    generated = loaded.generate(prompt, cluster_ids=torch.tensor([0]), do_sample=False, eos_token_id=None)
    assert generated.shape == (1, 3 + 7)


def test_num_parameters_excludes_removed_blocks(saved_checkpoint, checkpoint_base):
    path, model = saved_checkpoint
    loaded = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    expected = checkpoint_base.num_parameters() - block_parameter_count(checkpoint_base, CHECKPOINT_REMOVED_BLOCKS)

    assert model.num_parameters() == expected
    assert loaded.num_parameters() == expected
    # transformers counts nn.Embedding weights as embeddings, not the output projection.
    embeddings = checkpoint_base.model.embed_tokens.weight.numel()
    assert loaded.num_parameters(exclude_embeddings=True) == expected - embeddings


def test_num_parameters_of_dense_wrapper_equals_base():
    base = tiny_base("qwen2")  # tied embeddings: the shared matrix counts once
    assert IGPruningForCausalLM.from_base(base, [[1] * 8]).num_parameters() == base.num_parameters()


@pytest.mark.parametrize("arch", ["llama", "qwen2_sliding"])
def test_gradient_checkpointing_gives_same_gradients(arch):
    base = tiny_base(arch)
    bank = [[1] * 8, [0, 1, 1, 0, 1, 1, 0, 1]]
    model = IGPruningForCausalLM.from_base(base, bank).train()
    input_ids = torch.randint(3, 96, (3, 9), generator=torch.Generator().manual_seed(0))
    # Soft gates on the blocks each row's mask keeps, zero on the ones it skips.
    masks = torch.tensor(bank, dtype=torch.float32)[torch.tensor([0, 1, 1])]
    gate_values = torch.linspace(0.3, 1.0, 8).repeat(3, 1) * masks

    def training_step():
        model.zero_grad(set_to_none=True)
        gates = gate_values.clone().requires_grad_()
        model(input_ids, block_gates=gates, labels=input_ids).loss.backward()
        return {name: parameter.grad.clone() for name, parameter in model.named_parameters()}, gates.grad.clone()

    plain_grads, plain_gate_grads = training_step()

    # Count MLP calls by wrapping its forward: checkpoint recomputation does not fire module hooks.
    mlp = base.model.layers[0].mlp
    mlp_forward = mlp.forward
    mlp_calls = []

    def counting_forward(*args, **kwargs):
        mlp_calls.append(1)
        return mlp_forward(*args, **kwargs)

    model.gradient_checkpointing_enable()
    mlp.forward = counting_forward
    try:
        checkpointed_grads, checkpointed_gate_grads = training_step()
    finally:
        del mlp.forward
        model.gradient_checkpointing_disable()

    # The MLP ran a second time during backward, so checkpointing was active.
    assert len(mlp_calls) == 2
    assert plain_grads.keys() == checkpointed_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(checkpointed_gate_grads, plain_gate_grads, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_device_map_auto_loads_on_cpu(saved_checkpoint):
    path, model = saved_checkpoint
    loaded = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, device_map="auto")

    assert {parameter.device.type for parameter in loaded.parameters()} == {"cpu"}
    input_ids = torch.tensor([[100, 200, 300, 400]] * 3)
    cluster_ids = torch.tensor([0, 1, 2])
    torch.testing.assert_close(
        loaded(input_ids, cluster_ids=cluster_ids).logits, model(input_ids, cluster_ids=cluster_ids).logits,
        atol=1e-6, rtol=0,
    )
    assert loaded.route(PROMPTS).tolist() == [0, 1, 2]


@pytest.mark.parametrize("dtype_argument", ["torch_dtype", "dtype"])
@torch.no_grad()
def test_bfloat16_loading(saved_checkpoint, checkpoint_base, dtype_argument):
    path, _ = saved_checkpoint
    loaded = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **{dtype_argument: torch.bfloat16})

    assert {parameter.dtype for parameter in loaded.parameters()} == {torch.bfloat16}
    input_ids = torch.tensor([[100, 200, 300, 400, 500]])
    for cluster, mask in enumerate(CHECKPOINT_BANK):
        logits = loaded(input_ids, cluster_ids=torch.tensor([cluster])).logits
        assert logits.dtype == torch.bfloat16
        expected = reference_logits(checkpoint_base, input_ids, mask)
        torch.testing.assert_close(logits.float(), expected, atol=5e-2, rtol=5e-2)

    generated = loaded.generate(input_ids, cluster_ids=torch.tensor([1]), max_new_tokens=3, do_sample=False)
    assert generated.shape[1] <= input_ids.shape[1] + 3
    # The router keeps its own float32 weights and still routes.
    assert loaded.route(PROMPTS).tolist() == [0, 1, 2]
