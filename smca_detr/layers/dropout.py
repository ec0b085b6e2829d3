"""Dropout with a fast keep-mask generator on CPU.

Dropout draws one random number per element. On CPU, PyTorch's ``bernoulli_`` uses MKL's
parallel generator only on Intel processors; elsewhere (e.g. AMD EPYC) it runs the sequential
mt19937 generator on one core, and the DETR-family transformers' 60 dropout calls (FFN, residuals,
attention probabilities) then take about 13% of an R50 SMCA training step on a 2-core CPU
(0.77 s of 5.8 s, profiled). Here the keep mask comes from numpy's SFC64 generator instead (one
32-bit integer per element, about 4x faster than ``bernoulli_``), seeded by one draw from torch's
CPU generator per call: ``torch.manual_seed`` and ``torch.random.fork_rng`` keep runs reproducible.

Same distribution as ``F.dropout``: every element is kept independently with probability
``1 - p`` (``p`` resolved to 2^-32, finer than the 2^-24 of a float32 uniform draw) and scaled by
``1 / (1 - p)``; the gradient is the same mask times the same scale. The fast path is used for
float32 / float64 tensors on CPU in training outside tracing and ``torch.compile``; everything else
calls ``F.dropout``.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .tracing import tracing_or_compiling

__all__ = ["Dropout", "dropout", "keep_mask"]

_FAST_DTYPES = (torch.float32, torch.float64)


def _check_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


def keep_mask(shape, p: float) -> torch.Tensor:
    """Bool CPU tensor of ``shape``, each element True (kept) independently with probability
    ``1 - p`` (to 2^-32); seeded from torch's default CPU generator (one draw)."""
    seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    gen = np.random.Generator(np.random.SFC64(seed))
    n = 1
    for s in shape:
        n *= int(s)
    raw = gen.integers(-2 ** 31, 2 ** 31, size=n, dtype=np.int32)  # uniform over all 2^32 values
    threshold = int(round(p * 2 ** 32)) - 2 ** 31  # P(raw < threshold) = round(p * 2^32) / 2^32
    return torch.from_numpy(raw).view(tuple(int(s) for s in shape)) >= threshold


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the fast CPU keep mask (see the module docstring)."""
    if not training or p == 0.0:
        return x
    _check_p(p)
    if x.device.type != "cpu" or x.dtype not in _FAST_DTYPES or p == 1.0 or tracing_or_compiling():
        return F.dropout(x, p, training)
    keep = keep_mask(x.shape, p)
    scale = torch.full((), 1.0 / (1.0 - p), dtype=x.dtype)
    return x * torch.where(keep, scale, torch.zeros((), dtype=x.dtype))


class Dropout(nn.Module):
    """Drop-in for ``nn.Dropout`` (same ``p`` attribute, no state) using :func:`dropout`."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        _check_p(p)
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
