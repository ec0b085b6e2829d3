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
"""
import argparse
import logging
import math
import re

import pytest
import torch

from parity_common import deformable_official_listing, official_key_listing
from smca_detr import model_zoo
from smca_detr.checkpoint import coco_official_columns

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
