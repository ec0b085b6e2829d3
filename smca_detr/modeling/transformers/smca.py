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
from typing import Dict, List, Optional

import torch
from torch import nn

from ...layers.dropout import Dropout
from ...layers.tracing import shape_ints
from ..layers import MLP, FFNMixin, MultiheadAttention
from ..registry import TRANSFORMER_REGISTRY
from .common import (SingleLevelInput, TransformerEncoder, TransformerEncoderLayer, TransformerOutput,
                     check_levels, image_wh, padding_mask_or_none)

__all__ = ["SCALE_CHANNELS", "scale_channels", "smca_gaussian_bias", "mask_padded_keys",
           "image_wh", "prior_in_float32", "SMCADecoderLayer", "SMCADecoder", "SMCATransformer"]

# Raw scale values k per Gaussian that ``point3`` predicts for each ``dynamic_scale`` type.
SCALE_CHANNELS = {"type1": 0, "type2": 1, "type3": 2, "type4": 3}


def scale_channels(dynamic_scale: str) -> int:
    """k, the number of raw scales per Gaussian of ``dynamic_scale`` (type1 0, type2 1, type3 2,
    type4 3); raises a ValueError naming the config key for an unknown type."""
    if dynamic_scale not in SCALE_CHANNELS:
        raise ValueError(f"MODEL.SMCA_DETR.SMCA.DYNAMIC_SCALE must be one of {sorted(SCALE_CHANNELS)}, "
                         f"got {dynamic_scale!r}")
    return SCALE_CHANNELS[dynamic_scale]


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


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
            return method(self, _at_least_float32(out), None if ref is None else _at_least_float32(ref),
                          _at_least_float32(image_wh), *args, **kwargs)
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


class SMCADecoderLayer(FFNMixin, nn.Module):
    """DETR decoder layer with SMCA's Gaussian-modulated cross-attention.

    Keys (official names): ``self_attn``, ``multihead_attn``, ``linear1``, ``linear2``,
    ``norm1..norm4``, ``point1.layers.{i}`` (reference MLP, layer 0 only), ``point2`` (centre offsets,
    2·G outputs), ``point3`` (raw scales, k·G outputs; absent for type1).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False, *, dynamic_scale: str = "type3",
                 smooth: float = 8.0, head_shared: bool = False, reference_head: bool = False,
                 center_mlp_layers: int = 3):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.build_ffn(d_model, dim_feedforward, dropout, activation)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.LayerNorm(d_model) for _ in range(4))
        self.dropout1, self.dropout2, self.dropout3 = (Dropout(dropout) for _ in range(3))
        self.normalize_before = normalize_before
        self.dynamic_scale = dynamic_scale
        self.smooth = float(smooth)
        self.num_gaussians = 1 if head_shared else nhead
        self.k = scale_channels(dynamic_scale)
        if reference_head:
            if center_mlp_layers < 1:
                raise ValueError(f"MODEL.SMCA_DETR.SMCA.CENTER_MLP_LAYERS must be >= 1, got {center_mlp_layers}")
            self.point1 = MLP(d_model, d_model, 2, center_mlp_layers)
        else:
            self.point1 = None
        self.point2 = nn.Linear(d_model, 2 * self.num_gaussians)
        self.point3 = nn.Linear(d_model, self.k * self.num_gaussians) if self.k else None

    @prior_in_float32
    def spatial_prior(self, out: torch.Tensor, ref_centers: Optional[torch.Tensor], image_wh: torch.Tensor,
                      stride: int, grid_hw, record: Optional[Dict] = None):
        """SMCA heads of this layer from ``out = norm4(tgt + query_pos)``. ``image_wh [B,2]``: unpadded
        (w, h); ``stride``: feature stride; ``ref_centers [B,Q,2]``: layer 0's centre (None in layer 0).
        Returns (bias ``[B,G,Q,HW]``, ref_centers ``[B,Q,2]``, ref_logit ``[B,Q,2]`` or None); float32
        under autocast (``prior_in_float32``)."""
        b, q, _ = out.shape
        g = self.num_gaussians
        offsets = self.point2(out)
        ref_logit = None
        if self.point1 is not None:
            ref_logit = self.point1(out)
            # official order: (w, h) * sigmoid / stride
            ref_centers = image_wh[:, None, :] * ref_logit.sigmoid() / stride
        elif ref_centers is None:
            raise RuntimeError("SMCA decoder: layer 0 must own the reference head (point1)")
        centers = ref_centers[:, :, None, :] + offsets.view(b, q, g, 2)
        scales = self.point3(out).view(b, q, g, self.k) if self.point3 is not None else None
        bias = smca_gaussian_bias(centers, scales, grid_hw[0], grid_hw[1], self.dynamic_scale, self.smooth)
        if record is not None:
            record["offsets"] = offsets
            if scales is not None:
                record["scale_raw"] = scales.flatten(2)
            record["gaussian"] = bias
            record["centers"] = centers
        return bias, ref_centers, ref_logit

    def forward(self, tgt, memory, pos, query_pos, memory_key_padding_mask=None, ref_centers=None, *,
                image_wh, stride, grid_hw, record: Optional[Dict] = None, memory_pos=None):
        """tgt/query_pos ``[B,Q,d]``, memory/pos ``[B,S,d]`` (``memory_pos = memory + pos`` if the
        caller has it). Returns (tgt, ref_centers, ref_logit)."""
        out = self.norm4(tgt + query_pos)
        bias, ref_centers, ref_logit = self.spatial_prior(out, ref_centers, image_wh, stride, grid_hw, record)
        # the bias is fresh unless recorded: mask it in place
        attn_mask = mask_padded_keys(bias, memory_key_padding_mask, inplace=record is None)
        need_weights = record is not None
        key = memory + pos if memory_pos is None else memory_pos
        if self.normalize_before:
            x = self.norm1(tgt)
            qk = x + query_pos
            tgt = tgt + self.dropout1(self.self_attn(qk, qk, x)[0])
            x = self.norm2(tgt)
            ca, w = self.multihead_attn(x + query_pos, key, memory, attn_bias=attn_mask, need_weights=need_weights)
            tgt = tgt + self.dropout2(ca)
            tgt = tgt + self.dropout3(self.ffn(self.norm3(tgt)))
        else:
            qk = tgt + query_pos
            tgt = self.norm1(tgt + self.dropout1(self.self_attn(qk, qk, tgt)[0]))
            ca, w = self.multihead_attn(tgt + query_pos, key, memory, attn_bias=attn_mask, need_weights=need_weights)
            tgt = self.norm2(tgt + self.dropout2(ca))
            tgt = self.norm3(tgt + self.dropout3(self.ffn(tgt)))
        if record is not None:
            record["cross_attn_out"] = ca
            record["cross_attn_weights"] = w
            record["out"] = tgt
        return tgt, ref_centers, ref_logit


class SMCADecoder(nn.Module):
    """SMCA decoder: layer 0 owns the reference head; the final LayerNorm is applied to every layer
    output. Keys ``layers.{i}.*``, ``norm``."""

    def __init__(self, layers: List[SMCADecoderLayer], d_model: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt, memory, pos, query_pos, memory_key_padding_mask, *, image_wh, stride, grid_hw,
                records: Optional[List[Dict]] = None):
        """Returns hs ``[L,B,Q,d]`` and layer 0's reference logit ``[B,Q,2]``."""
        hs, ref_centers, ref_logit = [], None, None
        memory_pos = memory + pos  # the cross-attention keys' input, the same for every layer
        for i, layer in enumerate(self.layers):
            rec = records[i] if records is not None else None
            tgt, ref_centers, logit = layer(tgt, memory, pos, query_pos, memory_key_padding_mask,
                                            ref_centers, image_wh=image_wh, stride=stride, grid_hw=grid_hw,
                                            record=rec, memory_pos=memory_pos)
            if logit is not None:
                ref_logit = logit
            hs.append(self.norm(tgt))
        return torch.stack(hs), ref_logit


@TRANSFORMER_REGISTRY.register()
class SMCATransformer(nn.Module):
    """SMCA-DETR single scale. Keys: ``input.input_proj``, ``query_embed``, ``encoder.layers.*``,
    ``decoder.layers.*``, ``decoder.norm`` (official names after the ``transformer.`` prefix, see
    ``smca_detr.checkpoint.smca``).

    Config: MODEL.SMCA_DETR.{HIDDEN_DIM, NHEADS, ENC_LAYERS, DEC_LAYERS, DIM_FEEDFORWARD, DROPOUT,
    ACTIVATION, PRE_NORM, NUM_QUERIES, POS_TEMPERATURE} and MODEL.SMCA_DETR.SMCA.{DYNAMIC_SCALE,
    HEAD_SHARED, SMOOTH, CENTER_MLP_LAYERS}. One feature level (IN_FEATURES), any stride.

    Set ``record_intermediates = True`` to get per-layer internals in ``TransformerOutput.extras``
    (``hs``, ``src``, ``memory``, ``pos``, ``mask``, ``ref_logits``, ``ref_centers``, ``dec.{l}.offsets``,
    ``dec.{l}.scale_raw``, ``dec.{l}.gaussian`` [B,G,Q,HW], ``dec.{l}.centers``, ``dec.{l}.out``,
    ``dec.{l}.cross_attn_out``, ``dec.{l}.cross_attn_weights`` [B,M,Q,HW]); the cross-attention then
    runs through the explicit-softmax path to expose its weights. ``extras["reference_points"]``
    (sigmoid of the reference logit, ``[B,Q,2]``, normalised (x, y)) is always returned.
    """

    def __init__(self, cfg, input_shapes):
        super().__init__()
        c = cfg.MODEL.SMCA_DETR
        s = c.SMCA
        check_levels("SMCATransformer", input_shapes, 1)
        scale_channels(s.DYNAMIC_SCALE)
        if s.SMOOTH <= 0:
            raise ValueError(f"MODEL.SMCA_DETR.SMCA.SMOOTH (β) must be > 0, got {s.SMOOTH}")
        if c.DEC_LAYERS < 1:
            raise ValueError(f"MODEL.SMCA_DETR.DEC_LAYERS must be >= 1 for SMCA, got {c.DEC_LAYERS}")
        d = c.HIDDEN_DIM
        self.d_model = d
        self.stride = int(input_shapes[0].stride)
        self.dynamic_scale = s.DYNAMIC_SCALE
        self.head_shared = bool(s.HEAD_SHARED)
        self.input = SingleLevelInput(input_shapes[0].channels, d, c.POS_TEMPERATURE)
        self.query_embed = nn.Embedding(c.NUM_QUERIES, d)
        enc_layer = TransformerEncoderLayer(d, c.NHEADS, c.DIM_FEEDFORWARD, c.DROPOUT, c.ACTIVATION, c.PRE_NORM)
        self.encoder = TransformerEncoder(enc_layer, c.ENC_LAYERS, nn.LayerNorm(d) if c.PRE_NORM else None)
        layers = [
            SMCADecoderLayer(d, c.NHEADS, c.DIM_FEEDFORWARD, c.DROPOUT, c.ACTIVATION, c.PRE_NORM,
                             dynamic_scale=s.DYNAMIC_SCALE, smooth=s.SMOOTH, head_shared=self.head_shared,
                             reference_head=(i == 0), center_mlp_layers=s.CENTER_MLP_LAYERS)
            for i in range(c.DEC_LAYERS)
        ]
        self.decoder = SMCADecoder(layers, d)
        self.record_intermediates = False
        self._reset_parameters()

    def _reset_parameters(self):
        # Official: Xavier-uniform on every matrix of the encoder/decoder (incl. point1/2/3), then
        # point3 starts at weight 0 / bias 1 (all scales 1). input_proj and queries keep their init.
        for p in list(self.encoder.parameters()) + list(self.decoder.parameters()):
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for layer in self.decoder.layers:
            if layer.point3 is not None:
                nn.init.zeros_(layer.point3.weight)
                nn.init.ones_(layer.point3.bias)

    def forward(self, features, masks, image_sizes, heads=None) -> TransformerOutput:
        src, pos, mask, grid_hw = self.input(features[0], masks[0])
        key_padding_mask = padding_mask_or_none(mask)  # None: no padding on the CPU (no -inf fill, faster)
        memory = self.encoder(src, pos, key_padding_mask)
        b = src.shape[0]
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        tgt = torch.zeros_like(query_pos)
        wh = image_wh(image_sizes, b, src)
        records = [{} for _ in self.decoder.layers] if self.record_intermediates else None
        hs, ref_logit = self.decoder(tgt, memory, pos, query_pos, key_padding_mask, image_wh=wh, stride=self.stride,
                                     grid_hw=shape_ints(grid_hw), records=records)
        extras = {"reference_points": ref_logit.sigmoid()}
        if records is not None:
            extras.update(hs=hs, src=src.transpose(1, 2).reshape(b, -1, *grid_hw), memory=memory, pos=pos, mask=mask,
                          ref_logits=ref_logit, ref_centers=wh[:, None, :] * ref_logit.sigmoid() / self.stride)
            for i, rec in enumerate(records):
                extras.update({f"dec.{i}.{k}": v for k, v in rec.items() if v is not None})
        references = ref_logit[None].expand(hs.shape[0], -1, -1, -1)
        return TransformerOutput(hs=hs, references=references, extras=extras)
