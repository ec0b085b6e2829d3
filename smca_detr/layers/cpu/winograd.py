"""Winograd convolutions F(2x2, 3x3) and F(4x4, 3x3) for CPU (3x3, stride 1, padding 1, no groups).

A 3x3 convolution computes each m x m output tile (m = 2 or 4) from an (m+2) x (m+2) input tile.
Winograd's minimal filtering algorithm (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", 2016) writes it as

    Y = A^T [ (G g G^T) * (B^T d B) ] A        (* element-wise over the (m+2)^2 positions)

so the channel contraction becomes (m+2)^2 independent matrix products (one per position of the
transformed tile): 2.25x fewer multiply-adds than the direct convolution for F(2x2, 3x3) (16
products per 4 output pixels), 4x fewer for F(4x4, 3x3) (36 per 16), plus additions for the input /
output transforms. For every position the products over all tiles and channels are one
``[tiles, C] @ [C, K]`` GEMM, done here as a single ``bmm`` over the positions. The transforms are
element-wise PyTorch ops with shared sub-expressions (measured faster than one ``kron(B, B)`` GEMM
over gathered tiles, 11.7 vs 16.4 ms for 128 channels at 80x100, batch 2).

When it pays: oneDNN's direct AVX2 kernels are efficient on wide maps and narrow channels, the GEMMs
here on deep channels and small maps. F(4x4, 3x3) needs enough tiles to fill its GEMMs. Measured on
the project's 2-core CPU at one 640x800 image (R50 3x3 convolutions, conv + bias + ReLU), oneDNN /
F(2x2) / F(4x4) in ms: 64 ch @ 160x200 12.5 / 22.0 / 16.4, 128 @ 80x100 13.8 / 11.8 / 10.1,
256 @ 40x50 13.6 / 9.3 / 7.3, 512 @ 20x25 15.1 / 8.2 / 8.2. Callers therefore pick Winograd by
input channels and the tile size by the map size (:func:`winograd_tile`,
:func:`smca_detr.layers.cpu.fused_resnet.fused_resnet_forward`).

Accuracy: F(2x2, 3x3) uses only the exact coefficients 0, +-1 and 1/2, so it equals the direct
convolution up to float32 rounding (about 1e-6 relative). F(4x4, 3x3) has coefficients up to 8 and
1/24 (interpolation points 0, +-1, +-2), which amplify rounding: about 8e-6 relative to the largest
output in float32 (direct convolution: 2e-6), the price of its 4x fewer multiply-adds. Both are
checked against ``F.conv2d`` in float64 to ~1e-12 (tests/test_winograd.py).
"""
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["winograd_conv3x3", "winograd_conv3x3_train", "winograd_tile", "winograd_weight",
           "winograd_weight_differentiable"]

# G of F(2x2, 3x3) (4x3) and of F(4x4, 3x3) (6x3, interpolation points 0, 1, -1, 2, -2, infinity):
# the filter transform U = G g G^T.
_G = {
    2: ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)),
    4: ((1 / 4, 0.0, 0.0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
        (1 / 24, -1 / 12, 1 / 6), (0.0, 0.0, 1.0)),
}


def winograd_tile(h: int, w: int, f4_min_pixels: int) -> int:
    """Output tile size for a 3x3 convolution on an ``h x w`` map: 4 (F(4x4, 3x3)) when the map has at
    least ``f4_min_pixels`` pixels (``f4_min_pixels > 0``), else 2 (F(2x2, 3x3))."""
    return 4 if 0 < f4_min_pixels <= h * w else 2


def _tile_of(u: torch.Tensor) -> int:
    return {16: 2, 36: 4}.get(u.shape[0], 0) if u.dim() == 3 else 0


def _filter_transform(weight: torch.Tensor, tile: int = 2) -> torch.Tensor:
    """``U = G g G^T`` of every ``[K, C, 3, 3]`` filter as one GEMM, position-major ``[(tile+2)^2, C, K]``.

    Row ``(tile + 2) * a + b`` of ``kron(G, G)`` holds ``G[a, i] * G[b, j]`` at column ``3 * i + j``,
    so ``kron(G, G) @ g`` (``g`` the 9 filter taps as rows, all (C, K) pairs as columns) is the
    transform. One wide GEMM instead of two thin contractions: 3-5x faster on CPU for R50's filters
    (and its autograd backward is the adjoint GEMM ``kron(G, G)^T dU``)."""
    if weight.dim() != 4 or tuple(weight.shape[-2:]) != (3, 3):
        raise ValueError(f"the Winograd filter transform expects a [K, C, 3, 3] filter, got {tuple(weight.shape)}")
    if tile not in _G:
        raise ValueError(f"Winograd tile must be 2 (F(2x2, 3x3)) or 4 (F(4x4, 3x3)), got {tile}")
    k, c = weight.shape[:2]
    g = torch.tensor(_G[tile], dtype=weight.dtype, device=weight.device)
    taps = weight.permute(2, 3, 1, 0).reshape(9, c * k)
    return (torch.kron(g, g) @ taps).view((tile + 2) ** 2, c, k)


def winograd_weight(weight: torch.Tensor, tile: int = 2) -> torch.Tensor:
    """Transformed filters for :func:`winograd_conv3x3`.

    ``weight``: ``[K, C, 3, 3]``; ``tile``: 2 for F(2x2, 3x3), 4 for F(4x4, 3x3). Returns
    ``[(tile+2)^2, C, K]`` (position-major: row ``(tile + 2) * a + b`` is the filter at position
    ``(a, b)`` of the transformed tile), computed in float64 and cast back to ``weight.dtype``."""
    return _filter_transform(weight.detach().to(torch.float64), tile).to(weight.dtype)


# Every row of A^T has coefficient 1 at position 1 (F(2x2): [1, 1, 1, 0], [0, 1, -1, -1]; F(4x4):
# column 1 of A^T is all ones), so a value added at transformed position (1, 1) reaches every pixel
# of the output tile exactly once: that is where the bias goes (one [tiles, K] add instead of a
# broadcast over all positions).
_BIAS_POSITION = {2: 5, 4: 7}


def _check_filters(u: torch.Tensor, c: int) -> int:
    tile = _tile_of(u)
    if not tile or u.shape[1] != c:
        raise ValueError(f"transformed filter {tuple(u.shape)} does not match input channels {c} "
                         "(expected [16, C, K] for F(2x2, 3x3) or [36, C, K] for F(4x4, 3x3))")
    return tile


def winograd_conv3x3(x: torch.Tensor, u: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     relu: bool = False) -> torch.Tensor:
    """``conv2d(x, w, b, stride=1, padding=1)`` (then ReLU if ``relu``) via Winograd.

    ``x``: ``[N, C, H, W]`` (channels-last memory is used as is, other layouts are converted);
    ``u = winograd_weight(w, tile)`` (its first dimension, 16 or 36, selects F(2x2, 3x3) or
    F(4x4, 3x3)); ``bias``: ``[K]`` or None. Returns ``[N, K, H, W]`` in channels-last memory format.
    Inference only: the transforms write into preallocated buffers (``out=``), which autograd cannot
    record, so inputs that require grad are refused."""
    if torch.is_grad_enabled() and (x.requires_grad or u.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        raise RuntimeError("winograd_conv3x3 is inference-only (no autograd); call it under torch.no_grad()")
    _check_filters(u, x.shape[1])
    _, m, dims = _products(x, u, bias)
    return _output_transform(m, dims, relu)


def winograd_weight_differentiable(weight: torch.Tensor, tile: int = 2) -> torch.Tensor:
    """:func:`winograd_weight` in ``weight.dtype`` and recorded by autograd (for training: the
    gradient of the transformed filters flows back to ``weight`` as ``G^T dU G``)."""
    return _filter_transform(weight, tile)


def _input_transform2(x: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """F(2x2, 3x3): ``[16, N*tH*tW, C]`` transformed input tiles B^T d B of ``x`` (NCHW, 1 pixel zero padding)."""
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


def _output_tiles2(m: torch.Tensor, n: int, th: int, tw: int) -> torch.Tensor:
    """F(2x2, 3x3): A^T M A of the ``[16, N*tH*tW, K]`` products, as tiles ``[N, tH, 2, tW, 2, K]``."""
    k = m.shape[-1]
    m = m.view(4, 4, n, th, tw, k)
    z = m.new_empty((2, 4, n, th, tw, k))
    torch.add(m[0], m[1], out=z[0]).add_(m[2])
    torch.sub(m[1], m[2], out=z[1]).sub_(m[3])
    out = m.new_empty((n, th, 2, tw, 2, k))
    for i in range(2):
        torch.add(z[i, 0], z[i, 1], out=out[:, :, i, :, 0]).add_(z[i, 2])
        torch.sub(z[i, 1], z[i, 2], out=out[:, :, i, :, 1]).sub_(z[i, 3])
    return out


# F(4x4, 3x3). Each 1-D transform below is written with shared sub-expressions, so that a 2-D
# transform is two passes of a handful of element-wise ops (``out=`` into strided views):
#   B^T (6x6) = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
#                [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
#   A^T (4x6) = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]


def _bt4(r, out):
    """``out[a] = sum_i B^T[a, i] r[i]`` for the six rows ``r`` (tensors of one shape)."""
    a, b, c, d = (torch.empty_like(r[0]) for _ in range(4))
    torch.add(r[4], r[2], alpha=-4, out=a)  # r4 - 4 r2
    torch.add(r[3], r[1], alpha=-4, out=b)  # r3 - 4 r1
    torch.sub(r[4], r[2], out=c)
    torch.sub(r[3], r[1], out=d)
    torch.add(a, r[0], alpha=4, out=out[0]).sub_(r[2])
    torch.add(a, b, out=out[1])
    torch.sub(a, b, out=out[2])
    torch.add(c, d, alpha=2, out=out[3])
    torch.sub(c, d, alpha=2, out=out[4])
    torch.sub(r[5], b, out=out[5]).sub_(r[3], alpha=4)


def _at4(m, out):
    """``out[a] = sum_i A^T[a, i] m[i]`` for the six rows ``m``."""
    a, b, c, d = (torch.empty_like(out[0]) for _ in range(4))
    torch.add(m[1], m[2], out=a)
    torch.sub(m[1], m[2], out=b)
    torch.add(m[3], m[4], out=c)
    torch.sub(m[3], m[4], out=d)
    torch.add(a, c, out=out[0]).add_(m[0])
    torch.add(b, d, alpha=2, out=out[1])
    torch.add(a, c, alpha=4, out=out[2])
    torch.add(b, d, alpha=8, out=out[3]).add_(m[5])


def _a4(g, out):
    """Adjoint of :func:`_at4`: ``out[i] = sum_a A^T[a, i] g[a]`` for the four rows ``g``."""
    e, o, e2, o2 = (torch.empty_like(g[0]) for _ in range(4))
    torch.add(g[0], g[2], out=e)
    torch.add(g[1], g[3], out=o)
    torch.add(g[0], g[2], alpha=4, out=e2)
    torch.add(g[1], g[3], alpha=4, out=o2)  # (2 g1 + 8 g3) / 2
    out[0].copy_(g[0])
    torch.add(e, o, out=out[1])
    torch.sub(e, o, out=out[2])
    torch.add(e2, o2, alpha=2, out=out[3])
    torch.sub(e2, o2, alpha=2, out=out[4])
    out[5].copy_(g[3])


def _b4_overlap_add(dv, dst, dim: int):
    """Adjoint of :func:`_bt4` along one axis, overlap-added over the tiles: ``dd[i] = sum_a B^T[a, i]
    dv[a]`` goes to pixel ``4 t + i`` of tile ``t``. ``dst`` is ``[..., T + 1, 4, ...]`` (slot ``i`` of
    tile ``t`` at index ``(t, i)`` of dimensions ``dim``, ``dim + 1``); slots ``(t + 1, 0 / 1)`` also
    receive ``dd[4] / dd[5]`` of tile ``t``."""
    t = dv[0].shape[dim]
    slot = [dst.narrow(dim, 0, t).select(dim + 1, i) for i in range(4)]
    p, q, s, u = (torch.empty_like(dv[0]) for _ in range(4))
    torch.add(dv[1], dv[2], out=p)
    torch.sub(dv[2], dv[1], out=q)
    torch.add(dv[3], dv[4], out=s)
    torch.sub(dv[3], dv[4], out=u)
    torch.mul(dv[0], 4, out=slot[0])
    torch.add(q, dv[5], out=slot[1]).mul_(4).sub_(u, alpha=2)           # -4 dv1 + 4 dv2 - 2 dv3 + 2 dv4 + 4 dv5
    torch.add(s, p, alpha=4, out=slot[2]).add_(dv[0], alpha=5).neg_()  # -5 dv0 - 4 dv1 - 4 dv2 - dv3 - dv4
    torch.add(q, dv[5], alpha=5, out=slot[3]).sub_(u, alpha=2).neg_()  # dv1 - dv2 + 2 dv3 - 2 dv4 - 5 dv5
    dst.narrow(dim, t, 1).zero_()
    nxt = dst.narrow(dim, 1, t)
    nxt.select(dim + 1, 0).add_(dv[0]).add_(p).add_(s)                 # dv0 + dv1 + dv2 + dv3 + dv4
    nxt.select(dim + 1, 1).add_(dv[5])


def _input_transform4(x: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """F(4x4, 3x3): ``[36, N*tH*tW, C]`` transformed input tiles B^T d B of ``x`` (1 pixel zero padding)."""
    n, c, h, w = x.shape
    p = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 4 * tw + 1 - w, 1, 4 * th + 1 - h))
    s = p.new_empty((6, n, th, p.shape[2], c))
    _bt4([p[:, i:i + 4 * th:4] for i in range(6)], s)
    v = p.new_empty((6, 6, n, th, tw, c))
    _bt4([s[:, :, :, i:i + 4 * tw:4] for i in range(6)], [v[:, j] for j in range(6)])
    return v.view(36, n * th * tw, c)


def _output_tiles4(m: torch.Tensor, n: int, th: int, tw: int) -> torch.Tensor:
    """F(4x4, 3x3): A^T M A of the ``[36, N*tH*tW, K]`` products, as tiles ``[N, tH, 4, tW, 4, K]``."""
    k = m.shape[-1]
    m = m.view(6, 6, n, th, tw, k)
    z = m.new_empty((4, 6, n, th, tw, k))
    _at4(m, z)
    out = m.new_empty((n, th, 4, tw, 4, k))
    _at4([z[:, j].permute(1, 2, 0, 3, 4) for j in range(6)], [out[:, :, :, :, j] for j in range(4)])
    return out


_INPUT_TRANSFORM = {2: _input_transform2, 4: _input_transform4}
_OUTPUT_TILES = {2: _output_tiles2, 4: _output_tiles4}


def _products(x: torch.Tensor, u: torch.Tensor, bias: Optional[torch.Tensor]):
    """(transformed input ``V``, position-wise products ``M = V U`` with the bias, dims) of the
    convolution of ``x`` with the transformed filters ``u``; dims = (tile, N, C, H, W, tH, tW)."""
    n, c, h, w = x.shape
    tile = _tile_of(u)
    th, tw = -(-h // tile), -(-w // tile)
    v = _INPUT_TRANSFORM[tile](x, th, tw)
    m = torch.bmm(v, u)  # the position-wise GEMMs
    if bias is not None:
        m[_BIAS_POSITION[tile]].add_(bias)
    return v, m, (tile, n, c, h, w, th, tw)


def _output_transform(m: torch.Tensor, dims: tuple, relu: bool) -> torch.Tensor:
    """A^T M A of the products (then ReLU), cropped to ``[N, K, H, W]`` in channels-last memory."""
    tile, n, _, h, w, th, tw = dims
    out = _OUTPUT_TILES[tile](m, n, th, tw)
    if relu:
        out.relu_()
    out = out.view(n, tile * th, tile * tw, m.shape[-1])
    if tile * th != h or tile * tw != w:
        out = out[:, :h, :w].contiguous()
    return out.permute(0, 3, 1, 2)


def _output_adjoint(gy: torch.Tensor, tile: int, th: int, tw: int) -> torch.Tensor:
    """dM = A dY A^T of every output tile of ``gy`` (``[N, K, H, W]``), ``[(tile+2)^2, N*tH*tW, K]``."""
    n, k, h, w = gy.shape
    g = gy.permute(0, 2, 3, 1)  # NHWC view
    if tile * th != h or tile * tw != w:
        g = F.pad(g, (0, 0, 0, tile * tw - w, 0, tile * th - h))
    g = g.contiguous().view(n, th, tile, tw, tile, k)
    if tile == 2:
        # rows (A = [[1,0],[1,1],[1,-1],[0,-1]]), then columns
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
        return dm.view(16, n * th * tw, k)
    r = g.new_empty((6, n, th, tw, 4, k))
    _a4([g[:, :, a] for a in range(4)], r)
    dm = g.new_empty((6, 6, n, th, tw, k))
    _a4([r[..., b, :] for b in range(4)], [dm[:, j] for j in range(6)])
    return dm.view(36, n * th * tw, k)


def _input_adjoint(dv: torch.Tensor, tile: int, n: int, c: int, h: int, w: int, th: int, tw: int) -> torch.Tensor:
    """dx: overlap-add of B dV B^T over the input tiles (adjoint of the input transform), ``[N, C, H, W]``."""
    if tile == 2:
        dv = dv.view(4, 4, n, th, tw, c)
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
        return dp[:, 1:h + 1, 1:w + 1].permute(0, 3, 1, 2)
    dv = dv.view(6, 6, n, th, tw, c)
    ds = dv.new_empty((6, n, th, tw + 1, 4, c))  # columns: pixel 4 t + i at (t, i)
    _b4_overlap_add([dv[:, b] for b in range(6)], ds, dim=3)
    ds = ds.view(6, n, th, 4 * tw + 4, c)
    dp = dv.new_empty((n, th + 1, 4, 4 * tw + 4, c))  # rows
    _b4_overlap_add(ds, dp, dim=1)
    return dp.view(n, 4 * th + 4, 4 * tw + 4, c)[:, 1:h + 1, 1:w + 1].permute(0, 3, 1, 2)


class _Winograd3x3(torch.autograd.Function):
    """conv2d(x, w, stride 1, padding 1) + bias with the filters given already transformed (``u``:
    ``[16, C, K]`` for F(2x2, 3x3), ``[36, C, K]`` for F(4x4, 3x3)).

    Backward, all in the Winograd domain (adjoints of the forward's linear maps):
      dM = A dY A^T per output tile; dU = V^T dM and dV = dM U^T (one GEMM per position each);
      dx = overlap-add of B dV B^T over the input tiles; dbias = sum of dY."""

    @staticmethod
    def forward(ctx, x, u, bias, relu: bool):
        v, m, ctx.dims = _products(x, u, bias)
        out = _output_transform(m, ctx.dims, relu)
        ctx.save_for_backward(v, u, out if relu else None)
        ctx.has_bias, ctx.relu = bias is not None, relu
        return out

    @staticmethod
    def backward(ctx, gy):
        v, u, out = ctx.saved_tensors
        if ctx.relu:
            gy = torch.ops.aten.threshold_backward(gy, out, 0)
        tile, n, c, h, w, th, tw = ctx.dims
        dm = _output_adjoint(gy, tile, th, tw)
        du = torch.bmm(v.transpose(1, 2), dm) if ctx.needs_input_grad[1] else None
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _input_adjoint(torch.bmm(dm, u.transpose(1, 2)), tile, n, c, h, w, th, tw)
        db = gy.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, du, db, None


def winograd_conv3x3_train(x: torch.Tensor, u: torch.Tensor, bias: Optional[torch.Tensor] = None,
                           relu: bool = False) -> torch.Tensor:
    """Differentiable ``conv2d(x, w, bias, stride=1, padding=1)`` (then ReLU if ``relu``, applied in
    the output transform; its output is kept for the backward mask) through Winograd, with
    ``u = winograd_weight_differentiable(w, tile)`` (16 or 36 positions: F(2x2, 3x3) or F(4x4, 3x3);
    gradients reach ``x``, ``w`` via ``u``, and ``bias``). Returns ``[N, K, H, W]`` in channels-last
    memory (a view: copy it before modifying it in place)."""
    _check_filters(u, x.shape[1])
    return _Winograd3x3.apply(x, u, bias, bool(relu))
