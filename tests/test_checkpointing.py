"""Trainer checkpoints as safetensors and JSON: state encoding, RNG, optimizer, scheduler, scaler, training args."""

import json
import math
import os
import random

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments

from conftest import tiny_base
from igp_training.checkpointing import SafeCheckpointTrainer, decode_state, encode_state


# Tiny models run faster on one torch thread.
pytestmark = pytest.mark.usefixtures("one_thread")


def make_trainer(output_dir, **overrides):
    settings = dict(output_dir=str(output_dir), max_steps=4, learning_rate=1e-2, lr_scheduler_type="cosine",
                    warmup_steps=1, report_to="none", use_cpu=True, seed=0)
    settings.update(overrides)
    trainer = SafeCheckpointTrainer(model=tiny_base("llama"), args=TrainingArguments(**settings))
    trainer.create_optimizer_and_scheduler(num_training_steps=settings["max_steps"])
    return trainer


def take_steps(trainer, count: int) -> None:
    """Run `count` optimizer and scheduler steps, so both carry a non-initial state."""
    input_ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(count):
        trainer.model(input_ids, labels=input_ids).loss.backward()
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad()


def assert_same_tree(actual, expected, path="state"):
    """Exact equality of two state trees, including container types, tensor dtypes and values."""
    assert type(actual) is type(expected), path
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, path
        torch.testing.assert_close(actual, expected, atol=0, rtol=0, msg=path)
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), path
        for key in expected:
            assert_same_tree(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for index, (left, right) in enumerate(zip(actual, expected)):
            assert_same_tree(left, right, f"{path}.{index}")
    elif isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(actual), path
    else:
        assert actual == expected, path


def draw_all():
    """One draw of each generator, including the cached second Gaussian of python's and numpy's samplers."""
    return (random.random(), random.gauss(0.0, 1.0), np.random.rand(), np.random.randn(), torch.rand(3).tolist())


# -- state encoding --------------------------------------------------------------------------------------------------


def test_state_tree_round_trip():
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}, 7: {}},
        "param_groups": [{"betas": (0.9, 0.999), "lr": 1e-3, "params": [0, 7], "fused": None, "amsgrad": False}],
        "__tensor__": "a key that looks like a marker",
        "bounds": (float("inf"), float("nan"), -0.0),
        "nested": [(1, "two"), {"x": [torch.arange(4, dtype=torch.int16)]}],
    }
    tensors = {}
    tree = encode_state(state, tensors)
    text = json.dumps(tree)

    assert all(isinstance(value, torch.Tensor) for value in tensors.values())
    assert_same_tree(decode_state(json.loads(text), tensors), state)


@pytest.mark.parametrize("value", [{1, 2}, np.int64(3), object()])
def test_state_encoding_rejects_other_types(value):
    with pytest.raises(TypeError, match=r"state\.group\.0 is a .*JSON checkpoint file cannot contain"):
        encode_state({"group": [value]}, {})


# -- Trainer hooks ---------------------------------------------------------------------------------------------------


def test_rng_round_trip_restores_every_stream(tmp_path):
    trainer = make_trainer(tmp_path)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    # Leave a cached Gaussian in python's and numpy's state: it must come back too.
    random.gauss(0.0, 1.0)
    np.random.randn()

    saved = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    trainer._save_rng_state(str(tmp_path))
    after_save = draw_all()

    random.seed(10)
    np.random.seed(20)
    torch.manual_seed(30)
    trainer._load_rng_state(str(tmp_path))

    assert random.getstate() == saved[0]
    numpy_state = np.random.get_state()
    assert numpy_state[0] == saved[1][0]
    assert np.array_equal(numpy_state[1], saved[1][1])
    assert numpy_state[2:] == saved[1][2:]
    assert torch.equal(torch.random.get_rng_state(), saved[2])
    assert draw_all() == after_save
    assert sorted(os.listdir(tmp_path)) == ["rng_state.json", "rng_state.safetensors"]


def test_optimizer_and_scheduler_round_trip(tmp_path):
    trainer = make_trainer(tmp_path / "run")
    take_steps(trainer, 2)
    trainer._save_optimizer_and_scheduler(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["optimizer.json", "optimizer.safetensors", "run", "scheduler.json"]

    fresh = make_trainer(tmp_path / "run")
    fresh._load_optimizer_and_scheduler(str(tmp_path))

    # The reference is the in-memory state that the stock torch.save/torch.load round trip reproduces.
    assert_same_tree(fresh.optimizer.state_dict(), trainer.optimizer.state_dict())
    assert_same_tree(fresh.lr_scheduler.state_dict(), trainer.lr_scheduler.state_dict())
    assert fresh.lr_scheduler.get_last_lr() == trainer.lr_scheduler.get_last_lr()

    # With the weights copied too (the model checkpoint's part), one more step on both gives identical weights.
    fresh.model.load_state_dict(trainer.model.state_dict())
    take_steps(trainer, 1)
    take_steps(fresh, 1)
    for (name, expected), actual in zip(trainer.model.named_parameters(), fresh.model.parameters()):
        torch.testing.assert_close(actual, expected, atol=0, rtol=0, msg=name)


def test_stock_checkpoint_still_loads(tmp_path):
    trainer = make_trainer(tmp_path / "run")
    take_steps(trainer, 2)
    Trainer._save_optimizer_and_scheduler(trainer, str(tmp_path))
    Trainer._save_rng_state(trainer, str(tmp_path))
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= set(os.listdir(tmp_path))
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(5)

    fresh = make_trainer(tmp_path / "run")
    fresh._load_optimizer_and_scheduler(str(tmp_path))
    fresh._load_rng_state(str(tmp_path))

    assert_same_tree(fresh.optimizer.state_dict(), trainer.optimizer.state_dict())
    assert_same_tree(fresh.lr_scheduler.state_dict(), trainer.lr_scheduler.state_dict())
    assert torch.equal(torch.random.get_rng_state(), rng_state)


class TableSchedule:
    """A learning-rate function whose state contains a set, which JSON cannot represent."""

    def __init__(self):
        self.milestones = {2, 4}

    def __call__(self, step):
        return 0.5 if step in self.milestones else 1.0


def test_scheduler_without_json_state_rejected(tmp_path):
    trainer = make_trainer(tmp_path / "run")
    trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, TableSchedule())

    message = r"scheduler state cannot be saved as JSON: scheduler\.lr_lambdas\.0\.milestones is a builtins\.set"
    with pytest.raises(TypeError, match=message):
        trainer._save_optimizer_and_scheduler(str(tmp_path))
    assert os.listdir(tmp_path) == ["run"]


def test_gradient_scaler_round_trip(tmp_path):
    trainer = make_trainer(tmp_path / "run")
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=7)
    trainer.accelerator.scaler.scale(torch.ones(1))  # the scale tensor is created on first use
    trainer.accelerator.scaler.update(2.0**12)
    trainer._save_scaler(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["run", "scaler.json"]

    fresh = make_trainer(tmp_path / "run")
    fresh.accelerator.scaler = torch.amp.GradScaler("cpu")
    fresh._load_scaler(str(tmp_path))
    assert fresh.accelerator.scaler.state_dict() == trainer.accelerator.scaler.state_dict()

    no_scaler = make_trainer(tmp_path / "run")
    with pytest.raises(ValueError, match="uses no gradient scaler"):
        no_scaler._load_scaler(str(tmp_path))


def test_save_model_writes_args_as_json(tmp_path):
    trainer = make_trainer(tmp_path / "run", learning_rate=3e-4)
    trainer.save_model(str(tmp_path / "saved"))

    files = set(os.listdir(tmp_path / "saved"))
    assert "training_args.bin" not in files
    assert {"model.safetensors", "config.json", "training_args.json"} <= files
    assert all(name.endswith((".safetensors", ".json")) for name in files)
    saved_args = json.loads((tmp_path / "saved" / "training_args.json").read_text())
    assert saved_args["learning_rate"] == 3e-4
    assert saved_args["lr_scheduler_type"] == "cosine"
