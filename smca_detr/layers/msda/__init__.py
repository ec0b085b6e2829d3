"""Multi-scale deformable attention (MSDA) op: PyTorch gather (CPU path), grid_sample reference,
Triton kernels, custom op.

Importing this package never imports triton (the kernels are loaded on first Triton use).
"""
from .op import (IMPLS, MSDA_OP_NAME, add_msda_flop_handle, ms_deform_attn, msda_flop_jit, resolve_impl,
                 triton_available)
from .gather import ms_deform_attn_gather, ms_deform_attn_gather_backward
from .reference import ms_deform_attn_pytorch, ms_deform_attn_pytorch_backward

__all__ = ["IMPLS", "MSDA_OP_NAME", "add_msda_flop_handle", "ms_deform_attn", "ms_deform_attn_gather",
           "ms_deform_attn_gather_backward", "ms_deform_attn_pytorch", "ms_deform_attn_pytorch_backward",
           "msda_flop_jit", "resolve_impl", "triton_available"]
