"""The `igp prune` and `igp generate` commands: exit code 2 on bad arguments, and a tiny run end to end."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import reference_greedy, tiny_base
from igp_training.cli import main

CALIBRATION = "embedded-gsm8k:question@12,embedded-humaneval:prompt@12"
TINY_RUN = ["--clusters", "2", "--steps", "3", "--batch-size", "4", "--seq-length", "24", "--heldout", "2",
            "--min-cluster-size", "4", "--kmeans-restarts", "2", "--save-steps", "0", "--logging-steps", "1"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    base = tiny_base("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("tiny-llama")
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pruned_dir(tiny_model_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("cli-run") / "pruned"
    code = main(["prune", "--model", str(tiny_model_dir), "--calibration", CALIBRATION, "--output", str(output_dir),
                 *TINY_RUN])
    assert code == 0
    return output_dir


def exit_code_and_error(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as raised:
        main(argv)
    return raised.value.code, capsys.readouterr().err


def write_texts(path, count):
    path.write_text("".join(json.dumps({"text": f"calibration text number {index}"}) + "\n" for index in range(count)))
    return path


# -- bad arguments -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arguments, message", [
    (["--sparsity", "1.5"], "--sparsity must lie strictly between 0 and 1, got 1.5"),
    (["--sparsity", "0"], "--sparsity must lie strictly between 0 and 1"),
    (["--sparsity", "-0.2"], "--sparsity must lie strictly between 0 and 1"),
    (["--clusters", "0"], "--clusters must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--model", "/nonexistent/model-folder"], "Model folder not found: /nonexistent/model-folder"),
    (["--model", "/nonexistent/model.gguf"], "GGUF file not found"),
    (["--calibration", "/nonexistent/texts.jsonl@10"], "Calibration file not found: /nonexistent/texts.jsonl"),
    (["--calibration", "texts.jsonl@ten"], "Invalid sample count 'ten'"),
    (["--sparsity-unit", "layers"], "invalid choice: 'layers'"),
    (["--refine", "--refine-window", "0"], "--refine-window must be at least 1, got 0"),
    (["--refine", "--refine-exchange-examples", "0"], "--refine-exchange-examples must be at least 1, got 0"),
])
def test_prune_bad_arguments_exit_2(arguments, message, capsys, tmp_path):
    code, error = exit_code_and_error(["prune", "--output", str(tmp_path / "out"), *arguments], capsys)
    assert code == 2
    assert message in error
    assert not (tmp_path / "out").exists()


def test_prune_unknown_hub_model_exit_2(capsys, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # Offline, so the lookup fails at once instead of waiting for a network that is not there.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, error = exit_code_and_error(["prune", "--model", "nobody/no-such-model", "--output", str(tmp_path / "o")],
                                      capsys)
    assert code == 2
    assert "Unknown model 'nobody/no-such-model'" in error


def test_prune_more_clusters_than_counted_texts(capsys, tmp_path):
    first, second = write_texts(tmp_path / "a.jsonl", 5), write_texts(tmp_path / "b.jsonl", 5)
    code, error = exit_code_and_error(
        ["prune", "--calibration", f"{first}@2,{second}@2", "--clusters", "5", "--output", str(tmp_path / "o")], capsys
    )
    assert code == 2
    assert "--clusters 5 is more than the 4 calibration texts" in error


def test_prune_more_clusters_than_file_texts(tiny_model_dir, capsys, tmp_path):
    # Without @COUNT the number of texts is known only once the file is read, inside the pipeline.
    texts = write_texts(tmp_path / "three.jsonl", 3)
    code, error = exit_code_and_error(
        ["prune", "--model", str(tiny_model_dir), "--calibration", str(texts), "--clusters", "4", "--heldout", "0",
         "--output", str(tmp_path / "o")], capsys
    )
    assert code == 2
    assert "more clusters than texts" in error


def test_prune_invalid_router_exit_2(pruned_dir, tiny_model_dir, capsys, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    texts = write_texts(tmp_path / "texts.jsonl", 6)
    for router in (str(pruned_dir), "nobody/no-such-router"):
        code, error = exit_code_and_error(
            ["prune", "--model", str(tiny_model_dir), "--calibration", str(texts), "--router", router, "--clusters",
             "2", "--heldout", "0", "--min-cluster-size", "1", "--output", str(tmp_path / "o")], capsys
        )
        assert code == 2
        assert f"Could not load the router encoder {router!r}" in error


def test_prune_existing_output_exit_2(pruned_dir, tiny_model_dir, capsys):
    code, error = exit_code_and_error(
        ["prune", "--model", str(tiny_model_dir), "--calibration", CALIBRATION, "--output", str(pruned_dir), *TINY_RUN],
        capsys,
    )
    assert code == 2
    assert "already contains a saved model" in error


def test_generate_bad_arguments_exit_2(pruned_dir, capsys, tmp_path):
    code, error = exit_code_and_error(["generate", "--model", str(tmp_path / "absent"), "hello"], capsys)
    assert code == 2
    assert "Model folder not found" in error

    code, error = exit_code_and_error(["generate", "--model", str(pruned_dir), "--cluster", "7", "hello"], capsys)
    assert code == 2
    assert "--cluster 7 is out of range; the model has clusters 0 to 1" in error

    code, error = exit_code_and_error(
        ["generate", "--model", str(pruned_dir), "--do-sample", "--temperature", "0", "hello"], capsys
    )
    assert code == 2
    assert "--temperature must be greater than 0 with --do-sample, got 0.0" in error


def test_generate_base_model_folder_exit_2(tiny_model_dir, capsys):
    code, error = exit_code_and_error(["generate", "--model", str(tiny_model_dir), "hello"], capsys)
    assert code == 2
    assert "is not an IGPruningForCausalLM checkpoint" in error


def test_prune_help_documents_spec(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["prune", "--help"])
    assert raised.value.code == 0
    help_text = capsys.readouterr().out
    for expected in ("SOURCE[:FIELD][@COUNT]", "embedded-gsm8k", "embedded-humaneval", "embedded-pydoc", "YAML",
                     "--sparsity-unit", "--loss {lm,kl}"):
        assert expected in help_text, expected


@pytest.mark.parametrize("flag, expected", [([], False), (["--balanced-sampling"], True)])
def test_prune_balanced_sampling_flag(flag, expected):
    from igp_training.cli import build_parser
    from igp_training.prune_cmd import build_configs

    args = build_parser().parse_args(["prune", "--output", "run", *flag])
    _, learning = build_configs(args)
    assert learning.balanced_sampling is expected


# -- end to end --------------------------------------------------------------------------------------------------


def test_prune_output_loads_with_auto_class(pruned_dir):
    model = AutoModelForCausalLM.from_pretrained(pruned_dir, trust_remote_code=True)
    assert model.config.num_clusters == 2
    assert all(sum(1 for keep in mask if not keep) == 2 for mask in model.config.mask_bank)
    record = json.loads((pruned_dir / "igp_run.json").read_text())
    command = record["command"]
    assert command[:2] == ["igp", "prune"]
    assert command[command.index("--clusters") + 1] == "2"
    assert command[command.index("--calibration") + 1] == CALIBRATION


def test_generate_prints_cluster_blocks_and_text(pruned_dir, tiny_model_dir, capsys):
    prompt = "Tom has 3 apples and buys 5 more. How many apples does he have now?"
    capsys.readouterr()
    assert main(["generate", "--model", str(pruned_dir), "--max-new-tokens", "5", "--no-chat-template", prompt]) == 0
    lines = capsys.readouterr().out.splitlines()

    model = AutoModelForCausalLM.from_pretrained(pruned_dir, trust_remote_code=True)
    cluster = int(model.route([prompt])[0])
    mask = model.config.mask_bank[cluster]
    assert lines[0] == f"cluster: {cluster} of 2 (routed)"
    assert lines[1].startswith("skipped blocks: 2 of 8 (25.0%): ")
    skipped = [f"L{block // 2}.{'attn' if block % 2 == 0 else 'mlp'}" for block, keep in enumerate(mask) if not keep]
    assert lines[1].endswith(", ".join(skipped))

    # The text is the identity reference's greedy continuation with the routed mask.
    tokenizer = AutoTokenizer.from_pretrained(pruned_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    expected = reference_greedy(base, input_ids, mask, max_new_tokens=5)[0, input_ids.shape[1]:]
    assert lines[2] == "text:"
    assert "\n".join(lines[3:]) == tokenizer.decode(expected, skip_special_tokens=True).strip()


def test_generate_chat_template_and_forced_cluster(pruned_dir, tiny_model_dir, capsys):
    prompt = "def add(a, b):"
    capsys.readouterr()
    assert main(["generate", "--model", str(pruned_dir), "--max-new-tokens", "4", "--cluster", "1", prompt]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "cluster: 1 of 2 (chosen with --cluster)"

    tokenizer = AutoTokenizer.from_pretrained(pruned_dir)
    model = AutoModelForCausalLM.from_pretrained(pruned_dir, trust_remote_code=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]
    expected = reference_greedy(base, chat, model.config.mask_bank[1], max_new_tokens=4)[0, chat.shape[1]:]
    assert "\n".join(lines[3:]) == tokenizer.decode(expected, skip_special_tokens=True).strip()
    # The chat template wrapped the prompt in role markers, so the model saw more tokens than the prompt alone.
    assert chat.shape[1] > len(tokenizer(prompt)["input_ids"])
