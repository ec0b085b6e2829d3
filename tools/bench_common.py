"""Shared pieces of the speed tools (``benchmark_ab.py``, ``benchmark_official.py``,
``benchmark_msda.py``): not part of the package, since they serve measurement, not the model.

* :func:`build_model`: the model of a config file (or model-zoo name) + overrides on a device,
  random weights (speed does not depend on them), seeded;
* :func:`synthetic_inputs`: detectron2 model inputs (``{"image", "height", "width"}`` and, for
  training, ``"instances"`` with ``gt_boxes`` / ``gt_classes``);
* :func:`build_adamw` / :func:`train_step`: the trainer's AdamW (parameter groups with the backbone
  LR multiplier, full-model gradient clipping inside ``step()``) and one training step;
* :func:`time_fn` / :func:`time_once` / :func:`time_alternately`: wall and process CPU time
  (warm-up, N calls, min or median, CUDA synchronised; ABBA-alternating rounds), :func:`ratio_summary`
  of per-round ratios; :func:`cpu_peak_bytes`: peak resident-memory growth of one call (Linux);
* :func:`model_cases`: the inference and training-step cases of the speed targets.

detectron2 and the project's engine are imported only by the functions that need them.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

Device = Union[str, torch.device]


# ------------------------------------------------------------------------------------ model and data
def build_model(config: str, opts: Sequence = (), device: Device = "cpu", seed: int = 0):
    """``(cfg, model)``: the model of ``config`` (a file or a model-zoo name) with ``opts``
    (``[KEY, VALUE, ...]``) on ``device``, randomly initialised after ``torch.manual_seed(seed)``
    (``MODEL.WEIGHTS`` is not loaded). The model is in training mode, as ``build_model`` returns it."""
    from detectron2.modeling import build_model as d2_build_model

    from smca_detr.model_zoo import get_config

    cfg = get_config(str(config), list(opts))
    cfg.MODEL.DEVICE = str(device)
    cfg.MODEL.WEIGHTS = ""
    torch.manual_seed(seed)
    return cfg, d2_build_model(cfg)


def synthetic_inputs(n: int, height: int, width: int, device: Device = "cpu", with_instances: bool = False,
                     num_boxes: int = 8, num_classes: int = 80, min_box: float = 8.0, seed: int = 0) -> List[dict]:
    """``n`` detectron2 inputs of random ``height x width`` images (float, values 0..255, on
    ``device``). With ``with_instances`` each has ``num_boxes`` random ground-truth boxes (at least
    ``min_box`` pixels per side, inside the image) of classes in ``[0, num_classes)``."""
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([width, height], dtype=torch.float32)
    batch = []
    for _ in range(n):
        image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8).float()
        x = {"image": image.to(device), "height": height, "width": width}
        if with_instances:
            xy = torch.rand(num_boxes, 2, generator=g) * size * 0.6
            wh = torch.rand(num_boxes, 2, generator=g) * size * 0.3 + min_box
            inst = Instances((height, width))
            inst.gt_boxes = Boxes(torch.cat([xy, torch.minimum(xy + wh, size)], 1))
            inst.gt_classes = torch.randint(0, num_classes, (num_boxes,), generator=g)
            x["instances"] = inst
        batch.append(x)
    return batch


def build_adamw(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """The training optimizer as the trainer builds it (``smca_detr.engine.optimizer``: parameter
    groups with ``SOLVER.BACKBONE_MULTIPLIER`` and the ``SOLVER.LR_MULTIPLIER_*`` rules, weight decay,
    ``SOLVER.CLIP_GRADIENTS`` - full-model clipping happens inside ``step()``), always AdamW."""
    from smca_detr.engine.optimizer import build_optimizer

    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    return build_optimizer(cfg, model)


def train_step(model: nn.Module, batch: List[dict], optimizer: torch.optim.Optimizer,
               check_finite: bool = False) -> torch.Tensor:
    """One training step: forward with the losses, their sum, backward, ``optimizer.step()``
    (gradient clipping included with :func:`build_adamw`). Returns the detached total loss;
    ``check_finite`` raises ``FloatingPointError`` on a non-finite loss (a device sync)."""
    losses = model(batch)
    total = sum(losses.values())
    if check_finite and not math.isfinite(float(total.detach())):
        raise FloatingPointError(f"non-finite training loss: { {k: float(v) for k, v in losses.items()} }")
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return total.detach()


# ------------------------------------------------------------------------------------ timing
def synchronize(device: Device) -> None:
    """Wait for the queued CUDA work of ``device`` (no-op on CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


class Timing(NamedTuple):
    seconds: float  # the statistic of the wall times
    cpu_seconds: float  # the same statistic of the process CPU times
    walls: List[float]
    cpus: List[float]


_STATS = {"min": min, "median": statistics.median}


def time_once(fn: Callable, device: Device = "cpu") -> Tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of ``fn``, device synchronised before and after.
    Process CPU time well below ``threads x wall`` means other processes shared the cores."""
    synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0


def time_fn(fn: Callable, iters: int = 5, warmup: int = 1, stat: Union[str, Callable] = "min",
            device: Device = "cpu", before_each: Optional[Callable] = None,
            after_each: Optional[Callable] = None) -> Timing:
    """Time ``iters`` calls of ``fn`` after ``warmup`` untimed ones. ``stat``: ``"min"`` (the least
    disturbed by other processes on a shared machine), ``"median"`` or a function of the list.
    ``before_each`` / ``after_each`` (untimed) run around every timed call, e.g. to wait for an idle
    machine or to advance a progress bar."""
    reduce = _STATS[stat] if isinstance(stat, str) else stat
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(iters):
        if before_each is not None:
            before_each()
        wall, cpu = time_once(fn, device)
        walls.append(wall)
        cpus.append(cpu)
        if after_each is not None:
            after_each()
    return Timing(reduce(walls), reduce(cpus), walls, cpus)


def time_alternately(cases: Mapping[str, Mapping[str, Callable]], rounds: int,
                     device: Device = "cpu") -> Dict[str, Dict[str, List[float]]]:
    """Wall seconds of ``rounds`` rounds of alternating calls: in every round each case (name ->
    ``{variant: call}``) runs its variants once each, in the given order in even rounds and reversed
    in odd ones (ABBA), so that a host whose speed drifts affects every variant alike. Returns
    ``{case: {variant: [seconds per round]}}``. No warm-up: call each variant once before."""
    times = {case: {name: [] for name in calls} for case, calls in cases.items()}
    for r in range(rounds):
        for case, calls in cases.items():
            order = list(calls.items())
            for name, fn in (order if r % 2 == 0 else order[::-1]):
                times[case][name].append(time_once(fn, device)[0])
    return times


def ratio_summary(numerators: Sequence[float], denominators: Sequence[float]) -> Dict[str, float]:
    """Median, min and max of the per-round ratios ``numerators[i] / denominators[i]``."""
    ratios = [a / b for a, b in zip(numerators, denominators)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def proc_status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``, ...) in KiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def cpu_peak_bytes(fn: Callable) -> int:
    """Peak resident-memory growth while running ``fn`` once (Linux): the high-water mark ``VmHWM``
    is reset through ``/proc/self/clear_refs``, then compared with ``VmRSS`` before the call. Large
    tensors are mmap-ed and returned on free, so this tracks the live tensor bytes (for smaller ones
    start the process with ``MALLOC_MMAP_THRESHOLD_``). Raises ``OSError`` where that is unavailable."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = proc_status_kib("VmRSS")
    fn()
    return (proc_status_kib("VmHWM") - before) * 1024


# ------------------------------------------------------------------------------------ cases
def model_cases(cfg, model: nn.Module, train_model: nn.Module, hw: Tuple[int, int] = (640, 800),
                device: Device = "cpu", num_boxes: int = 6) -> Dict[str, Callable]:
    """The two timed cases of the issues through detectron2's model API: ``"inference"`` of ``model``
    (eval mode, no grad, one ``H x W`` image) and ``"train_step"`` of ``train_model`` (train mode, a
    batch of two with ``num_boxes`` boxes each, of the config's classes, forward + losses + backward +
    the trainer's AdamW with clipping). Two instances, so that the training updates do not invalidate
    the inference model's cached folded weights between calls."""
    image = synthetic_inputs(1, *hw, device)
    batch = synthetic_inputs(2, *hw, device, with_instances=True, num_boxes=num_boxes,
                             num_classes=cfg.MODEL.SMCA_DETR.NUM_CLASSES)
    model.eval()
    train_model.train()
    opt = build_adamw(cfg, train_model)

    def inference():
        with torch.no_grad():
            model(image)
        synchronize(device)

    def train():
        train_step(train_model, batch, opt)
        synchronize(device)

    return {"inference": inference, "train_step": train}
