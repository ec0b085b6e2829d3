"""Deformable DETR: converter on the full-size official key lists (plain, box refinement, two-stage),
configs (recipe, build, one CPU training step each; the DCN config's CPU error), build-time checks,
extra-level masks, the conversion CLI. Numerical parity with the official code is in
test_parity_deformable.py."""
import argparse
import re
from pathlib import Path

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model

from parity_common import assert_convert_cli_roundtrip, deformable_official_listing as official_listing
from smca_detr.checkpoint import coco_official_columns
from smca_detr.checkpoint.deformable import convert_official_deformable_detr, official_layout
from smca_detr.engine.optimizer import build_optimizer
from smca_detr.modeling.backbone import image_padding_mask, resize_mask
from smca_detr.modeling.transformers.deformable import DeformableTransformer
from train_step_helpers import load_cfg, tiny_batch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("tools_on_path")  # conftest.py: the conversion CLI
CONFIG_DIR = REPO / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("deformable_detr_*.yaml"))
COCO_TRAIN_IMAGES = 118287
VARIANT_CONFIG = {"plain": "deformable_detr_r50.yaml", "box_refine": "deformable_detr_r50_refine.yaml",
                  "two_stage": "deformable_detr_r50_two_stage.yaml"}


# ------------------------------------------------------------------------------------ key listing
@pytest.fixture(scope="module")
def listing():
    return official_listing()


def fake_official(keys, tied):
    """A full-size official state dict: every tensor filled with the index of its key (tied keys
    share the first key's value), class rows numbered by their official column."""
    sd = {k: torch.full(shape, float(i)) for i, (k, shape) in enumerate(keys.items())}
    for k in keys:
        if re.match(r"^(transformer\.decoder\.)?class_embed\.\d+\.(weight|bias)$", k):
            n = sd[k].shape[0]
            col = torch.arange(n, dtype=torch.float32)
            sd[k] = col if k.endswith("bias") else col[:, None].expand(sd[k].shape).clone()
    for group in tied:
        for k in group[1:]:
            sd[k] = sd[group[0]].clone()
    return sd


@pytest.mark.parametrize("variant", ["plain", "box_refine", "two_stage"])
def test_full_size_official_keys_load_strictly(listing, variant):
    keys, tied = listing[variant]
    sd = fake_official(keys, tied)
    idx = {k: float(v.flatten()[0]) for k, v in sd.items()}
    assert official_layout(sd) == {"per_layer_heads": variant != "plain", "two_stage": variant == "two_stage"}
    torch.manual_seed(0)
    model = build_model(load_cfg(CONFIG_DIR / VARIANT_CONFIG[variant]))
    ckpt = {"model": sd, "args": argparse.Namespace(num_classes=91), "epoch": 49}
    converted = convert_official_deformable_detr(ckpt)
    aliases = sum(len(g) - 1 for g in tied)
    assert len(converted) == len(sd) - aliases
    model.load_state_dict(converted, strict=True)
    got = model.state_dict()
    # spot checks of the mapping
    assert got["transformer.level_embed"][0, 0] == idx["transformer.level_embed"]
    assert got["transformer.input_proj.3.0.weight"].flatten()[0] == idx["input_proj.3.0.weight"]
    assert got["transformer.input_proj.3.0.weight"].shape == (256, 2048, 3, 3)
    assert got["transformer.input_proj.1.1.bias"][0] == idx["input_proj.1.1.bias"]
    k = "transformer.decoder.layers.5.cross_attn.sampling_offsets.weight"
    assert got[k][0, 0] == idx[k]
    k = "transformer.encoder.layers.2.self_attn.value_proj.bias"
    assert got[k][0] == idx[k]
    assert got["backbone.body.res5.2.conv3.norm.running_var"][0] == idx["backbone.0.body.layer4.2.bn3.running_var"]
    assert got["backbone.body.stem.conv1.weight"].flatten()[0] == idx["backbone.0.body.conv1.weight"]
    cols = torch.as_tensor(coco_official_columns(), dtype=torch.float32)
    if variant == "plain":
        assert got["transformer.query_embed.weight"][0, 0] == idx["query_embed.weight"]
        assert got["transformer.reference_points.weight"][0, 0] == idx["transformer.reference_points.weight"]
        assert got["heads.bbox_embed.layers.2.bias"][0] == idx["bbox_embed.0.layers.2.bias"]
        assert torch.equal(got["heads.class_embed.bias"], cols)
        assert torch.equal(got["heads.class_embed.weight"][:, 3], cols)
    else:
        n_sets = 7 if variant == "two_stage" else 6
        assert model.heads.num_sets == n_sets
        for i in range(n_sets):
            assert got[f"heads.bbox_embed.{i}.layers.1.weight"][0, 0] == idx[f"bbox_embed.{i}.layers.1.weight"]
            # the two-stage encoder head (i = 6) is class-agnostic (row 0: objectness): first rows kept
            expected = torch.arange(80, dtype=torch.float32) if i == 6 else cols
            assert torch.equal(got[f"heads.class_embed.{i}.bias"], expected)
    if variant == "two_stage":
        for k in ("enc_output.weight", "enc_output_norm.bias", "pos_trans.weight", "pos_trans_norm.weight"):
            assert got["transformer." + k].flatten()[0] == idx["transformer." + k]
        assert "transformer.query_embed.weight" not in got


def test_full_size_keep_all_classes(listing):
    keys, tied = listing["box_refine"]
    sd = fake_official(keys, tied)
    torch.manual_seed(0)
    model = build_model(load_cfg(CONFIG_DIR / VARIANT_CONFIG["box_refine"], ["MODEL.SMCA_DETR.NUM_CLASSES", 91]))
    model.load_state_dict(convert_official_deformable_detr(sd, keep_all_classes=True), strict=True)
    assert torch.equal(model.heads.class_embed[4].bias.detach(), torch.arange(91, dtype=torch.float32))


def test_converter_checks(listing):
    keys, tied = listing["box_refine"]
    sd = fake_official(keys, tied)
    # aliases must hold the same values as the heads they alias
    bad = dict(sd)
    bad["transformer.decoder.bbox_embed.3.layers.0.bias"] = bad["transformer.decoder.bbox_embed.3.layers.0.bias"] + 1
    with pytest.raises(ValueError, match="bbox_embed.3.layers.0.bias"):
        convert_official_deformable_detr(bad)
    # without box refinement, the repeated heads are one module
    keys, tied = listing["plain"]
    bad = fake_official(keys, tied)
    bad["class_embed.2.bias"] = bad["class_embed.2.bias"] + 1
    with pytest.raises(ValueError, match="class_embed.2.bias"):
        convert_official_deformable_detr(bad)
    with pytest.raises(KeyError, match="no conversion rule"):
        convert_official_deformable_detr({"transformer.foo.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="keep_all_classes"):
        convert_official_deformable_detr({"class_embed.0.weight": torch.zeros(12, 4),
                                          "class_embed.0.bias": torch.zeros(12)})


def test_convert_cli_roundtrip(tmp_path):
    assert_convert_cli_roundtrip(tmp_path, "deformable_detr_small_two_stage.pt", "convert_deformable_detr",
                                 convert_official_deformable_detr, argparse.Namespace(two_stage=True))


# ------------------------------------------------------------------------------------ build checks
def small_cfg(path=CONFIG_DIR / "deformable_detr_r50.yaml", extra=()):
    """A config file with shrunken widths for fast CPU tests (depth, levels, variant and the recipe
    are the file's); PyTorch deformable attention."""
    return load_cfg(path, [
        "MODEL.RESNETS.RES2_OUT_CHANNELS", 16, "MODEL.RESNETS.WIDTH_PER_GROUP", 4,
        "MODEL.RESNETS.STEM_OUT_CHANNELS", 8, "MODEL.SMCA_DETR.HIDDEN_DIM", 64,
        "MODEL.SMCA_DETR.DIM_FEEDFORWARD", 64, "MODEL.SMCA_DETR.ENC_LAYERS", 2, "MODEL.SMCA_DETR.DEC_LAYERS", 2,
        "MODEL.SMCA_DETR.NUM_QUERIES", 20,
        "MODEL.SMCA_DETR.DEFORMABLE.MSDA_IMPL", "pytorch", *extra])


def test_two_stage_without_box_refine_is_refused():
    cfg = small_cfg(CONFIG_DIR / "deformable_detr_r50_two_stage.yaml",
                    ["MODEL.SMCA_DETR.DEFORMABLE.WITH_BOX_REFINE", False])
    with pytest.raises(ValueError, match=r"MODEL\.SMCA_DETR\.DEFORMABLE\.TWO_STAGE.*"
                                         r"MODEL\.SMCA_DETR\.DEFORMABLE\.WITH_BOX_REFINE"):
        build_model(cfg)


@pytest.mark.parametrize("opts,match", [
    (["MODEL.SMCA_DETR.DEFORMABLE.NUM_FEATURE_LEVELS", 2], "NUM_FEATURE_LEVELS"),
    (["MODEL.SMCA_DETR.PRE_NORM", True], "PRE_NORM"),
    (["MODEL.SMCA_DETR.DEFORMABLE.MSDA_IMPL", "cuda"], "MSDA_IMPL"),
])
def test_bad_config_is_rejected_at_build_time(opts, match):
    cfg = small_cfg(extra=opts)
    with pytest.raises(ValueError, match=match):
        build_model(cfg)


def test_extra_levels_use_the_image_mask():
    """Extra levels resize the *image* mask (official), which differs from resizing the last
    backbone level's mask when the extra level's size does not divide evenly."""
    cfg = small_cfg(extra=["MODEL.SMCA_DETR.DEFORMABLE.NUM_FEATURE_LEVELS", 3])
    t = DeformableTransformer(cfg, [ShapeSpec(channels=8, stride=32)])
    assert len(t.input_proj) == 3 and t.input_proj[2][0].in_channels == 64
    sizes = [(100, 700), (800, 1024)]
    feats = [torch.randn(2, 8, 25, 32)]
    image_mask = image_padding_mask(sizes, (800, 1024))
    masks = [resize_mask(image_mask, (25, 32))]
    with torch.no_grad():
        srcs, level_masks, pos = t._levels(feats, masks, sizes)
    assert [tuple(s.shape[-2:]) for s in srcs] == [(25, 32), (13, 16), (7, 8)]
    for lvl in (1, 2):
        expected = resize_mask(image_mask, srcs[lvl].shape[-2:])
        assert torch.equal(level_masks[lvl], expected)
        assert pos[lvl].shape == (2, 64) + tuple(srcs[lvl].shape[-2:])
    assert not torch.equal(level_masks[1], resize_mask(masks[0], (13, 16)))  # the check above matters


# ------------------------------------------------------------------------------------ configs
def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"deformable_detr_r50.yaml", "deformable_detr_r50_single_scale.yaml",
            "deformable_detr_r50_single_scale_dc5.yaml", "deformable_detr_r50_refine.yaml",
            "deformable_detr_r50_two_stage.yaml", "deformable_detr_r101_dcn.yaml"} <= names


def _check_recipe(cfg, stem):
    c, d, s = cfg.MODEL.SMCA_DETR, cfg.MODEL.SMCA_DETR.DEFORMABLE, cfg.SOLVER
    assert c.TRANSFORMER == "DeformableTransformer" and c.CLASS_LOSS == "focal" and c.NUM_CLASSES == 80
    assert (c.NUM_QUERIES, c.HIDDEN_DIM, c.NHEADS, c.ENC_LAYERS, c.DEC_LAYERS, c.DIM_FEEDFORWARD) == (300, 256, 8, 6, 6, 1024)
    assert (d.ENC_N_POINTS, d.DEC_N_POINTS) == (4, 4)
    assert (c.CLASS_WEIGHT, c.L1_WEIGHT, c.GIOU_WEIGHT) == (2.0, 5.0, 2.0)
    assert (c.COST_CLASS, c.COST_BBOX, c.COST_GIOU) == (2.0, 5.0, 2.0)
    assert (s.OPTIMIZER, s.BASE_LR, s.BACKBONE_MULTIPLIER, s.WEIGHT_DECAY) == ("ADAMW", 2e-4, 0.1, 1e-4)
    assert dict(zip(s.LR_MULTIPLIER_NAMES, s.LR_MULTIPLIER_VALUES)) == {"sampling_offsets": 0.1, "reference_points": 0.1}
    assert s.CLIP_GRADIENTS.ENABLED and s.CLIP_GRADIENTS.CLIP_TYPE == "full_model" and s.CLIP_GRADIENTS.CLIP_VALUE == 0.1
    assert s.IMS_PER_BATCH == 32 and s.WARMUP_ITERS == 0
    iters_per_epoch = COCO_TRAIN_IMAGES // 32
    assert s.MAX_ITER == 50 * iters_per_epoch and tuple(s.STEPS) == (40 * iters_per_epoch,)
    assert cfg.MODEL.RESNETS.NORM == "FrozenBN" and not cfg.MODEL.RESNETS.STRIDE_IN_1X1
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 2
    single = "single_scale" in stem
    assert d.NUM_FEATURE_LEVELS == (1 if single else 4)
    assert list(c.IN_FEATURES) == (["res5"] if single else ["res3", "res4", "res5"])
    assert cfg.MODEL.RESNETS.RES5_DILATION == (2 if "dc5" in stem else 1)
    assert d.WITH_BOX_REFINE == ("refine" in stem or "two_stage" in stem)
    assert d.TWO_STAGE == ("two_stage" in stem)
    assert cfg.MODEL.RESNETS.DEPTH == (101 if "r101" in stem else 50)
    assert any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE) == ("dcn" in stem)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_recipe_and_one_training_step(path):
    _check_recipe(load_cfg(path), path.stem)
    cfg = small_cfg(path)
    d = cfg.MODEL.SMCA_DETR.DEFORMABLE
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    t = model.transformer
    assert len(t.input_proj) == d.NUM_FEATURE_LEVELS
    opt = build_optimizer(cfg, model)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(t.encoder.layers[0].self_attn.sampling_offsets.weight)] == pytest.approx(2e-5)
    assert lrs[id(t.decoder.layers[0].cross_attn.attention_weights.weight)] == pytest.approx(2e-4)
    assert lrs[id(model.backbone.body.res4[0].conv1.weight)] == pytest.approx(2e-5)
    if not d.TWO_STAGE:
        assert lrs[id(t.reference_points.weight)] == pytest.approx(2e-5)

    if any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE):
        # detectron2's deformable convolution trains only with its compiled CUDA kernels
        with pytest.raises((NotImplementedError, AttributeError), match="not supported on CPUs|compiled"):
            sum(model(tiny_batch()).values()).backward()
        return

    losses = model(tiny_batch())
    sfx = ["", "_0"] + (["_enc"] if d.TWO_STAGE else [])
    assert set(losses) == {f"{n}{s}" for n in ("loss_ce", "loss_bbox", "loss_giou") for s in sfx}
    total = sum(losses.values())
    assert torch.isfinite(total)
    opt.zero_grad()
    total.backward()
    params = [t.encoder.layers[0].self_attn.sampling_offsets.weight, t.decoder.layers[0].cross_attn.value_proj.weight,
              t.decoder.layers[1].self_attn.in_proj_weight, t.input_proj[-1][0].weight,
              model.heads.box_head(1).layers[-1].weight, model.backbone.body.res5[0].conv1.weight]
    if d.TWO_STAGE:
        params += [t.enc_output.weight, t.pos_trans.weight, model.heads.class_head(2).weight]
    else:
        params += [t.query_embed.weight, t.reference_points.weight]
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert model.backbone.body.stem.conv1.weight.grad is None  # FREEZE_AT 2
    w = t.decoder.layers[0].cross_attn.value_proj.weight
    before = w.detach().clone()
    opt.step()
    assert not torch.equal(before, w)


def test_box_refinement_references_are_detached():
    torch.manual_seed(0)
    model = build_model(small_cfg(CONFIG_DIR / "deformable_detr_r50_refine.yaml")).train()
    images = model.preprocess_image(tiny_batch())
    feats, masks = model.backbone(images.tensor, images.image_sizes)
    out = model.transformer(feats, masks, images.image_sizes, model.heads)
    assert out.references.shape == (2, 2, 20, 4)
    assert torch.all(out.references[0, ..., 2:] == 0)  # layer 0: 2-d reference, size logits untouched
    assert not out.extras["inter_references"][0].requires_grad
    # layer 1's boxes = sigmoid(bbox_embed_1(hs_1) + logit(refined reference after layer 0))
    _, boxes = model.heads(out.hs, out.references)
    with torch.no_grad():
        raw0 = model.heads.box_head(0)(out.hs[0])
        ref0 = out.extras["init_reference"]
        refined = torch.cat([raw0[..., :2] + torch.logit(ref0, eps=1e-5), raw0[..., 2:]], -1).sigmoid()
        torch.testing.assert_close(out.extras["inter_references"][0], refined)
        torch.testing.assert_close(boxes[0].detach(), refined)


def test_inference_api():
    torch.manual_seed(0)
    model = build_model(small_cfg(CONFIG_DIR / "deformable_detr_r50_two_stage.yaml")).eval()
    batch = tiny_batch()
    with torch.no_grad():
        res = model([{k: v for k, v in x.items() if k != "instances"} for x in batch])
    assert len(res) == 2 and len(res[0]["instances"]) == 100
    assert res[1]["instances"].image_size == (80, 112)
    assert torch.isfinite(res[0]["instances"].pred_boxes.tensor).all()


def test_unpadded_batch_skips_the_mask_without_changing_results():
    """With no padding in the batch the transformer passes no mask to the deformable attention
    (saves the masking work); an all-False mask gives the same result."""
    torch.manual_seed(0)
    model = build_model(small_cfg()).eval()
    images = model.preprocess_image(tiny_batch(sizes=((96, 128), (96, 128))))
    with torch.no_grad():
        feats, masks = model.backbone(images.tensor, images.image_sizes)
        assert not any(m.any() for m in masks)
        out = model.forward_features(feats, masks, images.image_sizes)
        t, ex = model.transformer, out["extras"]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in ex["srcs"]], 1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + t.level_embed[i] for i, p in enumerate(ex["pos_embeds"])], 1)
        masked = t.encoder(src, pos, ex["encoder_reference_points"], ex["spatial_shapes"], ex["level_start_index"],
                           ex["mask_flatten"])
    torch.testing.assert_close(ex["memory"], masked, atol=1e-6, rtol=1e-5)


def test_bfloat16_autocast_keeps_references_in_float32():
    """Under mixed precision the reference points / proposals (sampling-location resolution) stay
    float32; the losses are finite."""
    torch.manual_seed(0)
    model = build_model(small_cfg(CONFIG_DIR / "deformable_detr_r50_two_stage.yaml")).train()
    batch = tiny_batch()
    images = model.preprocess_image(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats, masks = model.backbone(images.tensor, images.image_sizes)
        out = model.transformer(feats, masks, images.image_sizes, model.heads)
        losses = model(batch)
    assert out.hs.dtype == torch.bfloat16
    for name in ("valid_ratios", "encoder_reference_points", "init_reference", "output_proposals"):
        assert out.extras[name].dtype == torch.float32, name
    assert out.references.dtype == torch.float32
    assert all(torch.isfinite(v) for v in losses.values())
