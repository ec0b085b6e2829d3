"""Multi-scale deformable attention (MSDA) op: PyTorch reference, Triton kernels, custom op.

Importing this package never imports triton (the kernels are loaded on first Triton use).
"""
from .op import (
    IMPLS,
    MSDA_OP_NAME,
    add_msda_flop_handle,
    ms_deform_attn,
    msda_flop_jit,
    resolve_impl,
    triton_available,
)
from .reference import ms_deform_attn_pytorch, ms_deform_attn_pytorch_backward

__all__ = [
    "IMPLS",
    "MSDA_OP_NAME",
    "add_msda_flop_handle",
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
    "ms_deform_attn_pytorch_backward",
    "msda_flop_jit",
    "resolve_impl",
    "triton_available",
]
