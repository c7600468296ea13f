"""Fine-tuning under dynamic masks: LoRA and full fine-tuning with Trainer, adapters, merging, distillation, CLI."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPTS, tiny_base
from transformers import AutoModelForCausalLM, TrainingArguments

from igp_training.cli import main
from igp_training.finetune import (
    PROJECTION_MODULES,
    DistillationTrainer,
    FinetuneConfig,
    build_trainer,
    distillation_loss,
    load_teacher,
    merge_adapters,
    prepare_model,
    route_and_tokenize,
)
from modeling_igp import IGPruningForCausalLM


DATA_DIR = Path(os.environ.get("IGP_DATA_DIR") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data")

# Three clusters over 4 layers (8 blocks). Cluster 1 skips blocks 0 and 3, cluster 2 skips blocks 2, 3 and 5. Mask 0
# runs every block, so the checkpoint keeps the weights of every block.
BANK = [[1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1, 1, 1], [1, 1, 0, 0, 1, 0, 1, 1]]
# A bank whose masks all skip blocks 2 and 3 (layer 1), so the checkpoint holds no weights for them.
PRUNED_BANK = [[1, 1, 0, 0, 1, 1, 1, 1], [0, 1, 0, 0, 1, 1, 1, 1]]


def real_texts(count_per_domain: int = 8) -> list[str]:
    """GSM8K questions and HumanEval prompts: two domains that the MiniLM router separates."""
    gsm8k, humaneval = DATA_DIR / "gsm8k" / "train.jsonl", DATA_DIR / "code" / "HumanEval.jsonl.gz"
    if not gsm8k.is_file() or not humaneval.is_file():
        pytest.skip(f"benchmark data not found under {DATA_DIR}; set IGP_DATA_DIR")
    with open(gsm8k) as handle:
        math = [json.loads(next(handle))["question"] for _ in range(count_per_domain)]
    with gzip.open(humaneval, "rt") as handle:
        code = [json.loads(next(handle))["prompt"] for _ in range(count_per_domain)]
    return math + code


def tokenizer_shapes(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)


@pytest.fixture
def routed_model(router, smollm2_tokenizer):
    """A fresh tiny Llama with SmolLM2's vocabulary and three routed clusters (PEFT edits models in place)."""
    base = tiny_base("llama", **tokenizer_shapes(smollm2_tokenizer))
    centroids = router.embed(PROMPTS)
    model = IGPruningForCausalLM.from_base(base, BANK, centroids=centroids, router=router, tokenizer=smollm2_tokenizer)
    return model, base


def randomize_lora_b(peft_model, seed: int = 0) -> None:
    """LoRA starts with B = 0, an adapter that changes nothing; random B makes round-trip checks meaningful."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))


def training_args(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        max_steps=8,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=100,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
        use_cpu=True,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def batch_logits(model, input_ids, cluster_ids):
    with torch.no_grad():
        return model(input_ids, cluster_ids=cluster_ids, use_cache=False).logits


def sample_batch(vocab_size: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (3, 10), generator=generator), torch.tensor([0, 1, 2])


# -- LoRA target modules -------------------------------------------------------------------------------------------


def lora_wrapped_names(peft_model) -> set[str]:
    return {name.removeprefix("base_model.model.") for name, module in peft_model.named_modules() if
            hasattr(module, "lora_A") and len(module.lora_A)}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_default_targets_per_architecture(arch):
    base = tiny_base(arch)
    model = IGPruningForCausalLM.from_base(base, PRUNED_BANK)
    peft_model = prepare_model(model, FinetuneConfig(lora_r=4))

    expected = set()
    for layer_idx, layer in enumerate(model.model.layers):
        for module_name in ("self_attn", "mlp"):
            block = getattr(layer, module_name)
            if block is None:
                continue
            expected |= {f"model.layers.{layer_idx}.{module_name}.{name}" for name, child in block.named_children()
                         if name in PROJECTION_MODULES}
    assert lora_wrapped_names(peft_model) == expected
    # Layer 1 is removed by the bank, so it has nothing to adapt.
    assert not any(name.startswith("model.layers.1.") for name in expected)
    assert len(expected) == 3 * 7


@pytest.mark.parametrize("tied", [True, False])
def test_all_linear_skips_lm_head(tied):
    base = tiny_base("llama", tie_word_embeddings=tied)
    model = IGPruningForCausalLM.from_base(base, BANK)
    peft_model = prepare_model(model, FinetuneConfig(lora_r=4, target_modules="all-linear"))

    wrapped = lora_wrapped_names(peft_model)
    assert "lm_head" not in wrapped
    assert len(wrapped) == 4 * 7
    assert all(name.rsplit(".", 1)[-1] in PROJECTION_MODULES for name in wrapped)


def test_unknown_architecture_needs_targets():
    model = IGPruningForCausalLM.from_base(tiny_base("llama"), BANK)
    model.config.text_config.model_type = "gpt_neox"
    with pytest.raises(ValueError, match="all-linear"):
        prepare_model(model, FinetuneConfig(lora_r=4))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"lora_r": -1}, "lora_r"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"distill_weight": 1.5}, "distill_weight"),
        ({"distill_temperature": 0.0}, "distill_temperature"),
        ({"max_length": 1}, "max_length"),
        ({"target_modules": " , "}, "target_modules"),
    ],
)
def test_config_rejects_invalid_values(settings, message):
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(**settings)


# -- data ----------------------------------------------------------------------------------------------------------


def test_examples_routed_once(routed_model, smollm2_tokenizer):
    model, _ = routed_model
    texts = real_texts(4) + PROMPTS
    dataset = route_and_tokenize(model, smollm2_tokenizer, texts, max_length=512)

    assert dataset.column_names == ["input_ids", "attention_mask", "labels", "cluster_ids"]
    # These texts are shorter than max_length, so the decoded training text is the text itself.
    assert dataset["cluster_ids"] == model.route(texts).tolist()
    assert dataset["cluster_ids"][-3:] == [0, 1, 2]
    assert dataset["labels"] == dataset["input_ids"]


def test_routing_uses_truncated_text(routed_model, smollm2_tokenizer):
    model, _ = routed_model
    # The code prompt routes to cluster 1, the math text to 0; after truncation only the code part remains.
    text = PROMPTS[1] + "\n" + " ".join([PROMPTS[0]] * 20)
    max_length = len(smollm2_tokenizer(PROMPTS[1])["input_ids"])
    dataset = route_and_tokenize(model, smollm2_tokenizer, [text], max_length=max_length)

    assert len(dataset["input_ids"][0]) == max_length
    assert dataset["cluster_ids"] == model.route([PROMPTS[1]]).tolist()


def test_single_mask_model_needs_no_router(smollm2_tokenizer):
    base = tiny_base("llama", **tokenizer_shapes(smollm2_tokenizer))
    model = IGPruningForCausalLM.from_base(base, [BANK[1]])
    dataset = route_and_tokenize(model, smollm2_tokenizer, PROMPTS, max_length=32)
    assert dataset["cluster_ids"] == [0, 0, 0]


def test_many_masks_without_router_rejected(smollm2_tokenizer):
    base = tiny_base("llama", **tokenizer_shapes(smollm2_tokenizer))
    model = IGPruningForCausalLM.from_base(base, BANK)
    with pytest.raises(ValueError, match="cannot route"):
        route_and_tokenize(model, smollm2_tokenizer, PROMPTS, max_length=32)


def test_empty_text_rejected(routed_model, smollm2_tokenizer):
    model, _ = routed_model
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        route_and_tokenize(model, smollm2_tokenizer, ["a text", "  "], max_length=32)


# -- gradients follow the masks ------------------------------------------------------------------------------------


def block_parameters(model, block: int) -> list[tuple[str, torch.nn.Parameter]]:
    layer = model.model.layers[block // 2]
    modules = ("input_layernorm", "self_attn") if block % 2 == 0 else ("post_attention_layernorm", "mlp")
    return [(f"{name}.{key}", parameter) for name in modules for key, parameter in
            getattr(layer, name).named_parameters()]


@pytest.mark.parametrize("cluster", [1, 2])
def test_skipped_blocks_get_zero_gradient(cluster):
    """Full fine-tuning: only row 0 (in `cluster`) has targets. Row 1 runs every block and contributes no loss."""
    model = IGPruningForCausalLM.from_base(tiny_base("llama"), BANK)
    prepare_model(model, FinetuneConfig(lora_r=0)).train()
    input_ids, _ = sample_batch(96)
    input_ids = input_ids[:2]
    labels = input_ids.clone()
    labels[1] = -100

    model(input_ids, cluster_ids=torch.tensor([cluster, 0]), labels=labels, use_cache=False).loss.backward()

    for block, kept in enumerate(BANK[cluster]):
        for name, parameter in block_parameters(model, block):
            gradient = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
            if kept:
                assert gradient.abs().sum() > 0, f"block {block} ({name}) is kept but got no gradient"
            else:
                assert torch.count_nonzero(gradient) == 0, f"block {block} ({name}) is skipped but got a gradient"


def test_skipped_blocks_get_zero_lora_gradient():
    model = IGPruningForCausalLM.from_base(tiny_base("llama"), BANK)
    peft_model = prepare_model(model, FinetuneConfig(lora_r=4, lora_dropout=0.0)).train()
    input_ids, _ = sample_batch(96)
    labels = input_ids.clone()
    labels[1:] = -100

    peft_model(input_ids, cluster_ids=torch.tensor([2, 0, 1]), labels=labels, use_cache=False).loss.backward()

    checked = 0
    for name, parameter in peft_model.named_parameters():
        if "lora_B" not in name:
            continue
        layer_idx = int(name.split("layers.")[1].split(".")[0])
        block = 2 * layer_idx + (0 if ".self_attn." in name else 1)
        gradient = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
        if BANK[2][block]:
            assert gradient.abs().sum() > 0, f"{name}: kept block {block} got no gradient"
        else:
            assert torch.count_nonzero(gradient) == 0, f"{name}: skipped block {block} got a gradient"
        checked += 1
    assert checked == 4 * 7


def test_trainer_step_leaves_skipped_blocks_unchanged(routed_model, smollm2_tokenizer, tmp_path):
    """A Trainer step on examples routed to cluster 1 moves the blocks of mask 1 and only those."""
    model, _ = routed_model
    dataset = route_and_tokenize(model, smollm2_tokenizer, real_texts(8), max_length=64)
    dataset = dataset.filter(lambda example: example["cluster_ids"] == 1)
    assert len(dataset) >= 2, "some HumanEval prompts should route to the code cluster"
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}

    trainable = prepare_model(model, FinetuneConfig(lora_r=0))
    trainer = build_trainer(trainable, smollm2_tokenizer, dataset, FinetuneConfig(lora_r=0),
                            training_args(tmp_path, max_steps=1, learning_rate=1e-3))
    trainer.train()

    for block, kept in enumerate(BANK[1]):
        for name, parameter in block_parameters(model, block):
            original = before[next(key for key in before if key.endswith(f"layers.{block // 2}.{name}"))]
            if kept:
                assert not torch.equal(parameter, original), f"kept block {block} ({name}) did not move"
            else:
                assert torch.equal(parameter, original), f"skipped block {block} ({name}) moved"


# -- training ------------------------------------------------------------------------------------------------------


def test_lora_finetune_lowers_loss(routed_model, smollm2_tokenizer, tmp_path):
    model, _ = routed_model
    texts = real_texts(4)
    dataset = route_and_tokenize(model, smollm2_tokenizer, texts, max_length=32)
    assert len(set(dataset["cluster_ids"])) >= 2, "the data should train more than one mask"
    config = FinetuneConfig(lora_r=8, lora_dropout=0.0)

    trainer = build_trainer(prepare_model(model, config), smollm2_tokenizer, dataset, config,
                            training_args(tmp_path, max_steps=6), eval_dataset=dataset)
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    loss_after = trainer.evaluate()["eval_loss"]

    assert loss_after < loss_before - 0.1, (loss_before, loss_after)


def test_gradient_accumulation_keeps_step(routed_model, smollm2_tokenizer, tmp_path):
    """One SGD step on 4 examples gives the same weights as 4 accumulated steps of 1 example, with distillation."""
    model, _ = routed_model
    dataset = route_and_tokenize(model, smollm2_tokenizer, real_texts(2), max_length=24)
    config = FinetuneConfig(lora_r=0, distill_weight=0.5, distill_temperature=2.0)
    results = []
    for batch_size, accumulation in ((4, 1), (1, 4)):
        student = IGPruningForCausalLM.from_base(tiny_base("llama", **tokenizer_shapes(smollm2_tokenizer)), BANK)
        teacher = tiny_base("llama", **tokenizer_shapes(smollm2_tokenizer))
        args = training_args(tmp_path, max_steps=1, optim="sgd", learning_rate=1.0, per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, train_sampling_strategy="sequential")
        trainer = build_trainer(prepare_model(student, config), smollm2_tokenizer, dataset, config, args,
                                teacher=teacher)
        trainer.train()
        results.append(dict(student.named_parameters()))

    for name, parameter in results[0].items():
        torch.testing.assert_close(parameter, results[1][name], atol=1e-6, rtol=1e-5, msg=name)


# -- adapters ------------------------------------------------------------------------------------------------------


def test_adapter_round_trip_identical_logits(routed_model, smollm2_tokenizer, tmp_path):
    from peft import PeftModel

    model, _ = routed_model
    model.save_pretrained(tmp_path / "pruned")
    student = IGPruningForCausalLM.from_pretrained(str(tmp_path / "pruned"))
    peft_model = prepare_model(student, FinetuneConfig(lora_r=4, lora_dropout=0.0))
    randomize_lora_b(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    input_ids, cluster_ids = sample_batch(len(smollm2_tokenizer))
    expected = batch_logits(peft_model, input_ids, cluster_ids)
    assert not torch.allclose(expected, batch_logits(model, input_ids, cluster_ids), atol=1e-3), "adapter is a no-op"

    reloaded = PeftModel.from_pretrained(IGPruningForCausalLM.from_pretrained(str(tmp_path / "pruned")),
                                         tmp_path / "adapter")
    torch.testing.assert_close(batch_logits(reloaded, input_ids, cluster_ids), expected, atol=0, rtol=0)

    # transformers finds adapter_config.json, loads the base checkpoint it names (remote code), then the adapter.
    auto = AutoModelForCausalLM.from_pretrained(str(tmp_path / "adapter"), trust_remote_code=True)
    assert type(auto).__name__ == "IGPruningForCausalLM"
    torch.testing.assert_close(batch_logits(auto, input_ids, cluster_ids), expected, atol=0, rtol=0)
    assert auto.route(PROMPTS).tolist() == [0, 1, 2]


def test_merged_model_matches_adapter_model(routed_model, smollm2_tokenizer, tmp_path):
    model, _ = routed_model
    peft_model = prepare_model(model, FinetuneConfig(lora_r=4, lora_dropout=0.0, target_modules="all-linear"))
    randomize_lora_b(peft_model)
    peft_model.eval()
    input_ids, cluster_ids = sample_batch(len(smollm2_tokenizer))
    expected = batch_logits(peft_model, input_ids, cluster_ids)

    merged = merge_adapters(peft_model)
    assert type(merged) is IGPruningForCausalLM
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(batch_logits(merged, input_ids, cluster_ids), expected, atol=2e-5, rtol=1e-5)

    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), trust_remote_code=True)
    torch.testing.assert_close(batch_logits(reloaded, input_ids, cluster_ids), batch_logits(merged, input_ids, cluster_ids),
                               atol=0, rtol=0)
    assert reloaded.route(PROMPTS).tolist() == [0, 1, 2]


# -- distillation --------------------------------------------------------------------------------------------------


def test_distillation_loss_matches_direct_sum():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=generator), torch.randn(2, 5, 7, generator=generator)
    labels = torch.tensor([[1, 2, 3, -100, -100], [-100, 4, 5, 6, 1]])
    temperature = 2.0

    total, count = 0.0, 0
    for row in range(2):
        for position in range(4):
            if labels[row, position + 1] == -100:
                continue
            p_teacher = torch.softmax(teacher[row, position] / temperature, dim=-1)
            p_student = torch.softmax(student[row, position] / temperature, dim=-1)
            total += float((p_teacher * (p_teacher.log() - p_student.log())).sum())
            count += 1

    assert count == 6
    loss = distillation_loss(student, teacher, labels, temperature)
    assert loss.item() == pytest.approx(temperature**2 * total / count, rel=1e-5)
    loss_over_more_tokens = distillation_loss(student, teacher, labels, temperature, num_items_in_batch=12)
    assert loss_over_more_tokens.item() == pytest.approx(temperature**2 * total / 12, rel=1e-5)
    assert distillation_loss(teacher, teacher, labels).item() == pytest.approx(0.0, abs=1e-6)


def test_self_teacher_equals_dense_base(routed_model, smollm2_tokenizer, tmp_path):
    model, base = routed_model
    input_ids, _ = sample_batch(len(smollm2_tokenizer))
    with torch.no_grad():
        dense = base(input_ids, use_cache=False).logits

    config = FinetuneConfig(lora_r=4, distill_weight=1.0)
    assert load_teacher(model, None, lora=True) is None
    peft_model = prepare_model(model, config)
    randomize_lora_b(peft_model)
    dataset = route_and_tokenize(model, smollm2_tokenizer, PROMPTS, max_length=32)
    trainer = build_trainer(peft_model, smollm2_tokenizer, dataset, config, training_args(tmp_path))
    assert isinstance(trainer, DistillationTrainer)

    teacher_logits = trainer.teacher_logits(peft_model, {"input_ids": input_ids, "attention_mask": None})
    torch.testing.assert_close(teacher_logits, dense, atol=1e-5, rtol=1e-5)
    # The adapters are back on afterwards.
    assert not torch.allclose(batch_logits(peft_model, input_ids, torch.zeros(3, dtype=torch.long)), dense, atol=1e-3)


def test_pruned_checkpoint_teacher_from_base(smollm2_tokenizer, tmp_path):
    base = tiny_base("llama", **tokenizer_shapes(smollm2_tokenizer))
    base.save_pretrained(tmp_path / "base")
    base = type(base).from_pretrained(tmp_path / "base")
    IGPruningForCausalLM.from_base(base, PRUNED_BANK[:1], tokenizer=smollm2_tokenizer).save_pretrained(tmp_path / "pruned")
    student = IGPruningForCausalLM.from_pretrained(str(tmp_path / "pruned"))
    assert student.model.layers[1].self_attn is None

    # The checkpoint lacks layer 1, so it cannot be its own teacher: the recorded base model is loaded instead.
    teacher = load_teacher(student, None, lora=True)
    input_ids, _ = sample_batch(len(smollm2_tokenizer))
    with torch.no_grad():
        torch.testing.assert_close(teacher(input_ids).logits, base(input_ids).logits, atol=0, rtol=0)

    with pytest.raises(ValueError, match="holds no weights for blocks"):
        build_trainer(prepare_model(student, FinetuneConfig(lora_r=4)), smollm2_tokenizer,
                      route_and_tokenize(student, smollm2_tokenizer, PROMPTS, max_length=16),
                      FinetuneConfig(lora_r=4, distill_weight=0.5), training_args(tmp_path))


def test_missing_teacher_names_option(smollm2_tokenizer, tmp_path):
    base = tiny_base("llama", **tokenizer_shapes(smollm2_tokenizer))
    student = IGPruningForCausalLM.from_base(base, PRUNED_BANK)
    student.config.text_config._name_or_path = str(tmp_path / "moved-away")
    with pytest.raises(ValueError, match="--teacher"):
        load_teacher(student, None)
    student.config.text_config._name_or_path = ""
    with pytest.raises(ValueError, match="--teacher"):
        load_teacher(student, None)


def test_distillation_moves_student_towards_teacher(routed_model, smollm2_tokenizer, tmp_path):
    model, base = routed_model
    dataset = route_and_tokenize(model, smollm2_tokenizer, real_texts(2), max_length=32)
    # Masks 1 and 2 skip blocks, so these rows start away from the dense teacher (mask 0 would start on it).
    dataset = dataset.map(lambda example, index: {"cluster_ids": 1 + index % 2}, with_indices=True)
    config = FinetuneConfig(lora_r=8, lora_dropout=0.0, distill_weight=1.0)
    peft_model = prepare_model(model, config)
    trainer = build_trainer(peft_model, smollm2_tokenizer, dataset, config,
                            training_args(tmp_path, max_steps=5, learning_rate=5e-3, logging_steps=1))
    batch = trainer.data_collator([dataset[index] for index in range(len(dataset))])

    def mean_kl():
        """Mean KL(dense base || student) per token, computed from the base model directly."""
        with torch.no_grad():
            student = peft_model(batch["input_ids"], attention_mask=batch["attention_mask"],
                                 cluster_ids=batch["cluster_ids"]).logits
            teacher = base(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        token_kl = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none")
        tokens = batch["attention_mask"].bool()
        return float(token_kl.sum(-1)[tokens].mean())

    kl_before = mean_kl()
    assert kl_before > 1e-4, "masks 1 and 2 should make the student differ from the dense model"
    trainer.train()
    assert mean_kl() < 0.8 * kl_before
    assert any("distill_loss" in entry for entry in trainer.state.log_history)


# -- command line --------------------------------------------------------------------------------------------------


def run_igp(*args):
    # The `igp` console script's entry point, in a fresh process as a user runs it.
    command = [sys.executable, "-c", "import sys; from igp_training.cli import main; sys.exit(main())", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})


@pytest.fixture
def single_mask_checkpoint(smollm2_tokenizer, tmp_path):
    """A saved one-mask checkpoint with a tokenizer (no router needed) and a small text file."""
    base = tiny_base("llama", **tokenizer_shapes(smollm2_tokenizer))
    IGPruningForCausalLM.from_base(base, [BANK[2]], tokenizer=smollm2_tokenizer).save_pretrained(tmp_path / "pruned")
    (tmp_path / "pruned" / "igp_run.json").write_text(json.dumps({"method": "static mask for the test"}))
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(PROMPTS * 4).replace("\n    ", " ") + "\n")
    return tmp_path / "pruned", data


@pytest.mark.slow
def test_cli_lora_writes_adapter_and_merged(single_mask_checkpoint, tmp_path):
    checkpoint, data = single_mask_checkpoint
    output = tmp_path / "finetuned"
    result = run_igp("finetune", "--model", str(checkpoint), "--data", f"{data}@8", "--output", str(output),
                     "--lora-r", "4", "--steps", "2", "--batch-size", "2", "--max-length", "32", "--heldout", "2",
                     "--merge")
    assert result.returncode == 0, result.stderr[-3000:]

    assert (output / "adapter_model.safetensors").is_file()
    assert not (output / "training_args.bin").exists()
    record = json.loads((output / "igp_finetune.json").read_text())
    assert record["global_step"] == 2
    assert record["train_examples"] == 8
    assert "eval_loss_after" in record
    # The merged model keeps the pruning record, so `igp eval` still excludes its calibration texts.
    assert json.loads((output / "merged" / "igp_run.json").read_text())["method"] == "static mask for the test"
    assert (output / "merged" / "igp_finetune.json").is_file()

    adapter_model = AutoModelForCausalLM.from_pretrained(str(output), trust_remote_code=True)
    merged = AutoModelForCausalLM.from_pretrained(str(output / "merged"), trust_remote_code=True)
    input_ids = torch.tensor([[5, 900, 77, 4000, 12]])
    cluster_ids = torch.tensor([0])
    torch.testing.assert_close(batch_logits(merged, input_ids, cluster_ids),
                               batch_logits(adapter_model, input_ids, cluster_ids), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora-r", "-2"], "lora_r"),
        (["--lora-r", "0", "--merge"], "--merge"),
        (["--steps", "0"], "--steps"),
        (["--distill", "2"], "distill_weight"),
    ],
)
def test_cli_rejects_invalid_arguments(single_mask_checkpoint, tmp_path, capsys, extra, message):
    checkpoint, data = single_mask_checkpoint
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--model", str(checkpoint), "--data", str(data), "--output", str(tmp_path / "out"), *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_missing_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--model", str(tmp_path / "nowhere"), "--data", "default", "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "config.json" in capsys.readouterr().err


def test_cli_rejects_base_model_folder(smollm2_tokenizer, tmp_path, capsys):
    tiny_base("llama", **tokenizer_shapes(smollm2_tokenizer)).save_pretrained(tmp_path / "base")

    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--model", str(tmp_path / "base"), "--data", "default", "--output", str(tmp_path / "out")])

    assert exit_info.value.code == 2
    assert "not an IGPruningForCausalLM checkpoint" in capsys.readouterr().err


def test_resume_continues_exactly(smollm2_tokenizer, tmp_path, one_thread):
    """Stopping after 2 of 4 steps and resuming from the checkpoint gives the weights of an uninterrupted run."""
    texts = PROMPTS + [text.upper() for text in PROMPTS] + [text.lower() for text in PROMPTS][:2]
    # LoRA dropout draws from torch's generator, so the resumed run matches only if the RNG state is restored too.
    config = FinetuneConfig(lora_r=4, lora_dropout=0.1)

    def trainer_for(output_dir, max_steps):
        base = tiny_base("llama", **tokenizer_shapes(smollm2_tokenizer))
        model = IGPruningForCausalLM.from_base(base, [BANK[1]])
        dataset = route_and_tokenize(model, smollm2_tokenizer, texts, max_length=16)
        args = training_args(tmp_path, output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2,
                             save_strategy="steps", save_steps=2, learning_rate=1e-2)
        return build_trainer(prepare_model(model, config), smollm2_tokenizer, dataset, config, args)

    straight = trainer_for(tmp_path / "straight", 4)
    straight.train()

    trainer_for(tmp_path / "interrupted", 2).train()
    resumed = trainer_for(tmp_path / "interrupted", 4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "interrupted" / "checkpoint-2"))

    assert resumed.state.global_step == 4
    expected = {name: parameter for name, parameter in straight.model.named_parameters() if parameter.requires_grad}
    for name, parameter in resumed.model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter, expected[name], atol=0, rtol=0, msg=name)

    # Safetensors and JSON only, besides two plain-text files: PEFT's model card and the tokenizer's chat template.
    checkpoint = tmp_path / "interrupted" / "checkpoint-2"
    assert set(os.listdir(checkpoint)) == {
        "adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors", "optimizer.json",
        "scheduler.json", "rng_state.safetensors", "rng_state.json", "trainer_state.json", "training_args.json",
        "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "README.md",
    }
    for path in checkpoint.iterdir():
        # torch.save writes a zip archive, plain pickle starts with its protocol opcode.
        assert not path.read_bytes().startswith((b"PK\x03\x04", b"\x80")), path.name
