"""`push_to_hub` for IGPruningForCausalLM: the whole checkpoint and its own model card in one Hub commit."""

import os
import re
import tempfile

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, try_to_load_from_cache
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from transformers.utils import logging


logger = logging.get_logger(__name__)

CARD_TAGS = ["pruning", "depth-pruning", "dynamic-pruning", "custom_code"]

# Relative targets of Markdown links and images (`[text](target)`, `![alt](target)`) and of HTML `src`/`href`.
_LINK_PATTERN = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|(?:src|href)=[\"']([^\"']+)[\"']")


class IGPruningHubMixin:
    """
    Replaces the stock `push_to_hub`, which overwrites README.md with a generic card, by one that keeps ours.

    The model is saved with `save_pretrained` (config with `auto_map`, remote-code files, safetensors weights,
    tokenizer and `router/`), README.md is written from the given card, and everything is uploaded in a single commit.
    """

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: bool | str | None = None,
        commit_message: str | None = None,
        commit_description: str | None = None,
        model_card: str | ModelCard | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
        extra_files: dict | None = None,
    ):
        """
        Upload the model, its tokenizer, router and model card to the Hub in one commit.

        Args:
            repo_id (`str`): repository to create or update, as `"namespace/name"` or `"name"`.
            private (`bool`, *optional*): visibility of a repository that does not exist yet; ignored otherwise.
            token (`str` or `bool`, *optional*): Hub token. Defaults to `HF_TOKEN`, then the stored login.
            commit_message (`str`, *optional*): defaults to `"Upload IGPruningForCausalLM"`.
            commit_description (`str`, *optional*): longer description of the commit.
            model_card (`str` or `ModelCard`, *optional*): text of README.md. Without it, the README.md of the folder
                or Hub repository the model was loaded from is kept, else a short card is generated from the config.
            revision (`str`, *optional*): branch to commit to; it is created from the default branch if missing.
            create_pr (`bool`, *optional*, defaults to `False`): open a pull request instead of committing.
            max_shard_size (`int` or `str`, *optional*, defaults to `"50GB"`): passed to `save_pretrained`.
            tags (`list[str]`, *optional*): tags added to the card's metadata.
            extra_files (`dict`, *optional*): more files to upload, as `{path_in_repo: local_path}` (plots, run
                records). They must not replace a file that `save_pretrained` writes or README.md.

        Returns:
            `huggingface_hub.CommitInfo` of the commit (or of the pull request).

        The endpoint is `HF_ENDPOINT` when set. With `HF_HUB_OFFLINE` set, this raises `OfflineModeIsEnabled` before
        anything is saved or uploaded.
        """
        require_online()
        if not isinstance(repo_id, str) or not repo_id.strip("/ "):
            raise ValueError(f"repo_id must be a repository name such as 'my-org/my-model', got {repo_id!r}.")
        extra_files = _check_extra_files(extra_files)
        if self.config.centroids is not None and getattr(self, "router", None) is None:
            raise ValueError(
                "This model has centroids but no router attached, so the pushed checkpoint could not route or load. "
                "Attach the router encoder with model.attach_router(IGPRouter.from_pretrained(...)) first."
            )
        if getattr(self, "tokenizer", None) is None:
            logger.warning("No tokenizer is attached: the pushed model cannot route prompts in generate().")

        card_text, card_files = self._card_for_hub(model_card, repo_id)
        if tags:
            card_text = _add_tags(card_text, tags)
        api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)

        with tempfile.TemporaryDirectory() as work_dir:
            self.save_pretrained(work_dir, max_shard_size=max_shard_size)
            with open(os.path.join(work_dir, "README.md"), "w", encoding="utf-8") as handle:
                handle.write(card_text)

            files = _list_files(work_dir)
            for path_in_repo, local_path in extra_files.items():
                if path_in_repo in files:
                    raise ValueError(
                        f"extra_files[{path_in_repo!r}] would replace a file written by save_pretrained or the "
                        f"model card. Upload it under another name."
                    )
                files[path_in_repo] = local_path
            # Files that a kept README links to. A file the model saves itself, such as config.json, takes precedence.
            for path_in_repo, local_path in card_files.items():
                files.setdefault(path_in_repo, local_path)
            _warn_missing_links(card_text, files)

            operations = [
                CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=local_path)
                for path_in_repo, local_path in sorted(files.items())
            ]

            # Only once everything is on disk: a failed save leaves no empty repository behind.
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if revision is not None and not revision.startswith("refs/pr"):
                _create_branch(api, repo_id, revision, create_pr)

            logger.info(f"Uploading {len(operations)} files to {repo_id} in one commit")
            return api.create_commit(
                repo_id,
                operations,
                commit_message=commit_message or f"Upload {type(self).__name__}",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
                repo_type="model",
            )

    def _card_for_hub(self, model_card, repo_id: str) -> tuple[str, dict]:
        """Return the README.md text and the files it links to beside the README it came from."""
        if model_card is not None:
            if isinstance(model_card, ModelCard):
                return str(model_card), {}
            if not isinstance(model_card, str) or not model_card.strip():
                raise ValueError(
                    f"model_card must be the non-empty text of README.md or a ModelCard, got {type(model_card).__name__}."
                )
            return model_card, {}

        source_readme = self._source_readme()
        if source_readme is not None:
            with open(source_readme, encoding="utf-8") as handle:
                text = handle.read()
            logger.info(f"Keeping the model card {source_readme}")
            return text, _linked_local_files(text, os.path.dirname(source_readme))

        return config_card(self.config, repo_id), {}

    def _source_readme(self) -> str | None:
        """Return the README.md of the local folder or cached Hub repository the model was loaded from, if any."""
        source = getattr(self, "name_or_path", "") or ""
        if not source:
            return None
        if os.path.isdir(source):
            path = os.path.join(source, "README.md")
            return path if os.path.isfile(path) else None
        # A Hub id: look only in the local cache, so pushing never downloads the card it is about to replace.
        try:
            cached = try_to_load_from_cache(source, "README.md")
        except ValueError:  # not a valid repository id
            return None
        return cached if isinstance(cached, str) else None


def config_card(config, repo_id: str) -> str:
    """Write a short model card from an `IGPruningConfig` alone: metadata, mask bank summary and usage."""
    base_model = getattr(config.text_config, "_name_or_path", "") or ""
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=base_model if _looks_like_repo_id(base_model) else None,
        tags=list(CARD_TAGS),
    )

    num_blocks = config.num_blocks
    rows = []
    for cluster, mask in enumerate(config.mask_bank):
        skipped_attention = [str(block // 2) for block in range(0, num_blocks, 2) if not mask[block]]
        skipped_mlp = [str(block // 2) for block in range(1, num_blocks, 2) if not mask[block]]
        rows.append(
            f"| {cluster} | {sum(mask)} of {num_blocks} | {', '.join(skipped_attention) or 'none'} "
            f"| {', '.join(skipped_mlp) or 'none'} |"
        )

    if config.centroids is not None:
        routing = (
            "Each prompt is embedded by the router encoder saved in `router/` (mean pooling, L2 normalisation) and "
            "assigned to the nearest of the stored centroids; the model then runs that cluster's mask for the whole "
            "generation."
        )
        generate_line = "output = model.generate(**inputs, max_new_tokens=64)  # routes the prompt itself"
    else:
        routing = "This checkpoint has no centroids, so it does not route: pass `cluster_ids` or `block_mask`."
        generate_line = "output = model.generate(**inputs, cluster_ids=torch.tensor([0]), max_new_tokens=64)"

    base_line = f"`{base_model}`" if base_model else "its base model"
    lines = [
        "---",
        card_data.to_yaml(),
        "---",
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"Input-guided block pruning of {base_line} ({config.text_config.model_type} architecture, "
        f"{config.num_layers} layers, {num_blocks} blocks). Block `2*i` is the attention sub-block of layer `i` and "
        f"block `2*i+1` its MLP sub-block. The model holds {config.num_clusters} block masks, one per input cluster, "
        "and skips the blocks that its input's mask drops.",
        "",
        routing,
        "",
        "| Cluster | Blocks run | Attention skipped (layers) | MLP skipped (layers) |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
        "## Usage",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)',
        'inputs = tokenizer(["Write a haiku about the sea."], return_tensors="pt")',
        generate_line,
        "print(tokenizer.decode(output[0], skip_special_tokens=True))",
        "```",
        "",
        "Only the dynamic cache is supported; flash attention, static, quantized and offloaded caches are not.",
        "",
    ]
    return "\n".join(lines)


def require_online() -> None:
    """Raise `OfflineModeIsEnabled` if `HF_HUB_OFFLINE` is set, now or when huggingface_hub was imported."""
    # The constant is read when huggingface_hub is imported; the environment may have changed since.
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    if offline or hub_constants.HF_HUB_OFFLINE:
        raise OfflineModeIsEnabled(
            "Cannot push to the Hub while HF_HUB_OFFLINE is set. Unset HF_HUB_OFFLINE, or save the model locally "
            "with save_pretrained."
        )


def _check_extra_files(extra_files) -> dict:
    if extra_files is None:
        return {}
    if not isinstance(extra_files, dict):
        raise ValueError(f"extra_files must be a dict of {{path_in_repo: local_path}}, got {type(extra_files).__name__}.")
    checked = {}
    for path_in_repo, local_path in extra_files.items():
        path_in_repo = str(path_in_repo).replace(os.sep, "/")
        if not path_in_repo or path_in_repo.startswith("/") or ".." in path_in_repo.split("/"):
            raise ValueError(f"extra_files key {path_in_repo!r} must be a relative path inside the repository.")
        if not os.path.isfile(local_path):
            raise FileNotFoundError(f"extra_files[{path_in_repo!r}] = {str(local_path)!r} is not a file.")
        checked[path_in_repo] = str(local_path)
    return checked


def _list_files(folder: str) -> dict:
    """Map every file under `folder` to its path in the repository (always with `/` separators)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            local_path = os.path.join(root, name)
            files[os.path.relpath(local_path, folder).replace(os.sep, "/")] = local_path
    return files


def relative_links(card_text: str) -> list[str]:
    """Return the repository-relative link and image targets of a card (URLs and anchors left out)."""
    targets = []
    for match in _LINK_PATTERN.finditer(card_text):
        target = (match.group(1) or match.group(2)).split("#")[0].split("?")[0]
        if not target or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("/"):
            continue
        target = target[2:] if target.startswith("./") else target
        if target not in targets:
            targets.append(target)
    return targets


def _linked_local_files(card_text: str, folder: str) -> dict:
    linked = {}
    for target in relative_links(card_text):
        local_path = os.path.join(folder, target)
        if ".." not in target.split("/") and os.path.isfile(local_path) and target != "README.md":
            linked[target] = local_path
    return linked


def _warn_missing_links(card_text: str, files: dict) -> None:
    missing = [target for target in relative_links(card_text) if target not in files]
    if missing:
        logger.warning(f"The model card links to {missing}, which this commit does not upload. Pass them in extra_files.")


def _add_tags(card_text: str, tags: list[str]) -> str:
    card = ModelCard(card_text)
    card.data.tags = list(dict.fromkeys((card.data.tags or []) + list(tags)))
    return str(card)


def _create_branch(api: HfApi, repo_id: str, revision: str, create_pr: bool) -> None:
    try:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    except HfHubHTTPError as error:
        # A pull request on a repository we cannot write to needs a branch that exists already. If it does not,
        # create_commit raises a clear error.
        if not (create_pr and error.response is not None and error.response.status_code == 403):
            raise


def _looks_like_repo_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not os.path.exists(name)


__all__ = ["IGPruningHubMixin", "config_card", "relative_links", "require_online"]
