"""Optimizer of the DETR recipe: parameter groups by name, AdamW (or SGD), full-model gradient clipping.

Learning rate of a trainable parameter ``name`` (``BASE_LR`` × multiplier):
  1. ``SOLVER.LR_MULTIPLIER_VALUES[i]`` for the first ``SOLVER.LR_MULTIPLIER_NAMES[i]`` that is a
     substring of ``name`` (explicit rules win, also inside the backbone);
  2. else ``SOLVER.BACKBONE_MULTIPLIER`` if ``name`` starts with ``"backbone."``;
  3. else 1.
Weight decay ``SOLVER.WEIGHT_DECAY`` applies to every parameter (biases and norms included), as in
the official DETR code; detectron2's WEIGHT_DECAY_NORM / WEIGHT_DECAY_BIAS / BIAS_LR_FACTOR are not
used. Frozen parameters (``requires_grad=False``) are left out; every other parameter is in exactly
one group (one group per distinct multiplier).

Gradient clipping (``SOLVER.CLIP_GRADIENTS``, when ENABLED):
  "full_model"    one ``clip_grad_norm_`` over all parameters of the optimizer (official DETR
                  ``clip_max_norm``), done at the start of ``optimizer.step()``;
  "value" / "norm" detectron2's per-parameter clipping (``maybe_add_gradient_clipping``).
Because the clipping lives in ``step()``, it composes with ``GradScaler``: ``scaler.step(opt)``
unscales the gradients first and then calls ``opt.step()``, so the norm is taken on true gradients
(and the step is skipped altogether when the scaler found inf/NaN). A fused Adam/AdamW would skip
that unscale (it advertises ``_step_supports_amp_scaling`` and unscales inside its kernel, after our
clipping); every clipping optimizer turns that off (``unscale_before_step``), whatever the clip type.
"""
import logging
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple, Type

import torch
from torch import nn

__all__ = ["build_optimizer", "get_param_groups", "lr_multiplier_of", "add_full_model_gradient_clipping",
           "unscale_before_step", "OPTIMIZERS"]

logger = logging.getLogger(__name__)

# SOLVER.OPTIMIZER (upper-cased) -> optimizer class
OPTIMIZERS: Dict[str, Type[torch.optim.Optimizer]] = {
    "ADAMW": torch.optim.AdamW,
    "SGD": torch.optim.SGD,
}

_CLIP_TYPES = ("full_model", "value", "norm")


def _multiplier_rules(cfg) -> List[Tuple[str, float]]:
    names = list(cfg.SOLVER.LR_MULTIPLIER_NAMES)
    values = list(cfg.SOLVER.LR_MULTIPLIER_VALUES)
    if len(names) != len(values):
        raise ValueError(
            "SOLVER.LR_MULTIPLIER_NAMES and SOLVER.LR_MULTIPLIER_VALUES must have the same length, got "
            f"{len(names)} names {names} and {len(values)} values {values}")
    rules = []
    for n, v in zip(names, values):
        if not isinstance(n, str) or not n:
            raise ValueError(f"SOLVER.LR_MULTIPLIER_NAMES must be non-empty strings, got {n!r}")
        v = float(v)
        if v < 0:
            raise ValueError(f"SOLVER.LR_MULTIPLIER_VALUES must be >= 0, got {v} for {n!r}")
        rules.append((n, v))
    return rules


def lr_multiplier_of(name: str, rules: Sequence[Tuple[str, float]], backbone_multiplier: float) -> float:
    """LR multiplier of parameter ``name`` (see the module docstring for the precedence)."""
    for substring, value in rules:
        if substring in name:
            return value
    if name.startswith("backbone."):
        return backbone_multiplier
    return 1.0


def get_param_groups(cfg, model: nn.Module) -> List[dict]:
    """Parameter groups (one per distinct LR multiplier) of the trainable parameters of ``model``.

    Each group: ``{"params", "lr", "weight_decay", "lr_multiplier"}``; ``lr`` is the initial value,
    detectron2's LR scheduler scales it over training (the ratios between groups stay fixed)."""
    rules = _multiplier_rules(cfg)
    base_lr = float(cfg.SOLVER.BASE_LR)
    weight_decay = float(cfg.SOLVER.WEIGHT_DECAY)
    backbone_mult = float(cfg.SOLVER.BACKBONE_MULTIPLIER)
    groups: "OrderedDict[float, List[nn.Parameter]]" = OrderedDict()
    seen = set()
    for name, p in model.named_parameters():  # shared parameters are listed once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        groups.setdefault(lr_multiplier_of(name, rules, backbone_mult), []).append(p)
    if not groups:
        raise ValueError("The model has no trainable parameter (all have requires_grad=False)")
    return [
        {"params": params, "lr": base_lr * mult, "weight_decay": weight_decay, "lr_multiplier": mult}
        for mult, params in groups.items()
    ]


def unscale_before_step(optimizer_cls: Type[torch.optim.Optimizer]) -> Type[torch.optim.Optimizer]:
    """A subclass of ``optimizer_cls`` that never claims ``_step_supports_amp_scaling``: ``GradScaler.step``
    then unscales the gradients (``scaler.unscale_``) before calling ``step()``. Needed by every
    optimizer that looks at the gradients in ``step()`` before the parameter update (clipping): a fused
    Adam/AdamW otherwise receives still-scaled gradients (x 2^16) and unscales them inside its kernel,
    after the clipping. Costs nothing without a GradScaler."""
    def __init__(self, *args, **kwargs):
        optimizer_cls.__init__(self, *args, **kwargs)
        self._step_supports_amp_scaling = False

    return type(optimizer_cls.__name__ + "UnscaledBeforeStep", (optimizer_cls,),
                {"__init__": __init__, "__module__": __name__})


def add_full_model_gradient_clipping(optimizer_cls: Type[torch.optim.Optimizer], max_norm: float,
                                     norm_type: float = 2.0) -> Type[torch.optim.Optimizer]:
    """A subclass of ``optimizer_cls`` whose ``step()`` first clips the total gradient norm of all its
    parameters to ``max_norm`` (``torch.nn.utils.clip_grad_norm_``), on unscaled gradients under a
    GradScaler (``unscale_before_step``). The norm before clipping is kept in
    ``optimizer.last_grad_norm`` (a 0-dim tensor, for logging)."""
    if max_norm <= 0:
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE must be > 0 for full_model clipping, got {max_norm}")
    base = unscale_before_step(optimizer_cls)

    def __init__(self, *args, **kwargs):
        base.__init__(self, *args, **kwargs)
        self.last_grad_norm = None

    def step(self, closure=None):
        loss = None
        if closure is not None:  # the closure computes the gradients: run it before clipping
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if params:
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type).detach()
        base.step(self)
        return loss

    return type(
        optimizer_cls.__name__ + "WithFullModelGradClip",
        (base,),
        {"__init__": __init__, "step": step, "__module__": __name__},
    )


def _optimizer_class(cfg) -> Type[torch.optim.Optimizer]:
    name = str(cfg.SOLVER.OPTIMIZER).upper()
    if name not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r} is not supported; choose one of "
                         f"{sorted(OPTIMIZERS)}")
    cls = OPTIMIZERS[name]
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return cls
    if clip.CLIP_TYPE == "full_model":
        return add_full_model_gradient_clipping(cls, float(clip.CLIP_VALUE), float(clip.NORM_TYPE))
    if clip.CLIP_TYPE in ("value", "norm"):
        from detectron2.solver.build import maybe_add_gradient_clipping

        # detectron2's class calls super(type(self), self).step(): it must stay the most derived
        # class, so the unscaling subclass goes underneath it
        return maybe_add_gradient_clipping(cfg, unscale_before_step(cls))
    raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE={clip.CLIP_TYPE!r} is not supported; choose one "
                     f"of {list(_CLIP_TYPES)}")


def _fused_kwargs(cls: Type[torch.optim.Optimizer], groups: List[dict], wanted: bool) -> dict:
    """``{"fused": True}`` when ``cls`` (Adam / AdamW) takes it and every parameter lives on a device
    and dtype whose fused kernel exists in this PyTorch; else ``{}`` (the per-tensor loop)."""
    if not wanted or not issubclass(cls, (torch.optim.Adam, torch.optim.AdamW)):
        return {}
    foreach_utils = getattr(torch.utils, "_foreach_utils", None)
    supported = getattr(foreach_utils, "_get_fused_kernels_supported_devices", lambda: ["cuda"])()
    params = [p for g in groups for p in g["params"]]
    ok = bool(params) and all(p.device.type in supported
                              and p.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
                              for p in params)
    return {"fused": True} if ok else {}


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``cfg.SOLVER`` over the trainable parameters of ``model`` (see module doc)."""
    cls = _optimizer_class(cfg)
    groups = get_param_groups(cfg, model)
    base_lr = float(cfg.SOLVER.BASE_LR)
    weight_decay = float(cfg.SOLVER.WEIGHT_DECAY)
    if issubclass(cls, torch.optim.SGD):
        optimizer = cls(groups, lr=base_lr, momentum=cfg.SOLVER.MOMENTUM, nesterov=cfg.SOLVER.NESTEROV,
                        weight_decay=weight_decay)
    else:
        optimizer = cls(groups, lr=base_lr, weight_decay=weight_decay,
                        **_fused_kwargs(cls, groups, cfg.SOLVER.get("FUSED_OPTIMIZER", True)))
    logger.info(
        "Optimizer %s: %s", type(optimizer).__name__,
        ", ".join(f"{len(g['params'])} tensors at lr x{g.get('lr_multiplier', 1.0):g}" for g in optimizer.param_groups))
    return optimizer
