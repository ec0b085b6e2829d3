"""Behaviour of the multi-scale SMCA transformers: the paper's model (``SMCAMultiScaleTransformer``)
and the official "new multi-scale" model (``SMCAConvMultiScaleTransformer``; numerical parity in
test_parity_smca_multiscale.py).

Checked here: the batched segment-wise softmax, padded positions never receiving attention,
scale-selection weights α weighting each scale's co-attention output, the single-softmax "w/o SSA"
mode, the per-level Gaussian of the paper model, no cross-image leakage in a batch, encoder-layout
validation, and for both shipped configs: load, build and one CPU training step with gradients
reaching every trainable parameter.
"""
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from smca_detr.config import add_smca_detr_config
from smca_detr.modeling.backbone import image_padding_mask, resize_mask
from smca_detr.modeling.blocks import segment_softmax
from smca_detr.modeling.transformers.smca import mask_padded_keys
from smca_detr.modeling.transformers.smca_conv_multiscale import SMCAConvMultiScaleTransformer
from smca_detr.modeling.transformers.smca_multiscale import SMCAMultiScaleTransformer

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PADDED = (96, 128)
SIZES = [(96, 128), (30, 60)]  # image 1 is padded on both axes at every level (incl. stride 64)


def small_cfg(transformer, **smca):
    cfg = add_smca_detr_config(get_cfg())
    m = cfg.MODEL.SMCA_DETR
    m.TRANSFORMER = transformer
    m.HIDDEN_DIM, m.NHEADS, m.DIM_FEEDFORWARD = 32, 4, 48
    m.ENC_LAYERS, m.DEC_LAYERS, m.NUM_QUERIES = 3, 2, 7
    m.DROPOUT = 0.0
    m.SMCA.ENCODER_LAYOUT = ["intra", "multi", "intra"]
    for k, v in smca.items():
        m.SMCA[k] = v
    return cfg


# levels (channels, stride) given to each transformer
PAPER_LEVELS = [ShapeSpec(channels=12, stride=16), ShapeSpec(channels=20, stride=32)]
CONV_LEVELS = [ShapeSpec(channels=8, stride=8), ShapeSpec(channels=12, stride=16), ShapeSpec(channels=20, stride=32)]


def build(kind, **smca):
    torch.manual_seed(0)
    if kind == "conv":
        tr = SMCAConvMultiScaleTransformer(small_cfg("SMCAConvMultiScaleTransformer", **smca), CONV_LEVELS)
    else:
        tr = SMCAMultiScaleTransformer(small_cfg("SMCAMultiScaleTransformer", **smca), PAPER_LEVELS)
    _randomize(tr)
    return tr.double().eval()


def _randomize(module):
    """Non-trivial values everywhere (zero/one-initialised heads would hide mistakes)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def inputs(levels, batch_sizes=SIZES, seed=2):
    g = torch.Generator().manual_seed(seed)
    mask = image_padding_mask(batch_sizes, PADDED)
    feats, masks = [], []
    for s in levels:
        h, w = PADDED[0] // s.stride, PADDED[1] // s.stride
        feats.append(torch.randn(len(batch_sizes), s.channels, h, w, generator=g, dtype=torch.float64))
        masks.append(resize_mask(mask, (h, w)))
    return feats, masks, list(batch_sizes)


KINDS = [("paper", {}), ("paper", {"SCALE_SELECTION": False}), ("conv", {})]
KIND_IDS = ["paper", "paper-no-ssa", "conv"]


# ------------------------------------------------------------------ segment softmax
def _reference_segment_softmax(logits, sizes, weights):
    parts = [p.softmax(-1) * weights[..., i:i + 1] for i, p in enumerate(logits.split(sizes, -1))]
    return torch.cat(parts, -1)


def test_segment_softmax_matches_per_segment_softmax_and_gradients():
    g = torch.Generator().manual_seed(0)
    sizes = [5, 3, 4]
    logits = torch.randn(2, 3, 4, sum(sizes), generator=g, dtype=torch.float64) * 5
    logits[0, :, :, 1] = float("-inf")  # a masked key
    weights = torch.randn(2, 1, 4, 3, generator=g, dtype=torch.float64).softmax(-1)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    got = segment_softmax(a, sizes, weights)
    ref = _reference_segment_softmax(b, sizes, weights)
    torch.testing.assert_close(got, ref, atol=1e-14, rtol=0)
    # per segment, the probabilities sum to that segment's weight
    sums = torch.stack([p.sum(-1) for p in got.split(sizes, -1)], -1)
    torch.testing.assert_close(sums, weights.expand_as(sums), atol=1e-14, rtol=0)
    up = torch.randn(got.shape, generator=g, dtype=torch.float64)
    (got * up).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=0)
    # no weights: plain per-segment softmax
    torch.testing.assert_close(segment_softmax(logits, sizes), _reference_segment_softmax(
        logits, sizes, torch.ones(1, 1, 1, 3, dtype=torch.float64)), atol=1e-14, rtol=0)


def test_segment_softmax_fully_masked_segment_gives_zeros_not_nan():
    logits = torch.randn(1, 1, 2, 6, dtype=torch.float64)
    logits[..., 2:4] = float("-inf")
    x = logits.clone().requires_grad_()
    alpha = torch.full((1, 1, 2, 3), 1 / 3, dtype=torch.float64, requires_grad=True)
    w = segment_softmax(x, [2, 2, 2], alpha)
    assert torch.isfinite(w).all()
    assert torch.equal(w[..., 2:4], torch.zeros_like(w[..., 2:4]))
    (w * torch.randn_like(w)).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(alpha.grad).all()


def _scatter_segment_softmax(logits, sizes, weights):
    """The previous implementation (scatter_reduce / scatter_add over segment ids: atomics on GPU),
    kept as the reference the slice-per-segment version must reproduce."""
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    shape = logits.shape[:-1] + (len(sizes),)
    idx = ids.expand(logits.shape)
    with torch.no_grad():
        mx = logits.new_full(shape, float("-inf")).scatter_reduce(-1, idx, logits, "amax")
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = (logits - mx.gather(-1, idx)).exp()
    den = e.new_zeros(shape).scatter_add(-1, idx, e)
    den = torch.where(den > 0, den, torch.ones_like(den))
    return e * (weights / den).gather(-1, idx)


def test_segment_softmax_equals_the_scatter_implementation():
    """Float64, with masked keys and a fully masked segment: values and gradients as before."""
    g = torch.Generator().manual_seed(3)
    sizes = [6, 4, 1, 3]
    logits = torch.randn(2, 3, 5, sum(sizes), generator=g, dtype=torch.float64) * 4
    logits[0, :, :, 2] = float("-inf")
    logits[1, 1, :, 6:10] = float("-inf")  # segment 1 fully masked for one head
    weights = torch.randn(2, 1, 5, 4, generator=g, dtype=torch.float64).softmax(-1)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    wa, wb = weights.clone().requires_grad_(), weights.clone().requires_grad_()
    got, ref = segment_softmax(a, sizes, wa), _scatter_segment_softmax(b, sizes, wb)
    torch.testing.assert_close(got, ref, atol=1e-15, rtol=1e-15)
    assert torch.equal(got[1, 1, :, 6:10], torch.zeros_like(got[1, 1, :, 6:10]))
    up = torch.randn(got.shape, generator=g, dtype=torch.float64)
    (got * up).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(wa.grad, wb.grad, atol=1e-14, rtol=1e-14)
    with pytest.raises(ValueError, match="segment sizes"):
        segment_softmax(logits, [6, 4, 1])
    # no scatter (atomics on GPU, non-deterministic) in the forward or the backward
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpNames(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with OpNames() as ops:
        segment_softmax(a, sizes, wa).sum().backward()
    assert ops.names and not [n for n in ops.names if "scatter" in n or "index_put" in n]


# ------------------------------------------------------------------ padding
def _decoder_inputs(tr, feats, masks, sizes):
    """Random memory / positions in the layout the decoder of ``tr`` expects, with its mask."""
    g = torch.Generator().manual_seed(5)
    all_masks = list(masks) + [resize_mask(masks[-1], ((masks[-1].shape[1] + 1) // 2, (masks[-1].shape[2] + 1) // 2))]
    shapes = [tuple(m.shape[-2:]) for m in all_masks]
    segments = tr.segments(shapes)
    if isinstance(tr, SMCAConvMultiScaleTransformer):
        seg_masks = [all_masks[1]] + all_masks[1:]
    else:
        seg_masks = all_masks
    mask = torch.cat([m.flatten(1) for m in seg_masks], 1)
    b, s, d = mask.shape[0], mask.shape[1], tr.d_model
    memory = torch.randn(b, s, d, generator=g, dtype=torch.float64)
    pos = torch.randn(b, s, d, generator=g, dtype=torch.float64)
    qpos = tr.query_embed.weight[None].expand(b, -1, -1)
    wh = torch.tensor([[w, h] for h, w in sizes], dtype=torch.float64)
    return memory, pos, qpos, mask, wh, segments


@pytest.mark.parametrize("kind,smca", KINDS, ids=KIND_IDS)
def test_padded_memory_positions_never_receive_attention(kind, smca):
    """Decoder: changing memory / positions at padded keys changes nothing."""
    tr = build(kind, **smca)
    levels = CONV_LEVELS if kind == "conv" else PAPER_LEVELS
    feats, masks, sizes = inputs(levels)
    memory, pos, qpos, mask, wh, segments = _decoder_inputs(tr, feats, masks, sizes)
    assert mask[1].any() and not mask[0].any()
    tgt = torch.zeros_like(qpos)
    with torch.no_grad():
        hs, _ = tr.decoder(tgt, memory, pos, qpos, mask, image_wh=wh, segments=segments)
        noise = 100 * torch.randn_like(memory) * mask[..., None]
        hs2, _ = tr.decoder(tgt, memory + noise, pos - noise, qpos, mask, image_wh=wh, segments=segments)
        # the same change at valid keys does change the output (the check can fail)
        hs3, _ = tr.decoder(tgt, memory + noise.flip(0), pos, qpos, mask, image_wh=wh, segments=segments)
    torch.testing.assert_close(hs2, hs, atol=1e-10, rtol=0)
    assert (hs3[:, 0] - hs[:, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("ssa", [True, False])
def test_paper_padded_features_never_reach_valid_outputs(ssa):
    """Paper model, encoder + decoder: perturbing the projected features at padded positions of every
    level does not change any output (intra, multi and cross-attention all mask padded keys)."""
    tr = build("paper", SCALE_SELECTION=ssa)
    feats, masks, sizes = inputs(PAPER_LEVELS)
    with torch.no_grad():
        srcs, lmasks, pos = tr.embed(feats, masks)
        assert all(m[1].any() for m in lmasks) and len(lmasks) == 3
        out = tr.forward_embedded(srcs, lmasks, pos, sizes).hs
        noisy = [s + 50 * torch.randn_like(s) * m[:, None] for s, m in zip(srcs, lmasks)]
        out2 = tr.forward_embedded(noisy, lmasks, pos, sizes).hs
        valid_noise = [s + 50 * torch.randn_like(s) * (~m[:, None]) for s, m in zip(srcs, lmasks)]
        out3 = tr.forward_embedded(valid_noise, lmasks, pos, sizes).hs
    torch.testing.assert_close(out2, out, atol=1e-10, rtol=0)
    assert (out3 - out).abs().max() > 1e-3


# ------------------------------------------------------------------ scale selection
@pytest.mark.parametrize("kind", ["paper", "conv"])
def test_each_scale_output_is_weighted_by_alpha(kind):
    """With α fixed through point4 (weight 0, bias log α), the layer's co-attention equals
    Σ_s α_s · (plain attention over scale s alone, with its Gaussian)."""
    tr = build(kind)
    levels = CONV_LEVELS if kind == "conv" else PAPER_LEVELS
    feats, masks, sizes = inputs(levels)
    memory, pos, qpos, mask, wh, segments = _decoder_inputs(tr, feats, masks, sizes)
    layer = tr.decoder.layers[0]
    p = len(segments)
    alpha_ref = torch.linspace(1, 2, p, dtype=torch.float64) ** 3
    alpha_ref = alpha_ref / alpha_ref.sum()
    with torch.no_grad():
        layer.point4.weight.zero_()
        layer.point4.bias.copy_(alpha_ref.log())
        x = torch.randn_like(qpos)
        out = layer.norm4(x + qpos)
        alpha = layer.scale_weights(out)
        torch.testing.assert_close(alpha, alpha_ref.expand_as(alpha), atol=1e-14, rtol=0)
        bias, _, _ = layer.prior(out, None, wh, segments)
        attn_mask = mask_padded_keys(bias, mask)
        got = layer.cross_attention(x + qpos, memory + pos, memory, attn_mask=attn_mask, alpha=alpha, segments=segments)
        expected = torch.zeros_like(got)
        start = 0
        for i, seg in enumerate(segments):
            sl = slice(start, start + seg.size)
            start += seg.size
            o_s, _ = layer.multihead_attn(x + qpos, memory[:, sl] + pos[:, sl], memory[:, sl],
                                          attn_bias=attn_mask[..., sl])
            expected += alpha_ref[i] * o_s
        # one softmax over everything would be a different (wrong) answer
        joint, _ = layer.multihead_attn(x + qpos, memory + pos, memory, attn_bias=attn_mask)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    assert (joint - expected).abs().max() > 1e-3


@pytest.mark.parametrize("ssa", [True, False])
def test_recorded_attention_weights_per_scale(ssa):
    """SSA: the probabilities of scale s sum to α_s (per image and query, from that image's own
    point4); w/o SSA: one softmax over all scales, no point4."""
    tr = build("paper", SCALE_SELECTION=ssa)
    feats, masks, sizes = inputs(PAPER_LEVELS)
    tr.record_intermediates = True
    with torch.no_grad():
        ex = tr(feats, masks, sizes).extras
    w = ex["dec.1.cross_attn_weights"]  # [B,M,Q,S]
    seg_sizes = [m.flatten(1).shape[1] for m in ex["masks"]]
    sums = torch.stack([p.sum(-1) for p in w.split(seg_sizes, -1)], -1)  # [B,M,Q,P]
    assert torch.equal(w.masked_select(ex["memory_mask"][:, None, None, :].expand_as(w)),
                       torch.zeros(int(ex["memory_mask"].sum()) * w.shape[1] * w.shape[2], dtype=w.dtype))
    if ssa:
        alpha = ex["dec.1.scale_attention"]  # [B,Q,P]
        torch.testing.assert_close(sums, alpha[:, None].expand_as(sums), atol=1e-12, rtol=0)
        assert (alpha[0] - alpha[1]).abs().max() > 1e-6  # per image
        assert all(layer.point4 is not None for layer in tr.decoder.layers)
    else:
        torch.testing.assert_close(sums.sum(-1), torch.ones_like(sums[..., 0]), atol=1e-12, rtol=0)
        assert all(layer.point4 is None for layer in tr.decoder.layers)
        assert "dec.1.scale_attention" not in ex


def test_paper_gaussian_is_one_image_space_gaussian_per_level():
    """Paper model: on level l (stride s_l) the bias is the single-scale Gaussian in stride-32 units
    evaluated at the level's grid (x·s_l/32, y·s_l/32)."""
    tr = build("paper")
    feats, masks, sizes = inputs(PAPER_LEVELS)
    tr.record_intermediates = True
    with torch.no_grad():
        ex = tr(feats, masks, sizes).extras
    b, q = feats[0].shape[0], tr.query_embed.weight.shape[0]
    m = tr.decoder.layers[0].num_gaussians
    wh = torch.tensor([[w, h] for h, w in sizes], dtype=torch.float64)
    centre = (wh[:, None] * ex["ref_logits"].sigmoid() / 32)[:, :, None] + ex["dec.1.offsets"].view(b, q, m, 2)
    sc = ex["dec.1.scale_raw"].view(b, q, m, 2).square()
    beta = tr.decoder.layers[0].smooth
    got = ex["dec.1.gaussian"]  # [B,M,Q,S]
    start = 0
    assert tr.strides == [16, 32, 64]
    for lvl, st in zip(ex["masks"], tr.strides):
        h, w = lvl.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64) * st / 32,
                                torch.arange(w, dtype=torch.float64) * st / 32, indexing="ij")
        dx = xs.flatten() - centre[..., 0:1]  # [B,Q,M,HW]
        dy = ys.flatten() - centre[..., 1:2]
        ref = -(sc[..., 0:1] * dx ** 2 + sc[..., 1:2] * dy ** 2) / beta
        torch.testing.assert_close(got[..., start:start + h * w], ref.permute(0, 2, 1, 3), atol=1e-10, rtol=1e-10)
        start += h * w
    assert start == got.shape[-1]


# ------------------------------------------------------------------ batch independence
@pytest.mark.parametrize("kind,smca", KINDS, ids=KIND_IDS)
def test_batch_of_two_equals_each_image_alone(kind, smca):
    tr = build(kind, **smca)
    levels = CONV_LEVELS if kind == "conv" else PAPER_LEVELS
    feats, masks, sizes = inputs(levels)
    with torch.no_grad():
        both = tr(feats, masks, sizes)
        for i in range(2):
            one = tr([f[i:i + 1] for f in feats], [m[i:i + 1] for m in masks], sizes[i:i + 1])
            torch.testing.assert_close(one.hs[:, 0], both.hs[:, i], atol=1e-10, rtol=0)
            torch.testing.assert_close(one.references[:, 0], both.references[:, i], atol=1e-10, rtol=0)
    # the two images really differ (sizes enter the Gaussian centres)
    assert (both.hs[:, 0] - both.hs[:, 1]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["paper", "conv"])
@pytest.mark.parametrize("dynamic_scale,head_shared", [("type1", False), ("type2", False), ("type4", False),
                                                        ("type3", True)])
def test_gaussian_variants_build_and_run(kind, dynamic_scale, head_shared):
    """Every DYNAMIC_SCALE type and the head-shared Gaussian: head sizes and finite outputs."""
    tr = build(kind, DYNAMIC_SCALE=dynamic_scale, HEAD_SHARED=head_shared)
    levels = CONV_LEVELS if kind == "conv" else PAPER_LEVELS
    feats, masks, sizes = inputs(levels)
    k = {"type1": 0, "type2": 1, "type3": 2, "type4": 3}[dynamic_scale]
    g = 1 if head_shared else 4
    groups = 4 if kind == "conv" else 1  # the official model predicts one block per memory segment
    layer = tr.decoder.layers[1]
    assert layer.point2.out_features == 2 * g * groups
    assert (layer.point3 is None) if k == 0 else layer.point3.out_features == k * g * groups
    with torch.no_grad():
        out = tr(feats, masks, sizes)
    assert out.hs.shape == (2, 2, 7, 32) and torch.isfinite(out.hs).all()


def test_pre_norm_paper_model_runs_and_conv_model_refuses_it():
    cfg = small_cfg("SMCAMultiScaleTransformer")
    cfg.MODEL.SMCA_DETR.PRE_NORM = True
    tr = SMCAMultiScaleTransformer(cfg, PAPER_LEVELS).double().eval()
    assert tr.encoder.norm is not None
    feats, masks, sizes = inputs(PAPER_LEVELS)
    with torch.no_grad():
        assert torch.isfinite(tr(feats, masks, sizes).hs).all()
    cfg = small_cfg("SMCAConvMultiScaleTransformer")
    cfg.MODEL.SMCA_DETR.PRE_NORM = True
    with pytest.raises(ValueError, match="PRE_NORM"):
        SMCAConvMultiScaleTransformer(cfg, CONV_LEVELS)


# ------------------------------------------------------------------ config validation
@pytest.mark.parametrize("layout,enc_layers,match", [
    (["intra", "cross", "intra"], 3, r"MODEL\.SMCA_DETR\.SMCA\.ENCODER_LAYOUT.*'cross'"),
    (["intra", "multi"], 3, r"MODEL\.SMCA_DETR\.SMCA\.ENCODER_LAYOUT.*MODEL\.SMCA_DETR\.ENC_LAYERS"),
])
def test_encoder_layout_is_validated_naming_the_key(layout, enc_layers, match):
    cfg = small_cfg("SMCAMultiScaleTransformer", ENCODER_LAYOUT=layout)
    cfg.MODEL.SMCA_DETR.ENC_LAYERS = enc_layers
    with pytest.raises(ValueError, match=match):
        SMCAMultiScaleTransformer(cfg, PAPER_LEVELS)


def test_encoder_layout_builds_intra_and_multi_layers():
    cfg = small_cfg("SMCAMultiScaleTransformer", ENCODER_LAYOUT="Intra, multi, intra")
    tr = SMCAMultiScaleTransformer(cfg, PAPER_LEVELS)
    assert tr.encoder.layout == ["intra", "multi", "intra"] and len(tr.encoder.layers) == 3


def test_intra_layers_keep_scales_separate():
    """An all-intra encoder never mixes scales: changing one level leaves the others' memory
    unchanged; one multi layer mixes them."""
    outs = {}
    for layout in (["intra", "intra", "intra"], ["intra", "multi", "intra"]):
        tr = build("paper", ENCODER_LAYOUT=layout)
        tr.record_intermediates = True
        feats, masks, sizes = inputs(PAPER_LEVELS)
        with torch.no_grad():
            a = tr(feats, masks, sizes).extras
            feats[1] = feats[1] + 1.0  # changes level 1 and the extra level (made from it), not level 0
            b = tr(feats, masks, sizes).extras
        n0 = a["masks"][0].flatten(1).shape[1]
        outs[layout[1]] = (a["memory"][:, :n0] - b["memory"][:, :n0]).abs().max()
    assert outs["intra"] == 0
    assert outs["multi"] > 1e-3


# ------------------------------------------------------------------ shipped configs: build + train step
SHRINK = ["MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
          "MODEL.SMCA_DETR.HIDDEN_DIM", 32, "MODEL.SMCA_DETR.NHEADS", 4, "MODEL.SMCA_DETR.DIM_FEEDFORWARD", 32,
          "MODEL.SMCA_DETR.ENC_LAYERS", 2, "MODEL.SMCA_DETR.DEC_LAYERS", 2, "MODEL.SMCA_DETR.NUM_QUERIES", 8,
          "MODEL.SMCA_DETR.NUM_CLASSES", 5, "MODEL.DEVICE", "cpu"]


@pytest.mark.parametrize("name,transformer,extra", [
    ("smca_r50_ms.yaml", "SMCAMultiScaleTransformer", ["MODEL.SMCA_DETR.SMCA.ENCODER_LAYOUT", ["intra", "multi"]]),
    ("smca_r50_conv_ms.yaml", "SMCAConvMultiScaleTransformer", []),
])
def test_config_builds_and_trains_one_step(name, transformer, extra):
    cfg = add_smca_detr_config(get_cfg())
    cfg.merge_from_file(str(CONFIG_DIR / name))
    m = cfg.MODEL.SMCA_DETR
    assert m.TRANSFORMER == transformer and m.CLASS_LOSS == "focal" and m.NUM_QUERIES == 300
    assert m.DIM_FEEDFORWARD == 1024 and m.ENC_LAYERS == 5 and m.DEC_LAYERS == 6
    if transformer == "SMCAMultiScaleTransformer":
        assert list(m.SMCA.ENCODER_LAYOUT) == ["intra", "intra", "multi", "intra", "intra"]
        assert list(m.IN_FEATURES) == ["res4", "res5"] and m.SMCA.SCALE_SELECTION
    else:
        assert list(m.IN_FEATURES) == ["res3", "res4", "res5"]
    cfg.merge_from_list(SHRINK + extra)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert type(model.transformer).__name__ == transformer
    model.train()
    g = torch.Generator().manual_seed(0)
    batch = []
    for h, w in [(64, 64), (48, 64)]:
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 40.0, 30.0], [10.0, 12.0, 30.0, 44.0]]))
        inst.gt_classes = torch.tensor([1, 3])
        batch.append({"image": torch.rand(3, h, w, generator=g) * 255, "instances": inst, "height": h, "width": w})
    losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total) and {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0"} <= set(losses)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    opt.zero_grad()
    total.backward()
    # Decoder layer 0 self-attends over tgt = 0 (DETR/SMCA design): its value/output projections and
    # norm1 scale see zero inputs, so their gradient is structurally zero (as in the official code).
    dead = {f"transformer.decoder.layers.0.{k}" for k in
            ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "norm1.weight")}
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (
        p.grad is None or not torch.isfinite(p.grad).all() or (p.grad.abs().sum() == 0 and n not in dead))]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    assert all(model.get_parameter(n).grad is not None for n in dead)
    before = model.transformer.level_embed.detach().clone()
    opt.step()
    assert not torch.equal(before, model.transformer.level_embed)
    model.eval()
    with torch.no_grad():
        res = model([{"image": b["image"], "height": b["height"], "width": b["width"]} for b in batch])
    k = min(m.TEST_TOPK, m.NUM_QUERIES * m.NUM_CLASSES)
    assert len(res) == 2 and all(len(r["instances"]) == k for r in res)
