"""Official Conditional DETR checkpoints (github.com/Atten4Vis/ConditionalDETR) -> smca_detr.

Official layout -> ours:
  backbone.0.body.*             -> backbone.body.*  (torchvision ResNet -> detectron2 names)
  input_proj.*                  -> transformer.input.input_proj.*
  query_embed.weight            -> transformer.query_embed.weight
  transformer.encoder.* / transformer.decoder.*  -> unchanged (same module names)
  class_embed.* / bbox_embed.*  -> heads.class_embed.* / heads.bbox_embed.*

The official heads have 91 class logits (COCO category ids 0..90, focal / sigmoid, no "no object"
column). By default the 80 rows of the real COCO categories are kept in detectron2's contiguous
order (``coco_official_columns``); ``keep_all_classes=True`` keeps all rows unchanged.
"""
import logging
import os
import re
from typing import Mapping, Union

import torch

from .common import apply_renames, remap_coco_classes
from .smca import split_official_checkpoint

__all__ = ["CONDITIONAL_RENAMES", "convert_official_conditional_detr"]

CONDITIONAL_RENAMES = [
    (r"^input_proj\.", "transformer.input.input_proj."),
    (r"^query_embed\.weight$", "transformer.query_embed.weight"),
    (r"^transformer\.(encoder|decoder)\.", r"transformer.\1."),
    (r"^class_embed\.", "heads.class_embed."),
    (r"^bbox_embed\.", "heads.bbox_embed."),
]

logger = logging.getLogger(__name__)


def _drop_unused_query_scale(sd: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """The official decoder always builds ``query_scale`` (T), but applies it from the second layer
    on: a one-layer decoder never uses it, and our model does not build it (a parameter without a
    gradient stops DDP). Its weights are dropped here, with a log line saying why."""
    layers = {m.group(1) for k in sd for m in [re.match(r"^transformer\.decoder\.layers\.(\d+)\.", k)] if m}
    unused = [k for k in sd if k.startswith("transformer.decoder.query_scale.")]
    if len(layers) != 1 or not unused:
        return sd
    logger.info("Conditional DETR conversion: dropped %s: the checkpoint's decoder has one layer, which "
                "never applies query_scale (T scales the spatial query from the second layer on)", unused)
    return {k: v for k, v in sd.items() if k not in unused}


def convert_official_conditional_detr(state_dict: Union[Mapping, str, os.PathLike],
                                      keep_all_classes: bool = False) -> "dict[str, torch.Tensor]":
    """Official Conditional DETR state dict (or full checkpoint dict, or a path to one) -> a state
    dict of our ``SmcaDetrDetector`` with ``MODEL.SMCA_DETR.TRANSFORMER = "ConditionalTransformer"``.

    Keys without a conversion rule raise ``KeyError``; the only keys dropped are ``query_scale`` of a
    one-layer decoder, which the official model never uses (logged). With ``keep_all_classes=False`` the class
    head is reduced to the 80 COCO classes (needs the official 91-logit head).
    """
    sd, _ = split_official_checkpoint(state_dict)
    out = apply_renames(_drop_unused_query_scale(sd), CONDITIONAL_RENAMES)
    if not keep_all_classes:
        remap_coco_classes(out)
    return out
