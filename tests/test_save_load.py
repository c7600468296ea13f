"""save_pretrained / from_pretrained: offline round trip without the project installed, pruned weights, errors."""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import ARCHITECTURES, CHECKPOINT_BANK, CHECKPOINT_REMOVED_BLOCKS, PROMPTS, left_pad, tiny_base
from modeling_igp import IGPruningForCausalLM


# Runs in a fresh interpreter: the project's own packages cannot be imported, so the checkpoint's remote code is the
# only copy of the model there is. The results are written as safetensors and JSON for the test to compare.
LOAD_SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    BLOCKED = {"modeling_igp", "igp_training", "igp_hub_cards"}


    class BlockProject:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ImportError(f"{name} must not be imported when loading a saved checkpoint")
            return None


    sys.meta_path.insert(0, BlockProject())

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    checkpoint, inputs_file, results_dir = sys.argv[1:4]
    with open(inputs_file) as handle:
        inputs = json.load(handle)
    input_ids = torch.tensor(inputs["input_ids"])
    attention_mask = torch.tensor(inputs["attention_mask"])

    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    with torch.no_grad():
        logits = {
            f"cluster_{cluster}": model(
                input_ids, attention_mask=attention_mask, cluster_ids=torch.full((len(input_ids),), cluster)
            ).logits
            for cluster in range(model.config.num_clusters)
        }
        generated = model.generate(input_ids, attention_mask=attention_mask, do_sample=False)
    save_file(logits, f"{results_dir}/logits.safetensors")

    results = {
        "model_module": type(model).__module__,
        "router_class": type(model.router).__name__,
        "routes": model.route(inputs["prompts"]).tolist(),
        "generated": generated.tolist(),
        "generation_config": model.generation_config.to_dict(),
        "mask_bank": model.config.mask_bank,
        "centroids": model.config.centroids,
        "state_dict_keys": sorted(model.state_dict().keys()),
        "project_modules": sorted(name for name in sys.modules if name.partition(".")[0] in BLOCKED),
        "sentence_transformers_loaded": "sentence_transformers" in sys.modules,
    }
    with open(f"{results_dir}/results.json", "w") as handle:
        json.dump(results, handle)
    """
)


@pytest.fixture(scope="module")
def prompt_batch(smollm2_tokenizer):
    rows = [torch.tensor(smollm2_tokenizer(text).input_ids) for text in PROMPTS]
    return left_pad(rows, smollm2_tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def fresh_process_results(saved_checkpoint, prompt_batch, tmp_path_factory):
    """Load the saved checkpoint in a fresh, offline Python process where the project is not importable."""
    path, _ = saved_checkpoint
    input_ids, attention_mask = prompt_batch
    work = tmp_path_factory.mktemp("fresh_process")
    inputs_file = work / "inputs.json"
    inputs_file.write_text(
        json.dumps({"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(), "prompts": PROMPTS})
    )
    script = work / "load_checkpoint.py"
    script.write_text(LOAD_SCRIPT)

    environment = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(work / "hf_home"))
    environment.pop("PYTHONPATH", None)
    completed = subprocess.run(
        [sys.executable, str(script), str(path), str(inputs_file), str(work)],
        cwd=work, env=environment, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads((work / "results.json").read_text()), load_file(work / "logits.safetensors")


def test_fresh_process_uses_remote_code_only(fresh_process_results):
    results, _ = fresh_process_results

    assert results["project_modules"] == []
    assert not results["model_module"].startswith("modeling_igp")
    assert results["model_module"].endswith("modeling_igp")
    assert results["router_class"] == "IGPRouter"
    # Routing at inference needs only torch and transformers.
    assert results["sentence_transformers_loaded"] is False


@torch.no_grad()
def test_fresh_process_logits_identical(fresh_process_results, saved_checkpoint, prompt_batch):
    _, logits = fresh_process_results
    _, model = saved_checkpoint
    input_ids, attention_mask = prompt_batch

    assert sorted(logits) == [f"cluster_{cluster}" for cluster in range(len(CHECKPOINT_BANK))]
    for cluster in range(len(CHECKPOINT_BANK)):
        expected = model(
            input_ids, attention_mask=attention_mask, cluster_ids=torch.full((len(input_ids),), cluster)
        ).logits
        torch.testing.assert_close(logits[f"cluster_{cluster}"], expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_fresh_process_routing_and_generation_identical(fresh_process_results, saved_checkpoint, prompt_batch):
    results, _ = fresh_process_results
    _, model = saved_checkpoint
    input_ids, attention_mask = prompt_batch

    assert results["routes"] == model.route(PROMPTS).tolist() == [0, 1, 2]
    assert results["mask_bank"] == CHECKPOINT_BANK
    torch.testing.assert_close(torch.tensor(results["centroids"]), torch.tensor(model.config.centroids))
    expected = model.generate(input_ids, attention_mask=attention_mask, do_sample=False)
    assert results["generated"] == expected.tolist()


def test_fresh_process_generation_config_carried_over(fresh_process_results, checkpoint_base):
    results, _ = fresh_process_results
    assert results["generation_config"]["max_new_tokens"] == 7
    assert results["generation_config"]["repetition_penalty"] == 1.3
    assert results["generation_config"]["pad_token_id"] == checkpoint_base.generation_config.pad_token_id


# -- what the checkpoint contains -------------------------------------------------------------------------------------


def removed_parameter_names(base_model, removed_blocks) -> set[str]:
    """Names of the base model's parameters that belong to the given blocks."""
    modules = {0: ("input_layernorm", "self_attn"), 1: ("post_attention_layernorm", "mlp")}
    prefixes = tuple(
        f"model.layers.{block // 2}.{name}." for block in removed_blocks for name in modules[block % 2]
    )
    return {name for name, _ in base_model.named_parameters() if name.startswith(prefixes)}


def tensor_bytes(path) -> dict[str, int]:
    """Bytes of each tensor in a float32 safetensors file, read from its header."""
    sizes = {}
    with safe_open(str(path), "pt") as handle:
        for key in handle.keys():
            sizes[key] = 4 * math.prod(handle.get_slice(key).get_shape())
    return sizes


def test_checkpoint_omits_blocks_no_mask_keeps(saved_checkpoint, checkpoint_base, tmp_path):
    path, _ = saved_checkpoint
    dense_path = tmp_path / "dense"
    IGPruningForCausalLM.from_base(checkpoint_base, [[1] * 8]).save_pretrained(dense_path)

    pruned, dense = tensor_bytes(path / "model.safetensors"), tensor_bytes(dense_path / "model.safetensors")
    removed = removed_parameter_names(checkpoint_base, CHECKPOINT_REMOVED_BLOCKS)

    assert removed, "the bank should remove some parameters"
    assert set(dense) - set(pruned) == removed
    assert set(pruned) <= set(dense)
    removed_bytes = 4 * sum(p.numel() for name, p in checkpoint_base.named_parameters() if name in removed)
    assert sum(dense.values()) - sum(pruned.values()) == removed_bytes
    assert os.path.getsize(dense_path / "model.safetensors") - os.path.getsize(path / "model.safetensors") >= removed_bytes


def test_checkpoint_files(saved_checkpoint):
    path, _ = saved_checkpoint
    files = {os.path.relpath(os.path.join(root, name), path) for root, _, names in os.walk(path) for name in names}

    for required in ("config.json", "generation_config.json", "model.safetensors", "configuration_igp.py",
                     "modeling_igp.py", "cache_igp.py", "router_igp.py", "tokenizer.json",
                     "router/config.json", "router/model.safetensors", "router/tokenizer.json"):
        assert required in files, f"{required} missing from the checkpoint"
    # Only safetensors, JSON, code and tokenizer text: nothing pickled.
    allowed = (".json", ".safetensors", ".py", ".jinja", ".txt", ".model")
    assert [name for name in files if not name.endswith(allowed)] == []

    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "igp"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_igp.IGPruningConfig",
        "AutoModelForCausalLM": "modeling_igp.IGPruningForCausalLM",
    }
    assert config["router_subfolder"] == "router"


@torch.no_grad()
def test_loading_reads_no_weights_of_removed_blocks(saved_checkpoint):
    path, _ = saved_checkpoint
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

    for block in CHECKPOINT_REMOVED_BLOCKS:
        layer = model.model.layers[block // 2]
        names = ("input_layernorm", "self_attn") if block % 2 == 0 else ("post_attention_layernorm", "mlp")
        assert all(getattr(layer, name) is None for name in names), f"block {block} was rebuilt"
    assert not any(parameter.is_meta for parameter in model.parameters())


@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.no_grad()
def test_round_trip_each_architecture(arch, tmp_path):
    base = tiny_base(arch)
    bank = [[1, 1, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0, 1, 0]]
    model = IGPruningForCausalLM.from_base(base, bank)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)

    input_ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    cluster_ids = torch.tensor([0, 1])
    torch.testing.assert_close(
        loaded(input_ids, cluster_ids=cluster_ids).logits, model(input_ids, cluster_ids=cluster_ids).logits,
        atol=0, rtol=0,
    )
    assert loaded.config.tie_word_embeddings == base.config.tie_word_embeddings
    if base.config.tie_word_embeddings:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


# -- errors ------------------------------------------------------------------------------------------------------------


def copy_without(source, target, excluded):
    """Copy a checkpoint folder without the top-level entries named in `excluded`."""

    def ignore(folder, names):
        return [name for name in names if name in excluded] if os.path.samefile(folder, source) else []

    shutil.copytree(source, target, ignore=ignore)
    return target


def test_missing_router_folder_raises(saved_checkpoint, tmp_path):
    path, _ = saved_checkpoint
    no_router = copy_without(path, tmp_path / "no-router", {"router"})

    with pytest.raises(OSError, match=r"router/.*missing"):
        AutoModelForCausalLM.from_pretrained(no_router, trust_remote_code=True)

    # Without routing the checkpoint still loads and runs with explicit cluster ids.
    model = AutoModelForCausalLM.from_pretrained(no_router, trust_remote_code=True, load_router=False)
    assert model.router is None
    model(torch.tensor([[5, 6, 7]]), cluster_ids=torch.tensor([1]))
    with pytest.raises(ValueError, match="cannot route"):
        model.route(["a prompt"])


def test_missing_router_weights_raise(saved_checkpoint, tmp_path):
    path, _ = saved_checkpoint
    broken = copy_without(path, tmp_path / "broken-router", set())
    (broken / "router" / "model.safetensors").unlink()

    with pytest.raises(OSError, match="router/"):
        AutoModelForCausalLM.from_pretrained(broken, trust_remote_code=True)


def test_edited_bank_missing_weights_raises(saved_checkpoint, tmp_path):
    path, _ = saved_checkpoint
    edited = copy_without(path, tmp_path / "edited-bank", set())
    config = json.loads((edited / "config.json").read_text())
    config["mask_bank"][0][CHECKPOINT_REMOVED_BLOCKS[1]] = 1
    (edited / "config.json").write_text(json.dumps(config))

    # The weights of that block were never saved, so loading must not fill them with random values.
    with pytest.raises(ValueError, match=rf"missing the weights of blocks \[{CHECKPOINT_REMOVED_BLOCKS[1]}\]"):
        AutoModelForCausalLM.from_pretrained(edited, trust_remote_code=True)

    model, loading_info = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, output_loading_info=True)
    assert not loading_info["missing_keys"]
    assert model.config.mask_bank == CHECKPOINT_BANK


def test_missing_tokenizer_warns_and_loads(saved_checkpoint, tmp_path, caplog):
    path, _ = saved_checkpoint
    no_tokenizer = copy_without(path, tmp_path / "no-tokenizer", {"tokenizer.json", "tokenizer_config.json"})

    model = AutoModelForCausalLM.from_pretrained(no_tokenizer, trust_remote_code=True)

    assert model.tokenizer is None
    assert model.route(PROMPTS).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)
