"""Parity of SMCA-DETR single scale with the official implementation (fixtures README 7.1).

For every ``smca_single_*.pt`` in ``parity_dir()`` (compact copies in tests/data/parity, originals with
``SMCA_DETR_PARITY_DIR=/work/shared/parity``): our model is built from the fixture's ``config`` only,
the official state dict is converted by ``convert_official_smca`` (all 92 class rows) and loaded
strictly, then masks, position encodings, SMCA internals, per-layer outputs (float32 and float64),
losses, matcher indices and post-processing are compared element-wise.
"""
import functools

import pytest
import torch

from detectron2.modeling import build_model

from parity_common import (SMCA_DEFAULTS, SMCA_KEYS, assert_close, assert_indices_equal, assert_loads_strictly,
                           assert_topk_close, cached_fixture, cfg_from_fixture, fixture_params, fixture_targets,
                           official_gaussian_bias, stack_results, tol, use_stub_backbone)
from smca_detr.checkpoint.smca import convert_official_smca
from smca_detr.modeling.backbone import image_padding_mask

PATTERN = "smca_single_*.pt"
FIXTURES = fixture_params(PATTERN)
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def config_from_fixture(c):
    """Our config from the fixture's ``config`` dict (nothing hard-coded); the stub backbone declares
    the fixture's single level."""
    cfg = cfg_from_fixture(c, "SMCATransformer", SMCA_KEYS, SMCA_DEFAULTS)
    assert len(c["backbone_level_channels"]) == 1 and len(c["feature_strides"]) == 1
    return use_stub_backbone(cfg, ["res5"], c["backbone_level_channels"], c["feature_strides"])


def _sizes(t):
    return [tuple(int(v) for v in s) for s in t]


def _image_mask(inp):
    """``inputs.image_mask`` (compact copies drop it: it is exactly this rebuild, see
    test_parity_masks_and_position_encoding on the original files)."""
    mask = image_padding_mask(_sizes(inp["image_sizes"]), tuple(inp["padded_image_size"]))
    return inp.get("image_mask", mask)


@functools.lru_cache(maxsize=None)
def _run(path, dtype_name: str, record: bool):
    """Our model on the fixture's inputs: (model, outputs dict)."""
    fx = cached_fixture(path)
    dtype = getattr(torch, dtype_name)
    model = build_model(config_from_fixture(fx["config"]))
    model.load_state_dict(convert_official_smca(fx["state_dict"], keep_all_classes=True), strict=True)
    model.eval().to(dtype)
    model.transformer.record_intermediates = record
    inp = fx["inputs"]
    feats = [f.to(dtype) for f in inp["backbone_features"]]
    with torch.no_grad():
        out = model.forward_from_features(feats, _image_mask(inp), _sizes(inp["image_sizes"]))
    return model, out


@pytest.mark.parametrize("path", FIXTURES)
def test_parity_conversion_loads_strictly(path):
    fx = cached_fixture(path)
    model = build_model(config_from_fixture(fx["config"]))
    # every official value ends up in the model, unchanged
    assert_loads_strictly(model, convert_official_smca(fx["state_dict"], keep_all_classes=True))


@pytest.mark.parametrize("path", FIXTURES)
def test_parity_masks_and_position_encoding(path):
    fx = cached_fixture(path)
    inp = fx["inputs"]
    mask = image_padding_mask(_sizes(inp["image_sizes"]), tuple(inp["padded_image_size"]))
    if "image_mask" in inp:
        assert torch.equal(mask, inp["image_mask"])
    model, out = _run(path, "float32", True)
    ex = out["extras"]
    fm = inp["feature_masks"][0]
    assert torch.equal(ex["mask"], fm.flatten(1))
    if "pos_embeds" in inp:
        pos = ex["pos"].transpose(1, 2).reshape(inp["pos_embeds"][0].shape)
        assert_close(pos, inp["pos_embeds"][0], "pos_embeds")
    # the sizes read off the mask (no image_sizes given) agree with the targets' "size"
    for t, (h, w) in zip(inp["targets"], inp["image_sizes"].tolist()):
        assert t["size"].tolist() == [h, w]
    assert inp["h_w"][0].tolist() == [[w, h] for h, w in inp["image_sizes"].tolist()]


@pytest.mark.parametrize("path", FIXTURES)
def test_parity_smca_intermediates(path):
    fx = cached_fixture(path)
    c, it = fx["config"], fx["intermediates"]
    model, out = _run(path, "float32", True)
    ex = out["extras"]
    b, m = fx["inputs"]["image_sizes"].shape[0], c["nheads"]
    assert_close(ex["ref_logits"], it["ref_logits"].transpose(0, 1), "ref_logits")
    assert_close(ex["ref_logits"], it["points"], "points")
    ref_state = it["dec.0.ref_state"].transpose(0, 1).reshape(b, c["num_queries"], m, 2)
    assert_close(ex["ref_centers"][:, :, None, :].expand_as(ref_state), ref_state, "ref_state")
    for l in range(c["num_decoder_layers"]):
        p = f"dec.{l}."
        assert_close(ex[p + "offsets"], it[p + "offsets"].transpose(0, 1), p + "offsets")
        if p + "scale_raw" in it:
            assert_close(ex[p + "scale_raw"], it[p + "scale_raw"].transpose(0, 1), p + "scale_raw")
        elif c["dynamic_scale"] == "type1":
            assert p + "scale_raw" not in ex
        if p + "gaussian" in it:
            assert_close(ex[p + "gaussian"], official_gaussian_bias(it[p + "gaussian"], b, m), p + "gaussian")
        for name in ("out", "cross_attn_out"):
            if p + name in it:
                assert_close(ex[p + name], it[p + name].transpose(0, 1), p + name)
        if p + "cross_attn_weights" in it:
            assert_close(ex[p + "cross_attn_weights"], it[p + "cross_attn_weights"], p + "cross_attn_weights")
    if "transformer_in.src" in it:
        assert_close(ex["src"], it["transformer_in.src"], "transformer_in.src")
    if "encoder_out" in it:
        assert_close(ex["memory"], it["encoder_out"].transpose(0, 1), "encoder_out")
    if "hs" in it:
        assert_close(ex["hs"], it["hs"], "hs")


@pytest.mark.parametrize("path", FIXTURES)
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_parity_outputs(path, dtype_name):
    """The production path (SDPA, no recording) against the official outputs of the same precision."""
    fx = cached_fixture(path)
    key = "outputs" if dtype_name == "float32" else "outputs_float64"
    model, out = _run(path, dtype_name, False)
    dtype = getattr(torch, dtype_name)
    assert out["pred_logits"].dtype == dtype
    assert_close(out["pred_logits"], fx[key]["pred_logits"], f"{key}.pred_logits", dtype)
    assert_close(out["pred_boxes"], fx[key]["pred_boxes"], f"{key}.pred_boxes", dtype)
    if dtype == torch.float64:
        # float64 internals: the reference logit (box-logit offset) and, where stored, hs
        it = fx["intermediates_float64"]
        ex = _run(path, dtype_name, True)[1]["extras"]
        assert_close(ex["ref_logits"], it["points"], "float64 points", dtype)
        if "hs" in it:
            assert_close(ex["hs"], it["hs"], "float64 hs", dtype)


@pytest.mark.parametrize("path", FIXTURES)
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_parity_losses_and_matching(path, dtype_name):
    fx = cached_fixture(path)
    dtype = getattr(torch, dtype_name)
    suffix = "" if dtype == torch.float32 else "_float64"
    model, out = _run(path, dtype_name, False)
    targets = [{k: (v.to(dtype) if v.is_floating_point() else v) for k, v in t.items()} for t in fixture_targets(fx)]
    losses, indices = model.criterion.compute(out, targets)
    ref = fx["losses" + suffix]["unweighted"]
    assert set(ref) <= set(losses), set(ref) - set(losses)  # ours also logs class_error_i (aux layers)
    ref_idx = fx["matcher_indices" + suffix]
    assert sorted(indices) == sorted(ref_idx)
    for k in ref_idx:
        assert_indices_equal(indices[k], ref_idx[k], f"matcher {k}{suffix}")
    for k, v in ref.items():
        # float32-level agreement always (criterion precision permitting)
        torch.testing.assert_close(losses[k].double(), torch.tensor(float(v), dtype=torch.float64),
                                   **tol(torch.float32), msg=lambda s, k=k: f"{k}{suffix}: {s}")
    weighted = model.criterion.weighted(losses)
    total = sum(weighted.values())
    torch.testing.assert_close(total.double(), torch.tensor(fx["losses" + suffix]["weighted_total"],
                                                            dtype=torch.float64), **tol(torch.float32))
    assert set(weighted) == set(fx["losses" + suffix]["weight_dict"])
    if dtype == torch.float64:
        if losses["loss_ce"].dtype != torch.float64:
            pytest.xfail("SetCriterion.compute casts to float32 (shared criterion.py): float64 losses can "
                         "only be checked at float32 tolerance")
        for k, v in ref.items():
            torch.testing.assert_close(losses[k], torch.tensor(float(v), dtype=dtype), **tol(dtype),
                                       msg=lambda s, k=k: f"{k}{suffix}: {s}")


@pytest.mark.parametrize("path", FIXTURES)
def test_parity_postprocess(path):
    fx = cached_fixture(path)
    model, out = _run(path, "float32", False)
    sizes = _sizes(fx["inputs"]["orig_target_sizes"])
    assert model.test_topk == fx["config"]["postprocess_topk"]
    res = model.inference(out["pred_logits"][-1], out["pred_boxes"][-1], sizes)
    scores, labels, boxes = stack_results(res)
    assert scores.shape == fx["postprocess"]["scores"].shape
    assert_topk_close(scores, labels, boxes, fx["postprocess"])
