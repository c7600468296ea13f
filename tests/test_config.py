"""IGPruningConfig: the base config as a sub-config, mask bank and centroid validation, JSON round trip."""

import json
import math

import pytest
import torch
from transformers import AutoConfig, GPT2Config, PhiConfig

from conftest import ARCHITECTURES, tiny_base, tiny_config
from modeling_igp import IGPruningConfig, IGPruningForCausalLM


def make_config(arch="llama", **kwargs):
    return IGPruningConfig(text_config=tiny_config(arch), **kwargs)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_config_round_trip_through_json(arch, tmp_path):
    bank = [[1] * 8, [0, 1, 1, 0, 1, 1, 1, 1]]
    centroids = [[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]]
    config = make_config(arch, mask_bank=bank, centroids=centroids, router_max_length=128)
    config.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "config.json").read_text())
    loaded = AutoConfig.from_pretrained(tmp_path)

    assert saved["model_type"] == "igp"
    assert saved["text_config"]["model_type"] == tiny_config(arch).model_type
    assert loaded.model_type == "igp"
    assert loaded.mask_bank == bank
    assert loaded.centroids == centroids
    assert loaded.router_embedding_dim == 3
    assert loaded.router_max_length == 128
    assert loaded.text_config.to_dict() == config.text_config.to_dict()
    assert getattr(loaded.text_config, "sliding_window", None) == getattr(tiny_config(arch), "sliding_window", None)


def test_config_derived_sizes():
    config = make_config(mask_bank=[[1, 1, 0, 1, 1, 1, 1, 0], [0, 1, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 1, 1, 0]])

    assert config.num_layers == 4
    assert config.num_blocks == 8
    assert config.num_clusters == 3
    assert config.blocks_kept_by_bank() == [True, True, True, True, True, True, True, False]


def test_config_defaults_to_dense_bank():
    config = make_config()
    assert config.mask_bank == [[1] * 8]
    assert config.centroids is None


def test_config_accepts_tensors_and_booleans():
    bank = torch.tensor([[True] * 8, [False, True] * 4])
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    config = make_config(mask_bank=bank, centroids=centroids)

    assert config.mask_bank == [[1] * 8, [0, 1] * 4]
    assert all(isinstance(value, int) for mask in config.mask_bank for value in mask)
    assert config.centroids == [[1.0, 0.0], [0.0, 1.0]]


def test_config_ties_embeddings_like_its_base():
    assert make_config("qwen2").tie_word_embeddings is True
    assert make_config("llama").tie_word_embeddings is False


# -- invalid mask banks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bank, shown",
    [
        ([[1] * 7], r"mask_bank\[0\] has 7 entries.*8 blocks"),
        ([[1] * 8, [1] * 9], r"mask_bank\[1\] has 9 entries.*8 blocks"),
        ([[1] * 7 + [2]], r"mask_bank\[0\] contains 2\b"),
        ([[1] * 7 + [0.5]], r"mask_bank\[0\] contains 0\.5"),
        ([[1] * 7 + [-1]], r"mask_bank\[0\] contains -1"),
        ([[1] * 7 + [math.nan]], r"mask_bank\[0\] contains nan"),
        ([[1] * 7 + ["1"]], r"mask_bank\[0\] contains '1'"),
        ([], r"non-empty.*\[\]"),
        ([[1] * 8, [0] * 8], r"mask_bank\[1\] skips all 8 blocks"),
        ([1] * 8, r"mask_bank\[0\] must be a list"),
    ],
)
def test_invalid_mask_bank_raises(bank, shown):
    with pytest.raises(ValueError, match=shown):
        make_config(mask_bank=bank)
    with pytest.raises(ValueError, match=shown):
        IGPruningForCausalLM.from_base(tiny_base("llama"), bank)


# -- invalid centroids ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "centroids, kwargs, shown",
    [
        ([[1.0, 0.0]] * 2, {"router_embedding_dim": 384}, r"width 2.*384"),
        ([[1.0, 0.0], [1.0, 0.0, 0.0]], {}, r"centroids\[1\] has width 3.*2"),
        ([[1.0, math.nan], [1.0, 0.0]], {}, r"centroids\[0\] contains NaN or infinite"),
        ([[1.0, 0.0], [math.inf, 0.0]], {}, r"centroids\[1\] contains NaN or infinite"),
        ([[1.0, 0.0], [-math.inf, 0.0]], {}, r"centroids\[1\] contains NaN or infinite"),
        ([[1.0, 0.0]], {}, r"expected 2 rows, got 1"),
        ([[1.0, 0.0], ["a", 0.0]], {}, r"centroids\[1\] must contain numbers"),
        ([[], []], {}, r"width 0"),
    ],
)
def test_invalid_centroids_raise(centroids, kwargs, shown):
    with pytest.raises(ValueError, match=shown):
        make_config(mask_bank=[[1] * 8, [0, 1] * 4], centroids=centroids, **kwargs)


def test_centroid_width_must_match_router(router):
    base = tiny_base("llama")
    with pytest.raises(ValueError, match=r"width 16.*384"):
        IGPruningForCausalLM.from_base(base, [[1] * 8], centroids=torch.randn(1, 16), router=router)

    model = IGPruningForCausalLM.from_base(base, [[1] * 8], centroids=torch.randn(1, 16))
    with pytest.raises(ValueError, match=r"384.*16"):
        model.attach_router(router)


@pytest.mark.parametrize(
    "text_config, shown",
    [
        (GPT2Config(n_layer=2, n_embd=32, n_head=4), "gpt2"),
        (PhiConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4), "phi"),
        ({"model_type": "gemma"}, "gemma"),
    ],
)
def test_unsupported_base_architecture_raises(text_config, shown):
    with pytest.raises(ValueError, match=rf"model_type='{shown}'"):
        IGPruningConfig(text_config=text_config)


# -- validation when loading --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, shown",
    [
        ("mask_bank", [[1] * 6], r"has 6 entries"),
        ("mask_bank", [[1] * 7 + [3]], r"contains 3\b"),
        ("mask_bank", [[0] * 8], r"skips all 8 blocks"),
        ("centroids", [[1.0, "NaN"]], r"NaN or infinite"),
        ("router_embedding_dim", 384, r"width 2.*384"),
    ],
)
def test_invalid_saved_config_raises_on_load(tmp_path, field, value, shown):
    make_config(mask_bank=[[1] * 8], centroids=[[1.0, 0.0]]).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    saved[field] = value
    path.write_text(json.dumps(saved))

    with pytest.raises(ValueError, match=shown):
        AutoConfig.from_pretrained(tmp_path)


def test_base_model_folder_rejected_on_load(tmp_path):
    # Without the check, the missing text_config defaults to a 7B Llama and loading allocates its weights.
    tiny_base("llama").save_pretrained(tmp_path)

    with pytest.raises(ValueError, match=r"not an IGPruningForCausalLM checkpoint.*model_type='llama'"):
        IGPruningConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"not an IGPruningForCausalLM checkpoint"):
        IGPruningForCausalLM.from_pretrained(tmp_path)


# -- changing the bank on a built model ---------------------------------------------------------------------------------


def test_set_mask_bank_checks_new_bank():
    model = IGPruningForCausalLM.from_base(tiny_base("llama"), [[1] * 8, [0, 1, 1, 1, 1, 1, 1, 0]])

    # Every block still has weights, so any valid bank of 8 blocks is accepted, also after a narrower bank.
    model.set_mask_bank([[0, 1, 1, 1, 1, 1, 1, 1]], centroids=[[1.0, 0.0]])
    assert model.config.mask_bank == [[0, 1, 1, 1, 1, 1, 1, 1]]
    assert model.config.num_clusters == 1
    model.set_mask_bank([[1] * 8], centroids=[[0.0, 1.0]])
    assert model.config.mask_bank == [[1] * 8]
    model(torch.tensor([[5, 6, 7]]), block_mask=torch.ones(1, 8, dtype=torch.bool))

    with pytest.raises(ValueError, match=r"has 6 entries"):
        model.set_mask_bank([[1] * 6])
    with pytest.raises(ValueError, match=r"expected 1 rows, got 2"):
        model.set_mask_bank([[1] * 8], centroids=[[1.0, 0.0], [0.0, 1.0]])


def test_set_mask_bank_rejects_removed_blocks():
    model = IGPruningForCausalLM.from_base(tiny_base("llama"), [[0, 1, 1, 1, 1, 1, 1, 0]])
    with pytest.raises(ValueError, match=r"blocks \[0, 7\]"):
        model.set_mask_bank([[1] * 8])
