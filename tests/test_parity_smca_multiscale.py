"""Parity of the official SMCA "new multi-scale" model (``SMCAConvMultiScaleTransformer``) with the
official implementation (fixtures README 7.2), plus the multi-scale checkpoint converter at full size.

For every ``smca_multiscale_*.pt`` in ``parity_dir()`` (the compact copy in tests/data/parity; the
original with ``SMCA_DETR_PARITY_DIR=/work/shared/parity``) our model is built from the fixture's
``config`` only, the official state dict is converted by ``convert_official_smca_multiscale``
(keep-all classes) and loaded strictly, and the backbone is bypassed with ``forward_from_features``.

The official batched code applies image 0's scale-selection weights to every image (README 7.2); we
compute them per image, so our outputs are compared with ``outputs_per_image`` /
``outputs_float64_per_image``, and bug-affected intermediates only for image 0. ``losses``,
``matcher_indices`` and ``postprocess`` come from the official (buggy) batched run: our criterion,
matcher and post-processing are fed with the fixture's own ``outputs`` to check them on this format.
"""
import functools
from pathlib import Path

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.modeling import META_ARCH_REGISTRY, build_model

from parity_common import (SMCA_DEFAULTS, SMCA_KEYS, assert_close, assert_indices_equal, assert_loads_strictly,
                           assert_topk_close, cached_fixture, cfg_from_fixture, fixture_params, fixture_targets,
                           official_gaussian_bias, parity_dir, stack_results, tol, use_stub_backbone)
from smca_detr.checkpoint.smca_multiscale import convert_official_smca_multiscale
from smca_detr.config import add_smca_detr_config
from smca_detr.modeling.backbone import image_padding_mask

PATTERN = "smca_multiscale_*.pt"
FIXTURES = fixture_params(PATTERN)
REPO = Path(__file__).resolve().parents[1]
KEYS_NAME = "smca_official_keys_multi_scale_r50_type3.txt"


def _keys_file():
    """The official full-size key listing: ``parity_dir()/keys`` (the shared fixture directory), else
    the copy in tests/data/parity/keys."""
    for d in (parity_dir() / "keys", REPO / "tests" / "data" / "parity" / "keys"):
        if (d / KEYS_NAME).exists():
            return d / KEYS_NAME
    return None
_LEVELS = ["res3", "res4", "res5"]


def config_from_fixture(c):
    """Our config from the fixture's ``config`` dict (nothing hard-coded); the stub backbone declares
    the fixture's backbone levels."""
    cfg = cfg_from_fixture(c, "SMCAConvMultiScaleTransformer", SMCA_KEYS, SMCA_DEFAULTS)
    n = len(c["backbone_level_channels"])
    assert n == len(_LEVELS) and len(c["feature_strides"]) == n + 1  # 3 backbone levels + the extra one
    return use_stub_backbone(cfg, _LEVELS[:n], c["backbone_level_channels"], c["feature_strides"][:n])


def _sizes(fx):
    return [tuple(int(v) for v in s) for s in fx["inputs"]["image_sizes"]]


def _image_mask(fx):
    inp = fx["inputs"]
    return image_padding_mask(_sizes(fx), tuple(inp["padded_image_size"]))


@functools.lru_cache(maxsize=None)
def _model(path, dtype_name="float32"):
    fx = cached_fixture(path)
    model = build_model(config_from_fixture(fx["config"]))
    model.load_state_dict(convert_official_smca_multiscale(fx["state_dict"], keep_all_classes=True), strict=True)
    return model.eval().to(getattr(torch, dtype_name))


def _forward(model, fx, dtype, record=False, index=None):
    """Our model on the fixture's inputs (optionally only image ``index``, same padded size)."""
    inp = fx["inputs"]
    feats = [f.to(dtype) for f in inp["backbone_features"]]
    mask, sizes = _image_mask(fx), _sizes(fx)
    if index is not None:
        feats, mask, sizes = [f[index:index + 1] for f in feats], mask[index:index + 1], sizes[index:index + 1]
    model.transformer.record_intermediates = record
    try:
        with torch.no_grad():
            return model.forward_from_features(feats, mask, sizes)
    finally:
        model.transformer.record_intermediates = False


@functools.lru_cache(maxsize=None)
def _run(path, dtype_name: str, record: bool):
    return _forward(_model(path, dtype_name), cached_fixture(path), getattr(torch, dtype_name), record)


# ------------------------------------------------------------------ weights
@pytest.mark.parametrize("path", FIXTURES)
def test_parity_multiscale_conversion_loads_strictly(path):
    fx = cached_fixture(path)
    model = build_model(config_from_fixture(fx["config"]))
    sd = convert_official_smca_multiscale(fx["state_dict"], keep_all_classes=True)
    assert len(sd) == len(fx["state_dict"])  # every official key consumed, none invented
    assert_loads_strictly(model, sd)


# ------------------------------------------------------------------ inputs of the transformer
@pytest.mark.parametrize("path", FIXTURES)
def test_parity_multiscale_masks_and_position_encoding(path):
    fx = cached_fixture(path)
    inp, it = fx["inputs"], fx["intermediates"]
    if "image_mask" in inp:
        assert torch.equal(_image_mask(fx), inp["image_mask"])
    # SMCA's h_w is (w, h) of each unpadded image; the targets carry (h, w)
    assert inp["h_w"][0].tolist() == [[w, h] for h, w in _sizes(fx)]
    for t, s in zip(inp["targets"], _sizes(fx)):
        assert tuple(t["size"].tolist()) == s
    ex = _run(path, "float32", True)["extras"]
    assert len(ex["masks"]) == len(inp["feature_masks"]) == len(fx["config"]["feature_strides"])
    for l, (m, ref) in enumerate(zip(ex["masks"], inp["feature_masks"])):
        assert torch.equal(m, ref), f"mask level {l}"
    for l, (p, ref) in enumerate(zip(ex["pos"], inp["pos_embeds"])):
        assert_close(p, ref, f"pos_embeds level {l}")
    assert torch.equal(ex["memory_mask"], it["decoder_in.memory_key_padding_mask"])
    split = list(it["split"])
    segs = [s.size for s in _model(path).transformer.segments([tuple(m.shape[-2:]) for m in ex["masks"]])]
    assert segs[:3] == split and sum(segs) == ex["memory_mask"].shape[1]


@pytest.mark.parametrize("path", FIXTURES)
def test_parity_multiscale_encoder(path):
    fx = cached_fixture(path)
    it = fx["intermediates"]
    ex = _run(path, "float32", True)["extras"]
    n = len(fx["config"]["feature_strides"])
    compared = 0
    for l in range(n):
        if f"transformer_in.src.{l}" in it:  # the compact copy keeps src of levels 1..3
            assert_close(ex["src"][l], it[f"transformer_in.src.{l}"], f"transformer_in.src.{l}")
            compared += 1
        assert_close(ex["encoder_out"][l], it[f"encoder_out.{l}"], f"encoder_out.{l}")
    assert compared >= n - 1


@pytest.mark.parametrize("path", FIXTURES)
def test_parity_multiscale_decoder_intermediates(path):
    """Layer 0's heads and Gaussian for both images (unaffected by the official batch bug); every
    later intermediate for image 0 only."""
    fx = cached_fixture(path)
    c, it = fx["config"], fx["intermediates"]
    ex = _run(path, "float32", True)["extras"]
    b, m, q = fx["inputs"]["image_sizes"].shape[0], c["nheads"], c["num_queries"]
    assert_close(ex["ref_logits"], it["ref_logits"].transpose(0, 1), "ref_logits")
    assert_close(ex["ref_logits"], it["points"][0], "points[0]")
    assert_close(ex["reference_points"], it["dec.0.ref_state"].transpose(0, 1), "dec.0.ref_state")
    for l in range(c["num_decoder_layers"]):
        imgs = slice(None) if l == 0 else slice(0, 1)
        for name in ("offsets", "scale_raw", "scale_attention"):
            ref = it[f"dec.{l}.{name}"].transpose(0, 1)
            assert_close(ex[f"dec.{l}.{name}"][imgs], ref[imgs], f"dec.{l}.{name}")
        if f"dec.{l}.gaussian" in it:
            ref = official_gaussian_bias(it[f"dec.{l}.gaussian"], b, m)
            assert_close(ex[f"dec.{l}.gaussian"][imgs], ref[imgs], f"dec.{l}.gaussian")
        if f"dec.{l}.out" in it:
            assert_close(ex[f"dec.{l}.out"][:1], it[f"dec.{l}.out"].transpose(0, 1)[:1], f"dec.{l}.out")
    assert ex["dec.0.gaussian"].shape == (b, m, q, ex["memory_mask"].shape[1])
    if "hs" in it:
        assert_close(_model(path).transformer(*_transformer_inputs(fx, torch.float32)).hs[:, :1], it["hs"][:, :1],
                     "hs image 0")


def _transformer_inputs(fx, dtype):
    inp = fx["inputs"]
    return [f.to(dtype) for f in inp["backbone_features"]], list(inp["feature_masks"][:3]), _sizes(fx)


# ------------------------------------------------------------------ outputs
@pytest.mark.parametrize("path", FIXTURES)
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_parity_multiscale_outputs_per_image(path, dtype_name):
    """The production path (no recording) against each image run alone by the official code."""
    fx = cached_fixture(path)
    dtype = getattr(torch, dtype_name)
    key = "outputs_per_image" if dtype == torch.float32 else "outputs_float64_per_image"
    out = _run(path, dtype_name, False)
    assert out["pred_logits"].dtype == dtype
    for name in ("pred_logits", "pred_boxes"):
        assert_close(out[name], fx[key][name], f"{key}.{name}", dtype)
    # image 0 of the official batched run is bug-free; image 1 is not (we must differ there)
    batched = fx["outputs"] if dtype == torch.float32 else fx.get("outputs_float64")
    if batched is not None:
        assert_close(out["pred_logits"][:, :1], batched["pred_logits"][:, :1], "batched image 0", dtype)
        assert (out["pred_logits"][:, 1:] - batched["pred_logits"][:, 1:].to(dtype)).abs().max() > 1e-3
    if dtype == torch.float64:
        ref = fx["intermediates_float64"]["points"][0].sigmoid()
        assert_close(out["extras"]["reference_points"], ref, "float64 sigmoid(points[0])", dtype)


@pytest.mark.parametrize("path", FIXTURES)
def test_parity_multiscale_batch_equals_each_image_alone(path):
    """Our batched run equals each image run alone (same padded size): the scale-selection weights
    of one image never reach another; image sizes read off the mask give the same result."""
    fx = cached_fixture(path)
    model = _model(path)
    full = _run(path, "float32", False)
    for i in range(len(_sizes(fx))):
        one = _forward(model, fx, torch.float32, index=i)
        for name in ("pred_logits", "pred_boxes"):
            assert_close(one[name][:, 0], full[name][:, i], f"image {i} alone: {name}")
    with torch.no_grad():
        inp = fx["inputs"]
        no_sizes = _model(path).forward_from_features(inp["backbone_features"], _image_mask(fx))
    torch.testing.assert_close(no_sizes["pred_boxes"], _run(path, "float32", False)["pred_boxes"], atol=0, rtol=0)


# ------------------------------------------------------------------ criterion / matcher / post-processing
@pytest.mark.parametrize("path", FIXTURES)
def test_parity_multiscale_losses_and_matching(path):
    """Our criterion and matcher on the fixture's own (official batched) outputs."""
    fx = cached_fixture(path)
    model = _model(path)
    outputs = {k: v for k, v in fx["outputs"].items()}
    losses, indices = model.criterion.compute(outputs, fixture_targets(fx))
    ref = fx["losses"]["unweighted"]
    # the official criterion logs class_error for the final layer only; ours also per aux layer
    assert set(ref) <= set(losses) and all(k.startswith("class_error_") for k in set(losses) - set(ref))
    for k, v in ref.items():
        torch.testing.assert_close(losses[k].double(), torch.tensor(float(v), dtype=torch.float64),
                                   **tol(torch.float32), msg=lambda s, k=k: f"{k}: {s}")
    ref_idx = fx["matcher_indices"]
    assert sorted(indices) == sorted(ref_idx)
    for k in ref_idx:
        assert_indices_equal(indices[k], ref_idx[k], f"matcher {k}")
    weighted = model.criterion.weighted(losses)
    assert set(weighted) == set(fx["losses"]["weight_dict"])
    torch.testing.assert_close(sum(weighted.values()).double(),
                               torch.tensor(fx["losses"]["weighted_total"], dtype=torch.float64), **tol(torch.float32))


@pytest.mark.parametrize("path", FIXTURES)
def test_parity_multiscale_postprocess(path):
    """Our top-k post-processing (K = the fixture's 500) on the fixture's own final outputs."""
    fx = cached_fixture(path)
    model = _model(path)
    assert model.test_topk == fx["config"]["postprocess_topk"]
    sizes = [tuple(int(v) for v in s) for s in fx["inputs"]["orig_target_sizes"]]
    res = model.inference(fx["outputs"]["pred_logits"][-1], fx["outputs"]["pred_boxes"][-1], sizes)
    scores, labels, boxes = stack_results(res)
    assert scores.shape == fx["postprocess"]["scores"].shape
    assert_topk_close(scores, labels, boxes, fx["postprocess"])


# ------------------------------------------------------------------ converter at full size
def _read_key_listing(path):
    keys = []
    for line in Path(path).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape, _dtype = line.split("\t")
        keys.append((name, tuple(int(x) for x in shape.strip("()").split(",") if x.strip())))
    return keys


def test_parity_multiscale_full_size_key_listing_converts_and_loads():
    """Every key of the official full-size (R50, 300 queries, 5 encoder layers, FFN 1024) listing
    converts and loads strictly into our full-size conv multi-scale R50 model."""
    keys_file = _keys_file()
    assert keys_file is not None, f"{KEYS_NAME} not found"
    listing = _read_key_listing(keys_file)
    official = {k: torch.zeros(s) for k, s in listing}
    official = {k: (v.long() if k.endswith("num_batches_tracked") else v) for k, v in official.items()}
    cfg = add_smca_detr_config(get_cfg())
    cfg.merge_from_file(str(REPO / "configs" / "smca_r50_conv_ms.yaml"))
    header = keys_file.read_text().splitlines()[1]
    assert "'num_queries': 300" in header and "'enc_layers': 5" in header and "'dim_feedforward': 1024" in header
    cfg.MODEL.SMCA_DETR.NUM_CLASSES = 92  # keep-all conversion of the 92 official columns
    cfg.MODEL.DEVICE = "cpu"
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    ours = model.state_dict()
    sd = convert_official_smca_multiscale({"model": official}, keep_all_classes=True)
    assert set(sd) == set(ours), sorted(set(sd) ^ set(ours))[:20]
    for k, v in sd.items():
        assert tuple(v.shape) == tuple(ours[k].shape), (k, v.shape, ours[k].shape)
    model.load_state_dict(sd, strict=True, assign=True)
    assert all(not p.is_meta for p in model.parameters())
    # default mode: 80 COCO rows
    sd80 = convert_official_smca_multiscale({"model": official})
    assert sd80["heads.class_embed.weight"].shape[0] == 80


@pytest.mark.parametrize("path", FIXTURES)
def test_parity_multiscale_converter_files_detection_and_errors(path, tmp_path):
    """Full official checkpoint files (``{"model", "args"}``) load through ``safe_torch_load``; the
    multi-scale kind is auto-detected by the shared SMCA converter; 92 -> 80 COCO rows by default;
    unknown keys and single-scale state dicts are refused."""
    import argparse

    from smca_detr.checkpoint.common import coco_official_columns
    from smca_detr.checkpoint.smca import convert_official_smca, detect_smca_kind

    fx = cached_fixture(path)
    official = fx["state_dict"]
    ref = convert_official_smca_multiscale(official, keep_all_classes=True)
    f = tmp_path / "official.pth"
    torch.save({"model": dict(official), "args": argparse.Namespace(dynamic_scale="type3")}, f)
    from_file = convert_official_smca_multiscale(str(f), keep_all_classes=True)
    assert list(from_file) == list(ref) and all(torch.equal(from_file[k], ref[k]) for k in ref)
    assert detect_smca_kind(official) == "conv_multi_scale"
    auto = convert_official_smca(official, keep_all_classes=True)
    assert list(auto) == list(ref)
    sd80 = convert_official_smca_multiscale(official)
    cols = torch.as_tensor(coco_official_columns())
    assert torch.equal(sd80["heads.class_embed.weight"], official["class_embed.weight"][cols])
    assert torch.equal(sd80["heads.class_embed.bias"], official["class_embed.bias"][cols])
    with pytest.raises(KeyError, match="point9"):
        convert_official_smca_multiscale({**official, "transformer.decoder.layers.0.point9.weight": torch.zeros(1)})
    single = {k: v for k, v in official.items() if not k.startswith(("input_proj_2048_3", "transformer.level_embed"))}
    with pytest.raises(ValueError, match="multi-scale"):
        convert_official_smca_multiscale(single)
