"""Official SMCA-DETR "new multi-scale" checkpoints (``Multi_scale_SMCA.zip``) -> smca_detr
``SMCAConvMultiScaleTransformer`` state dicts.

The conversion is a rename table (the SMCA model kind ``"conv_multi_scale"`` of
``smca_detr.checkpoint.smca``; ``convert_official_smca`` detects such checkpoints by themselves):

* ``input_proj_512`` / ``input_proj_1024`` / ``input_proj_2048`` -> ``transformer.input_proj.{0,1,2}``
  (1x1 convs of res3 / res4 / res5); ``input_proj_2048_3`` -> ``transformer.extra_proj`` (3x3
  stride-2 conv making the stride-64 level).
* ``transformer.encoder.layers.i.self_attn_{8,16,32,64}`` -> ``...layers.i.level_convs.{0,1,2,3}``;
  ``high_to_low_{1,2,3}`` -> ``down_convs.{0,1,2}`` (level l -> l+1); ``low_to_high_{1,2,3}`` ->
  ``up_convs.{0,1,2}`` (level l+1 -> l); ``conv_1``, ``conv_2``, ``linear1/2``, ``norm1/2`` unchanged.
* ``transformer.conv`` -> ``transformer.memory_conv``; ``transformer.level_embed``,
  ``transformer.decoder.layers.i.{self_attn, multihead_attn, linear1/2, norm1..4, point1..4}`` and
  ``transformer.decoder.norm`` unchanged.
* ``query_embed`` -> ``transformer.query_embed``; ``class_embed`` / ``bbox_embed`` ->
  ``heads.class_embed`` / ``heads.bbox_embed``; ``backbone.0.body.*`` -> ``backbone.body.*``
  (``convert_backbone``: torchvision ResNet -> detectron2 names).

Any other key raises (nothing is dropped silently). Class rows: the 92 official columns ->
detectron2's 80 COCO classes (``coco_official_columns``) unless ``keep_all_classes``.
"""
import os
from typing import Dict, Union

import torch

__all__ = ["SMCA_CONV_MULTISCALE_KIND", "SMCA_CONV_MULTISCALE_RULES", "is_official_smca_multiscale",
           "convert_official_smca_multiscale"]

SMCA_CONV_MULTISCALE_KIND = "conv_multi_scale"

_ENC = r"^transformer\.encoder\.layers\.(\d+)\."
_OURS_ENC = r"transformer.encoder.layers.\1."

SMCA_CONV_MULTISCALE_RULES = (
    [(_ENC + rf"self_attn_{s}\.", _OURS_ENC + f"level_convs.{i}.") for i, s in enumerate((8, 16, 32, 64))]
    + [(_ENC + rf"high_to_low_{i + 1}\.", _OURS_ENC + f"down_convs.{i}.") for i in range(3)]
    + [(_ENC + rf"low_to_high_{i + 1}\.", _OURS_ENC + f"up_convs.{i}.") for i in range(3)]
    + [
        (_ENC + r"(conv_1|conv_2|linear1|linear2|norm1|norm2)\.", _OURS_ENC + r"\2."),
        (r"^transformer\.level_embed$", "transformer.level_embed"),
        (r"^transformer\.conv\.", "transformer.memory_conv."),
        (r"^transformer\.decoder\.layers\.(\d+)\.(self_attn|multihead_attn|linear1|linear2|norm[1-4]|point[1-4])\.",
         r"transformer.decoder.layers.\1.\2."),
        (r"^transformer\.decoder\.norm\.", "transformer.decoder.norm."),
        (r"^input_proj_512\.", "transformer.input_proj.0."),
        (r"^input_proj_1024\.", "transformer.input_proj.1."),
        (r"^input_proj_2048\.", "transformer.input_proj.2."),
        (r"^input_proj_2048_3\.", "transformer.extra_proj."),
    ]
)


def is_official_smca_multiscale(state_dict: Dict[str, torch.Tensor]) -> bool:
    """True for an official "new multi-scale" SMCA state dict."""
    return "transformer.level_embed" in state_dict and "input_proj_2048_3.weight" in state_dict


def convert_official_smca_multiscale(state_dict: Union[Dict, str, os.PathLike],
                                     keep_all_classes: bool = False) -> Dict[str, torch.Tensor]:
    """Official multi-scale SMCA checkpoint -> state dict of our ``SMCAConvMultiScaleTransformer`` model.

    Args:
        state_dict: the official ``model`` state dict, the whole official checkpoint
            (``{"model", "args", ...}``), or a path to it (loaded with ``safe_torch_load``).
        keep_all_classes: keep all 92 official class rows (set ``MODEL.SMCA_DETR.NUM_CLASSES = 92``)
            instead of detectron2's 80 COCO classes.

    Raises KeyError for a key without a rule (nothing is dropped silently), ValueError when the
    state dict is not a multi-scale one or the class head is not COCO's 92 rows (without
    ``keep_all_classes``).
    """
    from .smca import convert_official_smca, split_official_checkpoint

    sd, _ = split_official_checkpoint(state_dict)  # a path is loaded with safe_torch_load
    if not is_official_smca_multiscale(sd):
        raise ValueError("not an official SMCA multi-scale state dict (no transformer.level_embed / "
                         "input_proj_2048_3); use smca_detr.checkpoint.smca.convert_official_smca")
    return convert_official_smca(sd, keep_all_classes=keep_all_classes, kind=SMCA_CONV_MULTISCALE_KIND)
