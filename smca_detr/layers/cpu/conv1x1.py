"""Differentiable 1x1 convolution as per-image GEMMs, reading and writing NCHW or channels-last memory.

A 1x1 convolution of one image is a matrix product: ``Y = W X + b`` with ``X`` the ``[C, H*W]``
input (NCHW memory) or the transpose of its ``[H*W, C]`` rows (channels-last memory, a transposed
operand the GEMM takes as is), ``W`` the ``[K, C]`` filters. Its backward is two more GEMMs per
image: ``dX = W^T dY`` and ``dW = sum_n dY_n X_n^T``.

Why not ``F.conv2d``: on CPU, oneDNN reorders NCHW inputs, outputs and gradients to its blocked
layout around every call and its backward-weights kernel is slow on large maps. Forward + backward
at batch 2 on the project's 2-core CPU, ``F.conv2d`` (NCHW) vs these GEMMs (median of 7 alternating
runs): 512->128 at 80x100 101 vs 62 ms, 128->512 at 80x100 94 vs 61 ms, 256->128 at 160x200 with
the weight gradient only 205 vs 81 ms, 256->512 stride 2 from 160x200 (weights only) 175 vs 92 ms,
512->1024 stride 2 from 80x100 180 vs 110 ms; on 40x50 maps both are equal within the noise, on
20x25 oneDNN is faster. Callers therefore take this path by map size
(:func:`smca_detr.layers.cpu.fused_resnet.fused_training_forward`).

The output layout is chosen by the caller (``channels_last``: the next op is a Winograd convolution,
which reads channels-last rows); the input gradient comes back in the input's layout, so no layout
conversion is ever needed. A fused ReLU saves its output for the mask, as ``F.relu`` does. Exact:
same products and sums as the direct convolution, float64 results equal ``F.conv2d``'s to rounding
(tests/test_conv1x1.py).
"""
from typing import Optional, Tuple, Union

import torch

__all__ = ["conv1x1_gemm"]

_CL = torch.channels_last


def _is_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=_CL)


def _matrices(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, H*W]`` view of an NCHW- or channels-last-contiguous ``[N, C, H, W]`` tensor (for
    channels-last memory a transposed view of its ``[N, H*W, C]`` rows: no copy)."""
    n, c, h, w = x.shape
    if x.is_contiguous():
        return x.view(n, c, h * w)
    return x.permute(0, 2, 3, 1).reshape(n, h * w, c).transpose(1, 2)


def _empty(shape, like: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device,
                       memory_format=_CL if channels_last else torch.contiguous_format)


def _products(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """``out[i] = a[i] @ b[i] (+ bias)`` for every image ``i`` (``a`` or ``b`` may be 2-D: shared)."""
    for i in range(out.shape[0]):
        ai = a if a.dim() == 2 else a[i]
        bi = b if b.dim() == 2 else b[i]
        if bias is None:
            torch.mm(ai, bi, out=out[i])
        else:
            torch.addmm(bias, ai, bi, out=out[i])


class _Conv1x1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride: Tuple[int, int], relu: bool, channels_last: bool):
        x_cl = _is_channels_last(x)
        ctx.input_shape, ctx.input_cl, ctx.stride = x.shape, x_cl, stride
        if stride != (1, 1):
            x = x[:, :, ::stride[0], ::stride[1]].contiguous(memory_format=_CL if x_cl else torch.contiguous_format)
        elif not (x.is_contiguous() or x_cl):
            x = x.contiguous()
        n, c, h, w = x.shape
        k = weight.shape[0]
        xm = _matrices(x)
        y = _empty((n, k, h, w), x, channels_last)
        if channels_last:  # rows: Y_i^T = X_i^T W^T (+ b)
            _products(xm.transpose(1, 2), weight.t(), _matrices(y).transpose(1, 2),
                      None if bias is None else bias.view(1, k))
        else:
            _products(weight, xm, _matrices(y), None if bias is None else bias.view(k, 1))
        if relu:
            y.relu_()
        ctx.relu, ctx.has_bias = relu, bias is not None
        ctx.save_for_backward(x, weight, y if relu else None)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, y = ctx.saved_tensors
        if ctx.relu:
            gy = torch.ops.aten.threshold_backward(gy, y, 0)
        if not (gy.is_contiguous() or _is_channels_last(gy)):
            gy = gy.contiguous()
        gm, xm = _matrices(gy), _matrices(x)
        dx = dw = db = None
        if ctx.needs_input_grad[1]:
            dw = torch.mm(gm[0], xm[0].t())
            for i in range(1, gm.shape[0]):
                dw.addmm_(gm[i], xm[i].t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = gy.sum((0, 2, 3))
        if ctx.needs_input_grad[0]:
            n, _, h, w = gy.shape
            c = weight.shape[1]
            dxs = _empty((n, c, h, w), gy, ctx.input_cl)
            if ctx.input_cl:
                _products(gm.transpose(1, 2), weight, _matrices(dxs).transpose(1, 2), None)
            else:
                _products(weight.t(), gm, _matrices(dxs), None)
            if ctx.stride != (1, 1):
                dx = _empty(ctx.input_shape, gy, ctx.input_cl).zero_()
                dx[:, :, ::ctx.stride[0], ::ctx.stride[1]] = dxs
            else:
                dx = dxs
        return dx, dw, db, None, None, None


def conv1x1_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 stride: Union[int, Tuple[int, int]] = 1, relu: bool = False,
                 channels_last: bool = False) -> torch.Tensor:
    """``conv2d(x, weight, bias, stride)`` (then ReLU if ``relu``) for a 1x1 ``weight`` (``[K, C, 1, 1]``
    or ``[K, C]``), differentiable in all three. ``x``: ``[N, C, H, W]``, NCHW or channels-last memory
    (used as is; other strides are copied). The output is channels-last memory if ``channels_last``,
    else NCHW."""
    if x.dim() != 4:
        raise ValueError(f"conv1x1_gemm expects a [N, C, H, W] input, got shape {tuple(x.shape)}")
    if weight.dim() == 4:
        if tuple(weight.shape[-2:]) != (1, 1):
            raise ValueError(f"conv1x1_gemm needs a 1x1 kernel, got weight shape {tuple(weight.shape)}")
        weight = weight.reshape(weight.shape[0], weight.shape[1])
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"conv1x1_gemm: weight has {weight.shape[1]} input channels, x has {x.shape[1]}")
    stride = (stride, stride) if isinstance(stride, int) else tuple(int(s) for s in stride)
    return _Conv1x1.apply(x, weight, bias, stride, bool(relu), bool(channels_last))
