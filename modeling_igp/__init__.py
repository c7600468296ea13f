"""Input-guided block pruning for Hugging Face transformers: config, model, cache and router."""

from transformers import AutoConfig, AutoModelForCausalLM

from .cache_igp import IGPruningCache
from .configuration_igp import SUPPORTED_MODEL_TYPES, IGPruningConfig
from .modeling_igp import IGPruningForCausalLM, IGPruningPreTrainedModel
from .router_igp import IGPRouter


# Lets `AutoModelForCausalLM.from_pretrained(path)` work without `trust_remote_code` once this package is imported.
AutoConfig.register(IGPruningConfig.model_type, IGPruningConfig, exist_ok=True)
AutoModelForCausalLM.register(IGPruningConfig, IGPruningForCausalLM, exist_ok=True)

__all__ = [
    "IGPRouter",
    "IGPruningCache",
    "IGPruningConfig",
    "IGPruningForCausalLM",
    "IGPruningPreTrainedModel",
    "SUPPORTED_MODEL_TYPES",
]
