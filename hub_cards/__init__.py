"""Model cards for IG-Pruning checkpoints, rendered with huggingface_hub from a saved model folder."""

from .card import RUN_RECORD, RenderedCard, render_card, write_card


__all__ = ["RUN_RECORD", "RenderedCard", "render_card", "write_card"]
