"""Multi-scale deformable attention: PyTorch reference, Triton kernels, custom op, module.

The Triton kernels run on CPU through the Triton interpreter: the ``interpret`` fixture sets
``TRITON_INTERPRET=1`` (monkeypatch, so it does not leak into other tests). The kernels are wrapped
with ``triton.jit`` lazily per mode at launch time, so setting the variable before the launch is
enough; ``test_triton_kernels_really_run_in_interpreter`` checks that the interpreter (not the
PyTorch path) produced the results. Float64 is supported by the interpreter and tested; fp16 and
bf16 too (loose tolerances). The CUDA test at the end runs only where a GPU is present.
"""
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smca_detr.layers import MSDeformAttn, add_msda_flop_handle, ms_deform_attn, msda_flop_jit
from smca_detr.layers.msda import op as msda_op
from smca_detr.layers.msda import (
    ms_deform_attn_gather,
    ms_deform_attn_gather_backward,
    ms_deform_attn_pytorch,
    ms_deform_attn_pytorch_backward,
    resolve_impl,
    triton_available,
)
from smca_detr.layers.msda.gather import build_gather_plan, gather_backward

REPO = Path(__file__).resolve().parents[1]
HAS_TRITON = triton_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")


# ----------------------------------------------------------------------------- helpers
def make_inputs(B, shapes, M, D, Q, P, dtype=torch.float32, seed=0, outside=0.3, pad=False,
                device="cpu"):
    """Random MSDA inputs; sampling locations in [-outside, 1 + outside] (some outside the map)."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), len(shapes)
    value = torch.randn(B, S, M, D, generator=g, dtype=torch.float64)
    if pad:  # padded positions hold zeros (as after MSDeformAttn's masked_fill)
        value[torch.rand(B, S, generator=g) < 0.3] = 0
    loc = torch.rand(B, Q, M, L, P, 2, generator=g, dtype=torch.float64) * (1 + 2 * outside) - outside
    attn = torch.rand(B, Q, M, L, P, generator=g, dtype=torch.float64)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return (cast(value), spatial_shapes.to(device), level_start.to(device), cast(loc), cast(attn))


def naive_msda(value, spatial_shapes, level_start_index, loc, attn):
    """Direct loop implementation of the official semantics (independent of grid_sample)."""
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = loc.shape
    out = torch.zeros(B, Q, M, D, dtype=value.dtype)
    for b in range(B):
        for q in range(Q):
            for m in range(M):
                for lvl in range(L):
                    H, W = (int(v) for v in spatial_shapes[lvl])
                    start = int(level_start_index[lvl])
                    for p in range(P):
                        x = float(loc[b, q, m, lvl, p, 0]) * W - 0.5
                        y = float(loc[b, q, m, lvl, p, 1]) * H - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= xx < W and 0 <= yy < H:
                                    out[b, q, m] += (attn[b, q, m, lvl, p] * wy * wx
                                                     * value[b, start + yy * W + xx, m])
    return out.reshape(B, Q, M * D)


def edge_inputs(n_queries):
    """float64 inputs (1 batch, levels 4x5 and 2x3, 2 heads, 3 channels, 2 points) whose first 7
    queries sample at: exact pixel centres, 0, 1, x = -1 exactly, +1e8, -1e8, y = H exactly."""
    value, shapes, starts, loc, attn = make_inputs(1, [(4, 5), (2, 3)], 2, 3, n_queries, 2,
                                                   dtype=torch.float64)
    W = shapes[:, 1].double().view(1, 1, 1, 2, 1)
    H = shapes[:, 0].double().view(1, 1, 1, 2, 1)
    loc[:, 0, ..., 0] = (torch.arange(2).view(1, 1, 1, 2) + 0.5) / W[..., 0]  # exact pixel centres
    loc[:, 0, ..., 1] = 1.5 / H[..., 0]
    loc[:, 1] = 0.0
    loc[:, 2] = 1.0
    loc[:, 3, :, :, :, 0] = -0.5 / W  # x = -1 exactly
    loc[:, 4] = 1e8
    loc[:, 5] = -1e8
    loc[:, 6, :, :, :, 1] = 1 + 0.5 / H  # y = H exactly
    return value, shapes, starts, loc, attn


def fwd_bwd(impl, inputs, grad_out=None):
    """Output and gradients of ``impl`` ("oracle": autograd through the grid_sample reference)."""
    value, shapes, starts, loc, attn = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    if impl == "oracle":
        out = ms_deform_attn_pytorch(leaves[0], shapes, starts, leaves[1], leaves[2])
    else:
        out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], impl=impl)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                               dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), grads, grad_out


def launches():
    if not HAS_TRITON:
        return {}
    from smca_detr.layers.msda.triton_kernels import LAUNCH_COUNTS

    return dict(LAUNCH_COUNTS)


@pytest.fixture
def interpret(monkeypatch):
    if not HAS_TRITON:
        pytest.skip("triton is not importable")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


# Small cases (the interpreter is slow): (B, level shapes, M, D, Q, P, padded values)
CASES = {
    "1lvl-D3": (1, [(5, 7)], 1, 3, 4, 1, False),
    "3lvl-D5": (2, [(6, 8), (3, 4), (2, 2)], 2, 5, 7, 2, False),
    "2lvl-D12-pad": (3, [(4, 5), (2, 3)], 3, 12, 5, 3, True),
    "4lvl-D32": (2, [(7, 9), (4, 5), (2, 3), (1, 2)], 2, 32, 6, 4, False),
    "Q1-M8-D8": (1, [(3, 3), (2, 2)], 8, 8, 1, 2, True),
}
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float64: dict(atol=1e-12, rtol=1e-10)}


# ----------------------------------------------------------------------------- reference
@pytest.mark.parametrize("case", ["1lvl-D3", "3lvl-D5", "2lvl-D12-pad"])
def test_reference_matches_naive_loop(case):
    B, shapes, M, D, Q, P, pad = CASES[case]
    inputs = make_inputs(B, shapes, M, D, Q, min(P, 2), dtype=torch.float64, pad=pad)
    torch.testing.assert_close(ms_deform_attn_pytorch(*inputs), naive_msda(*inputs),
                               atol=1e-12, rtol=1e-12)


def test_reference_gradcheck_float64():
    value, shapes, starts, loc, attn = make_inputs(2, [(4, 5), (2, 3)], 2, 3, 3, 2, dtype=torch.float64)
    fn = lambda v, l, a: ms_deform_attn_pytorch(v, shapes, starts, l, a)  # noqa: E731
    args = tuple(t.clone().requires_grad_() for t in (value, loc, attn))
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["3lvl-D5", "2lvl-D12-pad"])
def test_reference_analytic_backward_matches_autograd(case):
    B, shapes, M, D, Q, P, pad = CASES[case]
    value, shapes_t, starts, loc, attn = make_inputs(B, shapes, M, D, Q, P, dtype=torch.float64, pad=pad)
    _, grads, g = fwd_bwd("oracle", (value, shapes_t, starts, loc, attn))
    analytic = ms_deform_attn_pytorch_backward(g, value, shapes_t, starts, loc, attn)
    for name, a, e in zip(("value", "loc", "attn"), analytic, grads):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10, msg=lambda m: f"{name}: {m}")


def test_reference_mixed_dtypes_promote():
    value, shapes, starts, loc, attn = make_inputs(1, [(4, 4)], 2, 4, 3, 2, dtype=torch.float64)
    out = ms_deform_attn_pytorch(value.float(), shapes, starts, loc, attn.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ms_deform_attn_pytorch(value.float().double(), shapes, starts, loc,
                                                           attn.float().double()).float())


# ----------------------------------------------------------------------------- gather (CPU path)
def border_locations(shapes, Q, M, P, seed=0):
    """float64 locations ``[1, Q, M, L, P, 2]`` whose pixel coordinates (``loc * W - 0.5``) lie
    partly outside (x = ``-0.7``; x = ``W - 0.3`` with y = ``H - 0.6``), entirely outside
    (x = ``-1.4``, ``-5.2``; y = ``H + 0.2``) and inside each map, never on an integer (the kinks
    of bilinear interpolation)."""
    g = torch.Generator().manual_seed(seed)
    L = len(shapes)
    wh = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64).view(1, 1, 1, L, 1, 2)
    pix = torch.rand(1, Q, M, L, P, 2, generator=g, dtype=torch.float64) * (wh + 1) - 1
    pix = pix.floor() + 0.1 + 0.8 * torch.rand(pix.shape, generator=g, dtype=torch.float64)
    specials = torch.tensor([-0.7, -1.4, -5.2], dtype=torch.float64)
    pix[0, :3, 0, :, 0, 0] = specials.view(3, 1)  # x: partly / entirely / far outside (left)
    pix[0, :3, 0, :, 0, 1] = 0.4
    for lvl in range(L):
        w, h = float(wh[0, 0, 0, lvl, 0, 0]), float(wh[0, 0, 0, lvl, 0, 1])
        pix[0, 3, -1, lvl, -1] = torch.tensor([w - 0.3, h - 0.6], dtype=torch.float64)  # partly (both)
        pix[0, 4, -1, lvl, -1] = torch.tensor([0.3, h + 0.2], dtype=torch.float64)  # entirely (below)
    return (pix + 0.5) / wh


def gather_fwd_bwd(inputs, grad_out):
    value, shapes, starts, loc, attn = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn_gather(leaves[0], shapes, starts, leaves[1], leaves[2])
    return out.detach(), torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize("case", list(CASES))
def test_gather_matches_reference_float64(case):
    """Forward and all three gradients of the gather path vs autograd through grid_sample, element
    by element (float64; random locations, about a third outside their map)."""
    B, shapes, M, D, Q, P, pad = CASES[case]
    inputs = make_inputs(B, shapes, M, D, Q, P, dtype=torch.float64, pad=pad, seed=3)
    out_r, grads_r, g = fwd_bwd("oracle", inputs)
    out, grads = gather_fwd_bwd(inputs, g)
    torch.testing.assert_close(out, out_r, atol=1e-12, rtol=1e-10)
    for name, a, e in zip(("value", "sampling_locations", "attention_weights"), grads, grads_r):
        assert a.dtype == torch.float64 and a.shape == e.shape and a.is_contiguous(), name
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10, msg=lambda m: f"grad {name}: {m}")
    # the analytic backward without autograd (the custom op's CPU kernel) gives the same
    for name, a, e in zip(("value", "loc", "attn"), ms_deform_attn_gather_backward(g, *inputs), grads):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10, msg=lambda m: f"{name}: {m}")


def test_gather_gradcheck_border_points():
    """gradcheck (float64) of the public CPU training path, with points partly and entirely outside
    their maps; also checks it is the gather autograd function (not grid_sample)."""
    shapes = [(4, 5), (2, 3)]
    value, shapes_t, starts, _, attn = make_inputs(2, shapes, 2, 3, 5, 2, dtype=torch.float64)
    loc = torch.cat([border_locations(shapes, 5, 2, 2, seed=s) for s in (0, 1)])
    args = tuple(t.clone().requires_grad_() for t in (value, loc, attn))
    fn = lambda v, l, a: ms_deform_attn(v, shapes_t, starts, l, a, impl="pytorch")  # noqa: E731
    assert "_GatherFunction" in type(fn(*args).grad_fn).__name__
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)
    # and element-wise vs the grid_sample oracle on the same border points
    g = torch.randn(2, 5, 6, dtype=torch.float64)
    out_r, grads_r, _ = fwd_bwd("oracle", (value, shapes_t, starts, loc, attn), g)
    out, grads = gather_fwd_bwd((value, shapes_t, starts, loc, attn), g)
    torch.testing.assert_close(out, out_r, atol=1e-12, rtol=1e-10)
    for a, e in zip(grads, grads_r):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)
    # entirely outside: no output, no location / attention gradient
    gl, ga = grads[1], grads[2]
    assert torch.all(gl[:, 1:3, 0, :, 0] == 0) and torch.all(ga[:, 1:3, 0, :, 0] == 0)
    assert torch.all(gl[:, 4, -1, :, -1] == 0) and torch.all(ga[:, 4, -1, :, -1] == 0)
    assert torch.all(ga[:, 0, 0, :, 0] != 0)  # partly outside: still sampled


def test_gather_edge_locations_and_inputs_untouched():
    """Pixel centres, map borders, far-away and non-finite locations; non-contiguous inputs; the
    inputs are not modified (the attention weights are masked in a copy)."""
    value, shapes, starts, loc, attn = edge_inputs(9)
    loc[:, 7, :, :, 0] = float("inf")
    loc[:, 8, :, :, 0] = float("nan")
    loc_nc = loc.transpose(0, 1).contiguous().transpose(0, 1)
    attn_nc = attn.transpose(1, 2).contiguous().transpose(1, 2)
    before = [t.clone() for t in (value, loc, attn)]
    g = torch.randn(1, 9, 6, dtype=torch.float64)
    out, (gv, gl, ga) = gather_fwd_bwd((value, shapes, starts, loc_nc, attn_nc), g)
    for t, b in zip((value, loc_nc, attn_nc), before):
        assert torch.equal(t, b) or torch.equal(t.isnan(), b.isnan())
    assert torch.isfinite(out).all() and torch.isfinite(gv).all() and torch.isfinite(ga).all()
    assert torch.isfinite(gl).all()
    assert torch.all(out[:, 4:6] == 0) and torch.all(gl[:, 4:6] == 0) and torch.all(ga[:, 4:6] == 0)
    assert torch.all(ga[:, 7:9, :, :, 0] == 0) and torch.all(gl[:, 7:9, :, :, 0] == 0)
    finite = list(range(7))  # grid_sample has no defined result for inf / NaN locations
    out_r, grads_r, _ = fwd_bwd("oracle", (value, shapes, starts, loc[:, finite], attn[:, finite]),
                                g[:, finite])
    out_f, grads_f = gather_fwd_bwd((value, shapes, starts, loc[:, finite], attn[:, finite]), g[:, finite])
    torch.testing.assert_close(out[:, finite], out_r, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out_f, out_r, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grads_f[0], grads_r[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(grads_f[2], grads_r[2], atol=1e-10, rtol=1e-10)
    # d/d loc is one-sided at integer pixel positions (queries 0, 3, 6), where grid_sample's own
    # coordinate rounding may pick the other side: compare the smooth queries only
    smooth = [1, 2, 4, 5]
    torch.testing.assert_close(grads_f[1][:, smooth], grads_r[1][:, smooth], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_gather_low_precision_vs_float64_oracle(dtype):
    inputs = make_inputs(2, [(6, 8), (3, 4)], 2, 12, 5, 2, dtype=dtype, seed=5)
    g = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out, grads = gather_fwd_bwd(inputs, g.to(dtype))
    inputs64 = [t.double() if t.is_floating_point() else t for t in inputs]
    out_r, grads_r, _ = fwd_bwd("oracle", inputs64, g.to(dtype).double())
    rel = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype]
    for name, a, e in [("out", out, out_r)] + list(zip(("value", "loc", "attn"), grads, grads_r)):
        assert a.dtype == dtype, name
        err = float((a.double() - e).abs().max())
        assert err <= rel * float(e.abs().max()) + rel, f"{name}: max error {err}"


def test_gather_mixed_dtypes_and_partial_grads():
    value, shapes, starts, loc, attn = make_inputs(1, [(4, 4), (2, 2)], 2, 4, 3, 2, dtype=torch.float64)
    v32, a32 = value.float().requires_grad_(), attn.float()
    loc64 = loc.clone().requires_grad_()
    out = ms_deform_attn_gather(v32, shapes, starts, loc64, a32)  # computed in float64
    assert out.dtype == torch.float32
    gv, gl = torch.autograd.grad(out.sum(), (v32, loc64))
    assert gv.dtype == torch.float32 and gl.dtype == torch.float64
    _, grads_r, _ = fwd_bwd("oracle", (v32.detach().double(), shapes, starts, loc, a32.double()),
                            torch.ones(1, 3, 8, dtype=torch.float64))
    torch.testing.assert_close(gv.double(), grads_r[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gl, grads_r[1], atol=1e-6, rtol=1e-6)
    # only the gradients asked for are computed
    ones = torch.ones(1, 3, 8, dtype=torch.float64)
    _, grads64, _ = fwd_bwd("oracle", (value, shapes, starts, loc, attn), ones)
    grads = gather_backward(build_gather_plan(value, shapes, starts, loc, attn), ones,
                            (False, True, False))
    assert grads[0] is None and grads[2] is None
    torch.testing.assert_close(grads[1], grads64[1], atol=1e-10, rtol=1e-10)


def test_gather_large_size_paths(monkeypatch):
    """int64 indices and float64 row arithmetic (used for huge tables) give the same results."""
    from smca_detr.layers.msda import gather

    inputs = make_inputs(2, [(5, 7), (3, 2)], 2, 4, 6, 3, seed=4)
    g = torch.randn(2, 6, 8)
    out, grads = gather_fwd_bwd(inputs, g)
    assert build_gather_plan(*inputs).rows.dtype == torch.int32
    monkeypatch.setattr(gather, "INT32_LIMIT", 0)
    monkeypatch.setattr(gather, "FLOAT32_EXACT_LIMIT", 0)
    assert build_gather_plan(*inputs).rows.dtype == torch.int64
    out_l, grads_l = gather_fwd_bwd(inputs, g)
    torch.testing.assert_close(out_l, out)
    for a, e in zip(grads_l, grads):
        torch.testing.assert_close(a, e)


def test_gather_empty_and_no_grad():
    value, shapes, starts, loc, attn = make_inputs(2, [(3, 4), (2, 2)], 2, 4, 3, 2)
    leaves = [t.clone().requires_grad_() for t in (value, loc[:, :0], attn[:, :0])]
    out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], impl="pytorch")
    assert out.shape == (2, 0, 8)
    out.sum().backward()
    assert torch.all(leaves[0].grad == 0) and leaves[1].grad.shape == (2, 0, 2, 2, 2, 2)
    with torch.no_grad():
        out = ms_deform_attn(*(t.requires_grad_() if t.is_floating_point() else t
                               for t in (value, shapes, starts, loc, attn)), impl="pytorch")
    assert out.grad_fn is None
    torch.testing.assert_close(out, ms_deform_attn_pytorch(value, shapes, starts, loc, attn))


# ----------------------------------------------------------------------------- triton (interpreter)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference(interpret, case, dtype):
    B, shapes, M, D, Q, P, pad = CASES[case]
    inputs = make_inputs(B, shapes, M, D, Q, P, dtype=dtype, pad=pad, seed=list(CASES).index(case))
    before = launches()
    out_t, grads_t, g = fwd_bwd("triton", inputs)
    after = launches()
    assert after.get(("fwd", "interpret"), 0) == before.get(("fwd", "interpret"), 0) + 1
    assert after.get(("bwd", "interpret"), 0) == before.get(("bwd", "interpret"), 0) + 1
    out_r, grads_r, _ = fwd_bwd("oracle", inputs, g)
    assert out_t.dtype == dtype and out_t.shape == (B, Q, M * D)
    torch.testing.assert_close(out_t, out_r, **TOL[dtype])
    for name, a, e in zip(("value", "sampling_locations", "attention_weights"), grads_t, grads_r):
        assert a.dtype == dtype
        # location grads scale with the map size: compare relative to their magnitude
        atol = TOL[dtype]["atol"] * max(1.0, float(e.abs().max()))
        torch.testing.assert_close(a, e, atol=atol, rtol=TOL[dtype]["rtol"],
                                   msg=lambda m: f"grad {name}: {m}")


def test_triton_kernels_really_run_in_interpreter(interpret, monkeypatch):
    import triton.runtime.interpreter as tri_interp

    from smca_detr.layers.msda import reference, triton_kernels

    def boom(*a, **k):
        raise AssertionError("PyTorch reference used on the Triton path")

    # the custom op imports the PyTorch functions into op.py: make them all unusable
    for name in ("ms_deform_attn_pytorch", "ms_deform_attn_pytorch_backward", "ms_deform_attn_gather",
                 "ms_deform_attn_gather_backward", "gather_forward"):
        monkeypatch.setattr(msda_op, name, boom)
    monkeypatch.setattr(reference, "ms_deform_attn_pytorch", boom)
    value, shapes, starts, loc, attn = make_inputs(1, [(3, 4)], 2, 5, 3, 2)
    loc.requires_grad_()
    out = ms_deform_attn(value, shapes, starts, loc, attn, impl="triton")
    out.sum().backward()
    assert isinstance(triton_kernels._JITTED[("fwd", True)], tri_interp.InterpretedFunction)
    assert isinstance(triton_kernels._JITTED[("bwd", True)], tri_interp.InterpretedFunction)
    assert out.abs().sum() > 0 and loc.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_half_precision(interpret, dtype):
    inputs = make_inputs(2, [(6, 8), (3, 4)], 2, 12, 5, 2, dtype=dtype)
    out_t, grads_t, g = fwd_bwd("triton", inputs)
    # oracle: the same (rounded) inputs in float64
    inputs64 = [t.double() if t.is_floating_point() else t for t in inputs]
    out_r, grads_r, _ = fwd_bwd("oracle", inputs64, g.double())
    rel = 1e-2 if dtype == torch.float16 else 4e-2
    for name, a, e in [("out", out_t, out_r)] + list(zip(("value", "loc", "attn"), grads_t, grads_r)):
        assert a.dtype == dtype, name
        err = float((a.double() - e).abs().max())
        assert err <= rel * float(e.abs().max()) + 1e-3, f"{name}: max error {err}"


def test_triton_edge_locations(interpret):
    """Pixel centres, map borders, far-away and huge locations; non-contiguous inputs."""
    value, shapes, starts, loc, attn = edge_inputs(8)
    out_t, grads_t, g = fwd_bwd("triton", (value, shapes, starts, loc.transpose(0, 1).contiguous()
                                           .transpose(0, 1), attn))
    out_r, grads_r, _ = fwd_bwd("oracle", (value, shapes, starts, loc, attn), g)
    assert torch.all(out_t[:, 4:6] == 0)
    torch.testing.assert_close(out_t, out_r, atol=1e-12, rtol=1e-10)
    gv, gl, ga = grads_t
    torch.testing.assert_close(gv, grads_r[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ga, grads_r[2], atol=1e-10, rtol=1e-10)
    assert torch.all(gl[:, 4:6] == 0) and torch.all(ga[:, 4:6] == 0)
    # d/d loc is one-sided at integer pixel positions (queries 0, 3, 6), where grid_sample's own
    # coordinate rounding may pick the other side: compare the smooth queries only
    smooth = [1, 2, 4, 5, 7]
    torch.testing.assert_close(gl[:, smooth], grads_r[1][:, smooth], atol=1e-10, rtol=1e-10)
    assert torch.isfinite(gl).all()


# ----------------------------------------------------------------------------- impl selection
def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if HAS_TRITON:
        import triton

        if triton.knobs.runtime.interpret:
            pytest.skip("triton interpreter enabled in code")
    value, shapes, starts, loc, attn = make_inputs(1, [(3, 3)], 1, 4, 2, 1)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET" if HAS_TRITON else "triton"):
        ms_deform_attn(value, shapes, starts, loc, attn, impl="triton")


def test_unknown_impl_raises():
    value, shapes, starts, loc, attn = make_inputs(1, [(3, 3)], 1, 4, 2, 1)
    with pytest.raises(ValueError, match="impl"):
        ms_deform_attn(value, shapes, starts, loc, attn, impl="cuda")
    with pytest.raises(ValueError, match="impl"):
        MSDeformAttn(8, 1, 2, 1, impl="fast")


def test_auto_on_cpu_uses_pytorch_and_logs_once(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even with the interpreter available
    monkeypatch.setattr(msda_op, "_AUTO_LOGGED", False)
    assert resolve_impl("auto", torch.device("cpu")) == "pytorch"
    monkeypatch.setattr(msda_op, "_AUTO_LOGGED", False)
    inputs = make_inputs(1, [(3, 3)], 1, 4, 2, 1)
    before = launches()
    # A handler on the op's own logger counts emissions whatever other tests did to logging
    # (detectron2's setup_logger turns propagation off on "smca_detr").
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    # (setLevel, not an assignment to .level: it also clears the logger's isEnabledFor cache,
    # which the resolve_impl call above filled while the level was WARNING)
    old_level = msda_op.logger.level
    msda_op.logger.setLevel(logging.INFO)
    msda_op.logger.addHandler(handler)
    try:
        out1 = ms_deform_attn(*inputs, impl="auto")
        out2 = ms_deform_attn(*inputs, impl="auto")
    finally:
        msda_op.logger.removeHandler(handler)
        msda_op.logger.setLevel(old_level)
    assert launches() == before
    torch.testing.assert_close(out1, ms_deform_attn_pytorch(*inputs))
    assert torch.equal(out1, out2)
    assert len(records) == 1 and "PyTorch" in records[0].getMessage()


def test_importing_does_not_load_triton_kernels():
    # only smca_detr.layers is imported (the parent package is stubbed to keep this fast): importing
    # it, building MSDeformAttn and running "auto" on CPU must not load the Triton kernels module
    code = (
        "import sys, types, torch\n"
        "pkg = types.ModuleType('smca_detr'); pkg.__path__ = [%r]; sys.modules['smca_detr'] = pkg\n"
        "import smca_detr.layers as L\n"
        "v = torch.zeros(1, 4, 1, 2); s = torch.tensor([[2, 2]]); st = torch.tensor([0])\n"
        "L.ms_deform_attn(v, s, st, torch.rand(1, 3, 1, 1, 1, 2), torch.rand(1, 3, 1, 1, 1))\n"
        "L.MSDeformAttn(8, 1, 2, 1)\n"
        "assert 'smca_detr.layers.msda.triton_kernels' not in sys.modules\n"
        "assert L.__file__.startswith(%r)\n"
    ) % (str(REPO / "smca_detr"), str(REPO / "smca_detr"))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


# ----------------------------------------------------------------------------- custom op
def _op_args(use_triton, requires_grad=True):
    value, shapes, starts, loc, attn = make_inputs(2, [(4, 5), (2, 3)], 2, 3, 4, 2)
    if requires_grad:
        value, loc, attn = (t.requires_grad_() for t in (value, loc, attn))
    return (value, shapes, starts, loc, attn, use_triton)


def test_opcheck_pytorch_backend():
    torch.library.opcheck(torch.ops.smca_detr.ms_deform_attn.default, _op_args(False))
    g = torch.randn(2, 4, 6)
    value, shapes, starts, loc, attn, _ = _op_args(False, requires_grad=False)
    torch.library.opcheck(torch.ops.smca_detr.ms_deform_attn_backward.default,
                          (g, value, shapes, starts, loc, attn, False))


def test_opcheck_triton_backend(interpret):
    torch.library.opcheck(torch.ops.smca_detr.ms_deform_attn.default, _op_args(True))


def test_fake_impl_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        value = torch.empty(3, 50, 8, 5, dtype=torch.float16)
        shapes = torch.empty(2, 2, dtype=torch.int64)
        starts = torch.empty(2, dtype=torch.int64)
        loc = torch.empty(3, 11, 8, 2, 4, 2)
        attn = torch.empty(3, 11, 8, 2, 4)
        out = torch.ops.smca_detr.ms_deform_attn(value, shapes, starts, loc, attn, True)
        gv, gl, ga = torch.ops.smca_detr.ms_deform_attn_backward(
            torch.empty(3, 11, 40, dtype=torch.float16), value, shapes, starts, loc, attn, True)
    assert out.shape == (3, 11, 40) and out.dtype == torch.float16
    assert (gv.shape, gv.dtype) == (value.shape, value.dtype)
    assert (gl.shape, gl.dtype) == (loc.shape, loc.dtype)
    assert (ga.shape, ga.dtype) == (attn.shape, attn.dtype)


def test_torch_compile_fullgraph_module_triton(interpret):
    """MSDeformAttn with the Triton path compiles as one graph (fake impls, register_autograd,
    impl resolution as a traced constant) and matches eager, gradients included."""
    torch.manual_seed(0)
    m = MSDeformAttn(16, 2, 2, 2, impl="triton")
    shapes = torch.tensor([[4, 4], [2, 2]])
    starts = torch.tensor([0, 16])
    args = (torch.randn(2, 3, 16), torch.rand(2, 3, 2, 2), torch.randn(2, 20, 16), shapes, starts)
    ref = m(*args)
    ref.square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    out = torch.compile(m, backend="aot_eager", fullgraph=True)(*args)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], msg=lambda msg: f"{n}: {msg}")


# ----------------------------------------------------------------------------- fvcore
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_fvcore_flop_count_of_module():
    from fvcore.nn import FlopCountAnalysis

    B, Q, d, L, M, P = 2, 3, 8, 2, 2, 2
    D = d // M
    m = MSDeformAttn(d, L, M, P).eval()
    shapes = torch.tensor([[4, 4], [2, 2]])
    starts = torch.tensor([0, 16])
    inputs = (torch.randn(B, Q, d), torch.rand(B, Q, L, 2), torch.randn(B, 20, d), shapes, starts)
    flops = FlopCountAnalysis(m, inputs).unsupported_ops_warnings(False)
    add_msda_flop_handle(flops)
    by_op = flops.by_operator()
    assert by_op["ms_deform_attn"] == 5 * B * Q * M * L * P * D > 0
    assert msda_flop_jit([torch.empty(B, 20, M, D), None, None, torch.empty(B, Q, M, L, P, 2)], []) \
        == by_op["ms_deform_attn"]
    # tracing goes through the custom op but computes the same numbers
    traced = torch.jit.trace(m, inputs, check_trace=False)
    assert "smca_detr::ms_deform_attn" in str(traced.graph)
    torch.testing.assert_close(traced(*inputs), m(*inputs))


# ----------------------------------------------------------------------------- module
def module_inputs(d=16, L=2, B=2, Q=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[5, 6], [3, 3], [2, 1]][:L])
    areas = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S = int(areas.sum())
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[1, -7:] = True
    return dict(
        query=torch.randn(B, Q, d, generator=g),
        ref2=torch.rand(B, Q, L, 2, generator=g),
        ref4=torch.cat([torch.rand(B, Q, L, 2, generator=g), torch.rand(B, Q, L, 2, generator=g) * 0.5], -1),
        flat=torch.randn(B, S, d, generator=g),
        shapes=shapes, starts=starts, mask=mask,
    )


def perturbed_module(d=16, L=2, M=4, P=3, impl="pytorch", seed=0):
    torch.manual_seed(seed)
    m = MSDeformAttn(d_model=d, n_levels=L, n_heads=M, n_points=P, impl=impl)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def test_module_rejects_bad_heads_and_refs():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_levels=1, n_heads=8, n_points=1)
    x = module_inputs()
    m = perturbed_module()
    with pytest.raises(ValueError, match="reference_points"):
        m(x["query"], torch.rand(2, 5, 2, 3), x["flat"], x["shapes"], x["starts"])


def test_module_official_init_structure():
    M, L, P, d = 8, 3, 2, 64
    m = MSDeformAttn(d, L, M, P)
    assert torch.all(m.sampling_offsets.weight == 0)
    assert torch.all(m.attention_weights.weight == 0) and torch.all(m.attention_weights.bias == 0)
    assert torch.all(m.value_proj.bias == 0) and torch.all(m.output_proj.bias == 0)
    bound = math.sqrt(6 / (2 * d))
    for w in (m.value_proj.weight, m.output_proj.weight):
        assert w.abs().max() <= bound and w.std() > bound / 3
    grid = m.sampling_offsets.bias.view(M, L, P, 2)
    for h in range(M):
        th = 2 * math.pi * h / M
        direction = torch.tensor([math.cos(th), math.sin(th)])
        direction = direction / direction.abs().max()
        for i in range(P):
            torch.testing.assert_close(grid[h, :, i], ((i + 1) * direction).expand(L, 2).float(),
                                       atol=1e-5, rtol=0)


@pytest.mark.parametrize("ref", ["ref2", "ref4"])
def test_module_sampling_locations_and_weights(ref):
    x = module_inputs()
    m = perturbed_module()
    M, L, P = 4, 2, 3
    m.store_sampling = True
    out = m(x["query"], x[ref], x["flat"], x["shapes"], x["starts"], x["mask"])
    assert out.shape == x["query"].shape
    loc, w = m.last_sampling["sampling_locations"], m.last_sampling["attention_weights"]
    B, Q = x["query"].shape[:2]
    off = m.sampling_offsets(x["query"]).view(B, Q, M, L, P, 2)
    r = x[ref][:, :, None, :, None]
    if ref == "ref2":
        wh = torch.stack([x["shapes"][:, 1], x["shapes"][:, 0]], -1).float().view(1, 1, 1, L, 1, 2)
        expected = r + off / wh
    else:
        expected = r[..., :2] + off * r[..., 2:] / (2 * P)
    torch.testing.assert_close(loc, expected.detach(), atol=1e-6, rtol=1e-5)
    logits = m.attention_weights(x["query"]).view(B, Q, M, L * P)
    torch.testing.assert_close(w, logits.softmax(-1).view(B, Q, M, L, P).detach())
    torch.testing.assert_close(w.sum((-1, -2)), torch.ones(B, Q, M))
    # the module output is output_proj(core(value_proj(masked input)))
    value = m.value_proj(x["flat"]).masked_fill(x["mask"][..., None], 0).view(B, -1, M, 16 // M)
    core = ms_deform_attn_pytorch(value, x["shapes"], x["starts"], loc, w)
    torch.testing.assert_close(out, m.output_proj(core))


def test_module_padding_mask_zeroes_padded_values():
    x = module_inputs()
    m = perturbed_module()
    args = (x["query"], x["ref2"])
    out = m(*args, x["flat"], x["shapes"], x["starts"], x["mask"])
    changed = x["flat"].clone()
    changed[x["mask"]] += 100.0
    torch.testing.assert_close(m(*args, changed, x["shapes"], x["starts"], x["mask"]), out)
    # without the mask the padded values do matter
    assert not torch.allclose(m(*args, changed, x["shapes"], x["starts"], None),
                              m(*args, x["flat"], x["shapes"], x["starts"], None))
    assert m.last_sampling is None  # store_sampling is off by default


@pytest.mark.parametrize("ref", ["ref2", "ref4"])
def test_module_triton_matches_pytorch(interpret, ref):
    x = module_inputs(B=2, Q=3)
    mods = {impl: perturbed_module(impl=impl) for impl in ("pytorch", "triton")}
    outs, grads = {}, {}
    for impl, m in mods.items():
        out = m(x["query"], x[ref], x["flat"], x["shapes"], x["starts"], x["mask"])
        out.square().sum().backward()
        outs[impl] = out.detach()
        grads[impl] = {n: p.grad for n, p in m.named_parameters()}
    torch.testing.assert_close(outs["triton"], outs["pytorch"], atol=1e-5, rtol=1e-4)
    for n in grads["pytorch"]:
        torch.testing.assert_close(grads["triton"][n], grads["pytorch"][n], atol=1e-4, rtol=1e-4,
                                   msg=lambda msg: f"{n}: {msg}")


# ----------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_triton_cuda_matches_reference(dtype, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    shapes = [(32, 40), (16, 20), (8, 10), (4, 5)]
    for B, Q, D in ((2, 300, 32), (1, 517, 12)):
        inputs = make_inputs(B, shapes, 8, D, Q, 4, dtype=dtype, device="cuda", seed=B)
        assert resolve_impl("auto", inputs[0].device) == "triton"
        out_t, grads_t, g = fwd_bwd("triton", inputs)
        inputs64 = [t.double() if t.is_floating_point() else t for t in inputs]
        out_r, grads_r, _ = fwd_bwd("oracle", inputs64, g.double())
        rel = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype]
        for name, a, e in [("out", out_t, out_r)] + list(zip(("value", "loc", "attn"), grads_t, grads_r)):
            assert a.dtype == dtype and a.device.type == "cuda", name
            err = float((a.double() - e).abs().max())
            assert err <= rel * float(e.abs().max()) + rel, f"{dtype} {name}: max error {err}"


# ----------------------------------------------------------------------------- environment rules
@pytest.fixture
def fresh_triton_checks(monkeypatch):
    """Forget the cached triton check and the once-per-process log flags (before and after)."""
    msda_op.triton_unavailable_reason.cache_clear()
    monkeypatch.setattr(msda_op, "_FALLBACK_WARNED", False)
    monkeypatch.setattr(msda_op, "_AUTO_LOGGED", False)
    yield
    msda_op.triton_unavailable_reason.cache_clear()


def _op_log_records(level=logging.WARNING):
    """(records list, remove function): a handler on the op's own logger (propagation may be off)."""
    records = []
    handler = logging.Handler(level)
    handler.emit = records.append
    old_level = msda_op.logger.level
    msda_op.logger.setLevel(level)
    msda_op.logger.addHandler(handler)

    def remove():
        msda_op.logger.removeHandler(handler)
        msda_op.logger.setLevel(old_level)

    return records, remove


@needs_triton
def test_triton_without_knobs_uses_the_environment_variable(monkeypatch, fresh_triton_checks):
    """Triton < 3.4 has no ``triton.knobs``: the kernels still resolve, and the interpreter follows
    TRITON_INTERPRET (what ``triton.jit`` reads there)."""
    import triton

    from smca_detr.layers.msda.triton_kernels import interpreter_enabled

    monkeypatch.delattr(triton, "knobs")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert triton_available() and not interpreter_enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpreter_enabled()
    inputs = make_inputs(1, [(3, 4), (2, 2)], 2, 3, 5, 2, dtype=torch.float64)
    before = launches()
    out_t, grads_t, g = fwd_bwd("triton", inputs)
    out_r, grads_r, _ = fwd_bwd("oracle", inputs, g)
    after = launches()
    assert after.get(("fwd", "interpret"), 0) > before.get(("fwd", "interpret"), 0)
    assert after.get(("bwd", "interpret"), 0) > before.get(("bwd", "interpret"), 0)
    torch.testing.assert_close(out_t, out_r, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grads_t[0], grads_r[0], atol=1e-12, rtol=1e-10)


@needs_triton
def test_triton_lacking_a_kernel_feature_is_unavailable_and_named(monkeypatch, fresh_triton_checks):
    import triton.language as tl

    monkeypatch.delattr(tl, "static_range")
    assert not triton_available()
    assert "triton.language.static_range" in msda_op.triton_unavailable_reason()
    inputs = make_inputs(1, [(3, 3)], 1, 4, 2, 1)
    with pytest.raises(RuntimeError, match="static_range"):
        ms_deform_attn(*inputs, impl="triton")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_impl("auto", torch.device("cuda:0")) == "pytorch"


@pytest.mark.parametrize("capability,interpret,expect,reason", [
    ((9, 0), False, "triton", None),
    ((7, 0), False, "triton", None),
    ((6, 1), False, "pytorch", "compute capability 6.1"),
    ((8, 0), True, "pytorch", "TRITON_INTERPRET=1"),
], ids=["sm90", "sm70", "sm61", "interpret-left-set"])
def test_auto_on_cuda_checks_capability_and_interpreter_and_warns_once(
        monkeypatch, fresh_triton_checks, capability, interpret, expect, reason):
    """The "auto" rule on a (mocked) CUDA device: Triton from compute capability 7.0 when triton can
    run the kernels; else the PyTorch path with one WARNING naming the reason and the memory cost."""
    if not HAS_TRITON:
        expect, reason = "pytorch", "triton is not importable"
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        if HAS_TRITON:
            import triton

            if getattr(triton, "knobs", None) is not None and triton.knobs.runtime.interpret:
                pytest.skip("triton interpreter enabled in code")
    records, remove = _op_log_records()
    try:
        got = [resolve_impl("auto", torch.device("cuda:1")) for _ in range(3)]
    finally:
        remove()
    assert got == [expect] * 3
    if HAS_TRITON and not interpret:
        assert asked and all(torch.device(d) == torch.device("cuda:1") for d in asked)  # the tensors' GPU
    if reason is None:
        assert records == []
    else:
        assert len(records) == 1  # once per process, not per call
        msg = records[0].getMessage()
        assert reason in msg and "730 MB per encoder layer" in msg and "cuda:1" in msg


def test_fallback_memory_figure_is_the_grid_sample_intermediate():
    """The figure in the fallback warning: one fp32 [B*M, D, Q, L*P] tensor of the grid_sample path
    for the Deformable DETR R50 encoder at batch 2, 800x1333 (levels of strides 8..64, ceil-sized)."""
    tokens = sum(math.ceil(800 / s) * math.ceil(1333 / s) for s in (8, 16, 32, 64))
    assert tokens == 22223
    nbytes = 2 * 8 * 32 * tokens * 4 * 4 * 4
    assert round(nbytes / 1e7) * 10 == 730 and "730 MB" in msda_op.FALLBACK_COST


@needs_triton
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_triton_kernels_launch_on_the_tensors_device(monkeypatch, backward):
    """Triton launches on the current CUDA device: with tensors on cuda:1 while device 0 is current,
    the launch must run under cuda:1. Checked without a GPU: fake cuda:1 tensors (FakeTensorMode),
    torch.cuda.device / current_device mocked, the kernel launch recorded instead of run."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from smca_detr.layers.msda import triton_kernels as tk

    current = [0]

    class FakeDeviceContext:
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            self.prev, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.prev

    launched = []

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(torch.cuda.current_device())

    monkeypatch.setattr(torch.cuda, "device", FakeDeviceContext)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(tk, "_kernel", lambda name: FakeKernel())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = make_inputs(1, [(3, 4)], 2, 4, 3, 2)
    with FakeTensorMode(allow_non_fake_inputs=True):
        value, shapes, starts, loc, attn = (t.to("cuda:1") for t in inputs)
        if backward:
            tk.ms_deform_attn_triton_backward(torch.ones(1, 3, 8, device="cuda:1"), value, shapes, starts, loc, attn)
        else:
            tk.ms_deform_attn_triton_forward(value, shapes, starts, loc, attn)
    assert launched == [1] and current[0] == 0


# ----------------------------------------------------------------------------- mixed dtypes
def _mixed_inputs(value_dtype, device="cpu", B=2, Q=5):
    """As autocast produces them in Deformable DETR: ``value`` from a Linear (bf16 / fp16), sampling
    locations and attention weights in float32 (reference points + offsets, softmax)."""
    value, shapes, starts, loc, attn = make_inputs(B, [(4, 5), (2, 3)], 2, 6, Q, 2, dtype=torch.float64, seed=3)
    return (value.to(device, value_dtype), shapes.to(device), starts.to(device), loc.to(device, torch.float32),
            attn.to(device, torch.float32))


def _check_mixed(impl, inputs, rel):
    value, shapes, starts, loc, attn = inputs
    out, grads, g = fwd_bwd(impl, inputs)
    as64 = [t.double() if t.is_floating_point() else t for t in inputs]
    out_r, grads_r, _ = fwd_bwd("oracle", [t.cpu() for t in as64], g.double().cpu())
    assert out.dtype == value.dtype and out.device == value.device
    assert [t.dtype for t in grads] == [value.dtype, torch.float32, torch.float32]
    for name, a, e in [("out", out, out_r)] + list(zip(("value", "loc", "attn"), grads, grads_r)):
        err = float((a.double().cpu() - e).abs().max())
        assert err <= rel * float(e.abs().max()) + rel, f"{impl} {value.dtype} {name}: max error {err}"


MIXED_REL = {torch.float16: 1e-2, torch.bfloat16: 4e-2}


@pytest.mark.parametrize("impl", ["pytorch", "triton"])
@pytest.mark.parametrize("value_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mixed_dtypes_as_autocast_produces_them(request, impl, value_dtype):
    """bf16 / fp16 ``value`` with float32 locations and weights: output and value gradient in the
    value dtype, the other gradients in float32, all close to the float64 oracle; the Triton kernels
    in the interpreter (TRITON_INTERPRET=1)."""
    if impl == "triton":
        request.getfixturevalue("interpret")
    _check_mixed(impl, _mixed_inputs(value_dtype), MIXED_REL[value_dtype])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@needs_triton
@pytest.mark.parametrize("impl", ["pytorch", "triton"])
@pytest.mark.parametrize("value_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mixed_dtypes_on_cuda(monkeypatch, impl, value_dtype):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _check_mixed(impl, _mixed_inputs(value_dtype, device="cuda", Q=300), MIXED_REL[value_dtype])
