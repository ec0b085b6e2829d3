"""Backbone adapter: any detectron2 backbone (``build_backbone``) -> the levels a DETR transformer
reads, each with its padding mask.

Padding masks follow the official code: the image-level mask (True = padding) of the padded batch is
resized with nearest-neighbour interpolation to each feature map. With the batch padded to a
multiple of the largest stride, a feature pixel's mask value only depends on its own image. As in
the official code, the backbone's convolutions do see the padded canvas (after the first conv + norm
the padding is no longer zero), so an image padded to a larger canvas can give slightly different
detections; detectron2's test loader runs one image per process, so evaluation is unaffected
(tests/test_padding.py pins both facts down).
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.modeling import build_backbone
from torch import nn

from ..layers.cpu.fused_resnet import FusedCpuForward

__all__ = ["DetrBackbone", "image_padding_mask", "resize_mask"]


def image_padding_mask(image_sizes: Sequence[Tuple[int, int]], padded_hw: Tuple[int, int],
                       device=None) -> torch.Tensor:
    """``[B,H,W]`` bool mask, True on padding, from unpadded (h, w) sizes (pairs, or a ``[B,2]``
    tensor: computed with tensor ops so that a traced model keeps dynamic sizes)."""
    # sizes built on the host, copied without blocking (no host synchronisation on an accelerator)
    hw = torch.as_tensor(image_sizes).to(device, non_blocking=True).reshape(-1, 2)
    rows = torch.arange(padded_hw[0], device=device)[None, :, None] >= hw[:, 0, None, None]
    cols = torch.arange(padded_hw[1], device=device)[None, None, :] >= hw[:, 1, None, None]
    return rows | cols


def resize_mask(mask: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a ``[B,H,W]`` bool mask (official ``F.interpolate`` convention)."""
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


class DetrBackbone(nn.Module):
    """Runs a detectron2 backbone and returns ``in_features`` (finest first) with their masks."""

    def __init__(self, cfg, in_features: List[str]):
        super().__init__()
        self.body = build_backbone(cfg)
        self.run_body = FusedCpuForward(cfg.MODEL.SMCA_DETR.FUSED_CPU_BACKBONE)  # CPU execution strategy
        shapes = self.body.output_shape()
        missing = [f for f in in_features if f not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.SMCA_DETR.IN_FEATURES asks for {missing}, but the backbone only outputs "
                f"{sorted(shapes)} (set MODEL.RESNETS.OUT_FEATURES accordingly)")
        self.in_features = list(in_features)
        self.output_shapes = [shapes[f] for f in self.in_features]
        strides = [s.stride for s in self.output_shapes]
        if any(a >= b for a, b in zip(strides, strides[1:])):
            raise ValueError(f"MODEL.SMCA_DETR.IN_FEATURES={self.in_features} must list distinct backbone levels "
                             f"finest first (strides {strides})")
        self.size_divisibility = max(
            getattr(self.body, "size_divisibility", 0) or 0, max(s.stride for s in self.output_shapes))

    def forward(self, images: torch.Tensor, image_sizes) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        feats = self.run_body(self.body, images)
        mask = image_padding_mask(image_sizes, images.shape[-2:], images.device)
        features = [feats[f] for f in self.in_features]
        return features, [resize_mask(mask, f.shape[-2:]) for f in features]
