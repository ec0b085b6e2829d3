"""The fused CPU inference path of detectron2 ResNets (smca_detr/modeling/fused_resnet.py)."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from smca_detr.config import add_smca_detr_config
from smca_detr.modeling.fused_resnet import fused_resnet_forward, fused_resnet_supported


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


@pytest.mark.parametrize(
    "depth,norm,width,out_features,name",
    [
        (50, "FrozenBN", 8, ["res2", "res3", "res4", "res5"], "build_resnet_backbone"),
        (50, "BN", 8, ["res5"], "build_resnet_backbone"),
        (18, "BN", 8, ["stem", "res3", "res4"], "build_slim_resnet_backbone"),
    ],
)
def test_fused_resnet_matches_detectron2_forward(depth, norm, width, out_features, name):
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
        out = fused_resnet_forward(body, x)
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
    from smca_detr.modeling import backbone as backbone_mod
    from smca_detr.modeling.backbone import DetrBackbone

    cfg = _cfg(18, "FrozenBN", ["res4"], 8, name="build_slim_resnet_backbone")
    calls = []
    real = backbone_mod.fused_resnet_forward
    monkeypatch.setattr(backbone_mod, "fused_resnet_forward", lambda b, x: calls.append(1) or real(b, x))
    for flag, expected in ((True, 1), (False, 0)):
        calls.clear()
        cfg.MODEL.SMCA_DETR.FUSED_CPU_BACKBONE = flag
        bb = DetrBackbone(cfg, ["res4"]).eval()
        with torch.no_grad():
            feats, masks = bb(torch.randn(1, 3, 64, 64), [(64, 60)])
        assert len(calls) == expected and feats[0].shape[-2:] == masks[0].shape[-2:]


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
