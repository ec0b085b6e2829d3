"""Fast CPU paths for detectron2 ResNets (``MODEL.SMCA_DETR.FUSED_CPU_BACKBONE``; what each step
measured: docs/SPEED.md). Frozen or eval-mode norms are folded into the convolutions
(``norm(conv(x, W)) = conv(x, W * s) + (b - mean * s)``, ``s = gamma / sqrt(var + eps)``), which run
channels-last through oneDNN's fused conv + bias + ReLU and conv + residual add + ReLU; 3x3 stride-1
convolutions with enough input channels run as Winograd GEMMs (:mod:`.winograd`). Exact up to
float32 rounding (tests/test_fused_resnet.py compares with detectron2's modules).

Inference (:func:`fused_resnet_forward`) runs only where :func:`fused_resnet_supported` says it is
exact and available: CPU float32, no gradients, eval mode, no autocast, not traced or compiled;
exactly ``BasicStem`` / ``BottleneckBlock`` / ``BasicBlock`` with foldable norms; oneDNN's fused
operators present. Training (:func:`fused_training_forward`): the frozen leading stages
(:func:`fused_frozen_prefix`) take the fused path without autograd; in the trainable blocks frozen
norms are folded through autograd, 3x3 convolutions use the differentiable Winograd convolution and
large 1x1 ones per-image GEMMs (:mod:`.conv1x1`). :class:`FusedCpuForward` is the dispatch. Folded
weights are cached per convolution, keyed on storage pointers and version counters of their sources.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet
from torch import nn

from .conv1x1 import conv1x1_gemm
from ..tracing import tracing_or_compiling
from .winograd import (winograd_conv3x3, winograd_conv3x3_train, winograd_tile, winograd_weight,
                               winograd_weight_differentiable)

__all__ = ["FusedCpuForward", "fused_frozen_prefix", "fused_resnet_forward", "fused_resnet_supported", "fused_training_forward"]

# 3x3 stride-1 convolutions with at least this many input channels run as Winograd GEMMs at
# inference (winograd.py): 128 = R50 res3-res5, 10-30% faster per convolution than oneDNN.
WINOGRAD_MIN_CHANNELS = 128
# Winograd F(4x4, 3x3) (4x fewer multiply-adds than direct, ~4x its float32 rounding) on maps of at
# least this many pixels, F(2x2, 3x3) on smaller ones: 1024 = R50 res3-res4 at 640x800 (res5, 20x25,
# has too few tiles for the larger tile's GEMMs).
WINOGRAD_F4_MIN_PIXELS = 1024
# Training: 3x3 convolutions of trainable blocks with at least this many input channels run as
# differentiable Winograd convolutions: fwd+bwd at batch 2, 83 vs 173 ms (oneDNN) at res3 (F(4x4)),
# 47 vs 124 ms at res4, 72 vs 148 ms at res5 (F(2x2)).
TRAIN_WINOGRAD_MIN_CHANNELS = 128
# Training: 1x1 convolutions of trainable blocks on maps of at least this many pixels run as per-image
# GEMMs (conv1x1.py): 62 vs 101 ms fwd+bwd for 512->128 at 80x100; equal at 40x50, oneDNN
# faster at 20x25. 4096 = R50 res3 and the convolutions reading res2 at 640x800.
TRAIN_GEMM_1X1_MIN_PIXELS = 4096

_BLOCK_TYPES = (BottleneckBlock, BasicBlock)


def _have_fused_ops() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return (ops is not None and torch.backends.mkldnn.is_available()
                and hasattr(ops._convolution_pointwise, "binary"))
    except (AttributeError, RuntimeError):
        return False


def _norm_foldable(norm: Optional[nn.Module]) -> bool:
    if norm is None:
        return True
    if type(norm) is FrozenBatchNorm2d:
        return True
    return isinstance(norm, nn.BatchNorm2d) and not norm.training and norm.track_running_stats


def _convs_of(block: nn.Module):
    names = ("conv1", "conv2", "conv3") if isinstance(block, BottleneckBlock) else ("conv1", "conv2")
    convs = [getattr(block, n) for n in names]
    if block.shortcut is not None:
        convs.append(block.shortcut)
    return convs


def _environment_unsupported(x: torch.Tensor) -> str:
    """Why the fused operators cannot run on ``x`` here ("" when they can)."""
    if tracing_or_compiling():
        return "traced / compiled (FLOP counting, export, torch.compile see the plain modules)"
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return "input is not CPU float32"
    if _cpu_autocast_on():
        return "CPU autocast is enabled"
    if not _have_fused_ops():
        return "this PyTorch build lacks oneDNN fused convolutions"
    return ""


def _convs_unsupported(convs) -> str:
    for conv in convs:
        if conv.activation is not None or not _norm_foldable(conv.norm):
            return f"norm {type(conv.norm).__name__} / activation cannot be folded"
        if conv.weight.dtype != torch.float32 or conv.weight.device.type != "cpu":
            return "weights are not CPU float32"
    return ""


def _stage_convs(stage) -> list:
    convs = []
    for block in stage:
        if type(block) not in _BLOCK_TYPES:
            return None
        convs.extend(_convs_of(block))
    return convs


def fused_resnet_supported(body: nn.Module, x: torch.Tensor) -> Tuple[bool, str]:
    """(ok, reason): whether :func:`fused_resnet_forward` may run ``body`` on ``x``."""
    if not isinstance(body, ResNet) or getattr(body, "num_classes", None) is not None:
        return False, "not a detectron2 ResNet feature extractor"
    if body.training or torch.is_grad_enabled():
        return False, "training or gradients enabled"
    why = _environment_unsupported(x)
    if why:
        return False, why
    if type(body.stem) is not BasicStem:
        return False, f"stem {type(body.stem).__name__} is not detectron2's BasicStem"
    convs = [body.stem.conv1]
    for stage in body.stages:
        stage_convs = _stage_convs(stage)
        if stage_convs is None:
            bad = next(b for b in stage if type(b) not in _BLOCK_TYPES)
            return False, f"block {type(bad).__name__} is not fused"
        convs.extend(stage_convs)
    why = _convs_unsupported(convs)
    return (not why), why


def _frozen(modules) -> bool:
    return all(not p.requires_grad for m in modules for p in m.parameters())


def fused_frozen_prefix(body: nn.Module, x: torch.Tensor) -> int:
    """How many leading parts of ``body`` (1 = the stem, 1 + k = the stem and the first k stages) may
    run through the fused path while the rest trains: every parameter frozen (``requires_grad``
    False, e.g. ``MODEL.BACKBONE.FREEZE_AT``), norms foldable (frozen or eval-mode), input without
    gradient, and the same environment conditions as :func:`fused_resnet_supported`. Nothing
    upstream of a frozen prefix needs a gradient, so running it without autograd is exact. 0 = none."""
    if not isinstance(body, ResNet) or type(body.stem) is not BasicStem or x.requires_grad:
        return 0
    if _environment_unsupported(x):
        return 0
    if not _frozen([body.stem]) or _convs_unsupported([body.stem.conv1]):
        return 0
    n = 1
    for stage in body.stages:
        convs = _stage_convs(stage)
        if convs is None or not _frozen(stage) or _convs_unsupported(convs):
            break
        n += 1
    return n


def _cpu_autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")  # torch >= 2.4
    except TypeError:
        return torch.is_autocast_cpu_enabled()


def _sources(conv: nn.Module):
    tensors = [conv.weight, conv.bias]
    norm = conv.norm
    if norm is not None:
        tensors += [norm.weight, norm.bias, norm.running_mean, norm.running_var]
    return tensors


def _key(conv: nn.Module):
    key = []
    for t in _sources(conv):
        key.append(None if t is None else (t.data_ptr(), t._version, tuple(t.shape)))
    key.append(getattr(conv.norm, "eps", None))
    return tuple(key)


def _folded(conv: nn.Module, cache: Dict[int, tuple]):
    """(weight [channels-last], bias) of ``norm(conv(x))`` as one convolution, cached."""
    key = _key(conv)
    hit = cache.get(id(conv))
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    w = conv.weight.detach()
    b = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    norm = conv.norm
    if norm is not None:
        scale = norm.weight.detach() * torch.rsqrt(norm.running_var.detach() + norm.eps)
        b = (b - norm.running_mean.detach()) * scale + norm.bias.detach()
        w = w * scale.reshape(-1, 1, 1, 1)
    w = w.contiguous(memory_format=torch.channels_last)
    b = b.contiguous()
    cache[id(conv)] = (key, w, b)
    return w, b


def _winograd_ok(conv: nn.Module, min_channels: int) -> bool:
    return (0 < min_channels <= conv.in_channels and tuple(conv.kernel_size) == (3, 3)
            and tuple(conv.stride) == (1, 1) and tuple(conv.padding) == (1, 1)
            and tuple(conv.dilation) == (1, 1) and conv.groups == 1)


def _winograd_params(conv: nn.Module, cache: Dict[int, tuple], tile: int):
    """(transformed filters, bias) of the folded conv for :func:`winograd_conv3x3` with output tiles
    of ``tile`` x ``tile``, cached."""
    w, b = _folded(conv, cache)
    key = ("winograd", w.data_ptr(), b.data_ptr())
    hit = cache.get(("winograd", tile, id(conv)))
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    u = winograd_weight(w, tile)
    cache[("winograd", tile, id(conv))] = (key, u, b)
    return u, b


def _conv(x, conv, cache, relu: bool, winograd_min_channels: int = 0, f4_min_pixels: int = 0):
    if _winograd_ok(conv, winograd_min_channels):
        u, b = _winograd_params(conv, cache, winograd_tile(x.shape[-2], x.shape[-1], f4_min_pixels))
        return winograd_conv3x3(x, u, b, relu=relu)
    w, b = _folded(conv, cache)
    return torch.ops.mkldnn._convolution_pointwise(
        x, w, b, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
        "relu" if relu else "none", [], "")


def _conv_add_relu(x, residual, conv, cache):
    """relu(norm(conv(x)) + residual) in one fused oneDNN call."""
    w, b = _folded(conv, cache)
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual, w, b, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
        "add", 1.0, "relu", [], "")


def _block(x, block, cache, winograd_min_channels: int, f4_min_pixels: int):
    out = _conv(x, block.conv1, cache, relu=True, winograd_min_channels=winograd_min_channels,
                f4_min_pixels=f4_min_pixels)
    if isinstance(block, BottleneckBlock):
        out = _conv(out, block.conv2, cache, relu=True, winograd_min_channels=winograd_min_channels,
                    f4_min_pixels=f4_min_pixels)
    last = block.conv3 if isinstance(block, BottleneckBlock) else block.conv2
    shortcut = _conv(x, block.shortcut, cache, relu=False) if block.shortcut is not None else x
    return _conv_add_relu(out, shortcut, last, cache)


def _differentiable_fold(conv: nn.Module):
    """(weight, bias) of ``norm(conv(x))`` as one convolution, recorded by autograd (training: the
    conv weight trains; the norm is frozen or eval-mode, its affine parameters may train too)."""
    w, b = conv.weight, conv.bias
    norm = conv.norm
    if norm is None:
        return w, b
    scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
    shift = norm.bias - norm.running_mean * scale
    if b is not None:
        shift = shift + b * scale
    return w * scale.reshape(-1, 1, 1, 1), shift


def _train_foldable_block(block: nn.Module) -> bool:
    """Whether :func:`_train_block` may run ``block``: a bottleneck or basic block whose convolutions
    all have a foldable norm (frozen or eval-mode) and no activation of their own."""
    return type(block) in _BLOCK_TYPES and not _convs_unsupported(_convs_of(block))


def _gemm_ok(conv: nn.Module, x: torch.Tensor, min_pixels: int) -> bool:
    """Whether ``conv`` (1x1, no padding, no groups) runs as per-image GEMMs in training: its input map
    has at least ``min_pixels`` pixels (``min_pixels > 0``)."""
    return (0 < min_pixels <= x.shape[-2] * x.shape[-1] and tuple(conv.kernel_size) == (1, 1)
            and tuple(conv.padding) == (0, 0) and tuple(conv.dilation) == (1, 1) and conv.groups == 1)


def _train_conv(x, conv, relu: bool, winograd_min_channels: int = 0, f4_min_pixels: int = 0,
                gemm_min_pixels: int = 0, channels_last: bool = False):
    """``norm(conv(x))`` (then ReLU) as one convolution with the norm folded by autograd: the
    separate per-channel scale-and-shift pass and its backward are saved; the conv weight (and a
    trainable norm affine) get their exact gradients. 3x3 stride-1 convolutions with at least
    ``winograd_min_channels`` input channels run through the differentiable Winograd op (F(4x4, 3x3)
    on maps of at least ``f4_min_pixels`` pixels; output in channels-last memory), 1x1 convolutions
    on maps of at least ``gemm_min_pixels`` pixels as per-image GEMMs (:func:`conv1x1_gemm`: any input
    layout, output channels-last if ``channels_last``), the others through ``F.conv2d`` on NCHW."""
    w, b = _differentiable_fold(conv)
    if _winograd_ok(conv, winograd_min_channels):
        tile = winograd_tile(x.shape[-2], x.shape[-1], f4_min_pixels)
        return winograd_conv3x3_train(x, winograd_weight_differentiable(w, tile), b, relu=relu)
    if _gemm_ok(conv, x, gemm_min_pixels):
        return conv1x1_gemm(x, w, b, conv.stride, relu=relu, channels_last=channels_last)
    out = F.conv2d(x.contiguous(), w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
    return F.relu_(out) if relu else out


def _train_block(x, block, winograd_min_channels: int, f4_min_pixels: int, gemm_min_pixels: int = 0):
    """detectron2's ``BottleneckBlock`` / ``BasicBlock`` forward with every norm folded into its
    convolution (:func:`_train_conv`); same outputs and gradients up to float32 rounding. Layouts:
    a channels-last input (the fused frozen prefix's output) is read as is by GEMM convolutions,
    a bottleneck's conv1 writes channels-last rows when conv2 is a Winograd convolution (which reads
    them), and the block's output is NCHW."""
    bottleneck = isinstance(block, BottleneckBlock)
    if not x.is_contiguous() and not all(_gemm_ok(c, x, gemm_min_pixels)
                                         for c in (block.conv1, block.shortcut) if c is not None):
        x = x.contiguous()  # one NCHW copy for all the consumers that need it
    # _train_conv applies the Winograd settings to 3x3 stride-1 convs, the GEMM setting to 1x1 ones
    opts = dict(winograd_min_channels=winograd_min_channels, f4_min_pixels=f4_min_pixels,
                gemm_min_pixels=gemm_min_pixels)
    if bottleneck:
        out = _train_conv(x, block.conv1, relu=True, **opts,
                          channels_last=_winograd_ok(block.conv2, winograd_min_channels))
        out = _train_conv(out, block.conv2, relu=True, **opts)
        out = _train_conv(out, block.conv3, relu=False, **opts)
    else:
        out = _train_conv(x, block.conv1, relu=True, **opts)
        out = _train_conv(out, block.conv2, relu=False, **opts)
    shortcut = _train_conv(x, block.shortcut, relu=False, **opts) if block.shortcut is not None else x
    if out._is_view():  # a Winograd output (a channels-last view): the in-place sum needs its own tensor
        out = out.contiguous() if not out.is_contiguous() else out.clone()
    out += shortcut
    return F.relu_(out)


def fused_resnet_forward(body: ResNet, x: torch.Tensor, winograd_min_channels: int = WINOGRAD_MIN_CHANNELS,
                         fused_parts: Optional[int] = None,
                         train_winograd_min_channels: int = 0,
                         winograd_f4_min_pixels: int = WINOGRAD_F4_MIN_PIXELS,
                         train_gemm_min_pixels: int = 0) -> Dict[str, torch.Tensor]:
    """Same outputs as ``body(x)`` (contiguous NCHW), via folded fused oneDNN convolutions.

    3x3 stride-1 convolutions with at least ``winograd_min_channels`` input channels run through
    Winograd GEMMs instead (:mod:`smca_detr.layers.cpu.winograd`; 0 = never): F(4x4, 3x3) on maps of at
    least ``winograd_f4_min_pixels`` pixels (0 = never), F(2x2, 3x3) otherwise. Call only when
    :func:`fused_resnet_supported` says so; or, in training, with ``fused_parts =
    fused_frozen_prefix(body, x)``: that frozen prefix is fused (without autograd) and the remaining
    stages run through their own modules, except that the 3x3 convolutions of bottleneck blocks with
    at least ``train_winograd_min_channels`` input channels (0 = none) use the differentiable
    Winograd convolution and their 1x1 convolutions on maps of at least ``train_gemm_min_pixels``
    pixels (0 = none) run as per-image GEMMs (:func:`smca_detr.layers.cpu.conv1x1.conv1x1_gemm`)."""
    n_fused = 1 + len(body.stages) if fused_parts is None else int(fused_parts)
    cache = body.__dict__.setdefault("_smca_fused_cache", {})
    wanted = set(body._out_features)
    outputs = {}
    if n_fused >= 1:
        with torch.no_grad():
            x = x.contiguous(memory_format=torch.channels_last)
            x = _conv(x, body.stem.conv1, cache, relu=True)
            x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
            if n_fused == 1:
                x = x.contiguous()
    else:
        x = body.stem(x)
    if "stem" in wanted:
        outputs["stem"] = x.contiguous()
    for i, (name, stage) in enumerate(zip(body.stage_names, body.stages)):
        if i + 1 < n_fused:
            with torch.no_grad():
                for block in stage:
                    x = _block(x, block, cache, winograd_min_channels, winograd_f4_min_pixels)
        else:
            for block in stage:
                x = (_train_block(x, block, train_winograd_min_channels, winograd_f4_min_pixels,
                                  train_gemm_min_pixels)
                     if _train_foldable_block(block) else block(x.contiguous()))  # NCHW, as detectron2's forward
        if name in wanted:
            outputs[name] = x.contiguous()
    return outputs


def fused_training_forward(body: nn.Module, x: torch.Tensor, winograd_min_channels: int = WINOGRAD_MIN_CHANNELS,
                           train_winograd_min_channels: int = TRAIN_WINOGRAD_MIN_CHANNELS,
                           winograd_f4_min_pixels: int = WINOGRAD_F4_MIN_PIXELS,
                           train_gemm_min_pixels: int = TRAIN_GEMM_1X1_MIN_PIXELS) -> Optional[Dict[str, torch.Tensor]]:
    """``body(x)`` for training on CPU with the exact speed-ups that apply (the fused frozen prefix of
    :func:`fused_frozen_prefix`, Winograd for the 3x3 convolutions of trainable bottleneck blocks with
    at least ``train_winograd_min_channels`` input channels, per-image GEMMs for their 1x1
    convolutions on maps of at least ``train_gemm_min_pixels`` pixels), or None when none applies (the
    caller runs ``body(x)`` itself)."""
    if not isinstance(body, ResNet) or getattr(body, "num_classes", None) is not None:
        return None
    if _environment_unsupported(x):
        return None
    parts = fused_frozen_prefix(body, x)
    trainable = [b for stage in body.stages[max(parts - 1, 0):] for b in stage]
    if not parts and not any(_train_foldable_block(b) for b in trainable):
        return None
    return fused_resnet_forward(body, x, winograd_min_channels, fused_parts=parts,
                                train_winograd_min_channels=train_winograd_min_channels,
                                winograd_f4_min_pixels=winograd_f4_min_pixels,
                                train_gemm_min_pixels=train_gemm_min_pixels)


class FusedCpuForward:
    """The ``MODEL.SMCA_DETR.FUSED_CPU_BACKBONE`` dispatch, ``(body, images) -> features`` of a
    detectron2 backbone: with ``enabled``, CPU tensors take the fused inference path where it is exact
    (:func:`fused_resnet_supported`), else the training path (:func:`fused_training_forward`) where it
    applies; otherwise, and always on an accelerator (CPU-only kernels), ``body(images)``."""

    def __init__(self, enabled: bool = True):
        self.enabled = bool(enabled)

    def __call__(self, body: nn.Module, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.enabled and images.device.type == "cpu":
            if fused_resnet_supported(body, images)[0]:
                return fused_resnet_forward(body, images)
            feats = fused_training_forward(body, images)
            if feats is not None:
                return feats
        return body(images)
