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
import collections
import contextlib
import glob
import os
import traceback

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
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
            "MODEL.SMCA_DETR.NUM_QUERIES", 12,
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


# ------------------------------------------------------------------------------ fake CUDA
def _where():
    """Innermost smca_detr / detectron2 frame: ``file:function``."""
    for frame in reversed(traceback.extract_stack()):
        if "smca_detr" + os.sep in frame.filename or "detectron2" + os.sep in frame.filename:
            return f"{os.path.basename(frame.filename)}:{frame.name}"
    return "?"


class HostTraffic(TorchDispatchMode):
    """Records, by code location, every device-to-host copy, every blocking host-to-device copy,
    every op computing on the CPU and every op mixing CPU tensors (not 0-d) into a CUDA op (an
    implicit blocking copy). Tensors made from Python data (``torch.tensor``) are host literals and
    not recorded; their non-blocking copy to the device is allowed. Reading a value on the host
    (``.item()``, ``bool(t)``) raises in FakeTensorMode by itself."""

    COPIES = ("aten._to_copy.default", "aten.copy_.default")

    def __init__(self):
        super().__init__()
        self.events = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func)
        if name.startswith("prim.") or name.startswith("aten.lift_fresh"):
            return out
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        tensors += [x for a in args if isinstance(a, (list, tuple)) for x in a if isinstance(x, torch.Tensor)]
        if _STAND_IN_RUNNING:
            return out
        ins = {t.device.type for t in tensors if t.dim() > 0}
        outs = {o.device.type for o in (out if isinstance(out, (tuple, list)) else [out])
                if isinstance(o, torch.Tensor)}
        if name in self.COPIES and ins != outs:
            non_blocking = kwargs.get("non_blocking", len(args) > 2 and args[2])
            if "cpu" in outs:
                self.events.append(("device-to-host copy", _where()))
            elif not non_blocking:
                self.events.append(("blocking host-to-device copy", _where()))
        elif "cpu" in outs:
            self.events.append((f"CPU op {name}", _where()))
        elif "cpu" in ins:
            self.events.append((f"CPU tensor in a CUDA op {name}", _where()))
        return out


# What remains on the host in a training step (and in inference), and why. Nothing else may appear.
ALLOWED_HOST_TRAFFIC = {
    # THE one transfer of the matching: the costs of all matched layers (final, auxiliary, encoder)
    # and their finiteness flags reach the host together, for scipy's Hungarian algorithm
    ("device-to-host copy", "matcher.py:match_many"): 1,
    # the matcher's CPU indices, concatenated before their one non-blocking copy to the device
    ("CPU op aten.cat.default", "criterion.py:_indices_to"): 1,
}
# Not in this list:
# * the box count: under DDP one all-reduce and one transfer (SetCriterion.num_boxes); a single
#   process (as here) counts on the host;
# * the logging-only metrics (class_error, cardinality_error per layer): one stacked transfer per
#   step while a detectron2 EventStorage is active (training); not active here, storing reads values.
# Substituted here, because they need values: the Hungarian assignment itself
# (HungarianMatcher.solve, scipy on the host copy) returns a fixed index set; detectron2's
# detector_postprocess at the end of inference (box finiteness assert, empty-box filter of
# data-dependent size) returns its input; it reads results that inference hands to the host anyway.


@contextlib.contextmanager
def cuda_autocast(dtype):
    """``torch.autocast("cuda", dtype)`` without a GPU (torch.autocast disables itself there): the
    dispatcher's CUDA autocast state, set and restored."""
    prev = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"), torch.is_autocast_cache_enabled())
    torch.set_autocast_enabled("cuda", dtype is not None)
    torch.set_autocast_cache_enabled(False)  # cached weight casts would outlive this test's fake mode
    if dtype is not None:
        torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", prev[0])
        torch.set_autocast_dtype("cuda", prev[1])
        torch.clear_autocast_cache()
        torch.set_autocast_cache_enabled(prev[2])


_STAND_IN_RUNNING = False


def _fixed_assignment(self, host, shapes):
    """Stand-in for the Hungarian assignment on the host (needs values): query i <-> target i. Its
    own CPU tensors are not recorded (the real one makes them on the host too)."""
    global _STAND_IN_RUNNING
    _STAND_IN_RUNNING = True
    try:
        return [[(torch.arange(n), torch.arange(n)) for n in sizes] for _, sizes in shapes]
    finally:
        _STAND_IN_RUNNING = False


def _no_cpu_backbone(*args, **kwargs):
    raise AssertionError("the fused CPU backbone path was taken for CUDA inputs")


@pytest.fixture
def substitutes(monkeypatch):
    from smca_detr.layers.cpu import fused_resnet
    from smca_detr.modeling import meta_arch
    from smca_detr.modeling.matcher import HungarianMatcher

    monkeypatch.setattr(HungarianMatcher, "solve", _fixed_assignment)
    monkeypatch.setattr(meta_arch, "detector_postprocess", lambda results, h, w: results)
    monkeypatch.setattr(fused_resnet, "fused_resnet_forward", _no_cpu_backbone)
    monkeypatch.setattr(fused_resnet, "fused_training_forward", _no_cpu_backbone)


def to_fake_cuda(model, mode):
    """A real CPU model with its parameters and buffers replaced by fake CUDA copies. (Building the
    model inside FakeTensorMode on a default ``cuda`` device crashed the process later, on this
    GPU-less machine; ``Module.to`` cannot swap fake tensors.)"""
    for m in model.modules():
        for n, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[n] = torch.nn.Parameter(mode.from_tensor(p).to("cuda"), requires_grad=p.requires_grad)
        for n, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[n] = mode.from_tensor(b).to("cuda")
    return model


def fake_batch(mode, batch):
    """A real training batch as the data loader hands it over: fake CPU tensors."""
    out = []
    for x in batch:
        inst = x["instances"]
        out.append({**x, "image": mode.from_tensor(x["image"]),
                    "instances": Instances(inst.image_size, gt_boxes=Boxes(mode.from_tensor(inst.gt_boxes.tensor)),
                                           gt_classes=mode.from_tensor(inst.gt_classes))})
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", MODELS)
def test_fake_cuda_training_and_inference_under_autocast(substitutes, name, dtype):
    """Every shipped config on a fake ``cuda`` device, under CUDA autocast: a training forward + loss
    and inference with no device mismatch, no host read-back (FakeTensorMode raises), no host
    traffic beyond ALLOWED_HOST_TRAFFIC, and these dtypes (documented in PredictionHeads.forward):
    pred_logits / pred_boxes float32 (the heads' linear layers run in ``dtype``, their outputs are
    upcast and the box sigmoid taken in float32); losses float32; inference scores / boxes float32."""
    from detectron2.modeling import META_ARCH_REGISTRY

    cfg = shrunk_cfg(os.path.join(REPO, "configs", name), ("MODEL.DEVICE", "cuda"))
    torch.manual_seed(0)
    model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    real_batch = training_batch(cfg.MODEL.SMCA_DETR.NUM_CLASSES)
    traffic = HostTraffic()
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        model = to_fake_cuda(model, mode)
        assert {t.device.type for t in list(model.parameters()) + list(model.buffers())} == {"cuda"}
        batch = fake_batch(mode, real_batch)
        with cuda_autocast(dtype), traffic:
            model.train()
            images = model.preprocess_image(batch)
            features, masks = model.backbone(images.tensor, images.image_sizes)
            out = model.forward_features(features, masks, images.image_sizes)
            losses = model.criterion(out, model.prepare_targets(batch, images.image_sizes))
            model.eval()
            results = model(batch)
    assert features[0].dtype == dtype  # autocast is on
    assert out["pred_logits"].dtype == out["pred_boxes"].dtype == torch.float32
    assert out["pred_logits"].device.type == out["pred_boxes"].device.type == "cuda"
    assert losses and all(v.dtype == torch.float32 and v.device.type == "cuda" for v in losses.values())
    inst = results[0]["instances"]
    assert inst.scores.dtype == inst.pred_boxes.tensor.dtype == torch.float32
    assert inst.scores.device.type == inst.pred_boxes.tensor.device.type == "cuda"
    counts = collections.Counter(traffic.events)
    assert dict(counts) == ALLOWED_HOST_TRAFFIC
