"""Fast CPU inference for detectron2 ResNets: norm folded into the convolutions, oneDNN fusion.

At inference a frozen (or eval-mode) BatchNorm is an affine map per channel, so ``norm(conv(x, W))``
equals ``conv(x, W * s) + (b - mean * s)`` with ``s = gamma / sqrt(var + eps)``. This module runs a
detectron2 ``ResNet`` (``BasicStem`` + ``BottleneckBlock`` / ``BasicBlock``) with those folded
weights in channels-last layout through oneDNN's fused operators (``torch.ops.mkldnn``): conv + bias
+ ReLU in one pass, and the last conv of every block fused with the residual add + ReLU. That saves
the separate norm, ReLU and add passes over every feature map and the NCHW <-> blocked reorders,
about 25-30% of the backbone time of an R50 on CPU. The maths is the same as detectron2's modules up
to float32 rounding (tests/test_fused_resnet.py compares both).

It is used only where it is exact and available; :func:`fused_resnet_supported` says why not
otherwise and the caller falls back to the modules' own forward:
  * CPU float32 input, gradients disabled, module in eval mode, no autocast, not being traced
    (fvcore FLOP counting, ``torch.jit.trace``) or compiled;
  * every block of a known detectron2 type (exactly ``BasicStem``, ``BottleneckBlock``,
    ``BasicBlock``; deformable blocks or other stems are not fused), every norm foldable
    (``FrozenBatchNorm2d`` or an eval-mode ``BatchNorm2d``) or absent;
  * the fused operators exist in this PyTorch build (``torch.ops.mkldnn._convolution_pointwise``).
Folded weights are cached per convolution and recomputed when any source tensor changes (new
checkpoint, ``load_state_dict``, in-place edits), keyed on storage pointers and version counters.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet
from torch import nn

__all__ = ["fused_resnet_supported", "fused_resnet_forward"]

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


def fused_resnet_supported(body: nn.Module, x: torch.Tensor) -> Tuple[bool, str]:
    """(ok, reason): whether :func:`fused_resnet_forward` may run ``body`` on ``x``."""
    if not isinstance(body, ResNet) or getattr(body, "num_classes", None) is not None:
        return False, "not a detectron2 ResNet feature extractor"
    if body.training or torch.is_grad_enabled():
        return False, "training or gradients enabled"
    if torch.jit.is_tracing() or _compiling():
        return False, "traced / compiled (FLOP counting, export, torch.compile see the plain modules)"
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False, "input is not CPU float32"
    if _cpu_autocast_on():
        return False, "CPU autocast is enabled"
    if not _have_fused_ops():
        return False, "this PyTorch build lacks oneDNN fused convolutions"
    if type(body.stem) is not BasicStem:
        return False, f"stem {type(body.stem).__name__} is not detectron2's BasicStem"
    convs = [body.stem.conv1]
    for stage in body.stages:
        for block in stage:
            if type(block) not in _BLOCK_TYPES:
                return False, f"block {type(block).__name__} is not fused"
            convs.extend(_convs_of(block))
    for conv in convs:
        if conv.activation is not None or not _norm_foldable(conv.norm):
            return False, f"norm {type(conv.norm).__name__} / activation cannot be folded"
        if conv.weight.dtype != torch.float32 or conv.weight.device.type != "cpu":
            return False, "weights are not CPU float32"
    return True, ""


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


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


def _conv(x, conv, cache, relu: bool):
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


def _block(x, block, cache):
    out = _conv(x, block.conv1, cache, relu=True)
    if isinstance(block, BottleneckBlock):
        out = _conv(out, block.conv2, cache, relu=True)
    last = block.conv3 if isinstance(block, BottleneckBlock) else block.conv2
    shortcut = _conv(x, block.shortcut, cache, relu=False) if block.shortcut is not None else x
    return _conv_add_relu(out, shortcut, last, cache)


def fused_resnet_forward(body: ResNet, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Same outputs as ``body(x)`` (contiguous NCHW), via folded fused oneDNN convolutions.

    Call only when :func:`fused_resnet_supported` says so."""
    cache = body.__dict__.setdefault("_smca_fused_cache", {})
    wanted = set(body._out_features)
    outputs = {}
    x = x.contiguous(memory_format=torch.channels_last)
    x = _conv(x, body.stem.conv1, cache, relu=True)
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    if "stem" in wanted:
        outputs["stem"] = x.contiguous()
    for name, stage in zip(body.stage_names, body.stages):
        for block in stage:
            x = _block(x, block, cache)
        if name in wanted:
            outputs[name] = x.contiguous()
    return outputs
