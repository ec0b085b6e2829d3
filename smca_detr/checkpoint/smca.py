"""Official SMCA-DETR checkpoints -> smca_detr state dicts.

Rules are kept per model kind in ``SMCA_CONVERSION_RULES`` (an ordered list of ``(regex,
replacement)`` per kind, applied by ``apply_renames``: unmatched non-backbone keys raise). The kind
of a checkpoint is found by the predicates in ``SMCA_KIND_DETECTORS`` (first match wins; the
single-scale kind is the fallback). Another SMCA variant (e.g. the multi-scale model) adds its kind
with ``register_smca_kind(kind, rules, detect)`` without touching the single-scale rules.

The backbone (``backbone.0.body.*``, torchvision ResNet) is converted by ``convert_backbone``
(detectron2 ResNet names under ``backbone.body.``). The class head has 92 rows in the official
checkpoints (COCO category ids 0..90 + DETR's unused "no object" column); by default only the 80
rows of detectron2's contiguous COCO classes are kept, in detectron2's order
(``coco_official_columns``); ``keep_all_classes=True`` keeps all rows unchanged (then set
``MODEL.SMCA_DETR.NUM_CLASSES`` to the row count, e.g. 92).
"""
import argparse
import importlib
import os
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from .common import apply_renames, remap_coco_classes
from .safe_load import safe_torch_load

__all__ = ["SMCA_CONVERSION_RULES", "SMCA_KIND_DETECTORS", "SMCA_CLASS_KEYS", "register_smca_kind",
           "SMCA_KIND_MODULES", "detect_smca_kind", "split_official_checkpoint", "convert_official_smca",
           "official_args_summary"]

Rules = List[Tuple[str, str]]

# Keys shared by every SMCA kind: heads and queries live at the top of the official DETR module.
_HEAD_RULES: Rules = [
    (r"^class_embed\.", "heads.class_embed."),
    (r"^bbox_embed\.", "heads.bbox_embed."),
    (r"^query_embed\.", "transformer.query_embed."),
]

SMCA_CONVERSION_RULES: Dict[str, Rules] = {
    # Single scale (official repository root). Encoder / decoder keep their official names
    # (self_attn, multihead_attn, linear1/2, norm1..4, point1.layers.i, point2, point3).
    "single_scale": _HEAD_RULES + [
        (r"^transformer\.encoder\.layers\.(\d+)\.(self_attn|linear1|linear2|norm1|norm2)\.",
         r"transformer.encoder.layers.\1.\2."),
        (r"^transformer\.decoder\.layers\.(\d+)\.(self_attn|multihead_attn|linear1|linear2|norm[1-4]|point[123])\.",
         r"transformer.decoder.layers.\1.\2."),
        (r"^transformer\.decoder\.norm\.", "transformer.decoder.norm."),
        (r"^input_proj\.", "transformer.input.input_proj."),
    ],
}

# (kind, predicate on the official state dict); checked in order, "single_scale" if none matches.
SMCA_KIND_DETECTORS: List[Tuple[str, Callable[[Dict[str, torch.Tensor]], bool]]] = []

# Modules that register further kinds when imported (imported lazily by ``detect_smca_kind``, so
# auto-detection works without importing them first).
SMCA_KIND_MODULES = ["smca_detr.checkpoint.smca_multiscale"]

# Our class-head tensors whose rows are official class columns.
SMCA_CLASS_KEYS = ["heads.class_embed.weight", "heads.class_embed.bias"]


def register_smca_kind(kind: str, rules: Rules, detect: Optional[Callable[[Dict], bool]] = None) -> None:
    """Add (or replace) the conversion rules of an SMCA model kind; ``detect(state_dict)`` lets
    ``convert_official_smca`` recognise it automatically. ``_HEAD_RULES`` are prepended."""
    SMCA_CONVERSION_RULES[kind] = _HEAD_RULES + list(rules)
    if detect is not None:
        SMCA_KIND_DETECTORS[:] = [(k, f) for k, f in SMCA_KIND_DETECTORS if k != kind] + [(kind, detect)]


def _import_kind_modules():
    for name in SMCA_KIND_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def detect_smca_kind(state_dict: Dict[str, torch.Tensor]) -> str:
    """The registered kind whose predicate accepts ``state_dict``; "single_scale" otherwise."""
    _import_kind_modules()
    for kind, detect in SMCA_KIND_DETECTORS:
        if detect(state_dict):
            return kind
    return "single_scale"


def split_official_checkpoint(checkpoint) -> Tuple[Dict[str, torch.Tensor], Optional[argparse.Namespace]]:
    """An official file (path, loaded with ``safe_torch_load``) or its loaded content
    (``{"model", "args", ...}``, or a bare state dict) -> (state dict, args or None)."""
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = safe_torch_load(checkpoint)
    if isinstance(checkpoint, dict) and "model" in checkpoint and isinstance(checkpoint["model"], dict):
        return checkpoint["model"], checkpoint.get("args")
    if isinstance(checkpoint, dict):
        return checkpoint, None
    raise TypeError(f"expected an official checkpoint dict ({{'model': ..., 'args': ...}} or a state dict), "
                    f"got {type(checkpoint).__name__}")


def convert_official_smca(state_dict: Union[Dict, str, os.PathLike], keep_all_classes: bool = False,
                          kind: Optional[str] = None) -> "OrderedDict[str, torch.Tensor]":
    """Official SMCA-DETR state dict (or full checkpoint with ``model``/``args``) -> our names.

    Args:
        state_dict: official ``model`` state dict, the whole loaded checkpoint, or its path
            (loaded with ``safe_torch_load``: tensors and ``argparse.Namespace`` only).
        keep_all_classes: keep every official class row (92) instead of the 80 COCO classes.
        kind: a key of ``SMCA_CONVERSION_RULES``; detected from the keys when None.

    Raises KeyError for official keys without a rule (nothing is dropped silently) and ValueError
    when the class head does not have the 92 COCO rows and ``keep_all_classes`` is False.
    """
    sd, _ = split_official_checkpoint(state_dict)
    kind = kind or detect_smca_kind(sd)
    if kind not in SMCA_CONVERSION_RULES:
        _import_kind_modules()
    if kind not in SMCA_CONVERSION_RULES:
        raise KeyError(f"unknown SMCA checkpoint kind {kind!r}; known: {sorted(SMCA_CONVERSION_RULES)}")
    out = apply_renames(sd, SMCA_CONVERSION_RULES[kind])
    if not keep_all_classes:
        remap_coco_classes(out, SMCA_CLASS_KEYS)
    return out


def official_args_summary(args: Optional[argparse.Namespace]) -> Dict[str, object]:
    """The config overrides an official ``args`` namespace implies (for the converter CLI)."""
    if args is None:
        return {}
    a = vars(args)
    mapping = {
        "hidden_dim": "MODEL.SMCA_DETR.HIDDEN_DIM",
        "nheads": "MODEL.SMCA_DETR.NHEADS",
        "enc_layers": "MODEL.SMCA_DETR.ENC_LAYERS",
        "dec_layers": "MODEL.SMCA_DETR.DEC_LAYERS",
        "dim_feedforward": "MODEL.SMCA_DETR.DIM_FEEDFORWARD",
        "num_queries": "MODEL.SMCA_DETR.NUM_QUERIES",
        "pre_norm": "MODEL.SMCA_DETR.PRE_NORM",
        "dynamic_scale": "MODEL.SMCA_DETR.SMCA.DYNAMIC_SCALE",
        "smooth": "MODEL.SMCA_DETR.SMCA.SMOOTH",
        "dilation": "MODEL.RESNETS.RES5_DILATION (True -> 2)",
        "backbone": "MODEL.RESNETS.DEPTH (resnet50 -> 50, resnet101 -> 101)",
    }
    return {cfg_key: a[k] for k, cfg_key in mapping.items() if k in a}
