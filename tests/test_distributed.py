"""Several processes and sharded placement: DDP and FSDP runs against one process, device_map and FSDP wrapping.

The multi-process tests launch `tests/ddp_worker.py` with `torchrun --nproc_per_node 2` (gloo on CPU) and compare what
it trained with a one-process run of the same global batch (batch 4 in one process, 2 in each of two).

Tolerance: 1e-5 absolute on the trained values after 4 optimizer steps. The two layouts differ only in the order of
floating-point sums: a gradient all-reduce over two halves against one sum over the whole batch. That difference
measured at most 1.3e-6 (float32, 4 AdamW steps, 2 CPU cores). Training moves the compared values by 1e-3 or more,
so a data or loss-scaling error shows far above the tolerance.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_base
from safetensors.torch import load_file

from modeling_igp import IGPruningForCausalLM


sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_worker import BANK  # noqa: E402

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
TOLERANCE = 1e-5


def run_worker(tasks: str, output: Path, processes: int, batch_size: int) -> None:
    command = [sys.executable, str(WORKER), tasks, str(output), "--batch-size", str(batch_size)]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   *command[1:]]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr[-4000:]


def load_run(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    return load_file(path), metadata


def assert_same_values(single: dict, several: dict, initial_change: float):
    assert single.keys() == several.keys()
    differences = {name: float((single[name] - several[name]).abs().max()) for name in single}
    worst = max(differences, key=differences.get)
    assert differences[worst] <= TOLERANCE, f"{worst} differs by {differences[worst]:.3g}"
    # The comparison means something only if training moved the values far more than the tolerance.
    assert initial_change > 100 * TOLERANCE


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("one_process")
    run_worker("lora,full,masks", output, processes=1, batch_size=4)
    return output


@pytest.mark.slow
def test_ddp_finetune_matches_one_process(one_process_run, smollm2_tokenizer, tmp_path):
    run_worker("lora,full", tmp_path, processes=2, batch_size=2)
    shapes = dict(vocab_size=len(smollm2_tokenizer), pad_token_id=smollm2_tokenizer.pad_token_id,
                  bos_token_id=smollm2_tokenizer.bos_token_id, eos_token_id=smollm2_tokenizer.eos_token_id)
    initial = IGPruningForCausalLM.from_base(tiny_base("llama", **shapes), BANK).state_dict()

    for task in ("lora", "full"):
        single, single_metadata = load_run(one_process_run / f"{task}.safetensors")
        several, several_metadata = load_run(tmp_path / f"{task}.safetensors")
        assert several_metadata["world_size"] == "2"
        # 16 examples at a global batch of 4 make one epoch of 4 steps only if the two processes split the data.
        assert several_metadata["epoch"] == single_metadata["epoch"] == "1.0"

        if task == "lora":
            # LoRA B starts at zero, so its trained size is how far training moved it.
            change = max(float(tensor.abs().max()) for name, tensor in single.items() if "lora_B" in name)
        else:
            change = max(float((single[name] - initial[name]).abs().max()) for name in single)
        assert_same_values(single, several, change)


@pytest.mark.slow
def test_fsdp_whole_model_matches_one_process(one_process_run, tmp_path):
    run_worker("fsdp", tmp_path, processes=2, batch_size=2)
    single, _ = load_run(one_process_run / "full.safetensors")
    several, metadata = load_run(tmp_path / "fsdp.safetensors")
    assert metadata["epoch"] == "1.0"
    assert single.keys() == several.keys()
    difference = max(float((single[name] - several[name]).abs().max()) for name in single)
    assert difference <= TOLERANCE, f"FSDP run differs from one process by {difference:.3g}"


@pytest.mark.slow
def test_ddp_mask_learning_matches_one_process(one_process_run, tmp_path):
    run_worker("masks", tmp_path, processes=2, batch_size=2)
    single, _ = load_run(one_process_run / "masks.safetensors")
    several, _ = load_run(tmp_path / "masks.safetensors")
    # Gates start at log-alpha 3.0 (init="constant"); 4 steps at learning rate 0.1 move them.
    change = float((single["log_alpha"] - 3.0).abs().max())
    assert_same_values(single, several, change)


# -- placement ---------------------------------------------------------------------------------------------------


def test_device_map_keeps_decoder_layers_whole():
    from accelerate import infer_auto_device_map

    model = IGPruningForCausalLM.from_base(tiny_base("llama"), BANK)
    # Two devices of about 1.5 decoder layers each, then the CPU: a split inside a layer would fit better.
    layer_bytes = sum(parameter.numel() * 4 for parameter in model.model.layers[0].parameters())
    max_memory = {0: int(1.5 * layer_bytes) + 13_000, 1: int(1.5 * layer_bytes), "cpu": 10**9}
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=model._no_split_modules)

    layer_keys = [key for key in device_map if key.startswith("model.layers")]
    assert all(re.fullmatch(r"model\.layers\.\d+", key) for key in layer_keys), device_map
    assert len(set(device_map.values())) >= 2, device_map


def test_device_map_auto_offload_matches(tmp_path):
    """Loading with device_map="auto" and too little CPU memory offloads whole layers to disk, same logits."""
    from transformers import AutoModelForCausalLM

    model = IGPruningForCausalLM.from_base(tiny_base("llama"), BANK).eval()
    model.save_pretrained(tmp_path / "pruned")
    layer_bytes = sum(parameter.numel() * 4 for parameter in model.model.layers[0].parameters())
    embedding_bytes = model.model.embed_tokens.weight.numel() * 4

    placed = AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "pruned"),
        trust_remote_code=True,
        device_map="auto",
        max_memory={"cpu": embedding_bytes + 2 * layer_bytes},
        offload_folder=str(tmp_path / "offload"),
    )
    assert "disk" in placed.hf_device_map.values(), placed.hf_device_map
    assert all(re.fullmatch(r"model\.layers(\.\d+)?", key) for key in placed.hf_device_map if "layers" in key)

    input_ids = torch.randint(3, 96, (3, 9), generator=torch.Generator().manual_seed(0))
    cluster_ids = torch.tensor([0, 1, 2])
    with torch.no_grad():
        expected = model(input_ids, cluster_ids=cluster_ids, use_cache=False).logits
        actual = placed(input_ids, cluster_ids=cluster_ids, use_cache=False).logits
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_fsdp_policy_finds_decoder_layers(arch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers.trainer_pt_utils import get_module_class_from_name

    model = IGPruningForCausalLM.from_base(tiny_base(arch), BANK)
    layer_class = type(model.model.layers[0])
    assert layer_class.__name__ in model._no_split_modules
    assert get_module_class_from_name(model, layer_class.__name__) is layer_class

    # Accelerate's transformer-based policy reads the class names from `_no_split_modules` when none are given.
    plugin = FullyShardedDataParallelPlugin(auto_wrap_policy="transformer_based_wrap", fsdp_version=1)
    plugin.set_auto_wrap_policy(model)
    wrapped = [name for name, module in model.named_modules()
               if plugin.auto_wrap_policy(module=module, recurse=False, nonwrapped_numel=0)]
    assert wrapped == [f"model.layers.{index}" for index in range(len(model.model.layers))]
