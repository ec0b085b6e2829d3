"""Fast CPU dropout (smca_detr/layers/dropout.py): same distribution, scale and gradient as F.dropout."""
import math

import pytest
import torch
import torch.nn.functional as F

from smca_detr.layers.dropout import Dropout, dropout, keep_mask


def test_eval_and_p0_are_identity_p1_zeroes():
    x = torch.randn(4, 5)
    assert dropout(x, 0.3, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    assert torch.equal(dropout(x, 1.0, training=True), torch.zeros_like(x))
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout(x, 1.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        Dropout(-0.1)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_scale_float64(p):
    torch.manual_seed(0)
    n = 200_000
    x = torch.rand(n, dtype=torch.float64) + 1.0  # never zero
    y = dropout(x, p)
    kept = y != 0
    # Binomial(n, 1-p): the kept count is within 5 standard deviations of n(1-p)
    assert abs(kept.sum().item() - n * (1 - p)) < 5 * math.sqrt(n * p * (1 - p))
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-15, atol=0)


def test_mask_is_seeded_by_torch_and_independent_across_calls():
    torch.manual_seed(7)
    a = keep_mask((1000,), 0.5)
    b = keep_mask((1000,), 0.5)
    torch.manual_seed(7)
    assert torch.equal(keep_mask((1000,), 0.5), a)
    assert not torch.equal(a, b)
    # no long runs of the same pattern: consecutive elements are uncorrelated
    m = keep_mask((100_000,), 0.5).double()
    corr = torch.corrcoef(torch.stack([m[:-1], m[1:]]))[0, 1].item()
    assert abs(corr) < 0.02


def test_gradient_is_the_same_mask_times_scale():
    torch.manual_seed(1)
    x = torch.randn(3, 50, dtype=torch.float64, requires_grad=True)
    y = dropout(x, 0.25)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    kept = y.detach() != 0
    scale = kept.double() / 0.75  # 0 where dropped, 1/(1-p) where kept
    torch.testing.assert_close(y.detach(), x.detach() * scale, rtol=1e-15, atol=0)
    torch.testing.assert_close(gx, g * scale, rtol=1e-15, atol=0)


def test_other_dtypes_fall_back_to_torch_dropout(monkeypatch):
    calls = []
    real = F.dropout
    monkeypatch.setattr(F, "dropout", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    module = Dropout(0.5).train()
    module(torch.randn(8, dtype=torch.bfloat16))
    module(torch.randn(8))
    assert calls == [torch.bfloat16]
    assert "p=0.5" in repr(module)
    assert torch.equal(module.eval()(torch.ones(3)), torch.ones(3))


def test_attention_training_path_uses_explicit_softmax_with_dropout():
    """In CPU training with dropout the attention takes the explicit path; with dropout 0 it equals
    the SDPA path (same maths), with dropout the output differs from eval and stays finite."""
    from smca_detr.modeling.layers import MultiheadAttention

    torch.manual_seed(0)
    attn = MultiheadAttention(16, 4, dropout=0.0)
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    attn.train()
    ref = attn(q, kv, kv, key_padding_mask=kpm)[0]  # SDPA (no dropout)
    attn.dropout = 1e-12  # explicit path, practically no dropout
    torch.testing.assert_close(attn(q, kv, kv, key_padding_mask=kpm)[0], ref, rtol=1e-5, atol=1e-6)
    attn.dropout = 0.5
    out = attn(q, kv, kv, key_padding_mask=kpm)[0]
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)
