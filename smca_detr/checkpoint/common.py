"""Conversion pieces shared by the official SMCA / Conditional / Deformable DETR converters:
backbone renames (torchvision ResNet -> detectron2 ResNet) and COCO class-row remapping."""
import re
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional

import torch

__all__ = ["rename_official_backbone_key", "coco_official_columns", "remap_class_rows",
           "convert_backbone", "apply_renames"]

_BACKBONE_PREFIX = re.compile(r"^backbone\.0\.body\.")


def rename_official_backbone_key(key: str) -> Optional[str]:
    """``backbone.0.body.layer1.0.bn1.weight`` -> ``backbone.body.res2.0.conv1.norm.weight``.
    Returns None for keys that are not backbone keys."""
    if not _BACKBONE_PREFIX.match(key):
        return None
    k = _BACKBONE_PREFIX.sub("", key)
    k = re.sub(r"^conv1\.", "stem.conv1.", k)
    k = re.sub(r"^bn1\.", "stem.conv1.norm.", k)
    k = re.sub(r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}.", k)
    k = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", k)
    k = k.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
    return "backbone.body." + k


def convert_backbone(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The backbone part of an official state dict, renamed to detectron2 names."""
    out = OrderedDict()
    for k, v in state_dict.items():
        new = rename_official_backbone_key(k)
        if new is not None and not k.endswith("num_batches_tracked"):
            out[new] = v
    return out


def coco_official_columns() -> List[int]:
    """Official class column (COCO category id) of each of detectron2's 80 contiguous COCO classes."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return [c["id"] for c in COCO_CATEGORIES if c["isthing"] == 1]


def remap_class_rows(state_dict: Dict[str, torch.Tensor], keys: Iterable[str],
                     columns: List[int]) -> None:
    """Keep only ``columns`` (in that order) of the class-head weight/bias tensors ``keys``."""
    index = torch.as_tensor(columns, dtype=torch.long)
    for k in keys:
        if k in state_dict:
            state_dict[k] = state_dict[k].index_select(0, index).clone()


def apply_renames(state_dict: Dict[str, torch.Tensor], rules) -> "OrderedDict[str, torch.Tensor]":
    """Rename every non-backbone key with the first matching ``(regex, replacement)`` rule.
    Keys no rule matches raise, so a converter never drops weights silently."""
    out = OrderedDict()
    for k, v in state_dict.items():
        if _BACKBONE_PREFIX.match(k):
            continue
        for pattern, repl in rules:
            if re.match(pattern, k):
                out[re.sub(pattern, repl, k)] = v
                break
        else:
            raise KeyError(f"official checkpoint key {k!r} has no conversion rule")
    out.update(convert_backbone(state_dict))
    return out
