"""Clustering: sentence-transformers embeddings equal the router's, k-means centroids and size checks."""

import json

import numpy as np
import pytest
import torch

from igp_training.clustering import (
    assign_clusters,
    cluster_embeddings,
    cluster_texts,
    embed_texts,
    load_encoder,
)
from igp_training.data import load_calibration


@pytest.fixture(scope="module")
def encoder(router_path):
    return load_encoder(router_path)


@pytest.fixture(scope="module")
def domain_texts():
    """Real GSM8K problems and HumanEval prompts from the embedded sources, with their source names."""
    result = load_calibration("embedded-gsm8k:question@12,embedded-humaneval:prompt@12", seed=3, heldout_per_source=4)
    return result


def blobs(seed=0, per_blob=20, dim=16, num_blobs=3):
    """Points on the unit sphere around `num_blobs` random directions, and each point's blob."""
    generator = np.random.default_rng(seed)
    centres = generator.normal(size=(num_blobs, dim))
    points = np.concatenate([centre + 0.05 * generator.normal(size=(per_blob, dim)) for centre in centres])
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32), np.repeat(np.arange(num_blobs), per_blob)


def test_embeddings_match_router(encoder, router, domain_texts):
    # The long text exceeds the 256-token window, so truncation must agree too.
    texts = domain_texts.texts[:6] + ["word " * 600]
    embeddings = embed_texts(texts, encoder, show_progress=False)
    reference = router.embed(texts).numpy()
    assert embeddings.dtype == np.float32
    assert embeddings.shape == reference.shape
    np.testing.assert_allclose(embeddings, reference, atol=1e-5)


def test_embed_rejects_empty_text(encoder):
    with pytest.raises(ValueError, match="texts\\[1\\] is empty"):
        embed_texts(["fine", "  "], encoder, show_progress=False)


def test_embed_rejects_cls_pooling(router_path):
    from sentence_transformers import SentenceTransformer, models

    transformer = models.Transformer(str(router_path))
    pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="cls")
    cls_encoder = SentenceTransformer(modules=[transformer, pooling], device="cpu")
    with pytest.raises(ValueError, match="mean pooling"):
        embed_texts(["some text"], cls_encoder, show_progress=False)


def test_kmeans_recovers_blobs():
    points, blob = blobs()
    result = cluster_embeddings(points, 3, seed=0, n_init=4, show_progress=False)

    # Each k-means cluster is exactly one blob (up to relabelling).
    pairs = {(int(cluster), int(source)) for cluster, source in zip(result.labels, blob)}
    assert len(pairs) == 3
    assert sorted(result.sizes) == [20, 20, 20]
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, atol=1e-6)
    assert result.centroids.dtype == np.float32


def test_kmeans_seeded_and_cosine_labels():
    points, _ = blobs(seed=1, num_blobs=4, per_blob=10)
    first = cluster_embeddings(points, 4, seed=7, n_init=3, show_progress=False)
    second = cluster_embeddings(points, 4, seed=7, n_init=3, show_progress=False)
    np.testing.assert_array_equal(first.centroids, second.centroids)
    np.testing.assert_array_equal(first.labels, second.labels)

    # Labels follow the router's rule: highest cosine similarity, computed here directly.
    similarity = points @ first.centroids.T / np.linalg.norm(first.centroids, axis=1)
    np.testing.assert_array_equal(first.labels, similarity.argmax(axis=1))
    np.testing.assert_array_equal(assign_clusters(points, first.centroids), first.labels)


def test_centroids_round_trip_json():
    points, _ = blobs()
    result = cluster_embeddings(points, 3, seed=0, n_init=2, show_progress=False)
    restored = np.asarray(json.loads(json.dumps(result.centroids.tolist())), dtype=np.float32)
    np.testing.assert_array_equal(restored, result.centroids)


def test_more_clusters_than_texts():
    points, _ = blobs(per_blob=2, num_blobs=2)
    with pytest.raises(ValueError, match="more clusters than texts. Use at most 4 clusters"):
        cluster_embeddings(points, 5, show_progress=False)
    with pytest.raises(ValueError, match="more clusters than texts"):
        cluster_texts(["one text", "two texts"], 3, encoder=object(), show_progress=False)


def test_invalid_cluster_count():
    points, _ = blobs()
    for value in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            cluster_embeddings(points, value, show_progress=False)


def test_small_cluster_suggests_fewer():
    points, _ = blobs(per_blob=20, num_blobs=2)
    # One far-away point forms its own cluster when asked for 3.
    outlier = -points[:1] + 0.0
    outlier = np.concatenate([outlier[:, 8:], outlier[:, :8]], axis=1)
    data = np.concatenate([points, outlier / np.linalg.norm(outlier)])
    with pytest.raises(ValueError, match=r"has 1 texts, fewer than the minimum of 2 .*Use fewer clusters than 3"):
        cluster_embeddings(data, 3, seed=0, n_init=4, min_cluster_size=2, show_progress=False)
    assert cluster_embeddings(data, 3, seed=0, n_init=4, min_cluster_size=1, show_progress=False).num_clusters == 3


def test_real_domains_split_and_route(encoder, router, domain_texts):
    result, embeddings = cluster_texts(domain_texts.texts, 2, encoder=encoder, seed=0, n_init=4, show_progress=False)
    assert embeddings.shape == (24, router.embedding_dim)

    # Each domain's majority cluster; a few HumanEval prompts are word problems, so purity is not always 100%.
    labels_of_source = {}
    for source, label in zip(domain_texts.sources, result.labels):
        labels_of_source.setdefault(source, []).append(int(label))
    majority = {source: max(set(labels), key=labels.count) for source, labels in labels_of_source.items()}
    assert majority["embedded-gsm8k:question"] != majority["embedded-humaneval:prompt"]
    for source, labels in labels_of_source.items():
        assert labels.count(majority[source]) >= 10, (source, labels)

    # Held-out texts of each domain are routed by IGPRouter to the cluster of their domain.
    routed = router.route(domain_texts.heldout_texts, torch.from_numpy(result.centroids)).tolist()
    agreeing = sum(label == majority[source] for label, source in zip(routed, domain_texts.heldout_sources))
    assert agreeing >= 7, list(zip(routed, domain_texts.heldout_sources))
