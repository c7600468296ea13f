"""IGPRouter against sentence-transformers, nearest-centroid routing, and routing inside forward and generate."""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from conftest import PROMPTS, left_pad
from modeling_igp import IGPRouter


TEXTS = PROMPTS + [
    "Short.",
    "Ünïcödé façade, naïve café: 東京 and Zürich.",
    # Longer than the 256-token limit, so both sides truncate.
    " ".join(["The quick brown fox jumps over the lazy dog."] * 60),
]


@pytest.fixture(scope="module")
def sentence_transformer(router_path):
    return SentenceTransformer(str(router_path), device="cpu")


def test_embed_matches_sentence_transformers(router, sentence_transformer):
    expected = sentence_transformer.encode(TEXTS, normalize_embeddings=True, convert_to_tensor=True)

    embeddings = router.embed(TEXTS)

    assert embeddings.shape == (len(TEXTS), 384)
    assert embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings, expected.cpu().float(), atol=1e-5, rtol=0)


def test_embed_is_independent_of_batching(router):
    together = router.embed(TEXTS, batch_size=64)
    one_by_one = torch.cat([router.embed([text]) for text in TEXTS])
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=0)


def test_route_picks_highest_cosine_similarity(router, sentence_transformer):
    embeddings = sentence_transformer.encode(TEXTS, normalize_embeddings=True, convert_to_tensor=True).cpu()
    generator = torch.Generator().manual_seed(0)
    # Centroids of very different norms: cosine similarity and the dot product disagree on them.
    centroids = torch.randn(5, 384, generator=generator) * torch.tensor([[0.1], [10.0], [1.0], [3.0], [0.5]])
    centroids[0] = embeddings[0] * 0.01
    centroids[1] = embeddings[1] * 50.0

    expected = (embeddings @ F.normalize(centroids, dim=-1).T).argmax(dim=-1)
    routed = router.route(TEXTS, centroids)

    assert routed.tolist() == expected.tolist()
    assert routed[0].item() == 0
    assert routed[1].item() == 1


@pytest.mark.parametrize("texts, index", [([""], 0), (["fine", "   "], 1), (["ok", "fine", "\n\t"], 2)])
def test_empty_prompt_raises(router, texts, index):
    with pytest.raises(ValueError, match=re.escape(f"texts[{index}] is {texts[index]!r}")):
        router.embed(texts)


def test_router_rejects_non_mean_pooling(tmp_path):
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 384, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    with pytest.raises(ValueError, match="pooling_mode_cls_token"):
        IGPRouter.from_pretrained(str(tmp_path))


# -- routing inside the model -------------------------------------------------------------------------------------------


def test_model_route_returns_nearest_cluster(routed_llama, router):
    model, _ = routed_llama
    # Each centroid is the embedding of one of PROMPTS, so each prompt routes to its own cluster.
    assert model.route(PROMPTS).tolist() == [0, 1, 2]
    assert model.route(list(reversed(PROMPTS))).tolist() == [2, 1, 0]
    with pytest.raises(ValueError, match="''"):
        model.route(["a prompt", ""])


@pytest.fixture
def route_spy(routed_llama, monkeypatch):
    """Record every batch of texts the model's router embeds."""
    model, _ = routed_llama
    calls = []
    embed = model.router.embed

    def recording_embed(texts, *args, **kwargs):
        calls.append(list(texts))
        return embed(texts, *args, **kwargs)

    monkeypatch.setattr(model.router, "embed", recording_embed)
    return calls


def tokenize_left_padded(tokenizer, texts):
    rows = [torch.tensor(tokenizer(text).input_ids) for text in texts]
    return left_pad(rows, tokenizer.pad_token_id)


@torch.no_grad()
def test_forward_without_masks_routes(routed_llama, smollm2_tokenizer, route_spy):
    model, _ = routed_llama
    texts = [PROMPTS[2], PROMPTS[0]]
    input_ids, attention_mask = tokenize_left_padded(smollm2_tokenizer, texts)

    routed = model(input_ids, attention_mask=attention_mask).logits
    explicit = model(input_ids, attention_mask=attention_mask, cluster_ids=torch.tensor([2, 0])).logits

    assert route_spy == [texts]
    torch.testing.assert_close(routed, explicit, atol=0, rtol=0)


@pytest.mark.parametrize("beams", [1, 2])
@torch.no_grad()
def test_generate_routes_each_prompt_once_on_full_text(routed_llama, smollm2_tokenizer, route_spy, beams):
    model, _ = routed_llama
    texts = [PROMPTS[1], PROMPTS[2], PROMPTS[0]]
    input_ids, attention_mask = tokenize_left_padded(smollm2_tokenizer, texts)
    settings = dict(
        attention_mask=attention_mask, max_new_tokens=5, do_sample=False, num_beams=beams,
        num_return_sequences=beams, eos_token_id=None,
    )

    routed = model.generate(input_ids, **settings)

    # One router call for the whole generation, on the prompts' full text without padding or special tokens.
    assert route_spy == [texts]
    explicit = model.generate(input_ids, cluster_ids=torch.tensor([1, 2, 0]), **settings)
    assert routed.tolist() == explicit.tolist()
    # The masks differ, so routing to another cluster would change the output.
    other = model.generate(input_ids, cluster_ids=torch.tensor([0, 0, 0]), **settings)
    assert routed.tolist() != other.tolist()


def test_route_token_ids_drops_special_tokens_and_padding(routed_llama, smollm2_tokenizer, route_spy):
    model, _ = routed_llama
    chat = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True, tokenize=False
    )
    rows = [torch.tensor(smollm2_tokenizer(chat).input_ids), torch.tensor(smollm2_tokenizer(PROMPTS[1]).input_ids)]
    input_ids, attention_mask = left_pad(rows, smollm2_tokenizer.pad_token_id)

    model.route_token_ids(input_ids, attention_mask)

    routed_texts = route_spy[0]
    assert "<|im_start|>" not in routed_texts[0]
    assert "<|im_end|>" not in routed_texts[0]
    assert PROMPTS[0] in routed_texts[0]
    assert routed_texts[1] == PROMPTS[1]


def test_routing_without_tokenizer_raises(routed_llama, monkeypatch):
    model, _ = routed_llama
    monkeypatch.setattr(model, "tokenizer", None)
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)


def test_generate_empty_prompt_raises(routed_llama, smollm2_tokenizer):
    model, _ = routed_llama
    # A prompt of special tokens only decodes to empty text.
    input_ids = torch.tensor([[smollm2_tokenizer.bos_token_id, smollm2_tokenizer.eos_token_id]])
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate(input_ids, max_new_tokens=2)


def test_router_folder_without_tokenizer_raises(router_path, tmp_path):
    target = tmp_path / "encoder"
    target.mkdir()
    for name in ("config.json", "model.safetensors"):
        (target / name).symlink_to(router_path / name)
    # transformers would otherwise build an empty-vocabulary tokenizer that routes every prompt the same way.
    with pytest.raises(OSError, match="no tokenizer vocabulary"):
        IGPRouter.from_pretrained(str(target))
