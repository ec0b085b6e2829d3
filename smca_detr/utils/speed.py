"""Shared pieces of the speed benchmarks (``tools/benchmark_{smca,conditional,deformable}.py``).

* :func:`build_model`: the model of a config file (or model-zoo name) + overrides on a device,
  random weights (speed does not depend on them), seeded;
* :func:`synthetic_inputs`: detectron2 model inputs (``{"image", "height", "width"}`` and, for
  training, ``"instances"`` with ``gt_boxes`` / ``gt_classes``);
* :func:`build_adamw` / :func:`train_step`: the trainer's AdamW (parameter groups with the backbone
  LR multiplier, full-model gradient clipping inside ``step()``) and one training step;
* :func:`split_inference`: closures timing the backbone and the part after it separately;
* :func:`time_fn` / :func:`time_once`: wall and process CPU time (warm-up, N calls, min or median,
  CUDA synchronised); :func:`cpu_peak_bytes`: peak resident-memory growth of one call (Linux);
* :func:`reference_backbone_seconds` / :func:`machine_calibration`: a machine calibration against
  the machine where the official CPU figures were measured (see below);
* :func:`arithmetic_floor`: the floating-point work of one training step (ours and the official
  arithmetic) against this CPU's matrix-multiply peak: what fraction of that peak a time target
  requires (``--floor`` of the model benchmarks).

Calibration. The official DETR-family repos run a torchvision ResNet-50 body with frozen batch
norm; its time on the official machine is implied by the official figures (inference minus the
part after the backbone). Timing the same computation here gives a *machine factor* (seconds here /
seconds implied there, > 1: this machine is slower); dividing a ratio vs the official figures by it
gives a *machine-normalized ratio*: an estimate of the ratio both implementations would have on the
same machine. It is an estimate only: it assumes that the two machines differ by one factor for
all the work (convolutions and the transformer alike) and that the implied backbone time is exact.

torchvision is imported only by :func:`reference_backbone`; detectron2 and the project's engine only
by the functions that need them.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = [
    "build_model",
    "synthetic_inputs",
    "build_adamw",
    "train_step",
    "split_inference",
    "synchronize",
    "Timing",
    "time_once",
    "time_fn",
    "time_alternately",
    "ratio_summary",
    "proc_status_kib",
    "cpu_peak_bytes",
    "FrozenBatchNorm2d",
    "reference_backbone",
    "reference_backbone_seconds",
    "machine_calibration",
    "format_calibration",
    "interleaved_calibration",
    "interleaved_model_calibration",
    "add_interleave_argument",
    "model_cases",
    "format_interleaved",
    "train_step_flops",
    "sgemm_peak_gflops",
    "floor_report",
    "arithmetic_floor",
    "format_floor",
]

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


def split_inference(model: nn.Module, inputs: List[dict], postprocess: bool = True):
    """``(backbone, after_backbone)``: closures running the backbone of ``model`` on ``inputs``, and
    what follows it (transformer + heads, and with ``postprocess`` the top-k inference) on backbone
    features computed once here. Call them under ``torch.no_grad()`` / ``inference_mode()``."""
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        feats, masks = model.backbone(images.tensor, images.image_sizes)

    def backbone():
        return model.backbone(images.tensor, images.image_sizes)

    def after_backbone():
        out = model.forward_features(feats, masks, images.image_sizes)
        if postprocess:
            return model.inference(out["pred_logits"][-1], out["pred_boxes"][-1], images.image_sizes)
        return out

    return backbone, after_backbone


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


# ------------------------------------------------------------------------------------ calibration
class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters, all buffers (nothing trains):
    ``y = x * scale + shift`` with ``scale = weight / sqrt(running_var + eps)`` and
    ``shift = bias - running_mean * scale`` (the backbone norm of the official DETR-family code)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def reference_backbone() -> nn.Sequential:
    """The torchvision ``resnet50`` body (stem and ``layer1``..``layer4``, no pooling / classifier)
    with :class:`FrozenBatchNorm2d` norms, random weights, in eval mode."""
    from torchvision.models import resnet50

    net = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    body = []
    for name, child in net.named_children():
        body.append(child)
        if name == "layer4":
            break
    return nn.Sequential(*body).eval()


def reference_backbone_seconds(threads: int = 2, iters: int = 3, hw: Tuple[int, int] = (640, 800),
                               warmup: int = 1, stat: Union[str, Callable] = "min") -> float:
    """Seconds of one forward of :func:`reference_backbone` on one ``1 x 3 x H x W`` image on CPU under
    ``torch.no_grad()`` with ``threads`` threads (``stat`` of ``iters`` calls after ``warmup``). The
    thread count and the global RNG state are restored afterwards."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return time_fn(_reference_forward(hw), iters=iters, warmup=warmup, stat=stat).seconds
    finally:
        torch.set_num_threads(prev)


def _reference_forward(hw: Tuple[int, int]) -> Callable[[], None]:
    """A call running :func:`reference_backbone` (seeded weights, global RNG state untouched) on one
    random ``1 x 3 x H x W`` image without gradients."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        body = reference_backbone()
        x = torch.randn(1, 3, *hw)

    def forward():
        with torch.no_grad():
            body(x)

    return forward


def machine_calibration(official_inference_s: float, official_after_backbone_s: float,
                        ratios: Optional[Mapping[str, float]] = None, threads: int = 2, iters: int = 3,
                        hw: Tuple[int, int] = (640, 800)) -> Dict:
    """Calibrate this machine against the official one (see the module docstring).

    ``official_inference_s - official_after_backbone_s`` is the official backbone time implied by
    the official figures; :func:`reference_backbone_seconds` times the same backbone here. ``ratios``
    (name -> our time / official time) are also given divided by the machine factor."""
    implied = official_inference_s - official_after_backbone_s
    if implied <= 0:
        raise ValueError(f"official inference {official_inference_s} s must exceed its after-backbone part "
                         f"{official_after_backbone_s} s")
    here = reference_backbone_seconds(threads=threads, iters=iters, hw=hw)
    factor = here / implied
    ratios = dict(ratios or {})
    return {
        "reference_backbone_s": here,
        "official_inference_s": official_inference_s,
        "official_after_backbone_s": official_after_backbone_s,
        "official_backbone_s_implied": implied,
        "machine_factor": factor,
        "ratio_vs_official": ratios,
        "machine_normalized_ratio": {k: r / factor for k, r in ratios.items()},
        "threads": threads,
        "image_hw": list(hw),
        "iters": iters,
        "estimate": True,
    }


def format_calibration(cal: Mapping) -> List[str]:
    """Printable lines of a :func:`machine_calibration` result, labelled as an estimate."""
    h, w = cal["image_hw"]
    lines = [
        "calibration (an ESTIMATE: assumes both machines differ by one factor for all the work):",
        f"  reference backbone here: {cal['reference_backbone_s']:.3f} s (torchvision resnet50 body, frozen BN, "
        f"1x3x{h}x{w}, {cal['threads']} threads, no_grad, best of {cal['iters']})",
        f"  official backbone implied by the official figures: {cal['official_inference_s']:.2f} - "
        f"{cal['official_after_backbone_s']:.2f} = {cal['official_backbone_s_implied']:.2f} s",
        f"  machine factor (here / implied official): {cal['machine_factor']:.2f} (> 1: this machine is slower)",
    ]
    for k, r in cal["ratio_vs_official"].items():
        lines.append(f"  {k}: ratio vs official {r:.2f}, machine-normalized ratio (estimate) "
                     f"{cal['machine_normalized_ratio'][k]:.2f}")
    if not cal["ratio_vs_official"]:
        lines.append("  (no ratio vs the official CPU figures to normalize: those are CPU figures)")
    return lines


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


def interleaved_calibration(cases: Mapping[str, Callable], official: Mapping[str, float], official_backbone_s: float,
                            rounds: int = 7, threads: int = 2, hw: Tuple[int, int] = (640, 800),
                            per_round: Optional[Mapping[str, int]] = None) -> Dict:
    """:func:`machine_calibration` made robust to a machine whose speed drifts (a shared host).

    Each case (name -> zero-argument callable; ``official[name]`` its official seconds) runs
    alternately with the reference backbone (:func:`reference_backbone`, one ``1 x 3 x H x W`` image,
    no grad), ``rounds`` times after one warm-up of each. Every round gives the machine factor of that
    moment (reference seconds / ``official_backbone_s``) and so the case's ratio vs the official
    figure on this machine at that moment; the result holds the median, min and max ratio over the
    rounds and the raw seconds. ``per_round`` (name -> k, default 1; ``"reference_backbone"`` too)
    times a case k times in a row within a round and keeps the fastest, which filters short bursts
    of other tenants' load. Same assumption as :func:`machine_calibration` (one factor for all the
    work), but no drift between the two timings of a ratio."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref = _reference_forward(hw)
        ref()
        for fn in cases.values():
            fn()
        raw = {name: [] for name in cases}
        raw["reference_backbone"] = []
        per_round = dict(per_round or {})
        for _ in range(rounds):
            for name, fn in list(cases.items()) + [("reference_backbone", ref)]:
                best = math.inf
                for _ in range(max(1, int(per_round.get(name, 1)))):
                    t0 = time.perf_counter()
                    fn()
                    best = min(best, time.perf_counter() - t0)
                raw[name].append(best)
    finally:
        torch.set_num_threads(prev)
    out = {"rounds": rounds, "per_round": per_round, "threads": threads, "image_hw": list(hw),
           "official_backbone_s": official_backbone_s,
           "seconds": raw, "ratio_vs_official": {}, "estimate": True}
    for name in cases:
        ratios = [t / (official[name] * r / official_backbone_s)
                  for t, r in zip(raw[name], raw["reference_backbone"])]
        out["ratio_vs_official"][name] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return out


def format_interleaved(cal: Mapping) -> List[str]:
    """Printable lines of an :func:`interleaved_calibration` result, labelled as an estimate."""
    ref = cal["seconds"]["reference_backbone"]
    lines = [f"interleaved calibration ({cal['rounds']} rounds, each case then the reference backbone, best of "
             f"{cal['per_round'] or 1} within a round; an ESTIMATE):",
             f"  reference backbone here: median {statistics.median(ref):.3f} s (min {min(ref):.3f}, max {max(ref):.3f}); "
             f"official backbone implied: {cal['official_backbone_s']:.2f} s"]
    for name, r in cal["ratio_vs_official"].items():
        t = cal["seconds"][name]
        lines.append(f"  {name}: median {statistics.median(t):.3f} s; ratio vs official on this machine: "
                     f"median {r['median']:.2f} (rounds {r['min']:.2f}-{r['max']:.2f})")
    return lines


def interleaved_model_calibration(cfg, model: nn.Module, train_model: nn.Module, official_inference_s: float,
                                  official_after_backbone_s: float, official_train_step_s: float, rounds: int,
                                  threads: int = 2, hw: Tuple[int, int] = (640, 800),
                                  device: Device = "cpu") -> Dict:
    """:func:`interleaved_calibration` of the two cases of :func:`model_cases` against the official
    figures (inference, its after-backbone part, training step), with the best of 3 inference /
    reference timings and of 2 training steps within a round: the ``--interleave`` of the SMCA and
    Conditional benchmarks. ``hw`` sizes the model's inputs; the reference backbone always runs at
    the official figures' 640x800."""
    return interleaved_calibration(
        model_cases(cfg, model, train_model, hw, device=device),
        {"inference": official_inference_s, "train_step": official_train_step_s},
        official_inference_s - official_after_backbone_s, rounds=rounds, threads=threads,
        per_round={"inference": 3, "reference_backbone": 3, "train_step": 2})


def add_interleave_argument(parser) -> None:
    """The ``--interleave ROUNDS`` option of the model benchmarks (0 = off)."""
    parser.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                        help="also time inference and the training step alternately with the official backbone "
                             "(torchvision R50 body) ROUNDS times and print the median ratio vs the official "
                             "figures on this machine (robust to a drifting shared machine; an estimate)")


# ------------------------------------------------------------------------------ arithmetic floor
def train_step_flops(model: nn.Module, hw: Tuple[int, int] = (640, 800), num_boxes: int = 6,
                     batch_size: int = 2) -> int:
    """Floating-point operations (``torch.utils.flop_counter``: matrix products and convolutions,
    2 per multiply-add; element-wise work is not counted) of one training forward + losses +
    backward of ``model`` on a batch of ``batch_size`` ``H x W`` images. The gradients are cleared
    afterwards; the optimizer step (element-wise) is not included."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = synthetic_inputs(batch_size, *hw, with_instances=True, num_boxes=num_boxes)
    model.train()
    with FlopCounterMode(display=False) as counter:
        losses = model(batch)
        sum(losses.values()).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def sgemm_peak_gflops(threads: int = 2, n: int = 2048, iters: int = 5) -> float:
    """GFLOP/s of the fastest of ``iters`` float32 ``n x n @ n x n`` products on CPU with ``threads``
    threads: the practical peak of this CPU for the work that dominates a training step."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        t = time_fn(lambda: torch.mm(a, b, out=out), iters=iters, warmup=1, stat="min").seconds
    finally:
        torch.set_num_threads(prev)
    return 2.0 * n ** 3 / t / 1e9


def floor_report(ours_flops: float, official_flops: float, peak_gflops: float, machine_factor: float,
                 official_step_s: float, target_ratio: float = 0.8) -> Dict:
    """The arithmetic of :func:`arithmetic_floor` (pure, for given measurements).

    ``official_step_s * machine_factor`` estimates the official step here; the official code's
    sustained rate is its FLOPs over that time. Our step at ``target_ratio`` of it must sustain
    ``ours_flops / target_time``; both rates are also given as fractions of ``peak_gflops``.
    ``ours_floor_s`` is our step if every counted FLOP ran at the peak (element-wise work free)."""
    if min(ours_flops, official_flops, peak_gflops, machine_factor, official_step_s, target_ratio) <= 0:
        raise ValueError("floor_report: every measurement must be positive")
    official_here_s = official_step_s * machine_factor
    target_s = target_ratio * official_here_s
    official_rate = official_flops / 1e9 / official_here_s
    required_rate = ours_flops / 1e9 / target_s
    return {
        "ours_gflop": ours_flops / 1e9,
        "official_gflop": official_flops / 1e9,
        "peak_gflops": peak_gflops,
        "machine_factor": machine_factor,
        "official_step_s_here": official_here_s,
        "official_gflops": official_rate,
        "official_fraction_of_peak": official_rate / peak_gflops,
        "ours_floor_s": ours_flops / 1e9 / peak_gflops,
        "ours_floor_ratio": ours_flops / 1e9 / peak_gflops / official_here_s,
        "target_ratio": target_ratio,
        "target_s": target_s,
        "required_gflops": required_rate,
        "required_fraction_of_peak": required_rate / peak_gflops,
        "estimate": True,
    }


def arithmetic_floor(config: str, official_step_s: float, official_inference_s: float,
                     official_after_backbone_s: float, threads: int = 2, target_ratio: float = 0.8,
                     hw: Tuple[int, int] = (640, 800), opts: Sequence = ()) -> Dict:
    """:func:`floor_report` measured here for ``config``: our training step's FLOPs as configured, the
    official arithmetic's (the same model with ``MODEL.SMCA_DETR.FUSED_CPU_BACKBONE False``: direct
    convolutions, as the official torchvision backbone computes them), the sgemm peak and the machine
    factor of :func:`machine_calibration` (from the official inference figures). ``hw`` sizes the
    model's inputs; ``opts``: config overrides of both models."""
    _, ours = build_model(config, list(opts))
    ours_flops = train_step_flops(ours, hw)
    del ours
    _, direct = build_model(config, list(opts) + ["MODEL.SMCA_DETR.FUSED_CPU_BACKBONE", "False"])
    official_flops = train_step_flops(direct, hw)
    del direct
    peak = sgemm_peak_gflops(threads)
    factor = machine_calibration(official_inference_s, official_after_backbone_s, threads=threads)["machine_factor"]
    out = floor_report(ours_flops, official_flops, peak, factor, official_step_s, target_ratio)
    out.update(threads=threads, image_hw=list(hw))
    return out


def format_floor(rep: Mapping) -> List[str]:
    """Printable lines of an :func:`arithmetic_floor` result."""
    t = rep["target_ratio"]
    return [
        "arithmetic floor of one training step (FLOPs of matrix products and convolutions; an ESTIMATE):",
        f"  sgemm peak here: {rep['peak_gflops']:.0f} GFLOP/s; machine factor {rep['machine_factor']:.2f} -> "
        f"official step here ~{rep['official_step_s_here']:.2f} s",
        f"  official arithmetic: {rep['official_gflop']:.0f} GFLOP -> {rep['official_gflops']:.0f} GFLOP/s sustained "
        f"= {rep['official_fraction_of_peak']:.0%} of peak",
        f"  ours: {rep['ours_gflop']:.0f} GFLOP; at 100% of peak with free element-wise work: "
        f"{rep['ours_floor_s']:.2f} s = {rep['ours_floor_ratio']:.2f}x official",
        f"  {t:.2f}x official = {rep['target_s']:.2f} s needs {rep['required_gflops']:.0f} GFLOP/s sustained "
        f"= {rep['required_fraction_of_peak']:.0%} of peak over the whole step",
    ]
