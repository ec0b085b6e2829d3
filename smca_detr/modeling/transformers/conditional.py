"""Conditional DETR (Meng et al., "Conditional DETR for Fast Training Convergence", ICCV 2021).

The encoder is the standard DETR encoder over one feature level (``common.py``). The decoder
differs from DETR's in three ways:

* every attention has separate linear projections for the content and the positional part of its
  queries and keys (``sa_qcontent_proj``/``sa_qpos_proj``/..., ``ca_qcontent_proj``/...), and the
  attention modules themselves only hold the output projection (``self_attn.out_proj``,
  ``cross_attn.out_proj``);
* the cross-attention query/key of each head is the concatenation of a content part and a spatial
  part, ``q_h = [c_q,h ; p_q,h]``, ``k_h = [c_k,h ; p_k,h]`` (width ``2d/M`` per head, values keep
  ``d/M``), so the attention logit is ``c_q·c_k + p_q·p_k`` with scale ``1/sqrt(2d/M)``. The spatial
  query is ``p_q = λ_q ⊙ PE(s)``: the sine embedding of the reference point ``s`` (``d/2`` frequencies
  per coordinate, y block then x block) times ``λ_q = T(f)``, an MLP of the previous layer's raw
  output (identity in layer 0);
* the reference point ``s = sigmoid(ref_point_head(o_q))`` is predicted once from the object query
  and the box head adds ``logit(s)`` to its (cx, cy) outputs in every layer.

Only layer 0 adds the object query / memory position to the content query / key
(``ca_qpos_proj``; later layers have no such key, as the official model). The decoder LayerNorm is
applied to every layer output. The official decoder is post-norm only (pre-norm raises there too).

Attention runs through the shared kernel ``smca_detr.modeling.blocks.attention``: the self-attention
with head width ``d/M``, the cross-attention with query/key head width ``2d/M`` and value head width
``d/M`` (both SDPA and the explicit softmax take different widths), so no Python loop over heads.
"""
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...layers.dropout import Dropout
from ...layers.tracing import shape_ints
from ..blocks import MLP, FFNMixin, attention, inverse_sigmoid, make_attn_mask
from ..position_encoding import sine_embed
from ..registry import TRANSFORMER_REGISTRY
from .common import DetrTransformerBase, TransformerOutput, build_single_level, padding_mask_or_none, xavier_init

__all__ = ["ConditionalTransformer", "ConditionalDecoder", "ConditionalDecoderLayer", "HeadAttention"]


class HeadAttention(nn.Module):
    """Attention over already projected, head-split inputs; only holds ``out_proj``.

    ``q [B,M,Lq,Eqk]``, ``k [B,M,Lk,Eqk]``, ``v [B,M,Lk,Ev]`` -> ``[B,Lq,M*Ev]`` after ``out_proj``,
    through the shared kernel :func:`smca_detr.modeling.blocks.attention` (logit scale ``1/sqrt(Eqk)``,
    the official ``head_dim ** -0.5`` with ``head_dim`` the query/key width per head).
    """

    def __init__(self, value_dim: int, dropout: float = 0.0):
        super().__init__()
        self.out_proj = nn.Linear(value_dim, value_dim)
        nn.init.zeros_(self.out_proj.bias)
        self.dropout = dropout

    def forward(self, q, k, v, attn_mask: Optional[torch.Tensor] = None, record: Optional[Dict] = None):
        out, w = attention(q, k, v, attn_mask, self.dropout if self.training else 0.0, need_weights=record is not None)
        if record is not None:
            record["cross_attn_weights"] = w
        return self.out_proj(out.transpose(1, 2).flatten(2))


def _heads(x: torch.Tensor, nhead: int) -> torch.Tensor:
    """``[B,L,E]`` -> ``[B,M,L,E/M]`` (a view)."""
    return x.unflatten(-1, (nhead, -1)).transpose(1, 2)


def _fused_linear(x: torch.Tensor, linears) -> torch.Tensor:
    """``cat([lin(x) for lin in linears], -1)`` with one matrix product (same parameters)."""
    if len(linears) == 1:
        return linears[0](x)
    weight = torch.cat([lin.weight for lin in linears])
    bias = torch.cat([lin.bias for lin in linears])
    return F.linear(x, weight, bias)


class ConditionalDecoderLayer(FFNMixin, nn.Module):
    """One Conditional DETR decoder layer (post-norm). ``is_first``: has ``ca_qpos_proj``.

    The projections of inputs that several layers share (object queries, memory, memory positions)
    are computed for all layers at once by ``ConditionalDecoder``; ``forward`` receives them.
    """

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 is_first=False):
        super().__init__()
        self.nhead = nhead
        # self-attention: content / position projections of queries and keys, value projection
        self.sa_qcontent_proj = nn.Linear(d_model, d_model)
        self.sa_qpos_proj = nn.Linear(d_model, d_model)
        self.sa_kcontent_proj = nn.Linear(d_model, d_model)
        self.sa_kpos_proj = nn.Linear(d_model, d_model)
        self.sa_v_proj = nn.Linear(d_model, d_model)
        self.self_attn = HeadAttention(d_model, dropout)
        # cross-attention
        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_proj = nn.Linear(d_model, d_model) if is_first else None
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kpos_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = nn.Linear(d_model, d_model)
        self.cross_attn = HeadAttention(d_model, dropout)
        self.build_ffn(d_model, dim_feedforward, dropout, activation)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.dropout1, self.dropout2, self.dropout3 = (Dropout(dropout) for _ in range(3))

    def query_pos_linears(self):
        """Projections of the object queries (batch independent)."""
        out = [self.sa_qpos_proj, self.sa_kpos_proj]
        return out + ([self.ca_qpos_proj] if self.ca_qpos_proj is not None else [])

    def forward(self, tgt, query_pos_proj, k_content, v, k_pos, query_sine_embed, attn_mask=None,
                record: Optional[Dict] = None):
        """
        Args:
            tgt: ``[B,Q,d]`` decoder state.
            query_pos_proj: ``[1|B,Q,2d|3d]``: ``query_pos_linears()`` applied to the object queries.
            k_content, v, k_pos: ``[B,S,d]``: ``ca_kcontent_proj(memory)``, ``ca_v_proj(memory)``,
                ``ca_kpos_proj(pos)``.
            query_sine_embed: ``[1|B,Q,d]`` spatial embedding PE(s) ⊙ T(f).
            attn_mask: additive ``[B,1,1,S]`` memory padding mask or None.
            record: a dict that receives ``cross_attn_weights``, ``content_logits``, ``spatial_logits``.
        """
        m, d = self.nhead, tgt.shape[-1]
        # ---- self-attention over the queries
        q_pos, k_pos_sa = query_pos_proj[..., :d], query_pos_proj[..., d:2 * d]
        q, k, v_sa = _fused_linear(tgt, [self.sa_qcontent_proj, self.sa_kcontent_proj, self.sa_v_proj]).chunk(3, -1)
        out = self.self_attn(_heads(q + q_pos, m), _heads(k + k_pos_sa, m), _heads(v_sa, m))
        tgt = self.norm1(tgt + self.dropout1(out))

        # ---- conditional cross-attention: per head [content ; spatial] for queries and keys
        q_content = self.ca_qcontent_proj(tgt)
        if self.ca_qpos_proj is not None:  # layer 0: DETR-style positional content
            q_content = q_content + query_pos_proj[..., 2 * d:]
            k_content = k_content + k_pos
        q_spatial = self.ca_qpos_sine_proj(query_sine_embed).expand_as(q_content)
        q = torch.cat((_heads(q_content, m), _heads(q_spatial, m)), dim=-1)
        k = torch.cat((_heads(k_content, m), _heads(k_pos, m)), dim=-1)
        out = self.cross_attn(q, k, _heads(v, m), attn_mask, record)
        if record is not None:  # the two logit terms of every head, padding masked
            e, mask = q.shape[-1] // 2, 0.0 if attn_mask is None else attn_mask
            for name, part in (("content_logits", slice(None, e)), ("spatial_logits", slice(e, None))):
                record[name] = q[..., part] @ k[..., part].transpose(-1, -2) / math.sqrt(2 * e) + mask
        tgt = self.norm2(tgt + self.dropout2(out))

        # ---- FFN
        return self.norm3(tgt + self.dropout3(self.ffn(tgt)))


class ConditionalDecoder(nn.Module):
    """Decoder stack with the reference-point head, the spatial-query transformation T and the
    shared final LayerNorm (applied to every layer output)."""

    def __init__(self, d_model, nhead, num_layers, dim_feedforward=2048, dropout=0.1,
                 activation="relu", temperature=10000):
        super().__init__()
        self.d_model = d_model
        self.temperature = temperature
        self.layers = nn.ModuleList(
            ConditionalDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation, is_first=i == 0)
            for i in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        # T: λ_q = T(f), applied from the second layer on. Not built for a one-layer decoder: a
        # parameter without a gradient stops DDP ("Expected to have finished reduction...");
        # the checkpoint converter drops the official (unused) weights of such a model.
        self.query_scale = MLP(d_model, d_model, d_model, 2) if num_layers > 1 else None
        self.ref_point_head = MLP(d_model, d_model, 2, 2)      # s = sigmoid(MLP(o_q))

    def forward(self, tgt, memory, pos, query_pos, attn_mask=None, record: bool = False):
        """tgt ``[B,Q,d]``, memory / pos ``[B,S,d]``, query_pos ``[1|B,Q,d]`` -> hs ``[L,B,Q,d]``
        (after the decoder norm), reference points ``[1|B,Q,2]`` (x, y) in [0, 1], and with
        ``record`` a dict of per-layer spatial embeddings and raw outputs ``[L,B,Q,d]`` and every layer's
        ``dec.{l}.*`` of ``ConditionalDecoderLayer.forward``."""
        layers = self.layers
        d = self.d_model
        reference = self.ref_point_head(query_pos).sigmoid()
        # sine embedding of (x, y) with d/2 frequencies per coordinate, y block first
        pos_sine = sine_embed(reference.flip(-1), d // 2, self.temperature)

        # Inputs shared by the layers, projected for all layers with one matrix product each.
        qp_linears = [layer.query_pos_linears() for layer in layers]
        qp_all = _fused_linear(query_pos, [lin for group in qp_linears for lin in group])
        qp = qp_all.split([d * len(g) for g in qp_linears], dim=-1)
        kv = _fused_linear(memory, [lin for layer in layers for lin in (layer.ca_kcontent_proj, layer.ca_v_proj)])
        kv = kv.chunk(2 * len(layers), dim=-1)
        k_pos = _fused_linear(pos, [layer.ca_kpos_proj for layer in layers]).chunk(len(layers), dim=-1)

        output = tgt
        hs, sine_embeds, raw, recorded = [], [], [], {}
        for i, layer in enumerate(layers):
            query_sine_embed = pos_sine if i == 0 else pos_sine * self.query_scale(output)
            rec = {} if record else None
            output = layer(output, qp[i], kv[2 * i], kv[2 * i + 1], k_pos[i], query_sine_embed, attn_mask, rec)
            hs.append(self.norm(output))
            if record:
                sine_embeds.append(query_sine_embed.expand_as(output))
                raw.append(output)
                recorded.update({f"dec.{i}.{k}": v for k, v in rec.items()})
        if record:
            recorded.update(query_sine_embed=torch.stack(sine_embeds), dec_out_raw=torch.stack(raw))
        return torch.stack(hs), reference, recorded


@TRANSFORMER_REGISTRY.register()
class ConditionalTransformer(DetrTransformerBase):
    """Conditional DETR transformer. Keys: ``input.input_proj``, ``query_embed``, ``encoder.*``
    (DETR encoder), ``decoder.*`` (official Conditional DETR names)."""

    # heads: focal prior on the class bias, last box layer zero-initialised (official init)
    zero_init_box = True

    def __init__(self, cfg, input_shapes):
        super().__init__(cfg)
        c = cfg.MODEL.SMCA_DETR
        if c.PRE_NORM:
            raise ValueError("ConditionalTransformer: MODEL.SMCA_DETR.PRE_NORM=True is not supported "
                             "(the official Conditional DETR decoder is post-norm only)")
        if c.DEC_LAYERS < 1:
            raise ValueError(f"MODEL.SMCA_DETR.DEC_LAYERS must be >= 1, got {c.DEC_LAYERS}")
        if c.HIDDEN_DIM % 2 != 0:
            raise ValueError(f"MODEL.SMCA_DETR.HIDDEN_DIM must be even, got {c.HIDDEN_DIM}")
        d = c.HIDDEN_DIM
        self.stride = int(input_shapes[0].stride)
        build_single_level(self, cfg, input_shapes, "ConditionalTransformer")
        self.decoder = ConditionalDecoder(d, c.NHEADS, c.DEC_LAYERS, c.DIM_FEEDFORWARD, c.DROPOUT,
                                          c.ACTIVATION, c.POS_TEMPERATURE)
        xavier_init(self, skip=(self.input, self.query_embed))  # incl. query_scale and ref_point_head

    def forward(self, features, masks, image_sizes=None, heads=None) -> TransformerOutput:
        src, pos, mask, grid_hw = self.input(features[0], masks[0])
        key_padding_mask = padding_mask_or_none(mask)
        memory = self.encoder(src, pos, key_padding_mask)
        attn_mask = make_attn_mask(key_padding_mask, None, memory.dtype)
        query_pos = self.query_embed.weight[None].to(memory.dtype)
        tgt = memory.new_zeros(memory.shape[0], query_pos.shape[1], self.d_model)
        hs, reference, recorded = self.decoder(tgt, memory, pos, query_pos, attn_mask,
                                               record=self.record_intermediates)
        reference = reference.expand(memory.shape[0], -1, -1)
        references = inverse_sigmoid(reference)[None].expand(hs.shape[0], -1, -1, -1)
        extras = {
            "memory": memory,                     # [B,HW,d] encoder output
            "pos": pos,                           # [B,HW,d] sine encoding of the feature map
            "mask": mask,                         # [B,HW] True = padding
            "reference_points": reference,        # [B,Q,2] sigmoid (x, y)
            # with record_intermediates: "query_sine_embed" [L,B,Q,d] (spatial embedding fed to each
            # layer, after the T(f) product), "dec_out_raw" [L,B,Q,d] (before the decoder norm), dec.{l}.*
            **recorded,
        }
        if self.record_intermediates:
            extras.update(memory_shapes=[shape_ints(grid_hw)], memory_strides=[self.stride])
        return TransformerOutput(hs=hs, references=references, extras=extras)
