"""Parity of the multi-scale deformable attention with the official Deformable DETR
(``deformable_detr_units.pt``, README 7.5): module outputs and intermediates for 2-d reference
points and 4-d reference boxes, the sampling core alone, and the official default init.

The fixture directory is ``$SMCA_DETR_PARITY_DIR`` (default ``tests/data/parity``); the file is
found by name and every size comes from its ``config`` / tensor shapes. Tolerances: README 5.1
(float32: atol 1e-5, rtol 1e-4; init values: exact). Every comparison runs with the PyTorch path
and with the Triton kernels (on CUDA when available, else in the Triton interpreter on CPU with
``TRITON_INTERPRET=1``).
"""
import math

import pytest
import torch

from parity_common import assert_close, fixture_params, load_fixture
from smca_detr.layers import MSDeformAttn, ms_deform_attn, msda_offset_bias_init
from smca_detr.layers.msda import triton_available

UNITS = fixture_params("deformable_detr_units.pt")
IMPLS = [
    "pytorch",
    pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="triton not importable")),
]


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch):
    """(impl, device): the Triton kernels run on CUDA when present, else in the interpreter."""
    if request.param == "triton":
        if torch.cuda.is_available():
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
            return "triton", "cuda"
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param, "cpu"


def build_module(fx, impl="pytorch"):
    c = fx["config"]
    m = MSDeformAttn(d_model=c["d_model"], n_levels=c["n_levels"], n_heads=c["n_heads"],
                     n_points=c["n_points"], impl=impl)
    return m


@pytest.mark.parametrize("path", UNITS)
@pytest.mark.parametrize("ref", ["ref2", "ref4"])
def test_parity_msda_module(path, ref, impl):
    impl, device = impl
    fx = load_fixture(path)
    m = build_module(fx, impl)
    m.load_state_dict(fx["state_dict"], strict=True)
    m.eval().to(device)
    m.store_sampling = True
    x = {k: v.to(device) for k, v in fx["inputs"].items() if k != "reference_points"}
    with torch.no_grad():
        out = m(x["query"], fx["inputs"]["reference_points"][ref].to(device), x["input_flatten"],
                x["input_spatial_shapes"], x["input_level_start_index"], x["input_padding_mask"])
    inter = fx["intermediates"][ref]
    assert_close(m.last_sampling["sampling_locations"].cpu(), inter["sampling_locations"],
                 f"{ref} sampling_locations")
    assert_close(m.last_sampling["attention_weights"].cpu(), inter["attention_weights"],
                 f"{ref} attention_weights")
    assert out.shape == fx["outputs"][ref].shape
    assert_close(out.cpu(), fx["outputs"][ref], f"{ref} output ({impl}, {device})")


@pytest.mark.parametrize("path", UNITS)
def test_parity_msda_core(path, impl):
    impl, device = impl
    fx = load_fixture(path)
    u = {k: v.to(device) for k, v in fx["units"]["ms_deform_attn_core"].items()}
    x = fx["inputs"]
    assert ((u["sampling_locations"] < 0) | (u["sampling_locations"] > 1)).any()  # zero padding matters
    out = ms_deform_attn(u["value"], x["input_spatial_shapes"].to(device),
                         x["input_level_start_index"].to(device), u["sampling_locations"],
                         u["attention_weights"], impl=impl)
    assert_close(out.cpu(), u["output"].cpu(), f"ms_deform_attn_core ({impl}, {device})")


@pytest.mark.parametrize("path", UNITS)
def test_parity_msda_init_deterministic(path):
    """Official init of the fixture-sized module: sampling-offset direction grid exactly, and the
    seed-independent zeros."""
    fx = load_fixture(path)
    torch.manual_seed(123)
    m = build_module(fx)
    for key, expected in fx["init_deterministic"].items():
        actual = m.state_dict()[key]
        if isinstance(expected, dict):  # {"fill": value, "shape": shape}
            expected = torch.full(tuple(expected["shape"]), float(expected["fill"]))
        assert actual.shape == expected.shape, key
        assert torch.equal(actual, expected), key
    for name in ("sampling_offsets.weight", "attention_weights.weight", "attention_weights.bias",
                 "value_proj.bias", "output_proj.bias"):
        assert torch.all(m.state_dict()[name] == 0), name


@pytest.mark.parametrize("path", UNITS)
def test_parity_msda_default_init_d256(path):
    """``units.msda_default_init``: the official default sizes (README 7.5: d 256, 4 levels, 8 heads,
    4 points). The sizes are checked against the stored tensor (M*L*P*2 entries, per-head
    directions at angles 2*pi*h/M, point i at (i+1) times the direction) before comparing exactly."""
    fx = load_fixture(path)
    bias = fx["units"]["msda_default_init"]["sampling_offsets.bias"]
    d_model, n_levels, n_heads, n_points = 256, 4, 8, 4
    assert bias.numel() == n_heads * n_levels * n_points * 2
    grid = bias.view(n_heads, n_levels, n_points, 2)
    # the layout implied by these sizes: point i of every level is (i+1) x the level-0 point 0
    steps = torch.arange(1, n_points + 1, dtype=torch.float32).view(1, 1, n_points, 1)
    torch.testing.assert_close(grid, (grid[:, :1, :1] * steps).expand_as(grid), atol=1e-6, rtol=0)
    angles = torch.atan2(grid[:, 0, 0, 1], grid[:, 0, 0, 0]) % (2 * math.pi)
    torch.testing.assert_close(angles, torch.arange(n_heads) * (2 * math.pi / n_heads), atol=1e-6, rtol=0)

    assert torch.equal(msda_offset_bias_init(n_heads, n_levels, n_points), bias)
    torch.manual_seed(0)
    m = MSDeformAttn(d_model=d_model, n_levels=n_levels, n_heads=n_heads, n_points=n_points)
    assert torch.equal(m.sampling_offsets.bias.detach(), bias)
    # the rest of the note: zero weights / biases, Xavier-uniform projections
    assert torch.all(m.sampling_offsets.weight == 0) and torch.all(m.attention_weights.weight == 0)
    assert torch.all(m.attention_weights.bias == 0)
    bound = math.sqrt(6.0 / (2 * d_model))
    for lin in (m.value_proj, m.output_proj):
        assert torch.all(lin.bias == 0)
        assert lin.weight.abs().max() <= bound
        var = float(lin.weight.detach().var())
        assert abs(var - bound ** 2 / 3) < 0.1 * bound ** 2 / 3  # variance of U(-a, a)
