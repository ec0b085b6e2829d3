"""Conditional DETR: converter on the full-size official key list, the attention maths, configs
(load, build, one CPU training step), the conversion CLI. Numerical parity with the official code is
in test_parity_conditional.py."""
import argparse
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from parity_common import assert_convert_cli_roundtrip, parity_dir
from smca_detr.checkpoint import coco_official_columns
from smca_detr.checkpoint.conditional import convert_official_conditional_detr
from smca_detr.modeling.transformers.conditional import ConditionalTransformer, HeadAttention
from train_step_helpers import load_cfg, tiny_batch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("tools_on_path")  # conftest.py: the conversion CLI
CONFIGS = sorted((REPO / "configs").glob("conditional_detr*.yaml"))
KEYS_FILE = "conditional_detr_full_model_keys.txt"
COCO_TRAIN_IMAGES = 118287


def official_keys(section="R50"):
    """(key, shape) of the full-size official model, from the keys/ listing."""
    path = parity_dir() / "keys" / KEYS_FILE
    if not path.exists():
        pytest.skip(f"no {path}")
    out = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, _dtype = line.split("\t")
        out.append((key, tuple(int(x) for x in re.findall(r"\d+", shape))))
    # the file lists R50 then R50-DC5 (identical keys): keep the first listing
    seen, keys = set(), []
    for k, s in out:
        if k not in seen:
            seen.add(k)
            keys.append((k, s))
    return keys


# ------------------------------------------------------------------------------------ converter
@pytest.fixture(scope="module")
def full_official():
    """Official full-size state dict with a distinct value per tensor (index of the key), class rows
    numbered by their official column."""
    keys = official_keys()
    sd = {}
    for i, (k, shape) in enumerate(keys):
        sd[k] = torch.full(shape, float(i))
    n = sd["class_embed.weight"].shape[0]
    sd["class_embed.weight"] = torch.arange(n, dtype=torch.float32)[:, None].expand(n, 256).clone()
    sd["class_embed.bias"] = torch.arange(n, dtype=torch.float32)
    return sd


@pytest.fixture(scope="module")
def full_model_91():
    torch.manual_seed(0)
    return build_model(load_cfg(REPO / "configs" / "conditional_detr_r50.yaml",
                                ["MODEL.SMCA_DETR.NUM_CLASSES", 91]))


def test_full_size_official_keys_load_strictly_keep_all(full_official, full_model_91):
    assert len(full_official) == 564
    converted = convert_official_conditional_detr(full_official, keep_all_classes=True)
    assert len(converted) == len(full_official)  # one to one, nothing dropped
    full_model_91.load_state_dict(converted, strict=True)
    sd = full_model_91.state_dict()
    # spot checks of the mapping
    i = {k: n for n, k in enumerate(full_official)}
    assert sd["transformer.input.input_proj.weight"].flatten()[0] == i["input_proj.weight"]
    assert sd["transformer.query_embed.weight"].flatten()[0] == i["query_embed.weight"]
    assert sd["backbone.body.res5.2.conv3.norm.running_var"][0] == i["backbone.0.body.layer4.2.bn3.running_var"]
    assert sd["backbone.body.stem.conv1.weight"].flatten()[0] == i["backbone.0.body.conv1.weight"]
    assert sd["heads.bbox_embed.layers.2.bias"][0] == i["bbox_embed.layers.2.bias"]
    key = "transformer.decoder.layers.0.ca_qpos_proj.weight"
    assert sd[key].flatten()[0] == i[key]
    assert "transformer.decoder.layers.1.ca_qpos_proj.weight" not in sd
    assert torch.equal(sd["heads.class_embed.bias"], torch.arange(91, dtype=torch.float32))


def test_full_size_official_keys_load_strictly_80_classes(full_official):
    torch.manual_seed(0)
    model = build_model(load_cfg(REPO / "configs" / "conditional_detr_r50.yaml"))
    assert model.heads.class_embed.out_features == 80
    ckpt = {"model": full_official, "args": argparse.Namespace(num_classes=91), "epoch": 49}
    converted = convert_official_conditional_detr(ckpt)
    model.load_state_dict(converted, strict=True)
    cols = torch.as_tensor(coco_official_columns(), dtype=torch.float32)
    assert torch.equal(model.heads.class_embed.bias.detach(), cols)
    assert torch.equal(model.heads.class_embed.weight.detach()[:, 7], cols)
    assert cols[0] == 1 and cols[-1] == 90 and len(cols) == 80


def test_converter_rejects_unknown_keys_and_small_heads():
    with pytest.raises(KeyError, match="no conversion rule"):
        convert_official_conditional_detr({"transformer.foo.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="no conversion rule"):
        convert_official_conditional_detr({"class_embed.weight": torch.zeros(12, 4), "extra.w": torch.zeros(1)},
                                          keep_all_classes=True)
    with pytest.raises(ValueError, match="91-row head"):
        convert_official_conditional_detr({"class_embed.weight": torch.zeros(12, 4),
                                           "class_embed.bias": torch.zeros(12)})


def test_convert_cli_roundtrip(tmp_path):
    assert_convert_cli_roundtrip(tmp_path, "conditional_detr_*.pt", "convert_conditional_detr",
                                 convert_official_conditional_detr, argparse.Namespace(hidden_dim=64))


# ------------------------------------------------------------------------------------ attention
def _reference_conditional_cross_attention(q_content, q_spatial, k_content, k_pos, v, nhead, pad):
    """Per-head loop: logits = (c_q·c_k + p_q·p_k) / sqrt(2d/M), padded keys excluded."""
    b, nq, d = q_content.shape
    dh = d // nhead
    outs = []
    for h in range(nhead):
        sl = slice(h * dh, (h + 1) * dh)
        logits = (q_content[..., sl] @ k_content[..., sl].transpose(1, 2)
                  + q_spatial[..., sl] @ k_pos[..., sl].transpose(1, 2)) / math.sqrt(2 * dh)
        logits = logits.masked_fill(pad[:, None, :], float("-inf"))
        outs.append(logits.softmax(-1) @ v[..., sl])
    return torch.cat(outs, -1)


@pytest.mark.parametrize("explicit", [False, True], ids=["sdpa", "explicit"])
def test_cross_attention_concatenates_content_and_spatial_per_head(explicit, monkeypatch):
    from smca_detr.modeling import blocks as layers_mod

    monkeypatch.setattr(layers_mod, "use_explicit_softmax", lambda *args: explicit)
    torch.manual_seed(0)
    b, nq, s, d, m = 2, 5, 7, 16, 4
    qc, qs = torch.randn(b, nq, d), torch.randn(b, nq, d)
    kc, kp, v = torch.randn(b, s, d), torch.randn(b, s, d), torch.randn(b, s, d)
    pad = torch.zeros(b, s, dtype=torch.bool)
    pad[1, -3:] = True
    att = HeadAttention(d).eval()
    nn_id = torch.nn.Linear(d, d)
    with torch.no_grad():
        nn_id.weight.copy_(torch.eye(d))
        nn_id.bias.zero_()
    att.out_proj = nn_id

    def heads(x):
        return x.unflatten(-1, (m, -1)).transpose(1, 2)

    q = torch.cat((heads(qc), heads(qs)), -1)
    k = torch.cat((heads(kc), heads(kp)), -1)
    mask = torch.zeros(b, 1, 1, s).masked_fill(pad[:, None, None], float("-inf"))
    out = att(q, k, heads(v), mask)
    ref = _reference_conditional_cross_attention(qc, qs, kc, kp, v, m, pad)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_sdpa_default_scale_is_the_official_scale():
    """For q/k head width 2d/M, SDPA's default 1/sqrt(E_qk) equals the official (2d/M)**-0.5."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 8, 5, 64), torch.randn(1, 8, 9, 64), torch.randn(1, 8, 9, 32)
    default = F.scaled_dot_product_attention(q, k, F.pad(v, (0, 32)))[..., :32]
    explicit = ((q * (2 * 256 / 8) ** -0.5) @ k.transpose(-1, -2)).softmax(-1) @ v
    torch.testing.assert_close(default, explicit, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ model
def small_cfg(path=REPO / "configs" / "conditional_detr_r50.yaml", extra=()):
    """A config file with shrunken widths for fast CPU tests (depth, dilation, layer counts and the
    method are the file's)."""
    return load_cfg(path, [
        "MODEL.RESNETS.RES2_OUT_CHANNELS", 16, "MODEL.RESNETS.WIDTH_PER_GROUP", 4,
        "MODEL.RESNETS.STEM_OUT_CHANNELS", 8, "MODEL.SMCA_DETR.HIDDEN_DIM", 32,
        "MODEL.SMCA_DETR.DIM_FEEDFORWARD", 64, "MODEL.SMCA_DETR.NUM_QUERIES", 30, *extra])


def test_decoder_structure_and_init():
    torch.manual_seed(0)
    model = build_model(small_cfg())
    t = model.transformer
    assert isinstance(t, ConditionalTransformer) and t.zero_init_box
    layers = t.decoder.layers
    assert len(layers) == 6 and len(t.encoder.layers) == 6
    assert layers[0].ca_qpos_proj is not None and all(l.ca_qpos_proj is None for l in layers[1:])
    assert model.heads.bbox_embed.layers[-1].weight.abs().sum() == 0
    assert torch.allclose(model.heads.class_embed.bias, torch.full((80,), -math.log(99.0)))
    keys = set(model.state_dict())
    for name in ("sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj", "sa_v_proj",
                 "self_attn.out_proj", "ca_qcontent_proj", "ca_kcontent_proj", "ca_kpos_proj",
                 "ca_v_proj", "ca_qpos_sine_proj", "cross_attn.out_proj"):
        assert f"transformer.decoder.layers.3.{name}.weight" in keys, name
    assert "transformer.decoder.query_scale.layers.1.weight" in keys
    assert "transformer.decoder.ref_point_head.layers.1.weight" in keys
    assert not any("in_proj" in k for k in keys if ".decoder." in k)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="PRE_NORM"):
        build_model(small_cfg(extra=["MODEL.SMCA_DETR.PRE_NORM", True]))
    with pytest.raises(ValueError, match="feature level"):
        build_model(small_cfg(extra=["MODEL.RESNETS.OUT_FEATURES", ["res4", "res5"],
                                     "MODEL.SMCA_DETR.IN_FEATURES", ["res4", "res5"]]))


def test_inference_api_and_references():
    torch.manual_seed(0)
    model = build_model(small_cfg()).eval()
    batch = tiny_batch()
    with torch.no_grad():
        res = model([{k: v for k, v in x.items() if k != "instances"} for x in batch])
        images = model.preprocess_image(batch)
        feats, masks = model.backbone(images.tensor, images.image_sizes)
        out = model.transformer(feats, masks, images.image_sizes)
    assert len(res) == 2 and len(res[0]["instances"]) == 100
    assert res[1]["instances"].image_size == (80, 112)
    # the reference is predicted once: the same logits for every layer
    refs = out.references
    assert refs.shape == (6, 2, 30, 2) and torch.equal(refs[0], refs[-1])
    torch.testing.assert_close(refs[0].sigmoid(), out.extras["reference_points"])
    # boxes of every layer = sigmoid(bbox_embed(hs) + [logit(ref), 0, 0])
    with torch.no_grad():
        logits, boxes = model.heads(out.hs, refs)
        raw = model.heads.bbox_embed(out.hs)
    torch.testing.assert_close(boxes[..., :2], (raw[..., :2] + refs).sigmoid())
    torch.testing.assert_close(boxes[..., 2:], raw[..., 2:].sigmoid())


def test_batch_of_one_without_padding_matches_padded_batch():
    """Skipping the all-false mask (one image, no padding) changes nothing."""
    torch.manual_seed(0)
    model = build_model(small_cfg()).eval()
    batch = tiny_batch(sizes=((96, 128), (64, 128)))
    with torch.no_grad():
        both = model.forward_features(*model.backbone(model.preprocess_image(batch).tensor, [(96, 128), (64, 128)]),
                                      [(96, 128), (64, 128)])
        one = model.forward_features(*model.backbone(model.preprocess_image(batch[:1]).tensor, [(96, 128)]),
                                     [(96, 128)])
    torch.testing.assert_close(one["pred_logits"][:, 0], both["pred_logits"][:, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(one["pred_boxes"][:, 0], both["pred_boxes"][:, 0], atol=1e-5, rtol=1e-4)


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"conditional_detr_r50.yaml", "conditional_detr_r50_dc5.yaml", "conditional_detr_r101.yaml",
            "conditional_detr_r101_dc5.yaml", "conditional_detr_r50_75ep.yaml",
            "conditional_detr_r50_108ep.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_recipe(path):
    cfg = load_cfg(path)
    c, s = cfg.MODEL.SMCA_DETR, cfg.SOLVER
    # official recipe
    assert c.TRANSFORMER == "ConditionalTransformer" and c.CLASS_LOSS == "focal"
    sizes = (c.NUM_QUERIES, c.HIDDEN_DIM, c.NHEADS, c.ENC_LAYERS, c.DEC_LAYERS, c.DIM_FEEDFORWARD)
    assert sizes == (300, 256, 8, 6, 6, 2048)
    assert (c.CLASS_WEIGHT, c.L1_WEIGHT, c.GIOU_WEIGHT) == (2.0, 5.0, 2.0)
    assert (c.COST_CLASS, c.COST_BBOX, c.COST_GIOU) == (2.0, 5.0, 2.0)
    assert (s.OPTIMIZER, s.BASE_LR, s.BACKBONE_MULTIPLIER, s.WEIGHT_DECAY) == ("ADAMW", 1e-4, 0.1, 1e-4)
    clip = s.CLIP_GRADIENTS
    assert clip.ENABLED and clip.CLIP_TYPE == "full_model" and clip.CLIP_VALUE == 0.1
    assert cfg.MODEL.RESNETS.NORM == "FrozenBN" and not cfg.MODEL.RESNETS.STRIDE_IN_1X1
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.PIXEL_MEAN == [123.675, 116.280, 103.530]
    dc5 = "_dc5" in path.stem
    assert cfg.MODEL.RESNETS.RES5_DILATION == (2 if dc5 else 1)
    assert s.IMS_PER_BATCH == (8 if dc5 else 16)
    assert cfg.MODEL.RESNETS.DEPTH == (101 if "r101" in path.stem else 50)
    m = re.search(r"_(\d+)ep", path.stem)
    epochs, drop = {50: (50, 40), 75: (75, 60), 108: (108, 80)}[int(m.group(1)) if m else 50]
    iters_per_epoch = math.ceil(COCO_TRAIN_IMAGES / 8) // (s.IMS_PER_BATCH // 8)  # 8 GPUs, drop_last
    assert s.MAX_ITER == epochs * iters_per_epoch and tuple(s.STEPS) == (drop * iters_per_epoch,)


# the schedule variants (_75ep, _108ep) have the model of conditional_detr_r50.yaml
MODEL_CONFIGS = [p for p in CONFIGS if not re.search(r"_\d+ep$", p.stem)]


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=[p.stem for p in MODEL_CONFIGS])
def test_config_builds_and_trains_one_step(path):
    """Builds (shrunken widths; depth, dilation, layer counts as in the file) and trains one step."""
    torch.manual_seed(0)
    model = build_model(small_cfg(path))
    model.train()
    losses = model(tiny_batch())
    suffixes = ["", *[f"_{i}" for i in range(5)]]
    expected = {f"{n}{sfx}" for n in ("loss_ce", "loss_bbox", "loss_giou") for sfx in suffixes}
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    dec = model.transformer.decoder
    for p in (dec.layers[1].ca_qpos_sine_proj.weight, dec.query_scale.layers[0].weight,
              dec.ref_point_head.layers[0].weight, dec.layers[0].ca_qpos_proj.weight,
              model.transformer.encoder.layers[0].self_attn.in_proj_weight,
              model.backbone.body.res5[0].conv1.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert model.backbone.body.stem.conv1.weight.grad is None  # FREEZE_AT 2
