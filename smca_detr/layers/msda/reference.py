"""Pure-PyTorch multi-scale deformable attention (MSDA) core with ``grid_sample``: the test oracle
(the fast CPU path is :mod:`.gather`).

Semantics (identical to the official Deformable DETR op):

* ``value [B, S, M, D]``: ``S = sum_l H_l * W_l`` value positions of all levels, each level
  flattened row-major (``s = start_l + y * W_l + x``), finest level first; ``M`` heads of ``D``
  channels.
* ``spatial_shapes [L, 2]`` int64 ``(H_l, W_l)``; ``level_start_index [L]`` int64 ``start_l``.
* ``sampling_locations [B, Q, M, L, P, 2]``: ``(x, y)`` normalised to ``[0, 1]`` of each level's
  (padded) map; values outside ``[0, 1]`` are allowed (zero padding).
* ``attention_weights [B, Q, M, L, P]``.
* output ``[B, Q, M * D]``: ``out[b, q, m*D + d] = sum_{l, p} a[b,q,m,l,p] *
  bilinear(value_l[b, :, :, m, d], x * W_l - 0.5, y * H_l - 0.5)`` where ``bilinear`` reads zero
  outside the map. This is exactly ``F.grid_sample(..., mode="bilinear", padding_mode="zeros",
  align_corners=False)`` at grid ``2 * loc - 1``.

:func:`ms_deform_attn_pytorch` (the oracle) and :func:`ms_deform_attn_pytorch_backward` loop over
levels only (one ``grid_sample`` call per level covering every batch
element, head, query and point) and work for any floating dtype, float64 included. Mixed input
dtypes are computed in the promoted dtype; the output has ``value``'s dtype.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ms_deform_attn_pytorch", "ms_deform_attn_pytorch_backward", "level_slices"]


def level_slices(spatial_shapes: Tensor, level_start_index: Tensor) -> List[Tuple[int, int, int]]:
    """``[(H_l, W_l, start_l), ...]`` as Python ints (one host read of the two small tensors)."""
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    if len(shapes) != len(starts):
        raise ValueError(
            f"spatial_shapes has {len(shapes)} levels but level_start_index has {len(starts)}"
        )
    return [(int(h), int(w), int(s)) for (h, w), s in zip(shapes, starts)]


def _check_shapes(value: Tensor, sampling_locations: Tensor, attention_weights: Tensor, n_levels: int):
    if value.dim() != 4:
        raise ValueError(f"value must be [B, S, M, D], got shape {tuple(value.shape)}")
    B, _, M, _ = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "sampling_locations must be [B, Q, M, L, P, 2], got shape "
            f"{tuple(sampling_locations.shape)}"
        )
    Bq, Q, Mq, L, P, _ = sampling_locations.shape
    if (Bq, Mq, L) != (B, M, n_levels):
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} does not match value "
            f"{tuple(value.shape)} and {n_levels} levels"
        )
    if tuple(attention_weights.shape) != (B, Q, M, L, P):
        raise ValueError(
            f"attention_weights must be {(B, Q, M, L, P)}, got {tuple(attention_weights.shape)}"
        )


def _promote(value: Tensor, sampling_locations: Tensor, attention_weights: Tensor):
    """Cast the three float inputs to their common dtype (grid_sample needs one dtype; e.g. fp16
    values with fp32 locations are sampled in fp32)."""
    dtype = torch.promote_types(
        torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype
    )
    return value.to(dtype), sampling_locations.to(dtype), attention_weights.to(dtype)


def _value_level(value: Tensor, h: int, w: int, start: int) -> Tensor:
    """Level ``l`` of ``value [B, S, M, D]`` as a ``[B*M, D, H, W]`` image batch."""
    B, _, M, D = value.shape
    v = value[:, start:start + h * w]  # [B, HW, M, D]
    return v.permute(0, 2, 3, 1).reshape(B * M, D, h, w)


def _grid_level(sampling_locations: Tensor, lvl: int) -> Tensor:
    """Grid of level ``lvl`` in grid_sample coordinates, ``[B*M, Q, P, 2]``."""
    B, Q, M, _, P, _ = sampling_locations.shape
    g = sampling_locations[:, :, :, lvl] * 2 - 1  # [B, Q, M, P, 2]
    return g.transpose(1, 2).reshape(B * M, Q, P, 2)


def ms_deform_attn_pytorch(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                           attention_weights: Tensor) -> Tensor:
    """Reference MSDA forward (differentiable by autograd, any dtype). Returns ``[B, Q, M*D]``."""
    levels = level_slices(spatial_shapes, level_start_index)
    _check_shapes(value, sampling_locations, attention_weights, len(levels))
    out_dtype = value.dtype
    value, sampling_locations, attention_weights = _promote(value, sampling_locations, attention_weights)
    B, _, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    sampled = []
    for lvl, (h, w, start) in enumerate(levels):
        # [B*M, D, Q, P]
        sampled.append(
            F.grid_sample(
                _value_level(value, h, w, start),
                _grid_level(sampling_locations, lvl),
                mode="bilinear",
                padding_mode="zeros",
                align_corners=False,
            )
        )
    samples = torch.stack(sampled, dim=-2).flatten(-2)  # [B*M, D, Q, L*P]
    weights = attention_weights.transpose(1, 2).reshape(B * M, 1, Q, L * P)
    out = (samples * weights).sum(-1)  # [B*M, D, Q]
    return out.view(B, M * D, Q).transpose(1, 2).to(out_dtype).contiguous()


def ms_deform_attn_pytorch_backward(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor,
                                    level_start_index: Tensor, sampling_locations: Tensor,
                                    attention_weights: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Analytic backward of :func:`ms_deform_attn_pytorch` without autograd.

    Returns ``(grad_value, grad_sampling_locations, grad_attention_weights)``. Uses
    ``aten.grid_sampler_2d_backward`` per level, so it can run inside a custom-op kernel (where
    autograd is not available). Gradients at the (measure-zero) kinks of bilinear interpolation
    follow grid_sample's convention.
    """
    levels = level_slices(spatial_shapes, level_start_index)
    _check_shapes(value, sampling_locations, attention_weights, len(levels))
    dtypes = (value.dtype, sampling_locations.dtype, attention_weights.dtype)
    value, sampling_locations, attention_weights = _promote(value, sampling_locations, attention_weights)
    grad_output = grad_output.to(value.dtype)
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    # grad_output [B, Q, M*D] -> [B*M, D, Q, 1]
    g = grad_output.reshape(B, Q, M, D).permute(0, 2, 3, 1).reshape(B * M, D, Q, 1)
    w_all = attention_weights.transpose(1, 2).reshape(B * M, 1, Q, L, P)
    grad_value = value.new_zeros(value.shape)
    grad_loc = sampling_locations.new_zeros(sampling_locations.shape)
    grad_attn = attention_weights.new_empty(attention_weights.shape)
    grad_attn_view = grad_attn.transpose(1, 2)  # [B, M, Q, L, P] view into grad_attn
    for lvl, (h, w, start) in enumerate(levels):
        v_l = _value_level(value, h, w, start)
        grid_l = _grid_level(sampling_locations, lvl)
        samp = F.grid_sample(v_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        # d out / d weight = sum_d grad * sample                           [B*M, Q, P]
        grad_attn_view[:, :, :, lvl] = (samp * g).sum(1).view(B, M, Q, P)
        grad_samp = g * w_all[:, :, :, lvl]  # [B*M, D, Q, P]
        gv, gg = torch.ops.aten.grid_sampler_2d_backward(
            grad_samp, v_l, grid_l, 0, 0, False, [True, True]
        )
        # gv [B*M, D, H, W] -> [B, HW, M, D];  gg [B*M, Q, P, 2] -> [B, Q, M, P, 2]; d grid/d loc = 2
        grad_value[:, start:start + h * w] += gv.view(B, M, D, h * w).permute(0, 3, 1, 2)
        grad_loc[:, :, :, lvl] = 2 * gg.view(B, M, Q, P, 2).transpose(1, 2)
    return grad_value.to(dtypes[0]), grad_loc.to(dtypes[1]), grad_attn.to(dtypes[2])
