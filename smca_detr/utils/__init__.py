"""Utilities: detection pictures and attention visualisation (``smca_detr.utils.visualize``).
Imported lazily by the tools; nothing here is needed for training."""
from .visualize import AttentionMaps, Panel, attention_maps, draw_instances, grid_size, render_attention

__all__ = ["AttentionMaps", "Panel", "attention_maps", "draw_instances", "grid_size", "render_attention"]
