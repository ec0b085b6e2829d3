"""SMCA-DETR multi scale, as described in the paper (Gao et al., ICCV 2021, Sec. 3.3), plus the
multi-scale decoder pieces shared with the official "new multi-scale" model
(``smca_conv_multiscale.py``).

The paper's multi-scale model is not in any public code; this is our reading of it:

* **Levels.** The backbone levels of ``IN_FEATURES`` (paper: ``["res4", "res5"]``, strides 16 and
  32, no FPN) are projected by one 1x1 conv each to ``d``; one extra level (paper: stride 64) is a
  3x3 stride-2 conv on the **unprojected** last backbone level, as in the official multi-scale code
  (its mask is the last level's mask, nearest-resized; its own sine encoding). A learned
  ``level_embed[l]`` is added to the sine encoding of every level.
* **Encoder** (``SMCA.ENCODER_LAYOUT``, paper "2Intra-Multi-2Intra" = ``intra, intra, multi, intra,
  intra``; its length is the encoder depth and must equal ``ENC_LAYERS``): an ``"intra"`` layer is
  a standard DETR encoder layer (self-attention + FFN of ``DIM_FEEDFORWARD``, paper 1024) applied to
  every level separately with the **same weights** (attention never crosses levels); a ``"multi"``
  layer is the same kind of layer over the concatenation of all levels. Padded positions are masked
  as keys everywhere.
* **Decoder** = SMCA decoder layer (``smca.py``) whose cross-attention sees the concatenated
  encoded levels. One Gaussian per head (``point2`` offsets / ``point3`` scales as single scale)
  lives in the coordinates of the *reference stride* ``s_ref`` (the stride of the last backbone
  level, 32, i.e. the units of single-scale SMCA) and is evaluated on every level's grid: on level
  ``l`` with stride ``s_l`` the centre is ``sigmoid(point1)·(w, h)/s_l + offset·s_ref/s_l`` and the
  weighted squared distance is multiplied by ``(s_l/s_ref)²`` (the same Gaussian in image space).
  With ``SMCA.SCALE_SELECTION`` (default, paper "SSA"), the cross-attention softmax is taken within
  each level separately, and the co-attention output of level ``l`` is weighted by
  ``α = softmax(point4(O_q))`` (``point4``: one logit per level, from the same query feature
  ``O_q = norm4(tgt + query_pos)`` that drives the other SMCA heads; one α per query shared by all
  heads): ``C = Σ_l α_l · softmax_l(QK_lᵀ/√d + log G_l) V_l``.
  ``SCALE_SELECTION = False`` is the "w/o SSA" ablation: **one softmax over all levels together**
  (the Gaussian still applied per level), no ``point4``.

The decoder is the one SMCA decoder of ``smca.py`` (``SMCADecoder`` over a list of
``MemorySegment``s; its ``segment_softmax`` lives in the shared attention kernel of ``layers.py``).
"""
from typing import List, Optional

import torch
from torch import nn

from ...layers.tracing import shape_ints
from ..backbone import resize_mask
from ..position_encoding import PositionEmbeddingSine
from ..registry import TRANSFORMER_REGISTRY
from .common import (DetrTransformerBase, TransformerEncoder, TransformerEncoderLayer, TransformerOutput, embed_levels,
                     flatten_levels, level_projections)
from .smca import MemorySegment, SMCADecoder, reset_smca_parameters

__all__ = ["validate_encoder_layout", "MultiScaleEncoder", "SMCAMultiScaleTransformer"]

ENCODER_LAYER_KINDS = ("intra", "multi")


def validate_encoder_layout(layout, enc_layers: int) -> List[str]:
    """``MODEL.SMCA_DETR.SMCA.ENCODER_LAYOUT`` as a list of ``"intra"`` / ``"multi"``; its length must
    be ``MODEL.SMCA_DETR.ENC_LAYERS``."""
    if isinstance(layout, str):
        layout = [x.strip() for x in layout.split(",") if x.strip()]
    layout = [str(x).lower() for x in layout]
    bad = [x for x in layout if x not in ENCODER_LAYER_KINDS]
    if bad:
        raise ValueError(f"MODEL.SMCA_DETR.SMCA.ENCODER_LAYOUT entries must be one of {ENCODER_LAYER_KINDS}, "
                         f"got {bad} in {layout}")
    if len(layout) != enc_layers:
        raise ValueError(f"MODEL.SMCA_DETR.SMCA.ENCODER_LAYOUT has {len(layout)} layers ({layout}) but "
                         f"MODEL.SMCA_DETR.ENC_LAYERS = {enc_layers}; they must agree")
    return layout


class MultiScaleEncoder(TransformerEncoder):
    """Encoder of the paper's multi-scale SMCA: standard DETR encoder layers, each either within
    every scale separately (``"intra"``, weights shared by the scales) or over all scales together
    (``"multi"``). Keys ``layers.{i}.*`` (``TransformerEncoderLayer``), ``norm`` with pre-norm."""

    def __init__(self, layer: TransformerEncoderLayer, layout: List[str], norm: Optional[nn.Module] = None):
        super().__init__(layer, len(layout), norm)
        self.layout = list(layout)

    def forward(self, src, pos, key_padding_mask, sizes: List[int]):
        """src/pos ``[B,S,d]`` (levels concatenated), key_padding_mask ``[B,S]``, sizes per level."""
        for kind, layer in zip(self.layout, self.layers):
            if kind == "multi":
                src = layer(src, pos, key_padding_mask)
            else:
                src = torch.cat([layer(s, p, m) for s, p, m in zip(
                    src.split(sizes, 1), pos.split(sizes, 1), key_padding_mask.split(sizes, 1))], dim=1)
        return self.norm(src) if self.norm is not None else src


@TRANSFORMER_REGISTRY.register()
class SMCAMultiScaleTransformer(DetrTransformerBase):
    """The paper's multi-scale SMCA (see the module docstring).

    Keys: ``input_proj.{l}`` (1x1 convs, one per backbone level), ``extra_proj`` (3x3 stride-2 conv
    on the last backbone level), ``level_embed [L+1, d]``, ``query_embed``, ``encoder.layers.{i}.*``,
    ``decoder.layers.{i}.*`` (``point4`` with scale selection), ``decoder.norm``.

    Config: MODEL.SMCA_DETR.{IN_FEATURES (paper: res4, res5), HIDDEN_DIM, NHEADS, ENC_LAYERS,
    DEC_LAYERS, DIM_FEEDFORWARD (paper 1024), DROPOUT, ACTIVATION, PRE_NORM, NUM_QUERIES,
    POS_TEMPERATURE}, MODEL.SMCA_DETR.SMCA.{ENCODER_LAYOUT, SCALE_SELECTION, DYNAMIC_SCALE,
    HEAD_SHARED, SMOOTH, CENTER_MLP_LAYERS}.

    ``record_intermediates``: ``SMCADecoder.decode``'s keys, ``masks``/``pos``/``src`` (per level),
    ``memory``, ``memory_mask``."""

    def __init__(self, cfg, input_shapes):
        super().__init__(cfg)
        c, s = cfg.MODEL.SMCA_DETR, cfg.MODEL.SMCA_DETR.SMCA
        if len(input_shapes) < 1:
            raise ValueError("SMCAMultiScaleTransformer needs at least one level in MODEL.SMCA_DETR.IN_FEATURES")
        self.layout = validate_encoder_layout(s.ENCODER_LAYOUT, c.ENC_LAYERS)
        d = c.HIDDEN_DIM
        self.d_model = d
        self.strides = [int(x.stride) for x in input_shapes] + [2 * int(input_shapes[-1].stride)]
        self.ref_stride = int(input_shapes[-1].stride)
        self.num_levels = len(self.strides)
        self.scale_selection = bool(s.SCALE_SELECTION)
        projs, extra = level_projections(input_shapes, d, self.num_levels)
        self.input_proj, self.extra_proj = nn.ModuleList(projs), extra[0]
        self.position_embedding = PositionEmbeddingSine(d // 2, temperature=c.POS_TEMPERATURE)
        self.level_embed = nn.Parameter(torch.empty(self.num_levels, d))
        self.query_embed = nn.Embedding(c.NUM_QUERIES, d)
        enc_layer = TransformerEncoderLayer(d, c.NHEADS, c.DIM_FEEDFORWARD, c.DROPOUT, c.ACTIVATION, c.PRE_NORM)
        self.encoder = MultiScaleEncoder(enc_layer, self.layout, nn.LayerNorm(d) if c.PRE_NORM else None)
        self.decoder = SMCADecoder(cfg, self.num_levels, 1, self.scale_selection)
        reset_smca_parameters(self, skip=(self.input_proj, self.extra_proj, self.query_embed))
        nn.init.normal_(self.level_embed)  # as Deformable DETR's level embedding

    def segments(self, shapes) -> List[MemorySegment]:
        """One Gaussian per head in stride-``ref_stride`` units, evaluated on every level's grid."""
        return [MemorySegment(h, w, divisor=st, distance_factor=(st / self.ref_stride) ** 2,
                              offset_scale=self.ref_stride / st)
                for (h, w), st in zip(shapes, self.strides)]

    def embed(self, features, masks):
        """Backbone levels + masks -> per level (projected ``src [B,d,H,W]``, mask ``[B,H,W]``, sine
        encoding ``[B,d,H,W]`` without level embedding), the extra level appended."""
        if len(features) != self.num_levels - 1:
            raise ValueError(f"SMCAMultiScaleTransformer was built for {self.num_levels - 1} backbone levels, "
                             f"got {len(features)}")
        last = masks[-1]
        return embed_levels([*self.input_proj, self.extra_proj], features, masks, self.position_embedding,
                            lambda size: resize_mask(last, size))

    def forward(self, features, masks, image_sizes, heads=None) -> TransformerOutput:
        return self.forward_embedded(*self.embed(features, masks), image_sizes)

    def forward_embedded(self, srcs, masks, pos, image_sizes) -> TransformerOutput:
        """Encoder + decoder on the levels returned by ``embed``."""
        shapes = [shape_ints(x.shape[-2:]) for x in srcs]
        sizes = [h * w for h, w in shapes]
        src, mask, lvl_pos = flatten_levels(srcs, masks, pos, self.level_embed)
        memory = self.encoder(src, lvl_pos, mask, sizes)
        record = None
        if self.record_intermediates:
            record = dict(masks=masks, pos=pos, src=srcs, memory=memory, memory_mask=mask)
        return self.decoder.decode(self.query_embed.weight, memory, lvl_pos, mask, image_sizes, self.segments(shapes),
                                   record)
