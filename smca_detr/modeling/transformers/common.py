"""Pieces shared by the DETR-style (global attention) transformers: the encoder, the single-level
input projection with its position encoding and padding mask, flattening helpers.

Everything is batch first: sequences are ``[B, S, d]``.
"""
import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from ...layers.dropout import Dropout
from ..blocks import FFNMixin, MultiheadAttention, clones
from ..position_encoding import PositionEmbeddingSine

__all__ = ["DetrTransformerBase", "image_wh", "TransformerOutput", "TransformerEncoderLayer", "TransformerEncoder", "flatten_level",
           "SingleLevelInput", "build_single_level", "check_levels", "padding_mask_or_none", "level_projections",
           "embed_levels", "flatten_levels", "xavier_init"]


def padding_mask_or_none(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """``mask`` (True = padding), or None on the CPU when nothing is padded (e.g. one image): the mask
    then changes nothing and skipping it makes attention faster. On an accelerator the mask is always
    kept: finding out would read the mask back to the host, a synchronisation every step."""
    if mask.device.type != "cpu" or bool(mask.any()):
        return mask
    return None


@dataclass
class TransformerOutput:
    """What every registered transformer returns.

    hs: decoder outputs of every layer, ``[L,B,Q,d]`` (after the decoder norm where the method has one).
    references: reference of every layer in logit space, ``[L,B,Q,2|4]``, added to the first 2 or 4
        box-head outputs before the sigmoid (None for plain DETR).
    enc_outputs: two-stage encoder predictions ``{"pred_logits", "pred_boxes"}`` or None.
    extras: method-specific tensors for tests and visualisation (agreed keys: ``DetrTransformerBase``).
    """

    hs: torch.Tensor
    references: Optional[torch.Tensor] = None
    enc_outputs: Optional[Dict[str, torch.Tensor]] = None
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)


class DetrTransformerBase(nn.Module):
    """The contract of every ``TRANSFORMER_REGISTRY`` module, read by the meta-architecture and by
    ``smca_detr/utils/visualize.py``: ``__init__(cfg, input_shapes)`` (calling ``super().__init__(cfg)``),
    ``forward(features, masks, image_sizes, heads=None) -> TransformerOutput``, and

    num_head_sets: prediction-head sets to build (default ``DEC_LAYERS``; Deformable two-stage adds one).
    per_layer_heads: one head set per decoder layer instead of one shared set (default False).
    zero_init_box: the box head's last layer starts at zero (default False).
    init_heads(heads): variant-specific head init, called once after the heads are built (default none).
    record_intermediates: when True (default False; ``with t.recording():`` for a block) ``forward``
        adds its intermediates to ``extras``. Agreed keys, ``l`` = decoder layer, each where the
        method has it (more, method-specific keys are documented by each transformer):
        ``memory_shapes`` / ``memory_strides``: (h, w) and stride of each memory segment, in memory order;
        ``dec.{l}.cross_attn_weights [B,M,Q,S]``: cross-attention probabilities over the memory;
        ``dec.{l}.gaussian [B,G,Q,S]``: SMCA's log-Gaussian spatial prior (G = M, or 1 head-shared);
        ``dec.{l}.content_logits`` / ``dec.{l}.spatial_logits [B,M,Q,S]``: Conditional DETR's two
        cross-attention logit terms (padding mask added);
        ``dec.{l}.sampling_locations [B,Q,M,L,P,2]`` (in [0, 1] of each level),
        ``dec.{l}.sampling_weights [B,Q,M,L,P]``, ``dec.{l}.reference_points [B,Q,L,2|4]``:
        Deformable DETR's sampling (levels in ``memory_shapes`` order).
    """

    per_layer_heads = False
    zero_init_box = False
    record_intermediates = False

    def __init__(self, cfg):
        super().__init__()
        self.num_head_sets = cfg.MODEL.SMCA_DETR.DEC_LAYERS

    def init_heads(self, heads):
        pass

    @contextlib.contextmanager
    def recording(self):
        prev, self.record_intermediates = self.record_intermediates, True
        try:
            yield self
        finally:
            self.record_intermediates = prev


def flatten_level(x: torch.Tensor) -> torch.Tensor:
    """``[B,C,H,W]`` -> ``[B,H*W,C]`` (row-major, as the official code)."""
    return x.flatten(2).transpose(1, 2)


class TransformerEncoderLayer(FFNMixin, nn.Module):
    """DETR encoder layer: self-attention with positions added to queries and keys, then FFN;
    post-norm (official default) or pre-norm."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 normalize_before=False):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.build_ffn(d_model, dim_feedforward, dropout, activation)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.normalize_before = normalize_before

    def forward(self, src, pos, key_padding_mask: Optional[torch.Tensor] = None):
        if self.normalize_before:
            x = self.norm1(src)
            q = x + pos
            src = src + self.dropout1(self.self_attn(q, q, x, key_padding_mask=key_padding_mask)[0])
            return src + self.dropout2(self.ffn(self.norm2(src)))
        q = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, q, src, key_padding_mask=key_padding_mask)[0]))
        return self.norm2(src + self.dropout2(self.ffn(src)))


class TransformerEncoder(nn.Module):
    """Stack of encoder layers (DETR's, Deformable DETR's, the SMCA conv multi-scale one); a final
    LayerNorm only with pre-norm (official convention). ``forward(src, *args)`` passes ``args`` (DETR:
    pos, key_padding_mask) to every layer."""

    def __init__(self, layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = clones(layer, num_layers)
        self.norm = norm

    def forward(self, src, *args):
        for layer in self.layers:
            src = layer(src, *args)
        return self.norm(src) if self.norm is not None else src


class SingleLevelInput(nn.Module):
    """The single-level input of DETR / SMCA / Conditional DETR: a 1x1 ``input_proj`` conv to d,
    the sine position encoding of the padding mask, everything flattened batch first."""

    def __init__(self, in_channels: int, d_model: int, temperature: float = 10000):
        super().__init__()
        self.input_proj = nn.Conv2d(in_channels, d_model, kernel_size=1)
        self.position_embedding = PositionEmbeddingSine(d_model // 2, temperature=temperature)

    def forward(self, feature: torch.Tensor, mask: torch.Tensor):
        src = self.input_proj(feature)
        pos = self.position_embedding(mask).to(src.dtype)
        return flatten_level(src), flatten_level(pos), mask.flatten(1), src.shape[-2:]


def build_single_level(module: nn.Module, cfg, input_shapes, name: str):
    """The common front of DETR / SMCA / Conditional DETR on ``module``: ``d_model``, ``input``
    (``SingleLevelInput``), ``query_embed`` and the DETR ``encoder`` (final LayerNorm with pre-norm),
    built in this order (checkpoint keys and seeded initialisation depend on it)."""
    c = cfg.MODEL.SMCA_DETR
    check_levels(name, input_shapes, 1)
    module.d_model = d = c.HIDDEN_DIM
    module.input = SingleLevelInput(input_shapes[0].channels, d, c.POS_TEMPERATURE)
    module.query_embed = nn.Embedding(c.NUM_QUERIES, d)
    layer = TransformerEncoderLayer(d, c.NHEADS, c.DIM_FEEDFORWARD, c.DROPOUT, c.ACTIVATION, c.PRE_NORM)
    module.encoder = TransformerEncoder(layer, c.ENC_LAYERS, nn.LayerNorm(d) if c.PRE_NORM else None)


def level_projections(input_shapes, d: int, num_levels: int, group_norm: bool = False):
    """The input projections of the multi-level transformers (SMCA multi-scale, conv multi-scale,
    Deformable): (a 1x1 conv to ``d`` per backbone level, the 3x3 stride-2 convs of the
    ``num_levels - len(input_shapes)`` extra levels, the first on the last *unprojected* backbone
    level, the next ones chained); with ``group_norm`` each conv is followed by GroupNorm(32, d)."""
    def proj(conv):
        return nn.Sequential(conv, nn.GroupNorm(32, d)) if group_norm else conv

    backbone = [proj(nn.Conv2d(s.channels, d, kernel_size=1)) for s in input_shapes]
    extra, in_ch = [], input_shapes[-1].channels
    for _ in range(num_levels - len(input_shapes)):
        extra.append(proj(nn.Conv2d(in_ch, d, kernel_size=3, stride=2, padding=1)))
        in_ch = d
    return backbone, extra


def embed_levels(projs, features, masks, position_embedding, extra_mask):
    """Run ``level_projections`` (``projs``: backbone projections then extra ones): per level the
    projected ``src [B,d,H,W]``, its mask ``[B,H,W]`` (``extra_mask(size)`` for an extra level) and
    sine encoding ``[B,d,H,W]`` (no level embedding)."""
    n = len(features)
    srcs, masks, x = [p(f) for p, f in zip(projs, features)], list(masks), features[-1]
    for proj in projs[n:]:
        x = proj(x)
        srcs.append(x)
        masks.append(extra_mask(x.shape[-2:]))
    return srcs, masks, [position_embedding(m).to(s.dtype) for s, m in zip(srcs, masks)]


def flatten_levels(srcs, masks, pos, level_embed: Optional[torch.Tensor] = None):
    """Levels ``[B,C,H_l,W_l]`` concatenated row-major: ``src [B,S,C]``, ``mask [B,S]``, ``pos [B,S,C]``
    (plus ``level_embed[l]`` on level ``l`` when given)."""
    src = torch.cat([flatten_level(x) for x in srcs], 1)
    embed = [None] * len(pos) if level_embed is None else level_embed.to(src.dtype)
    pos = torch.cat([flatten_level(p) if e is None else flatten_level(p) + e for p, e in zip(pos, embed)], 1)
    return src, torch.cat([m.flatten(1) for m in masks], 1), pos


def xavier_init(module: nn.Module, skip=()):
    """The official DETR-family init: Xavier-uniform on every matrix of ``module``, in parameter order,
    except those of the modules in ``skip`` (input projections and queries keep their own init)."""
    skip_ids = {id(p) for m in skip for p in m.parameters()}
    for p in module.parameters():
        if p.dim() > 1 and id(p) not in skip_ids:
            nn.init.xavier_uniform_(p)


def check_levels(name: str, features: List[torch.Tensor], expected: int):
    if len(features) != expected:
        raise ValueError(
            f"{name} takes {expected} feature level(s) but MODEL.SMCA_DETR.IN_FEATURES gives "
            f"{len(features)}")


def image_wh(image_sizes, batch: int, like: torch.Tensor) -> torch.Tensor:
    """Unpadded ``(w, h)`` per image ``[B,2]`` from detectron2's ``(h, w)`` sizes (a list of pairs, or
    a ``[B,2]`` tensor: the ONNX export passes its traced sizes so that they stay dynamic), on
    ``like``'s device in float32 (float64 for float64 activations), never in the activation dtype:
    in bfloat16 a width of 1333 would become 1336, in float16 sizes above 2048 are rounded."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if isinstance(image_sizes, torch.Tensor):
        hw = image_sizes.to(dtype=dtype, device=like.device)
    else:
        hw = torch.as_tensor([[float(h), float(w)] for h, w in image_sizes], dtype=dtype).to(like.device,
                                                                                            non_blocking=True)
    if hw.dim() != 2 or hw.shape[1] != 2 or (not torch.jit.is_tracing() and hw.shape[0] != batch):
        raise ValueError(f"need one (h, w) image size per image, got {len(image_sizes)} for a batch of {batch}")
    return hw.flip(-1)
