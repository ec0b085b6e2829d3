"""Winograd F(2x2, 3x3) and F(4x4, 3x3) convolutions (smca_detr/layers/cpu/winograd.py) against F.conv2d."""
import pytest
import torch
import torch.nn.functional as F

from smca_detr.layers.cpu.winograd import (winograd_conv3x3, winograd_conv3x3_train, winograd_tile, winograd_weight,
                                       winograd_weight_differentiable)

TILES = [2, 4]


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("n,c,k,h,w", [(1, 3, 5, 4, 4), (2, 4, 6, 7, 9), (1, 8, 3, 1, 1), (3, 2, 2, 5, 2),
                                       (1, 3, 2, 9, 12)])
@pytest.mark.parametrize("with_bias,relu", [(True, True), (False, False), (True, False)])
def test_winograd_matches_conv2d_float64(n, c, k, h, w, with_bias, relu, tile):
    gen = torch.Generator().manual_seed(n * 100 + c * 10 + h)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(k, c, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(k, generator=gen, dtype=torch.float64) if with_bias else None
    ref = F.conv2d(x, weight, bias, stride=1, padding=1)
    if relu:
        ref = ref.relu()
    u = winograd_weight(weight, tile)
    assert u.shape == ((tile + 2) ** 2, c, k)
    out = winograd_conv3x3(x, u, bias if with_bias else None, relu=relu)
    assert out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tile,tol", [(2, 1e-5), (4, 3e-5)])
def test_winograd_float32_channels_last_input_and_rounding(tile, tol):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, 10, 13, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(16, 32, 3, 3, generator=gen) * 0.1
    bias = torch.randn(16, generator=gen)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), padding=1).relu()
    out = winograd_conv3x3(x, winograd_weight(weight, tile), bias, relu=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_winograd_weight_transform_is_g_g_gt():
    # U[a, b] = sum_ij G[a, i] g[i, j] G[b, j] for one filter, written out by hand for position (1, 2)
    g = torch.arange(9, dtype=torch.float64).reshape(1, 1, 3, 3) + 1.0
    u = winograd_weight(g).reshape(4, 4)
    gm = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
    assert torch.equal(u, gm @ g[0, 0] @ gm.T)
    assert u[1, 2].item() == pytest.approx(sum(gm[1, i] * g[0, 0, i, j] * gm[2, j] for i in range(3) for j in range(3)))
    # F(4x4, 3x3): G of Lavin & Gray (points 0, 1, -1, 2, -2, infinity)
    u4 = winograd_weight(g, 4).reshape(6, 6)
    g4 = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                       [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(u4, g4 @ g[0, 0] @ g4.T, rtol=1e-15, atol=1e-15)


def test_winograd_tile_choice():
    assert winograd_tile(40, 50, 1024) == 4
    assert winograd_tile(32, 32, 1024) == 4
    assert winograd_tile(31, 33, 1024) == 2
    assert winograd_tile(200, 200, 0) == 2  # 0: never F(4x4)


def test_winograd_refuses_autograd_but_runs_under_no_grad():
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    u = winograd_weight(torch.randn(3, 2, 3, 3))
    with pytest.raises(RuntimeError, match="inference-only"):
        winograd_conv3x3(x, u)
    with torch.no_grad():
        assert winograd_conv3x3(x, u).shape == (1, 3, 4, 4)


def test_winograd_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="3, 3"):
        winograd_weight(torch.zeros(2, 2, 5, 5))
    with pytest.raises(ValueError, match="input channels 4"):
        winograd_conv3x3(torch.zeros(1, 4, 3, 3), winograd_weight(torch.zeros(2, 3, 3, 3)))
    with pytest.raises(ValueError, match="tile must be 2"):
        winograd_weight(torch.zeros(2, 3, 3, 3), 3)
    with pytest.raises(ValueError, match=r"\[36, C, K\]"):
        winograd_conv3x3_train(torch.zeros(1, 3, 4, 4), torch.zeros(25, 3, 2))


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("n,c,k,h,w", [(2, 3, 4, 5, 6), (1, 2, 3, 4, 4), (2, 4, 2, 7, 3), (1, 2, 2, 9, 10)])
def test_winograd_train_gradients_float64(n, c, k, h, w, tile):
    """The hand-written Winograd-domain backward (dx, dU -> dw, dbias) passes gradcheck, and the
    forward and gradients equal F.conv2d's."""
    gen = torch.Generator().manual_seed(h * 10 + w)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(k, c, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(k, generator=gen, dtype=torch.float64, requires_grad=True)

    def fn(x, weight, bias):
        return winograd_conv3x3_train(x, winograd_weight_differentiable(weight, tile), bias)

    assert torch.autograd.gradcheck(fn, (x, weight, bias))
    gout = torch.randn(n, k, h, w, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(fn(x, weight, bias), (x, weight, bias), gout)
    ref = torch.autograd.grad(F.conv2d(x, weight, bias, padding=1), (x, weight, bias), gout)
    torch.testing.assert_close(fn(x, weight, bias), F.conv2d(x, weight, bias, padding=1), rtol=1e-12, atol=1e-12)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("tile", TILES)
def test_winograd_train_fused_relu_float64(tile):
    """``relu=True`` applies the ReLU in the output transform and masks the gradient with the saved
    output: values and gradients equal ``relu(conv2d)``'s, including a bias that makes outputs < 0."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    out = winograd_conv3x3_train(x, winograd_weight_differentiable(weight, tile), bias, relu=True)
    ref = F.conv2d(x, weight, bias, padding=1).relu()
    assert (ref == 0).any() and (ref > 0).any()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    gout = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (x, weight, bias), gout),
                    torch.autograd.grad(ref, (x, weight, bias), gout)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    assert torch.autograd.gradcheck(
        lambda x, w, b: winograd_conv3x3_train(x, winograd_weight_differentiable(w, tile), b, relu=True),
        (x, weight, bias))
