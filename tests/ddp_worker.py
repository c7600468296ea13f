"""One training run for the data-parallel tests, launched as `python ddp_worker.py ...` or under `torchrun`.

It trains a tiny Llama (SmolLM2's vocabulary, random weights) on short texts for a few steps with
`per_device_train_batch_size` examples per process, then the first process writes the trained values to
`OUTPUT/TASK.safetensors`:

- `lora`: LoRA fine-tuning under three masks (stock Trainer), the adapter weights;
- `full`: full fine-tuning with distillation (DistillationTrainer), every weight;
- `fsdp`: `full` with the model sharded by FSDP as one unit;
- `masks`: L0 mask learning (`learn_masks` and its MaskLearningTrainer), the gate log-alphas and expected sparsity.

Every process reads the same data and seeds, so one process with batch 4 and two processes with batch 2 see the
same global batches. Dropout is off everywhere: its noise would differ between the two layouts.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import PROMPTS, tiny_base  # noqa: E402


# Same bank as the fine-tuning tests: mask 0 runs every block, masks 1 and 2 skip different ones.
BANK = [[1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1, 1, 1], [1, 1, 0, 0, 1, 0, 1, 1]]
TEXTS = PROMPTS + [
    "A train leaves the station at nine and travels 60 miles per hour. How far has it gone by noon?",
    "import numpy as np\n\ndef normalize(rows):\n    return rows / np.linalg.norm(rows, axis=1, keepdims=True)",
    "Rain fell over the harbour all afternoon, and the fishing boats stayed tied to the pier.",
    "Tom has 3 times as many marbles as Ann, who has 14. How many marbles do they have together?",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        self.items.append(item)",
]


def build_dataset(tokenizer, num_examples: int):
    from igp_training.data import tokenize_calibration

    texts = [TEXTS[index % len(TEXTS)] for index in range(num_examples)]
    # Cluster ids are assigned, not routed, so the workers need no router; rows of one batch mix all three masks.
    cluster_ids = [index % len(BANK) for index in range(num_examples)]
    return tokenize_calibration(texts, tokenizer, max_length=24, cluster_ids=cluster_ids)


def learn_gates(args, dataset, shapes) -> tuple[dict, dict]:
    from igp_training.l0 import MaskLearningConfig, learn_masks

    config = MaskLearningConfig(target_sparsity=0.25, init="constant", max_steps=args.steps,
                                batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
                                lr_gates=0.1, lr_lambdas=0.1, target_warmup_fraction=0.5, logging_steps=1)
    result = learn_masks(tiny_base("llama", **shapes), dataset, config, str(Path(args.output) / "masks"),
                         num_clusters=len(BANK))
    values = {"log_alpha": torch.tensor(result.gate_scores),
              "expected_sparsity": torch.tensor(result.expected_sparsity)}
    return values, {"global_step": str(len(result.history))}


def finetune(task, args, dataset, shapes, tokenizer) -> tuple[dict, dict]:
    from transformers import TrainingArguments

    from igp_training.finetune import FinetuneConfig, build_trainer, prepare_model
    from modeling_igp import IGPruningForCausalLM

    model = IGPruningForCausalLM.from_base(tiny_base("llama", **shapes), BANK)
    if task == "lora":
        config = FinetuneConfig(lora_r=4, lora_dropout=0.0)
        teacher, learning_rate = None, 1e-2
    else:
        config = FinetuneConfig(lora_r=0, distill_weight=0.5, distill_temperature=2.0)
        teacher, learning_rate = tiny_base("llama", seed=1, **shapes), 1e-3

    sharding = {}
    if task == "fsdp":
        # The whole model is one FSDP unit, the layout that tolerates processes skipping different blocks.
        # FSDP cannot broadcast module states on the CPU (sync_module_states), and every process builds the same
        # weights anyway.
        sharding = dict(fsdp="full_shard", fsdp_config={"version": 1, "auto_wrap_policy": "NO_WRAP",
                                                        "use_orig_params": True, "sync_module_states": False})
    training_args = TrainingArguments(
        output_dir=str(Path(args.output) / task),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        seed=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        **sharding,
    )
    trainable = prepare_model(model, config)
    trainer = build_trainer(trainable, tokenizer, dataset, config, training_args, teacher=teacher)
    trainer.train()

    # A collective under FSDP: every process takes part, and the first one receives the full weights.
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    trained = {name for name, parameter in trainable.named_parameters() if parameter.requires_grad}
    values = {name: tensor.detach().clone().contiguous() for name, tensor in state_dict.items() if name in trained}
    return values, {"epoch": str(trainer.state.epoch), "global_step": str(trainer.state.global_step)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tasks", help="comma-separated: lora, full, fsdp, masks")
    parser.add_argument("output")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--examples", type=int, default=16)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from igp_training.assets import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    shapes = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    dataset = build_dataset(tokenizer, args.examples)

    for task in args.tasks.split(","):
        if task == "masks":
            values, metadata = learn_gates(args, dataset, shapes)
        elif task in ("lora", "full", "fsdp"):
            values, metadata = finetune(task, args, dataset, shapes, tokenizer)
        else:
            raise ValueError(f"Unknown task {task!r}; choose from lora, full, fsdp, masks.")

        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.output).mkdir(parents=True, exist_ok=True)
            metadata["world_size"] = os.environ.get("WORLD_SIZE", "1")
            save_file(values, str(Path(args.output) / f"{task}.safetensors"), metadata=metadata)

    # A process that exits with its process group alive can abort in the group's threads ("terminate called without
    # an active exception"), which torchrun reports as a failed rank.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
