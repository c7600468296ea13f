"""`igp finetune`: recover quality after pruning by fine-tuning under the model's own masks (LoRA or full).

Examples:

    igp finetune --model runs/pruned --data default --output runs/lora --lora-r 16 --steps 200
    igp finetune --model runs/pruned --data gsm8k.jsonl:question+answer@500 --output runs/full --lora-r 0
    igp finetune --model runs/pruned --data default --output runs/kd --distill 0.5 --teacher HuggingFaceTB/SmolLM2-135M-Instruct

Several processes: `torchrun --nproc_per_node 2 -m igp_training.cli finetune ...` (or `accelerate launch`); the
batch size is per process, so the global batch is `--batch-size * --grad-accum * processes`.
"""

import argparse
import logging
import time
from pathlib import Path

from .cli import UsageError

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a pruned model under its masks (LoRA or full), optionally distilling from the dense model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="folder of a saved IGPruningForCausalLM (from `igp prune`)")
    parser.add_argument("--data", required=True,
                        help="training text as a calibration SPEC: SOURCE[:FIELD][@COUNT],... or 'default'")
    parser.add_argument("--output", required=True,
                        help="output folder: the adapter (or the full model with --lora-r 0), checkpoints and "
                             "igp_finetune.json")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=int, default=16, help="LoRA rank; 0 fine-tunes every weight (default: 16)")
    lora.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 * rank)")
    lora.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input (default: 0.05)")
    lora.add_argument("--target-modules", default=None,
                      help="comma-separated module names, or 'all-linear' (default: q/k/v/o and gate/up/down "
                           "projections)")
    lora.add_argument("--merge", action="store_true",
                      help="also write the model with the adapters merged in, to OUTPUT/merged")

    distill = parser.add_argument_group("distillation")
    distill.add_argument("--distill", type=float, default=0.0, metavar="WEIGHT",
                         help="weight of the KL loss to the dense model's logits, in [0, 1]; the next-token loss "
                              "gets 1 - WEIGHT (default: 0, no distillation)")
    distill.add_argument("--distill-temperature", type=float, default=1.0, help="softmax temperature (default: 1)")
    distill.add_argument("--teacher", default=None,
                         help="dense teacher (folder, hub name or .gguf file); default: the checkpoint itself when it "
                              "holds every block, else the base model recorded in its config")

    training = parser.add_argument_group("training")
    training.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one epoch)")
    training.add_argument("--epochs", type=float, default=1.0, help="epochs when --steps is not given (default: 1)")
    training.add_argument("--batch-size", type=int, default=4, help="examples per process and step (default: 4)")
    training.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default: 1)")
    training.add_argument("--learning-rate", type=float, default=None,
                          help="peak learning rate (default: 2e-4 with LoRA, 2e-5 for full fine-tuning)")
    training.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default: 0)")
    training.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    training.add_argument("--max-length", type=int, default=512, help="maximum tokens per example (default: 512)")
    training.add_argument("--heldout", type=int, default=0,
                          help="texts per source kept out of training to report held-out loss before and after "
                               "(default: 0)")
    training.add_argument("--seed", type=int, default=0, help="seed of data sampling and training (default: 0)")
    training.add_argument("--logging-steps", type=int, default=10, help="log every N steps (default: 10)")
    training.add_argument("--save-steps", type=int, default=0,
                          help="write a resumable checkpoint every N steps; 0 writes none (default: 0)")
    training.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUTPUT")
    training.add_argument("--bf16", action="store_true", help="train in bfloat16 autocast")
    training.add_argument("--gradient-checkpointing", action="store_true",
                          help="recompute activations in the backward pass to save memory")
    parser.set_defaults(func=run)


def run(args) -> int:
    import torch
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from modeling_igp import IGPruningForCausalLM

    from .data import load_calibration
    from .finetune import FinetuneConfig, finetune, merge_adapters, save_record

    model_dir = Path(args.model).expanduser().resolve()
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"--model {args.model}: no config.json there; give the folder written by `igp prune`.")
    for name in ("steps", "batch_size", "grad_accum", "logging_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
    if args.save_steps < 0 or args.heldout < 0 or args.warmup_steps < 0:
        raise UsageError("--save-steps, --heldout and --warmup-steps must be 0 or more.")
    if args.merge and args.lora_r == 0:
        raise UsageError("--merge needs LoRA adapters to merge; drop it with --lora-r 0 (the output is already full).")
    try:
        config = FinetuneConfig(
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=args.target_modules,
            distill_weight=args.distill,
            distill_temperature=args.distill_temperature,
            max_length=args.max_length,
        )
    except ValueError as error:
        raise UsageError(str(error)) from error

    output_dir = Path(args.output).expanduser().resolve()
    resume_from = None
    if args.resume:
        resume_from = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if resume_from is None:
            logger.warning("--resume: no checkpoint in %s, starting from the beginning", output_dir)

    started = time.perf_counter()
    # An absolute path, because saved adapters record it to find their base model from any working directory.
    try:
        model = IGPruningForCausalLM.from_pretrained(str(model_dir))
    except (OSError, ValueError) as error:
        raise UsageError(f"--model {args.model}: {error}") from error
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise UsageError(f"--model {args.model}: no tokenizer saved there; save the model with its tokenizer.")
    logger.info("Loaded %s (%d clusters) in %.1f s", model_dir, model.config.num_clusters, time.perf_counter() - started)

    try:
        data = load_calibration(args.data, seed=args.seed, heldout_per_source=args.heldout)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(f"--data {args.data}: {error}") from error

    learning_rate = args.learning_rate
    if learning_rate is None:
        learning_rate = 2e-4 if config.uses_lora else 2e-5
    training_args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=args.steps if args.steps is not None else -1,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=learning_rate,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        lr_scheduler_type="linear",
        logging_steps=args.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        save_total_limit=2,
        seed=args.seed,
        data_seed=args.seed,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        report_to="none",
        # Without an accelerator, TrainingArguments leaves a torchrun launch undistributed unless use_cpu is set:
        # every process would then train alone on all the data (transformers 5.25, accelerate 1.16).
        use_cpu=not torch.accelerator.is_available(),
        # Processes skip different blocks, so DDP must look for unused parameters, with checkpointing as well.
        ddp_find_unused_parameters=True,
    )

    try:
        trainer, record = finetune(
            model,
            tokenizer,
            data.texts,
            config,
            training_args,
            teacher=args.teacher,
            eval_texts=data.heldout_texts or None,
            resume_from_checkpoint=resume_from,
            student_path=str(model_dir),
        )
    except ValueError as error:
        raise UsageError(str(error)) from error
    record.update(model=str(model_dir), data=args.data, data_summary=data.summary())

    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        full_model_dir = output_dir
        if args.merge:
            full_model_dir = output_dir / "merged"
            merge_adapters(trainer.model).save_pretrained(str(full_model_dir))
            record["merged"] = str(full_model_dir)
            logger.info("Saved the merged model to %s", full_model_dir)
        if args.merge or not config.uses_lora:
            copy_run_files(model_dir, full_model_dir)
            save_record(record, full_model_dir)
        path = save_record(record, output_dir)
        kind = "LoRA adapters" if config.uses_lora else "fine-tuned model"
        print(f"Saved the {kind} to {output_dir} ({record['global_step']} steps, {record['wall_time_s']} s); "
              f"run record: {path}")
        if "eval_loss_after" in record:
            print(f"Held-out loss: {record['eval_loss_before']:.4f} before, {record['eval_loss_after']:.4f} after")
    return 0


def copy_run_files(model_dir: Path, target: Path) -> None:
    """Copy the pruning run record and its plots, which describe the masks the fine-tuned model still uses.

    `igp eval` reads the calibration texts from `igp_run.json` to keep them out of the held-out text, and `igp card`
    reads the settings and plots.
    """
    import shutil

    for path in [model_dir / "igp_run.json", *sorted(model_dir.glob("*.png"))]:
        if path.is_file() and not (target / path.name).exists():
            shutil.copy2(path, target / path.name)
