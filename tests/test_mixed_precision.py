"""Mixed precision (autocast bf16 / fp16, GradScaler) numerics on CPU: the SMCA Gaussian prior in
float32, finite attention masks in fp16, gradient clipping on unscaled gradients with fused AdamW."""
import copy

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec

from smca_detr.config import add_smca_detr_config
from smca_detr.modeling.transformers.smca import SMCADecoderLayer, SMCATransformer
from smca_detr.modeling.transformers.smca_conv_multiscale import SMCAConvMultiScaleTransformer
from smca_detr.modeling.transformers.smca_multiscale import MultiScaleSMCADecoderLayer, SMCAMultiScaleTransformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HALF = [torch.bfloat16, torch.float16]
# (transformer, backbone levels (channels, stride), decoder layer class, name of its prior method)
SMCA_KINDS = {
    "single": (SMCATransformer, [(20, 32)], SMCADecoderLayer, "spatial_prior"),
    "paper_multiscale": (SMCAMultiScaleTransformer, [(12, 16), (20, 32)], MultiScaleSMCADecoderLayer,
                         "multi_scale_prior"),
    "conv_multiscale": (SMCAConvMultiScaleTransformer, [(8, 8), (12, 16), (20, 32)], MultiScaleSMCADecoderLayer,
                        "multi_scale_prior"),
}
# detectron2 (h, w) image sizes: 1333 is not representable in bf16 (-> 1336), 2049 not in fp16
IMAGE_SIZES = [(800, 1333), (750, 2049)]


def _smca_transformer(kind):
    cls, levels, _, _ = SMCA_KINDS[kind]
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
    return tr, feats, masks


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", list(SMCA_KINDS))
def test_smca_prior_and_image_sizes_are_float32_under_autocast(kind, dtype, monkeypatch):
    """Under autocast every SMCA transformer gets the exact image sizes (1333, 2049) in float32 and
    computes its Gaussian prior (heads, centres, distances) exactly as the float32 computation."""
    tr, feats, masks = _smca_transformer(kind)
    _, _, layer_cls, method = SMCA_KINDS[kind]
    real = getattr(layer_cls, method)
    calls = []

    def spy(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        # copies: single-scale SMCA masks the fresh bias in place afterwards
        calls.append((self, args, kwargs, tuple(None if r is None else r.clone() for r in result)))
        return result

    monkeypatch.setattr(layer_cls, method, spy)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out = tr(feats, masks, IMAGE_SIZES)
    assert torch.isfinite(out.hs).all()
    assert len(calls) == 2  # one per decoder layer
    exact_wh = torch.tensor([[w, h] for h, w in IMAGE_SIZES], dtype=torch.float32)
    for layer, (x, ref, wh, *rest), kwargs, (bias, new_ref, logit) in calls:
        assert wh.dtype == torch.float32 and torch.equal(wh, exact_wh)
        assert bias.dtype == torch.float32 and new_ref.dtype == torch.float32
        # the same prior, computed outside autocast from the float32 inputs, is identical
        with torch.no_grad():
            expect_bias, expect_ref, _ = real(layer, x.float(), None if ref is None else ref.float(), exact_wh,
                                              *rest, **kwargs)
        assert torch.equal(bias, expect_bias) and torch.equal(new_ref, expect_ref)
