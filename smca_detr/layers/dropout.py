"""Dropout with a fast keep-mask generator on CPU.

Dropout draws one random number per element. On CPU, PyTorch's ``bernoulli_`` uses MKL's
parallel generator only on Intel processors; elsewhere (e.g. AMD EPYC) it runs the sequential
mt19937 generator on one core, and the DETR-family transformers' 60 dropout calls (FFN, residuals,
attention probabilities) then take about 13% of an R50 SMCA training step on a 2-core CPU
(0.77 s of 5.8 s, profiled). Here the mask comes from numpy's SFC64 generator instead: its raw
64-bit outputs read as two 32-bit integers each (about 1.5 ns per element on one core), compared
with the threshold and turned into the ``0`` / ``1 / (1 - p)`` scale mask by numpy ufuncs, in
fixed chunks of :data:`CHUNK` elements that a small thread pool fills in parallel (numpy releases
the GIL there). Chunk ``i`` of a call uses its own generator seeded with ``(seed, i)``, where
``seed`` is one draw from torch's CPU generator, so the mask depends only on torch's RNG state,
never on the thread count: ``torch.manual_seed`` and ``torch.random.fork_rng`` keep runs
reproducible.

Same distribution as ``F.dropout``: every element is kept independently with probability
``1 - p`` (``p`` resolved to 2^-32, finer than the 2^-24 of a float32 uniform draw) and scaled by
``1 / (1 - p)`` (rounded to the tensor's dtype); the gradient is the same mask times the same
scale. The fast path is used for float32 / float64 tensors on CPU in training outside tracing and
``torch.compile``; everything else calls ``F.dropout``.
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .tracing import tracing_or_compiling

__all__ = ["CHUNK", "Dropout", "dropout", "scale_mask"]

_FAST_DTYPES = (torch.float32, torch.float64)
CHUNK = 1 << 20  # elements per independently seeded generator (fixed: the mask never depends on threads)
_MAX_THREADS = 8  # the fill is memory-bound beyond a few cores
_POOL = {"pid": None, "pool": None, "workers": 0}
_POOL_LOCK = threading.Lock()


def _check_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


def _threshold(p: float) -> int:
    """Signed 32-bit threshold: a uniform int32 ``r`` is dropped iff ``r < threshold``, which has
    probability ``round(p * 2^32) / 2^32``."""
    return int(round(p * 2 ** 32)) - 2 ** 31


def _pool(workers: int):
    """This process's thread pool of ``workers`` threads, rebuilt after a fork (threads do not
    survive ``fork``, e.g. into data-loader workers) or when ``torch.get_num_threads()`` changed."""
    with _POOL_LOCK:
        if _POOL["pid"] != os.getpid() or _POOL["workers"] != workers:
            old = _POOL["pool"] if _POOL["pid"] == os.getpid() else None
            _POOL.update(pid=os.getpid(), pool=ThreadPoolExecutor(workers, thread_name_prefix="smca_dropout"),
                         workers=workers)
            if old is not None:
                old.shutdown(wait=False)
        return _POOL["pool"]


def _fill(out: np.ndarray, seed: int, p: float, chunk: int, value) -> None:
    """Chunk ``chunk`` of ``out`` (flat): ``value`` where kept, 0 where dropped."""
    lo = chunk * CHUNK
    part = out[lo:lo + CHUNK]
    raw = np.random.SFC64([seed, chunk]).random_raw((part.size + 1) // 2).view(np.int32)[:part.size]
    np.multiply(np.greater_equal(raw, _threshold(p)), value, out=part)


def _mask(shape, p: float, dtype: np.dtype, value) -> np.ndarray:
    n = 1
    for s in shape:
        n *= int(s)
    seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    out = np.empty(n, dtype=dtype)
    chunks = range((n + CHUNK - 1) // CHUNK)
    threads = min(_MAX_THREADS, torch.get_num_threads())
    if len(chunks) <= 1 or threads <= 1:
        for i in chunks:
            _fill(out, seed, p, i, value)
    else:
        list(_pool(threads).map(lambda i: _fill(out, seed, p, i, value), chunks))
    return out.reshape(tuple(int(s) for s in shape))


def scale_mask(shape, p: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """CPU tensor of ``shape``: each element ``1 / (1 - p)`` (kept, independently with probability
    ``1 - p``, to 2^-32) or ``0`` (dropped), in ``dtype``, built in one pass per chunk; seeded from
    torch's default CPU generator (one draw)."""
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    scale = np_dtype.type(1.0 / (1.0 - p))
    return torch.from_numpy(_mask(shape, p, np_dtype, scale))


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the fast CPU keep mask (see the module docstring)."""
    if not training or p == 0.0:
        return x
    _check_p(p)
    if x.device.type != "cpu" or x.dtype not in _FAST_DTYPES or p == 1.0 or tracing_or_compiling():
        return F.dropout(x, p, training)
    return x * scale_mask(x.shape, p, x.dtype)


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
