"""CPU execution strategies, not model changes: a detectron2 ResNet run with its norms folded into
the convolutions through oneDNN's fused operators (``fused_resnet``), Winograd 3x3 convolutions
(``winograd``) and 1x1 convolutions as per-image GEMMs (``conv1x1``). Same maths as the modules up
to float32 rounding; switched by ``MODEL.SMCA_DETR.FUSED_CPU_BACKBONE``."""
