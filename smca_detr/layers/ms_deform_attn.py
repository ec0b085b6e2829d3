"""``MSDeformAttn``: the multi-scale deformable attention module of Deformable DETR (Zhu et al.,
ICLR 2021), with the official parameter names so official state dicts load unchanged.

Each query predicts, per head ``m``, level ``l`` and point ``p``, a sampling offset and an
attention weight (softmax over the ``L * P`` samples of a head); the output is the weighted sum of
the bilinearly sampled values (see :func:`smca_detr.layers.msda.ms_deform_attn`).
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .msda import IMPLS, ms_deform_attn
from .tracing import tracing_or_compiling

__all__ = ["MSDeformAttn", "msda_offset_bias_init"]


def msda_offset_bias_init(n_heads: int, n_levels: int, n_points: int) -> Tensor:
    """Official initial ``sampling_offsets.bias`` ``[n_heads * n_levels * n_points * 2]``.

    Head ``h`` points in direction ``(cos θ_h, sin θ_h)``, ``θ_h = 2πh / n_heads`` (float32),
    scaled so that its largest absolute coordinate is 1; the same direction is used on every level,
    and point ``i`` is placed at ``(i + 1)`` times it.
    """
    thetas = torch.arange(n_heads, dtype=torch.float32) * (2.0 * math.pi / n_heads)
    dirs = torch.stack([thetas.cos(), thetas.sin()], dim=-1)  # [M, 2]
    dirs = dirs / dirs.abs().max(dim=-1, keepdim=True).values
    grid = dirs.view(n_heads, 1, 1, 2).repeat(1, n_levels, n_points, 1)
    steps = torch.arange(1, n_points + 1, dtype=torch.float32).view(1, 1, n_points, 1)
    return (grid * steps).flatten()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention.

    Args:
        d_model: channels ``d`` of queries, values and output.
        n_levels: number of feature levels ``L``.
        n_heads: attention heads ``M``; must divide ``d_model``.
        n_points: sampling points ``P`` per head and level.
        impl: "auto" | "triton" | "pytorch", the core implementation (see
            :func:`smca_detr.layers.msda.ms_deform_attn`).

    Parameters (official names): ``sampling_offsets`` (Linear d -> M*L*P*2), ``attention_weights``
    (Linear d -> M*L*P), ``value_proj`` and ``output_proj`` (Linear d -> d).

    Setting ``store_sampling = True`` makes every forward keep
    ``last_sampling = {"sampling_locations": [B,Q,M,L,P,2], "attention_weights": [B,Q,M,L,P]}``
    (detached) for visualisation; it is off by default.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 impl: str = "auto"):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(
                f"d_model must be divisible by n_heads, got d_model={d_model}, n_heads={n_heads}"
            )
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.impl = impl
        self.store_sampling = False
        self.last_sampling: Optional[Dict[str, Tensor]] = None

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    @torch.no_grad()
    def _reset_parameters(self):
        """Official initialisation: zero offset weights with the direction-grid bias
        (:func:`msda_offset_bias_init`), zero attention-weight layer (uniform attention), Xavier
        uniform value / output projections with zero bias."""
        nn.init.zeros_(self.sampling_offsets.weight)
        self.sampling_offsets.bias.copy_(
            msda_offset_bias_init(self.n_heads, self.n_levels, self.n_points)
        )
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, "
                f"n_points={self.n_points}, impl={self.impl!r}")

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: Tensor,
        input_level_start_index: Tensor,
        input_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            query: ``[B, Q, d]``.
            reference_points: ``[B, Q, L, 2]`` points ``(x, y)`` in ``[0, 1]`` (offsets are in
                pixels of each level), or ``[B, Q, L, 4]`` boxes ``(cx, cy, w, h)`` (offsets are in
                units of ``box size / (2 * n_points)``).
            input_flatten: ``[B, S, d]`` values of all levels, finest first, row-major.
            input_spatial_shapes: ``[L, 2]`` int64 ``(H_l, W_l)``.
            input_level_start_index: ``[L]`` int64.
            input_padding_mask: ``[B, S]`` bool, True = padding (those values are zeroed), or None.

        Returns:
            ``[B, Q, d]``.
        """
        B, Q, _ = query.shape
        _, S, _ = input_flatten.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        if not (input_flatten.is_cuda or tracing_or_compiling()):
            # host-side check only where it costs no device sync and breaks no graph
            total = int((input_spatial_shapes[:, 0] * input_spatial_shapes[:, 1]).sum())
            if total != S:
                raise ValueError(f"input_flatten has {S} positions but spatial shapes sum to {total}")

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(B, S, M, self.d_model // M)

        offsets = self.sampling_offsets(query).view(B, Q, M, L, P, 2)
        weights = self.attention_weights(query).view(B, Q, M, L * P)
        weights = F.softmax(weights, dim=-1).view(B, Q, M, L, P)

        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (W_l, H_l)
            normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            locations = (reference_points[:, :, None, :, None, :]
                         + offsets / normalizer[None, None, None, :, None, :])
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(
                "reference_points must have 2 (x, y) or 4 (cx, cy, w, h) coordinates in the last "
                f"dimension, got shape {tuple(reference_points.shape)}"
            )
        if self.store_sampling:
            self.last_sampling = {
                "sampling_locations": locations.detach(),
                "attention_weights": weights.detach(),
            }

        out = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations, weights,
                             impl=self.impl)
        return self.output_proj(out)
