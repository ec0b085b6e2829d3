"""SMCA-DETR single scale: the Gaussian helper, the transformer, its configs, training steps and the
official-checkpoint converter (parity with the official code is in test_parity_smca.py)."""
import argparse
import math
import os
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from parity_common import load_fixture, parity_dir
from smca_detr.checkpoint import coco_official_columns, safe_torch_load
from smca_detr.checkpoint.smca import convert_official_smca, detect_smca_kind
from smca_detr.config import add_smca_detr_config
from smca_detr.modeling.blocks import MultiheadAttention
from smca_detr.modeling.transformers.smca import (SCALE_CHANNELS, SMCATransformer, mask_padded_keys,
                                                  smca_gaussian_bias)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py
CONFIG_DIR = REPO / "configs"
KEYS_NAME = "smca_official_keys_single_scale_r50_type3.txt"

# Small widths so that every config trains a step in well under a second; depth, dilation, queries
# layout, losses and the SMCA settings stay those of the config.
SHRINK = [
    "MODEL.WEIGHTS", "",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", 4, "MODEL.RESNETS.RES2_OUT_CHANNELS", 16,
    "MODEL.RESNETS.WIDTH_PER_GROUP", 4,
    "MODEL.SMCA_DETR.HIDDEN_DIM", 32, "MODEL.SMCA_DETR.NHEADS", 4, "MODEL.SMCA_DETR.DIM_FEEDFORWARD", 64,
    "MODEL.SMCA_DETR.ENC_LAYERS", 1, "MODEL.SMCA_DETR.DEC_LAYERS", 2, "MODEL.SMCA_DETR.NUM_QUERIES", 12,
]


def load_cfg(path, opts=()):
    cfg = add_smca_detr_config(get_cfg())
    cfg.merge_from_file(str(path))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _smca_configs():
    out = []
    for p in sorted(CONFIG_DIR.glob("*.yaml")):
        if p.name.startswith("Base-"):
            continue
        if load_cfg(p).MODEL.SMCA_DETR.TRANSFORMER == "SMCATransformer":
            out.append(p)
    return out


SMCA_CONFIGS = _smca_configs()
CONFIG_IDS = [p.name for p in SMCA_CONFIGS]


def batched_inputs(sizes=((64, 96), (96, 64)), n_boxes=(3, 1), num_classes=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for (h, w), n in zip(sizes, n_boxes):
        img = torch.rand(3, h, w, generator=g) * 255
        inst = Instances((h, w))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = (torch.rand(n, 2, generator=g) * 0.3 + 0.1) * torch.tensor([w, h])
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
        out.append({"image": img, "instances": inst, "height": h, "width": w})
    return out


def train_step(model, inputs):
    """forward + loss + backward + AdamW step; returns (losses, gradients of the SMCA heads)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    losses = model(inputs)
    total = sum(losses.values())
    opt.zero_grad()
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if ".point" in n and p.grad is not None}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".point" in n}
    torch.nn.utils.clip_grad_norm_(params, 0.1)
    opt.step()
    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    return losses, grads, changed


def assert_smca_heads_trained(model, grads, changed):
    layers = model.transformer.decoder.layers
    for i, layer in enumerate(layers):
        names = [f"transformer.decoder.layers.{i}.point2.weight"]
        if i == 0:
            names += [f"transformer.decoder.layers.0.point1.layers.{j}.weight" for j in range(len(layer.point1.layers))]
        if layer.point3 is not None:
            names.append(f"transformer.decoder.layers.{i}.point3.weight")
        for n in names:
            assert n in grads and torch.isfinite(grads[n]).all() and grads[n].abs().sum() > 0, n
            assert n in changed, n
        if i > 0:
            assert layer.point1 is None


# ------------------------------------------------------------------ Gaussian helper


def _naive_bias(centers, scales, h, w, kind, smooth, factor=1.0):
    """Element by element, straight from the paper / official formula."""
    b, q, g, _ = centers.shape
    out = torch.empty(b, g, q, h * w, dtype=torch.float64)
    for bi in range(b):
        for gi in range(g):
            for qi in range(q):
                cx, cy = centers[bi, qi, gi].tolist()
                s = [v * v for v in scales[bi, qi, gi].tolist()] if scales is not None else []
                for y in range(h):
                    for x in range(w):
                        dx2, dy2 = (x - cx) ** 2, (y - cy) ** 2
                        d = {"type1": lambda: dx2 + dy2,
                             "type2": lambda: s[0] * (dx2 + dy2),
                             "type3": lambda: s[0] * dx2 + s[1] * dy2,
                             "type4": lambda: s[0] * dx2 + s[1] * dy2 + s[2] * dx2 * dy2}[kind]()
                        out[bi, gi, qi, y * w + x] = -abs(d * factor) / smooth
    return out


@pytest.mark.parametrize("kind", sorted(SCALE_CHANNELS))
@pytest.mark.parametrize("g,factor", [(3, 1.0), (1, 0.5)])
def test_gaussian_bias_matches_formula(kind, g, factor):
    torch.manual_seed(0)
    b, q, h, w = 2, 3, 4, 5
    centers = torch.rand(b, q, g, 2, dtype=torch.float64) * torch.tensor([w, h]) + 0.3
    k = SCALE_CHANNELS[kind]
    scales = torch.randn(b, q, g, k, dtype=torch.float64) if k else None
    bias = smca_gaussian_bias(centers, scales, h, w, kind, 8.0, factor)
    assert bias.shape == (b, g, q, h * w) and bias.dtype == torch.float64
    torch.testing.assert_close(bias, _naive_bias(centers, scales, h, w, kind, 8.0, factor), rtol=1e-12, atol=1e-12)
    # the prior peaks (0) at an integer centre and decays away from it
    if k == 0:
        c = torch.tensor([[[[2.0, 1.0]]]], dtype=torch.float64)
        bb = smca_gaussian_bias(c, None, h, w, kind, 8.0)[0, 0, 0].view(h, w)
        assert bb[1, 2] == 0 and (bb <= 0).all() and bb[1, 4] < bb[1, 3] < 0


def test_gaussian_bias_rejects_bad_arguments():
    c = torch.zeros(1, 2, 3, 2)
    with pytest.raises(ValueError, match="DYNAMIC_SCALE"):
        smca_gaussian_bias(c, None, 2, 2, "type9", 8.0)
    with pytest.raises(ValueError, match="scales"):
        smca_gaussian_bias(c, torch.zeros(1, 2, 3, 1), 2, 2, "type3", 8.0)
    with pytest.raises(ValueError, match="scales"):
        smca_gaussian_bias(c, None, 2, 2, "type2", 8.0)


def test_mask_padded_keys():
    bias = torch.randn(2, 3, 4, 5)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1, 3:] = True
    m = mask_padded_keys(bias, kpm)
    assert torch.isinf(m[1, :, :, 3:]).all() and (m[1, :, :, 3:] < 0).all()
    assert torch.equal(m[0], bias[0]) and torch.equal(m[1, :, :, :3], bias[1, :, :, :3])


def test_cross_attention_paths_agree_with_gradients(monkeypatch):
    """The SMCA cross-attention (additive mask through the shared kernel): the explicit path (CPU training, need_weights) and SDPA give the same
    outputs and gradients (incl. the gradient into the Gaussian, i.e. point2/point3)."""
    import torch.nn.functional as F

    from smca_detr.modeling import blocks as layers_mod

    sdpa_calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(layers_mod.F, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa_calls.append(1) or real_sdpa(*a, **k))
    torch.manual_seed(0)
    b, m, q, s, d = 2, 4, 5, 12, 32
    attn = MultiheadAttention(d, m, dropout=0.0).double()
    x = [torch.randn(b, n, d, dtype=torch.float64, requires_grad=True) for n in (q, s, s)]
    bias = torch.randn(b, m, q, s, dtype=torch.float64, requires_grad=True)
    kpm = torch.zeros(b, s, dtype=torch.bool)
    kpm[1, 9:] = True
    results = []
    for path in ("explicit", "sdpa"):
        mask = mask_padded_keys(bias * 1.0, kpm, inplace=True)
        if path == "explicit":
            out, w = attn(*x, attn_bias=mask)
            assert w is None and not sdpa_calls  # a Gaussian with a gradient on CPU: explicit softmax
        else:
            qh, kh, vh = attn.project(*x)
            out = attn.out_proj(real_sdpa(qh, kh, vh, attn_mask=mask).transpose(1, 2).flatten(2))
        grads = torch.autograd.grad(out.square().sum(), x + [bias])
        results.append((out, grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for g0, g1 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g0, g1)
    assert results[0][1][-1][1, :, :, 9:].abs().max() == 0  # no gradient into padded keys
    with torch.no_grad():
        out, w = attn(*x, attn_bias=mask_padded_keys(bias, kpm), need_weights=True)
    torch.testing.assert_close(out, results[1][0].detach())
    torch.testing.assert_close(w.sum(-1), torch.ones(b, m, q, dtype=torch.float64))
    assert (w[1, :, :, 9:] == 0).all()


# ------------------------------------------------------------------ configs, models, training


def test_smca_configs_present():
    names = {p.name for p in SMCA_CONFIGS}
    assert {"smca_r50.yaml", "smca_r50_108ep.yaml", "smca_r50_dc5.yaml", "smca_r101.yaml"} <= names


@pytest.fixture(scope="module")
def full_r50():
    """The real smca_r50 config at full size (built once, no weights)."""
    cfg = load_cfg(CONFIG_DIR / "smca_r50.yaml", ["MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def test_full_size_r50_recipe(full_r50):
    cfg, model = full_r50
    c = cfg.MODEL.SMCA_DETR
    assert isinstance(model.transformer, SMCATransformer) and model.transformer.stride == 32
    assert (c.NUM_QUERIES, c.CLASS_LOSS, c.NUM_CLASSES) == (300, "focal", 80)
    assert (c.SMCA.DYNAMIC_SCALE, c.SMCA.SMOOTH, c.SMCA.HEAD_SHARED) == ("type3", 8.0, False)
    assert (c.CLASS_WEIGHT, c.L1_WEIGHT, c.GIOU_WEIGHT, c.COST_CLASS, c.COST_BBOX, c.COST_GIOU) == (2, 5, 2, 2, 5, 2)
    s = cfg.SOLVER
    assert (s.OPTIMIZER, s.BASE_LR, s.BACKBONE_MULTIPLIER, s.WEIGHT_DECAY, s.CLIP_GRADIENTS.CLIP_VALUE,
            s.IMS_PER_BATCH) == ("ADAMW", 1e-4, 0.1, 1e-4, 0.1, 16)
    per_epoch = math.ceil(118287 / 8 / 2)
    assert s.MAX_ITER == 50 * per_epoch and s.STEPS == (40 * per_epoch,)
    layers = model.transformer.decoder.layers
    assert len(layers) == 6 and layers[0].point1 is not None and all(l.point1 is None for l in layers[1:])
    assert layers[0].point2.out_features == 16 and layers[0].point3.out_features == 16
    # official init: point3 weight 0 / bias 1; focal prior on the class bias
    assert torch.equal(layers[3].point3.weight, torch.zeros_like(layers[3].point3.weight))
    assert torch.equal(layers[3].point3.bias, torch.ones_like(layers[3].point3.bias))
    torch.testing.assert_close(model.heads.class_embed.bias, torch.full((80,), -math.log(99.0)))
    n = sum(p.numel() for p in model.parameters())
    assert 41_000_000 < n < 42_000_000, n  # official R50 single scale: 41.5M trainable + frozen stem


@pytest.mark.parametrize("path", SMCA_CONFIGS, ids=CONFIG_IDS)
def test_config_builds_and_trains_a_step(path):
    cfg = load_cfg(path, SHRINK)
    full = load_cfg(path)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.transformer.stride == (16 if full.MODEL.RESNETS.RES5_DILATION == 2 else 32)
    assert model.backbone.body.output_shape()["res5"].stride == model.transformer.stride
    inputs = batched_inputs()
    losses, grads, changed = train_step(model, inputs)
    n_layers = cfg.MODEL.SMCA_DETR.DEC_LAYERS
    assert {"loss_ce", "loss_bbox", "loss_giou", f"loss_ce_{n_layers - 2}"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert_smca_heads_trained(model, grads, changed)
    # inference through detectron2's API
    model.eval()
    with torch.no_grad():
        res = model(inputs)
    assert len(res) == 2 and len(res[0]["instances"]) == min(cfg.MODEL.SMCA_DETR.TEST_TOPK, 12 * 80)


VARIANTS = [(k, False) for k in sorted(SCALE_CHANNELS)] + [("type1", True), ("type3", True)]


@pytest.mark.parametrize("kind,head_shared", VARIANTS, ids=[f"{k}{'-head_shared' if h else ''}" for k, h in VARIANTS])
def test_dynamic_scale_and_head_shared_variants_train(kind, head_shared):
    # backbone frozen (FREEZE_AT 5) to keep this fast: only the transformer is under test here
    cfg = load_cfg(CONFIG_DIR / "smca_r50.yaml", SHRINK + [
        "MODEL.SMCA_DETR.SMCA.DYNAMIC_SCALE", kind, "MODEL.SMCA_DETR.SMCA.HEAD_SHARED", head_shared,
        "MODEL.BACKBONE.FREEZE_AT", 5, "MODEL.SMCA_DETR.DEC_LAYERS", 3])
    torch.manual_seed(1)
    model = build_model(cfg)
    g = 1 if head_shared else cfg.MODEL.SMCA_DETR.NHEADS
    k = SCALE_CHANNELS[kind]
    for layer in model.transformer.decoder.layers:
        assert layer.num_gaussians == g and layer.point2.out_features == 2 * g
        assert (layer.point3 is None) if k == 0 else (layer.point3.out_features == k * g)
    # the Gaussian really is per head (or shared): inspect the recorded bias
    model.eval()
    model.transformer.record_intermediates = True
    inputs = batched_inputs()
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        feats, masks = model.backbone(images.tensor, images.image_sizes)
        ex = model.forward_features(feats, masks, images.image_sizes)["extras"]
    model.transformer.record_intermediates = False
    bias = ex["dec.1.gaussian"]
    assert bias.shape[1] == g
    if not head_shared:
        assert not torch.equal(bias[:, 0], bias[:, 1])
    losses, grads, changed = train_step(model, inputs)
    assert all(torch.isfinite(v) for v in losses.values())
    assert_smca_heads_trained(model, grads, changed)


def _small_model(opts=()):
    cfg = load_cfg(CONFIG_DIR / "smca_r50.yaml", SHRINK + list(opts))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    # non-trivial SMCA heads (point3 starts constant)
    with torch.no_grad():
        for layer in model.transformer.decoder.layers:
            if layer.point3 is not None:
                layer.point3.weight.normal_(0, 0.05)
    return model


def _features(model, inputs):
    images = model.preprocess_image(inputs)
    feats, masks = model.backbone(images.tensor, images.image_sizes)
    return feats, masks, images.image_sizes


def test_fused_sdpa_matches_explicit_softmax_path():
    """The production path (SDPA with the additive Gaussian) equals the explicit-softmax path that
    exposes the attention weights; the weights are a softmax over unpadded keys."""
    model = _small_model()
    with torch.no_grad():
        feats, masks, sizes = _features(model, batched_inputs())
        fused = model.forward_features(feats, masks, sizes)
        model.transformer.record_intermediates = True
        naive = model.forward_features(feats, masks, sizes)
        model.transformer.record_intermediates = False
    torch.testing.assert_close(fused["pred_logits"], naive["pred_logits"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused["pred_boxes"], naive["pred_boxes"], atol=1e-5, rtol=1e-4)
    w = naive["extras"]["dec.1.cross_attn_weights"]
    kpm = naive["extras"]["mask"]
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    assert (w.masked_select(kpm[:, None, None, :].expand_as(w)) == 0).all()


def test_result_does_not_depend_on_batch_padding():
    """Image sizes come from the ImageList: an image's feature map gives the same detections alone
    and batched with a larger image (more padding, garbage in the padded features); the Gaussian
    centre uses its own unpadded (w, h) and the padded keys are masked. (The backbone itself is not
    padding-invariant near the border - FrozenBN biases make padding non-zero - so features are fed
    directly.)"""
    model = _small_model()
    c = model.transformer.input.input_proj.in_channels
    s = model.transformer.stride
    torch.manual_seed(5)
    fa = torch.randn(1, c, 2, 3)
    fb = torch.randn(2, c, 5, 4) * 3  # batch padded to 5x4 feature pixels
    fb[:1, :, :2, :3] = fa
    mb = torch.ones(2, 5, 4, dtype=torch.bool)
    mb[0, :2, :3] = False
    mb[1, :5, :4] = False
    with torch.no_grad():
        alone = model.forward_features([fa], [torch.zeros(1, 2, 3, dtype=torch.bool)], [(2 * s, 3 * s)])
        batched = model.forward_features([fb], [mb], [(2 * s, 3 * s), (5 * s, 4 * s)])
        wrong = model.forward_features([fb], [mb], [(5 * s, 4 * s), (5 * s, 4 * s)])
    torch.testing.assert_close(batched["pred_logits"][:, :1], alone["pred_logits"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched["pred_boxes"][:, :1], alone["pred_boxes"], atol=1e-5, rtol=1e-4)
    # with the padded size as "image size" the centres (and results) would change
    assert (wrong["pred_logits"][:, :1] - alone["pred_logits"]).abs().max() > 1e-3


def test_references_are_layer0_logits_for_every_layer():
    model = _small_model()
    with torch.no_grad():
        feats, masks, sizes = _features(model, batched_inputs())
        out = model.transformer(feats, masks, sizes)
        boxes = model.heads(out.hs, out.references)[1]
    ref = out.references
    assert ref.shape[:3] == out.hs.shape[:3] and ref.shape[-1] == 2
    assert all(torch.equal(ref[i], ref[0]) for i in range(ref.shape[0]))
    torch.testing.assert_close(ref[0].sigmoid(), out.extras["reference_points"])
    raw = model.heads.bbox_embed(out.hs)
    torch.testing.assert_close(boxes[..., :2], (raw[..., :2] + ref).sigmoid())
    torch.testing.assert_close(boxes[..., 2:], raw[..., 2:].sigmoid())


def test_bfloat16_autocast_keeps_the_gaussian_in_float32():
    model = _small_model()
    inputs = batched_inputs()
    model.transformer.record_intermediates = True
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ex = model.forward_features(*_features(model, inputs))["extras"]
    model.transformer.record_intermediates = False
    assert ex["dec.1.gaussian"].dtype == torch.float32 and ex["ref_centers"].dtype == torch.float32
    with torch.no_grad():
        model.transformer.record_intermediates = True
        fp32 = model.forward_features(*_features(model, inputs))["extras"]
        model.transformer.record_intermediates = False
    torch.testing.assert_close(ex["dec.0.gaussian"], fp32["dec.0.gaussian"], atol=1e-5, rtol=1e-4)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(inputs)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


def test_bad_smca_config_values_name_the_key():
    for opts, match in ((["MODEL.SMCA_DETR.SMCA.DYNAMIC_SCALE", "type5"], "DYNAMIC_SCALE"),
                        (["MODEL.SMCA_DETR.SMCA.SMOOTH", 0.0], "SMOOTH"),
                        (["MODEL.SMCA_DETR.IN_FEATURES", ["res4", "res5"],
                          "MODEL.RESNETS.OUT_FEATURES", ["res4", "res5"]], "IN_FEATURES")):
        with pytest.raises(ValueError, match=match):
            build_model(load_cfg(CONFIG_DIR / "smca_r50.yaml", SHRINK + opts))


# ------------------------------------------------------------------ converter


def _keys_listing():
    for d in (parity_dir() / "keys", REPO / "tests" / "data" / "parity" / "keys", Path("/work/shared/parity/keys")):
        if (d / KEYS_NAME).is_file():
            return d / KEYS_NAME
    pytest.skip(f"{KEYS_NAME} not found (looked in $SMCA_DETR_PARITY_DIR/keys, tests/data/parity/keys)")


def _official_zero_state_dict(path):
    sd = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape, dtype = line.split("\t")
        shape = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
        sd[name] = torch.zeros(shape, dtype=getattr(torch, dtype))
    return sd


def test_full_size_official_keys_convert_and_load_strictly(full_r50):
    cfg, model = full_r50
    official = _official_zero_state_dict(_keys_listing())
    assert len(official) == 500
    # distinct class rows to check the 92 -> 80 mapping
    official["class_embed.bias"] = torch.arange(92, dtype=torch.float32)
    official["class_embed.weight"] = torch.arange(92, dtype=torch.float32)[:, None].repeat(1, 256)
    assert detect_smca_kind(official) == "single_scale"
    sd = convert_official_smca(official)
    assert len(sd) == len(official)
    model.load_state_dict(sd, strict=True)
    cols = torch.tensor(coco_official_columns(), dtype=torch.float32)
    assert torch.equal(model.heads.class_embed.bias.detach(), cols)
    assert torch.equal(model.heads.class_embed.weight[:, 0].detach(), cols)
    full = convert_official_smca({"model": official, "args": argparse.Namespace(dynamic_scale="type3")},
                                 keep_all_classes=True)
    assert full["heads.class_embed.weight"].shape == (92, 256)
    assert torch.equal(full["heads.class_embed.bias"], official["class_embed.bias"])


def _small_official():
    path = parity_dir() / "smca_single_type3.pt"
    if not path.is_file():
        pytest.skip(f"no {path}")
    return load_fixture(path)["state_dict"]


def test_converter_rejects_unknown_keys_and_non_coco_heads():
    sd = dict(_small_official())
    with pytest.raises(KeyError, match="transformer.decoder.layers.0.point9.weight"):
        convert_official_smca({**sd, "transformer.decoder.layers.0.point9.weight": torch.zeros(1)})
    small = {**sd, "class_embed.weight": sd["class_embed.weight"][:12], "class_embed.bias": sd["class_embed.bias"][:12]}
    with pytest.raises(ValueError, match="keep_all_classes"):
        convert_official_smca(small)
    assert convert_official_smca(small, keep_all_classes=True)["heads.class_embed.bias"].shape == (12,)


def test_convert_cli(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_smca_detr", REPO / "tools" / "convert_smca_detr.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    sd = _small_official()
    src = tmp_path / "official.pth"
    torch.save({"model": sd, "args": argparse.Namespace(dynamic_scale="type3", num_queries=20, lr=1e-4)}, src)
    dst = tmp_path / "out" / "converted.pth"
    assert cli.main([str(src), str(dst)]) == 0
    out = safe_torch_load(dst)
    ref = convert_official_smca(sd)
    assert list(out["model"]) == list(ref) and all(torch.equal(out["model"][k], ref[k]) for k in ref)
    assert out["model"]["heads.class_embed.weight"].shape[0] == 80
    text = capsys.readouterr().out
    assert "MODEL.SMCA_DETR.SMCA.DYNAMIC_SCALE: 'type3'" in text and "MODEL.SMCA_DETR.NUM_QUERIES: 20" in text
    assert cli.main([str(src), str(dst), "--keep-all-classes"]) == 0
    assert safe_torch_load(dst)["model"]["heads.class_embed.weight"].shape[0] == 92
    assert os.path.getsize(dst) > 0


# ------------------------------------------------------------------ compact fixtures


def _compact_tool():
    import importlib.util

    path = REPO / "tools" / "compact_parity_fixture.py"
    spec = importlib.util.spec_from_file_location("compact_parity_fixture", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compact_fixture_round_trip(tmp_path):
    tool = _compact_tool()
    g = torch.Generator().manual_seed(0)
    exact = torch.randint(-128, 128, (7, 5), generator=g).float() * 2.0 ** -9
    inexact = torch.randn(4, generator=g)
    assert tool.quantize_exact(inexact) is None
    qe = tool.quantize_exact(exact)
    assert qe["q"].dtype == torch.int8 and torch.equal(qe["q"].float() * 2.0 ** qe["e"], exact)
    fx = {"format": "detr-parity-fixture/1", "case": "smca_single_typeX", "config": {"d_model": 4},
          "state_dict": {"a": exact, "b": inexact, "z": torch.zeros(3)},
          "inputs": {"query_embed": torch.ones(2), "image_sizes": torch.tensor([[3, 4]])},
          "outputs": {"pred_logits": torch.randn(2, 3, generator=g)}, "postprocess_float64": {"x": torch.ones(1)}}
    src, dst = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(fx, src)
    tool.main([str(src), str(dst)])
    raw = torch.load(dst, weights_only=True)
    assert raw["format"] == "smca-detr-compact-fixture/1"
    assert isinstance(raw["state_dict"]["a"], dict) and isinstance(raw["state_dict"]["b"], torch.Tensor)
    assert "query_embed" not in raw["inputs"] and "postprocess_float64" not in raw
    assert raw["compact"]["float_state_dict_keys"] == ["b"]
    back = load_fixture(dst)
    for k, v in fx["state_dict"].items():
        assert torch.equal(back["state_dict"][k], v), k
    assert torch.equal(back["outputs"]["pred_logits"], fx["outputs"]["pred_logits"])


def test_shipped_compact_fixtures_are_small_and_exact():
    files = sorted((REPO / "tests" / "data" / "parity").glob("smca_single_type*.pt"))
    if not files:
        pytest.skip("no compact SMCA fixtures")
    assert sum(f.stat().st_size for f in files) < 9.5e6
    for f in files:
        fx = torch.load(f, weights_only=True)
        assert fx["format"] == "smca-detr-compact-fixture/1" and not fx["compact"]["float_state_dict_keys"]
