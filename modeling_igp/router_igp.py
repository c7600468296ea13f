"""Nearest-centroid router: a sentence encoder with mean pooling and L2 normalisation."""

import json
import os

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer


class IGPRouter:
    """
    Sentence encoder that maps prompts to clusters.

    The encoder is any transformers encoder (default all-MiniLM-L6-v2). A prompt's embedding is the mean of its last
    hidden states over non-padding tokens, L2-normalised, which is how sentence-transformers pools MiniLM; its cluster
    is the centroid with the highest cosine similarity. Only torch and transformers are needed, so a saved checkpoint
    routes without sentence-transformers.

    The router is deliberately not an `nn.Module` of the language model: its weights live in their own folder of the
    checkpoint and stay out of the language model's state dict, optimizer and PEFT wrapping.
    """

    def __init__(self, encoder, tokenizer, max_length: int = 256):
        self.encoder = encoder.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, path: str, max_length: int = 256, **kwargs) -> "IGPRouter":
        """Load an encoder and its tokenizer from a local folder or hub name (a sentence-transformers folder works)."""
        if os.path.isdir(path):
            _check_pooling(path)
            _check_tokenizer_files(path)
        encoder = AutoModel.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        return cls(encoder, tokenizer, max_length=max_length)

    @property
    def embedding_dim(self) -> int:
        return self.encoder.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def to(self, device) -> "IGPRouter":
        self.encoder.to(device)
        return self

    def save_pretrained(self, path: str) -> None:
        self.encoder.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Embed texts into L2-normalised float32 vectors of shape [len(texts), embedding_dim]."""
        if isinstance(texts, str):
            texts = [texts]
        empty = [index for index, text in enumerate(texts) if not text or not text.strip()]
        if empty:
            raise ValueError(
                f"Cannot route an empty prompt (texts[{empty[0]}] is {texts[empty[0]]!r}); "
                "pass block_mask or cluster_ids for rows without text."
            )

        embeddings = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden_states = self.encoder(**batch).last_hidden_state  # [b, t, d]
            weights = batch["attention_mask"].unsqueeze(-1).to(hidden_states.dtype)  # [b, t, 1]
            pooled = (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            embeddings.append(F.normalize(pooled.float(), p=2, dim=-1))
        return torch.cat(embeddings).cpu()

    def route(self, texts: list[str], centroids: torch.Tensor) -> torch.LongTensor:
        """Return the index of the nearest centroid (by cosine similarity) for each text."""
        embeddings = self.embed(texts)
        centroids = F.normalize(centroids.float().cpu(), p=2, dim=-1)
        if centroids.shape[-1] != embeddings.shape[-1]:
            raise ValueError(
                f"Centroids have width {centroids.shape[-1]} but the router encoder embeds into "
                f"{embeddings.shape[-1]} dimensions; use the encoder the centroids were computed with."
            )
        return (embeddings @ centroids.T).argmax(dim=-1)


# Vocabulary files of the common tokenizer types: fast (tokenizer.json), WordPiece, BPE and SentencePiece.
TOKENIZER_FILES = (
    "tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model"
)


def _check_tokenizer_files(path: str) -> None:
    """Raise if a local encoder folder has no tokenizer vocabulary."""
    # Without one, transformers 5 builds a tokenizer with an empty vocabulary that maps every word to [UNK], and
    # routing would silently send every prompt to the same cluster.
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise OSError(
            f"The router encoder folder {path} has no tokenizer vocabulary (none of {', '.join(TOKENIZER_FILES)}). "
            "Save the encoder's tokenizer into the same folder."
        )


def _check_pooling(path: str) -> None:
    """Reject a sentence-transformers folder whose pooling is not the mean pooling this router computes."""
    pooling_file = os.path.join(path, "1_Pooling", "config.json")
    if not os.path.isfile(pooling_file):
        return
    with open(pooling_file) as handle:
        pooling = json.load(handle)
    if not pooling.get("pooling_mode_mean_tokens", False):
        raise ValueError(
            f"The router encoder at {path} uses pooling {pooling}, but IGPRouter computes mean pooling. "
            "Use an encoder trained with mean pooling, such as all-MiniLM-L6-v2."
        )


__all__ = ["IGPRouter"]
