"""Configuration of an input-guided block-pruned causal language model."""

import math

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


# Architectures whose decoder layers expose `input_layernorm`, `self_attn`, `post_attention_layernorm` and `mlp`
# and whose model exposes `embed_tokens`, `rotary_emb` and `norm`: the structure the block loop relies on.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class IGPruningConfig(PreTrainedConfig):
    r"""
    Configuration of [`IGPruningForCausalLM`]: a decoder-only base model plus one block mask per input cluster.

    A base model with `L` decoder layers has `2 * L` blocks. Block `2 * i` is the attention sub-block of layer `i`
    (input norm, self-attention and residual add) and block `2 * i + 1` is its MLP sub-block (post-attention norm, MLP
    and residual add). A mask holds one 0/1 entry per block, 1 meaning the block runs.

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Configuration of the base causal language model. Its `model_type` must be one of `llama`, `mistral`,
            `qwen2` or `qwen3`.
        mask_bank (`list[list[int]]`, *optional*):
            One mask of `2 * L` integers in {0, 1} per cluster. Defaults to a single all-ones mask (the dense model).
        centroids (`list[list[float]]`, *optional*):
            One L2-normalised router embedding per cluster, in the order of `mask_bank`. Without centroids the model
            cannot route and each call must pass `block_mask` or `cluster_ids`.
        router_subfolder (`str`, *optional*, defaults to `"router"`):
            Folder of the checkpoint that holds the router encoder and its tokenizer.
        router_embedding_dim (`int`, *optional*):
            Width of the router encoder's embeddings. Set from the encoder when a router is attached; centroids must
            have this width.
        router_max_length (`int`, *optional*, defaults to 256):
            Maximum number of router tokens per prompt; longer prompts are truncated before embedding.
        router_name_or_path (`str`, *optional*):
            Where the router encoder came from, kept for the model card.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Whether the output projection shares the input embedding matrix. Taken from `text_config` when it ties.
    """

    model_type = "igp"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    mask_bank: list | None = None
    centroids: list | None = None
    router_subfolder: str = "router"
    router_embedding_dim: int | None = None
    router_max_length: int = 256
    router_name_or_path: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)

        if self.text_config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"Unsupported base architecture model_type={self.text_config.model_type!r}: IGPruningForCausalLM "
                f"supports {', '.join(SUPPORTED_MODEL_TYPES)}. Use a base model of one of these types."
            )
        if getattr(self.text_config, "is_encoder_decoder", False):
            raise ValueError("IGPruningForCausalLM needs a decoder-only base model, got an encoder-decoder config.")

        # A tied base model saves no lm_head weight, so the wrapper must tie too.
        if self.text_config.tie_word_embeddings:
            self.tie_word_embeddings = True

        if self.mask_bank is None:
            self.mask_bank = [[1] * self.num_blocks]
        self.mask_bank = validate_mask_bank(self.mask_bank, self.num_blocks)

        if self.centroids is not None:
            self.centroids = validate_centroids(self.centroids, len(self.mask_bank), self.router_embedding_dim)
            if self.router_embedding_dim is None:
                self.router_embedding_dim = len(self.centroids[0])

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load the config of a saved IGPruningForCausalLM; raise ValueError for any other model's config."""
        # transformers 5.25 only warns on a model_type mismatch and then fills text_config with its default, a 7B Llama,
        # so loading a plain base-model folder would allocate billions of parameters.
        config_dict, _ = cls.get_config_dict(pretrained_model_name_or_path, **dict(kwargs))
        model_type = config_dict.get("model_type")
        if model_type != cls.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} is not an IGPruningForCausalLM checkpoint: its config has "
                f"model_type={model_type!r}, expected {cls.model_type!r}. Prune a base model first (`igp prune "
                f"--model PATH` or IGPruningForCausalLM.from_base), or load it with AutoModelForCausalLM."
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_blocks(self) -> int:
        return 2 * self.text_config.num_hidden_layers

    @property
    def num_clusters(self) -> int:
        return len(self.mask_bank)

    def blocks_kept_by_bank(self) -> list[bool]:
        """Return, for each block, whether at least one mask of the bank runs it."""
        return [any(mask[block] for mask in self.mask_bank) for block in range(self.num_blocks)]


def validate_mask_bank(mask_bank, num_blocks: int) -> list[list[int]]:
    """Check a mask bank against the base model's block count and return it as lists of 0/1 integers."""
    if hasattr(mask_bank, "tolist"):
        mask_bank = mask_bank.tolist()
    if not isinstance(mask_bank, (list, tuple)) or len(mask_bank) == 0:
        raise ValueError(f"mask_bank must be a non-empty list of masks, got {mask_bank!r}.")

    checked = []
    for cluster, mask in enumerate(mask_bank):
        if hasattr(mask, "tolist"):
            mask = mask.tolist()
        if not isinstance(mask, (list, tuple)):
            raise ValueError(f"mask_bank[{cluster}] must be a list of {num_blocks} values in {{0, 1}}, got {mask!r}.")
        if len(mask) != num_blocks:
            raise ValueError(
                f"mask_bank[{cluster}] has {len(mask)} entries, but the base model has {num_blocks} blocks "
                f"(2 per decoder layer: attention, then MLP). Give one 0/1 entry per block."
            )
        invalid = [value for value in mask if value not in (0, 1) or isinstance(value, float) and not value.is_integer()]
        if invalid:
            raise ValueError(
                f"mask_bank[{cluster}] contains {invalid[0]!r}; mask entries must be 0 (skip) or 1 (run)."
            )
        mask = [int(value) for value in mask]
        if not any(mask):
            raise ValueError(
                f"mask_bank[{cluster}] skips all {num_blocks} blocks; every cluster must keep at least one block."
            )
        checked.append(mask)
    return checked


def validate_centroids(centroids, num_clusters: int, embedding_dim: int | None) -> list[list[float]]:
    """Check the router centroids (one finite row per cluster, of the router's width) and return them as lists."""
    if hasattr(centroids, "tolist"):
        centroids = centroids.tolist()
    if not isinstance(centroids, (list, tuple)) or len(centroids) != num_clusters:
        count = len(centroids) if isinstance(centroids, (list, tuple)) else type(centroids).__name__
        raise ValueError(
            f"centroids must have one row per mask of the bank: expected {num_clusters} rows, got {count}."
        )

    width = embedding_dim if embedding_dim is not None else len(centroids[0])
    if width < 1:
        raise ValueError(f"centroids must have width at least 1, got rows of width {width}.")
    checked = []
    for cluster, row in enumerate(centroids):
        try:
            row = [float(value) for value in row]
        except (TypeError, ValueError) as error:
            raise ValueError(f"centroids[{cluster}] must contain numbers: {error}.") from None
        if len(row) != width:
            raise ValueError(
                f"centroids[{cluster}] has width {len(row)}, but the router encoder embeds into {width} dimensions. "
                f"Compute the centroids with the same router encoder."
            )
        if not all(math.isfinite(value) for value in row):
            raise ValueError(f"centroids[{cluster}] contains NaN or infinite values; recompute the clustering.")
        checked.append(row)
    return checked


__all__ = ["IGPruningConfig", "SUPPORTED_MODEL_TYPES"]
