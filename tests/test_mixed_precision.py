"""Mixed precision (autocast bf16 / fp16, GradScaler) numerics on CPU: the SMCA Gaussian prior in
float32, finite attention masks in fp16, gradient clipping on unscaled gradients with fused AdamW,
float32 losses under autocast, and a bf16 train step of every model family (network in bf16,
criterion in float32)."""
import copy

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.utils.events import EventStorage

from smca_detr.config import add_smca_detr_config
from smca_detr.engine import TrainLoop, build_optimizer
from smca_detr.modeling.criterion import SetCriterion
from smca_detr.modeling.matcher import HungarianMatcher
from smca_detr.modeling.registry import TRANSFORMER_REGISTRY
from smca_detr.modeling.transformers.smca import SMCADecoderLayer, SMCATransformer
from smca_detr.modeling.transformers.smca_conv_multiscale import SMCAConvMultiScaleTransformer
from smca_detr.modeling.transformers.smca_multiscale import SMCAMultiScaleTransformer
from train_step_helpers import FAMILIES, NUM_CLASSES, _autocast_on, _batch, build, make_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HALF = [torch.bfloat16, torch.float16]
# CPU always; CUDA (`pytest -m cuda`, tools/gpu_check.py) where a GPU is present
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]
# (transformer, backbone levels (channels, stride)); every variant's decoder is SMCADecoderLayer (prior: .prior)
SMCA_KINDS = {
    "single": (SMCATransformer, [(20, 32)]),
    "paper_multiscale": (SMCAMultiScaleTransformer, [(12, 16), (20, 32)]),
    "conv_multiscale": (SMCAConvMultiScaleTransformer, [(8, 8), (12, 16), (20, 32)]),
}
# detectron2 (h, w) image sizes: 1333 is not representable in bf16 (-> 1336), 2049 not in fp16
IMAGE_SIZES = [(800, 1333), (750, 2049)]


def _smca_transformer(kind, device="cpu"):
    cls, levels = SMCA_KINDS[kind]
    cfg = add_smca_detr_config(get_cfg())
    m = cfg.MODEL.SMCA_DETR
    m.TRANSFORMER = cls.__name__
    m.HIDDEN_DIM, m.NHEADS, m.DIM_FEEDFORWARD = 16, 2, 24
    m.ENC_LAYERS, m.DEC_LAYERS, m.NUM_QUERIES, m.DROPOUT = 1, 2, 5, 0.0
    m.SMCA.ENCODER_LAYOUT = ["multi"]
    torch.manual_seed(0)
    tr = cls(cfg, [ShapeSpec(channels=c, stride=s) for c, s in levels]).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial heads (point3 starts constant)
        for p in tr.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    feats, masks = [], []
    for c, s in levels:  # tiny maps: the prior depends on the image sizes, not on the map size
        h, w = 128 // s, 192 // s
        feats.append(torch.randn(len(IMAGE_SIZES), c, h, w, generator=g))
        masks.append(torch.zeros(len(IMAGE_SIZES), h, w, dtype=torch.bool))
    masks[-1][1, :, -1] = True  # some padding
    return tr.to(device), [f.to(device) for f in feats], [m.to(device) for m in masks]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", list(SMCA_KINDS))
def test_smca_prior_and_image_sizes_are_float32_under_autocast(kind, dtype, device, monkeypatch):
    """Under autocast every SMCA transformer gets the exact image sizes (1333, 2049) in float32 and
    computes its Gaussian prior (heads, centres, distances) exactly as the float32 computation."""
    tr, feats, masks = _smca_transformer(kind, device)
    layer_cls, method = SMCADecoderLayer, "prior"
    real = getattr(layer_cls, method)
    calls = []

    def spy(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        # copies: the layer masks the fresh bias in place afterwards
        calls.append((self, args, kwargs, tuple(None if r is None else r.clone() for r in result)))
        return result

    monkeypatch.setattr(layer_cls, method, spy)
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        out = tr(feats, masks, IMAGE_SIZES)
    assert torch.isfinite(out.hs).all()
    assert len(calls) == 2  # one per decoder layer
    exact_wh = torch.tensor([[w, h] for h, w in IMAGE_SIZES], dtype=torch.float32, device=device)
    for layer, (x, ref, wh, *rest), kwargs, (bias, new_ref, logit) in calls:
        assert wh.dtype == torch.float32 and torch.equal(wh, exact_wh)
        assert bias.dtype == torch.float32 and new_ref.dtype == torch.float32
        # the same prior, computed outside autocast from the float32 inputs, is identical
        with torch.no_grad():
            expect_bias, expect_ref, _ = real(layer, x.float(), None if ref is None else ref.float(), exact_wh,
                                              *rest, **kwargs)
        assert torch.equal(bias, expect_bias) and torch.equal(new_ref, expect_ref)


# ------------------------------------------------------------------ GradScaler + clipping
def _clip_cfg(clip_type, fused):
    from smca_detr.config import add_smca_detr_config as add_cfg

    cfg = add_cfg(get_cfg())
    cfg.merge_from_list(["SOLVER.OPTIMIZER", "ADAMW", "SOLVER.BASE_LR", "0.5", "SOLVER.WEIGHT_DECAY", "0.0",
                         "SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", clip_type,
                         "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.1", "SOLVER.FUSED_OPTIMIZER", str(fused)])
    return cfg


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip_type", ["value", "norm", "full_model"])
def test_every_clip_type_clips_unscaled_gradients_with_fused_adamw_and_gradscaler(clip_type, device):
    """fp16 training: GradScaler.step must unscale before the clipping for every clip type, also for
    the fused AdamW (which would otherwise unscale inside its kernel, after clipping x 2^16 gradients).
    Fused and loop AdamW under a GradScaler, and the loop without a scaler, make the same update and
    leave the same clipped gradients."""
    from smca_detr.engine import build_optimizer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).to(device)
    x = torch.randn(16, 4).to(device) * 10
    results = {}
    for name, fused, scaled in (("fused", True, True), ("loop", False, True), ("plain", False, False)):
        model = copy.deepcopy(net)
        opt = build_optimizer(_clip_cfg(clip_type, fused), model)
        assert bool(opt.defaults.get("fused")) == fused
        for group in opt.param_groups:
            group["eps"] = 1.0  # the update then depends on the gradient's magnitude, not only its sign
        loss = model(x).pow(2).sum()
        if scaled:
            scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 16)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        results[name] = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]
    for p, g in (pg for pairs in results.values() for pg in pairs):
        assert g.abs().max() <= 0.1 + 1e-6 if clip_type == "value" else g.norm() <= 0.1 + 1e-6
    for other in ("loop", "plain"):
        for (p, g), (q, h) in zip(results["fused"], results[other]):
            torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # the step was large enough to see a wrong clip (x 2^-16 gradients would barely move)
    assert all((p - q).abs().max() > 1e-3 for (p, _), q in zip(results["fused"], net.parameters()))


# ------------------------------------------------------------------ fp16 attention masks
def test_fp16_attention_mask_stays_finite_where_keys_are_valid():
    """A float32 Gaussian prior cast to fp16 clamps instead of overflowing to -inf: a query whose
    Gaussian is far from every key (bias < -65504 everywhere) gets finite logits, not a row of -inf
    (NaN after the softmax); padded keys stay -inf; in float32 the mask is unchanged."""
    from smca_detr.modeling.blocks import MultiheadAttention, make_attn_mask
    from smca_detr.modeling.transformers.smca import mask_padded_keys

    g = torch.Generator().manual_seed(0)
    b, m, q, s, d = 2, 2, 3, 6, 8
    bias = -10 * torch.rand(b, m, q, s, generator=g)
    bias[0, :, 1] = -torch.linspace(7e4, 9e4, s)  # past fp16's range on every key
    bias[1, 0, 2] = -1e30
    pad = torch.zeros(b, s, dtype=torch.bool)
    pad[1, -2:] = True
    full = mask_padded_keys(bias, pad)  # SMCA: -inf at padded keys inside the bias
    padded = pad[:, None, None, :].expand_as(full)
    for mask in (make_attn_mask(None, full, torch.float16), make_attn_mask(pad, bias, torch.float16)):
        assert mask.dtype == torch.float16
        assert torch.isfinite(mask[~padded]).all() and (mask[padded] == float("-inf")).all()
    assert torch.equal(make_attn_mask(None, full, torch.float32), full)
    assert torch.equal(make_attn_mask(pad, bias, torch.float32), full)

    torch.manual_seed(0)
    attn = MultiheadAttention(d, m).half().eval()
    x = torch.randn(b, q, d, generator=g).half()
    mem = torch.randn(b, s, d, generator=g).half()
    with torch.no_grad():
        fused, _ = attn(x, mem, mem, attn_bias=full)
        explicit, weights = attn(x, mem, mem, attn_bias=full, need_weights=True)
    assert torch.isfinite(fused).all() and torch.isfinite(explicit).all()
    assert (weights[padded] == 0).all()


# ------------------------------------------------------------------ losses and train steps under autocast


def _autocast_works(dtype):
    try:
        with torch.autocast("cpu", dtype=dtype):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype
    except RuntimeError:
        return False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("focal", [False, True], ids=["softmax", "focal"])
def test_losses_are_float32_under_autocast(dtype, focal):
    if not _autocast_works(dtype):
        pytest.skip(f"CPU autocast to {dtype} not supported by this torch")
    nl = NUM_CLASSES if focal else NUM_CLASSES + 1
    crit = SetCriterion(matcher=HungarianMatcher(cost_class=2, focal=focal), num_logits=nl,
                        class_loss="focal" if focal else "softmax")
    g = torch.Generator().manual_seed(0)
    out = {"pred_logits": torch.randn(2, 2, 5, nl, generator=g).to(dtype),
           "pred_boxes": (torch.rand(2, 2, 5, 4, generator=g) * 0.4 + 0.3).to(dtype)}
    if focal:
        out["enc_outputs"] = {"pred_logits": torch.randn(2, 7, nl, generator=g).to(dtype),
                              "pred_boxes": (torch.rand(2, 7, 4, generator=g) * 0.4 + 0.3).to(dtype)}
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.2, 0.2]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.4, 0.3, 0.3]])}]
    with torch.autocast("cpu", dtype=dtype):
        losses, _ = crit.compute(out, targets)
        weighted = crit(out, targets)
    ref, _ = crit.compute({k: ({kk: vv.float() for kk, vv in v.items()} if isinstance(v, dict) else v.float())
                           for k, v in out.items()}, targets)
    assert set(losses) == set(ref) and len(weighted) >= 6
    for name, value in list(losses.items()) + list(weighted.items()):
        assert value.dtype == torch.float32 and torch.isfinite(value), name
    for name, value in losses.items():
        torch.testing.assert_close(value, ref[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_train_step_for_every_model_family(family):
    name = family.split("/")[0]
    if name not in TRANSFORMER_REGISTRY:
        pytest.skip(f"{name} is not registered (yet)")
    cfg = make_cfg(["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "bfloat16"], family=family)
    model = build(cfg)
    loop = TrainLoop(model, iter([_batch([(64, 64), (64, 48)], [2, 1])]), build_optimizer(cfg, model),
                     precision=torch.bfloat16)
    seen = {}

    def heads_hook(module, inputs, out):
        seen.setdefault("heads", out[0].dtype)

    def linear_hook(module, inputs, out):
        seen.setdefault("head_linear", out.dtype)

    model.heads.register_forward_hook(heads_hook)
    next(m for m in model.heads.modules() if isinstance(m, torch.nn.Linear)).register_forward_hook(linear_hook)
    criterion_forward = model.criterion.forward

    def spy(outputs, targets):
        seen["autocast_in_criterion"] = _autocast_on()
        losses = criterion_forward(outputs, targets)
        seen["losses"] = {k: v.dtype for k, v in losses.items()}
        return losses

    model.criterion.forward = spy
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    with EventStorage(0) as storage:
        loop.iter = 0
        loop.run_step()
        total = storage.latest()["total_loss"][0]
    assert np.isfinite(total) and total > 0
    assert seen["head_linear"] == torch.bfloat16  # the network ran under bf16 autocast ...
    assert seen["heads"] == torch.float32  # (logits and boxes leave the heads in float32)
    assert seen["autocast_in_criterion"]  # ... and the criterion was called inside it
    assert seen["losses"] and set(seen["losses"].values()) == {torch.float32}, seen["losses"]
    after = [p for p in model.parameters() if p.requires_grad]
    assert all(torch.isfinite(p).all() for p in after)
    assert sum(not torch.equal(a, b) for a, b in zip(before, after)) > len(after) // 2
