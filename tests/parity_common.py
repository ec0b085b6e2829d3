"""Shared helpers of the parity tests (fixtures of the official implementations).

The directory comes from ``$SMCA_DETR_PARITY_DIR`` (default: ``tests/data/parity`` in this repo);
files are discovered by name, and every model is built from each file's ``config``.
Fixtures may be in the original format or in this repo's compact format (see
``tools/compact_parity_fixture.py``: int8 weights with one power-of-two exponent per tensor, and
only the entries the tests compare); ``load_fixture`` returns the same dict for both.
"""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
COMPACT_FORMAT = "smca-detr-compact-fixture/1"


def parity_dir() -> Path:
    return Path(os.environ.get("SMCA_DETR_PARITY_DIR", REPO / "tests" / "data" / "parity"))


def fixture_files(pattern: str):
    return sorted(parity_dir().glob(pattern))


def fixture_params(pattern: str):
    """``pytest.mark.parametrize`` argument list over the fixtures matching ``pattern``; a single
    skipped case when there is none (so the absence is visible, not silent)."""
    files = fixture_files(pattern)
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no {pattern} in {parity_dir()}"))]
    return [pytest.param(f, id=f.stem) for f in files]


def expand_state_dict(compact):
    out = {}
    for k, v in compact.items():
        if isinstance(v, dict) and "q" in v:
            out[k] = v["q"].to(torch.float32) * (2.0 ** int(v["e"]))
        else:
            out[k] = v
    return out


def load_fixture(path):
    fx = torch.load(path, map_location="cpu", weights_only=True)
    if fx.get("format") == COMPACT_FORMAT:
        fx = dict(fx)
        fx["state_dict"] = expand_state_dict(fx["state_dict"])
    return fx


def tol(dtype):
    """README 5.1 tolerances."""
    if dtype == torch.float64:
        return dict(atol=1e-10, rtol=1e-8)
    return dict(atol=1e-5, rtol=1e-4)


def assert_close(actual, expected, what="", dtype=None):
    dtype = dtype or expected.dtype
    torch.testing.assert_close(actual.to(expected.dtype), expected, **tol(dtype),
                               msg=lambda m: f"{what}: {m}")


def assert_indices_equal(actual, expected, what=""):
    """Matcher indices: per image (query_idx, target_idx) int64, compared exactly."""
    assert len(actual) == len(expected), what
    for b, ((aq, at), (eq, et)) in enumerate(zip(actual, expected)):
        order = torch.argsort(aq)
        assert torch.equal(aq[order].cpu(), eq), f"{what} image {b} queries: {aq[order]} vs {eq}"
        assert torch.equal(at[order].cpu(), et), f"{what} image {b} targets: {at[order]} vs {et}"


def assert_topk_close(scores, labels, boxes, ref, dtype=torch.float32):
    """Post-processing: scores with tolerance; labels/boxes only at ranks whose score is separated
    from its neighbours by more than the tolerance (README 5.1, ties may swap)."""
    t = tol(dtype)
    torch.testing.assert_close(scores, ref["scores"].to(scores.dtype), **t)
    ref_s = ref["scores"]
    for b in range(ref_s.shape[0]):
        s = ref_s[b]
        gap = torch.full_like(s, float("inf"))
        diffs = (s[:-1] - s[1:]).abs()
        gap[:-1] = torch.minimum(gap[:-1], diffs)
        gap[1:] = torch.minimum(gap[1:], diffs)
        ok = gap > (t["atol"] + t["rtol"] * s.abs()) * 2
        assert torch.equal(labels[b][ok].cpu().long(), ref["labels"][b][ok].long()), f"labels image {b}"
        torch.testing.assert_close(boxes[b][ok], ref["boxes"][b][ok].to(boxes.dtype), atol=t["atol"] * 1e3,
                                   rtol=t["rtol"])
