"""Fast pure-PyTorch multi-scale deformable attention: a sparse-gather forward and an analytic
backward, with no ``[B*M, D, Q, L*P]`` intermediate (the CPU path, training and inference).

Same contract and maths as the grid_sample oracle :func:`.reference.ms_deform_attn_pytorch`
(bilinear sampling, zero padding outside each level's map, ``align_corners=False``), up to float
rounding. Only stock PyTorch ops (nothing to compile).

Formulation
-----------
The values are copied into one head-major table ``[B * M * S_pad, D]`` in which every level's map
has a one-pixel ring of zeros (row ``(b * M + m) * S_pad + s``; ``s`` runs over the padded maps
``(H_l + 2) x (W_l + 2)``, level after level). A sampling point at pixel coordinates
``(x, y) = (loc_x * W_l - 0.5, loc_y * H_l - 0.5)`` has its top-left corner
``(x0, y0) = floor(x, y)``. When ``-1 <= x0 <= W_l - 1`` and ``-1 <= y0 <= H_l - 1`` its four
corners all lie in the padded map (those outside the real map read the zero ring); otherwise all
four are outside the map, the point contributes nothing and gets attention weight 0 (its corner is
clamped anywhere). So every point has four valid rows ``base + {0, 1, W_l + 2, W_l + 3}`` and no
per-corner masks are needed. Corner weights: ``a (1-fy)(1-fx), a (1-fy) fx, a fy (1-fx), a fy fx``
with ``(fx, fy) = (x - x0, y - y0)``. Bags (one per ``(b, m, q)``) are ordered head-major, which
keeps consecutive bags reading neighbouring table rows.

* forward: one ``F.embedding_bag`` (a bag of ``4 * L * P`` corner rows per ``(b, m, q)``);
* ``c = d out / d corner weight`` (the dot product of ``grad_output`` with each corner's value row):
  one ``torch.sparse.sampled_addmm`` (sampled dense-dense product) over the same bag x row pattern;
  the gradients of the attention weights and the locations follow from ``c`` by the chain rule
  through the bilinear weights;
* ``grad_value``: the transposed gather. The points are sorted by their top-left row once; for each
  corner, one ``F.embedding_bag`` over ``grad_output`` (a bag per table row, holding the points
  whose top-left corner is that row, weighted by the corner weight) gives that corner's
  contribution at the top-left row; the four, shifted by the corner offsets and cropped to the
  maps, add up to ``grad_value``.

Gradients at the (measure-zero) kinks of bilinear interpolation (integer pixel coordinates) are the
one-sided derivatives on the side of ``floor``, as in grid_sample; like there, the rounding of
``loc * W - 0.5`` may land on the other side of such a kink.

Computed in float32 or float64 (the promoted input dtype; float16 / bfloat16 inputs in float32).
"""
from __future__ import annotations

import warnings
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import _check_shapes, level_slices

__all__ = ["GatherPlan", "build_gather_plan", "gather_forward", "gather_backward", "ms_deform_attn_gather",
           "ms_deform_attn_gather_backward"]

# Index tensors are int32 below this size (int64 above); table rows are computed in floating point,
# exact below 2**24 in float32 (else float64 is used). Module constants so tests can force the
# large-size paths.
INT32_LIMIT = 2 ** 31
FLOAT32_EXACT_LIMIT = 2 ** 24


class GatherPlan(NamedTuple):
    """What the forward computes and the backward reuses (see the module docstring). Bags are
    ordered ``(b, m, q)``; ``K = L * P`` points per bag."""

    levels: List[Tuple[int, int, int]]  # (H_l, W_l, start_l)
    pad_starts: List[int]  # start of each padded level map along S_pad
    sizes: Tuple[int, int, int, int, int, int]  # B, Q, M, D, L, P
    table: Tensor  # [B * M * S_pad, D] zero-ringed values
    rows: Tensor  # [B*M*Q, 4, K] corner rows into ``table`` (int32; int64 for huge sizes)
    weights: Tensor  # [B*M*Q, 4, K] corner weights, attention weight included (0 if outside)
    frac: Tensor  # [B*M*Q, K, 2] (fx, fy) in [0, 1)
    attn: Tensor  # [B*M*Q, K] attention weights, 0 for points entirely outside their map
    valid: Tensor  # [B*M*Q, K] bool, False for points entirely outside their map
    scale: Tensor  # [2 * K] (W_l, H_l) per (level, point) = d pixel / d location


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _per_point(values: List[List[float]], n_points: int, dtype, device) -> Tensor:
    """``values[l]`` (one list per level) repeated for the ``n_points`` points of each level: a flat
    ``[L * P * len(values[l])]`` tensor in ``(level, point, ...)`` order."""
    t = torch.tensor(values, dtype=dtype, device=device)
    return t.repeat_interleave(n_points, dim=0).flatten()


def _head_major(t: Tensor) -> Tensor:
    """``[B, Q, M, ...]`` -> contiguous ``[B, M, Q, ...]``."""
    return t.transpose(1, 2).contiguous()


@torch.no_grad()
def build_gather_plan(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                      attention_weights: Tensor) -> GatherPlan:
    """Zero-ringed value table and the corner rows and weights of every sampling point (inputs as
    in :func:`.reference.ms_deform_attn_pytorch`). No autograd; the inputs are not modified."""
    levels = level_slices(spatial_shapes, level_start_index)
    _check_shapes(value, sampling_locations, attention_weights, len(levels))
    dtype = _compute_dtype(value, sampling_locations, attention_weights)
    dev = value.device
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    K, n_bags = L * P, B * M * Q
    pad_starts, s_pad = [], 0
    for h, w, _ in levels:
        pad_starts.append(s_pad)
        s_pad += (h + 2) * (w + 2)
    n_rows = B * M * s_pad
    index_dtype = torch.int32 if max(n_rows, 4 * n_bags * K + 1) < INT32_LIMIT else torch.int64
    row_dtype = torch.float64 if dtype == torch.float32 and n_rows >= FLOAT32_EXACT_LIMIT else dtype

    table = value.new_zeros((B, M, s_pad, D), dtype=dtype)
    for (h, w, start), ps in zip(levels, pad_starts):
        interior = table[:, :, ps:ps + (h + 2) * (w + 2)].view(B, M, h + 2, w + 2, D)[:, :, 1:-1, 1:-1]
        interior.copy_(value[:, start:start + h * w].reshape(B, h, w, M, D).permute(0, 3, 1, 2, 4))

    # pixel coordinates, top-left corner, fractions                            [B*M*Q, 2K]
    scale = _per_point([[w, h] for h, w, _ in levels], P, dtype, dev)
    pix = torch.empty((n_bags, 2 * K), dtype=dtype, device=dev)
    torch.mul(sampling_locations.transpose(1, 2), scale.view(L, P, 2), out=pix.view(B, M, Q, L, P, 2))
    pix.sub_(0.5)
    corner = pix.floor()
    frac = pix.sub_(corner).nan_to_num_(0.0)  # NaN only for non-finite locations (then invalid)
    clamped = corner.clamp(min=-1.0)
    torch.minimum(clamped, scale - 1, out=clamped)
    clamped.nan_to_num_(-1.0)
    inside = (clamped == corner).view(n_bags, K, 2)
    valid = torch.logical_and(inside[..., 0], inside[..., 1])

    # top-left row: (b * M + m) * S_pad + pad_start_l + (y0 + 1) * (W_l + 2) + (x0 + 1)
    xy = clamped.to(row_dtype).view(n_bags, K, 2)
    row_stride = _per_point([[w + 2] for _, w, _ in levels], P, row_dtype, dev)
    level_off = _per_point([[ps + w + 3] for (_, w, _), ps in zip(levels, pad_starts)], P, row_dtype,
                           dev)
    head_off = torch.arange(B * M, dtype=row_dtype, device=dev).view(B * M, 1, 1) * s_pad
    base = torch.addcmul(xy[..., 0], xy[..., 1], row_stride)
    base.view(B * M, Q, K).add_(head_off + level_off)
    corner_off = _per_point([[0, 1, w + 2, w + 3] for _, w, _ in levels], P, index_dtype, dev)
    rows = torch.empty((n_bags, 4, K), dtype=index_dtype, device=dev)
    torch.add(base.to(index_dtype).view(n_bags, 1, K), corner_off.view(K, 4).t(), out=rows)

    # corner weights (a new attention tensor: it is masked in place)
    attn = torch.empty((B, M, Q, L, P), dtype=dtype, device=dev)
    attn.copy_(attention_weights.transpose(1, 2))
    attn = attn.view(n_bags, K).masked_fill_(valid.logical_not(), 0.0)
    frac = frac.view(n_bags, K, 2)
    fx, fy = frac[..., 0], frac[..., 1]
    a_y1 = attn * fy
    a_y0 = attn - a_y1
    weights = torch.empty((n_bags, 4, K), dtype=dtype, device=dev)
    torch.mul(a_y0, fx, out=weights[:, 1])
    torch.sub(a_y0, weights[:, 1], out=weights[:, 0])
    torch.mul(a_y1, fx, out=weights[:, 3])
    torch.sub(a_y1, weights[:, 3], out=weights[:, 2])
    return GatherPlan(levels, pad_starts, (B, Q, M, D, L, P), table.view(n_rows, D), rows, weights,
                      frac, attn, valid, scale)


def _empty(plan: GatherPlan) -> bool:
    """No sampling point or no channel: the output and the gradients are zeros (or empty)."""
    return plan.rows.numel() == 0 or plan.table.numel() == 0


@torch.no_grad()
def gather_forward(plan: GatherPlan) -> Tensor:
    """MSDA output ``[B, Q, M*D]`` (in the plan's compute dtype)."""
    B, Q, M, D, L, P = plan.sizes
    if _empty(plan):
        return plan.table.new_zeros((B, Q, M * D))
    out = F.embedding_bag(
        plan.rows.view(B * M * Q, 4 * L * P),
        plan.table,
        per_sample_weights=plan.weights.view(B * M * Q, 4 * L * P),
        mode="sum",
    )
    return out.view(B, M, Q, D).transpose(1, 2).reshape(B, Q, M * D)


def _corner_dots(plan: GatherPlan, grad: Tensor) -> Tensor:
    """``c[i, j, k] = <grad[i], table[rows[i, j, k]]>`` ``[B*M*Q, 4, K]``: one sampled dense-dense
    product over the bag x row pattern of the corner rows."""
    n_bags, per_bag = grad.shape[0], plan.rows.shape[1] * plan.rows.shape[2]
    dots = grad.new_zeros(plan.rows.numel())  # with beta=0 it is still read: must be finite
    crow = torch.arange(0, dots.numel() + 1, per_bag, dtype=plan.rows.dtype, device=grad.device)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, plan.rows.view(-1), dots,
                                          (n_bags, plan.table.shape[0]), check_invariants=False)
        torch.sparse.sampled_addmm(pattern, grad, plan.table.t(), beta=0.0, out=pattern)
    return dots.view(plan.rows.shape)


def _value_grad(plan: GatherPlan, grad: Tensor) -> Tensor:
    """``grad_value [B, S, M, D]``: the transposed gather (see the module docstring)."""
    B, Q, M, D, L, P = plan.sizes
    K, n_rows = L * P, plan.table.shape[0]
    key, order = torch.sort(plan.rows[:, 0].reshape(-1))  # points by top-left row
    bag = order.div(K, rounding_mode="floor")
    offsets = torch.searchsorted(key, torch.arange(n_rows, dtype=key.dtype, device=key.device))
    # corner j of point p = bag * K + k has its weight at bag * 4K + j * K + k of plan.weights
    at = torch.add(order, bag, alpha=3 * K)
    flat_weights = plan.weights.view(-1)
    parts = []
    for j in range(4):
        if j:
            at += K
        # (per_sample_weights must be contiguous: embedding_bag ignores their strides)
        part = F.embedding_bag(bag, grad, offsets, per_sample_weights=flat_weights.index_select(0, at),
                               mode="sum")
        parts.append(part.view(B, M, -1, D))
    out = grad.new_empty((B, sum(h * w for h, w, _ in plan.levels), M, D))
    for (h, w, start), ps in zip(plan.levels, plan.pad_starts):
        t00, t01, t10, t11 = (p[:, :, ps:ps + (h + 2) * (w + 2)].view(B, M, h + 2, w + 2, D)
                              .permute(0, 2, 3, 1, 4) for p in parts)  # [B, h+2, w+2, M, D]
        dst = out[:, start:start + h * w].view(B, h, w, M, D)
        # padded (y+1, x+1) is corner 00 of top-left (y+1, x+1), 01 of (y+1, x), 10 of (y, x+1)
        # and 11 of (y, x)
        torch.add(t00[:, 1:-1, 1:-1], t01[:, 1:-1, :-2], out=dst)
        dst.add_(t10[:, :-2, 1:-1]).add_(t11[:, :-2, :-2])
    return out


@torch.no_grad()
def gather_backward(
    plan: GatherPlan, grad_output: Tensor, needs: Tuple[bool, bool, bool] = (True, True, True)
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients ``(value [B, S, M, D], sampling_locations [B, Q, M, L, P, 2], attention_weights
    [B, Q, M, L, P])`` for ``grad_output [B, Q, M*D]``, in the plan's compute dtype; those not in
    ``needs`` are not computed (``None``)."""
    B, Q, M, D, L, P = plan.sizes
    if _empty(plan):
        zeros = plan.table.new_zeros
        S = sum(h * w for h, w, _ in plan.levels)
        return tuple(zeros(shape) if need else None for shape, need in zip(
            ((B, S, M, D), (B, Q, M, L, P, 2), (B, Q, M, L, P)), needs))
    grad = _head_major(grad_output.reshape(B, Q, M, D).to(plan.table.dtype)).view(B * M * Q, D)
    grad_value = grad_loc = grad_attn = None
    if needs[0]:
        grad_value = _value_grad(plan, grad)
    if needs[1] or needs[2]:
        c00, c01, c10, c11 = _corner_dots(plan, grad).unbind(1)
        fx, fy = plan.frac[..., 0], plan.frac[..., 1]
        # (the last product of each writes the [B, Q, M, ...] layout of the inputs)
        if needs[2]:  # the bilinear sample; 0 for points entirely outside
            sample = torch.lerp(torch.lerp(c00, c01, fx), torch.lerp(c10, c11, fx), fy)
            grad_attn = sample.new_empty((B, Q, M, L, P))
            torch.mul(sample.view(B, M, Q, L, P).transpose(1, 2),
                      plan.valid.view(B, M, Q, L, P).transpose(1, 2), out=grad_attn)
        if needs[1]:
            slope = torch.empty_like(plan.frac)
            torch.lerp(c01 - c00, c11 - c10, fy, out=slope[..., 0])  # d sample / d fx
            torch.lerp(c10 - c00, c11 - c01, fx, out=slope[..., 1])  # d sample / d fy
            slope.mul_(plan.attn.unsqueeze(-1))
            grad_loc = slope.new_empty((B, Q, M, L, P, 2))
            torch.mul(slope.view(B, M, Q, L, P, 2).transpose(1, 2), plan.scale.view(L, P, 2),
                      out=grad_loc)
    return grad_value, grad_loc, grad_attn


def _cast(grads, dtypes):
    return tuple(None if g is None else g.to(dt) for g, dt in zip(grads, dtypes))


class _GatherFunction(torch.autograd.Function):
    """Autograd wrapper: the forward keeps its :class:`GatherPlan` for the backward."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        plan = build_gather_plan(value, spatial_shapes, level_start_index, sampling_locations,
                                 attention_weights)
        ctx.save_for_backward(*plan[3:])
        ctx.meta = plan[:3]
        ctx.dtypes = (value.dtype, sampling_locations.dtype, attention_weights.dtype)
        return gather_forward(plan).to(value.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        plan = GatherPlan(*ctx.meta, *ctx.saved_tensors)
        need = ctx.needs_input_grad
        grads = gather_backward(plan, grad_output, (need[0], need[3], need[4]))
        grad_value, grad_loc, grad_attn = _cast(grads, ctx.dtypes)
        return grad_value, None, None, grad_loc, grad_attn


def ms_deform_attn_gather(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                          sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Fast MSDA: same contract and result as :func:`.reference.ms_deform_attn_pytorch` (up to float
    rounding); ``[B, Q, M*D]`` in ``value``'s dtype.

    When a gradient is needed it is an autograd function with the analytic backward of the module
    docstring (once differentiable: no double backward; its forward keeps the corner rows and
    weights, about ``(4 * 4 + 4 * 4 + 13) * B*Q*M*L*P`` bytes in float32, plus a padded copy of
    ``value``); otherwise only the forward runs and nothing is kept.
    """
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if torch.is_grad_enabled() and (
        value.requires_grad or sampling_locations.requires_grad or attention_weights.requires_grad
    ):
        return _GatherFunction.apply(*args)
    return gather_forward(build_gather_plan(*args)).to(value.dtype)


def ms_deform_attn_gather_backward(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor,
                                   level_start_index: Tensor, sampling_locations: Tensor,
                                   attention_weights: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The analytic backward without autograd (rebuilds the plan): ``(grad_value,
    grad_sampling_locations, grad_attention_weights)`` in the inputs' dtypes. Same signature as
    :func:`.reference.ms_deform_attn_pytorch_backward`."""
    plan = build_gather_plan(value, spatial_shapes, level_start_index, sampling_locations,
                             attention_weights)
    grads = gather_backward(plan, grad_output)
    return _cast(grads, (value.dtype, sampling_locations.dtype, attention_weights.dtype))
