"""IGPruningForCausalLM: a causal language model that skips attention and MLP blocks per input."""

import copy
import os
import re

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, GenerationMixin, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg

from .cache_igp import IGPruningCache
from .configuration_igp import SUPPORTED_MODEL_TYPES, IGPruningConfig, validate_centroids, validate_mask_bank
from .hub_igp import IGPruningHubMixin
from .router_igp import IGPRouter


logger = logging.get_logger(__name__)

# Sub-modules of a decoder layer that make up each block. A block kept by no mask of the bank has them removed.
ATTENTION_BLOCK_MODULES = ("input_layernorm", "self_attn")
MLP_BLOCK_MODULES = ("post_attention_layernorm", "mlp")

SUPPORTED_CACHE_IMPLEMENTATIONS = (None, "dynamic")


class IGPruningPreTrainedModel(PreTrainedModel):
    config: IGPruningConfig
    config_class = IGPruningConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False

    def _init_weights(self, module):
        # The base architecture defines how its own modules are initialised (RMSNorm weights to one, and so on).
        if isinstance(getattr(self, "model", None), PreTrainedModel):
            self.model._init_weights(module)
        else:
            super()._init_weights(module)


class IGPruningForCausalLM(IGPruningHubMixin, IGPruningPreTrainedModel, GenerationMixin):
    """
    Causal language model that runs, for each batch row, only the blocks its mask keeps.

    The base model's modules are reused as they are (`model.embed_tokens`, `model.layers[i].self_attn`, ...), so the
    state dict has the base checkpoint's key names. Blocks that no mask of the bank keeps are removed from the module
    tree: they are neither saved nor loaded.

    Each forward resolves one boolean mask per row (from `block_mask`, `cluster_ids`, or the router), then walks the
    blocks in order. For each block it gathers the rows that run it, calls the block on those rows only, and adds
    the block's output to their residual stream. A block that no row runs is not called.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: IGPruningConfig):
        super().__init__(config)
        self.model = AutoModel.from_config(config.text_config)
        self.vocab_size = config.text_config.vocab_size
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        _check_block_structure(self.model, config.text_config.model_type)
        _remove_unused_blocks(self.model, config.blocks_kept_by_bank())

        # Plain attributes, not sub-modules: the router and tokenizer are saved in their own files.
        self.router: IGPRouter | None = None
        self.tokenizer = None

        self.post_init()

    # -- construction ---------------------------------------------------------------------------------------------

    @classmethod
    def from_base(cls, base_model, mask_bank, centroids=None, router=None, tokenizer=None) -> "IGPruningForCausalLM":
        """
        Wrap a loaded causal LM with a mask bank, sharing its weights (nothing is copied).

        Args:
            base_model: a `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM` or `Qwen3ForCausalLM`.
            mask_bank: N masks of `2 * num_hidden_layers` values in {0, 1} (list, array or tensor).
            centroids: N router embeddings (N x d), or None for a model that is always given masks or cluster ids.
            router: an `IGPRouter`, needed to route prompts by text.
            tokenizer: the base model's tokenizer, needed to route token ids (`generate` without masks).
        """
        model_type = getattr(getattr(base_model, "config", None), "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"Unsupported base architecture model_type={model_type!r} ({type(base_model).__name__}): "
                f"IGPruningForCausalLM supports {', '.join(SUPPORTED_MODEL_TYPES)}. "
                "Use a base model of one of these types."
            )
        if not hasattr(base_model, "model") or not hasattr(base_model, "lm_head"):
            raise ValueError(
                f"from_base expects a causal LM with `.model` and `.lm_head` (such as LlamaForCausalLM), "
                f"got {type(base_model).__name__}."
            )
        text_config = copy.deepcopy(base_model.config)
        attn_implementation = base_model.config._attn_implementation

        config = IGPruningConfig(
            text_config=text_config,
            mask_bank=_to_list(mask_bank),
            centroids=_to_list(centroids),
            router_embedding_dim=router.embedding_dim if router is not None else None,
            router_max_length=router.max_length if router is not None else 256,
            router_name_or_path=getattr(router.encoder, "name_or_path", None) if router is not None else None,
        )
        config._attn_implementation = attn_implementation
        config.text_config._attn_implementation = attn_implementation

        # Build the skeleton on the meta device, then point it at the base model's modules.
        with torch.device("meta"):
            model = cls(config)
        _share_modules(model, base_model)
        model.config.dtype = base_model.dtype
        model.generation_config = copy.deepcopy(base_model.generation_config)
        model.attach_router(router)
        model.tokenizer = tokenizer
        return model

    def attach_router(self, router: IGPRouter | None) -> None:
        """Use `router` to route prompts; its embedding width must match the centroids."""
        if router is not None and self.config.centroids is not None:
            width = len(self.config.centroids[0])
            if router.embedding_dim != width:
                raise ValueError(
                    f"The router encoder embeds into {router.embedding_dim} dimensions but the centroids have width "
                    f"{width}. Use the encoder the centroids were computed with."
                )
            self.config.router_embedding_dim = router.embedding_dim
        self.router = router

    def set_mask_bank(self, mask_bank, centroids=None) -> None:
        """Replace the mask bank (and centroids); every block the new bank runs must still have its weights."""
        mask_bank = validate_mask_bank(_to_list(mask_bank), self.config.num_blocks)
        missing = self._missing_blocks(torch.tensor(mask_bank, dtype=torch.bool))
        if missing:
            raise ValueError(
                f"The new mask bank runs blocks {missing}, whose weights are not in this model. Rebuild it with "
                "IGPruningForCausalLM.from_base on the full base model."
            )
        if centroids is not None:
            centroids = validate_centroids(_to_list(centroids), len(mask_bank), self.config.router_embedding_dim)
        self.config.mask_bank = mask_bank
        self.config.centroids = centroids

    # -- save and load --------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save config, weights and remote code, plus the router under `router/` and the tokenizer if attached."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.router is not None:
            self.router.save_pretrained(os.path.join(save_directory, self.config.router_subfolder))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, load_router: bool = True, **kwargs):
        """Load the model, then its tokenizer and (unless `load_router=False`) its router from the same place."""
        return_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
        )
        _check_block_weights_loaded(loading_info["missing_keys"], pretrained_model_name_or_path)
        hub_kwargs = {
            key: kwargs[key] for key in ("revision", "token", "cache_dir", "local_files_only") if key in kwargs
        }
        path = str(pretrained_model_name_or_path)

        try:
            # The tokenizer files name their own class; remote code is never needed for them.
            model.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, **hub_kwargs)
        except (OSError, ValueError) as error:
            logger.warning(f"No tokenizer found at {path} ({error}); generate() without block masks cannot route.")

        if load_router and model.config.centroids is not None:
            subfolder = model.config.router_subfolder
            try:
                router = IGPRouter.from_pretrained(
                    os.path.join(path, subfolder) if os.path.isdir(path) else path,
                    max_length=model.config.router_max_length,
                    **({} if os.path.isdir(path) else {"subfolder": subfolder}),
                    **hub_kwargs,
                )
            except OSError as error:
                raise OSError(
                    f"The router encoder folder '{subfolder}/' is missing or incomplete in {path} ({error}). "
                    f"Copy the router folder saved with this model back in place, or pass load_router=False to load "
                    f"without routing (every call then needs block_mask or cluster_ids)."
                ) from error
            model.attach_router(router.to(model.device) if model.device.type != "meta" else router)
        return (model, loading_info) if return_loading_info else model

    # -- routing --------------------------------------------------------------------------------------------------

    def route(self, texts: list[str]) -> torch.LongTensor:
        """Return the cluster id of each text: the nearest centroid of its router embedding."""
        if self.router is None or self.config.centroids is None:
            raise ValueError(
                "This model has no router or no centroids, so it cannot route prompts. Pass block_mask or "
                "cluster_ids, or build it with IGPruningForCausalLM.from_base(..., centroids=..., router=...)."
            )
        return self.router.route(texts, torch.tensor(self.config.centroids))

    def route_token_ids(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None):
        """Route each row of `input_ids` on its text, decoded with the model's tokenizer without special tokens."""
        if self.tokenizer is None:
            raise ValueError(
                "Routing token ids needs the tokenizer saved beside the model, and none is attached. Set "
                "model.tokenizer, or pass block_mask or cluster_ids."
            )
        rows = input_ids.cpu()
        keep = attention_mask.cpu().bool() if attention_mask is not None else torch.ones_like(rows, dtype=torch.bool)
        texts = [self.tokenizer.decode(row[row_keep], skip_special_tokens=True) for row, row_keep in zip(rows, keep)]
        return self.route(texts)

    # -- forward --------------------------------------------------------------------------------------------------

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: IGPruningCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        block_mask: torch.Tensor | None = None,
        cluster_ids: torch.LongTensor | None = None,
        block_gates: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        block_mask (`torch.BoolTensor` of shape `(batch_size, 2 * num_hidden_layers)`, *optional*):
            Blocks each row runs (`True`) or skips (`False`).
        cluster_ids (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Cluster of each row; its mask is taken from `config.mask_bank`.
        block_gates (`torch.FloatTensor` of shape `(batch_size, 2 * num_hidden_layers)`, *optional*):
            Soft gates for mask learning: block `k` adds `block_gates[:, k] * block(hidden)` to the residual stream.
            Rows whose gate is exactly zero skip the block. Gradients flow into the gates.

        With none of the three, each row is routed on its decoded text.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        batch_size, query_length = inputs_embeds.shape[:2]

        keep, gates = self._resolve_blocks(input_ids, attention_mask, block_mask, cluster_ids, block_gates, batch_size)
        block_rows = _rows_per_block(keep, inputs_embeds.device)

        use_cache = use_cache if use_cache is not None else self.config.text_config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = IGPruningCache(self.config.num_layers)
        if cache is not None and not hasattr(cache, "bind_rows"):
            raise ValueError(_unsupported_cache_message(type(cache).__name__))
        past_length = cache.get_seq_length() if cache is not None else 0

        if position_ids is None:
            position_ids = torch.arange(query_length, device=inputs_embeds.device).unsqueeze(0) + past_length
        attention_masks = self._attention_masks(inputs_embeds, attention_mask, cache, position_ids)

        hidden_states = inputs_embeds  # [batch, query, hidden]
        position_embeddings = self.model.rotary_emb(hidden_states, position_ids=position_ids)  # 2 x [b|1, q, head]
        all_hidden_states = (hidden_states,) if output_hidden_states else None

        for layer_idx, layer in enumerate(self.model.layers):
            attention_block, mlp_block = 2 * layer_idx, 2 * layer_idx + 1

            rows = block_rows[attention_block]
            if cache is not None:
                if rows is _SKIP:
                    cache.check_unbound_layer(layer_idx)
                else:
                    cache.bind_rows(layer_idx, rows, batch_size)
            if rows is not _SKIP:
                layer_mask = attention_masks[_layer_type(self.config.text_config, layer_idx)]
                hidden_states = self._run_block(
                    _attention_update,
                    hidden_states,
                    rows,
                    gates[:, attention_block] if gates is not None else None,
                    layer,
                    position_embeddings,
                    layer_mask,
                    cache,
                )

            rows = block_rows[mlp_block]
            if rows is not _SKIP:
                hidden_states = self._run_block(
                    _mlp_update, hidden_states, rows, gates[:, mlp_block] if gates is not None else None, layer
                )

            if output_hidden_states:
                all_hidden_states += (hidden_states,)

        if cache is not None:
            cache.advance(query_length)

        hidden_states = self.model.norm(hidden_states)
        if output_hidden_states:
            # As in the transformers decoders, the last entry is the output of the final norm.
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)

        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=cache if use_cache else None,
            hidden_states=all_hidden_states,
        )

    def _run_block(self, update_fn, hidden_states, rows, gate, layer, *args):
        """Add `update_fn`'s residual update to the rows that run the block (`rows` None: every row)."""
        if rows is not None:
            sub_states = hidden_states.index_select(0, rows)
            args = tuple(_select_rows(arg, rows, hidden_states.shape[0]) for arg in args)
        else:
            sub_states = hidden_states

        if self.gradient_checkpointing and self.training:
            update = self._gradient_checkpointing_func(update_fn, layer, sub_states, *args)
        else:
            update = update_fn(layer, sub_states, *args)

        if gate is not None:
            row_gate = gate if rows is None else gate.index_select(0, rows)
            update = update * row_gate.to(update.dtype).view(-1, 1, 1)

        if rows is None:
            return hidden_states + update
        return hidden_states.index_add(0, rows, update)

    def _resolve_blocks(self, input_ids, attention_mask, block_mask, cluster_ids, block_gates, batch_size):
        """Return the [batch, 2L] boolean keep mask on the CPU, and the gates (or None)."""
        given = [name for name, value in (("block_mask", block_mask), ("cluster_ids", cluster_ids),
                                          ("block_gates", block_gates)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"Pass at most one of block_mask, cluster_ids and block_gates, got {', '.join(given)}.")

        num_blocks = self.config.num_blocks
        gates = None
        if block_gates is not None:
            _check_row_shape("block_gates", block_gates, batch_size, num_blocks)
            gates = block_gates
            keep = block_gates.detach().cpu() != 0
        elif block_mask is not None:
            _check_row_shape("block_mask", block_mask, batch_size, num_blocks)
            keep = block_mask.cpu()
            if keep.dtype != torch.bool:
                if not bool(((keep == 0) | (keep == 1)).all()):
                    raise ValueError("block_mask must be boolean, or contain only 0 and 1.")
                keep = keep.bool()
        else:
            if cluster_ids is None:
                if input_ids is None:
                    raise ValueError("Routing needs input_ids; pass block_mask or cluster_ids with inputs_embeds.")
                cluster_ids = self.route_token_ids(input_ids, attention_mask)
            keep = self._cluster_masks(cluster_ids, batch_size)

        missing = self._missing_blocks(keep)
        if missing:
            raise ValueError(
                f"The requested masks run blocks {missing}, but no mask of the bank keeps them, so their weights "
                "were not loaded. Use masks from config.mask_bank, or rebuild the model with a bank that keeps them."
            )
        return keep, gates

    def _cluster_masks(self, cluster_ids, batch_size):
        cluster_ids = torch.as_tensor(cluster_ids).cpu()
        if cluster_ids.is_floating_point() or cluster_ids.is_complex() or cluster_ids.dtype == torch.bool:
            # Casting would truncate 0.7 to cluster 0 without a word.
            raise ValueError(
                f"cluster_ids must contain integer cluster ids (a LongTensor), got dtype {cluster_ids.dtype}."
            )
        cluster_ids = cluster_ids.long().flatten()
        if cluster_ids.numel() != batch_size:
            raise ValueError(f"cluster_ids has {cluster_ids.numel()} entries for a batch of {batch_size} rows.")
        num_clusters = self.config.num_clusters
        invalid = cluster_ids[(cluster_ids < 0) | (cluster_ids >= num_clusters)]
        if invalid.numel():
            raise ValueError(
                f"cluster_ids contains {invalid[0].item()}, but the mask bank has clusters 0 to {num_clusters - 1}."
            )
        return torch.tensor(self.config.mask_bank, dtype=torch.bool)[cluster_ids]

    def _missing_blocks(self, keep: torch.Tensor) -> list[int]:
        # Read the module tree, not the bank: after `set_mask_bank` the weights of the first bank are still present.
        available = torch.tensor(
            [getattr(layer, name) is not None for layer in self.model.layers for name in ("self_attn", "mlp")],
            dtype=torch.bool,
        )
        return (keep.any(dim=0) & ~available).nonzero().flatten().tolist()

    def _attention_masks(self, inputs_embeds, attention_mask, cache, position_ids) -> dict:
        """Build one 4D mask per attention type, sized by the cache's token counter."""
        text_config = self.config.text_config
        mask_kwargs = {
            "config": text_config,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "cache": cache,
            "position_ids": position_ids,
        }
        layer_types = {_layer_type(text_config, index) for index in range(self.config.num_layers)}
        masks = {}
        if "full_attention" in layer_types:
            masks["full_attention"] = create_causal_mask(**mask_kwargs)
        if "sliding_attention" in layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        return masks

    # -- generation -----------------------------------------------------------------------------------------------

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """
        `GenerationMixin.generate`, with each row's mask fixed for the whole generation.

        Without `block_mask` or `cluster_ids`, each prompt is routed once on its full text. Only the dynamic cache is
        supported; static, quantized and offloaded caches and early-exit assisted decoding raise a `ValueError`.
        """
        config = generation_config if generation_config is not None else self.generation_config
        cache_implementation = kwargs.get("cache_implementation", config.cache_implementation)
        if cache_implementation not in SUPPORTED_CACHE_IMPLEMENTATIONS:
            raise ValueError(_unsupported_cache_message(f"cache_implementation={cache_implementation!r}"))
        if kwargs.get("assistant_early_exit", config.assistant_early_exit) is not None:
            raise ValueError(
                "Early-exit assisted decoding is not supported: it reads hidden states from a layer that the block "
                "mask may skip. Remove assistant_early_exit."
            )
        user_cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if user_cache is not None and not hasattr(user_cache, "bind_rows"):
            raise ValueError(_unsupported_cache_message(type(user_cache).__name__))

        if kwargs.get("block_mask") is None and kwargs.get("cluster_ids") is None:
            input_ids = inputs if inputs is not None else kwargs.get("input_ids")
            if input_ids is None:
                raise ValueError("generate() needs input_ids to route, or an explicit block_mask or cluster_ids.")
            cluster_ids = self.route_token_ids(input_ids, kwargs.get("attention_mask"))
            kwargs["block_mask"] = self._cluster_masks(cluster_ids, input_ids.shape[0]).to(input_ids.device)
        return super().generate(inputs, generation_config, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            model_kwargs["cache"] = IGPruningCache(self.config.num_layers)
            # IGPruningCache is the dynamic cache of this model. transformers rejects a cache object together with any
            # cache_implementation, so clear "dynamic" on generate's per-call copy of the config.
            if generation_config.cache_implementation == "dynamic":
                generation_config.cache_implementation = None
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)


# -- block updates: the residual branch of one sub-block, without the residual add --------------------------------


def _attention_update(layer, hidden_states, position_embeddings, attention_mask, cache):
    normed = layer.input_layernorm(hidden_states)
    attention_output, _ = layer.self_attn(
        hidden_states=normed,
        position_embeddings=position_embeddings,
        attention_mask=attention_mask,
        cache=cache,
    )
    return attention_output


def _mlp_update(layer, hidden_states):
    return layer.mlp(layer.post_attention_layernorm(hidden_states))


# -- helpers ---------------------------------------------------------------------------------------------------------

# Marks a block that no row runs.
_SKIP = object()


def _rows_per_block(keep: torch.Tensor, device) -> list:
    """For each block: None if every row runs it, `_SKIP` if none does, else the LongTensor of rows that do."""
    batch_size = keep.shape[0]
    counts = keep.sum(dim=0).tolist()
    plan = []
    for block, count in enumerate(counts):
        if count == batch_size:
            plan.append(None)
        elif count == 0:
            plan.append(_SKIP)
        else:
            plan.append(keep[:, block].nonzero().flatten().to(device))
    return plan


def _select_rows(value, rows, batch_size):
    """Select batch rows of tensors that have a batch dimension; pass the rest (None, broadcast tensors) through."""
    if isinstance(value, tuple):
        return tuple(_select_rows(item, rows, batch_size) for item in value)
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size and batch_size > 1:
        return value.index_select(0, rows)
    return value


def _layer_type(text_config, layer_idx: int) -> str:
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None:
        return layer_types[layer_idx]
    return "sliding_attention" if getattr(text_config, "sliding_window", None) else "full_attention"


def _check_row_shape(name, tensor, batch_size, num_blocks):
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != (batch_size, num_blocks):
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(
            f"{name} must be a tensor of shape (batch_size, 2 * num_hidden_layers) = ({batch_size}, {num_blocks}), "
            f"got {shape}."
        )


def _check_block_structure(model, model_type):
    required = ("embed_tokens", "layers", "norm", "rotary_emb")
    missing = [name for name in required if not hasattr(model, name)]
    layer = model.layers[0] if hasattr(model, "layers") and len(model.layers) else None
    missing += [name for name in ATTENTION_BLOCK_MODULES + MLP_BLOCK_MODULES if layer is not None and not hasattr(layer, name)]
    if missing:
        raise ValueError(f"Base architecture {model_type!r} lacks {missing}, which the block loop needs.")


def _remove_unused_blocks(model, kept_by_bank: list[bool]) -> None:
    for layer_idx, layer in enumerate(model.layers):
        if not kept_by_bank[2 * layer_idx]:
            for name in ATTENTION_BLOCK_MODULES:
                setattr(layer, name, None)
        if not kept_by_bank[2 * layer_idx + 1]:
            for name in MLP_BLOCK_MODULES:
                setattr(layer, name, None)


def _check_block_weights_loaded(missing_keys, path) -> None:
    """Raise a ValueError if the checkpoint is missing the weights of a block that the configured mask bank runs.

    A checkpoint stores only the blocks its bank runs. Without this check, a config.json edited later to run another
    block would load that block with random initial weights, and transformers would only log a warning.
    """
    modules = {name: 0 for name in ATTENTION_BLOCK_MODULES} | {name: 1 for name in MLP_BLOCK_MODULES}
    blocks = set()
    for key in missing_keys:
        match = re.search(r"(?:^|\.)layers\.(\d+)\.([^.]+)\.", key)
        if match and match.group(2) in modules:
            blocks.add(2 * int(match.group(1)) + modules[match.group(2)])
    if blocks:
        raise ValueError(
            f"{path} is missing the weights of blocks {sorted(blocks)}, which config.mask_bank runs, because the "
            "checkpoint was saved with a bank that skipped them in every mask. Restore the config.json saved with "
            "these weights, or build the model again from its base model with "
            "IGPruningForCausalLM.from_base(base_model, mask_bank)."
        )


def _share_modules(model, base_model) -> None:
    """Point `model` at the base model's modules, except the blocks it removed."""
    ours, theirs = model.model, base_model.model
    ours.embed_tokens = theirs.embed_tokens
    ours.norm = theirs.norm
    ours.rotary_emb = theirs.rotary_emb
    for our_layer, their_layer in zip(ours.layers, theirs.layers):
        for name in ATTENTION_BLOCK_MODULES + MLP_BLOCK_MODULES:
            if getattr(our_layer, name) is not None:
                setattr(our_layer, name, getattr(their_layer, name))
    model.lm_head = base_model.lm_head

    on_meta = [name for name, tensor in list(model.named_parameters()) + list(model.named_buffers()) if tensor.is_meta]
    if on_meta:
        raise ValueError(f"from_base could not find base weights for {on_meta[:3]}; is the base model fully loaded?")


def _to_list(value):
    if value is None:
        return None
    return value.tolist() if hasattr(value, "tolist") else value


def _unsupported_cache_message(what: str) -> str:
    return (
        f"IGPruningForCausalLM does not support the cache {what}: skipped attention layers store no keys and values, "
        "which only IGPruningCache (the default dynamic cache of generate) tracks. Remove cache_implementation, or "
        "pass IGPruningCache(model.config.num_layers)."
    )


IGPruningConfig.register_for_auto_class()
IGPruningForCausalLM.register_for_auto_class("AutoModelForCausalLM")


__all__ = ["IGPruningForCausalLM", "IGPruningPreTrainedModel"]
