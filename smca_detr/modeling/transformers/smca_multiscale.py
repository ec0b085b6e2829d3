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

Shared pieces (used by both multi-scale transformers): ``segment_softmax`` (softmax within the
contiguous segments of a concatenated key sequence, each segment's probabilities times a per-query
weight; a slice per segment, no scatter atomics, batched over heads and queries), ``MemorySegment``, ``MultiScaleSMCADecoderLayer``
(subclass of the single-scale ``SMCADecoderLayer``, reusing ``smca_gaussian_bias``) and
``MultiScaleSMCADecoder``.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...layers.tracing import shape_ints
from ..layers import clones, segment_softmax
from ..position_encoding import PositionEmbeddingSine
from ..registry import TRANSFORMER_REGISTRY
from .common import TransformerEncoderLayer, TransformerOutput, flatten_level, image_wh
from .smca import SMCADecoderLayer, mask_padded_keys, prior_in_float32, scale_channels, smca_gaussian_bias

__all__ = ["MemorySegment", "segment_softmax", "MultiScaleSMCADecoderLayer",
           "MultiScaleSMCADecoder", "image_wh", "validate_encoder_layout", "SMCAMultiScaleTransformer"]

ENCODER_LAYER_KINDS = ("intra", "multi")


@dataclass(frozen=True)
class MemorySegment:
    """One segment (feature map) of the decoder memory, as the SMCA Gaussian sees it.

    height, width: its (padded) grid; keys are its integer ``(column, row)`` positions, row-major.
    divisor: image pixels per grid cell used for the centre (``centre = ref_px / divisor + ...``).
    distance_factor: multiplies the weighted squared distance (official: 0.5, 0.5, 1, 2).
    offset_scale: multiplies the predicted offsets (1 when every segment has its own offsets).
    param_group: which block of ``point2`` / ``point3`` outputs (offsets, scales) it uses.
    """

    height: int
    width: int
    divisor: float
    distance_factor: float = 1.0
    offset_scale: float = 1.0
    param_group: int = 0

    @property
    def size(self) -> int:
        return self.height * self.width


class MultiScaleSMCADecoderLayer(SMCADecoderLayer):
    """SMCA decoder layer over a memory made of several segments (feature maps).

    Keys as the single-scale layer (``self_attn``, ``multihead_attn``, ``linear1/2``, ``norm1..4``,
    ``point1`` in layer 0, ``point2``, ``point3``) plus ``point4`` (scale-selection logits, one per
    segment) when ``scale_selection``. With ``num_param_groups = P > 1`` ``point2`` / ``point3``
    predict P blocks (group-major: ``[P, G, 2]`` offsets, ``[P, G, k]`` scales), one per
    ``MemorySegment.param_group`` (official multi-scale: one block per segment).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False, *, num_segments: int,
                 num_param_groups: int = 1, scale_selection: bool = True, **smca_kwargs):
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, normalize_before, **smca_kwargs)
        self.num_segments = num_segments
        self.num_param_groups = num_param_groups
        g = self.num_gaussians
        # replaces the single-group heads of the parent (same attribute, same state-dict position)
        self.point2 = nn.Linear(d_model, 2 * g * num_param_groups)
        self.point3 = nn.Linear(d_model, self.k * g * num_param_groups) if self.k else None
        self.point4 = nn.Linear(d_model, num_segments) if scale_selection else None

    @prior_in_float32
    def multi_scale_prior(self, out: torch.Tensor, ref_px: Optional[torch.Tensor], image_wh: torch.Tensor,
                          segments: Sequence[MemorySegment], record: Optional[Dict] = None):
        """SMCA heads of this layer from ``out = norm4(tgt + query_pos)``.

        ``ref_px [B,Q,2]``: layer 0's reference centre in image pixels ``(w, h)·sigmoid(point1)``
        (None in layer 0, which computes it). Returns (bias ``[B,G,Q,S]`` over the concatenated
        segments, ref_px, reference logit ``[B,Q,2]`` or None); float32 under autocast
        (``prior_in_float32``).
        """
        b, q, _ = out.shape
        g, p = self.num_gaussians, self.num_param_groups
        offsets = self.point2(out)
        ref_logit = None
        if self.point1 is not None:
            ref_logit = self.point1(out)
            ref_px = image_wh[:, None, :] * ref_logit.sigmoid()
        elif ref_px is None:
            raise RuntimeError("SMCA decoder: layer 0 must own the reference head (point1)")
        off = offsets.view(b, q, p, g, 2)
        scales = self.point3(out).view(b, q, p, g, self.k) if self.point3 is not None else None
        biases = []
        for seg in segments:  # a handful of feature maps; everything inside is batched
            centers = ref_px[:, :, None, :] / seg.divisor + off[:, :, seg.param_group] * seg.offset_scale
            sc = scales[:, :, seg.param_group] if scales is not None else None
            biases.append(smca_gaussian_bias(centers, sc, seg.height, seg.width, self.dynamic_scale,
                                             self.smooth, seg.distance_factor))
        bias = torch.cat(biases, dim=-1)
        if record is not None:
            record["offsets"] = offsets
            if scales is not None:
                record["scale_raw"] = scales.flatten(2)
            record["gaussian"] = bias
        return bias, ref_px, ref_logit

    def scale_weights(self, out: torch.Tensor) -> Optional[torch.Tensor]:
        """α ``[B,Q,P]`` = softmax(point4(out)), or None without scale selection."""
        return None if self.point4 is None else self.point4(out).softmax(-1)

    def cross_attention(self, x, memory, pos, query_pos, attn_mask, alpha, segments, need_weights):
        if alpha is None:  # one softmax over every segment ("w/o SSA"): the shared SDPA path
            return self.multihead_attn(x + query_pos, memory + pos, memory, attn_bias=attn_mask,
                                       need_weights=need_weights)
        return self.multihead_attn(x + query_pos, memory + pos, memory, attn_bias=attn_mask, need_weights=need_weights,
                                   segments=[seg.size for seg in segments], segment_weights=alpha)

    def forward(self, tgt, memory, pos, query_pos, memory_key_padding_mask=None, ref_px=None, *,
                image_wh, segments: Sequence[MemorySegment], record: Optional[Dict] = None):
        """tgt/query_pos ``[B,Q,d]``, memory/pos ``[B,S,d]``. Returns (tgt, ref_px, ref_logit)."""
        out = self.norm4(tgt + query_pos)
        bias, ref_px, ref_logit = self.multi_scale_prior(out, ref_px, image_wh, segments, record)
        alpha = self.scale_weights(out)
        attn_mask = mask_padded_keys(bias, memory_key_padding_mask)
        need_weights = record is not None
        if self.normalize_before:
            x = self.norm1(tgt)
            qk = x + query_pos
            tgt = tgt + self.dropout1(self.self_attn(qk, qk, x)[0])
            ca, w = self.cross_attention(self.norm2(tgt), memory, pos, query_pos, attn_mask, alpha,
                                         segments, need_weights)
            tgt = tgt + self.dropout2(ca)
            tgt = tgt + self.dropout3(self.ffn(self.norm3(tgt)))
        else:
            qk = tgt + query_pos
            tgt = self.norm1(tgt + self.dropout1(self.self_attn(qk, qk, tgt)[0]))
            ca, w = self.cross_attention(tgt, memory, pos, query_pos, attn_mask, alpha, segments, need_weights)
            tgt = self.norm2(tgt + self.dropout2(ca))
            tgt = self.norm3(tgt + self.dropout3(self.ffn(tgt)))
        if record is not None:
            if alpha is not None:
                record["scale_attention"] = alpha
            record["cross_attn_out"] = ca
            record["cross_attn_weights"] = w
            record["out"] = tgt
        return tgt, ref_px, ref_logit


class MultiScaleSMCADecoder(nn.Module):
    """Stack of ``MultiScaleSMCADecoderLayer`` (layer 0 owns ``point1``); the final LayerNorm is
    applied to every layer output. Keys ``layers.{i}.*``, ``norm``."""

    def __init__(self, layers: List[MultiScaleSMCADecoderLayer], d_model: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt, memory, pos, query_pos, memory_key_padding_mask, *, image_wh,
                segments: Sequence[MemorySegment], records: Optional[List[Dict]] = None):
        """Returns hs ``[L,B,Q,d]`` and layer 0's reference logit ``[B,Q,2]``."""
        sizes = [s.size for s in segments]
        if sum(sizes) != memory.shape[1]:
            raise ValueError(f"memory has {memory.shape[1]} positions but the segments {sizes} sum to {sum(sizes)}")
        hs, ref_px, ref_logit = [], None, None
        for i, layer in enumerate(self.layers):
            rec = records[i] if records is not None else None
            tgt, ref_px, logit = layer(tgt, memory, pos, query_pos, memory_key_padding_mask, ref_px,
                                       image_wh=image_wh, segments=segments, record=rec)
            if logit is not None:
                ref_logit = logit
            hs.append(self.norm(tgt))
        return torch.stack(hs), ref_logit


def build_multiscale_decoder(cfg, num_segments: int, num_param_groups: int, scale_selection: bool):
    c, s = cfg.MODEL.SMCA_DETR, cfg.MODEL.SMCA_DETR.SMCA
    scale_channels(s.DYNAMIC_SCALE)
    if s.SMOOTH <= 0:
        raise ValueError(f"MODEL.SMCA_DETR.SMCA.SMOOTH (β) must be > 0, got {s.SMOOTH}")
    if c.DEC_LAYERS < 1:
        raise ValueError(f"MODEL.SMCA_DETR.DEC_LAYERS must be >= 1 for SMCA, got {c.DEC_LAYERS}")
    layers = [
        MultiScaleSMCADecoderLayer(
            c.HIDDEN_DIM, c.NHEADS, c.DIM_FEEDFORWARD, c.DROPOUT, c.ACTIVATION, c.PRE_NORM,
            num_segments=num_segments, num_param_groups=num_param_groups, scale_selection=scale_selection,
            dynamic_scale=s.DYNAMIC_SCALE, smooth=s.SMOOTH, head_shared=bool(s.HEAD_SHARED),
            reference_head=(i == 0), center_mlp_layers=s.CENTER_MLP_LAYERS)
        for i in range(c.DEC_LAYERS)
    ]
    return MultiScaleSMCADecoder(layers, c.HIDDEN_DIM)


def reset_smca_parameters(module: nn.Module, decoder: MultiScaleSMCADecoder, skip=()):
    """Official SMCA init: Xavier-uniform on every matrix of the transformer except ``skip``
    (input projections and queries keep their own init), then ``point3`` weight 0 / bias 1."""
    skip_ids = {id(p) for m in skip for p in m.parameters()}
    for p in module.parameters():
        if p.dim() > 1 and id(p) not in skip_ids:
            nn.init.xavier_uniform_(p)
    for layer in decoder.layers:
        if layer.point3 is not None:
            nn.init.zeros_(layer.point3.weight)
            nn.init.ones_(layer.point3.bias)


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


class MultiScaleEncoder(nn.Module):
    """Encoder of the paper's multi-scale SMCA: standard DETR encoder layers, each either within
    every scale separately (``"intra"``, weights shared by the scales) or over all scales together
    (``"multi"``). Keys ``layers.{i}.*`` (``TransformerEncoderLayer``), ``norm`` with pre-norm."""

    def __init__(self, layer: TransformerEncoderLayer, layout: List[str], norm: Optional[nn.Module] = None):
        super().__init__()
        self.layout = list(layout)
        self.layers = clones(layer, len(layout))
        self.norm = norm

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
class SMCAMultiScaleTransformer(nn.Module):
    """The paper's multi-scale SMCA (see the module docstring).

    Keys: ``input_proj.{l}`` (1x1 convs, one per backbone level), ``extra_proj`` (3x3 stride-2 conv
    on the last backbone level), ``level_embed [L+1, d]``, ``query_embed``, ``encoder.layers.{i}.*``,
    ``decoder.layers.{i}.*`` (``point4`` with scale selection), ``decoder.norm``.

    Config: MODEL.SMCA_DETR.{IN_FEATURES (paper: res4, res5), HIDDEN_DIM, NHEADS, ENC_LAYERS,
    DEC_LAYERS, DIM_FEEDFORWARD (paper 1024), DROPOUT, ACTIVATION, PRE_NORM, NUM_QUERIES,
    POS_TEMPERATURE}, MODEL.SMCA_DETR.SMCA.{ENCODER_LAYOUT, SCALE_SELECTION, DYNAMIC_SCALE,
    HEAD_SHARED, SMOOTH, CENTER_MLP_LAYERS}.

    ``record_intermediates = True`` adds ``masks``/``pos``/``src`` (per level), ``memory``,
    ``memory_mask``, ``ref_logits`` and ``dec.{l}.*`` to ``TransformerOutput.extras``.
    """

    def __init__(self, cfg, input_shapes):
        super().__init__()
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
        self.input_proj = nn.ModuleList(nn.Conv2d(x.channels, d, kernel_size=1) for x in input_shapes)
        self.extra_proj = nn.Conv2d(input_shapes[-1].channels, d, kernel_size=3, stride=2, padding=1)
        self.position_embedding = PositionEmbeddingSine(d // 2, temperature=c.POS_TEMPERATURE)
        self.level_embed = nn.Parameter(torch.empty(self.num_levels, d))
        self.query_embed = nn.Embedding(c.NUM_QUERIES, d)
        enc_layer = TransformerEncoderLayer(d, c.NHEADS, c.DIM_FEEDFORWARD, c.DROPOUT, c.ACTIVATION, c.PRE_NORM)
        self.encoder = MultiScaleEncoder(enc_layer, self.layout, nn.LayerNorm(d) if c.PRE_NORM else None)
        self.decoder = build_multiscale_decoder(cfg, self.num_levels, 1, self.scale_selection)
        self.record_intermediates = False
        reset_smca_parameters(self, self.decoder, skip=(self.input_proj, self.extra_proj, self.query_embed))
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
        srcs = [proj(f) for proj, f in zip(self.input_proj, features)] + [self.extra_proj(features[-1])]
        masks = list(masks) + [F.interpolate(masks[-1][None].float(), size=srcs[-1].shape[-2:]).bool()[0]]
        pos = [self.position_embedding(m).to(x.dtype) for m, x in zip(masks, srcs)]
        return srcs, masks, pos

    def forward(self, features, masks, image_sizes, heads=None) -> TransformerOutput:
        return self.forward_embedded(*self.embed(features, masks), image_sizes)

    def forward_embedded(self, srcs, masks, pos, image_sizes) -> TransformerOutput:
        """Encoder + decoder on the levels returned by ``embed``."""
        shapes = [shape_ints(x.shape[-2:]) for x in srcs]
        sizes = [h * w for h, w in shapes]
        src = torch.cat([flatten_level(x) for x in srcs], 1)
        lvl_pos = torch.cat([flatten_level(p) + e for p, e in zip(pos, self.level_embed.to(src.dtype))], 1)
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        memory = self.encoder(src, lvl_pos, mask, sizes)
        b = src.shape[0]
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        tgt = torch.zeros_like(query_pos)
        wh = image_wh(image_sizes, b, src)
        records = [{} for _ in self.decoder.layers] if self.record_intermediates else None
        hs, ref_logit = self.decoder(tgt, memory, lvl_pos, query_pos, mask, image_wh=wh,
                                     segments=self.segments(shapes), records=records)
        extras = {"reference_points": ref_logit.sigmoid()}
        if records is not None:
            extras.update(masks=masks, pos=pos, src=srcs, memory=memory, memory_mask=mask, ref_logits=ref_logit)
            for i, rec in enumerate(records):
                extras.update({f"dec.{i}.{k}": v for k, v in rec.items() if v is not None})
        references = ref_logit[None].expand(hs.shape[0], -1, -1, -1)
        return TransformerOutput(hs=hs, references=references, extras=extras)
