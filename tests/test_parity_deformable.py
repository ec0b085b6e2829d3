"""Parity of our Deformable DETR with the official implementation
(github.com/fundamentalvision/Deformable-DETR) on the fixtures ``deformable_detr_small_*.pt``
(plain, box refinement, two-stage; see /work/shared/parity/README.md sections 4, 5, 7.4).

Every model is built from the fixture's ``config`` only, loaded through our converter (keep-all
classes) strictly, and run without its backbone (``forward_from_features``) on the stored features,
with the PyTorch (grid_sample) multi-scale deformable attention, as the fixtures were made.
"""
import math

import pytest
import torch

from detectron2.modeling import build_model

from parity_common import (DETR_KEYS, assert_close, assert_indices_equal, assert_topk_close, build_loaded_model,
                           cfg_from_fixture, fixture_params, stack_results, use_level_backbone)
from smca_detr.checkpoint.deformable import convert_official_deformable_detr, rename_official_deformable_key
from smca_detr.modeling.backbone import resize_mask

FIXTURES = fixture_params("deformable_detr_small_*.pt")
# MODEL.SMCA_DETR key <- fixture ``config`` entry, for the variant switches (see parity_common.DETR_KEYS)
DEFORMABLE_KEYS = {
    "DEFORMABLE.NUM_FEATURE_LEVELS": "num_feature_levels", "DEFORMABLE.ENC_N_POINTS": "enc_n_points",
    "DEFORMABLE.DEC_N_POINTS": "dec_n_points", "DEFORMABLE.WITH_BOX_REFINE": "with_box_refine",
    "DEFORMABLE.TWO_STAGE": "two_stage",
}


def build_cfg_from_fixture(config):
    """Our config for a fixture ``config``: sizes, variant switches, losses and matcher costs from
    the fixture; a stub backbone whose output levels have the fixture's channels and strides
    (the parity tests bypass the backbone)."""
    cfg = cfg_from_fixture(config, "DeformableTransformer", {**DETR_KEYS, **DEFORMABLE_KEYS})
    cfg.MODEL.SMCA_DETR.TEST_TOPK = 100
    cfg.MODEL.SMCA_DETR.DEFORMABLE.MSDA_IMPL = "pytorch"
    return use_level_backbone(cfg, list(config["backbone_strides"]), list(config["backbone_channels"]))


@pytest.fixture(scope="module", params=FIXTURES)
def case(request):
    fx, cfg, model, converted = build_loaded_model(request.param, build_cfg_from_fixture,
                                                   convert_official_deformable_detr)
    # every official key was consumed: one converted key per official key, aliases excepted
    aliases = sum(len(group) - 1 for group in fx["tied_state_dict_keys"])
    assert len(converted) == len(fx["state_dict"]) - aliases
    inp = fx["inputs"]
    with torch.no_grad(), model.transformer.recording():
        out = model.forward_from_features(list(inp["backbone_features"]), inp["image_mask"])
    return fx, cfg, model, out


def _assert_close_with_inf(actual, expected, what):
    """README 5.1: infinite entries equal, finite ones within tolerance."""
    fin = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), fin), f"{what}: infinite entries differ"
    assert torch.equal(actual[~fin], expected[~fin]), f"{what}: infinite values differ"
    assert_close(actual[fin], expected[fin], what)


def test_parity_deformable_variant_from_config(case):
    fx, cfg, model, _ = case
    c = fx["config"]
    t = model.transformer
    assert (t.with_box_refine, t.two_stage) == (c["with_box_refine"], c["two_stage"])
    assert t.num_feature_levels == c["num_feature_levels"] == len(t.input_proj)
    assert model.heads.per_layer == c["with_box_refine"]
    assert model.heads.num_sets == c["num_decoder_layers"] + (1 if c["two_stage"] else 0)


def test_parity_deformable_state_dict_roundtrip(case):
    fx, _, model, _ = case
    sd = model.state_dict()
    for k, v in convert_official_deformable_detr(fx["state_dict"], keep_all_classes=True).items():
        assert torch.equal(sd[k], v), k


def test_parity_deformable_masks_pos_srcs(case):
    fx, _, model, out = case
    inp, it, ex = fx["inputs"], fx["intermediates"], out["extras"]
    n_levels = fx["config"]["num_feature_levels"]
    assert len(ex["masks"]) == len(inp["feature_masks"]) == n_levels
    for lvl in range(n_levels):
        assert torch.equal(ex["masks"][lvl], inp["feature_masks"][lvl]), f"mask level {lvl}"
        assert_close(ex["pos_embeds"][lvl], inp["pos_embeds"][lvl], f"pos level {lvl}")
        assert_close(ex["srcs"][lvl], it["srcs"][lvl], f"src level {lvl}")
    for lvl, feat in enumerate(inp["backbone_features"]):  # backbone levels: the plain resized mask
        assert torch.equal(resize_mask(inp["image_mask"], feat.shape[-2:]), inp["feature_masks"][lvl])
    assert torch.equal(ex["spatial_shapes"], it["spatial_shapes"])
    assert torch.equal(ex["level_start_index"], it["level_start_index"])
    assert torch.equal(ex["mask_flatten"], it["mask_flatten"])


def test_parity_deformable_encoder(case):
    fx, _, _, out = case
    it, ex = fx["intermediates"], out["extras"]
    assert_close(ex["valid_ratios"], it["valid_ratios"], "valid_ratios")
    assert_close(ex["encoder_reference_points"], it["encoder_reference_points"], "encoder_reference_points")
    assert_close(ex["memory"], it["memory"], "memory")


def test_parity_deformable_decoder(case):
    fx, _, model, out = case
    it, ex = fx["intermediates"], out["extras"]
    n_layers = fx["config"]["num_decoder_layers"]
    assert_close(ex["dec_tgt"], it["dec_tgt"], "dec_tgt")
    assert_close(ex["dec_query_pos"], it["dec_query_pos"], "dec_query_pos")
    assert_close(ex["init_reference"], it["dec_reference_points"], "dec_reference_points")
    assert_close(ex["init_reference"], it["init_reference"], "init_reference")
    assert_close(torch.stack(ex["inter_references"]), it["inter_references"], "inter_references")
    for lvl in range(n_layers):
        assert_close(ex["dec_reference_points_input"][lvl], it["dec_layer_reference_points_input"][lvl],
                     f"reference_points_input layer {lvl}")
        assert_close(ex[f"dec.{lvl}.sampling_locations"], it["dec_layer_sampling_locations"][lvl],
                     f"sampling_locations layer {lvl}")
        assert_close(ex[f"dec.{lvl}.sampling_weights"], it["dec_layer_attention_weights"][lvl],
                     f"attention_weights layer {lvl}")
    inp = fx["inputs"]
    masks = [resize_mask(inp["image_mask"], f.shape[-2:]) for f in inp["backbone_features"]]
    sizes = [tuple(s) for s in inp["image_sizes"].tolist()]
    with torch.no_grad():
        t_out = model.transformer(list(inp["backbone_features"]), masks, sizes, model.heads)
    assert_close(t_out.hs, it["hs"], "hs")
    # references (logit space) are the per-layer references of the official head loop
    refs = [it["init_reference"]] + list(it["inter_references"][:-1])
    for lvl, r in enumerate(refs):
        k = r.shape[-1]
        logit = torch.log(r.clamp(min=1e-5) / (1 - r).clamp(min=1e-5))
        assert_close(t_out.references[lvl][..., :k], logit, f"reference logits layer {lvl}")
        assert torch.all(t_out.references[lvl][..., k:] == 0)


def test_parity_deformable_outputs(case):
    fx, _, _, out = case
    ref = fx["outputs"]
    assert out["pred_logits"].shape == ref["pred_logits"].shape
    for lvl in range(ref["pred_logits"].shape[0]):
        assert_close(out["pred_logits"][lvl], ref["pred_logits"][lvl], f"pred_logits layer {lvl}")
        assert_close(out["pred_boxes"][lvl], ref["pred_boxes"][lvl], f"pred_boxes layer {lvl}")


def test_parity_deformable_two_stage(case):
    fx, _, _, out = case
    if not fx["config"]["two_stage"]:
        assert "enc_outputs" not in out and "enc_outputs" not in fx["outputs"]
        return
    it, ex = fx["intermediates"], out["extras"]
    assert_close(ex["output_memory"], it["output_memory"], "output_memory")
    assert torch.isinf(it["output_proposals"]).any()  # the fixture does exercise the +inf entries
    _assert_close_with_inf(ex["output_proposals"], it["output_proposals"], "output_proposals")
    _assert_close_with_inf(ex["enc_outputs_coord_unact"], it["enc_outputs_coord_unact"], "enc_outputs_coord_unact")
    assert torch.equal(ex["topk_proposals"], it["topk_proposals"])
    enc = fx["outputs"]["enc_outputs"]
    assert_close(out["enc_outputs"]["pred_logits"], enc["pred_logits"], "enc pred_logits")
    assert_close(out["enc_outputs"]["pred_boxes"], enc["pred_boxes"], "enc pred_boxes")


def test_parity_deformable_losses_and_matching(case):
    fx, _, model, out = case
    targets = fx["inputs"]["targets"]
    losses, indices = model.criterion.compute(out, targets)
    ref = fx["losses"]["unweighted"]
    # the official criterion logs class_error for the final layer only; ours for every layer
    extra = set(losses) - set(ref)
    assert set(ref) <= set(losses) and all(k.startswith("class_error_") for k in extra), sorted(extra)
    for k, v in ref.items():
        assert_close(torch.as_tensor(float(losses[k])), torch.as_tensor(v), k)
    weighted = model.criterion.weighted(losses)
    # the official weight_dict always lists the *_enc terms; only those the model produced count
    weight_dict = fx["losses"]["weight_dict"]
    assert set(weighted) == {k for k in weight_dict if k in ref}
    for k, v in weighted.items():
        assert_close(torch.as_tensor(float(v)), torch.as_tensor(ref[k] * weight_dict[k]), f"weighted {k}")
    total = sum(float(v) for v in weighted.values())
    assert math.isclose(total, fx["losses"]["weighted_total"], rel_tol=1e-4, abs_tol=1e-5)
    assert set(indices) == set(fx["matcher_indices"])
    for k, ref_idx in fx["matcher_indices"].items():
        assert_indices_equal(indices[k], ref_idx, k)


def test_parity_deformable_postprocess(case):
    fx, _, model, out = case
    sizes = [tuple(s) for s in fx["inputs"]["orig_target_sizes"].tolist()]
    results = model.inference(out["pred_logits"][-1], out["pred_boxes"][-1], sizes)
    scores, labels, boxes = stack_results(results)
    assert scores.shape == fx["postprocess"]["scores"].shape
    assert_topk_close(scores, labels, boxes, fx["postprocess"])


def test_parity_deformable_init_deterministic(case):
    """A freshly built model (other seeds) has the official seed-independent initial values."""
    fx, cfg, _, _ = case
    per_layer = fx["config"]["with_box_refine"]
    for seed in (1, 2):
        torch.manual_seed(seed)
        sd = build_model(cfg).state_dict()
        checked = 0
        for key, ref in fx["init_deterministic"].items():
            ours = rename_official_deformable_key(key, per_layer)
            assert ours is not None and ours in sd, key
            if isinstance(ref, dict):
                assert tuple(sd[ours].shape) == tuple(ref["shape"]), key
                assert torch.all(sd[ours] == ref["fill"]), f"{key}: expected all {ref['fill']}"
            else:
                assert_close(sd[ours], ref, key)
            checked += 1
        assert checked == len(fx["init_deterministic"]) > 0



@pytest.mark.parametrize("path", FIXTURES[:1])
def test_parity_model_builds_for_any_level_channels(path):
    """A fixture of the documented format whose backbone channels do not follow a ResNet's
    progression (not doubling from level to level) still gives a model: levels taken as given."""
    from parity_common import load_fixture

    config = dict(load_fixture(path)["config"])
    levels = len(config["backbone_strides"])
    config["backbone_channels"] = [24 + 8 * (i % 2) for i in range(levels)]  # 24, 32, 24, ...
    model = build_model(build_cfg_from_fixture(config))
    assert [proj[0].in_channels for proj in model.transformer.input_proj[:levels]] == config["backbone_channels"]
