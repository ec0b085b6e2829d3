"""SMCA-DETR "new multi-scale" model of the official code (``Multi_scale_SMCA.zip`` of
github.com/gaopengcuhk/SMCA-DETR), with the same maths, except that the scale-selection weights are
applied per image (the official batched code applies image 0's weights to every image).

* **Levels.** Three backbone levels (official: res3, res4, res5; strides 8, 16, 32) are projected
  to ``d`` by one 1x1 conv each (``input_proj.{0,1,2}``); a fourth level (stride 64) is a 3x3
  stride-2 conv on the **unprojected** last level (``extra_proj``), with the nearest-resized mask of
  the last level and its own sine encoding. ``level_embed[l]`` is added to every level's encoding.
* **Encoder** (``ENC_LAYERS`` convolutional layers, weights shared by the levels except the per-level
  convs): for each level ``a_l = dw5x5_l(conv_1(src_l + pos_l))`` (``conv_1``: shared 1x1 conv,
  ``level_convs.{l}``: per-level 5x5 depth-wise conv); then
  ``s_l = a_l + down_{l-1}(a_{l-1}) + resize(up_l(a_{l+1}))`` with ``down_convs.{l-1}`` a 5x5
  depth-wise stride-2 conv of the next finer level and ``up_convs.{l}`` a 5x5 depth-wise conv of the
  next coarser level, bilinearly resized to level ``l`` (``align_corners=True``); all ``a`` come from
  the layer's input (levels are updated simultaneously). ``src_l + conv_2(s_l)`` (``conv_2``: shared
  1x1 conv) goes through the shared ``norm1``, FFN (``linear1/2``), ``norm2`` (post-norm, over
  channels). The encoder ignores the padding mask, as the official code.
* **Decoder memory**: ``[memory_conv(encoded s8) (3x3 stride-2 conv, s16 size), encoded s16, s32,
  s64]`` flattened row-major and concatenated; positions ``[pos16, pos16, pos32, pos64]`` each plus
  its level embedding (the first segment uses ``level_embed[1]``); mask ``[m16, m16, m32, m64]``.
* **Decoder** (``DEC_LAYERS``; the official code hard-wires 6): SMCA decoder layers
  (``SMCADecoderLayer``) with one block of offsets (``point2``: 4 × M × (x, y)) and scales
  (``point3``: 4 × M × k) per memory segment and ``point4`` (4 scale-selection logits, softmax = α).
  Segment ``i``'s centre is ``(w, h)·sigmoid(point1)/div_i + offset_i`` with ``div = (16, 16, 32,
  64)`` (the segment strides), its weighted squared distance is multiplied by ``div_i / 32``
  (0.5, 0.5, 1, 2); the cross-attention softmax is taken within each segment and multiplied by
  ``α_i`` of the same image and query.

Differences from the official code: per-image α (bug fix above); strides, ``d``, heads, encoder and
decoder depth come from the config/backbone (official: hard-wired 256, 8, 6 decoder layers and the
16/16/32/64 divisors — identical for a stride-8/16/32 backbone); unpadded image sizes come from
``image_sizes`` instead of the targets. Key names follow the official ones (rename table in
``smca_detr/checkpoint/smca_multiscale.py``).
"""
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from ...layers.dropout import Dropout
from ...layers.tracing import shape_ints
from ..backbone import resize_mask
from ..blocks import FFNMixin
from ..position_encoding import PositionEmbeddingSine
from ..registry import TRANSFORMER_REGISTRY
from .common import (DetrTransformerBase, TransformerEncoder, TransformerOutput, check_levels, embed_levels,
                     flatten_levels, level_projections)
from .smca import MemorySegment, SMCADecoder, reset_smca_parameters

__all__ = ["ConvMultiScaleEncoderLayer", "SMCAConvMultiScaleTransformer"]


def _depthwise(d: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(d, d, kernel_size=5, stride=stride, padding=2, groups=d)


class ConvMultiScaleEncoderLayer(FFNMixin, nn.Module):
    """The official convolutional multi-scale encoder layer (see the module docstring).

    Keys: ``level_convs.{l}`` (official ``self_attn_{8,16,32,64}``), ``down_convs.{l}`` (official
    ``high_to_low_{l+1}``: level l -> l+1), ``up_convs.{l}`` (official ``low_to_high_{l+1}``: level
    l+1 -> l), ``conv_1``, ``conv_2``, ``linear1``, ``linear2``, ``norm1``, ``norm2``.
    """

    def __init__(self, d_model: int, num_levels: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu"):
        super().__init__()
        self.num_levels = num_levels
        self.conv_1 = nn.Conv2d(d_model, d_model, kernel_size=1)
        self.level_convs = nn.ModuleList(_depthwise(d_model) for _ in range(num_levels))
        self.down_convs = nn.ModuleList(_depthwise(d_model, stride=2) for _ in range(num_levels - 1))
        self.up_convs = nn.ModuleList(_depthwise(d_model) for _ in range(num_levels - 1))
        self.conv_2 = nn.Conv2d(d_model, d_model, kernel_size=1)
        self.build_ffn(d_model, dim_feedforward, dropout, activation)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)

    def forward(self, srcs: List[torch.Tensor], pos: List[torch.Tensor]) -> List[torch.Tensor]:
        """srcs / pos: per level ``[B,d,H_l,W_l]`` (finest first; pos incl. level embedding)."""
        a = [conv(self.conv_1(s + p)) for conv, s, p in zip(self.level_convs, srcs, pos)]
        outs = []
        for l, (src, x) in enumerate(zip(srcs, a)):
            if l > 0:
                x = x + self.down_convs[l - 1](a[l - 1])
            if l < self.num_levels - 1:
                x = x + F.interpolate(self.up_convs[l](a[l + 1]), size=src.shape[-2:], mode="bilinear",
                                      align_corners=True)
            y = self.norm1((src + self.dropout1(self.conv_2(x))).permute(0, 2, 3, 1))  # LayerNorm over channels
            y = self.norm2(y + self.dropout2(self.ffn(y)))
            outs.append(y.permute(0, 3, 1, 2))
        return outs


@TRANSFORMER_REGISTRY.register()
class SMCAConvMultiScaleTransformer(DetrTransformerBase):
    """Official "new multi-scale" SMCA (see the module docstring).

    Keys: ``input_proj.{0,1,2}``, ``extra_proj``, ``level_embed [4, d]``, ``encoder.layers.{i}.*``,
    ``memory_conv``, ``query_embed``, ``decoder.layers.{i}.*`` (``point1`` in layer 0, ``point2``,
    ``point3``, ``point4``), ``decoder.norm``.

    Config: MODEL.SMCA_DETR.{IN_FEATURES (3 levels, official res3/res4/res5), HIDDEN_DIM, NHEADS,
    ENC_LAYERS, DEC_LAYERS, DIM_FEEDFORWARD, DROPOUT, ACTIVATION, NUM_QUERIES, POS_TEMPERATURE} and
    MODEL.SMCA_DETR.SMCA.{DYNAMIC_SCALE, HEAD_SHARED, SMOOTH, CENTER_MLP_LAYERS}. The official model
    is post-norm (PRE_NORM must be False) and always uses scale selection (SMCA.SCALE_SELECTION is
    not read).

    ``record_intermediates``: ``SMCADecoder.decode``'s keys, ``masks``, ``pos`` (no level embedding),
    ``src``, ``encoder_out`` (per level, ``[B,d,H,W]``), ``memory``, ``memory_mask``."""

    NUM_BACKBONE_LEVELS = 3

    def __init__(self, cfg, input_shapes):
        super().__init__(cfg)
        c = cfg.MODEL.SMCA_DETR
        check_levels("SMCAConvMultiScaleTransformer", input_shapes, self.NUM_BACKBONE_LEVELS)
        if c.PRE_NORM:
            raise ValueError("SMCAConvMultiScaleTransformer is post-norm only (MODEL.SMCA_DETR.PRE_NORM must be False)")
        if c.ENC_LAYERS < 0:
            raise ValueError(f"MODEL.SMCA_DETR.ENC_LAYERS must be >= 0, got {c.ENC_LAYERS}")
        d = c.HIDDEN_DIM
        self.d_model = d
        strides = [int(x.stride) for x in input_shapes]
        self.strides = strides + [2 * strides[-1]]
        self.num_levels = len(self.strides)
        projs, extra = level_projections(input_shapes, d, self.num_levels)
        self.input_proj, self.extra_proj = nn.ModuleList(projs), extra[0]
        self.position_embedding = PositionEmbeddingSine(d // 2, temperature=c.POS_TEMPERATURE)
        self.level_embed = nn.Parameter(torch.empty(self.num_levels, d))
        self.encoder = TransformerEncoder(  # over the list of levels
            ConvMultiScaleEncoderLayer(d, self.num_levels, c.DIM_FEEDFORWARD, c.DROPOUT, c.ACTIVATION), c.ENC_LAYERS)
        self.memory_conv = nn.Conv2d(d, d, kernel_size=3, stride=2, padding=1)
        self.query_embed = nn.Embedding(c.NUM_QUERIES, d)
        self.decoder = SMCADecoder(cfg, num_segments=self.num_levels, num_param_groups=self.num_levels,
                                   scale_selection=True)
        # Official: Xavier on every matrix of the transformer (incl. the encoder convs, memory conv and
        # level embedding); input projections and queries live outside it and keep their init.
        reset_smca_parameters(self, skip=(self.input_proj, self.extra_proj, self.query_embed))

    def segments(self, shapes) -> List[MemorySegment]:
        """Memory segments [down-sampled finest, level 1, level 2, level 3] (official 16/16/32/64)."""
        divisors = [self.strides[1]] + self.strides[1:]
        ref = self.strides[2]
        grids = [shapes[1]] + list(shapes[1:])
        return [MemorySegment(h, w, divisor=dv, distance_factor=dv / ref, offset_scale=1.0, param_group=i)
                for i, ((h, w), dv) in enumerate(zip(grids, divisors))]

    def forward(self, features, masks, image_sizes, heads=None) -> TransformerOutput:
        check_levels("SMCAConvMultiScaleTransformer", features, self.NUM_BACKBONE_LEVELS)
        last = masks[-1]
        srcs, masks, pos = embed_levels([*self.input_proj, self.extra_proj], features, masks, self.position_embedding,
                                        lambda size: resize_mask(last, size))
        embed = self.level_embed.to(srcs[0].dtype)
        lvl_pos = [p + e[None, :, None, None] for p, e in zip(pos, embed)]
        enc = self.encoder(srcs, lvl_pos)
        first = self.memory_conv(enc[0])
        if first.shape[-2:] != enc[1].shape[-2:]:
            raise ValueError(f"memory_conv of the finest level gives {tuple(first.shape[-2:])}, expected the "
                             f"second level's size {tuple(enc[1].shape[-2:])}")
        memory, mem_mask, mem_pos = flatten_levels([first] + enc[1:], [masks[1]] + masks[1:], [lvl_pos[1]] + lvl_pos[1:])
        shapes = [shape_ints(x.shape[-2:]) for x in srcs]
        record = None
        if self.record_intermediates:
            record = dict(masks=masks, pos=pos, src=srcs, encoder_out=enc, memory=memory, memory_mask=mem_mask)
        return self.decoder.decode(self.query_embed.weight, memory, mem_pos, mem_mask, image_sizes,
                                   self.segments(shapes), record)
