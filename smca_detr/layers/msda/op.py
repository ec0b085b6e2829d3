"""Multi-scale deformable attention as a ``torch.library`` custom op, plus the public dispatcher.

Public API
----------
``ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
impl="auto") -> Tensor [B, Q, M*D]`` (shapes: see :mod:`.reference`).

``impl``:

* ``"pytorch"``: pure PyTorch, any device and dtype (no compiled extension). Without a gradient to
  compute (inference) it is the sparse gather of :mod:`.gather` (one ``F.embedding_bag``). When a
  gradient is needed (grad mode on and an input requires grad): on CPU the same gather as an
  autograd function with its analytic backward (:func:`.gather.ms_deform_attn_gather`: a sampled
  dense-dense product and a sorted transposed gather, no ``[B*M, D, Q, L*P]`` intermediate;
  differentiable once); on other devices the ``grid_sample`` path
  (:func:`.reference.ms_deform_attn_pytorch`, the test oracle), differentiated by autograd.
* ``"triton"``: the Triton kernels through the custom op ``smca_detr::ms_deform_attn`` (autograd via
  ``register_autograd`` and the custom op ``smca_detr::ms_deform_attn_backward``; differentiable
  once, no double backward). Needs triton and CUDA tensors; on CPU tensors it runs the Triton
  *interpreter* when ``TRITON_INTERPRET=1`` is set (slow; meant for tests) and otherwise raises
  ``RuntimeError`` with an explanation.
* ``"auto"``: ``"triton"`` for CUDA tensors when triton can run the kernels, else ``"pytorch"``
  (CPU always gets ``"pytorch"``, also with ``TRITON_INTERPRET=1``). On CUDA it falls back to
  ``"pytorch"`` with one WARNING naming the reason and the fallback's memory cost when triton is
  missing or too old, ``TRITON_INTERPRET=1`` is left set, or the GPU's compute capability is below
  ``MIN_CUDA_CAPABILITY`` (7.0). The first ``"auto"`` resolution logs one INFO line (logger
  ``smca_detr.layers.msda.op``) naming the choice, once per process.

Custom ops
----------
``smca_detr::ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
attention_weights, use_triton) -> Tensor`` and ``smca_detr::ms_deform_attn_backward(grad_output,
..., use_triton) -> (grad_value, grad_sampling_locations, grad_attention_weights)``. Both have fake
(meta) implementations, so shape propagation, ``torch.compile`` and ``torch.export`` see an
opaque op of the right shape (``torch.compile(..., fullgraph=True)`` of ``MSDeformAttn`` with
``impl="triton"`` is tested; the impl is resolved once at trace time). ``use_triton=False`` runs
PyTorch inside the op, so the op works on every device: on CPU the gather forward and its analytic
backward (:mod:`.gather`; the backward rebuilds the corner rows), elsewhere the ``grid_sample``
reference and its analytic backward.

FLOP counting (fvcore): while ``torch.jit`` traces, every impl routes through the custom op, which
:func:`msda_flop_jit` / :func:`add_msda_flop_handle` count (docs/MODEL_ZOO.md, "FLOPs of the
deformable attention").
"""
from __future__ import annotations

import functools
import logging
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

from .gather import (build_gather_plan, gather_forward, ms_deform_attn_gather, ms_deform_attn_gather_backward)
from .reference import ms_deform_attn_pytorch, ms_deform_attn_pytorch_backward

__all__ = ["ms_deform_attn", "resolve_impl", "triton_available", "triton_unavailable_reason", "auto_fallback_reason",
           "MIN_CUDA_CAPABILITY", "msda_flop_jit", "add_msda_flop_handle", "MSDA_OP_NAME", "IMPLS"]

logger = logging.getLogger(__name__)

MSDA_OP_NAME = "smca_detr::ms_deform_attn"
IMPLS = ("auto", "triton", "pytorch")
_AUTO_LOGGED = False


@functools.lru_cache(maxsize=None)
def triton_unavailable_reason() -> Optional[str]:
    """Why the MSDA Triton kernels cannot be used in this environment (None when they can): triton
    does not import, or lacks a language feature the kernels use (checked once, lazily)."""
    try:
        from . import triton_kernels  # imports triton
    except Exception as exc:  # ImportError, or a broken triton install
        return f"triton is not importable ({exc!r})"
    missing = triton_kernels.missing_triton_features()
    if missing:
        import triton

        return (f"the installed triton {getattr(triton, '__version__', '?')} lacks {', '.join(missing)} "
                "(the kernels need triton >= 3.0)")
    return None


def triton_available() -> bool:
    """Whether triton imports and has every feature the MSDA Triton kernels use."""
    reason = triton_unavailable_reason()
    if reason is not None:
        logger.debug("Triton MSDA kernels unavailable: %s", reason)
    return reason is None


def _interpreter_enabled() -> bool:
    from .triton_kernels import interpreter_enabled

    return interpreter_enabled()


#: Lowest CUDA compute capability the Triton kernels run on: Triton's own minimum (torch inductor
#: refuses devices below 7.0 for the same reason). The kernels need nothing newer: their atomics
#: are fp32 / fp64 adds (sm_60+), bf16 / fp16 are only loaded, converted and stored.
MIN_CUDA_CAPABILITY = (7, 0)

#: What the PyTorch fallback costs on a GPU, stated in the fallback warning. The grid_sample path
#: materialises ``[B*M, D, Q, L*P]`` sampled values (and keeps them for the backward) per call:
#: Deformable DETR R50 encoder at batch 2, 800x1333 (S = Q = 100*167 + 50*84 + 25*42 + 13*21 =
#: 22223 tokens), M*D = 8*32, L*P = 4*4, fp32: 2*8*32*22223*16*4 B = 728 MB per encoder layer.
FALLBACK_COST = ("the PyTorch grid_sample path materialises [B*M, D, Q, L*P] sampled values per layer "
                 "(about 730 MB per encoder layer at batch 2, 800x1333, fp32, Deformable DETR R50) "
                 "and is several times slower")
_FALLBACK_WARNED = False


def _cuda_capability(device: torch.device):
    """The compute capability of a CUDA ``device``, or None where it cannot be queried (no CUDA
    driver: fake tensors or tracing on a CPU host; the op's fake implementation serves those)."""
    try:
        return tuple(torch.cuda.get_device_capability(device))
    except (RuntimeError, AssertionError, AttributeError):
        return None


def auto_fallback_reason(device: torch.device) -> Optional[str]:
    """Why ``impl="auto"`` does not use the Triton kernels for CUDA tensors on ``device`` (None when
    it does): triton unusable, a leftover ``TRITON_INTERPRET=1`` (the interpreter would copy every
    tensor to the host), or a GPU below ``MIN_CUDA_CAPABILITY``."""
    reason = triton_unavailable_reason()
    if reason is not None:
        return reason
    if _interpreter_enabled():
        return ("TRITON_INTERPRET=1 is set (the Triton interpreter, meant for CPU tests, would run the "
                "kernels on the host); unset it to use the Triton kernels")
    cap = _cuda_capability(device)
    if cap is not None and cap < MIN_CUDA_CAPABILITY:
        return (f"{device} has compute capability {cap[0]}.{cap[1]}; the Triton kernels need "
                f"{MIN_CUDA_CAPABILITY[0]}.{MIN_CUDA_CAPABILITY[1]} or newer")
    return None


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map ``impl`` ("auto" | "triton" | "pytorch") to the implementation used for tensors on
    ``device``: "triton" or "pytorch". Raises ``ValueError`` for an unknown ``impl`` and
    ``RuntimeError`` when "triton" is requested but cannot run. "auto" on a CUDA device falls back to
    "pytorch" with one WARNING (once per process) naming the reason (``auto_fallback_reason``) and
    the fallback's cost."""
    global _AUTO_LOGGED, _FALLBACK_WARNED
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    device = torch.device(device)
    if impl == "pytorch":
        return "pytorch"
    if impl == "triton":
        reason = triton_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"impl='triton' requested but {reason}; use impl='pytorch'")
        if device.type != "cuda" and not _interpreter_enabled():
            raise RuntimeError(
                f"impl='triton' needs CUDA tensors (got device '{device}'); set TRITON_INTERPRET=1 "
                "to run the Triton kernels in the interpreter on CPU (slow, for tests), or use "
                "impl='pytorch'"
            )
        return "triton"
    chosen = "pytorch"
    if device.type == "cuda":
        reason = auto_fallback_reason(device)
        if reason is None:
            chosen = "triton"
        elif not _FALLBACK_WARNED:
            _FALLBACK_WARNED = True
            logger.warning("Multi-scale deformable attention: impl='auto' falls back to the PyTorch "
                           "implementation on %s because %s. Cost: %s.", device, reason, FALLBACK_COST)
    if not _AUTO_LOGGED:
        _AUTO_LOGGED = True
        logger.info(
            "Multi-scale deformable attention: impl='auto' chose the %s implementation (device %s)",
            "Triton" if chosen == "triton" else "PyTorch grid_sample",
            device,
        )
    return chosen


@torch.compiler.assume_constant_result
def _resolve_impl_constant(impl: str, device: str) -> str:
    # torch.compile evaluates this once while tracing and bakes the choice into the graph (the
    # device is guarded through the input tensors); eager calls it every time (cheap).
    return resolve_impl(impl, torch.device(device))


# --------------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op(MSDA_OP_NAME, mutates_args=())
def _msda_op(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
             attention_weights: Tensor, use_triton: bool) -> Tensor:
    if use_triton:
        from .triton_kernels import ms_deform_attn_triton_forward

        return ms_deform_attn_triton_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if value.device.type == "cpu":
        return gather_forward(build_gather_plan(*args)).to(value.dtype)
    return ms_deform_attn_pytorch(*args)


@_msda_op.register_fake
def _msda_op_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                  use_triton):
    torch._check(value.dim() == 4, lambda: "value must be [B, S, M, D]")
    torch._check(sampling_locations.dim() == 6, lambda: "sampling_locations must be [B, Q, M, L, P, 2]")
    torch._check(attention_weights.dim() == 5, lambda: "attention_weights must be [B, Q, M, L, P]")
    B, _, M, D = value.shape
    Q = sampling_locations.shape[1]
    return value.new_empty((B, Q, M * D))


@torch.library.custom_op("smca_detr::ms_deform_attn_backward", mutates_args=())
def _msda_backward_op(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                      sampling_locations: Tensor, attention_weights: Tensor,
                      use_triton: bool) -> Tuple[Tensor, Tensor, Tensor]:
    args = (grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if use_triton:
        from .triton_kernels import ms_deform_attn_triton_backward

        return ms_deform_attn_triton_backward(*args)
    if value.device.type == "cpu":
        return ms_deform_attn_gather_backward(*args)
    return ms_deform_attn_pytorch_backward(*args)


@_msda_backward_op.register_fake
def _msda_backward_op_fake(
    grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, use_triton
):
    return value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape), \
        attention_weights.new_empty(attention_weights.shape)


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, use_triton = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    ctx.use_triton = use_triton


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = _msda_backward_op(
        grad_output.contiguous(), value, spatial_shapes, level_start_index,
        sampling_locations, attention_weights, ctx.use_triton,
    )
    need = ctx.needs_input_grad
    return (grad_value if need[0] else None, None, None, grad_loc if need[3] else None,
            grad_attn if need[4] else None, None)


_msda_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------
def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                   attention_weights: Tensor, impl: str = "auto") -> Tensor:
    """Multi-scale deformable attention core.

    Args:
        value: ``[B, S, M, D]`` projected values of all levels (finest first, row-major).
        spatial_shapes: ``[L, 2]`` int64 ``(H_l, W_l)``.
        level_start_index: ``[L]`` int64 start of each level along ``S``.
        sampling_locations: ``[B, Q, M, L, P, 2]`` ``(x, y)`` in ``[0, 1]`` of each level's map
            (outside allowed, zero padding).
        attention_weights: ``[B, Q, M, L, P]``.
        impl: "auto" | "triton" | "pytorch" (see the module docstring).

    Returns:
        ``[B, Q, M*D]`` in ``value.dtype``.
    """
    if torch.onnx.is_in_onnx_export():  # ONNX export: standard operators only, dynamic level sizes
        from .onnx_gather import ms_deform_attn_traceable

        return ms_deform_attn_traceable(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights).to(value.dtype)
    backend = _resolve_impl_constant(impl, str(value.device))
    if backend == "triton" or torch.jit.is_tracing():
        return _msda_op(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            backend == "triton",
        )
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if value.device.type != "cpu" and torch.is_grad_enabled() and (
        value.requires_grad or sampling_locations.requires_grad or attention_weights.requires_grad
    ):
        # (the analytic gather backward is kept to CPU, where it is tested; GPUs have Triton)
        return ms_deform_attn_pytorch(*args)
    # CPU training, and inference anywhere: the sparse gather (analytic backward when needed)
    return ms_deform_attn_gather(*args)


# --------------------------------------------------------------------------------------------
# fvcore
# --------------------------------------------------------------------------------------------
def _sizes(v: Any) -> List[int]:
    if isinstance(v, Tensor):
        return list(v.shape)
    return list(v.type().sizes())  # torch._C.Value of a jit trace


def msda_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore op handle for ``smca_detr::ms_deform_attn``.

    Counts ``5 * B * Q * M * L * P * D`` multiply-adds (fvcore's "flop"): for every sampled point
    and channel, 4 for the bilinear corner interpolation and 1 for the attention weight.
    ``inputs`` are the op's jit values (value, spatial_shapes, level_start_index,
    sampling_locations, attention_weights, use_triton); tensors are accepted too.
    """
    B, _, M, D = _sizes(inputs[0])
    _, Q, _, L, P, _ = _sizes(inputs[3])
    return 5 * B * Q * M * L * P * D


def add_msda_flop_handle(flop_counter):
    """``flop_counter.set_op_handle("smca_detr::ms_deform_attn", msda_flop_jit)``; returns it."""
    return flop_counter.set_op_handle(MSDA_OP_NAME, msda_flop_jit)
