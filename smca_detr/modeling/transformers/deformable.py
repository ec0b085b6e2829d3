"""Deformable DETR (Zhu et al., ICLR 2021): multi-scale deformable attention encoder and decoder,
optionally with iterative bounding-box refinement and the two-stage variant.

Numerically identical to the official implementation (fundamentalvision/Deformable-DETR), checked
against its outputs by ``tests/test_parity_deformable.py``. Parameter names follow the official
ones under ``transformer.`` (``input_proj``, ``query_embed``, ``level_embed``, ``encoder.layers``,
``decoder.layers``, ``reference_points``, ``enc_output(_norm)``, ``pos_trans(_norm)``), so the
converter only moves the keys that live outside the official transformer.

Data flow (``B`` images, ``L`` levels, ``S`` = sum of ``H_l * W_l``, ``Q`` queries, everything
batch first):

* levels: ``input_proj[l]`` (1x1 conv + GroupNorm(32)) on each backbone level; extra levels are a
  3x3 stride-2 conv + GroupNorm(32) on the last *unprojected* backbone map (then on the previous
  extra level), with the image padding mask resized to their size. Every level gets the Deformable
  sine encoding (``offset=-0.5``) plus ``level_embed[l]``.
* encoder: deformable self-attention around each position's own pixel centre (normalised by the
  valid size of its level, then scaled by every level's valid ratio), post-norm, FFN.
* decoder: standard self-attention over queries, deformable cross-attention around the reference
  (``[B,Q,L,2]`` points or ``[B,Q,L,4]`` boxes, scaled by the valid ratios), FFN; no final norm.
* box refinement: per-layer heads; after layer ``l`` the reference becomes
  ``sigmoid(bbox_embed_l(out) + logit(ref))`` (detached).
* two-stage: every encoder position is a proposal; the top ``Q`` by the class-0 logit of the extra
  heads (index ``DEC_LAYERS``) seed the decoder's references and queries.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ...layers.dropout import Dropout
from ...layers.ms_deform_attn import MSDeformAttn
from ...layers.msda import IMPLS as MSDA_IMPLS
from ..backbone import image_padding_mask, resize_mask
from ..blocks import at_least_float32
from ..blocks import FFNMixin, MultiheadAttention, clones, inverse_sigmoid
from ..position_encoding import PositionEmbeddingSine, sine_embed
from ..registry import TRANSFORMER_REGISTRY
from .common import (DetrTransformerBase, TransformerEncoder, TransformerOutput, embed_levels, flatten_levels,
                     level_projections, padding_mask_or_none, xavier_init)

__all__ = ["DeformableTransformer", "DeformableTransformerEncoderLayer", "DeformableTransformerDecoderLayer",
           "DeformableTransformerDecoder", "valid_ratios", "encoder_reference_points",
           "encoder_output_proposals"]

_CFG = "MODEL.SMCA_DETR.DEFORMABLE"


# ---------------------------------------------------------------------------------------- helpers
def valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """``[B,H,W]`` padding mask -> ``[B,2]`` (valid columns / W, valid rows / H), float32."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


def valid_ratios(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Valid ratios of every level, ``[B,L,2]`` (x, y)."""
    return torch.stack([valid_ratio(m) for m in masks], 1)


def encoder_reference_points(spatial_shapes: Sequence[Tuple[int, int]], ratios: torch.Tensor) -> torch.Tensor:
    """Reference point of every encoder position on every level, ``[B,S,L,2]`` (x, y).

    Position ``(i, j)`` of level ``l`` has the pixel centre ``((j + 0.5) / (r_x W_l),
    (i + 0.5) / (r_y H_l))`` (normalised by the valid extent of its own level), which is then
    multiplied by the valid ratios ``r`` of every level.
    """
    device, b = ratios.device, ratios.shape[0]
    refs = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        ys = torch.arange(h, dtype=torch.float32, device=device) + 0.5
        xs = torch.arange(w, dtype=torch.float32, device=device) + 0.5
        ref_y = ys[None, :, None] / (ratios[:, lvl, 1] * h)[:, None, None]  # [B,H,1]
        ref_x = xs[None, None, :] / (ratios[:, lvl, 0] * w)[:, None, None]  # [B,1,W]
        refs.append(torch.stack([ref_x.expand(b, h, w), ref_y.expand(b, h, w)], -1).flatten(1, 2))
    ref = torch.cat(refs, 1)  # [B,S,2]
    return ref[:, :, None] * ratios[:, None]


def encoder_output_proposals(memory: torch.Tensor, mask_flatten: torch.Tensor,
                             spatial_shapes: Sequence[Tuple[int, int]]):
    """Two-stage proposals of every encoder position.

    Returns ``(memory_zeroed [B,S,d], proposals [B,S,4] logits, valid [B,S,1])``: position
    ``(i, j)`` of level ``l`` proposes the box ``((j + 0.5) / valid_W_l, (i + 0.5) / valid_H_l,
    0.05 * 2^l, 0.05 * 2^l)``; it is valid if all four lie in (0.01, 0.99). Proposal logits are
    ``+inf`` at padded or invalid positions, where the memory is zeroed.
    """
    b = memory.shape[0]
    device = memory.device
    proposals, start = [], 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        m = mask_flatten[:, start:start + h * w].view(b, h, w)
        valid_h = (~m[:, :, 0]).sum(1)
        valid_w = (~m[:, 0, :]).sum(1)
        ys = torch.arange(h, dtype=torch.float32, device=device)
        xs = torch.arange(w, dtype=torch.float32, device=device)
        grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], -1)  # [H,W,2]
        scale = torch.stack([valid_w, valid_h], -1).view(b, 1, 1, 2)
        centre = (grid[None] + 0.5) / scale  # [B,H,W,2]
        wh = torch.full_like(centre, 0.05 * (2.0 ** lvl))
        proposals.append(torch.cat([centre, wh], -1).view(b, h * w, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    invalid = mask_flatten[..., None] | ~valid
    proposals = proposals.masked_fill(invalid, float("inf"))
    memory = memory.masked_fill(invalid, 0.0)
    return memory, proposals, valid


# ---------------------------------------------------------------------------------------- layers
def _msda_block(d_model, n_levels, n_heads, n_points, msda_impl, dropout):
    """The deformable attention of a layer with its residual dropout and post-norm."""
    return MSDeformAttn(d_model, n_levels, n_heads, n_points, impl=msda_impl), Dropout(dropout), nn.LayerNorm(d_model)


class DeformableTransformerEncoderLayer(FFNMixin, nn.Module):
    """Deformable self-attention (queries = positions + encodings, values = positions), post-norm,
    then FFN with post-norm (official order; keys ``self_attn``, ``norm1``, ``linear1/2``, ``norm2``)."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, activation="relu", n_levels=4, n_heads=8,
                 n_points=4, msda_impl="auto"):
        super().__init__()
        self.self_attn, self.dropout1, self.norm1 = _msda_block(d_model, n_levels, n_heads, n_points, msda_impl, dropout)
        self.build_ffn(d_model, d_ffn, dropout, activation)
        self.dropout2 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        return self.norm2(src + self.dropout2(self.ffn(src)))


class DeformableTransformerDecoderLayer(FFNMixin, nn.Module):
    """Self-attention over the queries (``self_attn``, ``norm2``), deformable cross-attention to the
    memory (``cross_attn``, ``norm1``), FFN (``linear1/2``, ``norm3``); post-norm, official order."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, activation="relu", n_levels=4, n_heads=8,
                 n_points=4, msda_impl="auto"):
        super().__init__()
        self.cross_attn, self.dropout1, self.norm1 = _msda_block(d_model, n_levels, n_heads, n_points, msda_impl, dropout)
        self.self_attn = MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.build_ffn(d_model, d_ffn, dropout, activation)
        self.dropout3 = Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index,
                padding_mask=None):
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, q, tgt)[0]))
        tgt2 = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index,
                               padding_mask)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        return self.norm3(tgt + self.dropout3(self.ffn(tgt)))


class DeformableTransformerDecoder(nn.Module):
    """Decoder stack without a final norm. With ``box_heads`` (box refinement) the reference is
    refined after every layer by that layer's box head."""

    def __init__(self, layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = clones(layer, num_layers)
        self.num_layers = num_layers

    def forward(self, tgt, query_pos, reference, memory, spatial_shapes, level_start_index, ratios,
                padding_mask=None, box_heads=None, extras: Optional[Dict] = None):
        """reference ``[B,Q,2|4]`` in [0,1]; ratios ``[B,L,2]``. Returns ``hs [L,B,Q,d]`` and the
        list of references *given to* each layer (the reference its prediction is relative to)."""
        ratios4 = torch.cat([ratios, ratios], -1)[:, None]
        ratios2 = ratios[:, None]
        hs, layer_refs, ref_inputs = [], [], []
        out = tgt
        for lid, layer in enumerate(self.layers):
            layer_refs.append(reference)
            ref_in = reference[:, :, None] * (ratios4 if reference.shape[-1] == 4 else ratios2)
            ref_inputs.append(ref_in)
            out = layer(out, query_pos, ref_in, memory, spatial_shapes, level_start_index, padding_mask)
            if box_heads is not None:
                delta = box_heads(lid)(out)
                k = reference.shape[-1]
                new = torch.cat([delta[..., :k] + inverse_sigmoid(reference), delta[..., k:]], -1)
                reference = new.sigmoid().detach()
            hs.append(out)
        if extras is not None:
            extras["dec_reference_points_input"] = ref_inputs
            extras["inter_references"] = layer_refs[1:] + [reference]
        return torch.stack(hs), layer_refs


# ---------------------------------------------------------------------------------------- transformer
@TRANSFORMER_REGISTRY.register()
class DeformableTransformer(DetrTransformerBase):
    """Deformable DETR transformer (see the module docstring).

    Config: ``MODEL.SMCA_DETR`` sizes (HIDDEN_DIM, NHEADS, ENC/DEC_LAYERS, DIM_FEEDFORWARD, DROPOUT,
    ACTIVATION, NUM_QUERIES, IN_FEATURES) and ``MODEL.SMCA_DETR.DEFORMABLE`` (NUM_FEATURE_LEVELS,
    ENC/DEC_N_POINTS, WITH_BOX_REFINE, TWO_STAGE (NUM_QUERIES proposals), MSDA_IMPL).

    Attributes read by the meta-architecture: ``per_layer_heads`` (= box refinement),
    ``num_head_sets`` (``DEC_LAYERS``, + 1 for the two-stage encoder heads), ``zero_init_box``,
    ``init_heads(heads)``.

    ``extras`` (official layouts, batch first): ``srcs``, ``masks``, ``pos_embeds`` (per level, level
    embeddings not added), ``spatial_shapes``, ``level_start_index``, ``valid_ratios [B,L,2]``,
    ``mask_flatten [B,S]``, ``encoder_reference_points [B,S,L,2]``, ``memory [B,S,d]``, ``dec_tgt``,
    ``dec_query_pos``, ``init_reference``, ``inter_references`` (list per layer),
    ``dec_reference_points_input`` (list per layer, scaled by the valid ratios); two-stage also
    ``output_memory``, ``output_proposals`` (+inf where invalid), ``enc_outputs_coord_unact``,
    ``topk_proposals``. ``record_intermediates`` adds ``memory_shapes``, ``memory_strides`` and every
    decoder layer's ``dec.{l}.sampling_locations``, ``dec.{l}.sampling_weights`` and
    ``dec.{l}.reference_points`` (``DetrTransformerBase``; off by default: they cost a copy per layer).

    Extra levels need the image padding mask: it is rebuilt from ``image_sizes`` and the padded size
    ``H_0 * stride_0`` of the finest level (the batch is padded to a multiple of the largest stride).
    """

    zero_init_box = True

    def __init__(self, cfg, input_shapes):
        super().__init__(cfg)
        c = cfg.MODEL.SMCA_DETR
        dc = c.DEFORMABLE
        d = c.HIDDEN_DIM
        self.d_model = d
        self.num_feature_levels = dc.NUM_FEATURE_LEVELS
        self.with_box_refine = bool(dc.WITH_BOX_REFINE)
        self.two_stage = bool(dc.TWO_STAGE)
        num_backbone = len(input_shapes)
        if num_backbone < 1:
            raise ValueError("DeformableTransformer needs at least one backbone level (MODEL.SMCA_DETR.IN_FEATURES)")
        if self.num_feature_levels < num_backbone:
            raise ValueError(
                f"{_CFG}.NUM_FEATURE_LEVELS={self.num_feature_levels} is smaller than the number of backbone "
                f"levels MODEL.SMCA_DETR.IN_FEATURES={list(c.IN_FEATURES)}; use NUM_FEATURE_LEVELS >= "
                f"{num_backbone} (levels beyond the backbone are extra stride-2 convolutions)")
        if self.two_stage and not self.with_box_refine:
            raise ValueError(
                f"{_CFG}.TWO_STAGE=True requires {_CFG}.WITH_BOX_REFINE=True: two-stage Deformable DETR "
                "needs per-layer heads (the encoder proposals use the extra head set at index DEC_LAYERS); "
                "the official implementation crashes in this combination too")
        if c.PRE_NORM:
            raise ValueError("Deformable DETR has no pre-norm variant; set MODEL.SMCA_DETR.PRE_NORM=False")
        if d % 32 != 0:
            raise ValueError(f"Deformable DETR's input projections use GroupNorm(32, d): MODEL.SMCA_DETR.HIDDEN_DIM "
                             f"must be a multiple of 32, got {d}")
        if dc.MSDA_IMPL not in MSDA_IMPLS:
            raise ValueError(f"{_CFG}.MSDA_IMPL must be one of {list(MSDA_IMPLS)}, got {dc.MSDA_IMPL!r}")
        self.num_queries = c.NUM_QUERIES
        self.per_layer_heads = self.with_box_refine
        self.num_head_sets = c.DEC_LAYERS + (1 if self.two_stage else 0)
        self.strides = [s.stride for s in input_shapes]
        projs, extra = level_projections(input_shapes, d, self.num_feature_levels, group_norm=True)
        self.input_proj = nn.ModuleList(projs + extra)
        self.position_embedding = PositionEmbeddingSine(d // 2, temperature=c.POS_TEMPERATURE, offset=-0.5)
        self.level_embed = nn.Parameter(torch.empty(self.num_feature_levels, d))

        L = self.num_feature_levels
        enc_layer = DeformableTransformerEncoderLayer(d, c.DIM_FEEDFORWARD, c.DROPOUT, c.ACTIVATION, L, c.NHEADS,
                                                      dc.ENC_N_POINTS, dc.MSDA_IMPL)
        self.encoder = TransformerEncoder(enc_layer, c.ENC_LAYERS)
        dec_layer = DeformableTransformerDecoderLayer(d, c.DIM_FEEDFORWARD, c.DROPOUT, c.ACTIVATION, L, c.NHEADS,
                                                      dc.DEC_N_POINTS, dc.MSDA_IMPL)
        self.decoder = DeformableTransformerDecoder(dec_layer, c.DEC_LAYERS)

        if self.two_stage:
            self.enc_output = nn.Linear(d, d)
            self.enc_output_norm = nn.LayerNorm(d)
            self.pos_trans = nn.Linear(2 * d, 2 * d)
            self.pos_trans_norm = nn.LayerNorm(2 * d)
        else:
            self.query_embed = nn.Embedding(self.num_queries, 2 * d)
            self.reference_points = nn.Linear(d, 2)
        self._reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def _reset_parameters(self):
        """Official initialisation: Xavier on every matrix of the transformer proper, then the
        deformable-attention init, Xavier + zero bias for ``reference_points``, N(0,1) level
        embeddings; ``input_proj`` convs Xavier with zero bias (GroupNorm 1/0); ``query_embed``
        keeps nn.Embedding's N(0,1)."""
        xavier_init(self, skip=(self.input_proj,) if self.two_stage else (self.input_proj, self.query_embed))
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

    @torch.no_grad()
    def init_heads(self, heads):
        """Official head init on top of PredictionHeads' (focal prior, zero last box layer): the
        box-size logits start at -2 (boxes ~0.12 of the image) for the shared head, or for layer 0
        only with box refinement (the reference carries the size afterwards); two-stage resets them
        to 0 everywhere (sizes come from the proposals)."""
        if self.two_stage:
            for i in range(heads.num_sets):
                nn.init.zeros_(heads.box_head(i).layers[-1].bias[2:])
        else:
            nn.init.constant_(heads.box_head(0).layers[-1].bias[2:], -2.0)

    # ------------------------------------------------------------------ forward
    def _levels(self, features: List[torch.Tensor], masks: List[torch.Tensor], image_sizes):
        """Projected levels, their masks and (float32-computed) position encodings."""
        n_backbone = len(features)
        if n_backbone != len(self.strides):
            raise ValueError(f"DeformableTransformer was built for {len(self.strides)} backbone level(s), "
                             f"got {n_backbone}")
        image_mask = None
        if self.num_feature_levels > n_backbone:
            # Extra levels use the image mask resized to their size (official behaviour). The padded
            # image size is the finest level's size times its stride (the batch is padded to a
            # multiple of the largest stride).
            h0, w0 = features[0].shape[-2:]
            padded = (h0 * self.strides[0], w0 * self.strides[0])
            image_mask = image_padding_mask(image_sizes, padded, features[0].device)
        return embed_levels(self.input_proj, features, masks, self.position_embedding,
                            lambda size: resize_mask(image_mask, size))

    def forward(self, features, masks, image_sizes, heads=None) -> TransformerOutput:
        if (self.with_box_refine or self.two_stage) and heads is None:
            raise ValueError("DeformableTransformer with box refinement / two-stage needs the prediction heads")
        srcs, masks, pos = self._levels(features, masks, image_sizes)
        spatial = [tuple(s.shape[-2:]) for s in srcs]
        device = srcs[0].device
        if torch.jit.is_tracing():  # ONNX export: the level sizes stay graph values
            spatial_shapes = torch.stack([torch.stack([torch.as_tensor(h), torch.as_tensor(w)])
                                          for h, w in spatial]).to(device)
            sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
            level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
        else:
            spatial_shapes = torch.as_tensor(spatial, dtype=torch.long).to(device, non_blocking=True)
            starts = [0]
            for h, w in spatial[:-1]:
                starts.append(starts[-1] + h * w)
            level_start_index = torch.as_tensor(starts, dtype=torch.long).to(device, non_blocking=True)

        src_flatten, mask_flatten, pos_flatten = flatten_levels(srcs, masks, pos, self.level_embed)
        # Valid ratios, reference points and proposals stay in (at least) float32 under mixed precision:
        # sampling locations need the resolution (the official code computes them in float32 too).
        ratios = valid_ratios(masks)
        enc_ref = encoder_reference_points(spatial, ratios)
        # The attention only uses the mask to zero padded values: with no padding in the batch (checked
        # on the CPU only, where that costs no device sync) the masking work is skipped.
        attn_mask = padding_mask_or_none(mask_flatten)
        memory = self.encoder(src_flatten, pos_flatten, enc_ref, spatial_shapes, level_start_index, attn_mask)

        extras = {"srcs": srcs, "masks": masks, "pos_embeds": pos, "spatial_shapes": spatial_shapes,
                  "level_start_index": level_start_index, "valid_ratios": ratios, "mask_flatten": mask_flatten,
                  "encoder_reference_points": enc_ref, "memory": memory}
        bs = memory.shape[0]
        enc_outputs = None
        if self.two_stage:
            n = self.decoder.num_layers
            out_memory, proposals, _ = encoder_output_proposals(memory, mask_flatten, spatial)
            out_memory = self.enc_output_norm(self.enc_output(out_memory))
            enc_logits = heads.class_head(n)(out_memory)
            enc_coord_unact = heads.box_head(n)(out_memory) + proposals
            topk = torch.topk(enc_logits[..., 0], self.num_queries, dim=1)[1]
            topk_coords = torch.gather(enc_coord_unact, 1, topk[..., None].expand(-1, -1, 4)).detach()
            reference = topk_coords.sigmoid()
            query_embed = self.pos_trans_norm(self.pos_trans(sine_embed(reference, self.d_model // 2)))
            query_pos, tgt = query_embed.split(self.d_model, dim=-1)
            enc_outputs = {"pred_logits": at_least_float32(enc_logits),
                           "pred_boxes": at_least_float32(enc_coord_unact).sigmoid()}
            extras.update(output_memory=out_memory, output_proposals=proposals,
                          enc_outputs_coord_unact=enc_coord_unact, topk_proposals=topk)
        else:
            query_pos, tgt = self.query_embed.weight.split(self.d_model, dim=-1)
            query_pos = query_pos[None].expand(bs, -1, -1)
            tgt = tgt[None].expand(bs, -1, -1)
            reference = at_least_float32(self.reference_points(query_pos)).sigmoid()
        extras.update(dec_tgt=tgt, dec_query_pos=query_pos, init_reference=reference)

        cross = [layer.cross_attn for layer in self.decoder.layers]
        for m in cross:
            m.store_sampling = self.record_intermediates
        hs, layer_refs = self.decoder(tgt, query_pos, reference, memory, spatial_shapes, level_start_index,
                                      ratios, attn_mask,
                                      box_heads=heads.box_head if self.with_box_refine else None,
                                      extras=extras)
        if self.record_intermediates:
            strides = self.strides + [self.strides[-1] * 2 ** (i + 1) for i in range(len(spatial) - len(self.strides))]
            extras.update(memory_shapes=spatial, memory_strides=strides)
            for l, m in enumerate(cross):
                extras.update({f"dec.{l}.sampling_locations": m.last_sampling["sampling_locations"],
                               f"dec.{l}.sampling_weights": m.last_sampling["attention_weights"],
                               f"dec.{l}.reference_points": extras["dec_reference_points_input"][l]})
                m.store_sampling, m.last_sampling = False, None

        # Reference of each layer's prediction in logit space; a 2-d reference among 4-d ones (layer 0
        # with box refinement) gets zero size logits, which leaves the box head's size output unchanged.
        k = max(r.shape[-1] for r in layer_refs)
        refs = []
        for r in layer_refs:
            logit = inverse_sigmoid(r)
            if logit.shape[-1] < k:
                logit = torch.cat([logit, logit.new_zeros(*logit.shape[:-1], k - logit.shape[-1])], -1)
            refs.append(logit)
        return TransformerOutput(hs=hs, references=torch.stack(refs), enc_outputs=enc_outputs, extras=extras)
