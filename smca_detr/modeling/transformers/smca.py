"""SMCA-DETR, single scale (Gao et al., "Fast Convergence of DETR with Spatially Modulated
Co-Attention", ICCV 2021), identical in its maths to the official single-scale code.

Method (decoder only; the encoder is the standard DETR encoder):

* Every decoder layer first computes ``out = norm4(tgt + query_pos)`` (before self-attention);
  ``out`` drives the SMCA heads of the layer.
* Layer 0 only: ``point1`` (an MLP, ``SMCA.CENTER_MLP_LAYERS`` layers) gives the reference logit
  ``(x, y)`` of each query. ``sigmoid(logit) * (w, h) / stride`` is the reference centre in feature
  pixels, ``(w, h)`` the unpadded size of the image. Later layers reuse layer 0's centre.
* Every layer: ``point2(out)`` gives one ``(x, y)`` offset (feature pixels) per Gaussian, added to the
  reference centre; ``point3(out)`` gives the raw scales (squared before use) of the
  ``SMCA.DYNAMIC_SCALE`` parametrisation (see ``smca_gaussian_bias``).
* The log-Gaussian ``-|weighted squared distance| / β`` (β = ``SMCA.SMOOTH``) of each key position
  (the integer grid ``(column, row)`` of the padded map) is **added** to the cross-attention logits
  after padded keys are masked with ``-inf``, before the softmax. Here it is the additive
  ``attn_bias`` of the shared SDPA ``MultiheadAttention``: no Python loop over heads or queries.
* The decoder's final LayerNorm is applied to every layer output; boxes are
  ``sigmoid(bbox_embed(hs) + [ref_logit, 0, 0])`` for every layer (``TransformerOutput.references`` is
  layer 0's reference logit repeated per layer).

Deliberate differences from the official code (numerically identical for the official setup):

* Unpadded image sizes come from ``image_sizes`` (detectron2 ``ImageList``), not from the targets,
  so inference needs no targets.
* The stride is the real stride of the feature map (``input_shapes[0].stride``) instead of a
  hard-coded 32: identical for C5, correct for DC5 (stride 16).
* ``d`` (HIDDEN_DIM) and the number of heads M (NHEADS) come from the config (the official code
  hard-wires 256 and 8).
* ``SMCA.HEAD_SHARED``: the paper's "head-shared" ablation (one Gaussian, i.e. one centre offset and
  one set of scales, shared by all heads; ``point2``/``point3`` then have 2 and k outputs). The
  official code only has the head-specific version (the default).
* Pre-norm (``PRE_NORM``) applies the same SMCA heads inside DETR's pre-norm layer layout; it is not
  covered by the official parity fixtures.
"""
import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ...layers.tracing import shape_ints
from ..blocks import MLP, at_least_float32
from ..registry import TRANSFORMER_REGISTRY
from .common import (DetrTransformerBase, TransformerOutput, build_single_level, image_wh, padding_mask_or_none,
                     xavier_init)
from .detr import TransformerDecoderLayer

__all__ = ["SCALE_CHANNELS", "scale_channels", "smca_gaussian_bias", "mask_padded_keys",
           "image_wh", "prior_in_float32", "MemorySegment", "SMCADecoderLayer", "SMCADecoder",
           "reset_smca_parameters", "SMCATransformer"]

# Raw scale values k per Gaussian that ``point3`` predicts for each ``dynamic_scale`` type.
SCALE_CHANNELS = {"type1": 0, "type2": 1, "type3": 2, "type4": 3}


def scale_channels(dynamic_scale: str) -> int:
    """k, the number of raw scales per Gaussian of ``dynamic_scale`` (type1 0, type2 1, type3 2,
    type4 3); raises a ValueError naming the config key for an unknown type."""
    if dynamic_scale not in SCALE_CHANNELS:
        raise ValueError(f"MODEL.SMCA_DETR.SMCA.DYNAMIC_SCALE must be one of {sorted(SCALE_CHANNELS)}, "
                         f"got {dynamic_scale!r}")
    return SCALE_CHANNELS[dynamic_scale]


def prior_in_float32(method):
    """Decorator of the SMCA prior methods ``(self, out, ref, image_wh, ...)`` (single and multi
    scale): under autocast (bf16 / fp16) they run with autocast off and ``out``, the reference centre
    and ``image_wh`` in float32, so that the heads ``point1..3``, the centres and the squared distances
    (~1e3-1e6 feature pixels², beyond fp16's 65504 and bf16's 8-bit mantissa) are all float32; the
    bias is returned in float32 (``make_attn_mask`` clamps it before casting to the query dtype)."""
    @functools.wraps(method)
    def run(self, out, ref, image_wh, *args, **kwargs):
        if not torch.is_autocast_enabled(out.device.type):
            return method(self, out, ref, image_wh, *args, **kwargs)
        with torch.autocast(out.device.type, enabled=False):
            return method(self, at_least_float32(out), None if ref is None else at_least_float32(ref),
                          at_least_float32(image_wh), *args, **kwargs)
    return run


def smca_gaussian_bias(centers: torch.Tensor, scales: Optional[torch.Tensor], grid_h: int, grid_w: int,
                       dynamic_scale: str, smooth: float, distance_factor: float = 1.0) -> torch.Tensor:
    """SMCA's spatial prior: the additive log-Gaussian cross-attention bias of one feature map.

    Public API shared by the single-scale and the multi-scale SMCA transformers.

    Args:
        centers: ``[B, Q, G, 2]`` Gaussian centres ``(x, y)`` in feature pixels of this map
            (``G`` Gaussians per query: M heads, or 1 when head-shared).
        scales: ``[B, Q, G, k]`` raw ``point3`` outputs (**before** squaring; squared here), with
            ``k = scale_channels(dynamic_scale)``; ignored (may be None) for ``type1``. Per Gaussian
            the channel order is the official one: type2 ``s``; type3 ``(sx, sy)``; type4
            ``(sx, sy, sxy)``.
        grid_h, grid_w: size of the (padded) feature map; the key positions are the integer grid
            ``(column, row)``, ``x = 0..grid_w-1``, ``y = 0..grid_h-1`` (no +0.5, as official).
        dynamic_scale: weighted squared distance ``D`` with ``dx = x - cx``, ``dy = y - cy``:
            type1 ``dx² + dy²``; type2 ``s²·(dx² + dy²)``; type3 ``sx²·dx² + sy²·dy²``;
            type4 ``sx²·dx² + sy²·dy² + sxy²·dx²·dy²``.
        smooth: β; the bias is ``-|D · distance_factor| / β``.
        distance_factor: multiplies ``D`` (the multi-scale model weights its segments by
            0.5 / 0.5 / 1 / 2); 1 for single scale.

    Returns:
        ``[B, G, Q, grid_h * grid_w]`` bias, keys row-major (as a flattened ``[H, W]`` map), in the
        dtype of ``centers``; add it to the attention logits (broadcasts over heads when G = 1).
        Computed separably (``[.., H, 1] + [.., 1, W]``), never materialising per-key coordinates.
    """
    k = scale_channels(dynamic_scale)
    b, q, g, _ = centers.shape
    c = centers.permute(0, 2, 1, 3)  # [B,G,Q,2]
    gx = torch.arange(grid_w, dtype=centers.dtype, device=centers.device)
    gy = torch.arange(grid_h, dtype=centers.dtype, device=centers.device)
    dx2 = (gx - c[..., 0:1]).square()  # [B,G,Q,W]
    dy2 = (gy - c[..., 1:2]).square()  # [B,G,Q,H]
    if k:
        if scales is None or scales.shape != (b, q, g, k):
            raise ValueError(f"SMCA {dynamic_scale}: scales must be [B,Q,G,{k}] = {(b, q, g, k)}, got "
                             f"{None if scales is None else tuple(scales.shape)}")
        s = scales.permute(0, 2, 1, 3).square()  # [B,G,Q,k]
    # Separable: every term is (small x-factor [.., W]) or (small y-factor [.., H]); the factor
    # distance_factor / -β is applied to the small factors, so the [B,G,Q,H,W] result is written once
    # (twice for type4's cross term). D >= 0 by construction, so -|D|/β == -D/β.
    f = -smooth / distance_factor
    if dynamic_scale == "type1":
        tx, ty = dx2 / f, dy2 / f
    elif dynamic_scale == "type2":
        tx, ty = dx2 * s[..., 0:1] / f, dy2 * s[..., 0:1] / f
    else:
        tx, ty = dx2 * s[..., 0:1] / f, dy2 * s[..., 1:2] / f
    bias = tx[..., None, :] + ty[..., :, None]
    if dynamic_scale == "type4":  # + sxy²·dx²·dy² / -β, accumulated in place (bias is fresh)
        bias = bias.addcmul_((dx2 * s[..., 2:3] / f)[..., None, :], dy2[..., :, None])
    return bias.flatten(-2)


def mask_padded_keys(bias: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                     inplace: bool = False) -> torch.Tensor:
    """``bias [B,G,Q,S]`` with ``-inf`` at padded keys (``key_padding_mask [B,S]``, True = pad): the
    complete additive mask of the SMCA cross-attention in one tensor. ``inplace=True`` writes into
    ``bias`` (saves a full-size copy; only for a fresh bias nobody else reads)."""
    if key_padding_mask is None:
        return bias
    m = key_padding_mask[:, None, None, :]
    return bias.masked_fill_(m, float("-inf")) if inplace else bias.masked_fill(m, float("-inf"))


@dataclass(frozen=True)
class MemorySegment:
    """One segment (feature map) of the decoder memory, as the SMCA Gaussian sees it. Single scale is
    one segment ``MemorySegment(H, W, divisor=stride)``.

    height, width: its (padded) grid; keys are its integer ``(column, row)`` positions, row-major.
    divisor: image pixels per grid cell used for the centre (``centre = ref_px / divisor + ...``).
    distance_factor: multiplies the weighted squared distance (official multi-scale: 0.5, 0.5, 1, 2).
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


class SMCADecoderLayer(TransformerDecoderLayer):
    """DETR decoder layer with SMCA's Gaussian-modulated cross-attention over a memory made of one or
    more segments (feature maps); the residual path is DETR's, only ``cross_attention`` differs.

    Keys (official names): ``self_attn``, ``multihead_attn``, ``linear1``, ``linear2``,
    ``norm1..norm4``, ``point1.layers.{i}`` (reference MLP, layer 0 only), ``point2`` (centre offsets,
    2·G·P outputs), ``point3`` (raw scales, k·G·P outputs; absent for type1), ``point4``
    (scale-selection logits, one per segment) with ``scale_selection``. With ``num_param_groups =
    P > 1`` ``point2`` / ``point3`` predict P blocks (group-major: ``[P, G, 2]`` offsets, ``[P, G, k]``
    scales), one per ``MemorySegment.param_group`` (official multi-scale: one block per segment).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False, *, dynamic_scale: str = "type3",
                 smooth: float = 8.0, head_shared: bool = False, reference_head: bool = False,
                 center_mlp_layers: int = 3, num_segments: int = 1, num_param_groups: int = 1,
                 scale_selection: bool = False):
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, normalize_before)
        self.norm4 = nn.LayerNorm(d_model)
        self.dynamic_scale = dynamic_scale
        self.smooth = float(smooth)
        self.num_gaussians = g = 1 if head_shared else nhead
        self.num_param_groups = num_param_groups
        self.k = scale_channels(dynamic_scale)
        if reference_head:
            if center_mlp_layers < 1:
                raise ValueError(f"MODEL.SMCA_DETR.SMCA.CENTER_MLP_LAYERS must be >= 1, got {center_mlp_layers}")
            self.point1 = MLP(d_model, d_model, 2, center_mlp_layers)
        else:
            self.point1 = None
        self.point2 = nn.Linear(d_model, 2 * g * num_param_groups)
        self.point3 = nn.Linear(d_model, self.k * g * num_param_groups) if self.k else None
        self.point4 = nn.Linear(d_model, num_segments) if scale_selection else None

    @prior_in_float32
    def prior(self, out: torch.Tensor, ref_px: Optional[torch.Tensor], image_wh: torch.Tensor,
              segments: Sequence[MemorySegment], record: Optional[Dict] = None):
        """SMCA heads of this layer from ``out = norm4(tgt + query_pos)``.

        ``image_wh [B,2]``: unpadded (w, h); ``ref_px [B,Q,2]``: layer 0's reference centre in image
        pixels ``(w, h)·sigmoid(point1)`` (None in layer 0, which computes it). Returns (bias
        ``[B,G,Q,S]`` over the concatenated segments, ref_px, reference logit ``[B,Q,2]`` or None);
        float32 under autocast (``prior_in_float32``).
        """
        b, q, _ = out.shape
        g, p = self.num_gaussians, self.num_param_groups
        offsets = self.point2(out)
        ref_logit = None
        if self.point1 is not None:  # layer 0 (SMCADecoder gives it the reference head)
            ref_logit = self.point1(out)
            ref_px = image_wh[:, None, :] * ref_logit.sigmoid()
        off = offsets.view(b, q, p, g, 2)
        scales = self.point3(out).view(b, q, p, g, self.k) if self.point3 is not None else None
        biases = []
        for seg in segments:  # a handful of feature maps; everything inside is batched
            centers = ref_px[:, :, None, :] / seg.divisor + off[:, :, seg.param_group] * seg.offset_scale
            sc = scales[:, :, seg.param_group] if scales is not None else None
            biases.append(smca_gaussian_bias(centers, sc, seg.height, seg.width, self.dynamic_scale,
                                             self.smooth, seg.distance_factor))
        bias = biases[0] if len(biases) == 1 else torch.cat(biases, dim=-1)
        if record is not None:
            record["offsets"] = offsets
            if scales is not None:
                record["scale_raw"] = scales.flatten(2)
            record["gaussian"] = bias
            if len(segments) == 1:
                record["centers"] = centers
        return bias, ref_px, ref_logit

    def scale_weights(self, out: torch.Tensor) -> Optional[torch.Tensor]:
        """α ``[B,Q,P]`` = softmax(point4(out)), or None without scale selection."""
        return None if self.point4 is None else self.point4(out).softmax(-1)

    def cross_attention(self, query, key, value, *, attn_mask, alpha, segments, record=None):
        """Attention with the additive SMCA mask ``[B,G|1,Q,S]`` (Gaussian, -inf at padded keys); with
        α (scale selection) the softmax is taken within each segment and weighted by α."""
        ca, w = self.multihead_attn(query, key, value, attn_bias=attn_mask, need_weights=record is not None,
                                    segments=None if alpha is None else [seg.size for seg in segments],
                                    segment_weights=alpha)
        if record is not None:
            record["cross_attn_out"] = ca
            record["cross_attn_weights"] = w
        return ca

    def forward(self, tgt, memory, memory_pos, query_pos, key_padding_mask=None, ref_px=None, *, image_wh,
                segments: Sequence[MemorySegment], record: Optional[Dict] = None):
        """tgt/query_pos ``[B,Q,d]``, memory / ``memory_pos = memory + pos`` ``[B,S,d]``.
        Returns (tgt, ref_px, ref_logit)."""
        out = self.norm4(tgt + query_pos)
        bias, ref_px, ref_logit = self.prior(out, ref_px, image_wh, segments, record)
        alpha = self.scale_weights(out)
        # the bias is fresh unless recorded: mask it in place
        attn_mask = mask_padded_keys(bias, key_padding_mask, inplace=record is None)
        tgt = super().forward(tgt, memory, memory_pos, query_pos, attn_mask=attn_mask, alpha=alpha,
                              segments=segments, record=record)
        if record is not None:
            if alpha is not None:
                record["scale_attention"] = alpha
            record["out"] = tgt
        return tgt, ref_px, ref_logit


class SMCADecoder(nn.Module):
    """SMCA decoder (every SMCA variant): layer 0 owns the reference head; the final LayerNorm is
    applied to every layer output. Keys ``layers.{i}.*``, ``norm``.

    Built from MODEL.SMCA_DETR.{HIDDEN_DIM, NHEADS, DEC_LAYERS, DIM_FEEDFORWARD, DROPOUT, ACTIVATION,
    PRE_NORM} and MODEL.SMCA_DETR.SMCA.{DYNAMIC_SCALE, HEAD_SHARED, SMOOTH, CENTER_MLP_LAYERS}.
    """

    def __init__(self, cfg, num_segments: int = 1, num_param_groups: int = 1, scale_selection: bool = False):
        super().__init__()
        c, s = cfg.MODEL.SMCA_DETR, cfg.MODEL.SMCA_DETR.SMCA
        if s.SMOOTH <= 0:
            raise ValueError(f"MODEL.SMCA_DETR.SMCA.SMOOTH (β) must be > 0, got {s.SMOOTH}")
        if c.DEC_LAYERS < 1:
            raise ValueError(f"MODEL.SMCA_DETR.DEC_LAYERS must be >= 1 for SMCA, got {c.DEC_LAYERS}")
        self.layers = nn.ModuleList(
            SMCADecoderLayer(c.HIDDEN_DIM, c.NHEADS, c.DIM_FEEDFORWARD, c.DROPOUT, c.ACTIVATION, c.PRE_NORM,
                             dynamic_scale=s.DYNAMIC_SCALE, smooth=s.SMOOTH, head_shared=bool(s.HEAD_SHARED),
                             reference_head=(i == 0), center_mlp_layers=s.CENTER_MLP_LAYERS,
                             num_segments=num_segments, num_param_groups=num_param_groups,
                             scale_selection=scale_selection)
            for i in range(c.DEC_LAYERS))
        self.norm = nn.LayerNorm(c.HIDDEN_DIM)

    def forward(self, tgt, memory, pos, query_pos, key_padding_mask, *, image_wh,
                segments: Sequence[MemorySegment], records: Optional[List[Dict]] = None):
        """Returns hs ``[L,B,Q,d]`` and layer 0's reference logit ``[B,Q,2]``."""
        sizes = [seg.size for seg in segments]
        if sum(sizes) != memory.shape[1]:
            raise ValueError(f"memory has {memory.shape[1]} positions but the segments {sizes} sum to {sum(sizes)}")
        hs, ref_px, ref_logit = [], None, None
        memory_pos = memory + pos  # the cross-attention keys' input, the same for every layer
        for i, layer in enumerate(self.layers):
            rec = records[i] if records is not None else None
            tgt, ref_px, logit = layer(tgt, memory, memory_pos, query_pos, key_padding_mask, ref_px,
                                       image_wh=image_wh, segments=segments, record=rec)
            if logit is not None:
                ref_logit = logit
            hs.append(self.norm(tgt))
        return torch.stack(hs), ref_logit

    def decode(self, query_embed: torch.Tensor, memory, pos, key_padding_mask, image_sizes,
               segments: Sequence[MemorySegment], record_extras: Optional[Dict] = None) -> TransformerOutput:
        """The SMCA transformers' tail: zero targets with the learned ``query_embed [Q,d]`` as query
        positions, the decoder, references (layer 0's logit for every layer). ``record_extras`` (a
        dict, or None when not recording): the caller's intermediates, returned in ``extras`` with
        ``hs``, ``ref_logits``, ``memory_shapes``, ``memory_strides`` and every layer's ``dec.{l}.*``
        (``offsets``, ``scale_raw``, ``gaussian [B,G,Q,S]``, ``centers`` (one segment),
        ``scale_attention``, ``out``, ``cross_attn_out``, ``cross_attn_weights [B,M,Q,S]``). ``extras["reference_points"]``
        (sigmoid of the reference logit, ``[B,Q,2]``, normalised (x, y)) is always returned."""
        b = memory.shape[0]
        query_pos = query_embed[None].expand(b, -1, -1)
        tgt = torch.zeros_like(query_pos)
        wh = image_wh(image_sizes, b, memory)
        records = [{} for _ in self.layers] if record_extras is not None else None
        hs, ref_logit = self(tgt, memory, pos, query_pos, key_padding_mask, image_wh=wh, segments=segments,
                             records=records)
        extras = {"reference_points": ref_logit.sigmoid()}
        if records is not None:
            extras.update(record_extras, hs=hs, ref_logits=ref_logit, memory_shapes=[(s.height, s.width) for s in segments],
                          memory_strides=[s.divisor for s in segments])
            for i, rec in enumerate(records):
                extras.update({f"dec.{i}.{k}": v for k, v in rec.items() if v is not None})
        references = ref_logit[None].expand(hs.shape[0], -1, -1, -1)
        return TransformerOutput(hs=hs, references=references, extras=extras)


def reset_smca_parameters(module: nn.Module, skip=()):
    """Official SMCA init: ``xavier_init(module, skip)``, then ``point3`` of every decoder layer weight
    0 / bias 1 (all scales 1)."""
    xavier_init(module, skip)
    for layer in module.decoder.layers:
        if layer.point3 is not None:
            nn.init.zeros_(layer.point3.weight)
            nn.init.ones_(layer.point3.bias)


@TRANSFORMER_REGISTRY.register()
class SMCATransformer(DetrTransformerBase):
    """SMCA-DETR single scale. Keys: ``input.input_proj``, ``query_embed``, ``encoder.layers.*``,
    ``decoder.layers.*``, ``decoder.norm`` (official names after the ``transformer.`` prefix, see
    ``smca_detr.checkpoint.smca``).

    Config: MODEL.SMCA_DETR.{HIDDEN_DIM, NHEADS, ENC_LAYERS, DEC_LAYERS, DIM_FEEDFORWARD, DROPOUT,
    ACTIVATION, PRE_NORM, NUM_QUERIES, POS_TEMPERATURE} and MODEL.SMCA_DETR.SMCA.{DYNAMIC_SCALE,
    HEAD_SHARED, SMOOTH, CENTER_MLP_LAYERS}. One feature level (IN_FEATURES), any stride: the decoder
    memory is one ``MemorySegment`` with divisor = stride.

    ``record_intermediates`` records ``SMCADecoder.decode``'s keys and ``src``, ``memory``, ``pos``,
    ``mask``, ``ref_centers``; the cross-attention then runs the explicit softmax to expose its weights.
    """

    def __init__(self, cfg, input_shapes):
        super().__init__(cfg)
        build_single_level(self, cfg, input_shapes, "SMCATransformer")
        self.stride = int(input_shapes[0].stride)
        self.decoder = SMCADecoder(cfg)
        reset_smca_parameters(self, skip=(self.input, self.query_embed))

    def forward(self, features, masks, image_sizes, heads=None) -> TransformerOutput:
        src, pos, mask, grid_hw = self.input(features[0], masks[0])
        key_padding_mask = padding_mask_or_none(mask)  # None: no padding on the CPU (no -inf fill, faster)
        memory = self.encoder(src, pos, key_padding_mask)
        h, w = shape_ints(grid_hw)
        record = None
        if self.record_intermediates:
            record = dict(src=src.transpose(1, 2).reshape(src.shape[0], -1, h, w), memory=memory, pos=pos, mask=mask)
        out = self.decoder.decode(self.query_embed.weight, memory, pos, key_padding_mask, image_sizes,
                                  [MemorySegment(h, w, divisor=self.stride)], record)
        if record is not None:  # layer 0's reference centre in feature pixels
            out.extras["ref_centers"] = (image_wh(image_sizes, memory.shape[0], memory)[:, None, :]
                                         * out.extras["ref_logits"].sigmoid() / self.stride)
        return out
