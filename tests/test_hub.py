"""Sharing on the Hub: one commit per push, our own model card, and a pushed checkpoint that loads anywhere.

The HfApi methods that would reach the Hub (`create_repo`, `create_branch`, `create_commit`) are replaced by
recorders, so nothing leaves the machine. The commit recorder copies every uploaded file into a local folder that
replaces the Hub repository. A fresh Python process in which this project cannot be imported then loads that folder.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib
import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import OfflineModeIsEnabled
from torch.utils.flop_counter import FlopCounterMode

import modeling_igp
from conftest import PROMPTS, tiny_base
from igp_hub_cards import render_card
from igp_training.cli import main as igp_main
from modeling_igp import IGPruningForCausalLM


matplotlib.use("Agg")

# Block 3 (the MLP of layer 1) is skipped by every mask, so its weights are not stored.
MASK_BANK = [
    [1, 1, 1, 0, 1, 1, 0, 1],
    [0, 1, 1, 0, 1, 1, 1, 1],
    [1, 1, 0, 0, 1, 0, 1, 1],
]
# Never contacted: every HfApi method that sends a request is replaced in these tests.
ENDPOINT = "http://127.0.0.1"
TOKEN = "hf_token_for_tests"
CARD_TAGS = {"pruning", "depth-pruning", "dynamic-pruning", "custom_code"}

# What save_pretrained writes besides the remote-code files, plus the card.
CHECKPOINT_FILES = {
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "router/config.json",
    "router/model.safetensors",
    "router/tokenizer.json",
    "router/tokenizer_config.json",
}


def remote_code_files() -> set[str]:
    """Every module of the model package except `__init__.py`: the files a checkpoint must carry."""
    folder = Path(modeling_igp.__file__).parent
    return {path.name for path in folder.glob("*.py") if path.name != "__init__.py"}


def run_record() -> dict:
    """A run record in the layout `igp prune` writes, for the tiny model of these tests."""
    return {
        "format_version": 1,
        "versions": {"python": "3.11.7", "igp": "0.1.0", "torch": "2.13.0", "transformers": "5.25.0", "peft": None},
        "settings": {
            "prune": {"output_dir": "/tmp/run", "model": None, "num_clusters": 3, "sparsity": 0.25,
                      "sparsity_unit": "blocks", "context_length": 2048},
            "mask_learning": {"lr_gates": 0.1, "max_steps": 300, "init": "block_influence"},
        },
        "base_model": {"name_or_path": "SmolLM2-135M-Instruct (packaged)", "model_type": "llama", "num_layers": 4},
        "calibration": {
            "spec": "embedded-gsm8k@64,embedded-humaneval@64,embedded-pydoc@64",
            "num_texts": 192,
            "sources": {
                "embedded-gsm8k": {"calibration": 64, "heldout": 16},
                "embedded-humaneval": {"calibration": 64, "heldout": 16},
                "embedded-pydoc": {"calibration": 64, "heldout": 16, "dropped_empty": 0},
            },
        },
        "clustering": {
            "router": "all-MiniLM-L6-v2 (packaged)",
            "num_clusters": 3,
            "sizes": [70, 60, 62],
            "composition": [{"embedded-gsm8k": 64, "embedded-pydoc": 6}, {"embedded-humaneval": 60},
                            {"embedded-pydoc": 58, "embedded-humaneval": 4}],
            "heldout_routing": {"embedded-gsm8k": [16, 0, 0], "embedded-humaneval": [0, 15, 1],
                                "embedded-pydoc": [1, 0, 15]},
        },
        "mask_learning": {"wall_time_s": 312.4, "num_steps": 300, "history": [{"step": 300, "loss": 2.5}]},
        "masks": {"mask_bank": MASK_BANK},
        "timings_s": {"load model": 1.2, "mask learning": 312.4, "total": 330.0},
        "files": {"mask_bank_plot": "mask_bank.png", "training_plot": "training_curves.png"},
    }


def save_plot(path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(3, 1))
    axes.imshow(torch.tensor(MASK_BANK).numpy(), aspect="auto")
    figure.savefig(path)
    plt.close(figure)


def markdown_tables(text: str) -> list[tuple[str, list[str]]]:
    """Return each Markdown table of `text` as (header line, row lines)."""
    lines = text.splitlines()
    tables = []
    for index in range(len(lines) - 1):
        if lines[index].startswith("|") and re.fullmatch(r"\|( --- \|)+", lines[index + 1].strip()):
            rows = []
            for line in lines[index + 2:]:
                if not line.startswith("|"):
                    break
                rows.append(line)
            tables.append((lines[index], rows))
    return tables


def table_rows(text: str, header_start: str) -> list[list[str]]:
    """Return the cells of every row of the table whose header starts with `header_start`."""
    for header, rows in markdown_tables(text):
        if header.startswith(header_start):
            return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows]
    raise AssertionError(f"No table with header {header_start!r} in the card.")


def relative_links(text: str) -> set[str]:
    """Targets of Markdown links and images that are not URLs or anchors."""
    targets = set(re.findall(r"\]\(([^)\s]+)\)", text))
    return {target for target in targets if not re.match(r"^[a-z]+:", target) and not target.startswith("#")}


# -- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned(router, smollm2_tokenizer):
    """A tiny random Llama with SmolLM2's tokenizer, the packaged router and three clusters (centroids: PROMPTS)."""
    base = tiny_base("llama", vocab_size=len(smollm2_tokenizer), pad_token_id=smollm2_tokenizer.pad_token_id,
                     bos_token_id=smollm2_tokenizer.bos_token_id, eos_token_id=smollm2_tokenizer.eos_token_id)
    model = IGPruningForCausalLM.from_base(base, MASK_BANK, centroids=router.embed(PROMPTS), router=router,
                                           tokenizer=smollm2_tokenizer)
    return model, base


@pytest.fixture(scope="module")
def run_dir(pruned, tmp_path_factory):
    """The saved model with the run record and the two plots that `igp prune` writes beside it."""
    folder = tmp_path_factory.mktemp("run")
    pruned[0].save_pretrained(folder)
    (folder / "igp_run.json").write_text(json.dumps(run_record(), indent=2))
    save_plot(folder / "mask_bank.png")
    save_plot(folder / "training_curves.png")
    return folder


@pytest.fixture
def light_dir(run_dir, tmp_path):
    """A copy of the run folder without the router and tokenizer, for card tests that never load the model."""
    for name in ("config.json", "igp_run.json", "mask_bank.png", "training_curves.png"):
        shutil.copy(run_dir / name, tmp_path / name)
    (tmp_path / "model.safetensors").symlink_to(run_dir / "model.safetensors")
    return tmp_path


class HubRecorder:
    """Replaces the Hub: records each HfApi call and copies the files of each commit under `repo_dir`."""

    def __init__(self, repo_dir: Path):
        self.repo_dir = repo_dir
        self.calls = {"create_repo": [], "create_branch": [], "create_commit": []}

    def install(self, monkeypatch) -> None:
        recorder = self

        def create_repo(api, repo_id, **kwargs):
            recorder._record("create_repo", api, repo_id, kwargs)
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(api, repo_id, **kwargs):
            recorder._record("create_branch", api, repo_id, kwargs)

        def create_commit(api, repo_id, operations, **kwargs):
            operations = list(operations)
            for operation in operations:
                target = recorder.repo_dir / operation.path_in_repo
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(operation.path_or_fileobj, target)
            call = recorder._record("create_commit", api, repo_id, kwargs)
            call["paths"] = [operation.path_in_repo for operation in operations]
            return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}",
                              commit_message=kwargs["commit_message"], commit_description="", oid="0" * 40)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)

    def _record(self, name, api, repo_id, kwargs) -> dict:
        call = dict(kwargs, repo_id=repo_id, endpoint=api.endpoint,
                    authorization=api._build_hf_headers(token=kwargs.get("token"))["authorization"])
        self.calls[name].append(call)
        return call

    @property
    def commit(self) -> dict:
        assert len(self.calls["create_commit"]) == 1, f"expected one commit, got {len(self.calls['create_commit'])}"
        return self.calls["create_commit"][0]


def go_online(monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", ENDPOINT)
    monkeypatch.setenv("HF_TOKEN", TOKEN)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    go_online(monkeypatch)
    recorder = HubRecorder(tmp_path / "hub_repo")
    recorder.install(monkeypatch)
    return recorder


@pytest.fixture(scope="module")
def pushed(run_dir, tmp_path_factory):
    """`igp push` of the run folder: the recorder of its Hub calls (the repository files are in `repo_dir`)."""
    recorder = HubRecorder(tmp_path_factory.mktemp("hub_repo"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        go_online(monkeypatch)
        recorder.install(monkeypatch)
        status = igp_main(["push", str(run_dir), "--repo-id", "test-org/tiny-igp", "--private"])
    assert status == 0
    return recorder


# -- push_to_hub ---------------------------------------------------------------------------------------------------


def test_push_uploads_exact_files_in_one_commit(pruned, hub):
    model, _ = pruned
    card = "---\nlicense: apache-2.0\n---\n\n# Our card\n\nWritten for this test.\n"

    commit = model.push_to_hub("test-org/tiny-igp", model_card=card)

    assert len(hub.calls["create_repo"]) == 1
    assert hub.calls["create_repo"][0]["repo_id"] == "test-org/tiny-igp"
    assert commit.oid == "0" * 40
    paths = hub.commit["paths"]
    assert len(paths) == len(set(paths))
    assert set(paths) == CHECKPOINT_FILES | remote_code_files()
    assert (hub.repo_dir / "README.md").read_text() == card
    config = json.loads((hub.repo_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_igp.IGPruningForCausalLM"
    assert hub.commit["commit_message"] == "Upload IGPruningForCausalLM"


def test_push_without_card_writes_config_card(pruned, hub):
    model, _ = pruned

    model.push_to_hub("test-org/tiny-igp")

    text = (hub.repo_dir / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert CARD_TAGS <= set(card.data.tags)
    # The stock push_to_hub writes transformers' template card, full of these placeholders.
    assert "[More Information Needed]" not in text
    assert 'from_pretrained("test-org/tiny-igp", trust_remote_code=True)' in text
    assert len(table_rows(text, "| Cluster |")) == len(MASK_BANK)
    assert "None" not in text


def test_push_keeps_readme_of_source_folder(run_dir, hub, tmp_path):
    folder = tmp_path / "with_readme"
    shutil.copytree(run_dir, folder, copy_function=os.symlink)
    card = ("# Hand-written card\n\n![Mask bank](mask_bank.png)\n\nRun record: [igp_run.json](igp_run.json), "
            "settings: [config.json](config.json)\n")
    (folder / "README.md").write_text(card)
    model = IGPruningForCausalLM.from_pretrained(str(folder))

    model.push_to_hub("test-org/tiny-igp")

    assert (hub.repo_dir / "README.md").read_text() == card
    paths = set(hub.commit["paths"])
    assert {"mask_bank.png", "igp_run.json"} <= paths
    assert "training_curves.png" not in paths
    assert hub.commit["paths"].count("config.json") == 1


def test_push_offline_raises_before_saving(pruned, hub, monkeypatch):
    model, _ = pruned
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def fail_save(*args, **kwargs):
        raise AssertionError("save_pretrained ran although the Hub is offline")

    monkeypatch.setattr(IGPruningForCausalLM, "save_pretrained", fail_save)

    with pytest.raises(OfflineModeIsEnabled, match="HF_HUB_OFFLINE"):
        model.push_to_hub("test-org/tiny-igp", model_card="# card\n")
    assert hub.calls["create_repo"] == []
    assert hub.calls["create_commit"] == []


def test_push_uses_token_and_endpoint(pruned, hub):
    model, _ = pruned

    model.push_to_hub("test-org/tiny-igp", model_card="# card\n")
    model.push_to_hub("test-org/tiny-igp", model_card="# card\n", token="hf_explicit_token")

    for name in ("create_repo", "create_commit"):
        first, second = hub.calls[name]
        assert first["endpoint"] == ENDPOINT
        assert first["authorization"] == f"Bearer {TOKEN}"
        assert second["authorization"] == "Bearer hf_explicit_token"


def test_push_to_branch_as_pull_request(pruned, hub):
    model, _ = pruned

    model.push_to_hub("test-org/tiny-igp", model_card="# card\n", revision="dev", create_pr=True, private=True,
                      commit_message="Add masks")

    assert hub.calls["create_repo"][0]["private"] is True
    assert [call["branch"] for call in hub.calls["create_branch"]] == ["dev"]
    assert hub.commit["revision"] == "dev"
    assert hub.commit["create_pr"] is True
    assert hub.commit["commit_message"] == "Add masks"


def test_push_adds_tags_to_card(pruned, hub):
    model, _ = pruned

    model.push_to_hub("test-org/tiny-igp", model_card="---\ntags:\n- mine\n---\n# card\n", tags=["extra"])

    card = ModelCard((hub.repo_dir / "README.md").read_text())
    assert card.data.tags == ["mine", "extra"]


def test_push_rejects_bad_input(pruned, hub, tmp_path):
    model, base = pruned
    extra = tmp_path / "notes.txt"
    extra.write_text("notes")

    with pytest.raises(ValueError, match="config.json"):
        model.push_to_hub("test-org/tiny-igp", model_card="# card\n", extra_files={"config.json": str(extra)})
    with pytest.raises(FileNotFoundError, match="missing.png"):
        model.push_to_hub("test-org/tiny-igp", model_card="# card\n", extra_files={"a.png": str(tmp_path / "missing.png")})
    with pytest.raises(ValueError, match="outside|relative"):
        model.push_to_hub("test-org/tiny-igp", model_card="# card\n", extra_files={"../a.txt": str(extra)})
    with pytest.raises(ValueError, match="repo_id"):
        model.push_to_hub("", model_card="# card\n")
    with pytest.raises(ValueError, match="model_card"):
        model.push_to_hub("test-org/tiny-igp", model_card="  ")

    without_router = IGPruningForCausalLM.from_base(base, MASK_BANK, centroids=model.config.centroids)
    with pytest.raises(ValueError, match="no router"):
        without_router.push_to_hub("test-org/tiny-igp", model_card="# card\n")
    assert hub.calls["create_commit"] == []


# -- igp push and the pushed checkpoint -----------------------------------------------------------------------------


def test_igp_push_uploads_card_plots_and_run_record(pushed):
    paths = pushed.commit["paths"]
    expected = CHECKPOINT_FILES | remote_code_files() | {"igp_run.json", "mask_bank.png", "training_curves.png"}
    assert set(paths) == expected
    assert len(paths) == len(set(paths))
    assert pushed.calls["create_repo"][0]["private"] is True

    text = (pushed.repo_dir / "README.md").read_text()
    assert "## Mask bank" in text
    assert 'from_pretrained("test-org/tiny-igp", trust_remote_code=True)' in text
    links = relative_links(text)
    assert {"mask_bank.png", "training_curves.png", "igp_run.json"} <= links
    assert links <= set(paths)


def test_igp_push_keeps_reviewed_readme(run_dir, hub, tmp_path):
    folder = tmp_path / "reviewed"
    shutil.copytree(run_dir, folder, copy_function=os.symlink)
    assert igp_main(["card", str(folder), "--repo-id", "test-org/tiny-igp"]) == 0
    reviewed = (folder / "README.md").read_text() + "\nReviewed by hand.\n"
    (folder / "README.md").write_text(reviewed)

    status = igp_main(["push", str(folder), "--repo-id", "test-org/tiny-igp", "--keep-readme"])

    assert status == 0
    assert (hub.repo_dir / "README.md").read_text() == reviewed
    paths = set(hub.commit["paths"])
    assert {"mask_bank.png", "training_curves.png", "igp_run.json"} <= paths
    assert relative_links(reviewed) <= paths


# Runs in a fresh interpreter: imports of this project fail, as on a machine with only torch and transformers.
LOAD_SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import json
    import sys

    BLOCKED = ("modeling_igp", "igp_training", "igp_hub_cards", "sentence_transformers")

    class BlockProject(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, BlockProject())

    prompts, snippet = json.loads(sys.argv[1]), sys.argv[2]

    # The usage snippet of the model card, pointed at the pushed files, loads the model and tokenizer.
    namespace = {}
    exec(snippet, namespace)
    model, tokenizer = namespace["model"], namespace["tokenizer"]

    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    try:
        import modeling_igp
        project_importable = True
    except ImportError:
        project_importable = False
    print(json.dumps({
        "module": type(model).__module__,
        "project_importable": project_importable,
        "routes": model.route(prompts).tolist(),
        "tokens": output.tolist(),
    }))
    """
)


def test_pushed_files_generate_like_original(pushed, pruned, smollm2_tokenizer, tmp_path):
    model, _ = pruned
    smollm2_tokenizer.padding_side = "left"
    inputs = smollm2_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    expected_routes = model.route(PROMPTS).tolist()

    readme = (pushed.repo_dir / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme, re.DOTALL).group(1)
    assert snippet.count('"test-org/tiny-igp"') == 2
    snippet = snippet.replace('"test-org/tiny-igp"', repr(str(pushed.repo_dir)))

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    # One thread: on a busy machine, torch's thread pool makes these tiny matrix products many times slower.
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, json.dumps(PROMPTS), snippet],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])

    assert loaded["module"].startswith("transformers_modules")
    assert loaded["project_importable"] is False
    assert expected_routes == [0, 1, 2]
    assert loaded["routes"] == expected_routes
    assert loaded["tokens"] == expected.tolist()


# -- the model card ------------------------------------------------------------------------------------------------


def test_card_metadata_and_sections(light_dir):
    rendered = render_card(light_dir, repo_id="test-org/tiny-igp")
    path = light_dir / "README.md"
    path.write_text(rendered.text)

    card = ModelCard.load(path)
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.license == "apache-2.0"
    assert CARD_TAGS <= set(card.data.tags)
    assert card.data.datasets == ["openai/gsm8k", "openai/openai_humaneval"]

    text = card.text
    assert "trust_remote_code=True" in text
    assert "sentence-transformers/all-MiniLM-L6-v2" in text
    assert "## Evaluation" not in text
    assert "None" not in str(card)
    for header, rows in markdown_tables(text):
        assert rows, f"empty table: {header}"
    for target in relative_links(text):
        assert (light_dir / target).is_file(), target
    assert set(rendered.files) == {"igp_run.json", "mask_bank.png", "training_curves.png"}


def test_card_lists_skipped_layers(light_dir):
    text = render_card(light_dir).text

    rows = table_rows(text, "| Cluster | Main sources |")
    assert [row[0] for row in rows] == ["0", "1", "2"]
    assert [row[2] for row in rows] == ["70", "60", "62"]
    assert [row[3] for row in rows] == ["6 of 8", "6 of 8", "5 of 8"]
    # Layer i's attention is block 2i and its MLP block 2i+1.
    assert [row[4] for row in rows] == ["3", "0", "1"]
    assert [row[5] for row in rows] == ["1", "1", "1, 2"]


def test_card_sparsity_matches_independent_counts(pruned, light_dir, smollm2_tokenizer):
    _, base = pruned
    (light_dir / "igp_run.json").unlink()
    context_length = 24

    text = render_card(light_dir, context_length=context_length).text

    # Parameters per block from the base model's own modules; total from num_parameters.
    block_params = []
    for layer in base.model.layers:
        block_params.append(sum(p.numel() for m in (layer.input_layernorm, layer.self_attn) for p in m.parameters()))
        block_params.append(sum(p.numel() for m in (layer.post_attention_layernorm, layer.mlp) for p in m.parameters()))
    total_params = base.num_parameters()

    # FLOPs of one decoding step at `context_length`, measured by torch's FLOP counter (eager attention, so the
    # score and value products are plain matrix products).
    eager = tiny_base("llama", attn_implementation="eager", vocab_size=len(smollm2_tokenizer))
    input_ids = torch.randint(0, 1000, (1, context_length))
    with torch.no_grad():
        prefix = eager(input_ids[:, :-1], use_cache=True)
        with FlopCounterMode(display=False) as counter:
            eager(input_ids[:, -1:], cache=prefix.cache)
    counts = {name: sum(values.values()) for name, values in counter.get_flop_counts().items()}
    block_flops = []
    for layer in range(len(base.model.layers)):
        block_flops.append(counts[f"LlamaForCausalLM.model.layers.{layer}.self_attn"])
        block_flops.append(counts[f"LlamaForCausalLM.model.layers.{layer}.mlp"])
    total_flops = counts["Global"]

    assert f"context length of {context_length} tokens" in text
    rows = table_rows(text, "| Cluster | Blocks |")
    assert len(rows) == len(MASK_BANK)
    for row, mask in zip(rows, MASK_BANK):
        skipped = [block for block, keep in enumerate(mask) if not keep]
        expected = [
            len(skipped) / len(mask),
            sum(block_params[b] for b in skipped) / sum(block_params),
            sum(block_params[b] for b in skipped) / total_params,
            sum(block_flops[b] for b in skipped) / sum(block_flops),
            sum(block_flops[b] for b in skipped) / total_flops,
        ]
        shown = [float(cell.rstrip("%")) / 100 for cell in row[1:]]
        assert shown == pytest.approx(expected, abs=0.0006)

    # Block 3 is stored by no mask: the checkpoint holds the dense count minus its parameters.
    stored = total_params - block_params[3]
    assert f"holds {stored / 1e6:.2f}M of the dense model's {total_params / 1e6:.2f}M parameters" in text


def test_card_prefers_run_record_sparsity(light_dir):
    record = json.loads((light_dir / "igp_run.json").read_text())
    record["masks"]["sparsity"] = {
        "context_length": 512,
        "blocks": [0.25, 0.25, 0.375],
        "params": [0.111, 0.222, 0.333],
        "params_of_model": [0.01, 0.02, 0.03],
        "flops": [0.4, 0.5, 0.6],
        "flops_of_model": [0.04, 0.05, 0.06],
    }
    (light_dir / "igp_run.json").write_text(json.dumps(record))

    text = render_card(light_dir).text

    assert "context length of 512 tokens" in text
    rows = table_rows(text, "| Cluster | Blocks |")
    assert rows[2][1:] == ["37.5%", "33.3%", "3.0%", "60.0%", "6.0%"]
    # The last row averages the clusters, weighted by their 70, 60 and 62 calibration texts.
    assert rows[3][0] == "mean over the 192 calibration texts"
    assert rows[3][1] == f"{100 * (0.25 * 70 + 0.25 * 60 + 0.375 * 62) / 192:.1f}%"


def test_card_summarises_refinement(light_dir):
    # Cluster 2 took another cluster's mask in refinement, and clusters 0 and 1 kept theirs.
    record = json.loads((light_dir / "igp_run.json").read_text())
    initial = [list(mask) for mask in record["masks"]["mask_bank"]]
    initial[2] = initial[0]
    exchange = {"examples": 64, "own_loss": 3.2, "candidates": [{"cluster": 1, "loss": 3.1}], "took": 1}
    record["refinement"] = {"initial_mask_bank": initial, "wall_time_s": 125.0,
                            "clusters": [{"exchange": None}, {"exchange": None}, {"exchange": exchange}]}
    (light_dir / "igp_run.json").write_text(json.dumps(record))

    text = render_card(light_dir).text

    assert ("calibration loss in 2.1 min and changed 1 of 3 masks (1 taken from another cluster's refined mask)."
            in text)


def test_card_without_run_record(light_dir):
    for name in ("igp_run.json", "mask_bank.png", "training_curves.png"):
        (light_dir / name).unlink()

    rendered = render_card(light_dir, repo_id="test-org/bare")
    text = rendered.text

    card = ModelCard(text)
    assert card.data.library_name == "transformers"
    assert card.data.base_model is None
    assert card.data.license is None
    assert "None" not in text
    for header, rows in markdown_tables(text):
        assert rows, f"empty table: {header}"
    assert "## Training" not in text
    assert "## Calibration data" not in text
    assert "![" not in text
    assert "not recorded" in text
    assert rendered.files == {}


def test_card_compares_with_baselines(light_dir, tmp_path):
    # The layout `igp compare` writes: one row per evaluated model folder.
    compare_dir = tmp_path / "igp-compare"
    compare_dir.mkdir()
    comparison = {
        "models": [
            {"name": "dense", "path": "/elsewhere/dense", "method": "dense", "sparsity_blocks": 0.0,
             "perplexity": {"wikitext2": 27.5, "gsm8k": 4.125}, "accuracy": {"arc_easy": 0.4712, "piqa": 0.6},
             "mean_accuracy": 0.5356, "speed": {"batch_1": {"decode_tokens_per_s": 41.7}}},
            {"name": "shortgpt", "path": "/elsewhere/shortgpt", "method": "static", "sparsity_blocks": 0.25,
             "perplexity": {"wikitext2": 35.25}, "accuracy": {"arc_easy": 0.41}, "mean_accuracy": None,
             "speed": None},
            {"name": light_dir.name, "path": str(light_dir), "method": "igp-N3", "sparsity_blocks": 0.2917,
             "perplexity": {"wikitext2": 31.4159, "gsm8k": 5.0}, "accuracy": {"arc_easy": 0.4521, "piqa": 0.58},
             "mean_accuracy": 0.51605, "speed": {"batch_1": {"decode_tokens_per_s": 52.2}}},
        ],
        "main_metric": {"arc_easy": "acc_norm", "piqa": "acc_norm"},
    }
    (compare_dir / "compare.json").write_text(json.dumps(comparison))
    save_plot(compare_dir / "accuracy_vs_sparsity.png")

    rendered = render_card(light_dir, compare_path=compare_dir / "compare.json")

    text = rendered.text
    assert "## Evaluation" in text
    header = f"| Figure | **{light_dir.name} (igp-N3), this model** | dense | shortgpt (static) |"
    assert table_rows(text, header) == [
        ["Blocks skipped", "29.2%", "0.0%", "25.0%"],
        ["Perplexity, wikitext2", "31.42", "27.5", "35.25"],
        ["Perplexity, gsm8k", "5", "4.125", "–"],
        ["arc_easy (acc_norm), %", "45.2", "47.1", "41.0"],
        ["piqa (acc_norm), %", "58.0", "60.0", "–"],
        ["Mean accuracy, %", "51.6", "53.6", "–"],
        ["Decode tokens/s, batch 1", "52", "42", "–"],
    ]
    assert "None" not in text
    assert "![Accuracy vs sparsity](evaluation/accuracy_vs_sparsity.png)" in text
    assert rendered.files["evaluation/compare.json"] == str(compare_dir / "compare.json")
    assert rendered.files["evaluation/accuracy_vs_sparsity.png"] == str(compare_dir / "accuracy_vs_sparsity.png")


def test_card_shows_own_evaluation(light_dir):
    # The layout `igp eval` writes beside the model.
    result = {
        "model": str(light_dir),
        "perplexity": {"wikitext2": {"perplexity": 31.4159, "num_tokens": 2048, "clusters": {"0": 3}}},
        "zero_shot": {"arc_easy": {"acc": 0.5, "acc_norm": 0.4521, "acc_stderr": 0.01, "num_docs": 100}},
        "speed": None,
    }
    (light_dir / "igp_eval.json").write_text(json.dumps(result))

    rendered = render_card(light_dir)

    assert table_rows(rendered.text, "| Figure | Value |") == [
        ["Perplexity, wikitext2", "31.42"],
        ["arc_easy (acc), %", "50.0"],
        ["arc_easy (acc_norm), %", "45.2"],
    ]
    assert "None" not in rendered.text
    assert "[igp_eval.json](igp_eval.json)" in rendered.text
    assert rendered.files["igp_eval.json"] == str(light_dir / "igp_eval.json")


def test_card_rejects_invalid_folders(tmp_path, light_dir):
    with pytest.raises(FileNotFoundError, match="config.json"):
        render_card(tmp_path / "missing")

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not an IG-Pruning config"):
        render_card(plain)

    (light_dir / "igp_run.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        render_card(light_dir)


def test_igp_card_writes_readme(light_dir, capsys):
    status = igp_main(["card", str(light_dir), "--repo-id", "test-org/tiny-igp"])

    assert status == 0
    written = (light_dir / "README.md").read_text()
    assert written == render_card(light_dir, repo_id="test-org/tiny-igp").text
    assert capsys.readouterr().out.strip() == str(light_dir / "README.md")


def test_igp_card_and_push_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        igp_main(["card", str(tmp_path / "missing")])
    assert error.value.code == 2
    assert "no config.json" in capsys.readouterr().err

    with pytest.raises(SystemExit) as error:
        igp_main(["push", str(tmp_path / "missing"), "--repo-id", "test-org/x"])
    assert error.value.code == 2
    assert "no config.json" in capsys.readouterr().err

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as error:
        igp_main(["card", str(tmp_path), "--compare", str(tmp_path / "compare.json")])
    assert error.value.code == 2
    assert "compare.json" in capsys.readouterr().err

    with pytest.raises(SystemExit) as error:
        igp_main(["push", str(tmp_path), "--repo-id", "test-org/x", "--keep-readme"])
    assert error.value.code == 2
    assert "README.md" in capsys.readouterr().err


def test_igp_push_offline_exits_before_loading(run_dir, monkeypatch, capsys):
    # The autouse fixture sets HF_HUB_OFFLINE=1.
    monkeypatch.setattr(IGPruningForCausalLM, "from_pretrained", None)

    with pytest.raises(SystemExit) as error:
        igp_main(["push", str(run_dir), "--repo-id", "test-org/x"])

    assert error.value.code == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
