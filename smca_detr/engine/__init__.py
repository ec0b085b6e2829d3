"""Training engine: DETR optimizer (param groups, full-model clipping), Trainer (AMP incl. CPU bf16,
exact resume, atomic checkpoints through ``smca_detr.checkpoint.SmcaDetrCheckpointer``), ``setup``
and ``launch`` for ``train_net.py``."""
from .optimizer import add_full_model_gradient_clipping, build_optimizer, get_param_groups, lr_multiplier_of
from .trainer import Trainer, TrainLoop, amp_dtype, has_fast_coco_eval, launch, setup

__all__ = ["add_full_model_gradient_clipping", "build_optimizer", "get_param_groups", "lr_multiplier_of", "Trainer",
           "TrainLoop", "amp_dtype", "has_fast_coco_eval", "launch", "setup"]
