"""Padding and batch composition do not change the detections: images of different sizes batched
together vs. one at a time, through the whole model and through the transformer alone with noise in
the padded positions (every model family; the families that see the padded maps by design, as the
official code does, are strict xfails, as is a larger padded canvas through the backbone).
"""
import pytest
import torch

from smca_detr.modeling.registry import TRANSFORMER_REGISTRY
from train_step_helpers import FAMILIES, _assert_same_detections, _batch, build, make_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _instances_rows(instances):
    return [[int(c), *b, float(s)] for c, b, s in zip(instances.pred_classes.tolist(),
                                                        instances.pred_boxes.tensor.tolist(),
                                                        instances.scores.tolist())]


def _one_vs_batched(family, sizes):
    cfg = make_cfg(["MODEL.SMCA_DETR.TEST_TOPK", "1000"], family=family)
    model = build(cfg).eval()
    batch = _batch(sizes, [0] * len(sizes), seed=4)
    with torch.no_grad():
        alone = {i: _instances_rows(model([x])[0]["instances"]) for i, x in enumerate(batch)}
        together = {i: _instances_rows(o["instances"]) for i, o in enumerate(model(batch))}
    return alone, together


@pytest.mark.parametrize("family", ["DETRTransformer", "SMCATransformer", "DeformableTransformer"])
def test_test_batch_size_does_not_change_detections(family):
    """The whole model, images of different sizes whose padded canvas is the one they get alone
    (sides up to one multiple of the largest stride): different padding masks inside the batch (seen
    by Deformable's finer levels), per-image top-k and rescaling must not leak between images."""
    if family not in TRANSFORMER_REGISTRY:
        pytest.skip(f"{family} is not registered (yet)")
    alone, together = _one_vs_batched(family, [(64, 64), (50, 40), (33, 60), (40, 64)])
    _assert_same_detections(alone, together, atol=1e-4)


@pytest.mark.xfail(strict=True, reason=(
    "known limitation, as in the official code: when the batch pads an image to a larger canvas than it "
    "gets alone, the backbone's convolutions near the image border see the padded pixels (BN-shifted "
    "after the first layer) instead of a conv's zero padding, so batched inference differs from one image "
    "at a time. detectron2's test loader runs one image per process, so evaluation is unaffected."))
def test_test_batch_size_with_a_larger_padded_canvas():
    alone, together = _one_vs_batched("DETRTransformer", [(64, 64), (96, 80), (64, 20)])
    _assert_same_detections(alone, together, atol=1e-4)


def _padded_features(model, sizes, garbage, seed=0):
    """Backbone-level inputs: each image's own feature maps (its own canvas, as alone) pasted into a
    larger batch canvas whose padded positions hold ``garbage``-scaled noise."""
    from smca_detr.modeling.backbone import image_padding_mask, resize_mask

    g = torch.Generator().manual_seed(seed)
    div, shapes = model.backbone.size_divisibility, model.backbone.output_shapes
    canvases = [(-(-h // div) * div, -(-w // div) * div) for h, w in sizes]
    hw = (max(c[0] for c in canvases), max(c[1] for c in canvases))
    own = [[torch.randn(1, s.channels, c[0] // s.stride, c[1] // s.stride, generator=g) for s in shapes]
           for c in canvases]
    batched = [torch.randn(len(sizes), s.channels, hw[0] // s.stride, hw[1] // s.stride, generator=g) * garbage
               for s in shapes]
    for i, levels in enumerate(own):
        for b, f in zip(batched, levels):
            b[i, :, :f.shape[2], :f.shape[3]] = f[0]

    def masks(image_sizes, canvas, features):
        m = image_padding_mask(image_sizes, canvas)
        return [resize_mask(m, f.shape[-2:]) for f in features]

    alone = [(own[i], masks([sizes[i]], canvases[i], own[i]), [sizes[i]]) for i in range(len(sizes))]
    return (batched, masks(sizes, hw, batched), sizes), alone


PADDING_DEPENDENT = {  # by design, as in the official implementations
    "SMCAMultiScaleTransformer": "the extra stride-64 level is a stride-2 conv over the padded last level and "
                                 "its mask is the last level's mask resized to it",
    "SMCAConvMultiScaleTransformer": "convolutional encoder layers and memory conv over the padded maps",
    "DeformableTransformer": "input projections are GroupNorm'ed over the padded maps; the extra level is a "
                             "stride-2 conv over the padded last level",
}


@pytest.mark.parametrize("family", [
    pytest.param(f, marks=pytest.mark.xfail(strict=True, reason="padding-dependent by design (official code "
                                            "too): " + PADDING_DEPENDENT[f.split("/")[0]]))
    if f.split("/")[0] in PADDING_DEPENDENT else f for f in FAMILIES])
def test_transformer_ignores_padded_positions(family):
    """Backbone levels of 4 images of different sizes, batched with noise in the padding vs. each
    image alone on its own canvas: the transformer + heads outputs must agree (masks, position
    encodings, per-image sizes)."""
    name = family.split("/")[0]
    if name not in TRANSFORMER_REGISTRY:
        pytest.skip(f"{name} is not registered (yet)")
    model = build(make_cfg(family=family)).eval()
    (features, masks, sizes), alone = _padded_features(model, [(64, 64), (96, 80), (40, 120), (70, 33)], 10.0)
    with torch.no_grad():
        together = model.forward_features(features, masks, sizes)
        for i, (f, m, s) in enumerate(alone):
            one = model.forward_features(f, m, s)
            for key in ("pred_logits", "pred_boxes"):
                torch.testing.assert_close(one[key][:, 0], together[key][:, i], rtol=1e-5, atol=1e-5,
                                           msg=f"{key} of image {i}")
