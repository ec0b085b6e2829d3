"""Shared DETR machinery: box ops, GIoU, focal loss, position encoding, matcher, criterion."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from smca_detr.modeling.box_ops import (box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh,
                                        generalized_box_iou)
from smca_detr.modeling.criterion import SetCriterion, sigmoid_focal_loss
from smca_detr.modeling.blocks import MLP, MultiheadAttention, attention, inverse_sigmoid, use_explicit_softmax
from smca_detr.modeling.matcher import HungarianMatcher
from smca_detr.modeling.position_encoding import PositionEmbeddingSine, sine_embed


def rand_boxes(n, gen, dtype=torch.float64):
    cxcy = torch.rand(n, 2, generator=gen, dtype=dtype) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=gen, dtype=dtype) * 0.3 + 0.05
    return torch.cat([cxcy, wh], -1)


# ---------------------------------------------------------------- box ops
def test_box_conversion_round_trip():
    g = torch.Generator().manual_seed(0)
    b = rand_boxes(17, g)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(b)), b, atol=1e-15, rtol=0)
    xyxy = box_cxcywh_to_xyxy(b)
    assert torch.all(xyxy[:, 2:] > xyxy[:, :2])
    torch.testing.assert_close(xyxy[0], torch.stack([b[0, 0] - b[0, 2] / 2, b[0, 1] - b[0, 3] / 2,
                                                     b[0, 0] + b[0, 2] / 2, b[0, 1] + b[0, 3] / 2]))


def _giou_formula(a, b):
    """GIoU of two xyxy boxes from its definition, in plain Python."""
    ax0, ay0, ax1, ay1 = a
    bx0, by0, bx1, by1 = b
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def test_giou_matches_formula():
    g = torch.Generator().manual_seed(1)
    a = box_cxcywh_to_xyxy(rand_boxes(5, g))
    b = box_cxcywh_to_xyxy(rand_boxes(7, g))
    got = generalized_box_iou(a, b)
    for i, j in itertools.product(range(5), range(7)):
        assert got[i, j].item() == pytest.approx(_giou_formula(a[i].tolist(), b[j].tolist()), abs=1e-12)
    # identical boxes: GIoU = IoU = 1; disjoint far boxes: GIoU < 0
    torch.testing.assert_close(torch.diag(generalized_box_iou(a, a)), torch.ones(5, dtype=a.dtype))
    far = torch.tensor([[0.0, 0.0, 0.1, 0.1], [0.9, 0.9, 1.0, 1.0]], dtype=torch.float64)
    assert generalized_box_iou(far[:1], far[1:]).item() < 0
    assert box_iou(far[:1], far[1:])[0].item() == 0


# ---------------------------------------------------------------- focal loss
def test_sigmoid_focal_loss_formula():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    t = (torch.rand(4, 6, generator=g) > 0.7).double()
    alpha, gamma = 0.25, 2.0
    p = torch.sigmoid(x)
    expected = torch.where(t == 1, -alpha * (1 - p) ** gamma * torch.log(p),
                           -(1 - alpha) * p ** gamma * torch.log(1 - p))
    torch.testing.assert_close(sigmoid_focal_loss(x, t, alpha, gamma), expected, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------- position encodings
def test_position_embedding_sine_formula():
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[0, :, 3] = True  # last column padded
    d_half = 6
    pos = PositionEmbeddingSine(d_half, temperature=100)(mask)
    assert pos.shape == (1, 2 * d_half, 3, 4)
    # y block first: row i (1-based count) normalised by the number of valid rows (3)
    i, j, k = 1, 2, 4
    y = (i + 1) / (3 + 1e-6) * 2 * math.pi
    x = (j + 1) / (3 + 1e-6) * 2 * math.pi
    freq = 100 ** (2 * (k // 2) / d_half)
    assert pos[0, k, i, j].item() == pytest.approx(math.sin(y / freq), abs=1e-6)
    assert pos[0, d_half + k + 1, i, j].item() == pytest.approx(math.cos(x / freq), abs=1e-6)
    # Deformable variant: count - 0.5
    pos_d = PositionEmbeddingSine(d_half, temperature=100, offset=-0.5)(mask)
    y_d = (i + 1 - 0.5) / (3 + 1e-6) * 2 * math.pi
    assert pos_d[0, k, i, j].item() == pytest.approx(math.sin(y_d / freq), abs=1e-6)
    # padding does not change the encoding of valid positions when the pad grows
    bigger = torch.ones(1, 5, 7, dtype=torch.bool)
    bigger[0, :3, :3] = False
    torch.testing.assert_close(PositionEmbeddingSine(d_half)(bigger)[..., :3, :3],
                               PositionEmbeddingSine(d_half)(mask)[..., :3, :3])


def test_sine_embed_blocks_and_order():
    pts = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    emb = sine_embed(pts, 4)
    assert emb.shape == (1, 8)
    for c, v in enumerate(pts[0].tolist()):
        for k in range(4):
            f = 10000 ** (2 * (k // 2) / 4)
            ref = math.sin(v * 2 * math.pi / f) if k % 2 == 0 else math.cos(v * 2 * math.pi / f)
            assert emb[0, c * 4 + k].item() == pytest.approx(ref, abs=1e-12)
    torch.testing.assert_close(sine_embed(pts.flip(-1), 4), torch.cat([emb[:, 4:], emb[:, :4]], -1))


def test_inverse_sigmoid_and_mlp():
    x = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    out = inverse_sigmoid(x)
    assert out[0].item() == pytest.approx(math.log(1e-5 / 1), rel=1e-9)
    assert out[1].item() == pytest.approx(math.log(0.3 / 0.7), rel=1e-12)
    assert out[2].item() == pytest.approx(math.log(1 / 1e-5), rel=1e-9)
    mlp = MLP(4, 8, 2, 3)
    assert [tuple(l.weight.shape) for l in mlp.layers] == [(8, 4), (8, 8), (2, 8)]


def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    ours = MultiheadAttention(16, 4).double().eval()
    ref = torch.nn.MultiheadAttention(16, 4).double().eval()
    ref.load_state_dict(ours.state_dict())
    q, k = torch.randn(2, 3, 16).double(), torch.randn(2, 5, 16).double()
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    out, _ = ours(q, k, k, key_padding_mask=pad)
    exp, _ = ref(q.transpose(0, 1), k.transpose(0, 1), k.transpose(0, 1), key_padding_mask=pad)
    torch.testing.assert_close(out, exp.transpose(0, 1), atol=1e-12, rtol=1e-10)
    out_w, w = ours(q, k, k, key_padding_mask=pad, need_weights=True)
    torch.testing.assert_close(out_w, out, atol=1e-12, rtol=1e-10)
    assert torch.all(w[1, :, :, 3:] == 0)
    with pytest.raises(ValueError, match="NHEADS"):
        MultiheadAttention(10, 4)


def test_attention_kernel_policy_and_paths():
    """One kernel, one policy: SDPA unless weights / segments are asked for or (CPU) dropout, a mask
    with a gradient or value heads narrower than q/k; both paths give the same float64 result."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 4, 8, generator=g, dtype=torch.float64), torch.randn(2, 3, 6, 8, generator=g,
                                                                                 dtype=torch.float64)
    v, v_narrow = torch.randn(2, 3, 6, 8, generator=g, dtype=torch.float64), torch.randn(2, 3, 6, 4, generator=g,
                                                                                         dtype=torch.float64)
    bias = torch.randn(2, 1, 4, 6, generator=g, dtype=torch.float64)
    bias[1, ..., 4:] = float("-inf")
    assert not use_explicit_softmax(q, v, bias, 0.0, False, False)
    assert use_explicit_softmax(q, v, bias, 0.0, True, False) and use_explicit_softmax(q, v, bias, 0.0, False, True)
    assert use_explicit_softmax(q, v, bias, 0.1, False, False)
    assert use_explicit_softmax(q, v_narrow, bias, 0.0, False, False)
    assert use_explicit_softmax(q, v, bias.clone().requires_grad_(), 0.0, False, False)
    with torch.no_grad():
        assert not use_explicit_softmax(q, v, bias.clone().requires_grad_(), 0.0, False, False)
    for vv in (v, v_narrow):
        ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8) + bias, -1)
        out, w = attention(q, k, vv, bias.clone(), need_weights=True)
        torch.testing.assert_close(w, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out, ref @ vv, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(attention(q, k, vv, bias)[0], ref @ vv, rtol=1e-12, atol=1e-12)
    # segmented: softmax within each key segment, times the per-query segment weights
    alpha = torch.rand(2, 1, 4, 2, generator=g, dtype=torch.float64)
    out, w = attention(q, k, v, bias.clone(), need_weights=True, segments=[2, 4], segment_weights=alpha)
    ref = torch.cat([torch.softmax(x, -1) * alpha[..., i:i + 1] for i, x in
                     enumerate((q @ k.transpose(-1, -2) / math.sqrt(8) + bias).split([2, 4], -1))], -1)
    torch.testing.assert_close(w, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, ref @ v, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- matcher
def _brute_force(cost):
    n_q, n_t = cost.shape
    best, best_perm = float("inf"), None
    for perm in itertools.permutations(range(n_q), n_t):
        c = sum(cost[perm[j], j].item() for j in range(n_t))
        if c < best:
            best, best_perm = c, perm
    return best, best_perm


@pytest.mark.parametrize("focal", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matcher_is_optimal_against_brute_force(focal, seed):
    g = torch.Generator().manual_seed(seed)
    bs, nq, nc = 2, 5, 4
    logits = torch.randn(bs, nq, nc, generator=g)
    boxes = torch.stack([rand_boxes(nq, g, torch.float32) for _ in range(bs)])
    targets = [{"labels": torch.randint(0, nc - 1, (n,), generator=g), "boxes": rand_boxes(n, g, torch.float32)}
               for n in (3, 2)]
    m = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2, focal=focal)
    indices = m(logits, boxes, targets)
    for b, (qi, ti) in enumerate(indices):
        t = targets[b]
        cost = (2 * m.class_cost(logits[b], t["labels"]) + 5 * torch.cdist(boxes[b], t["boxes"], p=1)
                - 2 * generalized_box_iou(box_cxcywh_to_xyxy(boxes[b]), box_cxcywh_to_xyxy(t["boxes"])))
        best, _ = _brute_force(cost)
        got = cost[qi, ti].sum().item()
        assert got == pytest.approx(best, abs=1e-5)
        assert sorted(ti.tolist()) == list(range(len(t["labels"])))
        assert qi.dtype == torch.int64 and torch.all(qi[1:] > qi[:-1])


def test_matcher_focal_class_cost_formula():
    m = HungarianMatcher(focal=True)
    logits = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64)
    p = torch.sigmoid(logits)
    lab = torch.tensor([2, 0])
    exp = (0.25 * (1 - p) ** 2 * -torch.log(p + 1e-8) - 0.75 * p ** 2 * -torch.log(1 - p + 1e-8))[:, lab]
    torch.testing.assert_close(m.class_cost(logits, lab), exp)
    soft = HungarianMatcher(focal=False)
    torch.testing.assert_close(soft.class_cost(logits, lab), -logits.softmax(-1)[:, lab])


def test_matcher_empty_targets_and_non_finite():
    m = HungarianMatcher()
    logits, boxes = torch.randn(2, 4, 3), torch.rand(2, 4, 4)
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    one = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    for targets in ([empty, empty], [empty, one]):
        idx = m(logits, boxes, targets)
        assert len(idx[0][0]) == 0 and idx[0][0].dtype == torch.int64
    assert len(m(logits, boxes, [empty, one])[1][0]) == 1
    bad = boxes.clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        m(logits, bad, [one, one])


def test_matcher_costs_in_float32_under_autocast():
    m = HungarianMatcher(focal=True)
    g = torch.Generator().manual_seed(3)
    logits, boxes = torch.randn(1, 6, 3, generator=g), torch.rand(1, 6, 4, generator=g) * 0.5 + 0.25
    tg = [{"labels": torch.tensor([0, 2]), "boxes": rand_boxes(2, g, torch.float32)}]
    ref = m(logits, boxes, tg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(logits.bfloat16(), boxes.bfloat16(), tg)
    ref_bf = m(logits.bfloat16().float(), boxes.bfloat16().float(), tg)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, ref_bf))
    assert len(ref[0][0]) == 2


# ---------------------------------------------------------------- criterion
def _criterion(focal, nc):
    return SetCriterion(matcher=HungarianMatcher(cost_class=2 if focal else 1, focal=focal),
                        num_logits=nc, class_loss="focal" if focal else "softmax",
                        class_weight=2.0 if focal else 1.0)


def test_criterion_softmax_losses_by_hand():
    crit = _criterion(False, 3)  # 2 classes + no-object
    logits = torch.randn(2, 1, 4, 3, dtype=torch.float64)
    boxes = torch.rand(2, 1, 4, 4, dtype=torch.float64) * 0.4 + 0.3
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]], dtype=torch.float64)}]
    losses, idx = crit.compute({"pred_logits": logits, "pred_boxes": boxes}, targets)
    q, t = idx["final"][0]
    tc = torch.full((4,), 2)
    tc[q] = 1
    w = torch.tensor([1.0, 1.0, 0.1], dtype=torch.float64)
    torch.testing.assert_close(losses["loss_ce"], F.cross_entropy(logits[-1, 0], tc, w))
    torch.testing.assert_close(losses["loss_bbox"], (boxes[-1, 0, q] - targets[0]["boxes"][t]).abs().sum())
    assert set(losses) >= {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "class_error", "cardinality_error"}
    weighted = crit.weighted(losses)
    assert "class_error" not in weighted and "cardinality_error_0" not in weighted
    assert weighted["loss_bbox_0"] == losses["loss_bbox_0"] * 5


def test_criterion_focal_and_empty_targets():
    crit = _criterion(True, 3)
    logits = torch.randn(2, 2, 5, 3)
    boxes = torch.rand(2, 2, 5, 4) * 0.4 + 0.3
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    losses, _ = crit.compute({"pred_logits": logits, "pred_boxes": boxes}, [empty, empty])
    # nothing matched: the focal loss pushes every logit down, boxes contribute nothing
    exp = sigmoid_focal_loss(logits[-1], torch.zeros_like(logits[-1])).sum() / 1
    torch.testing.assert_close(losses["loss_ce"], exp)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    one = {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    out = crit({"pred_logits": logits.requires_grad_(), "pred_boxes": boxes}, [empty, one])
    sum(out.values()).backward()
    assert torch.isfinite(logits.grad).all()


def test_criterion_two_stage_encoder_term_uses_class_zero():
    crit = _criterion(True, 3)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 1, 4, 3, generator=g)
    boxes = torch.rand(2, 1, 4, 4, generator=g) * 0.4 + 0.3
    enc = {"pred_logits": torch.randn(1, 6, 3, generator=g), "pred_boxes": torch.rand(1, 6, 4, generator=g) * 0.4 + 0.3}
    targets = [{"labels": torch.tensor([2, 1]), "boxes": rand_boxes(2, g, torch.float32)}]
    losses, idx = crit.compute({"pred_logits": logits, "pred_boxes": boxes, "enc_outputs": enc}, targets)
    assert "loss_ce_enc" in losses and "enc" in idx
    q, _ = idx["enc"][0]
    onehot = torch.zeros(1, 6, 3)
    onehot[0, q, 0] = 1
    torch.testing.assert_close(losses["loss_ce_enc"], sigmoid_focal_loss(enc["pred_logits"], onehot).sum() / 2)


# ---------------------------------------------------------------- DETR baseline, pre-norm
@pytest.mark.parametrize("pre_norm", [False, True])
def test_detr_post_and_pre_norm_forward_backward(pre_norm):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from smca_detr import add_smca_detr_config

    cfg = add_smca_detr_config(get_cfg())
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 18, 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    c = cfg.MODEL.SMCA_DETR
    c.HIDDEN_DIM, c.DIM_FEEDFORWARD, c.ENC_LAYERS, c.DEC_LAYERS, c.NUM_QUERIES, c.NUM_CLASSES = 32, 64, 2, 2, 5, 3
    c.PRE_NORM = pre_norm
    torch.manual_seed(0)
    model = build_model(cfg)
    # pre-norm: the encoder ends with a LayerNorm (official); post-norm: none
    assert (model.transformer.encoder.norm is not None) == pre_norm
    assert all(layer.normalize_before == pre_norm for layer in model.transformer.decoder.layers)
    feats = [torch.randn(2, 512, 3, 4)]
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 64:] = True
    out = model.forward_from_features(feats, mask)
    assert out["pred_logits"].shape == (2, 2, 5, 4) and out["pred_boxes"].shape == (2, 2, 5, 4)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])}] * 2
    loss = sum(model.criterion(out, targets).values())
    loss.backward()
    assert torch.isfinite(loss)
    assert model.transformer.encoder.layers[0].linear1.weight.grad.abs().sum() > 0
