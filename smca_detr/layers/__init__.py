"""Reusable layers of smca_detr: multi-scale deformable attention (module and core op)."""
from .ms_deform_attn import MSDeformAttn, msda_offset_bias_init
from .msda import add_msda_flop_handle, ms_deform_attn, msda_flop_jit

__all__ = ["MSDeformAttn", "add_msda_flop_handle", "ms_deform_attn", "msda_flop_jit", "msda_offset_bias_init"]
