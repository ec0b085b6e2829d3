"""Multi-scale deformable attention for ONNX export: the corner-gather formulation of
:mod:`.gather` written with shape-agnostic tensor operators only (no Python sizes, no
``embedding_bag``), so that a traced graph keeps every level's size dynamic and uses standard ONNX
operators (Gather, Floor, Mul, ReduceSum) - no custom op, no grid_sample.

The values are one table ``[B * M * S + 1, D]`` (head-major rows ``(b * M + m) * S + s``) whose last
row is zero. Every sampling point at pixel coordinates ``(x, y) = (loc_x W_l - 0.5, loc_y H_l - 0.5)``
reads its four corners ``(floor(x) + {0, 1}, floor(y) + {0, 1})``; a corner outside its level's map
reads the zero row (the zero padding of ``grid_sample`` / the zero ring of :mod:`.gather`). The
output is the sum of the rows weighted by the bilinear corner weights times the attention weight.
Same maths as :func:`.reference.ms_deform_attn_pytorch`, up to float rounding; forward only.
"""
import torch
from torch import Tensor

__all__ = ["ms_deform_attn_traceable"]


def ms_deform_attn_traceable(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                             sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """``value [B,S,M,D]``, ``spatial_shapes [L,2]`` (H, W), ``level_start_index [L]``,
    ``sampling_locations [B,Q,M,L,P,2]`` (x, y in [0, 1]), ``attention_weights [B,Q,M,L,P]`` ->
    ``[B,Q,M*D]``."""
    B, S, M, D = value.shape
    Q = sampling_locations.shape[1]
    table = value.permute(0, 2, 1, 3).reshape(-1, D)
    table = torch.cat([table, table.new_zeros(1, D)], 0)
    zero_row = table.shape[0] - 1
    hw = spatial_shapes.to(sampling_locations.dtype)  # [L,2] (H, W)
    wh = hw.flip(-1)  # [L,2] (W, H)
    pix = sampling_locations * wh[:, None, :] - 0.5  # [B,Q,M,L,P,2]
    corner = pix.floor()
    frac = pix - corner
    x0 = corner[..., 0].long()
    y0 = corner[..., 1].long()
    fx, fy = frac[..., 0], frac[..., 1]
    w_lvl = spatial_shapes[:, 1][:, None]  # [L,1] broadcast over P
    h_lvl = spatial_shapes[:, 0][:, None]
    start = level_start_index[:, None]
    head = (torch.arange(B, device=value.device)[:, None, None, None, None] * M
            + torch.arange(M, device=value.device)[None, None, :, None, None]) * S  # [B,1,M,1,1]
    out = None
    for dy, dx, cw in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        x, y = x0 + dx, y0 + dy
        inside = (x >= 0) & (x < w_lvl) & (y >= 0) & (y < h_lvl)
        rows = torch.where(inside, head + start + y * w_lvl + x, torch.full_like(x, zero_row))
        term = (table[rows] * (cw * attention_weights)[..., None]).sum((3, 4))  # [B,Q,M,D]
        out = term if out is None else out + term
    return out.reshape(B, Q, M * D)
