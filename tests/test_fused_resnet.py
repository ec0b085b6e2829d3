"""The fused CPU inference path of detectron2 ResNets (smca_detr/layers/cpu/fused_resnet.py)."""
import inspect
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from smca_detr.config import add_smca_detr_config
from smca_detr.layers.cpu.fused_resnet import fused_frozen_prefix, fused_resnet_forward, fused_resnet_supported


def _cfg(depth, norm, out_features, width=None, freeze_at=0, name="build_resnet_backbone"):
    cfg = add_smca_detr_config(get_cfg())
    cfg.MODEL.BACKBONE.NAME = name
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.RESNETS.OUT_FEATURES = out_features
    if width is not None:
        cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = width
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = width
    return cfg


def _randomize_norms(model, gen):
    # non-trivial statistics so that a wrong fold cannot pass
    for m in model.modules():
        if hasattr(m, "running_var") and m.running_var is not None:
            for t in (m.weight, m.bias, m.running_mean):
                t.data.copy_(torch.randn(t.shape, generator=gen) * 0.5)
            m.running_var.data.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


@pytest.mark.parametrize("winograd_min_channels,f4_min_pixels", [(0, 0), (1, 0), (1, 100)])
@pytest.mark.parametrize(
    "depth,norm,width,out_features,name",
    [
        (50, "FrozenBN", 8, ["res2", "res3", "res4", "res5"], "build_resnet_backbone"),
        (50, "BN", 8, ["res5"], "build_resnet_backbone"),
        (18, "BN", 8, ["stem", "res3", "res4"], "build_slim_resnet_backbone"),
    ],
)
def test_fused_resnet_matches_detectron2_forward(depth, norm, width, out_features, name, winograd_min_channels,
                                                f4_min_pixels, monkeypatch):
    from smca_detr.layers.cpu import fused_resnet as fused_mod

    wino_calls = []  # (map pixels, transformed positions: 16 = F(2x2, 3x3), 36 = F(4x4, 3x3))
    real_wino = fused_mod.winograd_conv3x3
    monkeypatch.setattr(fused_mod, "winograd_conv3x3",
                        lambda x, u, *a, **k: wino_calls.append((x.shape[-2] * x.shape[-1], u.shape[0]))
                        or real_wino(x, u, *a, **k))
    gen = torch.Generator().manual_seed(0)
    cfg = _cfg(depth, norm, out_features, width, name=name)
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 2  # bottleneck width of res2 (R50 only)
    torch.manual_seed(0)
    body = build_backbone(cfg, ShapeSpec(channels=3)).eval()
    _randomize_norms(body, gen)
    x = torch.randn(2, 3, 70, 90, generator=gen)
    with torch.no_grad():
        ok, why = fused_resnet_supported(body, x)
        assert ok, why
        ref = body(x)
        out = fused_resnet_forward(body, x, winograd_min_channels, winograd_f4_min_pixels=f4_min_pixels)
    # every 3x3 stride-1 conv goes through Winograd when the threshold allows it (none at 0); the
    # 70x90 input gives res2 18x23 and res3 9x12 (F(4x4) from 100 pixels), res4 5x6, res5 3x3
    assert (len(wino_calls) > 0) == (winograd_min_channels > 0)
    assert all(pos == (36 if 0 < f4_min_pixels <= px else 16) for px, pos in wino_calls)
    if f4_min_pixels and "res5" in out_features:
        assert {pos for _, pos in wino_calls} == {16, 36}
    assert sorted(out) == sorted(ref)
    for k in ref:
        assert out[k].shape == ref[k].shape and out[k].is_contiguous()
        scale = ref[k].abs().max().item()
        assert torch.allclose(out[k], ref[k], atol=2e-5 * max(scale, 1.0), rtol=1e-4), k


def test_fused_resnet_cache_follows_new_weights():
    cfg = _cfg(18, "FrozenBN", ["res3"], 8, name="build_slim_resnet_backbone")
    body = build_backbone(cfg, ShapeSpec(channels=3)).eval()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        first = fused_resnet_forward(body, x)["res3"]
        body.stem.conv1.weight.mul_(2.0)  # in-place edit: version counter moves
        body.stem.conv1.norm.bias.add_(0.5)
        ref = body(x)["res3"]
        second = fused_resnet_forward(body, x)["res3"]
    assert not torch.allclose(first, second)
    assert torch.allclose(second, ref, atol=1e-4, rtol=1e-4)


def test_fused_resnet_only_where_exact():
    cfg = _cfg(18, "BN", ["res3"], 8, name="build_slim_resnet_backbone")
    body = build_backbone(cfg, ShapeSpec(channels=3))
    x = torch.randn(1, 3, 32, 32)
    assert not fused_resnet_supported(body, x)[0]  # training mode: BN uses batch statistics
    body.eval()
    assert not fused_resnet_supported(body, x)[0]  # gradients enabled
    with torch.no_grad():
        assert fused_resnet_supported(body, x)[0]
        assert not fused_resnet_supported(body, x.double())[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fused_resnet_supported(body, x)[0]
    gn = build_backbone(_cfg(18, "GN", ["res3"], 32, name="build_slim_resnet_backbone"), ShapeSpec(channels=3)).eval()
    with torch.no_grad():
        assert not fused_resnet_supported(gn, x)[0]  # GroupNorm cannot be folded


def test_detector_uses_fused_path_and_flag_turns_it_off(monkeypatch):
    """MODEL.SMCA_DETR.FUSED_CPU_BACKBONE is the one switch: on, eval-mode CPU inference takes the
    fused path with its default (measured) thresholds; off, detectron2's own forward runs."""
    from smca_detr.layers.cpu import fused_resnet as fused_mod
    from smca_detr.modeling.backbone import DetrBackbone

    cfg = _cfg(18, "FrozenBN", ["res4"], 8, name="build_slim_resnet_backbone")
    calls = []
    real = fused_mod.fused_resnet_forward
    monkeypatch.setattr(fused_mod, "fused_resnet_forward",
                        lambda b, x, *a, **k: calls.append((a, k)) or real(b, x, *a, **k))
    for flag, expected in ((True, 1), (False, 0)):
        calls.clear()
        cfg.MODEL.SMCA_DETR.FUSED_CPU_BACKBONE = flag
        bb = DetrBackbone(cfg, ["res4"]).eval()
        with torch.no_grad():
            feats, masks = bb(torch.randn(1, 3, 64, 64), [(64, 60)])
        assert len(calls) == expected and feats[0].shape[-2:] == masks[0].shape[-2:]
    defaults = inspect.signature(real).parameters
    assert defaults["winograd_min_channels"].default == fused_mod.WINOGRAD_MIN_CHANNELS == 128
    assert defaults["winograd_f4_min_pixels"].default == fused_mod.WINOGRAD_F4_MIN_PIXELS == 1024
    train = inspect.signature(fused_mod.fused_training_forward).parameters
    assert train["train_winograd_min_channels"].default == fused_mod.TRAIN_WINOGRAD_MIN_CHANNELS == 128
    assert train["train_gemm_min_pixels"].default == fused_mod.TRAIN_GEMM_1X1_MIN_PIXELS == 4096


def test_fused_resnet_not_used_while_tracing():
    cfg = _cfg(18, "FrozenBN", ["res3"], 8, name="build_slim_resnet_backbone")
    body = build_backbone(cfg, ShapeSpec(channels=3)).eval()
    x = torch.randn(1, 3, 32, 32)
    seen = []

    def probe(t):
        seen.append(fused_resnet_supported(body, t)[0])
        return t.sum()

    with torch.no_grad():
        torch.jit.trace(probe, (x,), check_trace=False)
    assert seen == [False]


@pytest.mark.parametrize("freeze_at,expected", [(0, 0), (1, 1), (2, 2), (3, 3)])
def test_frozen_prefix_counts_frozen_leading_stages(freeze_at, expected):
    cfg = _cfg(50, "FrozenBN", ["res4"], 8, freeze_at=freeze_at)
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 2
    body = build_backbone(cfg, ShapeSpec(channels=3)).train()
    x = torch.randn(1, 3, 32, 32)
    assert fused_frozen_prefix(body, x) == expected
    assert fused_frozen_prefix(body, x.requires_grad_()) == 0  # a gradient w.r.t. the image is wanted
    assert fused_frozen_prefix(body, x.detach().double()) == 0


def test_trainable_bn_stages_are_not_fused():
    # FREEZE_AT 1 with trainable BatchNorm: res2 uses batch statistics in training, cannot be folded
    cfg = _cfg(18, "BN", ["res3"], 8, freeze_at=1, name="build_slim_resnet_backbone")
    body = build_backbone(cfg, ShapeSpec(channels=3)).train()
    assert fused_frozen_prefix(body, torch.randn(1, 3, 32, 32)) == 1
    # ... and no trainable block folds a training-mode BatchNorm: with nothing frozen either, the
    # training path declines entirely and detectron2's own forward runs
    from smca_detr.layers.cpu import fused_resnet as fused_mod

    assert not any(fused_mod._train_foldable_block(b) for s in body.stages for b in s)
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    body = build_backbone(cfg, ShapeSpec(channels=3)).train()
    assert fused_mod.fused_training_forward(body, torch.randn(1, 3, 32, 32)) is None


def _assert_training_matches_detectron2(body, x, outs, params, gen):
    """``outs`` (the fast training path's outputs of ``body`` on ``x``) equal detectron2's own forward,
    and the gradients of a random linear function of them w.r.t. ``params`` equal detectron2's."""
    coefs = {k: torch.randn(v.shape, generator=gen) for k, v in outs.items()}
    grads = torch.autograd.grad(sum((outs[k] * coefs[k]).sum() for k in outs), params)
    ref = body(x)
    ref_grads = torch.autograd.grad(sum((ref[k] * coefs[k]).sum() for k in ref), params)
    for k in ref:
        torch.testing.assert_close(outs[k], ref[k], rtol=1e-4, atol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-3 * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("freeze_at,train_winograd,f4_min_pixels,gemm_min_pixels",
                         [(2, 0, 0, 0), (2, 1, 0, 0), (2, 1, 50, 0), (0, 1, 50, 0), (0, 0, 0, 0),
                          (2, 1, 50, 1), (2, 1, 50, 50), (2, 0, 0, 50), (0, 1, 0, 1)])
def test_training_forward_matches_detectron2(freeze_at, train_winograd, f4_min_pixels, gemm_min_pixels,
                                             monkeypatch):
    """The DETR recipe freezes stem + res2 (FREEZE_AT 2): they run fused without autograd; every conv
    of the trainable blocks runs with its frozen norm folded in (autograd through the fold), and with
    a Winograd threshold the trainable 3x3 convs run through the differentiable Winograd op, with a
    GEMM threshold the 1x1 convs on large enough maps run as per-image GEMMs (reading the frozen
    prefix's channels-last output as is, feeding Winograd channels-last rows). Outputs and the
    gradients of every trainable parameter equal detectron2's own forward/backward."""
    from smca_detr.layers.cpu import fused_resnet as fused_mod

    gen = torch.Generator().manual_seed(1)
    cfg = _cfg(50, "FrozenBN", ["res3", "res4", "res5"], 8, freeze_at=freeze_at)
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 2
    torch.manual_seed(1)
    body = build_backbone(cfg, ShapeSpec(channels=3)).train()
    _randomize_norms(body, gen)
    x = torch.randn(2, 3, 64, 72, generator=gen)
    fused_calls, wino_calls, folded_calls = [], [], []
    real_conv, real_wino, real_train_conv = fused_mod._conv, fused_mod.winograd_conv3x3_train, fused_mod._train_conv
    monkeypatch.setattr(fused_mod, "_conv", lambda *a, **k: fused_calls.append(1) or real_conv(*a, **k))
    monkeypatch.setattr(fused_mod, "winograd_conv3x3_train",
                        lambda x, u, *a, **k: wino_calls.append((x.shape[-2] * x.shape[-1], u.shape[0]))
                        or real_wino(x, u, *a, **k))
    monkeypatch.setattr(fused_mod, "_train_conv", lambda *a, **k: folded_calls.append(1) or real_train_conv(*a, **k))
    gemm_calls, real_gemm = [], fused_mod.conv1x1_gemm
    monkeypatch.setattr(fused_mod, "conv1x1_gemm",
                        lambda x, *a, **k: gemm_calls.append((x.shape[-2] * x.shape[-1], k["channels_last"]))
                        or real_gemm(x, *a, **k))
    outs = fused_mod.fused_training_forward(body, x, winograd_min_channels=1, train_winograd_min_channels=train_winograd,
                                            winograd_f4_min_pixels=f4_min_pixels, train_gemm_min_pixels=gemm_min_pixels)
    trainable_convs = [c for s in body.stages[max(freeze_at - 1, 0):] for b in s for c in fused_mod._convs_of(b)]
    assert len(folded_calls) == len(trainable_convs)
    # FREEZE_AT 2: stem + res2's 3 blocks x (conv1, conv2) through _conv (conv3 is fused with the
    # residual add; no shortcut conv: res2 keeps the stem's 8 channels here), nothing of res3+
    assert len(fused_calls) == (1 + 3 * 2 if freeze_at == 2 else 0)
    # trainable blocks with a stride-1 3x3 conv (torchvision layout: the first block of res3-res5
    # strides in its 3x3 conv, which stays on oneDNN)
    n_stride1 = 3 + 5 + 2 if freeze_at == 2 else 3 + 3 + 5 + 2
    assert len(wino_calls) == (n_stride1 if train_winograd else 0)
    # 64x72 input: res2 16x18, res3 8x9 (F(4x4) from 50 pixels), res4 4x5, res5 2x3
    assert all(pos == (36 if 0 < f4_min_pixels <= px else 16) for px, pos in wino_calls)
    if train_winograd and f4_min_pixels:
        assert {pos for _, pos in wino_calls} == {16, 36}
    # 1x1 convs of the trainable blocks: conv1 + conv3 per block, + the shortcut of each stage's first
    # block; through GEMMs where their input map has >= gemm_min_pixels pixels (res2 288, res3 72, res4 20)
    n_1x1 = 2 * (4 + 6 + 3) + 3 + (2 * 3 if freeze_at == 0 else 0)  # res2: no shortcut (8 -> 8 channels)
    if gemm_min_pixels == 1:
        assert len(gemm_calls) == n_1x1
    elif gemm_min_pixels == 50:  # res3's convs, and the two res4 first-block convs reading res3's map
        assert len(gemm_calls) == 2 * 4 + 1 + 2 and {px for px, _ in gemm_calls} == {288, 72}
    else:
        assert not gemm_calls
    # conv1 writes channels-last rows exactly when its conv2 is a Winograd convolution (stride 1)
    assert sum(cl for _, cl in gemm_calls) == (n_stride1 if train_winograd and gemm_min_pixels == 1 else
                                               3 if train_winograd and gemm_min_pixels == 50 else 0)
    _assert_training_matches_detectron2(body, x, outs, [p for p in body.parameters() if p.requires_grad], gen)


@pytest.mark.parametrize("train_winograd,gemm_min_pixels", [(0, 0), (1, 0), (1, 1)])
def test_training_forward_basic_blocks_match_detectron2(train_winograd, gemm_min_pixels):
    """R18 (BasicBlock) with eval-mode BatchNorm whose affine parameters train: each conv runs with
    its norm folded through autograd (3x3 stride-1 convs through Winograd with a threshold), and the
    conv weights as well as the norms' gamma/beta get detectron2's gradients."""
    from smca_detr.layers.cpu import fused_resnet as fused_mod

    gen = torch.Generator().manual_seed(2)
    cfg = _cfg(18, "BN", ["res3", "res4"], 8, freeze_at=0, name="build_slim_resnet_backbone")
    torch.manual_seed(2)
    body = build_backbone(cfg, ShapeSpec(channels=3)).train()
    _randomize_norms(body, gen)
    for m in body.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()  # running statistics: foldable, while weight / bias still train
    assert all(fused_mod._train_foldable_block(b) for s in body.stages for b in s)
    x = torch.randn(2, 3, 40, 44, generator=gen)
    outs = fused_mod.fused_training_forward(body, x, train_winograd_min_channels=train_winograd,
                                            train_gemm_min_pixels=gemm_min_pixels)
    assert outs is not None
    params = [p for p in body.parameters() if p.requires_grad]
    assert any(p.dim() == 1 for p in params)  # norm affine parameters are among them
    _assert_training_matches_detectron2(body, x, outs, params, gen)
