"""Triton forward / backward kernels of multi-scale deformable attention (MSDA).

This module imports triton at import time; :mod:`smca_detr.layers.msda.op` imports it lazily (on
the first Triton use), so importing smca_detr never loads it. (torch itself may import triton, e.g.
through ``torch._dynamo``; that is outside this package.)

Design (rows = (query, head) pairs, channel-vectorised corner gathers, float32 / float64
accumulation, atomics for ``grad_value``, launch sizes, int32 / int64 offsets, clamped positions):
docs/SPEED.md, "MSDA Triton kernels".

``TRITON_INTERPRET=1``
----------------------
Kernels are wrapped with ``triton.jit`` lazily, once per mode, at launch time: with the
environment variable ``TRITON_INTERPRET=1`` set *when the kernel is launched*, the Triton
interpreter runs them on CPU tensors (slow; meant for tests). Without it, tensors must be on a
CUDA device.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import Dict, List, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import _check_shapes

__all__ = ["ms_deform_attn_triton_forward", "ms_deform_attn_triton_backward", "interpreter_enabled",
           "missing_triton_features", "LAUNCH_COUNTS"]

#: Number of kernel launches per (kernel name, "interpret" | "compiled"); lets tests check that
#: the Triton kernels really ran.
LAUNCH_COUNTS: Dict[Tuple[str, str], int] = {}

_INT32_LIMIT = 2**31 - 1


# Row sums use ``tl.reduce`` with triton's own sum combiner instead of ``tl.sum`` (and
# ``tl.full`` instead of ``tl.zeros``): ``tl.sum``/``tl.zeros`` are ``@triton.jit`` library functions
# that the interpreter can only call when TRITON_INTERPRET was already set when triton was first
# imported (torch often imports triton early), while ``tl.reduce``/``tl.full`` are builtins and the
# interpreter maps this combiner to ``numpy.sum``.
_sum_combine = getattr(tl.standard, "_sum_combine", None)
if _sum_combine is None:  # pragma: no cover - other triton versions

    def _sum_combine_fn(a, b):
        return a + b

    _sum_combine = triton.jit(_sum_combine_fn)


def missing_triton_features() -> List[str]:
    """The Triton language features the kernels use that this triton lacks (empty when it can run
    them): ``tl.static_range``, ``tl.reduce``, ``tl.full`` and ``tl.atomic_add(..., sem=)``.
    ``triton.knobs`` (Triton >= 3.4) is optional (see ``interpreter_enabled``)."""
    missing = [f"triton.language.{name}" for name in ("static_range", "reduce", "full", "atomic_add")
               if not hasattr(tl, name)]
    if hasattr(tl, "atomic_add"):
        try:
            has_sem = "sem" in inspect.signature(tl.atomic_add).parameters
        except (TypeError, ValueError):  # pragma: no cover - not introspectable
            has_sem = True
        if not has_sem:
            missing.append("triton.language.atomic_add(sem=...)")
    return missing


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its interpreter: ``TRITON_INTERPRET=1`` in the
    environment (read at call time) or ``triton.knobs.runtime.interpret`` set in code. Triton
    before 3.4 has no ``triton.knobs``: its ``triton.jit`` reads the environment variable, so that is
    what counts there."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_device(device: torch.device):
    """Context in which a Triton launch targets ``device``: Triton launches on the *current* CUDA
    device, so tensors on ``cuda:1`` in a process whose current device is 0 need
    ``torch.cuda.device(1)`` around the launch (a no-op context for CPU tensors, i.e. the
    interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _msda_fwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
    S, QM,
    M: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, IDX64: tl.constexpr,
):
    pid_r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    if IDX64:
        rows = rows.to(tl.int64)
    row_mask = rows < QM
    heads = rows % M
    chans = tl.arange(0, BLOCK_D)
    tile_mask = row_mask[:, None] & (chans < D)[None, :]

    value_b = value_ptr + b * S * (M * D)
    la_idx = (b * QM + rows) * (L * P)  # int64: index of (row, level 0, point 0) in attn
    acc = tl.full((BLOCK_R, BLOCK_D), 0.0, ACC)
    for lvl in tl.static_range(L):
        h_i = tl.load(shapes_ptr + 2 * lvl)
        w_i = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(starts_ptr + lvl)
        if not IDX64:
            h_i = h_i.to(tl.int32)
            w_i = w_i.to(tl.int32)
            start = start.to(tl.int32)
        h_f = h_i.to(ACC)
        w_f = w_i.to(ACC)
        for pt in tl.static_range(P):
            idx = la_idx + (lvl * P + pt)
            a = tl.load(attn_ptr + idx, mask=row_mask, other=0.0).to(ACC)
            x = tl.load(loc_ptr + 2 * idx, mask=row_mask, other=0.0).to(ACC) * w_f - 0.5
            y = tl.load(loc_ptr + 2 * idx + 1, mask=row_mask, other=0.0).to(ACC) * h_f - 0.5
            x = tl.minimum(tl.maximum(x, -2.0), w_f + 1.0)
            y = tl.minimum(tl.maximum(y, -2.0), h_f + 1.0)
            x0f = tl.floor(x)
            y0f = tl.floor(y)
            lx = x - x0f
            ly = y - y0f
            hx = 1.0 - lx
            hy = 1.0 - ly
            x0 = x0f.to(h_i.dtype)
            y0 = y0f.to(h_i.dtype)
            in_x0 = (x0 >= 0) & (x0 < w_i)
            in_x1 = (x0 >= -1) & (x0 + 1 < w_i)
            in_y0 = row_mask & (y0 >= 0) & (y0 < h_i)
            in_y1 = row_mask & (y0 >= -1) & (y0 + 1 < h_i)
            off00 = ((start + y0 * w_i + x0) * M + heads) * D
            off01 = off00 + M * D
            off10 = off00 + w_i * (M * D)
            off11 = off10 + M * D
            v00 = tl.load(value_b + off00[:, None] + chans[None, :],
                          mask=tile_mask & (in_y0 & in_x0)[:, None], other=0.0).to(ACC)
            v01 = tl.load(value_b + off01[:, None] + chans[None, :],
                          mask=tile_mask & (in_y0 & in_x1)[:, None], other=0.0).to(ACC)
            v10 = tl.load(value_b + off10[:, None] + chans[None, :],
                          mask=tile_mask & (in_y1 & in_x0)[:, None], other=0.0).to(ACC)
            v11 = tl.load(value_b + off11[:, None] + chans[None, :],
                          mask=tile_mask & (in_y1 & in_x1)[:, None], other=0.0).to(ACC)
            acc += ((a * hy * hx)[:, None] * v00 + (a * hy * lx)[:, None] * v01
                    + (a * ly * hx)[:, None] * v10 + (a * ly * lx)[:, None] * v11)
    out_off = (b * QM + rows) * D
    tl.store(out_ptr + out_off[:, None] + chans[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=tile_mask)


def _msda_bwd_kernel(
    grad_out_ptr, value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr,
    grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
    S, QM,
    M: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, IDX64: tl.constexpr,
):
    pid_r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    if IDX64:
        rows = rows.to(tl.int64)
    row_mask = rows < QM
    heads = rows % M
    chans = tl.arange(0, BLOCK_D)
    tile_mask = row_mask[:, None] & (chans < D)[None, :]

    value_b = value_ptr + b * S * (M * D)
    grad_value_b = grad_value_ptr + b * S * (M * D)
    out_off = (b * QM + rows) * D
    g = tl.load(grad_out_ptr + out_off[:, None] + chans[None, :], mask=tile_mask, other=0.0).to(ACC)
    la_idx = (b * QM + rows) * (L * P)
    for lvl in tl.static_range(L):
        h_i = tl.load(shapes_ptr + 2 * lvl)
        w_i = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(starts_ptr + lvl)
        if not IDX64:
            h_i = h_i.to(tl.int32)
            w_i = w_i.to(tl.int32)
            start = start.to(tl.int32)
        h_f = h_i.to(ACC)
        w_f = w_i.to(ACC)
        for pt in tl.static_range(P):
            idx = la_idx + (lvl * P + pt)
            a = tl.load(attn_ptr + idx, mask=row_mask, other=0.0).to(ACC)
            x = tl.load(loc_ptr + 2 * idx, mask=row_mask, other=0.0).to(ACC) * w_f - 0.5
            y = tl.load(loc_ptr + 2 * idx + 1, mask=row_mask, other=0.0).to(ACC) * h_f - 0.5
            x = tl.minimum(tl.maximum(x, -2.0), w_f + 1.0)
            y = tl.minimum(tl.maximum(y, -2.0), h_f + 1.0)
            x0f = tl.floor(x)
            y0f = tl.floor(y)
            lx = x - x0f
            ly = y - y0f
            hx = 1.0 - lx
            hy = 1.0 - ly
            x0 = x0f.to(h_i.dtype)
            y0 = y0f.to(h_i.dtype)
            in_x0 = (x0 >= 0) & (x0 < w_i)
            in_x1 = (x0 >= -1) & (x0 + 1 < w_i)
            in_y0 = row_mask & (y0 >= 0) & (y0 < h_i)
            in_y1 = row_mask & (y0 >= -1) & (y0 + 1 < h_i)
            off00 = ((start + y0 * w_i + x0) * M + heads) * D
            off01 = off00 + M * D
            off10 = off00 + w_i * (M * D)
            off11 = off10 + M * D
            m00 = tile_mask & (in_y0 & in_x0)[:, None]
            m01 = tile_mask & (in_y0 & in_x1)[:, None]
            m10 = tile_mask & (in_y1 & in_x0)[:, None]
            m11 = tile_mask & (in_y1 & in_x1)[:, None]
            p00 = off00[:, None] + chans[None, :]
            p01 = off01[:, None] + chans[None, :]
            p10 = off10[:, None] + chans[None, :]
            p11 = off11[:, None] + chans[None, :]
            v00 = tl.load(value_b + p00, mask=m00, other=0.0).to(ACC)
            v01 = tl.load(value_b + p01, mask=m01, other=0.0).to(ACC)
            v10 = tl.load(value_b + p10, mask=m10, other=0.0).to(ACC)
            v11 = tl.load(value_b + p11, mask=m11, other=0.0).to(ACC)

            # d out / d a = <g, bilinear sample>
            sample = ((hy * hx)[:, None] * v00 + (hy * lx)[:, None] * v01
                      + (ly * hx)[:, None] * v10 + (ly * lx)[:, None] * v11)
            g_a = tl.reduce(g * sample, 1, _sum_combine)
            tl.store(grad_attn_ptr + idx, g_a.to(grad_attn_ptr.dtype.element_ty), mask=row_mask)

            # d sample / d x (pixel units) and d / d y; d x / d loc_x = W_l, d y / d loc_y = H_l
            ga = g * a[:, None]
            d_lx = hy[:, None] * (v01 - v00) + ly[:, None] * (v11 - v10)
            d_ly = hx[:, None] * (v10 - v00) + lx[:, None] * (v11 - v01)
            g_x = tl.reduce(ga * d_lx, 1, _sum_combine) * w_f
            g_y = tl.reduce(ga * d_ly, 1, _sum_combine) * h_f
            tl.store(grad_loc_ptr + 2 * idx, g_x.to(grad_loc_ptr.dtype.element_ty), mask=row_mask)
            tl.store(grad_loc_ptr + 2 * idx + 1, g_y.to(grad_loc_ptr.dtype.element_ty), mask=row_mask)

            # scatter into grad_value (several queries can hit the same pixel -> atomics)
            tl.atomic_add(grad_value_b + p00, ga * (hy * hx)[:, None], mask=m00, sem="relaxed")
            tl.atomic_add(grad_value_b + p01, ga * (hy * lx)[:, None], mask=m01, sem="relaxed")
            tl.atomic_add(grad_value_b + p10, ga * (ly * hx)[:, None], mask=m10, sem="relaxed")
            tl.atomic_add(grad_value_b + p11, ga * (ly * lx)[:, None], mask=m11, sem="relaxed")


_RAW_KERNELS = {"fwd": _msda_fwd_kernel, "bwd": _msda_bwd_kernel}
_JITTED: Dict[Tuple[str, bool], object] = {}


def _kernel(name: str):
    """The ``triton.jit`` wrapper of kernel ``name`` for the current TRITON_INTERPRET mode."""
    interpret = interpreter_enabled()
    key = (name, interpret)
    if key not in _JITTED:
        # triton.jit picks the compiler or the interpreter from TRITON_INTERPRET at decoration
        # time; decorating lazily, once per mode, lets the variable be set after import.
        _JITTED[key] = triton.jit(_RAW_KERNELS[name])
    mode = "interpret" if interpret else "compiled"
    LAUNCH_COUNTS[(name, mode)] = LAUNCH_COUNTS.get((name, mode), 0) + 1
    return _JITTED[key]


def _check_device(value: Tensor):
    if not value.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            "The Triton MSDA kernels need CUDA tensors (got device "
            f"'{value.device}'). Set TRITON_INTERPRET=1 to run them with the Triton interpreter "
            "on CPU (slow, for tests), or use impl='pytorch'."
        )


def _acc_dtype(dtype: torch.dtype):
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"MSDA Triton kernels support fp32/fp16/bf16/fp64, got {dtype}")
    return tl.float64 if dtype == torch.float64 else tl.float32


def _launch_config(QM: int, B: int, D: int, backward: bool) -> Tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps): tiles of ~2k (forward) / ~1k (backward) elements, shrunk
    while the grid has fewer than ~4 programs per SM of a large GPU (decoder-sized inputs)."""
    block_d = max(triton.next_power_of_2(D), 2)
    target = 1024 if backward else 2048
    block_r = max(16, min(128, target // block_d))
    while block_r > 16 and B * triton.cdiv(QM, block_r) < 512:
        block_r //= 2
    num_warps = 4 if block_r * block_d >= 1024 else 2
    return block_r, block_d, num_warps


def _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    _check_device(value)
    _check_shapes(value, sampling_locations, attention_weights, spatial_shapes.shape[0])
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    if tuple(spatial_shapes.shape) != (L, 2) or tuple(level_start_index.shape) != (L,):
        raise ValueError(
            f"spatial_shapes must be [{L}, 2] and level_start_index [{L}], got "
            f"{tuple(spatial_shapes.shape)} and {tuple(level_start_index.shape)}"
        )
    dev = value.device
    shapes = spatial_shapes.to(device=dev, dtype=torch.int64).contiguous()
    starts = level_start_index.to(device=dev, dtype=torch.int64).contiguous()
    loc = sampling_locations.to(dev).contiguous()
    attn = attention_weights.to(dev).contiguous()
    idx64 = S * M * D > _INT32_LIMIT or Q * M * L * P * 2 > _INT32_LIMIT
    return value.contiguous(), shapes, starts, loc, attn, (B, S, M, D, Q, L, P), idx64


def ms_deform_attn_triton_forward(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                                  sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Triton MSDA forward; same contract as ``ms_deform_attn_pytorch``. Returns ``[B, Q, M*D]``
    in ``value.dtype``."""
    value, shapes, starts, loc, attn, dims, idx64 = _prepare(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    B, S, M, D, Q, L, P = dims
    out = torch.empty((B, Q, M * D), device=value.device, dtype=value.dtype)
    if out.numel() == 0:
        return out.zero_()
    QM = Q * M
    block_r, block_d, warps = _launch_config(QM, B, D, backward=False)
    grid = (triton.cdiv(QM, block_r), B)
    with on_device(value.device):
        _kernel("fwd")[grid](
            value, shapes, starts, loc, attn, out, S, QM,
            M=M, D=D, L=L, P=P, BLOCK_R=block_r, BLOCK_D=block_d,
            ACC=_acc_dtype(value.dtype), IDX64=idx64, num_warps=warps,
        )
    return out


def ms_deform_attn_triton_backward(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor,
                                   level_start_index: Tensor, sampling_locations: Tensor,
                                   attention_weights: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Triton MSDA backward: ``(grad_value, grad_sampling_locations, grad_attention_weights)``,
    each in the dtype of the matching input (grad_value accumulated in fp32/fp64)."""
    value, shapes, starts, loc, attn, dims, idx64 = _prepare(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    B, S, M, D, Q, L, P = dims
    acc_torch = torch.float64 if value.dtype == torch.float64 else torch.float32
    grad_value = torch.zeros(value.shape, device=value.device, dtype=acc_torch)
    grad_loc = torch.zeros_like(loc)
    grad_attn = torch.zeros_like(attn)
    QM = Q * M
    if QM > 0 and B > 0 and S > 0:
        grad_output = grad_output.to(value.device).contiguous()
        block_r, block_d, warps = _launch_config(QM, B, D, backward=True)
        grid = (triton.cdiv(QM, block_r), B)
        with on_device(value.device):
            _kernel("bwd")[grid](
                grad_output, value, shapes, starts, loc, attn,
                grad_value, grad_loc, grad_attn, S, QM,
                M=M, D=D, L=L, P=P, BLOCK_R=block_r, BLOCK_D=block_d,
                ACC=_acc_dtype(value.dtype), IDX64=idx64, num_warps=warps,
            )
    return grad_value.to(value.dtype), grad_loc, grad_attn
