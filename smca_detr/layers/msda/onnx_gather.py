"""Multi-scale deformable attention for ONNX export: the corner-gather formulation of
:mod:`.gather` written with shape-agnostic tensor operators only (no Python sizes, no
``embedding_bag``), so that a traced graph keeps every level's size dynamic and uses standard ONNX
operators (Floor, Where, one Gather and one MatMul per attention) - no custom op, no grid_sample.

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
    xs = torch.stack([x0, x0 + 1, x0, x0 + 1], -1)  # corners (x0,y0) (x0+1,y0) (x0,y0+1) (x0+1,y0+1)
    ys = torch.stack([y0, y0, y0 + 1, y0 + 1], -1)  # [B,Q,M,L,P,4]
    fx, fy = fx[..., None], fy[..., None]
    cw = torch.cat([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], -1)
    w_lvl, h_lvl, start = w_lvl[..., None], h_lvl[..., None], start[..., None]
    inside = (xs >= 0) & (xs < w_lvl) & (ys >= 0) & (ys < h_lvl)
    rows = torch.where(inside, head[..., None] + start + ys * w_lvl + xs, torch.full_like(xs, zero_row))
    weights = (cw * attention_weights[..., None]).reshape(B, Q, M, 1, -1)  # [B,Q,M,1,4LP]
    # one Gather of the 4LP rows per (b, q, m) and one batched MatMul with their weights
    out = torch.matmul(weights, table[rows.reshape(B, Q, M, -1)])  # [B,Q,M,1,D]
    return out.reshape(B, Q, M * D)
