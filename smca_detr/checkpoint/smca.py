"""Official SMCA-DETR checkpoints -> smca_detr state dicts.

Rules are kept per model kind in ``SMCA_CONVERSION_RULES`` (an ordered list of ``(regex,
replacement)`` per kind, applied by ``apply_renames``: unmatched non-backbone keys raise):
"single_scale" (here) and "conv_multi_scale" (``smca_multiscale``, whose keys also identify such a
checkpoint; every other SMCA checkpoint is single scale).

The backbone (``backbone.0.body.*``, torchvision ResNet) is converted by ``convert_backbone``
(detectron2 ResNet names under ``backbone.body.``). The class head has 92 rows in the official
checkpoints (COCO category ids 0..90 + DETR's unused "no object" column); by default only the 80
rows of detectron2's contiguous COCO classes are kept, in detectron2's order
(``coco_official_columns``); ``keep_all_classes=True`` keeps all rows unchanged (then set
``MODEL.SMCA_DETR.NUM_CLASSES`` to the row count, e.g. 92).
"""
import argparse
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple, Union

import torch

from .common import apply_renames, remap_coco_classes
from .safe_load import safe_torch_load
from .smca_multiscale import SMCA_CONV_MULTISCALE_KIND, SMCA_CONV_MULTISCALE_RULES, is_official_smca_multiscale

__all__ = ["SMCA_CONVERSION_RULES", "detect_smca_kind", "split_official_checkpoint",
           "convert_official_smca", "official_args_summary"]

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
    SMCA_CONV_MULTISCALE_KIND: _HEAD_RULES + SMCA_CONV_MULTISCALE_RULES,
}

def detect_smca_kind(state_dict: Dict[str, torch.Tensor]) -> str:
    """"conv_multi_scale" for an official "new multi-scale" state dict, "single_scale" otherwise."""
    return SMCA_CONV_MULTISCALE_KIND if is_official_smca_multiscale(state_dict) else "single_scale"


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
        raise KeyError(f"unknown SMCA checkpoint kind {kind!r}; known: {sorted(SMCA_CONVERSION_RULES)}")
    out = apply_renames(sd, SMCA_CONVERSION_RULES[kind])
    if not keep_all_classes:
        remap_coco_classes(out)
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
