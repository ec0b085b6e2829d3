"""Benchmark summary of an ``--eval-only`` run (docs/MODEL_ZOO.md lists the fields): after
detectron2's AP table, ``train_net.py --eval-only`` calls :func:`write_benchmark_report`, which runs
the model once more on a few images of the first test dataset, logs a table and saves
``<OUTPUT_DIR>/inference/benchmark_report.json``: pure model time (batch 1, after warm-up, data
loaded beforehand), peak memory (:class:`PeakMemory`), parameters and fvcore GFLOPs with handles for
the deformable attention and SDPA (:func:`count_flops`; one multiply-add = one flop, as the papers).
Image counts: ``SMCA_DETR_REPORT_IMAGES`` / ``SMCA_DETR_REPORT_WARMUP`` (environment) or the
arguments; defaults 50 / 5 on GPU, 10 / 2 on CPU.
"""
import json
import logging
import os
import resource
import statistics
import threading
import time
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

__all__ = ["benchmark_report", "write_benchmark_report", "eval_only_report", "format_report", "count_flops",
           "sdpa_flop_jit", "count_parameters", "PeakMemory",
           "REPORT_FILENAME", "REPORT_FIELDS"]

logger = logging.getLogger(__name__)

REPORT_FILENAME = "benchmark_report.json"
REPORT_FIELDS = ("meta_architecture", "transformer", "dataset", "device", "device_name", "dtype", "torch",
                 "batch_size", "num_warmup", "num_images_timed", "ms_per_image", "ms_per_image_median",
                 "images_per_s", "peak_memory_mb", "memory_method", "params", "params_m", "gflops",
                 "gflops_by_operator", "flops_input_hw", "uncounted_ops")


def synchronize(device) -> None:
    """Wait for the queued CUDA work of ``device`` (no-op on CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------- memory


def _release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), so that RSS is close to what is
    in use before a measurement starts; best effort, no-op elsewhere."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Context manager measuring the peak memory of the code inside it.

    CUDA device: ``torch.cuda.max_memory_allocated`` (bytes, absolute, after resetting the peak).
    CPU: peak RSS growth over the RSS at entry (freed heap memory is first returned to the OS with
    glibc's ``malloc_trim``), sampled every ``interval`` seconds by a thread (falls back to the growth
    of ``ru_maxrss`` where ``/proc`` is missing: a lower bound).
    ``peak_bytes`` and ``method`` are set on exit.
    """

    def __init__(self, device: torch.device, interval: float = 0.001):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0
        self.method = ""

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda_max_memory_allocated"
            return self
        _release_free_memory()
        self._start = _rss_bytes()
        if self._start is None:
            self._start_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "cpu_ru_maxrss_growth"
            return self
        self.method = "cpu_peak_rss_growth"
        self._peak = self._start
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                rss = _rss_bytes()
                if rss is not None and rss > self._peak:
                    self._peak = rss
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        elif self._start is None:
            self.peak_bytes = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._start_maxrss)
        else:
            self._stop.set()
            self._thread.join()
            rss = _rss_bytes()
            peak = max(self._peak, rss or 0)
            self.peak_bytes = max(0, peak - self._start)
        return False


# ---------------------------------------------------------------------------------------- flops


def sdpa_flop_jit(inputs, outputs) -> int:
    """fvcore handle of ``aten::scaled_dot_product_attention``: ``q k^T`` and ``attn v`` as
    multiply-adds, ``prod(batch) * Lq * Lk * (E_qk + E_v)`` (softmax and mask not counted, as
    fvcore's matmul handles)."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = 1
    for d in q[:-2]:
        batch *= d
    return int(batch * q[-2] * k[-2] * (q[-1] + v[-1]))


class _FlopWrapper(nn.Module):
    """Tensor-in / tensor-out view of a detectron2 model for jit tracing (one image)."""

    def __init__(self, model: nn.Module, height: int, width: int):
        super().__init__()
        self.model = model
        self.height, self.width = height, width

    def forward(self, image):
        out = self.model([{"image": image, "height": self.height, "width": self.width}])[0]["instances"]
        return out.pred_boxes.tensor, out.scores, out.pred_classes


def count_flops(model: nn.Module, inputs: Dict) -> Dict[str, object]:
    """fvcore flop count of ``model([inputs])`` (one detectron2 input dict) with the deformable
    attention handle. Returns ``{"gflops", "gflops_by_operator", "uncounted_ops", "input_hw"}``."""
    from fvcore.nn import FlopCountAnalysis

    from ..layers.msda import add_msda_flop_handle

    image = inputs["image"]
    wrapper = _FlopWrapper(model, int(inputs.get("height", image.shape[-2])), int(inputs.get("width", image.shape[-1])))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            flops = FlopCountAnalysis(wrapper, (image,))
            add_msda_flop_handle(flops)
            flops.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
            flops.unsupported_ops_warnings(False)
            flops.uncalled_modules_warnings(False)
            flops.tracer_warnings("none")
            total = flops.total()
            by_op = {k: v / 1e9 for k, v in sorted(flops.by_operator().items()) if v}
            uncounted = dict(flops.unsupported_ops())
    finally:
        model.train(was_training)
    return {"gflops": total / 1e9, "gflops_by_operator": by_op, "uncounted_ops": uncounted,
            "input_hw": [int(image.shape[-2]), int(image.shape[-1])]}


# ---------------------------------------------------------------------------------------- report


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def benchmark_report(cfg, model: nn.Module, data_loader: Optional[Iterable] = None, *,
                     num_images: Optional[int] = None, num_warmup: Optional[int] = None,
                     progress: bool = True) -> Dict[str, object]:
    """Measure ``model`` (see the module docstring) on the first ``num_warmup + num_images``
    inputs of ``data_loader`` (default: the test loader of ``cfg.DATASETS.TEST[0]``). Returns the
    report dict (keys ``REPORT_FIELDS``)."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    device = next(model.parameters()).device
    gpu = device.type == "cuda"
    num_images = num_images if num_images is not None else _env_int("SMCA_DETR_REPORT_IMAGES", 50 if gpu else 10)
    num_warmup = num_warmup if num_warmup is not None else _env_int("SMCA_DETR_REPORT_WARMUP", 5 if gpu else 2)
    num_images = max(1, num_images)
    num_warmup = max(0, num_warmup)
    dataset = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else None
    if data_loader is None:
        if dataset is None:
            raise ValueError("benchmark_report needs a data loader or cfg.DATASETS.TEST")
        from .trainer import Trainer

        data_loader = Trainer.build_test_loader(cfg, dataset)

    # load the inputs once (data time is not model time); fewer images when the dataset is small
    batches: List[List[Dict]] = []
    for batch in data_loader:
        batches.append(batch)
        if len(batches) >= num_warmup + num_images:
            break
    if not batches:
        raise ValueError("benchmark_report: the data loader gave no inputs")
    if len(batches) <= num_warmup:
        num_warmup = max(0, len(batches) - 1)
    warm, timed = batches[:num_warmup], batches[num_warmup:]

    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.no_grad():
            for batch in _progress(warm, len(warm), "report warm-up", progress):
                model(batch)
            synchronize(device)
            with PeakMemory(device) as mem:
                for batch in _progress(timed, len(timed), "report timing", progress):
                    synchronize(device)
                    t0 = time.perf_counter()
                    model(batch)
                    synchronize(device)
                    times.append((time.perf_counter() - t0) / len(batch))
        flops = count_flops(model, batches[0][0])
    finally:
        model.train(was_training)

    ms = [t * 1e3 for t in times]
    ms_mean = statistics.fmean(ms)
    params = count_parameters(model)
    report = {
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "transformer": cfg.MODEL.SMCA_DETR.TRANSFORMER if "SMCA_DETR" in cfg.MODEL else None,
        "dataset": dataset,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if gpu else "cpu",
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "batch_size": len(timed[0]),
        "num_warmup": len(warm),
        "num_images_timed": sum(len(b) for b in timed),
        "ms_per_image": ms_mean,
        "ms_per_image_median": statistics.median(ms),
        "images_per_s": 1e3 / ms_mean if ms_mean > 0 else float("inf"),
        "peak_memory_mb": mem.peak_bytes / 2 ** 20,
        "memory_method": mem.method,
        "params": params,
        "params_m": params / 1e6,
        "gflops": flops["gflops"],
        "gflops_by_operator": flops["gflops_by_operator"],
        "flops_input_hw": flops["input_hw"],
        "uncounted_ops": flops["uncounted_ops"],
    }
    return report


def format_report(report: Dict[str, object]) -> str:
    """The report as a small table (one row)."""
    from tabulate import tabulate

    mem_label = "peak mem (MB, CUDA)" if report["memory_method"].startswith("cuda") else "peak RSS growth (MB)"
    row = [report["transformer"] or report["meta_architecture"], report["device_name"],
           f"{report['ms_per_image']:.1f}", f"{report['images_per_s']:.2f}", f"{report['peak_memory_mb']:.1f}",
           f"{report['params_m']:.3g}", f"{report['gflops']:.4g}",
           "x".join(str(v) for v in report["flops_input_hw"])]
    headers = ["model", "device", "ms/img", "img/s", mem_label, "params (M)", "GFLOPs", "FLOPs input"]
    return tabulate([row], headers=headers, tablefmt="pipe")


def write_benchmark_report(cfg, model: nn.Module, output_dir: Optional[str] = None, **kwargs) -> Dict[str, object]:
    """Run :func:`benchmark_report`, log it as a table and write ``benchmark_report.json`` to
    ``output_dir`` (default ``cfg.OUTPUT_DIR/inference``, next to detectron2's evaluation results).
    Returns the report with ``"path"`` added."""
    report = benchmark_report(cfg, model, **kwargs)
    output_dir = output_dir or os.path.join(cfg.OUTPUT_DIR, "inference")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, REPORT_FILENAME)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    logger.info("Benchmark report (pure model time after warm-up, batch 1):\n" + format_report(report)
                + f"\nwritten to {path}")
    report["path"] = path
    return report


def eval_only_report(cfg, model: nn.Module) -> Optional[Dict[str, object]]:
    """The ``--eval-only`` hook: :func:`write_benchmark_report` on the main process; never raises (the
    AP results are already there), logs a warning instead. None when nothing was written."""
    from detectron2.utils import comm
    from detectron2.utils.logger import setup_logger

    if not comm.is_main_process():
        return None
    if not logging.getLogger("smca_detr").handlers:  # default_setup configures detectron2 / fvcore only
        setup_logger(cfg.OUTPUT_DIR or None, distributed_rank=comm.get_rank(), name="smca_detr")
    if not len(cfg.DATASETS.TEST):
        logger.info("No DATASETS.TEST: no benchmark report.")
        return None
    try:
        return write_benchmark_report(cfg, model)
    except Exception as e:  # noqa: BLE001  (a report failure must not fail the evaluation)
        logger.warning(f"Benchmark report failed: {type(e).__name__}: {e}")
        return None
