"""Clustering of calibration texts: router-encoder embeddings and k-means centroids.

Texts are embedded with sentence-transformers, using the same encoder, pooling and normalisation as `IGPRouter`, so
that a calibration text lands in the cluster the router sends it to at inference. K-means (scikit-learn) runs on the
L2-normalised embeddings; its centroids are normalised again and kept as a float array, never as a pickled estimator.
Each text's cluster is its nearest centroid by cosine similarity, which is the rule `IGPRouter.route` applies.
"""

import logging
import time
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class ClusteringResult:
    """Centroids and assignments of one k-means clustering of calibration embeddings."""

    centroids: np.ndarray
    """[num_clusters, embedding_dim] float32 array, each row L2-normalised."""

    labels: np.ndarray
    """[num_texts] int64 array: each text's nearest centroid by cosine similarity."""

    inertia: float
    """K-means inertia (sum of squared distances to the k-means centres) of the best restart."""

    reassigned: int
    """Texts whose cosine-nearest centroid differs from k-means' Euclidean label (usually 0)."""

    @property
    def num_clusters(self) -> int:
        return len(self.centroids)

    @property
    def sizes(self) -> list[int]:
        """Number of texts per cluster."""
        return np.bincount(self.labels, minlength=self.num_clusters).tolist()


def load_encoder(encoder_path=None, max_length: int = 256, device: str | None = None):
    """Load the router encoder as a `SentenceTransformer` (default: the packaged all-MiniLM-L6-v2)."""
    from sentence_transformers import SentenceTransformer

    if encoder_path is None:
        from .assets import default_router_path

        encoder_path = default_router_path()
    encoder = SentenceTransformer(str(encoder_path), device=device or "cpu")
    # IGPRouter truncates prompts to its max_length; the clustering must see the same tokens.
    encoder.max_seq_length = max_length
    return encoder


def embed_texts(texts: list[str], encoder=None, batch_size: int = 64, show_progress: bool = True) -> np.ndarray:
    """Embed texts into L2-normalised float32 vectors [len(texts), d] with mean pooling, as `IGPRouter.embed` does."""
    if encoder is None:
        encoder = load_encoder()
    empty = [index for index, text in enumerate(texts) if not text or not text.strip()]
    if empty:
        raise ValueError(f"texts[{empty[0]}] is empty; drop empty texts before embedding (load_calibration does).")
    _check_mean_pooling(encoder)

    embeddings = encoder.encode(
        list(texts),
        batch_size=batch_size,
        show_progress_bar=show_progress,
        convert_to_numpy=True,
        normalize_embeddings=True,
    )
    return np.asarray(embeddings, dtype=np.float32)


def cluster_embeddings(
    embeddings: np.ndarray,
    num_clusters: int,
    seed: int = 0,
    n_init: int = 10,
    min_cluster_size: int = 1,
    show_progress: bool = True,
) -> ClusteringResult:
    """Run seeded k-means with `n_init` restarts on normalised embeddings and keep the restart with the lowest inertia.

    Raises `ValueError` when there are more clusters than texts, or when a cluster gets fewer than `min_cluster_size`
    texts (the message lists the sizes and suggests a smaller number of clusters).
    """
    from sklearn.cluster import KMeans
    from tqdm.auto import tqdm

    embeddings = np.asarray(embeddings, dtype=np.float32)
    num_texts = len(embeddings)
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer)) or num_clusters < 1:
        raise ValueError(f"The number of clusters must be a positive integer, got {num_clusters!r}.")
    if num_clusters > num_texts:
        raise ValueError(
            f"Cannot split {num_texts} calibration texts into {num_clusters} clusters: there are more clusters than "
            f"texts. Use at most {num_texts} clusters, or give more calibration texts."
        )
    if n_init < 1:
        raise ValueError(f"n_init must be at least 1, got {n_init}.")

    # One seeded k-means per restart, so the progress bar can advance; the best inertia wins, as in KMeans(n_init=...).
    restart_seeds = np.random.RandomState(seed).randint(0, 2**31 - 1, size=n_init)
    best = None
    for restart_seed in tqdm(restart_seeds, desc="k-means restarts", disable=not show_progress):
        kmeans = KMeans(n_clusters=num_clusters, n_init=1, random_state=int(restart_seed)).fit(embeddings)
        if best is None or kmeans.inertia_ < best.inertia_:
            best = kmeans

    centroids = normalize_rows(best.cluster_centers_.astype(np.float32))
    labels = assign_clusters(embeddings, centroids)
    result = ClusteringResult(
        centroids=centroids,
        labels=labels,
        inertia=float(best.inertia_),
        reassigned=int((labels != best.labels_).sum()),
    )

    too_small = [cluster for cluster, size in enumerate(result.sizes) if size < min_cluster_size]
    if too_small:
        raise ValueError(
            f"Cluster {too_small[0]} has {result.sizes[too_small[0]]} texts, fewer than the minimum of "
            f"{min_cluster_size} (cluster sizes: {result.sizes}). Use fewer clusters than {num_clusters}, give more "
            "calibration texts, or lower the minimum cluster size."
        )
    return result


def assign_clusters(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Return each embedding's nearest centroid by cosine similarity (the router's rule) as an int64 array."""
    embeddings = normalize_rows(np.asarray(embeddings, dtype=np.float32))
    centroids = normalize_rows(np.asarray(centroids, dtype=np.float32))
    return (embeddings @ centroids.T).argmax(axis=1).astype(np.int64)


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


def cluster_texts(
    texts: list[str],
    num_clusters: int,
    encoder=None,
    seed: int = 0,
    n_init: int = 10,
    min_cluster_size: int = 1,
    batch_size: int = 64,
    show_progress: bool = True,
) -> tuple[ClusteringResult, np.ndarray]:
    """Embed and cluster texts; returns the clustering and the embeddings. Logs the time and sizes."""
    if num_clusters > len(texts):
        # Checked before embedding, which is the slow part.
        raise ValueError(
            f"Cannot split {len(texts)} calibration texts into {num_clusters} clusters: there are more clusters than "
            f"texts. Use at most {len(texts)} clusters, or give more calibration texts."
        )
    start = time.perf_counter()
    embeddings = embed_texts(texts, encoder, batch_size=batch_size, show_progress=show_progress)
    logger.info("Embedded %d texts in %.1f s", len(texts), time.perf_counter() - start)

    start = time.perf_counter()
    result = cluster_embeddings(embeddings, num_clusters, seed=seed, n_init=n_init,
                                min_cluster_size=min_cluster_size, show_progress=show_progress)
    logger.info(
        "Clustered into %d clusters (sizes %s, %d texts reassigned to their cosine-nearest centroid) in %.1f s",
        num_clusters, result.sizes, result.reassigned, time.perf_counter() - start,
    )
    return result, embeddings


def _check_mean_pooling(encoder) -> None:
    """Reject an encoder whose pooling is not mean pooling, which is the only pooling IGPRouter computes."""
    for module in encoder:
        mode = getattr(module, "pooling_mode", None) or getattr(module, "get_pooling_mode_str", lambda: None)()
        if mode is not None and mode != "mean":
            raise ValueError(
                f"The router encoder uses {mode!r} pooling, but IGPRouter computes mean pooling. Use an encoder "
                "trained with mean pooling, such as all-MiniLM-L6-v2."
            )
