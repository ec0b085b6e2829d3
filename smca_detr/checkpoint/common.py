"""Conversion pieces shared by the official SMCA / Conditional / Deformable DETR converters:
backbone renames (torchvision ResNet -> detectron2 ResNet, also for torchvision's own ImageNet
checkpoints) and COCO class-row remapping (which leaves class-agnostic heads alone)."""
import re
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence

import torch

__all__ = ["rename_official_backbone_key", "coco_official_columns", "remap_class_rows",
           "objectness_head_keys", "objectness_head_note", "objectness_rows", "convert_backbone",
           "apply_renames", "is_torchvision_resnet", "convert_torchvision_resnet", "describe_keys"]

_BACKBONE_PREFIX = re.compile(r"^backbone\.0\.body\.")
_PER_LAYER_CLASS_HEAD = re.compile(r"^heads\.class_embed\.(\d+)\.(weight|bias)$")
_TORCHVISION_RESNET_KEY = re.compile(r"^(conv1|bn1|layer[1-4]|fc)\.")
_TORCHVISION_RESNET_MARKERS = ("conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "fc.weight")


def describe_keys(keys: Iterable[str], limit: int) -> str:
    """The first ``limit`` of ``keys`` (sorted), comma-separated, then how many more there are."""
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


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


def objectness_head_keys(state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """Our keys of a class head that is read by position instead of per class: the encoder head of
    two-stage Deformable DETR (the last per-layer class head, ``heads.class_embed.<DEC_LAYERS>``, in a
    state dict with ``transformer.enc_output.*``). It is trained class-agnostically (every target is
    labelled 0) and its row 0 is the objectness score that selects the proposals
    (``topk(enc_logits[..., 0])``), so its rows are no classes and must not be remapped."""
    if not any(k.startswith("transformer.enc_output.") for k in state_dict):
        return []
    layers = [int(m.group(1)) for m in map(_PER_LAYER_CLASS_HEAD.match, state_dict) if m]
    if not layers:
        return []
    keys = [f"heads.class_embed.{max(layers)}.{p}" for p in ("weight", "bias")]
    return [k for k in keys if k in state_dict]


def remap_class_rows(state_dict: Dict[str, torch.Tensor], keys: Iterable[str],
                     columns: List[int]) -> None:
    """Keep only ``columns`` (in that order) of the class-head weight/bias tensors ``keys``. A
    class-agnostic head among them (:func:`objectness_head_keys`) keeps its first ``len(columns)``
    rows instead: its row 0, the objectness score, stays row 0."""
    index = torch.as_tensor(columns, dtype=torch.long)
    agnostic = set(objectness_head_keys(state_dict))
    for k in keys:
        if k in state_dict:
            rows = torch.arange(len(columns)) if k in agnostic else index
            state_dict[k] = state_dict[k].index_select(0, rows).clone()


def remap_coco_classes(state_dict: Dict[str, torch.Tensor],
                       keys: Sequence[str] = ("heads.class_embed.weight", "heads.class_embed.bias")) -> None:
    """``remap_class_rows`` to detectron2's 80 COCO classes (``keys``: by default the one shared class
    head); ValueError when the class head has too few rows to be an official COCO head."""
    columns = coco_official_columns()
    rows = [state_dict[k].shape[0] for k in keys if k in state_dict]
    if rows and max(rows) <= max(columns):
        raise ValueError(
            f"the class head has {max(rows)} rows, too few for the official COCO layout (the 91-row head of COCO "
            "category ids, + 'no object' for SMCA); convert with keep_all_classes=True for other datasets and set "
            "MODEL.SMCA_DETR.NUM_CLASSES accordingly")
    remap_class_rows(state_dict, keys, columns)


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


def objectness_head_note(keys: Sequence[str], class_head: str, ckpt_rows: int, model_rows: int) -> str:
    """The log sentence saying what a ``"remapped"`` / ``"skipped"`` class head means for the
    two-stage encoder head ``keys`` (:func:`objectness_head_keys`; empty string when there is none)."""
    if not keys:
        return ""
    return (f" The two-stage encoder class head ({', '.join(sorted(keys))}) is class-agnostic: its row 0 is "
            f"the objectness score that selects the proposals; it is not {class_head} but keeps the "
            f"checkpoint's first {min(ckpt_rows, model_rows)} rows (row 0 stays row 0), so the proposals are "
            "the checkpoint's.")


def objectness_rows(checkpoint_tensor: torch.Tensor, model_tensor: torch.Tensor) -> torch.Tensor:
    """The two-stage encoder head's tensor for a model of another class count: the checkpoint's
    first rows (as many as both have; row 0 is the objectness score), the model's own beyond."""
    n = min(len(checkpoint_tensor), len(model_tensor))
    return torch.cat([checkpoint_tensor[:n], model_tensor[n:].to(checkpoint_tensor)]).clone()


def is_torchvision_resnet(state_dict) -> bool:
    """A ResNet state dict as torchvision publishes it (``resnet50-0676ba61.pth``,
    ``resnet101-63fe2227.pth``, or ``torchvision.models.resnet50().state_dict()``): top-level
    ``conv1`` / ``bn1`` / ``layer1..4`` / ``fc`` keys and nothing else."""
    return (all(k in state_dict for k in _TORCHVISION_RESNET_MARKERS)
            and all(isinstance(k, str) and _TORCHVISION_RESNET_KEY.match(k) for k in state_dict))


def convert_torchvision_resnet(state_dict: Dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """A torchvision ResNet state dict -> our ``backbone.body.*`` (detectron2 ResNet names, BatchNorm
    -> FrozenBN ``norm``), the ImageNet classifier ``fc`` dropped: the same renames as the backbone of
    the official detector checkpoints (:func:`rename_official_backbone_key`)."""
    return convert_backbone(OrderedDict(("backbone.0.body." + k, v) for k, v in state_dict.items()
                                        if not k.startswith("fc.")))
