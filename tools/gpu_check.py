#!/usr/bin/env python
"""One acceptance run of the GPU path on a single CUDA GPU (at most ~8 minutes on an H100); writes
``<out>/gpu_check.json`` and ``<out>/gpu_check.md`` (one Markdown table per section).

Sections (``--sections``, all by default), each with its own time limit inside ``--time-limit``:

* ``pytest``    -- the op and model tests marked ``cuda`` (``pytest -m cuda tests``: Triton vs PyTorch
                   vs float64 oracle, fp32 / fp16 / bf16 and mixed dtypes);
* ``msda``      -- multi-scale deformable attention at the Deformable DETR R50 encoder size (800x1333:
                   levels 100x167 .. 13x21, one query per value, 8 heads x 32, 4 levels x 4 points),
                   batch 2 and 8, Triton vs the PyTorch path, forward and forward+backward: time and
                   peak memory (pieces of tools/benchmark_msda.py);
* ``models``    -- for each R50 config: one training step in fp32 and bf16 AMP at batch 2 (800x1333):
                   time, peak memory, finite loss; inference ms/image at batch 1 in fp32 and fp16
                   (the real ``TrainLoop`` step and batch-1 inference of tools/benchmark.py);
* ``train_net`` -- 20 iterations of ``train_net.py --num-gpus 1`` on the embedded dataset, then its
                   evaluation, with ``torch.cuda.set_sync_debug_mode("warn")`` counting the host
                   synchronisations of each training iteration (``run_step``; the hooks' own syncs, e.g.
                   the metric writers, are not counted);
* ``dcn``       -- where detectron2's compiled CUDA ops are present, one training step of
                   deformable_detr_r101_dcn (detectron2's deformable convolution).

    python tools/gpu_check.py [--out output/gpu_check] [--configs smca_r50 ...] [--sections msda models]
    python tools/gpu_check.py --dry-run      # CPU, tiny sizes, same code otherwise (tested in CI)

Without CUDA (and without ``--dry-run``) it says so and exits with status 2; it exits with status 1
when a check failed (a test failure, a non-finite loss, an error).
"""
import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

R50_CONFIGS = ["detr_r50", "smca_r50", "smca_r50_ms", "conditional_detr_r50", "deformable_detr_r50",
               "deformable_detr_r50_refine", "deformable_detr_r50_two_stage"]
DCN_CONFIG = "deformable_detr_r101_dcn"
SECTIONS = ["pytest", "msda", "models", "train_net", "dcn"]
# seconds per section (a section stops between its items, a subprocess is killed); --time-limit caps
# them all together, so that the whole run stays under 8 minutes
LIMITS = {"pytest": 150, "msda": 45, "models": 140, "train_net": 90, "dcn": 25}
DEMO_CONFIG = "configs/demo/smca_r18_slim_synthetic.yaml"
SYNC_WARNING = "synchronizing CUDA operation"


class Sizes:
    """What a run measures: the real sizes on a GPU, tiny ones for ``--dry-run`` (CPU)."""

    def __init__(self, dry_run: bool):
        self.msda_size = "tiny" if dry_run else "full"
        self.msda_batches = (2,) if dry_run else (2, 8)
        self.msda_repeats, self.msda_warmup = (1, 0) if dry_run else (10, 2)
        self.image = (64, 96) if dry_run else (800, 1333)
        self.train_iters, self.train_warmup = (1, 0) if dry_run else (3, 1)
        self.eval_images, self.eval_warmup = (1, 0) if dry_run else (10, 3)
        # --dry-run: each config's own transformer and heads, but a ResNet-18 and 32 channels
        self.model_opts = (["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                            "MODEL.SMCA_DETR.HIDDEN_DIM", "32", "MODEL.SMCA_DETR.NHEADS", "4",
                            "MODEL.SMCA_DETR.ENC_LAYERS", "1", "MODEL.SMCA_DETR.DEC_LAYERS", "2",
                            "MODEL.SMCA_DETR.DIM_FEEDFORWARD", "64", "MODEL.SMCA_DETR.NUM_QUERIES", "10"]
                           if dry_run else [])
        self.train_net_iters = 2 if dry_run else 20
        self.train_net_opts = (["SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN",
                                "96", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"] if dry_run else [])


class Budget:
    """The run's deadline and the limit of the current section."""

    def __init__(self, total_s: float):
        self.deadline = time.perf_counter() + total_s
        self.section_end = self.deadline

    def start(self, section: str) -> float:
        limit = min(LIMITS[section], self.left(self.deadline))
        self.section_end = time.perf_counter() + limit
        return limit

    @staticmethod
    def left(end: float) -> float:
        return max(0.0, end - time.perf_counter())

    def section_left(self) -> float:
        return self.left(self.section_end)


# ------------------------------------------------------------------------------------------ report


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows) -> str:
    """A Markdown table of ``rows`` (dicts); the columns are their keys in order of appearance."""
    columns = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    if not columns:
        return "(nothing measured)\n"
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown_report(results) -> str:
    env = results["environment"]
    out = [f"# tools/gpu_check.py on {env['device']}{' (dry run)' if results['dry_run'] else ''}", "",
           ", ".join(f"{k} {v}" for k, v in env.items() if k != "device") + f"; {results['seconds']:.0f} s in all; "
           + ("all checks passed" if results["ok"] else "SOME CHECKS FAILED"), ""]
    for name, section in results["sections"].items():
        out += [f"## {name} ({section['seconds']:.0f} s{', ' + section['note'] if section.get('note') else ''})", "",
                markdown_table(section["rows"])]
    return "\n".join(out)


def write_report(results, out_dir) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
        f.write(markdown_report(results))


def row_failed(row) -> bool:
    return bool(row.get("error")) or row.get("finite") is False or bool(row.get("failed"))


# ------------------------------------------------------------------------------------------ sections


def _env():
    """The environment of the subprocesses: this checkout first on the Python path."""
    path = [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path))


def section_pytest(ctx, budget):
    limit = budget.section_left()
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=limit)
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc = None
    row = parse_pytest_summary(output)
    row.update(command=" ".join(cmd[2:]), exit_code=rc, seconds=time.perf_counter() - t0)
    if rc is None:
        row["error"] = f"timed out after {limit:.0f} s"
    elif rc not in (0, 5):  # 5: no test is marked cuda
        row["error"] = f"pytest exit code {rc}"
    ctx["pytest_tail"] = output[-4000:]
    return [row]


def parse_pytest_summary(output: str):
    """Counts of pytest's final summary line (``3 passed, 1 skipped in 2.1s``)."""
    counts = {}
    for line in reversed(output.strip().splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)\b", line)
        if found:
            for n, what in found:
                counts["errors" if what.startswith("error") else what] = int(n)
            break
    return {k: counts.get(k, 0) for k in ("passed", "failed", "errors", "skipped", "deselected")}


def section_msda(ctx, budget):
    import torch

    import benchmark_msda as bm
    from smca_detr.layers.msda import ms_deform_attn, triton_available

    device, sizes = ctx["device"], ctx["sizes"]
    shapes, _ = bm.SIZES[sizes.msda_size]
    queries = sum(h * w for h, w in shapes)  # the encoder: one query per value
    impls = ["pytorch"] + (["triton"] if device.type == "cuda" and triton_available() else [])

    class _NoBar:
        def update(self, n):
            pass

    rows = []
    for batch in sizes.msda_batches:
        reference = None
        for impl in impls:
            row = {"batch": batch, "queries": queries, "impl": impl, "dtype": "fp32"}
            rows.append(row)
            if budget.section_left() <= 0:
                row["skipped"] = "time limit"
                continue
            try:
                value, spatial, starts, loc, attn = bm.make_inputs(shapes, batch, queries, 8, 32, 4, torch.float32,
                                                                   device)
                leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
                grad = torch.randn(batch, queries, 8 * 32, device=device)

                def fwd():
                    with torch.no_grad():
                        return ms_deform_attn(value, spatial, starts, loc, attn, impl=impl)

                def fwd_bwd():
                    for t in leaves:
                        t.grad = None
                    ms_deform_attn(leaves[0], spatial, starts, leaves[1], leaves[2], impl=impl).backward(grad)

                out = fwd().float()
                reference = out if reference is None else reference
                row["max_abs_diff_vs_pytorch"] = float((out - reference).abs().max())
                row["fwd_ms"] = bm.measure(fwd, device, sizes.msda_repeats, sizes.msda_warmup, _NoBar())
                row["fwd_peak_MiB"] = bm.peak_memory(fwd, device) / 2**20
                row["fwd_bwd_ms"] = bm.measure(fwd_bwd, device, sizes.msda_repeats, sizes.msda_warmup, _NoBar())
                row["fwd_bwd_peak_MiB"] = bm.peak_memory(fwd_bwd, device) / 2**20
                del value, loc, attn, leaves, grad, out
            except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _config_file(name: str) -> str:
    return str(REPO / "configs" / f"{name}.yaml")


def _train_and_infer(ctx, config, rows, train_precisions, infer_precisions):
    """Rows of one config: a training step per precision (fresh weights each), then inference."""
    import copy

    import torch

    import bench_common
    import benchmark as bench
    from smca_detr.engine import Trainer

    device, sizes = ctx["device"], ctx["sizes"]
    h, w = sizes.image
    cfg, model = bench_common.build_model(_config_file(config), ["MODEL.SMCA_DETR.DROPOUT", "0.0"] + sizes.model_opts,
                                    device=device)
    init = copy.deepcopy(model.state_dict())
    batch = bench_common.synthetic_inputs(2, h, w, device=device, with_instances=True,
                                   num_classes=cfg.MODEL.SMCA_DETR.NUM_CLASSES)
    for precision in train_precisions:
        row = {"config": config, "step": "train batch 2", "precision": precision}
        rows.append(row)
        try:
            model.load_state_dict(init)
            optimizer = Trainer.build_optimizer(cfg, model)
            s, mem, _, loss = bench.bench_train(cfg, model, optimizer, [batch], precision, sizes.train_iters,
                                                sizes.train_warmup)
            row.update(ms=1e3 * s, peak_MiB=mem, loss=float(loss), finite=math.isfinite(float(loss)))
            del optimizer
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:300]
            row["finite"] = not isinstance(e, FloatingPointError)
    if infer_precisions:
        inputs = bench_common.synthetic_inputs(sizes.eval_warmup + sizes.eval_images, h, w, device=device)
        for precision in infer_precisions:
            row = {"config": config, "step": "inference batch 1", "precision": precision}
            rows.append(row)
            try:
                ms, _, mem = bench.bench_eval(model, inputs, precision, sizes.eval_warmup)
                row.update(ms=ms, peak_MiB=mem)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"[:300]
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def section_models(ctx, budget):
    rows = []
    infer = ["fp32", "fp16" if ctx["device"].type == "cuda" else "bf16"]  # CPU autocast: bf16
    for config in ctx["configs"]:
        if budget.section_left() <= 0:
            rows.append({"config": config, "skipped": "time limit"})
            continue
        _train_and_infer(ctx, config, rows, ["fp32", "bf16"], infer)
    return rows


def dcn_unavailable_reason(device) -> str:
    """Why detectron2's deformable convolution cannot run on ``device`` ("" when it can)."""
    if device.type != "cuda":
        return "detectron2's deformable convolution runs on CUDA only"
    try:
        from detectron2 import _C
    except ImportError:
        return "detectron2 has no compiled ops (detectron2._C)"
    if getattr(_C, "__smca_detr_placeholder__", False) or not hasattr(_C, "deform_conv_forward"):
        return "detectron2 was installed without its compiled ops (build it from source)"
    get_cuda_version = getattr(_C, "get_cuda_version", None)
    if get_cuda_version is not None and not get_cuda_version():
        return "detectron2's compiled ops were built without CUDA"
    return ""


def section_dcn(ctx, budget):
    reason = dcn_unavailable_reason(ctx["device"])
    if reason:
        return [{"config": DCN_CONFIG, "skipped": reason}]
    rows = []
    _train_and_infer(ctx, DCN_CONFIG, rows, ["fp32"], [])
    return rows


def section_train_net(ctx, budget):
    sizes = ctx["sizes"]
    out_dir = os.path.join(ctx["out"], "train_net")
    result_file = os.path.join(ctx["out"], "train_net_result.json")
    argv = ["--config-file", str(REPO / DEMO_CONFIG), "--num-gpus", "1",
            "MODEL.DEVICE", ctx["device"].type, "SOLVER.MAX_ITER", str(sizes.train_net_iters),
            "SOLVER.CHECKPOINT_PERIOD", "100000", "TEST.EVAL_PERIOD", "0", "SOLVER.WARMUP_ITERS", "0",
            "DATASETS.TRAIN", "('smca_synthetic_tiny_train',)", "DATASETS.TEST", "('smca_synthetic_tiny_val',)",
            "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", out_dir] + sizes.train_net_opts
    if os.path.exists(result_file):
        os.remove(result_file)
    limit = budget.section_left()
    row = {"iterations": sizes.train_net_iters, "device": ctx["device"].type}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--train-net-child", result_file, "--"] + argv, cwd=REPO,
                              env=_env(), capture_output=True, text=True, timeout=limit)
        tail = (proc.stdout + proc.stderr)[-4000:]
        if proc.returncode != 0:
            row["error"] = f"exit code {proc.returncode}: " + (tail.strip().splitlines() or [""])[-1][:300]
    except subprocess.TimeoutExpired:
        tail, row["error"] = "", f"timed out after {limit:.0f} s"
    row["seconds"] = time.perf_counter() - t0
    ctx["train_net_tail"] = tail
    if os.path.exists(result_file):
        with open(result_file) as f:
            child = json.load(f)
        syncs = ctx["train_net_syncs"] = child["syncs_per_iteration"]  # the full list goes into the JSON
        row.update(train_s=child["train_seconds"], eval_s=child["eval_seconds"],
                   syncs_per_iter_first=syncs[0] if syncs and syncs[0] is not None else None,
                   syncs_per_iter_max_after_first=max(syncs[1:]) if len(syncs) > 1 and syncs[1] is not None else None,
                   AP=child["bbox"].get("AP"), AP50=child["bbox"].get("AP50"))
    elif "error" not in row:
        row["error"] = "train_net.py wrote no result"
    return [row]


def train_net_child(result_file, argv):
    """Run ``train_net.py`` (its ``cli``) in this process, counting the synchronisation warnings
    ``torch.cuda.set_sync_debug_mode("warn")`` gives inside each training iteration; write the counts,
    the training time and the final evaluation's bbox metrics to ``result_file``."""
    import importlib.util
    import warnings

    import torch
    from detectron2.engine import HookBase

    from smca_detr.engine import Trainer

    counting = torch.cuda.is_available() and "cpu" not in argv[argv.index("MODEL.DEVICE") + 1]
    state = {"syncs": 0, "per_iter": [], "eval": {}}
    show = warnings.showwarning

    def count(message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING in str(message):
            state["syncs"] += 1
        else:
            show(message, category, filename, lineno, file, line)

    class SyncCounter(HookBase):
        def before_train(self):
            state["t0"] = time.perf_counter()

        def before_step(self):
            state["syncs"] = 0
            if counting:
                torch.cuda.set_sync_debug_mode("warn")

        def after_step(self):  # first hook: runs before the writers' and evaluators' own syncs
            if counting:
                torch.cuda.set_sync_debug_mode(0)
            state["per_iter"].append(state["syncs"] if counting else None)
            state["t1"] = time.perf_counter()

    class EvalResults(HookBase):
        def after_train(self):  # last hook: after detectron2's EvalHook ran the final evaluation
            state["eval"] = getattr(self.trainer, "_last_eval_results", None) or {}
            state["t2"] = time.perf_counter()

    build_hooks = Trainer.build_hooks
    Trainer.build_hooks = lambda self: [SyncCounter()] + build_hooks(self) + [EvalResults()]
    warnings.showwarning = count
    warnings.filterwarnings("always", message=".*" + SYNC_WARNING)
    spec = importlib.util.spec_from_file_location("smca_gpu_check_train_net", REPO / "train_net.py")
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    train_net.cli(argv)
    with open(result_file, "w") as f:
        json.dump({"syncs_per_iteration": state["per_iter"], "bbox": state["eval"].get("bbox", {}),
                   "train_seconds": state["t1"] - state["t0"], "eval_seconds": state["t2"] - state["t1"]}, f)


SECTION_FUNCS = {"pytest": section_pytest, "msda": section_msda, "models": section_models,
                 "train_net": section_train_net, "dcn": section_dcn}


# ------------------------------------------------------------------------------------------ main


def environment(device):
    import torch

    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
           "torch": torch.__version__}
    if device.type == "cuda":
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["cuda"] = torch.version.cuda
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    import detectron2

    from smca_detr.engine import has_fast_coco_eval

    env["detectron2"] = detectron2.__version__
    env["fast_coco_eval"] = has_fast_coco_eval()
    return env


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="output/gpu_check", help="folder of gpu_check.json / gpu_check.md")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (a test of this script)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS)
    ap.add_argument("--configs", nargs="+", choices=R50_CONFIGS, default=R50_CONFIGS,
                    help="configs of the models section")
    ap.add_argument("--time-limit", type=float, default=450.0,
                    help="seconds for all sections together (start-up and imports come on top)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--train-net-child"]:
        train_net_child(argv[1], argv[3:])
        return 0
    args = parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check.py: no CUDA GPU (torch.cuda.is_available() is False): this check needs one; "
              "--dry-run runs it on the CPU at tiny sizes", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    device = torch.device("cpu" if args.dry_run else "cuda")
    ctx = {"device": device, "sizes": Sizes(args.dry_run), "configs": args.configs, "out": os.path.abspath(args.out)}
    os.makedirs(ctx["out"], exist_ok=True)
    results = {"dry_run": args.dry_run, "environment": environment(device), "sections": {}}
    budget = Budget(args.time_limit)
    for name in args.sections:
        limit = budget.start(name)
        print(f"gpu_check: {name} (limit {limit:.0f} s) ...", flush=True)
        t0 = time.perf_counter()
        try:
            rows = SECTION_FUNCS[name](ctx, budget)
        except Exception as e:  # noqa: BLE001 - one broken section does not hide the others
            rows = [{"error": f"{type(e).__name__}: {e}"[:300]}]
        results["sections"][name] = {"seconds": time.perf_counter() - t0, "limit_s": limit, "rows": rows}
        print(markdown_table(rows), flush=True)
    for key in ("pytest_tail", "train_net_tail", "train_net_syncs"):
        if ctx.get(key):
            results[key] = ctx[key]
    results["seconds"] = time.perf_counter() - t_start
    results["ok"] = not any(row_failed(r) for s in results["sections"].values() for r in s["rows"])
    write_report(results, ctx["out"])
    print(f"gpu_check: wrote {os.path.join(ctx['out'], 'gpu_check.md')} and gpu_check.json "
          f"({results['seconds']:.0f} s, {'ok' if results['ok'] else 'FAILED'})")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
