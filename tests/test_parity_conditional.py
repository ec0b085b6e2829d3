"""Parity of our Conditional DETR with the official implementation (github.com/Atten4Vis/ConditionalDETR),
on the fixtures ``conditional_detr_*.pt`` (see /work/shared/parity/README.md, sections 4, 5, 7.3).

Every model is built from the fixture's ``config`` only, loaded through our converter (keep-all
classes) strictly, and run without its backbone (``forward_from_features``) on the stored features.
"""
import math

import pytest
import torch

from detectron2.modeling import build_model

from parity_common import (DETR_KEYS, assert_close, assert_indices_equal, assert_topk_close, build_loaded_model,
                           cfg_from_fixture, fixture_params, load_fixture, stack_results, use_level_backbone)
from smca_detr.checkpoint.conditional import convert_official_conditional_detr
from smca_detr.modeling.backbone import resize_mask
from smca_detr.modeling.position_encoding import sine_embed
from smca_detr.modeling.transformers.common import flatten_level

FIXTURES = fixture_params("conditional_detr_*.pt")


def build_cfg_from_fixture(config):
    """Our config for a fixture ``config``: sizes, losses and matcher costs from the fixture; the stub
    backbone with the fixture's single level (channels and stride; the parity tests bypass it)."""
    cfg = cfg_from_fixture(config, "ConditionalTransformer", {**DETR_KEYS, "PRE_NORM": "normalize_before"})
    cfg.MODEL.SMCA_DETR.TEST_TOPK = 100
    return use_level_backbone(cfg, [config["backbone_stride"]], [config["backbone_channels"]])


@pytest.fixture(scope="module", params=FIXTURES)
def case(request):
    fx, _, model, converted = build_loaded_model(request.param, build_cfg_from_fixture,
                                                 convert_official_conditional_detr)
    model.transformer.record_intermediates = True
    # every official key was consumed, one to one
    assert len(converted) == len(fx["state_dict"])
    assert not any(k.startswith("backbone.") for k in fx["state_dict"])
    inp = fx["inputs"]
    with torch.no_grad():
        out = model.forward_from_features(list(inp["backbone_features"]), inp["image_mask"])
    return fx, model, out


def test_parity_conditional_state_dict_roundtrip(case):
    fx, model, _ = case
    sd = model.state_dict()
    for k, v in convert_official_conditional_detr(fx["state_dict"], keep_all_classes=True).items():
        assert torch.equal(sd[k], v), k


def test_parity_conditional_masks_and_pos(case):
    fx, model, out = case
    inp = fx["inputs"]
    for lvl, (feat, ref_mask, ref_pos) in enumerate(zip(inp["backbone_features"], inp["feature_masks"],
                                                       inp["pos_embeds"])):
        mask = resize_mask(inp["image_mask"], feat.shape[-2:])
        assert torch.equal(mask, ref_mask), f"mask level {lvl}"
        pos = model.transformer.input.position_embedding(mask)
        assert_close(pos, ref_pos, f"pos level {lvl}")
    # what the transformer actually used (flattened)
    assert torch.equal(out["extras"]["mask"], inp["feature_masks"][0].flatten(1))
    assert_close(out["extras"]["pos"], flatten_level(inp["pos_embeds"][0]), "pos used")


def test_parity_conditional_intermediates(case):
    fx, model, out = case
    it, ex = fx["intermediates"], out["extras"]
    with torch.no_grad():
        src_proj = model.transformer.input.input_proj(fx["inputs"]["backbone_features"][0])
    assert_close(src_proj, it["src_proj"], "input_proj")
    assert_close(ex["memory"], it["memory"].transpose(0, 1), "memory")
    assert_close(ex["reference_points"], it["reference_points"], "reference_points")
    assert_close(ex["query_sine_embed"], it["dec_layer_query_sine_embed"].transpose(1, 2),
                 "dec_layer_query_sine_embed")
    assert_close(ex["dec_out_raw"], it["dec_layer_out_raw"].transpose(1, 2), "dec_layer_out_raw")
    assert_close(model.transformer(list(fx["inputs"]["backbone_features"]),
                                   list(fx["inputs"]["feature_masks"])).hs.detach(), it["hs"], "hs")


def test_parity_conditional_outputs_every_layer(case):
    fx, _, out = case
    ref = fx["outputs"]
    assert out["pred_logits"].shape == ref["pred_logits"].shape
    assert out["pred_boxes"].shape == ref["pred_boxes"].shape
    for layer in range(ref["pred_logits"].shape[0]):
        assert_close(out["pred_logits"][layer], ref["pred_logits"][layer], f"pred_logits layer {layer}")
        assert_close(out["pred_boxes"][layer], ref["pred_boxes"][layer], f"pred_boxes layer {layer}")


def test_parity_conditional_single_image_without_padding(case):
    """Each image alone, its feature map cropped to its valid region (no padding, so no mask is
    used), reproduces the official batched outputs of that image."""
    fx, model, _ = case
    inp, ref = fx["inputs"], fx["outputs"]
    for b in range(inp["image_mask"].shape[0]):
        valid = ~inp["feature_masks"][0][b]
        rows, cols = int(valid.any(1).sum()), int(valid.any(0).sum())
        feats = [inp["backbone_features"][0][b:b + 1, :, :rows, :cols]]
        h, w = (int(x) for x in inp["image_sizes"][b])
        with torch.no_grad():
            out = model.forward_from_features(feats, torch.zeros(1, h, w, dtype=torch.bool))
        assert_close(out["pred_logits"][:, 0], ref["pred_logits"][:, b], f"image {b} logits")
        assert_close(out["pred_boxes"][:, 0], ref["pred_boxes"][:, b], f"image {b} boxes")


@pytest.mark.parametrize("explicit", [False, True], ids=["sdpa", "explicit"])
def test_parity_conditional_naive_attention_matches(case, explicit, monkeypatch):
    """Either path of the shared attention kernel (SDPA, explicit softmax) gives the official outputs."""
    from smca_detr.modeling import blocks as layers_mod

    monkeypatch.setattr(layers_mod, "use_explicit_softmax", lambda *args: explicit)
    fx, model, out = case
    inp = fx["inputs"]
    with torch.no_grad():
        naive = model.forward_from_features(list(inp["backbone_features"]), inp["image_mask"])
    assert_close(naive["pred_logits"], fx["outputs"]["pred_logits"], "naive logits")
    assert_close(naive["pred_boxes"], fx["outputs"]["pred_boxes"], "naive boxes")


def test_parity_conditional_losses_and_matching(case):
    fx, model, _ = case
    outputs = {"pred_logits": fx["outputs"]["pred_logits"], "pred_boxes": fx["outputs"]["pred_boxes"]}
    targets = fx["inputs"]["targets"]
    losses, indices = model.criterion.compute(outputs, targets)
    ref = fx["losses"]
    # Every official key; our criterion additionally logs class_error of the aux layers (logging
    # only, never weighted), which the official criterion computes for the last layer only.
    assert set(ref["unweighted"]) <= set(losses), (sorted(losses), sorted(ref["unweighted"]))
    assert all(k.startswith("class_error_") for k in set(losses) - set(ref["unweighted"]))
    for k, v in ref["unweighted"].items():
        assert math.isclose(float(losses[k]), v, rel_tol=1e-4, abs_tol=1e-5), (k, float(losses[k]), v)
    weighted = model.criterion.weighted(losses)
    assert set(weighted) == set(ref["weight_dict"])
    total = sum(float(v) for v in weighted.values())
    assert math.isclose(total, ref["weighted_total"], rel_tol=1e-4, abs_tol=1e-5), (total, ref["weighted_total"])
    for key, ref_idx in fx["matcher_indices"].items():
        assert_indices_equal(indices[key], ref_idx, key)
    assert set(indices) == set(fx["matcher_indices"])


def test_parity_conditional_losses_from_our_outputs(case):
    """The criterion on our own outputs reproduces the official losses and matching too."""
    fx, model, out = case
    losses, indices = model.criterion.compute(out, fx["inputs"]["targets"])
    for k, v in fx["losses"]["unweighted"].items():
        assert math.isclose(float(losses[k]), v, rel_tol=1e-4, abs_tol=1e-5), (k, float(losses[k]), v)
    for key, ref_idx in fx["matcher_indices"].items():
        assert_indices_equal(indices[key], ref_idx, key)


def test_parity_conditional_postprocess(case):
    fx, model, out = case
    sizes = [tuple(int(x) for x in s) for s in fx["inputs"]["orig_target_sizes"]]
    # model.inference scales normalised boxes by the sizes it is given: with orig_target_sizes this
    # is exactly the official PostProcess.
    results = model.inference(out["pred_logits"][-1], out["pred_boxes"][-1], sizes)
    k = fx["postprocess"]["scores"].shape[1]
    assert model.test_topk == k
    scores, labels, boxes = stack_results(results)
    assert_topk_close(scores, labels, boxes, fx["postprocess"])


def test_parity_conditional_init_deterministic(case):
    """Official seed-independent initial values (class prior, zero last box layer, LayerNorms,
    attention output biases) on a freshly built model."""
    fx, _, _ = case
    model = build_model(build_cfg_from_fixture(fx["config"]))
    sd = model.state_dict()
    assert fx["init_deterministic"]
    for official, spec in fx["init_deterministic"].items():
        (key,) = convert_official_conditional_detr({official: torch.zeros(())}, keep_all_classes=True)
        want = spec if torch.is_tensor(spec) else torch.full(tuple(spec["shape"]), float(spec["fill"]))
        torch.testing.assert_close(sd[key], want, msg=lambda m: f"{official}: {m}")


@pytest.mark.parametrize("path", FIXTURES)
def test_parity_conditional_sine_embed_unit_d256(path):
    unit = load_fixture(path)["units"]["gen_sineembed_for_position_d256"]
    xy = unit["input"]                   # [..., (x, y)] in [0, 1]
    out = sine_embed(xy.flip(-1), 128)   # official: 128 frequencies, y block first, then x
    assert out.shape == unit["output"].shape
    assert_close(out, unit["output"], "gen_sineembed_for_position_d256")
