"""Utilities: image reading with errors naming the file (``smca_detr.utils.images``, used by the data
mapper and the tools), detection pictures and attention visualisation (``smca_detr.utils.visualize``)
(the speed tools' helpers live in ``tools/bench_common.py``)."""
from .images import ImageNotFoundError, ImageReadError, read_image
from .visualize import AttentionMaps, Panel, attention_maps, draw_instances, grid_size, render_attention

__all__ = ["AttentionMaps", "Panel", "attention_maps", "draw_instances", "grid_size", "render_attention",
           "ImageReadError", "ImageNotFoundError", "read_image"]
