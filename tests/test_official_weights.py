"""Official checkpoints and ImageNet backbones through ``MODEL.WEIGHTS`` (issue 22).

* The class-remap invariant, for every official format the converter knows (SMCA single scale and
  conv multi-scale, Conditional DETR, Deformable DETR plain / box refinement / two-stage): a
  official checkpoint (random weights, the full R50 backbone with non-trivial frozen-BN statistics,
  the official layout with 2 encoder and 2 decoder layers, saved as the official training scripts
  save it) loaded with the 80-class COCO remap
  gives the same boxes as the same file loaded with all official class rows kept, and the same
  logits in the mapped columns, on a 480x640 image, both loaded by ``build_model_from_config``.
  Two-stage Deformable DETR also selects the same proposals (its encoder head's row 0 is an
  objectness score, read by position).
* A torchvision ResNet checkpoint as torchvision publishes it is converted on load: the backbone
  then computes torchvision's features on the same image.
* The official transformer / head weights of a parity fixture (tiny official models) with an
  official-named backbone, loaded through ``MODEL.WEIGHTS``, equal the converter run by hand (same
  weights, same detections); another class count skips the class head with one warning; a
  checkpoint of another config is refused; every key of the full-size official models converts
  onto the shipped config's model (meta device).
* The converter command line (smca_detr.checkpoint.cli, tools/convert_*.py).
"""
import argparse
import logging
import math
import re

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from parity_common import deformable_official_listing, fixture_files, load_fixture, official_key_listing
from smca_detr import model_zoo
from smca_detr.checkpoint import coco_official_columns, safe_torch_load
from smca_detr.checkpoint.common import rename_official_backbone_key
from smca_detr.checkpoint.official import OfficialCheckpointError, detect_official_format
from smca_detr.config import add_smca_detr_config
from smca_detr.checkpoint import SmcaDetrCheckpointer
from smca_detr.modeling.registry import TRANSFORMER_REGISTRY
from tool_helpers import _image, load_tool as _load_tool

pytestmark = pytest.mark.usefixtures("one_torch_thread", "propagate_logs")  # conftest.py

# format -> (config, official key listing (file or Deformable DETR variant), official args)
FORMATS = {
    "smca_single_scale": ("smca_r50", "smca_official_keys_single_scale_r50_type3.txt",
                          dict(dynamic_scale="type3", num_queries=300)),
    "smca_conv_multi_scale": ("smca_r50_conv_ms", "smca_official_keys_multi_scale_r50_type3.txt",
                              dict(dynamic_scale="type3", num_queries=300, enc_layers=5, dim_feedforward=1024)),
    "conditional_detr": ("conditional_detr_r50", "conditional_detr_full_model_keys.txt", dict(num_queries=300)),
    "deformable_plain": ("deformable_detr_r50", "plain", dict(with_box_refine=False, two_stage=False)),
    "deformable_refine": ("deformable_detr_r50_refine", "box_refine", dict(with_box_refine=True, two_stage=False)),
    "deformable_two_stage": ("deformable_detr_r50_two_stage", "two_stage", dict(with_box_refine=True, two_stage=True)),
}
HEIGHT, WIDTH = 480, 640
# Encoder / decoder depth of the checkpoints under test (the official models have 5-6 of each): the
# deeper layers are more of the same modules and only cost time; both loads get the same overrides.
ENC_LAYERS, DEC_LAYERS = 2, 2
_LAYER = re.compile(r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.")
_HEAD = re.compile(r"^((?:transformer\.decoder\.)?(?:class|bbox)_embed)\.(\d+)\.(.*)$")


def official_listing(listing):
    """(key -> shape, tied key groups) of a full-size official model."""
    if listing.endswith(".txt"):
        return official_key_listing(listing), []
    return deformable_official_listing()[listing]


def random_official_state_dict(keys, tied, seed=0):
    """Random official weights at a scale that keeps activations finite through the full model:
    matrices N(0, 1/fan_in), norm scales 1 + N(0, 0.1), biases N(0, 0.1), frozen-BN statistics
    mean N(0, 0.1) and variance U(0.5, 1.5). Tied keys (one official parameter) share values."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in keys.items():
        if k.endswith("running_var"):
            v = 0.5 + torch.rand(shape, generator=g)
        elif len(shape) >= 2:
            v = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif k.endswith("weight"):
            v = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:  # biases, running_mean
            v = 0.1 * torch.randn(shape, generator=g)
        sd[k] = v
    for group in tied:
        for k in group[1:]:
            sd[k] = sd[group[0]].clone()
    return sd


def keep_layers(sd, args, enc=ENC_LAYERS, dec=DEC_LAYERS):
    """The official checkpoint of the same model with ``enc`` encoder and ``dec`` decoder layers: the
    layers beyond are dropped, and so are their per-layer heads (Deformable DETR); the two-stage
    encoder head, the one after the decoder heads, moves to index ``dec``."""
    full_dec = 1 + max(int(m.group(2)) for m in map(_LAYER.match, sd) if m and m.group(1) == "decoder")
    out = {}
    for k, v in sd.items():
        m = _LAYER.match(k)
        if m and int(m.group(2)) >= (enc if m.group(1) == "encoder" else dec):
            continue
        m = _HEAD.match(k)
        if m and int(m.group(2)) >= dec:
            if int(m.group(2)) != full_dec:
                continue
            k = f"{m.group(1)}.{dec}.{m.group(3)}"
        out[k] = v
    return out, {**args, "enc_layers": enc, "dec_layers": dec}


def raw_outputs(model, image, targets):
    """Every decoder layer's logits / boxes (and two-stage encoder outputs) of ``model`` on one image,
    through the model's own preprocessing and backbone, and its criterion's matcher indices and box
    losses for ``targets``."""
    with torch.no_grad():
        images = model.preprocess_image([{"image": image}])
        features, masks = model.backbone(images.tensor, images.image_sizes)
        out = model.forward_features(features, masks, images.image_sizes)
        losses, indices = model.criterion.compute(out, targets)
    return out, {k: v for k, v in losses.items() if k.startswith(("loss_bbox", "loss_giou"))}, indices


def sorted_indices(indices):
    """Matcher indices per layer and image, ordered by query."""
    out = {}
    for layer, per_image in indices.items():
        out[layer] = [(q[torch.argsort(q)], t[torch.argsort(q)]) for q, t in per_image]
    return out


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_class_remap_keeps_boxes_and_mapped_logits(fmt, tmp_path, caplog):
    config, listing, args = FORMATS[fmt]
    keys, tied = official_listing(listing)
    sd, args = keep_layers(random_official_state_dict(keys, tied), args)
    rows = sd["class_embed.bias" if "class_embed.bias" in sd else "class_embed.0.bias"].shape[0]
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": sd, "args": argparse.Namespace(**args), "epoch": 49}, path)
    depth = ["MODEL.SMCA_DETR.ENC_LAYERS", ENC_LAYERS, "MODEL.SMCA_DETR.DEC_LAYERS", DEC_LAYERS]
    del sd
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, HEIGHT, WIDTH), generator=g).float()
    cols = coco_official_columns()
    # the same 6 objects, labelled by contiguous COCO class / by official category id
    labels = torch.randint(0, 80, (6,), generator=g)
    boxes = torch.cat([0.2 + 0.6 * torch.rand(6, 2, generator=g), 0.05 + 0.3 * torch.rand(6, 2, generator=g)], 1)
    with caplog.at_level(logging.INFO):
        remapped = model_zoo.build_model_from_config(config, weights=str(path), opts=depth)
    out_80, losses_80, indices_80 = raw_outputs(remapped, image, [{"labels": labels, "boxes": boxes}])
    del remapped
    kept = model_zoo.build_model_from_config(config, weights=str(path),
                                             opts=depth + ["MODEL.SMCA_DETR.NUM_CLASSES", rows])
    official_labels = torch.as_tensor(cols)[labels]
    out_all, losses_all, indices_all = raw_outputs(kept, image, [{"labels": official_labels, "boxes": boxes}])
    del kept

    assert out_80["pred_logits"].shape[-1] == 80 and out_all["pred_logits"].shape[-1] == rows
    torch.testing.assert_close(out_80["pred_boxes"], out_all["pred_boxes"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out_80["pred_logits"], out_all["pred_logits"][..., cols], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out_80["pred_logits"]).all() and out_80["pred_boxes"].std() > 1e-3
    # the criterion reads the class heads by label (and the two-stage encoder head by row 0): the same
    # queries are matched to the same objects, with the same box losses
    assert sorted_indices(indices_80).keys() == sorted_indices(indices_all).keys()
    for layer, per_image in sorted_indices(indices_80).items():
        for (q, t), (q_all, t_all) in zip(per_image, sorted_indices(indices_all)[layer]):
            assert torch.equal(q, q_all) and torch.equal(t, t_all), layer
    torch.testing.assert_close(losses_80, losses_all, rtol=1e-5, atol=1e-6)
    if fmt == "deformable_two_stage":
        # the proposals are chosen by the encoder head's row 0 (objectness), not by a class row
        assert torch.equal(out_80["extras"]["topk_proposals"], out_all["extras"]["topk_proposals"])
        torch.testing.assert_close(out_80["enc_outputs"]["pred_logits"][..., 0],
                                   out_all["enc_outputs"]["pred_logits"][..., 0], rtol=1e-5, atol=1e-5)
        assert "class-agnostic" in caplog.text and "proposals are the checkpoint's" in caplog.text
    assert f"class head remapped {rows} -> 80 COCO rows" in caplog.text


# ------------------------------------------------------------------------ torchvision ImageNet backbones
def random_torchvision_resnet(depth, seed=0):
    """A torchvision ResNet with random weights and non-trivial BatchNorm statistics, in eval mode."""
    import torchvision

    torch.manual_seed(seed)
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return net


@pytest.mark.parametrize("config,depth", [("deformable_detr_r50", 50), ("detr_r101", 101)])
def test_torchvision_resnet_checkpoint_gives_torchvision_features(config, depth, tmp_path, caplog):
    net = random_torchvision_resnet(depth)
    path = tmp_path / f"resnet{depth}-0123abcd.pth"  # a plain state dict, as torchvision publishes it
    torch.save(net.state_dict(), path)
    with caplog.at_level(logging.INFO):
        model = model_zoo.build_model_from_config(config, weights=str(path))
    assert "torchvision ResNet checkpoint" in caplog.text

    image = torch.randint(0, 256, (3, 96, 128), generator=torch.Generator().manual_seed(2)).float()
    ours = model.preprocess_image([{"image": image}]).tensor
    # torchvision's ImageNet input: RGB in [0, 1], normalised with its mean / std
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    theirs = ((image / 255.0 - mean) / std)[None]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    body = model.backbone.body
    with torch.no_grad():
        x = body.stem(theirs)
        y = net.maxpool(net.relu(net.bn1(net.conv1(theirs))))
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
        for name, stage, layer in zip(body.stage_names, body.stages, (net.layer1, net.layer2, net.layer3, net.layer4)):
            x, y = stage(x), layer(y)
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4 * float(y.abs().max()), msg=name)
    assert float(y.std()) > 1e-3


def test_every_resnet_config_names_torchvision_imagenet_weights_of_its_depth():
    """Every R50 / R101 config starts from torchvision's ImageNet ResNet of its depth (detectron2's copy
    of R-50, or the file torchvision publishes, converted on load) with torchvision's input format."""
    cfgs = {n: model_zoo.get_config(n) for n in model_zoo.list_configs()}
    cfgs = {n: c for n, c in cfgs.items() if c.MODEL.RESNETS.DEPTH in (50, 101)}
    assert len(cfgs) >= 20
    for name, cfg in cfgs.items():
        depth, weights = cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.WEIGHTS
        ok = weights == "detectron2://ImageNetPretrained/torchvision/R-50.pkl" if depth == 50 else False
        ok = ok or weights.startswith(f"https://download.pytorch.org/models/resnet{depth}-")
        assert ok and model_zoo.is_imagenet_backbone(weights), (name, depth, weights)
        assert cfg.INPUT.FORMAT == "RGB" and not cfg.MODEL.RESNETS.STRIDE_IN_1X1, name
        assert [round(v, 3) for v in cfg.MODEL.PIXEL_MEAN] == [123.675, 116.28, 103.53], name
        assert [round(v, 3) for v in cfg.MODEL.PIXEL_STD] == [58.395, 57.12, 57.375], name


def test_torchvision_resnet101_initialises_the_dcn_config(tmp_path):
    """The DCN backbone takes the plain ResNet-101's weights; its offsets (which an ImageNet ResNet does
    not have) keep their zero initialisation, i.e. start as plain convolutions."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet101(weights=None)
    path = tmp_path / "resnet101-0123abcd.pth"
    torch.save(net.state_dict(), path)
    model = model_zoo.build_model_from_config("deformable_detr_r101_dcn", weights=str(path))
    sd = model.state_dict()
    offsets = [k for k in sd if ".conv2_offset." in k]
    assert offsets and all(float(sd[k].abs().max()) == 0.0 for k in offsets)
    assert torch.equal(sd["backbone.body.res5.2.conv2.weight"], net.layer4[2].conv2.weight)
    assert torch.equal(sd["backbone.body.res4.22.conv1.norm.running_var"], net.layer3[22].bn1.running_var)


# ------------------------------------------------------ class heads skipped (fine-tuning on another dataset)
@pytest.mark.parametrize("classes", [20, 100])
def test_official_two_stage_class_heads_skipped_keep_the_objectness_row(classes, caplog):
    """Another class count: the class heads keep the model's initialisation, but the class-agnostic
    encoder head keeps the official first rows (row 0 = objectness; with more rows than the
    checkpoint's, the rest keep the model's), and the warning says so."""
    from smca_detr.checkpoint.deformable import convert_official_deformable_detr
    from smca_detr.checkpoint.official import convert_official_checkpoint

    keys, tied = deformable_official_listing()["two_stage"]
    sd = random_official_state_dict(keys, tied)
    full = convert_official_deformable_detr(sd, keep_all_classes=True)
    # the state dict of a 20-class model: the official one, class heads re-initialised
    model_sd = {k: (torch.full((classes, *v.shape[1:]), -4.6) if k.startswith("heads.class_embed.") else v)
                for k, v in full.items()}
    with caplog.at_level(logging.INFO):
        converted, info = convert_official_checkpoint({"model": sd}, model_sd)
    assert info["class_head"] == "skipped"
    for i in range(6):
        assert torch.equal(converted[f"heads.class_embed.{i}.bias"], model_sd[f"heads.class_embed.{i}.bias"])
    n = min(classes, 91)
    for p in ("weight", "bias"):
        assert torch.equal(converted[f"heads.class_embed.6.{p}"][:n], sd[f"class_embed.6.{p}"][:n])
        assert torch.equal(converted[f"heads.class_embed.6.{p}"][n:], model_sd[f"heads.class_embed.6.{p}"][n:])
    assert "class-agnostic" in caplog.text and "proposals are the checkpoint's" in caplog.text


def test_own_two_stage_checkpoint_for_another_class_count_keeps_the_objectness_row(tmp_path, caplog):
    """The same for our own checkpoints (class heads of another class count are skipped by the
    checkpointer): the encoder head's first rows are loaded."""
    small = ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.SMCA_DETR.HIDDEN_DIM", 64,
             "MODEL.SMCA_DETR.DIM_FEEDFORWARD", 64, "MODEL.SMCA_DETR.ENC_LAYERS", 1,
             "MODEL.SMCA_DETR.DEC_LAYERS", 2, "MODEL.SMCA_DETR.NUM_QUERIES", 20]
    torch.manual_seed(0)
    coco = model_zoo.build_model_from_config("deformable_detr_r50_two_stage", opts=small)
    saved = {k: v + torch.randn_like(v) if k.startswith("heads.class_embed.") else v
             for k, v in coco.state_dict().items()}
    path = tmp_path / "model_final.pth"
    torch.save({"model": saved, "iteration": 10}, path)
    with caplog.at_level(logging.INFO):
        model = model_zoo.build_model_from_config("deformable_detr_r50_two_stage", weights=str(path),
                                                  opts=small + ["MODEL.SMCA_DETR.NUM_CLASSES", 20])
    got = model.state_dict()
    assert torch.equal(got["heads.class_embed.2.bias"], saved["heads.class_embed.2.bias"][:20])
    assert torch.equal(got["heads.class_embed.2.weight"], saved["heads.class_embed.2.weight"][:20])
    prior = coco.state_dict()["heads.class_embed.0.bias"][0]  # focal prior: the initialisation
    assert torch.equal(got["heads.class_embed.0.bias"], torch.full((20,), float(prior)))
    assert "class-agnostic" in caplog.text and "proposals are the checkpoint's" in caplog.text


# ----------------------------------------- parity fixtures through MODEL.WEIGHTS == the converters by hand


def _official_backbone_key(ours: str) -> str:
    """Inverse of ``rename_official_backbone_key`` (detectron2 ResNet -> torchvision names)."""
    k = ours[len("backbone.body."):]
    k = re.sub(r"^stem\.conv1\.norm\.", "bn1.", k)
    k = re.sub(r"^stem\.conv1\.", "conv1.", k)
    k = re.sub(r"^res(\d)\.", lambda m: f"layer{int(m.group(1)) - 1}.", k)
    k = k.replace(".shortcut.norm.", ".downsample.1.").replace(".shortcut.", ".downsample.0.")
    k = re.sub(r"\.conv(\d)\.norm\.", r".bn\1.", k)
    official = "backbone.0.body." + k
    assert rename_official_backbone_key(official) == ours, (ours, official)
    return official


def _resnet_for_levels(cfg, strides, channels):
    """A tiny detectron2 R50 whose levels have the fixture's channels (res_k: RES2 * stride / 4)."""
    stage = {8: "res3", 16: "res4", 32: "res5"}
    r = cfg.MODEL.RESNETS
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    r.DEPTH, r.STEM_OUT_CHANNELS, r.WIDTH_PER_GROUP, r.NORM, r.RES5_DILATION = 50, 8, 2, "FrozenBN", 1
    r.RES2_OUT_CHANNELS = channels[0] * 4 // strides[0]
    assert all(r.RES2_OUT_CHANNELS * s // 4 == ch for s, ch in zip(strides, channels))
    r.OUT_FEATURES = [stage[s] for s in strides]
    cfg.MODEL.SMCA_DETR.IN_FEATURES = list(r.OUT_FEATURES)


def _cfg_from_fixture(kind, c, num_classes=None):
    cfg = add_smca_detr_config(get_cfg())
    m = cfg.MODEL.SMCA_DETR
    m.CLASS_LOSS = "focal"
    if kind.startswith("smca"):
        m.TRANSFORMER = "SMCAConvMultiScaleTransformer" if kind == "smca_conv_ms" else "SMCATransformer"
        m.HIDDEN_DIM, m.NHEADS = c["d_model"], c["nheads"]
        m.NUM_CLASSES = c["num_logits"]
        m.SMCA.DYNAMIC_SCALE, m.SMCA.SMOOTH = c["dynamic_scale"], c["smooth"]
        m.PRE_NORM = c["normalize_before"]
        levels = list(c["backbone_level_channels"])
        strides = list(c["feature_strides"][: len(levels)])
    else:
        m.TRANSFORMER = "ConditionalTransformer" if kind == "conditional" else "DeformableTransformer"
        m.HIDDEN_DIM, m.NHEADS = c["d_model"], c["nhead"]
        m.NUM_CLASSES = c["num_classes"]
        if kind == "conditional":
            levels, strides = [c["backbone_channels"]], [c["backbone_stride"]]
        else:
            levels, strides = list(c["backbone_channels"]), list(c["backbone_strides"])
            d = m.DEFORMABLE
            d.NUM_FEATURE_LEVELS, d.ENC_N_POINTS, d.DEC_N_POINTS = (c["num_feature_levels"], c["enc_n_points"],
                                                                    c["dec_n_points"])
            d.WITH_BOX_REFINE, d.TWO_STAGE = c["with_box_refine"], c["two_stage"]
            d.MSDA_IMPL = "pytorch"
    m.DIM_FEEDFORWARD = c["dim_feedforward"]
    m.ENC_LAYERS, m.DEC_LAYERS = c["num_encoder_layers"], c["num_decoder_layers"]
    m.NUM_QUERIES = c["num_queries"]
    if num_classes is not None:
        m.NUM_CLASSES = num_classes
    _resnet_for_levels(cfg, strides, levels)
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", ""
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ()
    return cfg


OFFICIAL_CASES = {  # kind -> (fixture glob, manual converter, class rows of our model or None = fixture's)
    "smca": ("smca_single_type3.pt", 80),
    "smca_conv_ms": ("smca_multiscale_type3.pt", 80),
    "conditional": ("conditional_detr_small.pt", None),
    "deformable": ("deformable_detr_small_box_refine.pt", None),
}


def _manual_convert(kind, sd, coco):
    if kind.startswith("smca"):
        from smca_detr.checkpoint.smca import convert_official_smca

        return convert_official_smca(sd, keep_all_classes=not coco)
    if kind == "conditional":
        from smca_detr.checkpoint.conditional import convert_official_conditional_detr

        return convert_official_conditional_detr(sd, keep_all_classes=not coco)
    from smca_detr.checkpoint.deformable import convert_official_deformable_detr

    return convert_official_deformable_detr(sd, keep_all_classes=not coco)


def _fake_official(kind, tmp_path, num_classes=None):
    """(cfg, path of a fake official checkpoint, its state dict): official transformer/head keys of a
    parity fixture + an official-named random backbone, saved as {"model", "args"}."""
    pattern, rows = OFFICIAL_CASES[kind]
    files = fixture_files(pattern)
    if not files:
        pytest.skip(f"no parity fixture {pattern}")
    fx = load_fixture(files[0])
    cfg = _cfg_from_fixture(kind, fx["config"], num_classes if num_classes is not None else rows)
    if cfg.MODEL.SMCA_DETR.TRANSFORMER not in TRANSFORMER_REGISTRY:
        pytest.skip(f"{cfg.MODEL.SMCA_DETR.TRANSFORMER} is not registered yet")
    torch.manual_seed(0)
    template = build_model(cfg)
    sd = dict(fx["state_dict"])
    g = torch.Generator().manual_seed(1)
    for k, v in template.state_dict().items():
        if k.startswith("backbone."):
            if "running_var" in k:
                value = torch.rand(v.shape, generator=g) + 0.5
            else:
                value = torch.randn(v.shape, generator=g) * 0.1
            sd[_official_backbone_key(k)] = value
    path = tmp_path / f"official_{kind}.pth"
    torch.save({"model": sd, "args": argparse.Namespace(epochs=50, lr=1e-4), "epoch": 49}, path)
    return cfg, path, sd


def _run(model, image):
    with torch.no_grad():
        inst = model([{"image": torch.as_tensor(image.transpose(2, 0, 1).copy()), "height": 72, "width": 100}])
    return inst[0]["instances"]


@pytest.mark.parametrize("kind", list(OFFICIAL_CASES))
def test_official_checkpoint_through_model_weights(kind, tmp_path, caplog):
    cfg, path, sd = _fake_official(kind, tmp_path)
    assert detect_official_format(safe_torch_load(path)) is not None
    cfg.MODEL.WEIGHTS = str(path)
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    caplog.set_level(logging.INFO)
    SmcaDetrCheckpointer(ours, save_dir=str(tmp_path)).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    info = [r.getMessage() for r in caplog.records if "Detected an official" in r.getMessage()]
    assert len(info) == 1 and f"converted {len(sd)} keys" in info[0], info
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    torch.manual_seed(1)
    by_hand = build_model(cfg).eval()
    coco = OFFICIAL_CASES[kind][1] == 80
    by_hand.load_state_dict(_manual_convert(kind, sd, coco), strict=True)
    a, b = ours.state_dict(), by_hand.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    image = _image()
    ra, rb = _run(ours, image), _run(by_hand, image)
    assert torch.equal(ra.pred_boxes.tensor, rb.pred_boxes.tensor) and torch.equal(ra.scores, rb.scores)
    assert torch.equal(ra.pred_classes, rb.pred_classes)


def test_official_class_count_mismatch_skips_head_with_one_warning(tmp_path, caplog):
    cfg, path, sd = _fake_official("smca", tmp_path, num_classes=12)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    caplog.set_level(logging.INFO)
    SmcaDetrCheckpointer(model).load(str(path))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "class head NOT loaded" in warnings[0] and "92" in warnings[0], warnings
    from smca_detr.checkpoint.smca import convert_official_smca

    expected = convert_official_smca(sd, keep_all_classes=True)
    for k, v in model.state_dict().items():
        if k.startswith("heads.class_embed."):
            assert torch.equal(v, init[k]), k  # initialisation kept
        else:
            assert torch.equal(v, expected[k]), k


def test_official_checkpoint_of_another_config_is_refused(tmp_path):
    cfg, path, _ = _fake_official("conditional", tmp_path)
    # a download without a .pth suffix (URL basename) is recognised as well
    plain = tmp_path / "download"
    plain.write_bytes(path.read_bytes())
    assert "__official_format__" in SmcaDetrCheckpointer(build_model(cfg)).load(str(plain))
    cfg.MODEL.SMCA_DETR.DEC_LAYERS += 1
    model = build_model(cfg)
    with pytest.raises(OfficialCheckpointError, match="does not fit the model"):
        SmcaDetrCheckpointer(model).load(str(path))
    # our own checkpoints are not mistaken for official ones
    assert detect_official_format({"model": model.state_dict()}) is None


@pytest.mark.parametrize("config,listing", [(c, k) for c, k, _ in FORMATS.values()],
                         ids=[c for c, _, _ in FORMATS.values()])
def test_shipped_config_loads_full_size_official_checkpoint(config, listing):
    """Every key / shape of the full-size official model converts onto the shipped config's model
    (strict), the 91/92 COCO class rows are remapped to 80. The model is built on the meta device
    (shapes only, no memory, no init time)."""
    from detectron2.modeling import META_ARCH_REGISTRY

    from smca_detr.checkpoint.official import convert_official_checkpoint

    shapes, _ = official_listing(listing)
    official = {k: torch.zeros(s) for k, s in shapes.items()}  # tied official keys must hold equal values
    cfg = model_zoo.get_config(config, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    with torch.device("meta"):
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    converted, info = convert_official_checkpoint({"model": official, "args": argparse.Namespace()},
                                                  model.state_dict())
    assert info["class_head"] == "remapped" and info["num_keys"] == len(official)
    target = model.state_dict()
    assert converted.keys() == target.keys()
    assert all(converted[k].shape == target[k].shape for k in target)
    assert converted["heads.class_embed.bias" if "heads.class_embed.bias" in target
                     else "heads.class_embed.0.bias"].shape == (80,)


# ------------------------------------------------------------------------------- converter CLI


def _fake_conditional_checkpoint(path, rows=91):
    """An official-looking Conditional DETR file: class head (row i filled with i) + one backbone key."""
    sd = {"class_embed.weight": torch.arange(float(rows)).repeat_interleave(4).view(rows, 4),
          "class_embed.bias": torch.arange(float(rows)),
          "backbone.0.body.conv1.weight": torch.ones(8, 3, 7, 7)}
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-4), "epoch": 3}, path)
    return sd


def test_converter_cli_helper(tmp_path, capsys):
    from smca_detr.checkpoint.cli import build_parser, run_converter
    from smca_detr.checkpoint.common import coco_official_columns
    from smca_detr.checkpoint.conditional import convert_official_conditional_detr

    src, dst = tmp_path / "official.pth", tmp_path / "new" / "ours.pth"
    _fake_conditional_checkpoint(src)
    assert run_converter("conditional", convert_official_conditional_detr, [str(src), str(dst)]) == 0
    out = safe_torch_load(dst)
    assert out["__author__"] == "smca_detr convert_conditional_detr" and out["matching_heuristics"] is False
    assert list(out["model"]) == ["heads.class_embed.weight", "heads.class_embed.bias",
                                  "backbone.body.stem.conv1.weight"]
    assert out["model"]["heads.class_embed.bias"].tolist() == [float(c) for c in coco_official_columns()]
    assert capsys.readouterr().out.strip() == f"wrote {dst}: 3 tensors, 80 class logits"

    # the tool is a thin wrapper with the same command line; a small head needs --keep-all-classes
    tool = _load_tool("convert_conditional_detr")
    small, dst2 = tmp_path / "small.pth", tmp_path / "small_out.pth"
    _fake_conditional_checkpoint(small, rows=12)
    with pytest.raises(ValueError, match="91-row head"):
        tool.main([str(small), str(dst2)])
    assert not dst2.exists()
    assert tool.main([str(small), str(dst2), "--keep-all-classes"]) == 0
    assert safe_torch_load(dst2)["model"]["heads.class_embed.weight"].shape == (12, 4)
    with pytest.raises(KeyError, match="unknown converter family"):
        run_converter("detr", convert_official_conditional_detr, [str(src), str(dst)])

    # per-family options: --config/--opts verify (conditional, deformable), --kind (smca)
    def options(family):
        return {o for a in build_parser(family)._actions for o in a.option_strings}

    assert {"--keep-all-classes", "--config", "--opts"} <= options("deformable") and "--kind" not in options("deformable")
    assert "--kind" in options("smca") and "--config" not in options("smca")
