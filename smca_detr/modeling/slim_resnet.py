"""A narrow basic-block ResNet for CPU-sized experiments (the embedded synthetic dataset, the demo).

detectron2's ``build_resnet_backbone`` fixes R18/R34 at 64 channels in res2. This builder reuses
detectron2's own ``BasicStem`` / ``BasicBlock`` / ``ResNet`` and only lets the width follow
``MODEL.RESNETS.STEM_OUT_CHANNELS`` and ``MODEL.RESNETS.RES2_OUT_CHANNELS`` (doubling per stage), so
checkpoints, freezing (``MODEL.BACKBONE.FREEZE_AT``), ``OUT_FEATURES`` and the norm options behave
exactly as for the stock ResNets. Select it with ``MODEL.BACKBONE.NAME: "build_slim_resnet_backbone"``.
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet

__all__ = ["build_slim_resnet_backbone"]

_BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


@BACKBONE_REGISTRY.register()
def build_slim_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """Basic-block ResNet (depth 18 or 34) of any width; stages after the last OUT_FEATURE are not built."""
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in _BLOCKS_PER_STAGE:
        raise ValueError(
            f"build_slim_resnet_backbone: MODEL.RESNETS.DEPTH={r.DEPTH} is not a basic-block depth "
            f"(choose one of {sorted(_BLOCKS_PER_STAGE)}; use build_resnet_backbone for 50/101/152)"
        )
    for key in ("STEM_OUT_CHANNELS", "RES2_OUT_CHANNELS"):
        if int(getattr(r, key)) <= 0:
            raise ValueError(f"build_slim_resnet_backbone: MODEL.RESNETS.{key} must be > 0")
    norm = r.NORM
    stem = BasicStem(in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=norm)
    last_stage = max(int(name[3:]) for name in r.OUT_FEATURES if name.startswith("res"))
    in_ch, out_ch = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    stages = []
    for stage_idx, num_blocks in zip(range(2, last_stage + 1), _BLOCKS_PER_STAGE[r.DEPTH]):
        first_stride = 1 if stage_idx == 2 else 2
        stages.append(
            ResNet.make_stage(
                block_class=BasicBlock,
                num_blocks=num_blocks,
                stride_per_block=[first_stride] + [1] * (num_blocks - 1),
                in_channels=in_ch,
                out_channels=out_ch,
                norm=norm,
            )
        )
        in_ch, out_ch = out_ch, out_ch * 2
    return ResNet(stem, stages, out_features=list(r.OUT_FEATURES), freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
