"""Key/value cache for block-pruned generation: skipped attention blocks store nothing."""

import torch
from transformers import DynamicCache


class IGPruningCache(DynamicCache):
    """
    `DynamicCache` in which each attention layer holds only the batch rows that run it.

    - A layer whose attention block no row runs is never updated and stays empty.
    - A layer that some rows run stores `[rows, heads, tokens, head_dim]` tensors for those rows only, and remembers
      which rows of the full batch they are (`layer_rows[layer_idx]`, `None` meaning every row).
    - The number of tokens seen is kept in one counter instead of being read from layer 0, because layer 0 may be
      skipped. `get_seq_length`, `get_query_offset` and `get_mask_sizes` all read that counter, so the masking
      utilities size their masks correctly whichever layers are empty.

    A row's mask is fixed for the whole generation, so the set of rows per layer is fixed too. Beam search and
    `num_return_sequences` only permute or repeat rows of the same prompt, which share a mask; `reorder_cache`,
    `batch_repeat_interleave` and `batch_select_indices` map each layer's rows accordingly.

    Every layer is a plain `DynamicLayer`, including sliding-window layers of Mistral and Qwen2, which keep all
    tokens; the sliding window is applied by the attention mask.
    """

    def __init__(self, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        self.seen_tokens = 0
        self.batch_size_ = None
        self.layer_rows: list[torch.LongTensor | None] = [None] * num_layers
        self.layer_bound = [False] * num_layers

    # -- rows per layer -------------------------------------------------------------------------------------------

    def bind_rows(self, layer_idx: int, rows: torch.LongTensor | None, batch_size: int) -> None:
        """Record (first call) or check (later calls) which batch rows run the attention block of `layer_idx`."""
        if self.batch_size_ is None:
            self.batch_size_ = batch_size
        elif batch_size != self.batch_size_:
            raise ValueError(
                f"The cache holds a batch of {self.batch_size_} rows but the model was called with {batch_size}; "
                "start a new IGPruningCache for a new batch."
            )

        rows_cpu = rows.cpu() if rows is not None else None
        if not self.layer_bound[layer_idx] and self.seen_tokens > 0:
            # The layer has no keys for the tokens already seen, so attending now would silently drop them.
            raise ValueError(
                f"Attention layer {layer_idx} was skipped by every row for the first {self.seen_tokens} tokens but "
                f"is now run by rows {_describe(rows_cpu)}. A row's block mask must stay fixed for the whole "
                "generation; start a new cache to change masks."
            )
        if not self.layer_bound[layer_idx]:
            self.layer_rows[layer_idx] = rows_cpu
            self.layer_bound[layer_idx] = True
            return

        bound = self.layer_rows[layer_idx]
        same = (bound is None and rows_cpu is None) or (
            bound is not None and rows_cpu is not None and torch.equal(bound, rows_cpu)
        )
        if not same:
            raise ValueError(
                f"The rows that run attention layer {layer_idx} changed during generation (cached rows "
                f"{_describe(bound)}, now {_describe(rows_cpu)}). A row's block mask must stay fixed for the whole "
                "generation; start a new cache to change masks."
            )

    def check_unbound_layer(self, layer_idx: int) -> None:
        """Raise if a layer that stored keys and values earlier is now skipped by every row."""
        if self.layer_bound[layer_idx]:
            raise ValueError(
                f"Attention layer {layer_idx} was run earlier in this generation but is now skipped by every row. "
                "A row's block mask must stay fixed for the whole generation; start a new cache to change masks."
            )

    # -- token counter --------------------------------------------------------------------------------------------

    def advance(self, num_tokens: int) -> None:
        """Count `num_tokens` new positions; called once per forward, after every layer has run."""
        self.seen_tokens += num_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    @property
    def is_initialized(self) -> bool:
        return self.seen_tokens > 0

    @property
    def batch_size(self) -> int:
        return self.batch_size_ if self.batch_size_ is not None else -1

    @property
    def is_compileable(self) -> bool:
        return False

    def memory_bytes(self) -> int:
        """Bytes held by cached keys and values across all layers."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized and layer.keys is not None:
                total += layer.keys.numel() * layer.keys.element_size()
                total += layer.values.numel() * layer.values.element_size()
        return total

    # -- batch surgery used by generate ---------------------------------------------------------------------------

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0
        self.batch_size_ = None
        self.layer_rows = [None] * self.num_layers
        self.layer_bound = [False] * self.num_layers

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            tokens_to_remove = tokens_to_remove - self.seen_tokens  # legacy call: the length to keep
        super().crop(tokens_to_remove)
        self.seen_tokens = max(0, self.seen_tokens + tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.batch_size_ is None:
            return
        self._select_rows(torch.arange(self.batch_size_).repeat_interleave(repeats))

    def _select_rows(self, source_rows: torch.Tensor) -> None:
        """Make new batch row `r` a copy of old row `source_rows[r]`, in every layer that stores rows."""
        if self.batch_size_ is None:
            return
        source_rows = source_rows.cpu()
        new_batch_size = source_rows.numel()

        for layer_idx in range(len(self.layers)):
            layer = self.layers[layer_idx]
            rows = self.layer_rows[layer_idx] if layer_idx < self.num_layers else None
            stored = layer.is_initialized and layer.keys is not None and layer.keys.numel() > 0

            if rows is None:
                # Every row is stored in batch order.
                if stored:
                    layer.keys = layer.keys.index_select(0, source_rows.to(layer.keys.device))
                    layer.values = layer.values.index_select(0, source_rows.to(layer.values.device))
                continue

            # position_of[old_row] = index of that row inside this layer's stored tensors, or -1.
            position_of = torch.full((self.batch_size_,), -1, dtype=torch.long)
            position_of[rows] = torch.arange(rows.numel())
            new_rows = (position_of[source_rows] >= 0).nonzero().flatten()
            positions = position_of[source_rows[new_rows]]
            if stored:
                layer.keys = layer.keys.index_select(0, positions.to(layer.keys.device))
                layer.values = layer.values.index_select(0, positions.to(layer.values.device))
            self.layer_rows[layer_idx] = new_rows

        # A permutation that mixes rows of different masks shows up as a changed row set, which `bind_rows` rejects
        # on the next forward.
        self.batch_size_ = new_batch_size


def _describe(rows: torch.LongTensor | None) -> str:
    return "all" if rows is None else str(rows.tolist())


__all__ = ["IGPruningCache"]
