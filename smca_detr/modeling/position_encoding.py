"""Sine position encodings shared by every variant.

* ``PositionEmbeddingSine``: the encoding of feature maps (DETR, SMCA, Conditional DETR; with
  ``offset=-0.5`` the Deformable DETR variant). ``num_pos_feats = d/2`` frequencies per axis,
  the y block first, then the x block; channel 2k is sin, 2k+1 is cos.
* ``sine_embed``: the encoding of points/boxes in [0, 1] (Conditional DETR reference points,
  Deformable two-stage proposals), ``num_feats`` frequencies per coordinate, coordinates in the
  order given. The official code hard-codes 128 frequencies (only consistent for d = 256); here it
  is a parameter (d/2).
"""
import math

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine", "sine_embed"]


def _frequencies(num_feats: int, temperature: float, device) -> torch.Tensor:
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)


def _interleave_sin_cos(x: torch.Tensor) -> torch.Tensor:
    # x [..., F] -> [..., F]: even channels sin, odd channels cos (of the even frequencies).
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """Sine encoding of a padded feature map, normalised by the valid (unpadded) extent of each image.

    Always computed in float32 (as the official code), whatever the feature dtype.
    """

    def __init__(self, num_pos_feats: int, temperature: float = 10000, normalize: bool = True,
                 scale: float = 2 * math.pi, offset: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset
        self.eps = eps

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask ``[B,H,W]`` bool, True = padding -> encoding ``[B, 2*num_pos_feats, H, W]`` float32."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = _frequencies(self.num_pos_feats, self.temperature, mask.device)
        pos_x = _interleave_sin_cos(x_embed[..., None] / dim_t)
        pos_y = _interleave_sin_cos(y_embed[..., None] / dim_t)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def sine_embed(coords: torch.Tensor, num_feats: int, temperature: float = 10000,
               scale: float = 2 * math.pi) -> torch.Tensor:
    """coords ``[..., k]`` in [0, 1] -> ``[..., k * num_feats]``, one block per coordinate, in order."""
    dim_t = _frequencies(num_feats, temperature, coords.device).to(coords.dtype)
    emb = _interleave_sin_cos((coords * scale)[..., None] / dim_t)
    return emb.flatten(-2)
