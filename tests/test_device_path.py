"""The path users take on GPUs, checked without one (issue 17):

* every trainable parameter gets a gradient in one training step, for every shipped config and the
  switches that change which modules run (DDP without ``find_unused_parameters`` fails otherwise);
* every shipped config runs a training forward + loss and inference on a fake ``cuda`` device
  (``FakeTensorMode``: no FLOPs, raises on CPU/CUDA device mismatches and on data-dependent Python
  branches), in float32 and under CUDA autocast (bfloat16, float16), with no hidden host
  synchronisation and nothing created on the CPU inside ``forward`` beyond the listed exceptions.

Models are the shipped configs shrunk in width (channels, hidden size, queries, at most 2 decoder
layers, 1 encoder layer) with their structure kept (depth, levels, variant, switches). Configs whose ``MODEL`` section
is identical after shrinking (schedules, ``Base-*`` files) build the same model and run once.
"""
import glob
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from smca_detr.config import add_smca_detr_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))
                      + glob.glob(os.path.join(REPO, "configs", "demo", "*.yaml"))
                      + glob.glob(os.path.join(REPO, "configs", "convergence", "*.yaml")))


def shrunk_cfg(path, extra=()):
    """``path`` with small widths, 1 encoder layer (multi-scale SMCA: one of each layer kind) and at
    most 2 decoder layers, R101 as R50; levels, variant and switches kept.
    detectron2's deformable convolution (DCN config) has no CPU / fake-tensor kernel: its stages
    become plain convolutions (the transformer side, which these tests check, is unchanged)."""
    cfg = add_smca_detr_config(get_cfg())
    cfg.merge_from_file(path)
    r, c = cfg.MODEL.RESNETS, cfg.MODEL.SMCA_DETR
    opts = ["MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False] * 4, "MODEL.RESNETS.STEM_OUT_CHANNELS", 8,
            "MODEL.SMCA_DETR.HIDDEN_DIM", 32, "MODEL.SMCA_DETR.NHEADS", 4, "MODEL.SMCA_DETR.DIM_FEEDFORWARD", 32,
            "MODEL.SMCA_DETR.NUM_QUERIES", 12, "MODEL.SMCA_DETR.DEFORMABLE.TWO_STAGE_NUM_PROPOSALS", 12,
            "MODEL.SMCA_DETR.DEC_LAYERS", min(c.DEC_LAYERS, 2), "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]
    layout = c.SMCA.ENCODER_LAYOUT
    layout = layout.split(",") if isinstance(layout, str) else list(layout)
    if c.TRANSFORMER == "SMCAMultiScaleTransformer":  # each encoder layer kind once, in order
        kinds = [k.strip() for i, k in enumerate(layout) if k.strip() not in [x.strip() for x in layout[:i]]]
        opts += ["MODEL.SMCA_DETR.SMCA.ENCODER_LAYOUT", kinds, "MODEL.SMCA_DETR.ENC_LAYERS", len(kinds)]
    else:
        opts += ["MODEL.SMCA_DETR.ENC_LAYERS", min(c.ENC_LAYERS, 1)]
    if r.DEPTH == 101:  # R101 only repeats R50's blocks: same modules, same code paths
        opts += ["MODEL.RESNETS.DEPTH", 50]
    if r.DEPTH >= 50:
        opts += ["MODEL.RESNETS.RES2_OUT_CHANNELS", 16, "MODEL.RESNETS.WIDTH_PER_GROUP", 4]
    elif cfg.MODEL.BACKBONE.NAME != "build_resnet_backbone":  # detectron2's R18/34 needs 64 channels
        opts += ["MODEL.RESNETS.RES2_OUT_CHANNELS", 8]
    cfg.merge_from_list(opts + list(extra))
    return cfg


def _distinct_models():
    """One config file per distinct shrunk ``MODEL`` section (first in name order)."""
    seen, out = set(), []
    for path in CONFIG_FILES:
        key = shrunk_cfg(path).MODEL.dump()
        if key not in seen:
            seen.add(key)
            out.append(os.path.relpath(path, os.path.join(REPO, "configs")))
    return out


MODELS = _distinct_models()
CASES = [(name, ()) for name in MODELS]
# switches that change which modules run, on one config of each transformer
FAMILIES = ["detr_r50.yaml", "smca_r50.yaml", "smca_r50_ms.yaml", "smca_r50_conv_ms.yaml",
            "conditional_detr_r50.yaml", "deformable_detr_r50.yaml", "deformable_detr_r50_refine.yaml",
            "deformable_detr_r50_two_stage.yaml"]
CASES += [(name, ("MODEL.SMCA_DETR.DEC_LAYERS", 1)) for name in FAMILIES]
CASES += [(name, ("MODEL.SMCA_DETR.DEEP_SUPERVISION", False)) for name in FAMILIES]
CASES += [(name, ("MODEL.SMCA_DETR.SMCA.DYNAMIC_SCALE", t)) for name in ("smca_r50.yaml", "smca_r50_ms.yaml")
          for t in ("type1", "type2", "type4")]
CASES += [(name, ("MODEL.SMCA_DETR.SMCA.HEAD_SHARED", True)) for name in ("smca_r50.yaml", "smca_r50_ms.yaml")]
CASES += [("smca_r50_ms.yaml", ("MODEL.SMCA_DETR.SMCA.SCALE_SELECTION", False))]


def training_batch(num_classes, sizes=((64, 64), (40, 56))):
    """Two images of different sizes (so the batch has padding), two boxes each."""
    g = torch.Generator().manual_seed(0)
    batch = []
    for h, w in sizes:
        boxes = torch.tensor([[2.0, 3.0, 0.5 * w, 0.8 * h], [0.3 * w, 0.2 * h, 0.9 * w, 0.6 * h]])
        inst = Instances((h, w), gt_boxes=Boxes(boxes), gt_classes=torch.tensor([0, num_classes - 1]))
        batch.append({"image": torch.rand(3, h, w, generator=g) * 255, "height": h, "width": w,
                      "instances": inst})
    return batch


# ------------------------------------------------------------------------------ unused parameters
@pytest.mark.parametrize("name,extra", CASES, ids=[f"{n}{'-' + '-'.join(map(str, e)) if e else ''}"
                                                   for n, e in CASES])
def test_every_trainable_parameter_gets_a_gradient(name, extra):
    """DDP (plain, as the Trainer wraps the model) needs every trainable parameter in the graph of the
    loss; otherwise the second iteration fails with "Expected to have finished reduction in the prior
    iteration". A zero gradient is fine, a missing one is not."""
    cfg = shrunk_cfg(os.path.join(REPO, "configs", name), extra)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    losses = model(training_batch(cfg.MODEL.SMCA_DETR.NUM_CLASSES))
    sum(losses.values()).backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def _as_official_conditional(sd):
    """Our Conditional DETR state dict (transformer and heads) back in the official key layout."""
    renames = (("transformer.input.input_proj.", "input_proj."), ("transformer.query_embed.", "query_embed."),
               ("heads.class_embed.", "class_embed."), ("heads.bbox_embed.", "bbox_embed."))
    out = {}
    for k, v in sd.items():
        if k.startswith("backbone."):
            continue
        for ours, official in renames:
            if k.startswith(ours):
                k = official + k[len(ours):]
        out[k] = v
    return out


def test_one_layer_conditional_converter_drops_the_unused_query_scale(caplog):
    """The official one-layer decoder still has ``query_scale`` weights (never used); ours does not
    build the module, so the converter drops them, saying why, and the rest loads strictly."""
    from smca_detr.checkpoint.conditional import convert_official_conditional_detr

    path = os.path.join(REPO, "configs", "conditional_detr_r50.yaml")
    torch.manual_seed(0)
    two = build_model(shrunk_cfg(path, ("MODEL.SMCA_DETR.DEC_LAYERS", 2)))
    official = {k: v for k, v in _as_official_conditional(two.state_dict()).items()
                if not k.startswith("transformer.decoder.layers.1.")}
    assert "transformer.decoder.query_scale.layers.0.weight" in official
    one = build_model(shrunk_cfg(path, ("MODEL.SMCA_DETR.DEC_LAYERS", 1)))
    assert one.transformer.decoder.query_scale is None
    with caplog.at_level("INFO", logger="smca_detr.checkpoint.conditional"):
        converted = convert_official_conditional_detr(official, keep_all_classes=True)
    assert "query_scale" in caplog.text and "one layer" in caplog.text
    assert not any("query_scale" in k for k in converted)
    result = one.load_state_dict(converted, strict=False)
    assert result.unexpected_keys == [] and all(k.startswith("backbone.") for k in result.missing_keys)
    # a deeper decoder uses T: its weights are kept
    kept = convert_official_conditional_detr(_as_official_conditional(two.state_dict()), keep_all_classes=True)
    assert torch.equal(kept["transformer.decoder.query_scale.layers.0.weight"],
                       two.transformer.decoder.query_scale.layers[0].weight)
