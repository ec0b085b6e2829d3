"""Shared helpers of the parity tests (fixtures of the official implementations).

The directory comes from ``$SMCA_DETR_PARITY_DIR`` (default: ``tests/data/parity`` in this repo);
files are discovered by name, and every model is built from each file's ``config``.
Fixtures may be in the original format or in this repo's compact format (see
``tools/compact_parity_fixture.py``: int8 weights with one power-of-two exponent per tensor, and
only the entries the tests compare); ``load_fixture`` returns the same dict for both.

The configs of our models are built from a fixture's ``config`` through the key tables below
(``SMCA_KEYS``, ``DETR_KEYS``); the backbone is a parameter-free stub declaring the fixture's
levels (``use_stub_backbone`` for SMCA; ``use_level_backbone`` for Conditional / Deformable DETR,
levels from the fixture's strides and channels taken as given). The parity runs bypass it
(``forward_from_features``).
"""
import ast
import functools
import importlib
import os
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, build_model

from smca_detr.config import add_smca_detr_config

REPO = Path(__file__).resolve().parents[1]
COMPACT_FORMAT = "smca-detr-compact-fixture/1"


def parity_dir() -> Path:
    return Path(os.environ.get("SMCA_DETR_PARITY_DIR", REPO / "tests" / "data" / "parity"))


def fixture_files(pattern: str):
    return sorted(parity_dir().glob(pattern))


def fixture_params(pattern: str):
    """``pytest.mark.parametrize`` argument list over the fixtures matching ``pattern``; a single
    skipped case when there is none (so the absence is visible, not silent)."""
    files = fixture_files(pattern)
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no {pattern} in {parity_dir()}"))]
    return [pytest.param(f, id=f.stem) for f in files]


def expand_state_dict(compact):
    out = {}
    for k, v in compact.items():
        if isinstance(v, dict) and "q" in v:
            out[k] = v["q"].to(torch.float32) * (2.0 ** int(v["e"]))
        else:
            out[k] = v
    return out


def load_fixture(path):
    fx = torch.load(path, map_location="cpu", weights_only=True)
    if fx.get("format") == COMPACT_FORMAT:
        fx = dict(fx)
        fx["state_dict"] = expand_state_dict(fx["state_dict"])
    return fx


@functools.lru_cache(maxsize=None)
def cached_fixture(path):
    """``load_fixture`` once per file (the tests only read the fixtures)."""
    return load_fixture(path)


def fixture_targets(fx):
    """The fixture's targets as the criterion takes them (labels, normalised cxcywh boxes)."""
    return [{"labels": t["labels"], "boxes": t["boxes"]} for t in fx["inputs"]["targets"]]


def official_gaussian_bias(gaussian, b, m):
    """Official SMCA Gaussian ``[Q, S, B*M]`` (index b*M + head) -> ours ``[B, M, Q, S]``."""
    q, s, _ = gaussian.shape
    return gaussian.view(q, s, b, m).permute(2, 3, 0, 1)


def stack_results(results):
    """``(scores, labels, boxes)`` of per-image ``Instances``, stacked over the batch."""
    return (torch.stack([r.scores for r in results]), torch.stack([r.pred_classes for r in results]),
            torch.stack([r.pred_boxes.tensor for r in results]))


# ------------------------------------------------------------------ configs from a fixture's config
# MODEL.SMCA_DETR key (dotted into sub-nodes) <- fixture ``config`` entry (dotted into nested dicts).
SMCA_KEYS = {  # official SMCA-DETR, single and multi-scale
    "HIDDEN_DIM": "d_model", "NHEADS": "nheads", "DIM_FEEDFORWARD": "dim_feedforward",
    "ENC_LAYERS": "num_encoder_layers", "DEC_LAYERS": "num_decoder_layers", "NUM_QUERIES": "num_queries",
    "NUM_CLASSES": "num_logits",  # keep-all conversion: every official column is a focal logit
    "DROPOUT": "dropout", "ACTIVATION": "activation", "PRE_NORM": "normalize_before",
    "DEEP_SUPERVISION": "aux_loss", "SMCA.DYNAMIC_SCALE": "dynamic_scale", "SMCA.SMOOTH": "smooth",
    "POS_TEMPERATURE": "position_encoding.temperature",
    "COST_CLASS": "matcher.cost_class", "COST_BBOX": "matcher.cost_bbox", "COST_GIOU": "matcher.cost_giou",
    "FOCAL_ALPHA": "loss.focal_alpha", "FOCAL_GAMMA": "loss.focal_gamma",
    "CLASS_WEIGHT": "loss.weight_dict.loss_ce", "L1_WEIGHT": "loss.weight_dict.loss_bbox",
    "GIOU_WEIGHT": "loss.weight_dict.loss_giou", "TEST_TOPK": "postprocess_topk",
}
SMCA_DEFAULTS = {"activation": "relu"}
DETR_KEYS = {  # official Conditional / Deformable DETR (their argparse names)
    "NUM_CLASSES": "num_classes", "HIDDEN_DIM": "d_model", "NHEADS": "nhead",
    "ENC_LAYERS": "num_encoder_layers", "DEC_LAYERS": "num_decoder_layers",
    "DIM_FEEDFORWARD": "dim_feedforward", "NUM_QUERIES": "num_queries", "DROPOUT": "dropout",
    "ACTIVATION": "activation", "DEEP_SUPERVISION": "aux_loss", "FOCAL_ALPHA": "focal_alpha",
    "COST_CLASS": "set_cost_class", "COST_BBOX": "set_cost_bbox", "COST_GIOU": "set_cost_giou",
    "CLASS_WEIGHT": "cls_loss_coef", "L1_WEIGHT": "bbox_loss_coef", "GIOU_WEIGHT": "giou_loss_coef",
}


def set_from_fixture(node, config, keys, defaults=None):
    """``node.KEY = config[path]`` for every ``KEY: path`` of ``keys`` (both dotted); a ``path``
    missing from ``config`` takes ``defaults[path]`` when there is one, else raises ``KeyError``."""
    defaults = defaults or {}
    for key, path in keys.items():
        try:
            value = functools.reduce(lambda d, part: d[part], path.split("."), config)
        except KeyError:
            if path not in defaults:
                raise
            value = defaults[path]
        *sub, name = key.split(".")
        setattr(functools.reduce(getattr, sub, node), name, value)


def cfg_from_fixture(config, transformer, keys, defaults=None):
    """Our CPU config of a ``transformer`` with focal loss, ``MODEL.SMCA_DETR`` filled from the
    fixture ``config`` through ``keys``; the backbone is left to ``use_stub_backbone`` /
    ``use_level_backbone``."""
    cfg = add_smca_detr_config(get_cfg())
    m = cfg.MODEL.SMCA_DETR
    m.TRANSFORMER = transformer
    m.CLASS_LOSS = "focal"
    set_from_fixture(m, config, keys, defaults)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


_STUB = "ParityStubBackbone"

if _STUB not in BACKBONE_REGISTRY:
    @BACKBONE_REGISTRY.register()
    class ParityStubBackbone(Backbone):
        """Parity runs bypass the backbone (``forward_from_features``); this parameter-free stub only
        declares the fixture's levels (names, channels, strides from MODEL.PARITY_STUB), so the
        converted official state dict loads with ``strict=True``."""

        def __init__(self, cfg, input_shape):
            super().__init__()
            p = cfg.MODEL.PARITY_STUB
            self._shapes = {n: ShapeSpec(channels=c, stride=s) for n, c, s in zip(p.NAMES, p.CHANNELS, p.STRIDES)}

        def forward(self, x):
            out = {}
            for name, shape in self._shapes.items():
                y = F.avg_pool2d(x, shape.stride)
                out[name] = y.mean(1, keepdim=True).expand(-1, shape.channels, -1, -1)
            return out

        def output_shape(self):
            return dict(self._shapes)


def use_stub_backbone(cfg, names, channels, strides):
    """The parameter-free stub backbone with levels ``names`` (channels, strides), all of them fed to
    the transformer."""
    cfg.MODEL.BACKBONE.NAME = _STUB
    cfg.MODEL.PARITY_STUB = CN()
    cfg.MODEL.PARITY_STUB.NAMES = list(names)
    cfg.MODEL.PARITY_STUB.CHANNELS = list(channels)
    cfg.MODEL.PARITY_STUB.STRIDES = list(strides)
    cfg.MODEL.SMCA_DETR.IN_FEATURES = list(names)
    return cfg


_STAGE_OF_STRIDE = {4: "res2", 8: "res3", 16: "res4", 32: "res5"}


def use_level_backbone(cfg, strides, channels):
    """The stub backbone with one level per fixture stride, with the fixture's ``channels`` taken as
    given (no ResNet channel progression assumed), named ``res2``..``res5`` where the stride is a
    ResNet stage's and ``p<stride>`` otherwise, all of them fed to the transformer."""
    names = [_STAGE_OF_STRIDE.get(s, f"p{s}") for s in strides]
    return use_stub_backbone(cfg, names, channels, strides)


# ------------------------------------------------------------------ loading converted weights
def assert_loads_strictly(model, state_dict):
    """``state_dict`` has exactly the model's keys and shapes, loads with ``strict=True`` and every
    value ends up in the model unchanged."""
    ours = model.state_dict()
    assert sorted(state_dict) == sorted(ours), set(state_dict) ^ set(ours)
    for k, v in state_dict.items():
        assert v.shape == ours[k].shape, k
    model.load_state_dict(state_dict, strict=True)
    ours = model.state_dict()
    for k, v in state_dict.items():
        assert torch.equal(ours[k], v), k


def load_without_backbone(model, state_dict):
    """Loads converted official weights that hold no backbone (the fixtures): nothing unexpected,
    nothing but ``backbone.*`` missing."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith("backbone.") for k in missing), [k for k in missing if not k.startswith("backbone.")]
    return state_dict


def build_loaded_model(path, build_cfg, convert):
    """``(fixture, cfg, model, converted)``: the fixture at ``path``, our config of its ``config`` (by
    ``build_cfg``), the model built from it (seed 0, eval mode) and loaded by ``load_without_backbone``
    with ``converted = convert(state_dict, keep_all_classes=True)``."""
    torch.manual_seed(0)
    fx = load_fixture(path)
    cfg = build_cfg(fx["config"])
    model = build_model(cfg).eval()
    converted = load_without_backbone(model, convert(fx["state_dict"], keep_all_classes=True))
    return fx, cfg, model, converted


def assert_convert_cli_roundtrip(tmp_path, pattern, tool, convert, args):
    """The conversion CLI ``tools/<tool>.py`` (on ``sys.path``: conftest's ``tools_on_path``), run on an
    official checkpoint file (``model``, ``args``, ``epoch``) of the first ``pattern`` fixture, writes
    exactly ``convert(state_dict, keep_all_classes=True)``."""
    files = fixture_files(pattern)
    if not files:
        pytest.skip(f"no {pattern} fixture")
    cli = importlib.import_module(tool)
    sd = load_fixture(files[0])["state_dict"]
    src = tmp_path / "official.pth"
    torch.save({"model": sd, "args": args, "epoch": 1}, src)
    dst = tmp_path / "out" / "ours.pth"
    cli.main([str(src), str(dst), "--keep-all-classes"])
    out = torch.load(dst, weights_only=True)["model"]
    ref = convert(sd, keep_all_classes=True)
    assert list(out) == list(ref)
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def tol(dtype):
    """README 5.1 tolerances."""
    if dtype == torch.float64:
        return dict(atol=1e-10, rtol=1e-8)
    return dict(atol=1e-5, rtol=1e-4)


def assert_close(actual, expected, what="", dtype=None):
    dtype = dtype or expected.dtype
    torch.testing.assert_close(actual.to(expected.dtype), expected, **tol(dtype),
                               msg=lambda m: f"{what}: {m}")


def assert_indices_equal(actual, expected, what=""):
    """Matcher indices: per image (query_idx, target_idx) int64, compared exactly."""
    assert len(actual) == len(expected), what
    for b, ((aq, at), (eq, et)) in enumerate(zip(actual, expected)):
        order = torch.argsort(aq)
        assert torch.equal(aq[order].cpu(), eq), f"{what} image {b} queries: {aq[order]} vs {eq}"
        assert torch.equal(at[order].cpu(), et), f"{what} image {b} targets: {at[order]} vs {et}"


def assert_topk_close(scores, labels, boxes, ref, dtype=torch.float32):
    """Post-processing: scores with tolerance; labels/boxes only at ranks whose score is separated
    from its neighbours by more than the tolerance (README 5.1, ties may swap)."""
    t = tol(dtype)
    torch.testing.assert_close(scores, ref["scores"].to(scores.dtype), **t)
    ref_s = ref["scores"]
    for b in range(ref_s.shape[0]):
        s = ref_s[b]
        gap = torch.full_like(s, float("inf"))
        diffs = (s[:-1] - s[1:]).abs()
        gap[:-1] = torch.minimum(gap[:-1], diffs)
        gap[1:] = torch.minimum(gap[1:], diffs)
        ok = gap > (t["atol"] + t["rtol"] * s.abs()) * 2
        assert torch.equal(labels[b][ok].cpu().long(), ref["labels"][b][ok].long()), f"labels image {b}"
        torch.testing.assert_close(boxes[b][ok], ref["boxes"][b][ok].to(boxes.dtype), atol=t["atol"] * 1e3,
                                   rtol=t["rtol"])


# ----------------------------------------------------------------------- official key listings (keys/)
def official_key_listing(name: str) -> "OrderedDict[str, tuple]":
    """``key -> shape`` of the official full-size state dict listed in ``keys/<name>`` (lines
    ``key<TAB>shape[<TAB>dtype]``; a key listed again in a later section is not repeated)."""
    path = parity_dir() / "keys" / name
    if not path.exists():
        pytest.skip(f"no {path}")
    out = OrderedDict()
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split("\t")[:2]
            out.setdefault(key, tuple(int(x) for x in re.findall(r"\d+", shape)))
    return out


def deformable_official_listing():
    """``{variant: (OrderedDict key -> shape, tied groups)}`` of the full-size official Deformable
    DETR models: the plain listing, then box_refine / two_stage as differences to it."""
    path = parity_dir() / "keys" / "deformable_detr_full_model_keys.txt"
    if not path.exists():
        pytest.skip(f"no {path}")
    variants, current = {}, None
    for line in path.read_text().splitlines():
        m = re.match(r"^# (plain|box_refine|two_stage): (\d+) state_dict entries", line)
        if m:
            name = m.group(1)
            base = {} if name == "plain" else dict(variants["plain"][0])
            variants[name] = [base, [], int(m.group(2))]
            current = variants[name]
            continue
        if line.startswith("# tied"):
            current[1] = ast.literal_eval(line.split(":", 1)[1].strip())
        elif line.startswith("# vs plain: removed"):
            removed = ast.literal_eval(re.search(r"removed (\[.*?\]);", line).group(1))
            for k in removed:
                del current[0][k]
        elif line.strip() and not line.startswith("#"):
            key, shape = line.split("\t")[:2]
            current[0][key] = tuple(int(x) for x in re.findall(r"\d+", shape))
    for name, (keys, _, n) in variants.items():
        assert len(keys) == n, (name, len(keys), n)
    return {k: (v[0], v[1]) for k, v in variants.items()}
