"""Small building blocks shared by every variant: MLP heads, attention, FFN, inverse sigmoid."""
import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.dropout import Dropout, dropout

__all__ = ["MLP", "MultiheadAttention", "attention", "use_explicit_softmax", "segment_softmax", "FFNMixin", "make_attn_mask", "finite_cast", "inverse_sigmoid",
           "get_activation", "clones", "at_least_float32", "autocast_off"]


def clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


def get_activation(name: str):
    acts = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}
    if name not in acts:
        raise ValueError(f"MODEL.SMCA_DETR.ACTIVATION must be one of {sorted(acts)}, got {name!r}")
    return acts[name]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x) with x clamped to [eps, 1 - eps] (official Conditional/Deformable convention)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between (DETR's box head). Keys ``layers.{i}``."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.num_layers = num_layers
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x


class MultiheadAttention(nn.Module):
    """Multi-head attention, batch first, through ``F.scaled_dot_product_attention``.

    Parameters have ``nn.MultiheadAttention``'s names (``in_proj_weight``, ``in_proj_bias``,
    ``out_proj``), so official DETR-family checkpoints load unchanged. ``attn_bias`` is an additive
    logit bias ``[B, M, Lq, Lk]`` (or broadcastable), e.g. SMCA's log-Gaussian; padded keys get
    ``-inf`` before it is added.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"MODEL.SMCA_DETR.NHEADS={num_heads} must divide MODEL.SMCA_DETR.HIDDEN_DIM={embed_dim}"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, -1).transpose(1, 2)

    def project(self, query, key, value):
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        if query is key and key is value:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        elif query is key:
            q, k = F.linear(query, self.in_proj_weight[: 2 * self.embed_dim],
                            self.in_proj_bias[: 2 * self.embed_dim]).chunk(2, dim=-1)
            v = F.linear(value, w_v, b_v)
        else:
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        return self._split(q), self._split(k), self._split(v)

    def forward(self, query, key, value, key_padding_mask: Optional[torch.Tensor] = None,
                attn_bias: Optional[torch.Tensor] = None, need_weights: bool = False,
                segments: Optional[Sequence[int]] = None, segment_weights: Optional[torch.Tensor] = None):
        """query ``[B,Lq,E]``, key/value ``[B,Lk,E]``, key_padding_mask ``[B,Lk]`` (True = pad);
        ``segments`` / ``segment_weights ``[B,Lq,P]``: see :func:`attention`. Returns (output
        ``[B,Lq,E]``, probabilities ``[B,M,Lq,Lk]`` or None)."""
        q, k, v = self.project(query, key, value)
        mask = make_attn_mask(key_padding_mask, attn_bias, q.dtype)
        out, weights = attention(q, k, v, mask, self.dropout if self.training else 0.0, need_weights=need_weights,
                                 segments=segments,
                                 segment_weights=None if segment_weights is None else segment_weights[:, None])
        return self.out_proj(out.transpose(1, 2).flatten(2)), weights


def use_explicit_softmax(q: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], dropout_p: float,
                         need_weights: bool, segmented: bool) -> bool:
    """The one policy of :func:`attention`: compute ``softmax(q k^T / sqrt(E) + mask) v`` explicitly
    instead of through ``F.scaled_dot_product_attention`` (same maths; tests compare both):
      * ``need_weights`` or a segmented softmax: SDPA can give neither;
      * on the CPU only:
        - dropout: PyTorch's CPU kernel has no dropout and its math fallback draws the mask with the
          slow sequential generator; the explicit path uses the fast CPU dropout of
          :mod:`smca_detr.layers.dropout`;
        - a mask that needs a gradient (SMCA's learned Gaussian): the CPU flash kernel has no mask
          gradient and its math fallback is slower; the explicit path adds the mask in place into
          the fresh logits, one full-size allocation less;
        - value heads narrower than query/key heads (Conditional DETR's cross-attention): the fused
          CPU kernel needs equal widths (zero-padded v) and measured slower (300 queries x 500 keys,
          2 threads: forward 4.1 vs 4.4 ms, forward+backward 12.2 vs 14.2 ms).
    On accelerators SDPA (fused kernels) is used otherwise."""
    if need_weights or segmented:
        return True
    if q.device.type != "cpu":
        return False
    return (dropout_p > 0 or v.shape[-1] != q.shape[-1]
            or (mask is not None and mask.requires_grad and torch.is_grad_enabled()))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
              dropout_p: float = 0.0, *, need_weights: bool = False, segments: Optional[Sequence[int]] = None,
              segment_weights: Optional[torch.Tensor] = None):
    """The attention kernel of every global-attention layer: ``softmax(q k^T / sqrt(E_qk) + mask) v``
    with dropout ``dropout_p`` on the probabilities (pass 0 outside training).

    q ``[B,M,Lq,E_qk]``, k ``[B,M,Lk,E_qk]``, v ``[B,M,Lk,E_v]``; mask additive, broadcastable to
    ``[B,M,Lq,Lk]`` (``-inf`` at padded keys). ``segments``: lengths of contiguous key segments; the
    softmax is then taken within each (:func:`segment_softmax`, probabilities times
    ``segment_weights [B,1|M,Lq,P]``). SDPA or the explicit softmax by :func:`use_explicit_softmax`.
    Returns (``[B,M,Lq,E_v]``, probabilities ``[B,M,Lq,Lk]`` with ``need_weights`` else None)."""
    if not use_explicit_softmax(q, v, mask, dropout_p, need_weights, segments is not None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p), None
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    if mask is not None:
        logits = logits.add_(mask)  # fresh tensor: in place saves a full-size copy
    weights = logits.softmax(-1) if segments is None else segment_softmax(logits, segments, segment_weights)
    return dropout(weights, dropout_p) @ v, (weights if need_weights else None)


def segment_softmax(logits: torch.Tensor, sizes: Sequence[int],
                    segment_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax of ``logits [..., S]`` taken separately within each contiguous segment of the last
    dimension.

    Args:
        logits: attention logits (``-inf`` at masked keys).
        sizes: P segment lengths (Python ints) summing to ``S``, in key order.
        segment_weights: optional ``[..., P]`` (broadcastable against ``logits[..., :1]``) per-segment
            multipliers of the probabilities (SMCA's scale-selection weights α).

    Returns ``[..., S]``: ``w_s · softmax_s(logits)`` on each segment ``s``. A segment whose keys are
    all masked gets zero weight (instead of NaN). The segments are contiguous, so each is a slice
    with its own max / sum: exact and deterministic (no scatter atomics), one small step per segment
    (a handful of feature maps).
    """
    sizes = [int(n) for n in sizes]
    if sum(sizes) != logits.shape[-1]:
        raise ValueError(f"segment sizes {sizes} sum to {sum(sizes)}, but there are {logits.shape[-1]} keys")
    parts = []
    for i, x in enumerate(logits.split(sizes, -1)):
        with torch.no_grad():  # the max only stabilises the exponent; softmax is invariant to it
            mx = x.amax(-1, keepdim=True)
            mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        e = (x - mx).exp()
        den = e.sum(-1, keepdim=True)
        den = torch.where(den > 0, den, torch.ones_like(den))  # fully masked segment: weights 0, finite grads
        ratio = den.reciprocal() if segment_weights is None else segment_weights[..., i:i + 1] / den
        parts.append(e * ratio)
    return torch.cat(parts, -1)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half / bfloat16 -> float32; float32 and float64 (parity runs) unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def autocast_off(device_type: str):
    """Context with autocast disabled on ``device_type`` (maths that must stay in float32)."""
    return torch.autocast(device_type=device_type, enabled=False)


def finite_cast(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``bias.to(dtype)`` where finite values stay finite: cast to a narrower floating dtype (float16:
    ±65504) they are first clamped to ``±finfo(dtype).max / 2`` (headroom for the logits added to
    them), ``-inf`` (masked keys) is kept. Otherwise a float32 SMCA Gaussian far from every key
    (squared distances / β past 65504) turns a whole row to ``-inf`` in fp16, and its softmax to NaN.
    An identity cast (e.g. float32 everywhere) is unchanged."""
    if bias.dtype == dtype or not bias.is_floating_point() or torch.finfo(bias.dtype).max <= torch.finfo(dtype).max:
        return bias.to(dtype)
    limit = torch.finfo(dtype).max / 2
    return bias.clamp(-limit, limit).masked_fill_(bias == float("-inf"), float("-inf")).to(dtype)


def make_attn_mask(key_padding_mask, attn_bias, dtype):
    """Additive float mask ``[B,1|M,1|Lq,Lk]`` in ``dtype``: -inf at padded keys, plus ``attn_bias``
    (cast with ``finite_cast``: a finite bias never becomes -inf in fp16). A row of -inf only where
    every key is padded, which the models never produce (every image has a valid pixel)."""
    mask = None
    if key_padding_mask is not None:
        mask = torch.zeros(key_padding_mask.shape, dtype=dtype, device=key_padding_mask.device)
        mask = mask.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]
    if attn_bias is not None:
        attn_bias = finite_cast(attn_bias, dtype)
        mask = attn_bias if mask is None else mask + attn_bias
    return mask


class FFNMixin:
    """Adds the transformer feed-forward block with the official key names (``linear1``, ``linear2``)
    directly on the layer, so checkpoints load without renames."""

    def build_ffn(self, d_model: int, dim_feedforward: int, dropout: float, activation: str):
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = Dropout(dropout)
        self.activation = get_activation(activation)

    def ffn(self, x):
        return self.linear2(self.dropout(self.activation(self.linear1(x))))
