"""The DETR baseline transformer (Carion et al., ECCV 2020): encoder over one feature level,
decoder with learned object queries, post-norm or pre-norm."""
import torch
from torch import nn

from ...layers.dropout import Dropout
from ..blocks import FFNMixin, MultiheadAttention, clones
from ..registry import TRANSFORMER_REGISTRY
from .common import DetrTransformerBase, TransformerOutput, build_single_level, padding_mask_or_none, xavier_init

__all__ = ["DETRTransformer", "TransformerDecoderLayer", "TransformerDecoder"]


class TransformerDecoderLayer(FFNMixin, nn.Module):
    """DETR decoder layer: self-attention over queries, cross-attention to the memory, FFN; post-norm
    (official default) or pre-norm. The one residual path of the DETR-style decoders: a subclass
    changes only the cross-attention through the ``cross_attention`` hook (SMCA: its Gaussian prior
    and segmented softmax)."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 normalize_before=False):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.build_ffn(d_model, dim_feedforward, dropout, activation)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.dropout1, self.dropout2, self.dropout3 = (Dropout(dropout) for _ in range(3))
        self.normalize_before = normalize_before

    def cross_attention(self, query, key, value, key_padding_mask=None):
        """query ``[B,Q,d]`` (incl. query_pos), key ``memory + pos``, value ``memory`` -> ``[B,Q,d]``."""
        return self.multihead_attn(query, key, value, key_padding_mask=key_padding_mask)[0]

    def forward(self, tgt, memory, memory_pos, query_pos, **cross):
        """tgt/query_pos ``[B,Q,d]``, memory ``[B,S,d]``, ``memory_pos = memory + pos`` (the same for
        every layer: the decoder computes it once); ``cross``: keyword arguments of ``cross_attention``."""
        if self.normalize_before:
            x = self.norm1(tgt)
            q = x + query_pos
            tgt = tgt + self.dropout1(self.self_attn(q, q, x)[0])
            tgt = tgt + self.dropout2(self.cross_attention(self.norm2(tgt) + query_pos, memory_pos, memory, **cross))
            return tgt + self.dropout3(self.ffn(self.norm3(tgt)))
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, q, tgt)[0]))
        tgt = self.norm2(tgt + self.dropout2(self.cross_attention(tgt + query_pos, memory_pos, memory, **cross)))
        return self.norm3(tgt + self.dropout3(self.ffn(tgt)))


class TransformerDecoder(nn.Module):
    """Decoder stack; the shared final LayerNorm is applied to every layer's output."""

    def __init__(self, layer, num_layers, d_model):
        super().__init__()
        self.layers = clones(layer, num_layers)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt, memory, pos, query_pos, memory_key_padding_mask=None):
        hs = []
        memory_pos = memory + pos
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_pos, query_pos, key_padding_mask=memory_key_padding_mask)
            hs.append(self.norm(tgt))
        return torch.stack(hs)


@TRANSFORMER_REGISTRY.register()
class DETRTransformer(DetrTransformerBase):
    """Plain DETR. Keys: ``input.input_proj``, ``query_embed``, ``encoder.*``, ``decoder.*``."""

    def __init__(self, cfg, input_shapes):
        super().__init__(cfg)
        c = cfg.MODEL.SMCA_DETR
        build_single_level(self, cfg, input_shapes, "DETRTransformer")
        d = c.HIDDEN_DIM
        dec_layer = TransformerDecoderLayer(d, c.NHEADS, c.DIM_FEEDFORWARD, c.DROPOUT, c.ACTIVATION, c.PRE_NORM)
        self.decoder = TransformerDecoder(dec_layer, c.DEC_LAYERS, d)
        xavier_init(self, skip=(self.input, self.query_embed))

    def forward(self, features, masks, image_sizes, heads=None) -> TransformerOutput:
        src, pos, mask, _ = self.input(features[0], masks[0])
        mask = padding_mask_or_none(mask)
        memory = self.encoder(src, pos, mask)
        query_pos = self.query_embed.weight[None].expand(src.shape[0], -1, -1)
        tgt = torch.zeros_like(query_pos)
        hs = self.decoder(tgt, memory, pos, query_pos, mask)
        return TransformerOutput(hs=hs)
