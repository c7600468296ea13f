"""Fine-tuning of a block-pruned `IGPruningForCausalLM` under its dynamic masks, with `transformers.Trainer` and PEFT.

Every training example is routed once, while the dataset is prepared, and keeps its cluster id in a `cluster_ids`
column. `cluster_ids` is an argument of the model's forward, so Trainer passes it through and each row of a batch
runs, and therefore trains, only the blocks its cluster's mask keeps. A block that a row skips gets no gradient from
that row.

Two ways to train:

- LoRA through `peft` (`lora_r > 0`): adapters on the attention and MLP projections of the blocks the checkpoint
  still holds. They save on their own, load with `PeftModel.from_pretrained` or
  `AutoModelForCausalLM.from_pretrained(adapter_dir, trust_remote_code=True)`, and merge back into a plain
  `IGPruningForCausalLM` with `merge_and_unload()`.
- Full fine-tuning (`lora_r == 0`): every weight of the checkpoint trains.

Distillation (`distill_weight > 0`) adds a KL divergence from the dense model's next-token distribution to the
student's. The teacher is the dense model: the base model with every block run. A checkpoint keeps no weights for
blocks that no mask of its bank runs, so such a checkpoint cannot be its own teacher. Its teacher is loaded from the
path given as `teacher`, else from the base model path recorded in its config (`text_config._name_or_path`, written
when the base model was loaded from a folder or hub name). A checkpoint that still holds every block is its own
teacher. With LoRA, the teacher is the student itself with adapters disabled and an all-ones mask, at no extra memory.
With full fine-tuning, it is a frozen second copy loaded from the checkpoint, because the student's weights move.
"""

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DataCollatorForSeq2Seq, Trainer

from .checkpointing import SafeCheckpointMixin, SafeCheckpointTrainer

logger = logging.getLogger(__name__)

# The linear layers of the attention and MLP sub-blocks. The four supported base architectures name them alike;
# PEFT has no default for `model_type="igp"`, so the wrapper names them itself.
PROJECTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_LORA_TARGET_MODULES = {model_type: PROJECTION_MODULES for model_type in ("llama", "mistral", "qwen2", "qwen3")}

# Index that the causal LM loss ignores in `labels` (padding and prompt tokens).
IGNORE_INDEX = -100


@dataclass
class FinetuneConfig:
    """Settings of a fine-tuning run that are not `TrainingArguments` (those stay Trainer's own)."""

    lora_r: int = 16
    """LoRA rank; 0 trains every weight of the checkpoint instead (full fine-tuning)."""

    lora_alpha: float | None = None
    """LoRA scaling numerator (the update is scaled by `lora_alpha / lora_r`); None uses `2 * lora_r`."""

    lora_dropout: float = 0.05
    """Dropout on the LoRA branch input, in [0, 1)."""

    target_modules: list[str] | str | None = None
    """Module names that get adapters, or `"all-linear"`; None uses the projections of the base architecture."""

    distill_weight: float = 0.0
    """Weight w of the distillation term: loss = (1 - w) * next-token loss + w * T^2 * KL(teacher || student)."""

    distill_temperature: float = 1.0
    """Softmax temperature T of both distributions in the KL term."""

    max_length: int = 512
    """Maximum tokens per training example; longer texts are truncated."""

    def __post_init__(self):
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 0:
            raise ValueError(f"lora_r must be an integer >= 0 (0 means full fine-tuning), got {self.lora_r!r}.")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha}.")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if not 0 <= self.distill_weight <= 1:
            raise ValueError(
                f"distill_weight must be in [0, 1] (0: next-token loss only, 1: distillation only), "
                f"got {self.distill_weight}."
            )
        if self.distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be positive, got {self.distill_temperature}.")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens to give a next-token target, got {self.max_length}.")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [name.strip() for name in self.target_modules.split(",") if name.strip()]
        if isinstance(self.target_modules, (list, tuple)) and not self.target_modules:
            raise ValueError("target_modules is empty; name at least one module, or pass 'all-linear'.")

    @property
    def uses_lora(self) -> bool:
        return self.lora_r > 0


# -- model -----------------------------------------------------------------------------------------------------------


def lora_target_modules(model, target_modules=None):
    """Return the modules that get LoRA adapters: `target_modules` if given, else the base architecture's default."""
    if target_modules is not None:
        return target_modules
    model_type = model.config.text_config.model_type
    if model_type not in DEFAULT_LORA_TARGET_MODULES:
        raise ValueError(
            f"No default LoRA target modules for base architecture {model_type!r} (defaults exist for "
            f"{', '.join(DEFAULT_LORA_TARGET_MODULES)}). Pass target_modules, e.g. 'all-linear'."
        )
    return list(DEFAULT_LORA_TARGET_MODULES[model_type])


def build_lora_config(model, config: FinetuneConfig):
    """Build the `peft.LoraConfig` of a run; `lm_head` never gets an adapter."""
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=config.lora_r,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else 2 * config.lora_r,
        lora_dropout=config.lora_dropout,
        target_modules=lora_target_modules(model, config.target_modules),
        # PEFT's all-linear already skips the output embedding; this also keeps a broad user pattern off lm_head,
        # which is often tied to the input embedding.
        exclude_modules=["lm_head"],
        bias="none",
    )


def prepare_model(model, config: FinetuneConfig):
    """Return the module that Trainer trains: a `PeftModel` with LoRA adapters, or `model` with every weight trainable."""
    if not config.uses_lora:
        model.requires_grad_(True)
        return model

    from peft import get_peft_model

    peft_model = get_peft_model(model, build_lora_config(model, config))
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("LoRA adapters: %d trainable parameters of %d (%.2f%%)", trainable, total, 100 * trainable / total)
    return peft_model


def merge_adapters(peft_model):
    """Fold the LoRA weights into the base weights and return the plain `IGPruningForCausalLM`."""
    merged = peft_model.merge_and_unload()
    merged.requires_grad_(False)
    return merged


# -- data ------------------------------------------------------------------------------------------------------------


def route_and_tokenize(model, tokenizer, texts, max_length: int, batch_size: int = 64):
    """Tokenise texts into a `datasets.Dataset` and route each example once.

    Columns: `input_ids`, `attention_mask`, `labels` (a copy of the ids; the collator pads them with -100) and
    `cluster_ids`. An example is routed on the text it trains on (its tokens after truncation, decoded without special
    tokens), which is how `generate` routes a prompt of those tokens. A model with a single mask needs no router.
    """
    import datasets

    if isinstance(texts, datasets.Dataset):
        if "text" not in texts.column_names:
            raise ValueError(f"The dataset needs a 'text' column, got columns {texts.column_names}.")
        dataset = texts.select_columns(["text"])
    else:
        texts = list(texts)
        empty = [index for index, text in enumerate(texts) if not isinstance(text, str) or not text.strip()]
        if empty:
            raise ValueError(f"texts[{empty[0]}] is empty or not a string ({texts[empty[0]]!r}); drop it first.")
        dataset = datasets.Dataset.from_dict({"text": texts})
    if len(dataset) == 0:
        raise ValueError("No texts to fine-tune on.")

    def tokenize(batch):
        encoded = tokenizer(batch["text"], truncation=True, max_length=max_length)
        return {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "labels": [list(ids) for ids in encoded["input_ids"]],
        }

    def route(batch):
        if model.config.num_clusters == 1:
            return {"cluster_ids": [0] * len(batch["input_ids"])}
        kept_texts = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
        return {"cluster_ids": model.route(kept_texts).tolist()}

    # The fingerprints name the transform explicitly: hashing `route` would serialise the whole model.
    dataset = dataset.map(tokenize, batched=True, remove_columns=["text"], desc="Tokenizing")
    dataset = dataset.map(
        route,
        batched=True,
        batch_size=batch_size,
        desc="Routing",
        new_fingerprint=_routing_fingerprint(dataset, model),
    )

    too_short = sum(1 for ids in dataset["input_ids"] if len(ids) < 2)
    if too_short:
        logger.info("Dropping %d examples of fewer than 2 tokens (no next-token target)", too_short)
        dataset = dataset.filter(lambda example: len(example["input_ids"]) >= 2, desc="Dropping one-token texts")
    return dataset


def _routing_fingerprint(dataset, model) -> str:
    import hashlib

    routing_state = json.dumps(
        [dataset._fingerprint, model.config.mask_bank, model.config.centroids, model.config.router_name_or_path]
    )
    return hashlib.sha256(routing_state.encode()).hexdigest()[:16]


def cluster_counts(dataset) -> dict[int, int]:
    """Number of examples routed to each cluster."""
    counts = {}
    for cluster in dataset["cluster_ids"]:
        counts[cluster] = counts.get(cluster, 0) + 1
    return dict(sorted(counts.items()))


def data_collator(tokenizer):
    """Pad `input_ids` and `attention_mask` with the tokenizer, `labels` with -100, and stack `cluster_ids`."""
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any token works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)


# -- distillation ------------------------------------------------------------------------------------------------------


def distillation_loss(student_logits, teacher_logits, labels, temperature: float = 1.0, num_items_in_batch=None):
    """KL(teacher || student) of the next-token distributions, summed over scored tokens and scaled by T^2.

    Position t is scored when `labels[t + 1]` is not -100, the same tokens as the shifted next-token loss. The sum is
    divided by `num_items_in_batch` when given (the scored tokens of the whole accumulated batch, as Trainer counts
    them), else by the scored tokens of this batch.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in "
            "shape; the teacher must share the student's tokenizer and vocabulary."
        )
    scored = labels[:, 1:] != IGNORE_INDEX  # [batch, tokens - 1]
    student_log_probs = F.log_softmax(student_logits[:, :-1][scored].float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits[:, :-1][scored].float() / temperature, dim=-1)
    token_kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="none").sum(dim=-1)

    divisor = num_items_in_batch if num_items_in_batch is not None else scored.sum().clamp(min=1)
    return temperature**2 * token_kl.sum() / divisor


class DistillationTrainer(SafeCheckpointMixin, Trainer):
    """Trainer whose loss mixes the next-token loss with a KL divergence to a dense teacher's logits.

    Args:
        teacher: a frozen causal LM with the student's vocabulary, or None to use the student itself with its LoRA
            adapters disabled and every block run (the student must be a `PeftModel` over a checkpoint that holds
            every block).
        distill_weight, distill_temperature: see `FinetuneConfig`.

    The logs gain `lm_loss` and `distill_loss`: both terms per optimizer step, averaged since the previous log and
    over every process, on the same scale as Trainer's `loss`.
    """

    def __init__(self, *args, teacher=None, distill_weight: float = 0.5, distill_temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature
        self.teacher = teacher
        if teacher is None:
            if not hasattr(self.model, "disable_adapter"):
                raise ValueError(
                    "Distillation without a teacher model uses the student with its adapters disabled, so the student "
                    "must be a PeftModel. For full fine-tuning, pass a teacher model."
                )
            _check_all_blocks(self.model.get_base_model(), "the student")
        else:
            teacher.requires_grad_(False)
            teacher.eval()
            teacher.to(self.args.device)
        self._term_sums = {"lm_loss": 0.0, "distill_loss": 0.0}
        self._term_first_step = None

    @torch.no_grad()
    def teacher_logits(self, model, inputs):
        """Logits of the dense teacher on the batch (every block run)."""
        teacher_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask")}
        if self.teacher is not None:
            return _dense_forward(self.teacher, teacher_inputs).logits

        student = self.accelerator.unwrap_model(model)
        with student.disable_adapter():
            return _dense_forward(student.get_base_model(), teacher_inputs).logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        loss_kwargs = {"num_items_in_batch": num_items_in_batch} if num_items_in_batch is not None else {}
        outputs = model(**inputs, **loss_kwargs)
        teacher_logits = self.teacher_logits(model, inputs)

        lm_loss = outputs.loss
        kl_loss = distillation_loss(
            outputs.logits, teacher_logits, labels, self.distill_temperature, num_items_in_batch
        )
        loss = (1 - self.distill_weight) * lm_loss + self.distill_weight * kl_loss

        # Both terms are sums over this process's tokens divided by the token count of every process; the
        # data-parallel gradient average divides by the number of processes again, which this factor undoes. The
        # stock compute_loss applies the same factor.
        scale = 1
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            scale = self.accelerator.num_processes
        loss = loss * scale

        if model.training:
            # Each micro-batch's share of its optimizer step's value: the terms already are, when divided by the
            # token count of the accumulated batch; Trainer divides per-micro-batch means by the accumulation steps.
            share = scale if num_items_in_batch is not None else 1 / self.current_gradient_accumulation_steps
            if self._term_first_step is None:
                self._term_first_step = self.state.global_step
            self._term_sums["lm_loss"] += float(lm_loss.detach()) * share
            self._term_sums["distill_loss"] += float(kl_loss.detach()) * share
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        # Trainer calls log on every process, so the gather below is a collective that all of them join.
        if "loss" in logs and self._term_first_step is not None and self.state.global_step > self._term_first_step:
            sums = torch.tensor([list(self._term_sums.values())], dtype=torch.float64, device=self.args.device)
            sums = self.accelerator.gather(sums).mean(dim=0)
            steps = self.state.global_step - self._term_first_step
            for name, total in zip(self._term_sums, sums.tolist()):
                logs[name] = round(total / steps, 4)
            self._term_sums = dict.fromkeys(self._term_sums, 0.0)
            self._term_first_step = self.state.global_step
        super().log(logs, *args, **kwargs)


def _is_igp_model(model) -> bool:
    # Remote-code checkpoints load their own copy of the class, so isinstance checks fail; the model type does not.
    return getattr(model.config, "model_type", None) == "igp"


def _check_all_blocks(model, what: str) -> None:
    kept = model.config.blocks_kept_by_bank()
    if not all(kept):
        missing = [block for block, present in enumerate(kept) if not present]
        raise ValueError(
            f"The dense teacher runs every block, but {what} holds no weights for blocks {missing}: no mask of its "
            "bank keeps them. Load the teacher from the base model (teacher=PATH, or `igp finetune --teacher PATH`)."
        )


def _dense_forward(model, inputs):
    if _is_igp_model(model):
        batch_size = inputs["input_ids"].shape[0]
        all_blocks = torch.ones(batch_size, model.config.num_blocks, dtype=torch.bool)
        return model(**inputs, block_mask=all_blocks, use_cache=False)
    return model(**inputs, use_cache=False)


def recorded_base_model(model) -> str | None:
    """Return the base model path or hub name recorded in the checkpoint's config, or None."""
    return getattr(model.config.text_config, "_name_or_path", None) or None


def load_teacher(student, teacher: str | None = None, lora: bool = True, student_path: str | None = None):
    """Load the dense teacher for distillation, or return None when the LoRA student can be its own teacher.

    Order: `teacher` (a folder, hub name or `.gguf` file) if given; else the student checkpoint itself when it holds
    every block (None with LoRA, a frozen copy from `student_path` with full fine-tuning); else the base model
    recorded in the student's config.
    """
    from transformers import AutoModelForCausalLM

    if teacher is None and all(student.config.blocks_kept_by_bank()):
        if lora:
            logger.info("Distillation teacher: the student's own weights, adapters disabled, every block run")
            return None
        if student_path is None:
            raise ValueError("Full fine-tuning with distillation needs student_path to load a frozen teacher copy.")
        teacher = student_path

    if teacher is None:
        teacher = recorded_base_model(student)
        if teacher is None:
            raise ValueError(
                "The checkpoint removed blocks that the dense teacher needs, and its config records no base model "
                "(text_config._name_or_path is empty). Pass the base model with `--teacher PATH`."
            )

    logger.info("Distillation teacher: loading %s", teacher)
    try:
        if str(teacher).endswith(".gguf"):
            from .assets import load_gguf

            model, _ = load_gguf(teacher)
        else:
            model = AutoModelForCausalLM.from_pretrained(teacher, trust_remote_code=True, dtype=torch.float32)
    except OSError as error:
        raise ValueError(
            f"Could not load the distillation teacher {teacher!r} ({error}). Pass the dense base model the student "
            "was pruned from with `--teacher PATH` (a folder, hub name or .gguf file)."
        ) from error
    if _is_igp_model(model):
        _check_all_blocks(model, f"the teacher checkpoint {teacher}")

    teacher_vocab = model.get_output_embeddings().weight.shape[0]
    student_vocab = student.get_output_embeddings().weight.shape[0]
    if teacher_vocab != student_vocab:
        raise ValueError(
            f"The teacher {teacher} has a vocabulary of {teacher_vocab} tokens but the student has {student_vocab}; "
            "use the base model the student was pruned from."
        )
    return model


# -- the run ---------------------------------------------------------------------------------------------------------


def build_trainer(model, tokenizer, train_dataset, config: FinetuneConfig, training_args, teacher=None,
                  eval_dataset=None, callbacks=None):
    """Build the Trainer of a run: `SafeCheckpointTrainer`, or `DistillationTrainer` when `distill_weight > 0`.

    `model` is the module returned by `prepare_model`; `teacher` the result of `load_teacher`.
    """
    for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
        if dataset is not None and "cluster_ids" not in dataset.column_names:
            raise ValueError(
                f"{name} has no 'cluster_ids' column, so Trainer would route every batch again; prepare it with "
                "route_and_tokenize."
            )

    kwargs = dict(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator(tokenizer),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if config.distill_weight > 0:
        return DistillationTrainer(
            **kwargs,
            teacher=teacher,
            distill_weight=config.distill_weight,
            distill_temperature=config.distill_temperature,
        )
    return SafeCheckpointTrainer(**kwargs)


def finetune(model, tokenizer, texts, config: FinetuneConfig, training_args, teacher=None, eval_texts=None,
             resume_from_checkpoint=None, student_path=None):
    """Route, tokenise and fine-tune `model` on `texts`; return the Trainer and a record of the run.

    `trainer.model` is the trained module: a `PeftModel` with LoRA, else `model` itself. `teacher` is a teacher path
    (see `load_teacher`), read only when `config.distill_weight > 0`. The record holds the settings, the examples per
    cluster, the Trainer metrics and, with `eval_texts`, the held-out loss before and after.
    """
    started = time.perf_counter()
    train_dataset = route_and_tokenize(model, tokenizer, texts, config.max_length)
    eval_dataset = route_and_tokenize(model, tokenizer, eval_texts, config.max_length) if eval_texts else None
    logger.info(
        "Prepared %d training examples (per cluster: %s) in %.1f s",
        len(train_dataset), cluster_counts(train_dataset), time.perf_counter() - started,
    )

    teacher_model = None
    if config.distill_weight > 0:
        teacher_model = load_teacher(model, teacher, lora=config.uses_lora, student_path=student_path)

    trainable = prepare_model(model, config)
    trainer = build_trainer(trainable, tokenizer, train_dataset, config, training_args, teacher_model, eval_dataset)

    record = {
        "settings": asdict(config),
        "teacher": _teacher_description(teacher, teacher_model, config),
        "train_examples": len(train_dataset),
        "train_examples_per_cluster": cluster_counts(train_dataset),
        "training_arguments": {
            key: getattr(training_args, key)
            for key in ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
                        "num_train_epochs", "warmup_steps", "weight_decay", "seed", "world_size")
        },
    }
    if eval_dataset is not None:
        record["eval_loss_before"] = trainer.evaluate()["eval_loss"]

    phase_start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    record["train_metrics"] = output.metrics
    record["global_step"] = output.global_step
    logger.info("Fine-tuned for %d steps in %.1f s", output.global_step, time.perf_counter() - phase_start)

    if eval_dataset is not None:
        record["eval_loss_after"] = trainer.evaluate()["eval_loss"]
        logger.info("Held-out loss: %.4f before, %.4f after", record["eval_loss_before"], record["eval_loss_after"])
    record["wall_time_s"] = round(time.perf_counter() - started, 1)
    return trainer, record


def _teacher_description(teacher, teacher_model, config: FinetuneConfig):
    if config.distill_weight == 0:
        return None
    if teacher_model is None:
        return "the student with adapters disabled"
    return teacher if teacher is not None else teacher_model.name_or_path


def save_record(record: dict, output_dir) -> Path:
    """Write the run record as `igp_finetune.json` in `output_dir`."""
    path = Path(output_dir) / "igp_finetune.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


__all__ = [
    "DEFAULT_LORA_TARGET_MODULES",
    "DistillationTrainer",
    "FinetuneConfig",
    "build_lora_config",
    "build_trainer",
    "data_collator",
    "distillation_loss",
    "finetune",
    "load_teacher",
    "lora_target_modules",
    "merge_adapters",
    "prepare_model",
    "recorded_base_model",
    "route_and_tokenize",
    "save_record",
]
