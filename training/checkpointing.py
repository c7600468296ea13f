"""Trainer checkpoints written as safetensors and JSON only, so that resuming a run never unpickles a file.

`SafeCheckpointMixin` replaces the pickled files of a `transformers.Trainer` checkpoint (transformers 5.25):

    stock file                               written instead
    optimizer.pt                             optimizer.safetensors (its tensors) + optimizer.json (everything else)
    scheduler.pt                             scheduler.json
    scaler.pt                                scaler.json
    rng_state.pth, rng_state_{rank}.pth      rng_state[_{rank}].safetensors + rng_state[_{rank}].json
    training_args.bin                        training_args.json

Resuming reads these files and restores the same objects that the stock loader restores, so a resumed run continues
bit for bit. A checkpoint written by a stock Trainer still resumes, because the stock loader runs when these files are
missing.

Every state is a tree of dicts, lists, tuples, scalars and tensors. In the JSON file each tensor is replaced by
`{"__tensor__": key}`, its key in the safetensors file. A tuple becomes `{"__tuple__": [...]}`, and a dict with
non-string keys (an optimizer's state is keyed by parameter index) becomes `{"__items__": [[key, value], ...]}`.
Loading reverses these encodings, so the restored state has the same types as the saved one.
"""

import json
import os
import random

import numpy as np
import safetensors.torch
import torch
from transformers import Trainer
from transformers.trainer_pt_utils import set_rng_state_for_device
from transformers.training_args import ParallelMode
from transformers.utils import (
    is_sagemaker_mp_enabled,
    is_torch_hpu_available,
    is_torch_mlu_available,
    is_torch_musa_available,
    is_torch_npu_available,
    is_torch_xla_available,
)


OPTIMIZER_NAME = "optimizer"
SCHEDULER_NAME = "scheduler.json"
SCALER_NAME = "scaler.json"
TRAINING_ARGS_NAME = "training_args.json"
STOCK_TRAINING_ARGS_NAME = "training_args.bin"

_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"

# Accelerators whose generator states Trainer saves, as (key in the RNG state, name in transformers' log messages,
# availability check). Each one's torch module (`torch.cuda`, ...) is looked up only when it is available.
_ACCELERATORS = (
    ("cuda", "CUDA", torch.cuda.is_available),
    ("npu", "NPU", is_torch_npu_available),
    ("hpu", "HPU", is_torch_hpu_available),
    ("mlu", "MLU", is_torch_mlu_available),
    ("musa", "MUSA", is_torch_musa_available),
)


# -- state trees as JSON plus safetensors ----------------------------------------------------------------------------


def encode_state(value, tensors: dict | None, path: str = "state"):
    """
    Return `value` as a JSON-able tree, moving each tensor into `tensors` under its path in the tree.

    With `tensors=None` a tensor in the tree raises a TypeError, as does any type other than dict, list, tuple, str,
    int, float, bool and None. `path` names the value in that message.
    """
    if isinstance(value, torch.Tensor):
        if tensors is None:
            raise TypeError(f"{path} is a tensor, which this JSON checkpoint file cannot contain.")
        if path in tensors:
            raise ValueError(f"Two tensors of the state map to the same safetensors key {path!r}.")
        tensors[path] = value.detach().contiguous()
        return {_TENSOR: path}

    if isinstance(value, tuple):
        return {_TUPLE: [encode_state(item, tensors, f"{path}.{index}") for index, item in enumerate(value)]}

    if isinstance(value, list):
        return [encode_state(item, tensors, f"{path}.{index}") for index, item in enumerate(value)]

    if isinstance(value, dict):
        plain_keys = all(isinstance(key, str) and key not in (_TENSOR, _TUPLE, _ITEMS) for key in value)
        if plain_keys:
            return {key: encode_state(item, tensors, f"{path}.{key}") for key, item in value.items()}
        return {_ITEMS: [[encode_state(key, None, f"{path} key {key!r}"), encode_state(item, tensors, f"{path}.{key}")]
                         for key, item in value.items()]}

    if value is None or isinstance(value, (str, int, float)):
        return value

    raise TypeError(
        f"{path} is a {type(value).__module__}.{type(value).__qualname__}, which a JSON checkpoint file cannot "
        "contain. Only dicts, lists, tuples, strings, numbers, booleans, None and (in optimizer and RNG states) "
        "tensors can be saved."
    )


def decode_state(value, tensors: dict):
    """Rebuild the tree that `encode_state` encoded, taking its tensors from `tensors`."""
    if isinstance(value, list):
        return [decode_state(item, tensors) for item in value]

    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        if set(value) == {_TUPLE}:
            return tuple(decode_state(item, tensors) for item in value[_TUPLE])
        if set(value) == {_ITEMS}:
            return {decode_state(key, tensors): decode_state(item, tensors) for key, item in value[_ITEMS]}
        return {key: decode_state(item, tensors) for key, item in value.items()}

    return value


def save_state(state, directory: str, stem: str) -> None:
    """Write `state` as `{stem}.safetensors` (its tensors) and `{stem}.json` (the rest) in `directory`."""
    tensors = {}
    tree = encode_state(state, tensors, stem)
    safetensors.torch.save_file(tensors, os.path.join(directory, f"{stem}.safetensors"), metadata={"format": "pt"})
    write_json(tree, os.path.join(directory, f"{stem}.json"))


def load_state(directory: str, stem: str, device: str = "cpu"):
    """Read a state written by `save_state`, with its tensors on `device`."""
    tensors = safetensors.torch.load_file(os.path.join(directory, f"{stem}.safetensors"), device=device)
    with open(os.path.join(directory, f"{stem}.json"), encoding="utf-8") as handle:
        return decode_state(json.load(handle), tensors)


def has_state(directory: str, stem: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, f"{stem}{suffix}")) for suffix in (".safetensors", ".json"))


def encode_json_state(state, owner: str):
    """Encode the state of `owner` (a scheduler, a gradient scaler) for a JSON file of its own, which has no tensors."""
    try:
        return encode_state(state, None, owner)
    except TypeError as error:
        raise TypeError(
            f"The {owner} state cannot be saved as JSON: {error} Use a {owner} whose state_dict() contains only such "
            "values."
        ) from error


def write_json(tree, path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(tree, handle)


def load_json_state(path: str):
    with open(path, encoding="utf-8") as handle:
        return decode_state(json.load(handle), {})


# -- random number generators ----------------------------------------------------------------------------------------


def capture_rng_state(distributed: bool) -> dict:
    """
    Return the states of the python, numpy, torch CPU and accelerator generators, as Trainer saves them.

    Args:
        distributed: True under DDP, where every device of the process is saved (`get_rng_state_all`), as Trainer
            does; else only the current device's generator.
    """
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), position, has_gauss, cached_gaussian),
        "cpu": torch.random.get_rng_state(),
    }
    for key, _, is_available in _ACCELERATORS:
        if is_available():
            module = getattr(torch, key).random
            state[key] = module.get_rng_state_all() if distributed else module.get_rng_state()
    return state


def restore_rng_state(state: dict, distributed: bool) -> None:
    """Set the generators from a state of `capture_rng_state`."""
    random.setstate(state["python"])

    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))

    torch.random.set_rng_state(state["cpu"])

    # transformers' own helper, so that a missing or mismatched device state is logged exactly as Trainer logs it.
    for key, device_name, is_available in _ACCELERATORS:
        if is_available():
            set_rng_state_for_device(device_name, getattr(torch, key), state, distributed)


# -- the Trainer mixin -----------------------------------------------------------------------------------------------


class SafeCheckpointMixin:
    """
    Mixin for a `transformers.Trainer` subclass whose checkpoints hold only safetensors and JSON files.

    Put it before `Trainer` in the bases (`class MyTrainer(SafeCheckpointMixin, Trainer)`). It overrides the Trainer
    hooks that write and read the optimizer, scheduler, gradient scaler, RNG state and training arguments. The model
    weights are safetensors and the trainer state is JSON already.
    """

    def _uses_stock_files(self) -> bool:
        # NOTE: DeepSpeed, FSDP, SageMaker model parallelism and XLA save optimizer and RNG states through their own
        # checkpoint functions, so they keep the stock pickled files. push_to_hub during training and Ray Tune trials
        # also write training_args.bin, through Trainer methods this mixin does not override.
        return (
            self.is_deepspeed_enabled or self.is_fsdp_enabled or is_sagemaker_mp_enabled() or is_torch_xla_available()
        )

    def _rng_stem(self) -> str:
        # One RNG file per process under DDP, as Trainer writes.
        return "rng_state" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}"

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self._uses_stock_files():
            super()._save_optimizer_and_scheduler(output_dir)
            return
        if not self.args.should_save:
            return

        # The scheduler state is encoded before any file is written, so a scheduler that JSON cannot hold leaves no
        # partial checkpoint behind.
        scheduler_tree = encode_json_state(self.lr_scheduler.state_dict(), "scheduler")
        save_state(self.optimizer.state_dict(), output_dir, OPTIMIZER_NAME)
        write_json(scheduler_tree, os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        scheduler_path = os.path.join(checkpoint, SCHEDULER_NAME)
        if self._uses_stock_files() or not (has_state(checkpoint, OPTIMIZER_NAME) and os.path.isfile(scheduler_path)):
            super()._load_optimizer_and_scheduler(checkpoint)
            return

        # Same placement as Trainer: the CPU, except in multi-process GPU training, where each process loads onto its
        # own device rather than holding every process's copy in host memory.
        on_device = self.args.world_size > 1 and self.args.device.type != "cpu"
        device = str(self.args.device) if on_device else "cpu"
        self.optimizer.load_state_dict(load_state(checkpoint, OPTIMIZER_NAME, device))
        self.lr_scheduler.load_state_dict(load_json_state(scheduler_path))

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None:
            return
        if is_torch_xla_available():
            super()._save_scaler(output_dir)
            return
        if self.args.should_save:
            write_json(encode_json_state(scaler.state_dict(), "gradient scaler"), os.path.join(output_dir, SCALER_NAME))

    def _load_scaler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, SCALER_NAME)
        if is_torch_xla_available() or not os.path.isfile(path):
            super()._load_scaler(checkpoint)
            return

        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None:
            raise ValueError(
                f"{checkpoint} contains a gradient scaler state ({SCALER_NAME}) but this run uses no gradient scaler. "
                "Resume with the mixed-precision setting of the interrupted run (fp16=True)."
            )
        scaler.load_state_dict(load_json_state(path))

    def _save_rng_state(self, output_dir: str) -> None:
        if is_torch_xla_available():
            super()._save_rng_state(output_dir)
            return

        # Another process can get here before process 0 has created the folder while saving the model.
        os.makedirs(output_dir, exist_ok=True)
        distributed = self.args.parallel_mode == ParallelMode.DISTRIBUTED
        save_state(capture_rng_state(distributed), output_dir, self._rng_stem())

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        stem = self._rng_stem()
        if is_torch_xla_available() or not has_state(checkpoint, stem):
            # The stock loader reads a stock RNG file, or logs that none exists and leaves the generators as they are.
            super()._load_rng_state(checkpoint)
            return

        distributed = self.args.parallel_mode == ParallelMode.DISTRIBUTED
        restore_rng_state(load_state(checkpoint, stem), distributed)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Trainer._save ends with torch.save(self.args, "training_args.bin") and has no hook for that line alone.
        # Rewriting the model-saving part above it would fork transformers' code, so the pickle is replaced by JSON
        # right after Trainer writes it. Trainer never reads it back when resuming.
        super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        with open(os.path.join(output_dir, TRAINING_ARGS_NAME), "w", encoding="utf-8") as handle:
            handle.write(self.args.to_json_string())
        pickled = os.path.join(output_dir, STOCK_TRAINING_ARGS_NAME)
        if os.path.isfile(pickled):
            os.remove(pickled)


class SafeCheckpointTrainer(SafeCheckpointMixin, Trainer):
    """`transformers.Trainer` whose checkpoints hold only safetensors and JSON files."""
