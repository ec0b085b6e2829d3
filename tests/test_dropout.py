"""Fast CPU dropout (smca_detr/layers/dropout.py): same distribution, scale and gradient as F.dropout."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smca_detr.layers.dropout import CHUNK, Dropout, dropout, scale_mask


def keep_mask(shape, p):
    """The kept elements of the fast dropout's mask (float64: exact 0 / 1 / (1 - p) values)."""
    return scale_mask(shape, p, torch.float64) != 0


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


def test_mask_does_not_depend_on_thread_count():
    """Chunks are seeded by (seed, chunk index): 1 or 2 threads give the same mask, of the two values
    0 and 1 / (1 - p)."""
    shape = (3, CHUNK // 2 + 7)  # 1.5 chunks: one full, one partial
    prev = torch.get_num_threads()
    masks = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(3)
            masks.append(scale_mask(shape, 0.3, torch.float64))
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(masks[0], masks[1])
    assert set(masks[0].unique().tolist()) == {0.0, 1 / 0.7}
    # the two chunks are different streams (not the same chunk repeated)
    flat = masks[0].flatten()
    assert not torch.equal(flat[:1000], flat[CHUNK:CHUNK + 1000])


def _mask_sum_in_child(queue):
    # no torch parallel op here: OpenMP itself is not fork-safe (a torch limitation, not ours)
    queue.put(int(np.count_nonzero(scale_mask((3 * (1 << 20),), 0.5).numpy())))


def test_dropout_works_in_a_forked_child_after_the_parent_used_the_pool():
    """The thread pool does not survive fork (data-loader workers): the child builds its own."""
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        scale_mask((3 * (1 << 20),), 0.5)  # parent's pool exists now
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_mask_sum_in_child, args=(queue,))
        child.start()
        try:
            total = queue.get(timeout=120)
            child.join(timeout=60)
        finally:
            if child.is_alive():
                child.kill()
    finally:
        torch.set_num_threads(prev)
    assert child.exitcode == 0
    n = 3 * (1 << 20)
    assert abs(total - n / 2) < 5 * math.sqrt(n / 4)


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
    from smca_detr.modeling.blocks import MultiheadAttention

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
