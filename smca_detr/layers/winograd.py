"""Winograd F(2x2, 3x3) convolution for CPU inference (3x3, stride 1, padding 1, no groups).

A 3x3 convolution computes each 2x2 output tile from a 4x4 input tile. Winograd's minimal filtering
algorithm (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) writes it as

    Y = A^T [ (G g G^T) * (B^T d B) ] A        (* element-wise over the 4x4 positions)

so the channel contraction becomes 16 independent matrix products (one per position of the 4x4
transformed tile) of 2.25x fewer multiply-adds than the direct convolution, plus cheap additions
for the input / output transforms. For every position the products over all tiles and channels are
one ``[tiles, C] @ [C, K]`` GEMM, done here as a single ``baddbmm`` over the 16 positions.

When it pays: oneDNN's direct AVX2 kernels are efficient on wide maps and narrow channels, the GEMMs
here on deep channels and small maps. Measured on the project's 2-core CPU at one 640x800 image
(R50 3x3 convolutions, conv + bias + ReLU): 64 ch @ 160x200 14.1 ms oneDNN vs 32.7 ms here,
128 @ 80x100 15.6 vs 17.8, 256 @ 40x50 15.6 vs 11.8, 512 @ 20x25 27.3 vs 10.6. Callers therefore
pick it by input channels (:func:`smca_detr.modeling.fused_resnet.fused_resnet_forward`).

Accuracy: the transforms use only the exact coefficients 0, +-1 and 1/2, so the result equals the
direct convolution up to float32 rounding (about 1e-6 relative; tests/test_winograd.py checks it
against ``F.conv2d`` in float64 to ~1e-12).
"""
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["winograd_conv3x3", "winograd_conv3x3_train", "winograd_weight", "winograd_weight_differentiable"]

# G of F(2x2, 3x3): filter transform U = G g G^T (4x3).
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def _filter_transform(weight: torch.Tensor) -> torch.Tensor:
    """``U = G g G^T`` of every ``[K, C, 3, 3]`` filter as one GEMM, position-major ``[16, C, K]``.

    Row ``4 * a + b`` of ``kron(G, G)`` (16 x 9) holds ``G[a, i] * G[b, j]`` at column ``3 * i + j``,
    so ``kron(G, G) @ g`` (``g`` the 9 filter taps as rows, all (C, K) pairs as columns) is the
    transform. One wide GEMM instead of two thin contractions: 3-5x faster on CPU for R50's filters
    (and its autograd backward is the adjoint GEMM ``kron(G, G)^T dU``)."""
    if weight.dim() != 4 or tuple(weight.shape[-2:]) != (3, 3):
        raise ValueError(f"the Winograd filter transform expects a [K, C, 3, 3] filter, got {tuple(weight.shape)}")
    k, c = weight.shape[:2]
    g = torch.tensor(_G, dtype=weight.dtype, device=weight.device)
    taps = weight.permute(2, 3, 1, 0).reshape(9, c * k)
    return (torch.kron(g, g) @ taps).view(16, c, k)


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """Transformed filters for :func:`winograd_conv3x3`.

    ``weight``: ``[K, C, 3, 3]``; returns ``[16, C, K]`` (position-major: row ``4 * a + b`` is the
    filter at position ``(a, b)`` of the 4x4 transformed tile), computed in float64 and cast back to
    ``weight.dtype``."""
    return _filter_transform(weight.detach().to(torch.float64)).to(weight.dtype)


# Both rows of A^T (``[1, 1, 1, 0]`` and ``[0, 1, -1, -1]``) have coefficient 1 at position 1, so a value
# added at transformed position (1, 1) (row 4 * 1 + 1 of the 16 products) reaches every pixel of the
# 2x2 output tile exactly once: that is where the bias goes (one [tiles, K] add instead of a
# broadcast over all 16 positions).
_BIAS_POSITION = 5


def winograd_conv3x3(x: torch.Tensor, u: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     relu: bool = False) -> torch.Tensor:
    """``conv2d(x, w, b, stride=1, padding=1)`` (then ReLU if ``relu``) via Winograd F(2x2, 3x3).

    ``x``: ``[N, C, H, W]`` (channels-last memory is used as is, other layouts are converted);
    ``u = winograd_weight(w)``; ``bias``: ``[K]`` or None. Returns ``[N, K, H, W]`` in
    channels-last memory format. Inference only: the transforms write into preallocated buffers
    (``out=``), which autograd cannot record, so inputs that require grad are refused."""
    if torch.is_grad_enabled() and (x.requires_grad or u.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        raise RuntimeError("winograd_conv3x3 is inference-only (no autograd); call it under torch.no_grad()")
    n, c, h, w = x.shape
    if u.dim() != 3 or u.shape[0] != 16 or u.shape[1] != c:
        raise ValueError(f"transformed filter {tuple(u.shape)} does not match input channels {c}")
    th, tw = (h + 1) // 2, (w + 1) // 2
    v = _input_transform(x, th, tw)
    m = torch.bmm(v, u)  # the 16 position-wise GEMMs
    if bias is not None:
        m[_BIAS_POSITION].add_(bias)
    return _output_transform(m, n, h, w, th, tw, relu)


def winograd_weight_differentiable(weight: torch.Tensor) -> torch.Tensor:
    """:func:`winograd_weight` in ``weight.dtype`` and recorded by autograd (for training: the
    gradient of the transformed filters flows back to ``weight`` as ``G^T dU G``)."""
    return _filter_transform(weight)


def _input_transform(x: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """``[16, N*tH*tW, C]`` transformed input tiles B^T d B of ``x`` (NCHW, 1 pixel zero padding)."""
    n, c, h, w = x.shape
    p = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1 + 2 * tw - w, 1, 1 + 2 * th - h))
    r0, r1, r2, r3 = (p[:, i:i + 2 * th:2] for i in range(4))
    s = p.new_empty((4, n, th, p.shape[2], c))
    torch.sub(r0, r2, out=s[0])
    torch.add(r1, r2, out=s[1])
    torch.sub(r2, r1, out=s[2])
    torch.sub(r1, r3, out=s[3])
    c0, c1, c2, c3 = (s[:, :, :, i:i + 2 * tw:2] for i in range(4))
    v = p.new_empty((4, 4, n, th, tw, c))
    torch.sub(c0, c2, out=v[:, 0])
    torch.add(c1, c2, out=v[:, 1])
    torch.sub(c2, c1, out=v[:, 2])
    torch.sub(c1, c3, out=v[:, 3])
    return v.view(16, n * th * tw, c)


def _output_transform(m: torch.Tensor, n: int, h: int, w: int, th: int, tw: int, relu: bool) -> torch.Tensor:
    """A^T M A of the ``[16, N*tH*tW, K]`` products, as ``[N, K, H, W]`` channels-last."""
    k = m.shape[-1]
    m = m.view(4, 4, n, th, tw, k)
    z = m.new_empty((2, 4, n, th, tw, k))
    torch.add(m[0], m[1], out=z[0]).add_(m[2])
    torch.sub(m[1], m[2], out=z[1]).sub_(m[3])
    out = m.new_empty((n, th, 2, tw, 2, k))
    for i in range(2):
        torch.add(z[i, 0], z[i, 1], out=out[:, :, i, :, 0]).add_(z[i, 2])
        torch.sub(z[i, 1], z[i, 2], out=out[:, :, i, :, 1]).sub_(z[i, 3])
    if relu:
        out.relu_()
    out = out.view(n, 2 * th, 2 * tw, k)
    if 2 * th != h or 2 * tw != w:
        out = out[:, :h, :w].contiguous()
    return out.permute(0, 3, 1, 2)


class _Winograd3x3(torch.autograd.Function):
    """conv2d(x, w, stride 1, padding 1) + bias with the filters given already transformed (``u``).

    Backward, all in the Winograd domain (adjoints of the forward's linear maps):
      dM = A dY A^T per 2x2 output tile; dU = V^T dM and dV = dM U^T (16 GEMMs each);
      dx = overlap-add of B dV B^T over the 4x4 input tiles; dbias = sum of dY."""

    @staticmethod
    def forward(ctx, x, u, bias):
        n, c, h, w = x.shape
        th, tw = (h + 1) // 2, (w + 1) // 2
        v = _input_transform(x, th, tw)
        m = torch.bmm(v, u)
        if bias is not None:
            m[_BIAS_POSITION].add_(bias)
        ctx.save_for_backward(v, u)
        ctx.dims = (n, c, h, w, th, tw)
        ctx.has_bias = bias is not None
        return _output_transform(m, n, h, w, th, tw, relu=False)

    @staticmethod
    def backward(ctx, gy):
        v, u = ctx.saved_tensors
        n, c, h, w, th, tw = ctx.dims
        k = u.shape[2]
        g = gy.permute(0, 2, 3, 1)  # NHWC view
        if 2 * th != h or 2 * tw != w:
            g = F.pad(g, (0, 0, 0, 2 * tw - w, 0, 2 * th - h))
        g = g.contiguous().view(n, th, 2, tw, 2, k)
        # dM = A dY A^T: rows (A = [[1,0],[1,1],[1,-1],[0,-1]]), then columns
        r = g.new_empty((4, n, th, tw, 2, k))
        g0, g1 = g[:, :, 0], g[:, :, 1]  # [N, tH, tW, 2, K]
        r[0].copy_(g0)
        torch.add(g0, g1, out=r[1])
        torch.sub(g0, g1, out=r[2])
        torch.neg(g1, out=r[3])
        dm = g.new_empty((4, 4, n, th, tw, k))
        q0, q1 = r[..., 0, :], r[..., 1, :]  # [4, N, tH, tW, K]
        dm[:, 0].copy_(q0)
        torch.add(q0, q1, out=dm[:, 1])
        torch.sub(q0, q1, out=dm[:, 2])
        torch.neg(q1, out=dm[:, 3])
        dm = dm.view(16, n * th * tw, k)
        du = torch.bmm(v.transpose(1, 2), dm) if ctx.needs_input_grad[1] else None
        dx = None
        if ctx.needs_input_grad[0]:
            dv = torch.bmm(dm, u.transpose(1, 2)).view(4, 4, n, th, tw, c)
            # columns: adjoint of [c0-c2, c1+c2, c2-c1, c1-c3], overlap-added over the tiles
            ds = dv.new_zeros((4, n, th, 2 * tw + 2, c))
            ds[:, :, :, 0:2 * tw:2].add_(dv[:, 0])
            ds[:, :, :, 1:2 * tw + 1:2].add_(dv[:, 1]).sub_(dv[:, 2]).add_(dv[:, 3])
            ds[:, :, :, 2:2 * tw + 2:2].sub_(dv[:, 0]).add_(dv[:, 1]).add_(dv[:, 2])
            ds[:, :, :, 3:2 * tw + 2:2].sub_(dv[:, 3])
            # rows: same adjoint on the 4 row transforms
            dp = dv.new_zeros((n, 2 * th + 2, 2 * tw + 2, c))
            dp[:, 0:2 * th:2].add_(ds[0])
            dp[:, 1:2 * th + 1:2].add_(ds[1]).sub_(ds[2]).add_(ds[3])
            dp[:, 2:2 * th + 2:2].sub_(ds[0]).add_(ds[1]).add_(ds[2])
            dp[:, 3:2 * th + 2:2].sub_(ds[3])
            dx = dp[:, 1:h + 1, 1:w + 1].permute(0, 3, 1, 2)
        db = gy.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, du, db


def winograd_conv3x3_train(x: torch.Tensor, u: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Differentiable ``conv2d(x, w, bias, stride=1, padding=1)`` through Winograd F(2x2, 3x3), with
    ``u = winograd_weight_differentiable(w)`` (gradients reach ``x``, ``w`` via ``u``, and ``bias``).
    Returns ``[N, K, H, W]`` channels-last; ReLU is left to the caller."""
    if u.dim() != 3 or u.shape[0] != 16 or u.shape[1] != x.shape[1]:
        raise ValueError(f"transformed filter {tuple(u.shape)} does not match input channels {x.shape[1]}")
    return _Winograd3x3.apply(x, u, bias)
