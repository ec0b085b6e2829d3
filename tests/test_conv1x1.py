"""1x1 convolution as per-image GEMMs (smca_detr/layers/cpu/conv1x1.py) against F.conv2d."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from smca_detr.layers.cpu.conv1x1 import conv1x1_gemm

CL = torch.channels_last


@pytest.mark.parametrize("in_cl,out_cl,stride,relu,with_bias,input_grad",
                         list(itertools.product([False, True], [False, True], [1, 2], [False, True], [False, True],
                                                [False, True])))
def test_conv1x1_gemm_matches_conv2d_float64(in_cl, out_cl, stride, relu, with_bias, input_grad):
    """Every layout, stride, ReLU and bias combination: the output and the gradients of input,
    weight and bias equal ``F.conv2d``'s (then ReLU) in float64; the output has the requested memory
    format and the input gradient the input's (no layout conversion on the way back)."""
    gen = torch.Generator().manual_seed(stride * 7 + 3 * relu + with_bias)
    x = torch.randn(2, 5, 7, 9, generator=gen, dtype=torch.float64)
    if in_cl:
        x = x.contiguous(memory_format=CL)
    x.requires_grad_(input_grad)
    weight = torch.randn(6, 5, 1, 1, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True) if with_bias else None
    out = conv1x1_gemm(x, weight, bias, stride=stride, relu=relu, channels_last=out_cl)
    ref = F.conv2d(x, weight, bias, stride=stride)
    if relu:
        ref = ref.relu()
        assert (ref == 0).any() and (ref > 0).any()
    assert out.shape == ref.shape
    assert out.is_contiguous(memory_format=CL if out_cl else torch.contiguous_format)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    inputs = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    gout = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, inputs, gout)
    for a, b in zip(got, torch.autograd.grad(ref, inputs, gout)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if input_grad:
        assert got[0].is_contiguous(memory_format=CL if in_cl else torch.contiguous_format)


@pytest.mark.parametrize("stride,out_cl", [(1, False), (2, True), ((2, 1), False)])
def test_conv1x1_gemm_gradcheck(stride, out_cl):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 5, 4, generator=gen, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    weight = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)  # [K, C] accepted
    bias = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: conv1x1_gemm(x, w, b, stride=stride, relu=True, channels_last=out_cl), (x, weight, bias))


def test_conv1x1_gemm_other_strides_and_float32():
    """A non-contiguous input (neither NCHW nor channels-last memory) is copied, not misread; float32
    results agree with oneDNN's convolution to rounding."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 16, 12, 10, generator=gen)[:, :, 1:-1, ::1].transpose(2, 3)  # odd strides
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=CL)
    weight = torch.randn(8, 16, 1, 1, generator=gen)
    bias = torch.randn(8, generator=gen)
    torch.testing.assert_close(conv1x1_gemm(x, weight, bias), F.conv2d(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_conv1x1_gemm_errors_name_the_problem():
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="1x1 kernel"):
        conv1x1_gemm(x, torch.zeros(2, 3, 3, 3))
    with pytest.raises(ValueError, match="2 input channels, x has 3"):
        conv1x1_gemm(x, torch.zeros(4, 2, 1, 1))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        conv1x1_gemm(torch.zeros(3, 4, 4), torch.zeros(2, 3, 1, 1))
