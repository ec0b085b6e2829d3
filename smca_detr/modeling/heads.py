"""Class and box heads shared by every variant.

One class head (linear) and one box head (3-layer MLP) shared by all decoder layers, or one pair per
layer (Deformable DETR with box refinement: ``per_layer=True``). Boxes are
``sigmoid(bbox_embed(h) + reference)`` where ``reference`` is the transformer's reference in logit
space on the first 2 (centre) or 4 (box) coordinates, or nothing (plain DETR).
"""
import math
from typing import Optional

import torch
from torch import nn

from .blocks import MLP, at_least_float32, clones

__all__ = ["PredictionHeads"]


class PredictionHeads(nn.Module):
    def __init__(self, *, hidden_dim: int, num_logits: int, num_sets: int = 1, per_layer: bool = False,
                 focal_prior: Optional[float] = None, zero_init_box: bool = False):
        """
        Args:
            hidden_dim: transformer width d.
            num_logits: class logit columns (K for focal heads, K + 1 with "no object" for softmax).
            num_sets: how many layers use these heads (decoder layers, + 1 for a two-stage encoder).
            per_layer: one head pair per layer (``class_embed.{i}``) instead of one shared pair.
            focal_prior: if set, class bias = -log((1 - π) / π) (focal-loss prior π).
            zero_init_box: last box layer starts at zero (Conditional / Deformable DETR).
        """
        super().__init__()
        class_embed = nn.Linear(hidden_dim, num_logits)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        if focal_prior is not None:
            nn.init.constant_(class_embed.bias, -math.log((1 - focal_prior) / focal_prior))
        if zero_init_box:
            nn.init.zeros_(bbox_embed.layers[-1].weight)
            nn.init.zeros_(bbox_embed.layers[-1].bias)
        self.per_layer = per_layer
        self.num_sets = num_sets
        if per_layer:
            self.class_embed = clones(class_embed, num_sets)
            self.bbox_embed = clones(bbox_embed, num_sets)
        else:
            self.class_embed = class_embed
            self.bbox_embed = bbox_embed

    def class_head(self, layer: int) -> nn.Module:
        return self.class_embed[layer] if self.per_layer else self.class_embed

    def box_head(self, layer: int) -> nn.Module:
        return self.bbox_embed[layer] if self.per_layer else self.bbox_embed

    def box_logits(self, layer: int, h: torch.Tensor, reference: Optional[torch.Tensor]) -> torch.Tensor:
        """Unnormalised box of layer ``layer``: ``bbox_embed(h)`` plus the reference logits, in at
        least float32."""
        out = at_least_float32(self.box_head(layer)(h))
        if reference is not None:
            k = reference.shape[-1]
            out = torch.cat([out[..., :k] + reference, out[..., k:]], dim=-1)
        return out

    def forward(self, hs: torch.Tensor, references: Optional[torch.Tensor]):
        """hs ``[L,B,Q,d]``, references ``[L,B,Q,2|4]`` logits or None -> logits, boxes ``[L,B,Q,·]``.

        Under mixed precision the linear layers run in half precision, but logits and boxes are
        returned in float32 (float64 stays float64): the reference is added and the box sigmoid taken
        in float32, which keeps sub-pixel box resolution (bfloat16 has 8 significant bits)."""
        if not self.per_layer:
            logits = at_least_float32(self.class_embed(hs))
            boxes = self.box_logits(0, hs, references).sigmoid()
            return logits, boxes
        logits, boxes = [], []
        for i in range(hs.shape[0]):
            logits.append(at_least_float32(self.class_head(i)(hs[i])))
            ref = None if references is None else references[i]
            boxes.append(self.box_logits(i, hs[i], ref).sigmoid())
        return torch.stack(logits), torch.stack(boxes)


