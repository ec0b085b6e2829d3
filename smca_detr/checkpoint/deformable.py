"""Conversion of official Deformable DETR checkpoints (fundamentalvision/Deformable-DETR) to
smca_detr's layout.

Official layout -> ours:

* ``transformer.*`` (level_embed, encoder, decoder layers, reference_points, enc_output(_norm),
  pos_trans(_norm)): unchanged.
* ``query_embed.weight`` -> ``transformer.query_embed.weight``; ``input_proj.{l}.{0,1}.*`` ->
  ``transformer.input_proj.{l}.{0,1}.*``.
* ``class_embed.{i}.*`` / ``bbox_embed.{i}.*``: without box refinement one module repeated per
  layer (all ``i`` hold the same values) -> ``heads.class_embed.*`` / ``heads.bbox_embed.*``; with
  box refinement (and two-stage: ``i`` up to ``DEC_LAYERS``) one module per layer ->
  ``heads.class_embed.{i}.*`` / ``heads.bbox_embed.{i}.*``.
* ``transformer.decoder.bbox_embed.{i}.*`` / ``transformer.decoder.class_embed.{i}.*``: aliases of the
  top-level heads (same parameters in the official model); consumed after checking they are equal.
* ``backbone.0.body.*`` (torchvision ResNet) -> ``backbone.body.*`` (detectron2 names).

Class rows: the official heads have 91 columns (COCO category ids 0..90); by default only the 80
COCO classes are kept, in detectron2's contiguous order. ``keep_all_classes=True`` keeps every
column (a model with ``NUM_CLASSES`` = the official column count, e.g. the parity fixtures). The
two-stage encoder head (``class_embed.<DEC_LAYERS>``) is class-agnostic, its row 0 the objectness
score that selects the proposals: it keeps its first rows instead (``remap_class_rows``).
"""
import re
from collections import OrderedDict
from typing import Dict, Optional

import torch

from .common import convert_backbone, remap_coco_classes, rename_official_backbone_key
from .smca import split_official_checkpoint

__all__ = ["convert_official_deformable_detr", "rename_official_deformable_key", "official_layout", "variant_name"]

_HEAD = re.compile(r"^(class_embed|bbox_embed)\.(\d+)\.(.*)$")
_ALIAS = re.compile(r"^transformer\.decoder\.(class_embed|bbox_embed)\.(\d+)\.(.*)$")
_TRANSFORMER_PREFIXES = ("transformer.level_embed", "transformer.encoder.", "transformer.decoder.layers.",
                         "transformer.reference_points.", "transformer.enc_output.",
                         "transformer.enc_output_norm.", "transformer.pos_trans.", "transformer.pos_trans_norm.")


def official_layout(state_dict: Dict[str, torch.Tensor]) -> Dict[str, bool]:
    """``{"per_layer_heads", "two_stage"}`` of an official state dict (box refinement / two-stage
    add ``transformer.decoder.bbox_embed.*``; two-stage adds ``transformer.enc_output.*``)."""
    return {
        "per_layer_heads": any(k.startswith("transformer.decoder.bbox_embed.") for k in state_dict),
        "two_stage": any(k.startswith("transformer.enc_output.") for k in state_dict),
    }


def variant_name(state_dict: Dict[str, torch.Tensor]) -> str:
    """"plain", "box refinement" or "two-stage" (:func:`official_layout`)."""
    layout = official_layout(state_dict)
    return "two-stage" if layout["two_stage"] else ("box refinement" if layout["per_layer_heads"] else "plain")


def rename_official_deformable_key(key: str, per_layer_heads: bool) -> Optional[str]:
    """Our name of one official key (aliases map to the name of the module they alias), or None
    for a key no rule covers."""
    backbone = rename_official_backbone_key(key)
    if backbone is not None:
        return backbone
    m = _ALIAS.match(key) or _HEAD.match(key)
    if m:
        kind, idx, rest = m.groups()
        return f"heads.{kind}.{idx}.{rest}" if per_layer_heads else f"heads.{kind}.{rest}"
    if key.startswith(_TRANSFORMER_PREFIXES):
        return key
    if key == "query_embed.weight":
        return "transformer.query_embed.weight"
    if key.startswith("input_proj."):
        return "transformer." + key
    return None


def convert_official_deformable_detr(state_dict: Dict[str, torch.Tensor], keep_all_classes: bool = False
                                     ) -> "OrderedDict[str, torch.Tensor]":
    """Official Deformable DETR state dict (plain, box refinement or two-stage; with or without the
    backbone) -> smca_detr state dict. Raises ``KeyError`` for a key no rule covers and
    ``ValueError`` when keys that are one parameter in the official model (aliases, or the repeated
    heads without box refinement) hold different values."""
    state_dict, _ = split_official_checkpoint(state_dict)
    per_layer = official_layout(state_dict)["per_layer_heads"]
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    source: Dict[str, str] = {}
    for key, value in state_dict.items():
        if rename_official_backbone_key(key) is not None:
            continue  # convert_backbone below
        new = rename_official_deformable_key(key, per_layer)
        if new is None:
            raise KeyError(f"official Deformable DETR key {key!r} has no conversion rule")
        if new in out:
            if out[new].shape != value.shape or not torch.equal(out[new], value):
                raise ValueError(
                    f"official keys {source[new]!r} and {key!r} are one parameter ({new!r}) but hold "
                    "different values")
            continue
        out[new] = value
        source[new] = key
    out.update(convert_backbone(state_dict))
    if not keep_all_classes:
        remap_coco_classes(out, [k for k in out if k.startswith("heads.class_embed.")])
    return out
