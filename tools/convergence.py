#!/usr/bin/env python
"""Convergence study: AP against training iterations for DETR and the fast-converging variants
under ONE identical small budget (configs/convergence/*.yaml) on the embedded synthetic dataset.

    python tools/convergence.py --models detr,smca,smca_ms,conditional,deformable \\
        --max-iter 200 --eval-every 50 --eval-images 100 --output docs/convergence

Each model is trained from scratch with smca_detr's ``Trainer`` (detectron2 hooks), in chunks of
``--eval-every`` iterations: every chunk ends with an evaluation hook running ``Trainer.test``
(COCOEvaluator) on a fixed, deterministic subset of the validation split (its first
``--eval-images`` images by image id) and a checkpoint; the next chunk resumes model, optimizer,
LR schedule and data stream from it. By default the models are interleaved (all reach iteration K
before any trains further), so a run stopped early still compares every model at the same
iterations. Each point records: iteration, AP, AP50, AP75, training wall seconds (evaluation and
model building excluded), elapsed seconds (evaluation included) and the mean total_loss since the
previous point.

Outputs (``--output``):
  curves.json  every point, written after every evaluation (an interrupted run keeps its data);
               a later run with the same settings skips models marked complete (``--force``
               re-runs them) and resumes interrupted ones from their last checkpoint.
  curves.png   AP and AP50 against iteration (one line per model), AP against training time.
  table.md     AP / AP50 at each evaluation point, first iteration / time at which AP50 reaches
               each ``--thresholds`` value, the budget, the hardware and what the data shows about
               the papers' claim (SMCA / Conditional / Deformable converge faster than DETR).
Checkpoints, logs, metrics.json and COCO results go to ``--work-dir`` (default output/convergence).
curves.png is redrawn after each chunk; ``--replot`` redraws it (and table.md) from curves.json alone,
e.g. after an interrupted run.

Trailing ``KEY VALUE`` pairs override the config of every model (e.g. tiny sizes for a smoke test).
"""
import argparse
import datetime
import json
import logging
import math
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs", "convergence")

# name -> (config file in --config-dir, label in plots and tables)
MODELS = {
    "detr": ("detr.yaml", "DETR"),
    "smca": ("smca.yaml", "SMCA (single scale)"),
    "smca_ms": ("smca_ms.yaml", "SMCA (multi scale)"),
    "conditional": ("conditional.yaml", "Conditional DETR"),
    "deformable": ("deformable.yaml", "Deformable DETR (MS)"),
}
FAST_MODELS = ("smca", "smca_ms", "conditional", "deformable")  # claimed to converge faster than DETR
CURVES_VERSION = 1

logger = logging.getLogger("smca_detr.convergence")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"comma-separated runs: a model of {list(MODELS)}, optionally with its own seed as "
                         "<model>@<seed> (e.g. detr,detr@43: two seeds of DETR)")
    ap.add_argument("--max-iter", type=int, default=200, help="training iterations of every model")
    ap.add_argument("--eval-every", type=int, default=50, help="evaluate every K iterations (and at the end)")
    ap.add_argument("--eval-images", type=int, default=100,
                    help="first M validation images (by image id) used for evaluation; 0 = the whole split")
    ap.add_argument("--output", default=os.path.join("docs", "convergence"), help="curves.json/png, table.md")
    ap.add_argument("--work-dir", default=os.path.join("output", "convergence"),
                    help="checkpoints, logs, COCO results (one folder per model)")
    ap.add_argument("--config-dir", default=CONFIG_DIR, help="where <model>.yaml are")
    ap.add_argument("--thresholds", default="10,25,50", help="AP50 thresholds of the 'first reaches' table")
    ap.add_argument("--seed", type=int, default=42, help="seed of every model (weights, data order, flips)")
    ap.add_argument("--max-hours", type=float, default=2.0,
                    help="length of one piece: no chunk is started once this much wall time has passed (or would "
                         "pass, judging by the longest chunk so far); the same command later continues the study "
                         "where it stopped. Every piece is recorded in curves.json")
    ap.add_argument("--force", action="store_true", help="re-run models that curves.json marks complete")
    ap.add_argument("--order", choices=("interleaved", "sequential"), default="interleaved",
                    help="interleaved (default): every model trains to the next evaluation point before any goes "
                         "further, so a stopped run still compares all models at the same iterations; "
                         "sequential: one model after the other")
    ap.add_argument("--hardware-note", default="", help="extra text for the hardware line of table.md")
    ap.add_argument("--note", default=None,
                    help="a remark printed under 'Run notes' in table.md (kept in curves.json; '' removes it)")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw curves.png and table.md from the curves.json in --output (no training)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="CURVES_JSON",
                    help="with --replot: combine these curves.json files (e.g. groups of runs trained in parallel, "
                         "one process each) into --output/curves.json first; a run may appear in one file only")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every model: KEY VALUE ...")
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        runs = [parse_run(m, args.seed) for m in args.models]
    except ValueError:
        ap.error(f"--models: entries are <model> or <model>@<seed>, got {args.models}")
    unknown = [m for m, _ in runs if m not in MODELS]
    if unknown or not args.models:
        ap.error(f"--models: unknown {unknown}; choose from {list(MODELS)} (optionally @<seed>)")
    args.models = [run_id(m, seed, args.seed) for m, seed in runs]
    if args.max_iter < 1 or args.eval_every < 1 or args.eval_images < 0 or args.max_hours <= 0:
        ap.error("--max-iter and --eval-every must be >= 1, --eval-images >= 0, --max-hours > 0")
    args.thresholds = sorted(float(t) for t in args.thresholds.split(",") if t.strip())
    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]
    if len(args.opts) % 2:
        ap.error(f"config overrides must be KEY VALUE pairs, got {args.opts}")
    return args


def parse_run(text, default_seed):
    """"detr" -> ("detr", default_seed); "detr@43" -> ("detr", 43)."""
    name, _, seed = text.partition("@")
    return name, int(seed) if seed else default_seed


def run_id(name, seed, default_seed):
    """The key of a run in curves.json and its work folder: the model name, "+@seed" off the default."""
    return name if seed == default_seed else f"{name}@{seed}"


def run_label(run, default_seed):
    name, seed = parse_run(run, default_seed)
    return MODELS[name][1] + ("" if seed == default_seed else f" (seed {seed})")


# ----------------------------------------------------------------------------------- json state


def _finite(x):
    """float(x), or None for NaN / inf / missing (strict JSON has no NaN)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def load_curves(path):
    if not os.path.isfile(path):
        return {"version": CURVES_VERSION, "models": {}}
    with open(path) as f:
        data = json.load(f)
    if data.get("version") != CURVES_VERSION or not isinstance(data.get("models"), dict):
        raise ValueError(f"{path}: not a curves.json of version {CURVES_VERSION}; move it away or pass another --output")
    return data


def merge_curves(paths):
    """One curves.json from several (runs trained by separate processes): runs and pieces together,
    settings and hardware of the first, the union of the requested runs."""
    parts = [load_curves(p) for p in paths]
    data = {"version": CURVES_VERSION, "models": {}, "pieces": [],
            "settings": dict(parts[0].get("settings", {})), "hardware": parts[0].get("hardware", {})}
    for path, part in zip(paths, parts):
        for run, entry in part["models"].items():
            if run in data["models"]:
                raise ValueError(f"--merge: run {run!r} is in more than one file ({path})")
            data["models"][run] = entry
        group = os.path.basename(os.path.dirname(os.path.abspath(path)))
        data["pieces"] += [dict(pc, group=group) for pc in part.get("pieces", [])]
    data["settings"]["models"] = list(data["models"])
    return data


def save_json_atomic(path, data):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def run_settings(args, run=None):
    """What must match for a stored run to count as done with this command."""
    seed = parse_run(run, args.seed)[1] if run else args.seed
    return {"max_iter": args.max_iter, "eval_every": args.eval_every, "eval_images": args.eval_images,
            "seed": seed, "opts": list(args.opts)}


def hardware_info():
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": "cpu"}


# ----------------------------------------------------------------------------------- evaluation set


def register_eval_subset(val_name, num_images, work_dir):
    """Register the first ``num_images`` images (by image id) of ``val_name`` as a COCO dataset of its
    own (json written under ``work_dir``) and return its name; ``val_name`` itself when 0 or when the
    split is not larger than that."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    from smca_detr.data import ensure_synthetic
    from smca_detr.data import synthetic

    if val_name in synthetic.SPLITS:
        ensure_synthetic(val_name)
    dicts = DatasetCatalog.get(val_name)
    if num_images <= 0 or num_images >= len(dicts):
        return val_name
    meta = MetadataCatalog.get(val_name)
    json_file = getattr(meta, "json_file", None)
    if not json_file:
        raise ValueError(f"--eval-images needs a COCO json dataset; {val_name!r} has no json_file")
    with open(json_file) as f:
        coco = json.load(f)
    keep = {img["id"] for img in sorted(coco["images"], key=lambda im: im["id"])[:num_images]}
    coco["images"] = [im for im in coco["images"] if im["id"] in keep]
    coco["annotations"] = [a for a in coco.get("annotations", []) if a["image_id"] in keep]
    name = f"{val_name}_first{num_images}"
    os.makedirs(work_dir, exist_ok=True)
    sub_json = os.path.join(os.path.abspath(work_dir), f"{name}.json")
    save_json_atomic(sub_json, coco)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, sub_json, meta.image_root)
    return name


# ----------------------------------------------------------------------------------- training


def build_cfg(args, run, eval_dataset=None):
    from smca_detr.model_zoo import get_config

    model_name, seed = parse_run(run, args.seed)
    cfg = get_config(os.path.join(args.config_dir, MODELS[model_name][0]), args.opts)
    cfg.SOLVER.MAX_ITER = args.max_iter
    cfg.SOLVER.STEPS = tuple(s for s in cfg.SOLVER.STEPS if s < args.max_iter)
    cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, args.max_iter)
    cfg.TEST.EVAL_PERIOD = args.eval_every
    if eval_dataset is not None:
        cfg.DATASETS.TEST = (eval_dataset,)
    cfg.SEED = seed
    cfg.OUTPUT_DIR = os.path.join(args.work_dir, run)
    cfg.freeze()
    return cfg


def make_trainer_class():
    from detectron2.engine import hooks as d2_hooks
    from detectron2.utils.events import get_event_storage

    from smca_detr.engine import Trainer

    class ConvergenceEvalHook(d2_hooks.EvalHook):
        """EvalHook that also records a curve point (iteration, AP, AP50, times, mean loss)."""

        def __init__(self, period, eval_function, on_point, offsets):
            super().__init__(period, eval_function)
            self._on_point = on_point
            self._offsets = offsets  # wall_s / elapsed_s of the previous point (a resumed model)

        def before_train(self):
            self._t0 = time.perf_counter()
            self._eval_s = 0.0
            self._last_iter = self.trainer.start_iter  # iterations finished at the previous point

        def _record(self, iteration):
            t = time.perf_counter()
            train_s = t - self._t0 - self._eval_s
            hist = get_event_storage().history("total_loss") if "total_loss" in get_event_storage().histories() else None
            losses = [v for v, it in hist.values() if self._last_iter <= it < iteration] if hist else []
            super()._do_eval()
            results = getattr(self.trainer, "_last_eval_results", None) or {}
            bbox = results.get("bbox", {}) if isinstance(results, dict) else {}
            self._eval_s += time.perf_counter() - t
            self._last_iter = iteration
            self._on_point({
                "iteration": int(iteration),
                "AP": _finite(bbox.get("AP")),
                "AP50": _finite(bbox.get("AP50")),
                "AP75": _finite(bbox.get("AP75")),
                "wall_s": round(self._offsets.get("wall_s", 0.0) + train_s, 2),
                "elapsed_s": round(self._offsets.get("elapsed_s", 0.0) + time.perf_counter() - self._t0, 2),
                "eval_s": round(time.perf_counter() - t, 2),
                "total_loss": _finite(sum(losses) / len(losses)) if losses else None,
            })

        def after_step(self):
            next_iter = self.trainer.iter + 1
            if self._period > 0 and next_iter % self._period == 0 and next_iter != self.trainer.max_iter:
                self._record(next_iter)

        def after_train(self):
            # v0.6 leaves trainer.iter == max_iter after a finished loop (max_iter - 1 on main)
            if self.trainer.iter + 1 >= self.trainer.max_iter:
                self._record(self.trainer.max_iter)
            del self._func

    class ConvergenceTrainer(Trainer):
        def __init__(self, cfg, on_point, offsets):
            self._convergence_on_point = on_point
            self._convergence_offsets = offsets
            super().__init__(cfg)

        def build_hooks(self):
            ret = super().build_hooks()

            def test_and_save_results():
                self._last_eval_results = self.test(self.cfg, self.model)
                return self._last_eval_results

            hook = ConvergenceEvalHook(self.cfg.TEST.EVAL_PERIOD, test_and_save_results, self._convergence_on_point,
                                       self._convergence_offsets)
            return [hook if isinstance(h, d2_hooks.EvalHook) else h for h in ret]

    return ConvergenceTrainer


class ResumeError(RuntimeError):
    pass


def clear_checkpoints(output_dir):
    for fname in ("last_checkpoint", "model_final.pth"):
        path = os.path.join(output_dir, fname)
        if os.path.exists(path):
            os.remove(path)


def train_chunk(args, model_name, eval_dataset, until, on_point, last_point=None, on_built=None):
    """Train ``model_name`` up to iteration ``until``: from scratch when ``last_point`` is None,
    otherwise resumed (model, optimizer, LR schedule, data stream) from the checkpoint written at the
    end of the previous chunk, whose last evaluation point is ``last_point``. The chunk ends with an
    evaluation (``on_point``) and a checkpoint (``model_final.pth``). ``on_built(num_params)`` is
    called once the model is built."""
    import torch
    from detectron2.utils.env import seed_all_rng

    from smca_detr.data import ensure_synthetic
    from smca_detr.data import synthetic

    cfg = build_cfg(args, model_name, eval_dataset)
    for name in cfg.DATASETS.TRAIN:
        if name in synthetic.SPLITS:
            ensure_synthetic(name)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    start = int(last_point["iteration"]) if last_point else 0
    if start == 0:
        clear_checkpoints(cfg.OUTPUT_DIR)
        with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
            f.write(cfg.dump())
    # the same seed for every chunk: same initial weights (overwritten when resuming) and the same
    # training-sampler seed, so that a resumed chunk continues the index stream of the previous one
    seed = cfg.SEED
    seed_all_rng(seed)
    torch.manual_seed(seed)
    offsets = {k: last_point[k] for k in ("wall_s", "elapsed_s")} if last_point else {}
    trainer = make_trainer_class()(cfg, on_point, offsets)
    if start > 0:
        if not trainer.checkpointer.has_checkpoint():
            raise ResumeError(f"{model_name}: no checkpoint in {cfg.OUTPUT_DIR} to resume iteration {start} from")
        trainer.resume_or_load(resume=True)
        if trainer.start_iter != start:
            raise ResumeError(f"{model_name}: the checkpoint resumes at iteration {trainer.start_iter}, "
                              f"curves.json at {start}")
    else:
        trainer.resume_or_load(resume=False)
    if on_built is not None:
        on_built(sum(p.numel() for p in trainer.model.parameters()))
    trainer.max_iter = until
    seed_all_rng(seed + start)  # augmentations (flips, sizes) of this chunk
    trainer.train()


def _backbone_name(b):
    """"18" or "18, res2 width 32" (a width other than the standard 64 of R18/R34)."""
    width = b.get("width")
    return f"{b.get('depth', '?')}" + (f", res2 width {width}" if width not in (None, 64, 256) else "")


def budget_of(cfg):
    """The shared budget of a config, for the text of table.md."""
    c, sol = cfg.MODEL.SMCA_DETR, cfg.SOLVER
    return {"depth": cfg.MODEL.RESNETS.DEPTH, "width": cfg.MODEL.RESNETS.RES2_OUT_CHANNELS,
            "backbone": cfg.MODEL.BACKBONE.NAME, "norm": cfg.MODEL.RESNETS.NORM, "freeze_at": cfg.MODEL.BACKBONE.FREEZE_AT,
            "weights": cfg.MODEL.WEIGHTS, "hidden_dim": c.HIDDEN_DIM, "nheads": c.NHEADS, "enc_layers": c.ENC_LAYERS,
            "dec_layers": c.DEC_LAYERS, "ffn": c.DIM_FEEDFORWARD, "queries": c.NUM_QUERIES, "dropout": c.DROPOUT,
            "min_size_train": list(cfg.INPUT.MIN_SIZE_TRAIN), "max_size_train": cfg.INPUT.MAX_SIZE_TRAIN,
            "min_size_test": cfg.INPUT.MIN_SIZE_TEST, "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
            "lr": sol.BASE_LR, "backbone_multiplier": sol.BACKBONE_MULTIPLIER, "weight_decay": sol.WEIGHT_DECAY,
            "clip": sol.CLIP_GRADIENTS.CLIP_VALUE if sol.CLIP_GRADIENTS.ENABLED else None,
            "warmup_iters": sol.WARMUP_ITERS, "steps": list(sol.STEPS) or "none (constant)"}


# ----------------------------------------------------------------------------------- outputs


def run_order(models):
    """Run ids in MODELS order, then by seed."""
    return sorted(models, key=lambda r: (list(MODELS).index(parse_run(r, None)[0]), models[r]["settings"]["seed"]))


def first_reach(points, key, threshold):
    for p in points:
        if p.get(key) is not None and p[key] >= threshold:
            return p
    return None


def _fmt(x, digits=1):
    return "–" if x is None else f"{x:.{digits}f}"


def mean_curves(models):
    """model name -> (runs, {iteration: mean AP over the runs (seeds) evaluated at that iteration by all})."""
    runs = {}
    for run, e in models.items():
        runs.setdefault(parse_run(run, None)[0], []).append(e)
    out = {}
    for name, es in runs.items():
        per_run = [{p["iteration"]: p["AP"] for p in e["points"] if p["AP"] is not None} for e in es]
        common = sorted(set.intersection(*(set(d) for d in per_run))) if per_run else []
        out[name] = (len(es), {i: sum(d[i] for d in per_run) / len(per_run) for i in common})
    return out


def convergence_verdict(models, margin=1.0, min_ap=1.0):
    """Plain-language reading of the curves against the papers' claim (fast variants > DETR), on the
    mean over seeds: a variant counts as faster when it is more than ``margin`` AP above DETR at the
    last common evaluation point and never more than ``margin`` below it; inconclusive while no model
    reaches ``min_ap`` AP. Also: the first iteration at which each variant reaches DETR's final AP."""
    curves = mean_curves(models)
    fast = [m for m in FAST_MODELS if m in curves and curves[m][1]]
    if "detr" not in curves or not curves["detr"][1] or not fast:
        return "Not assessable: DETR and at least one fast-converging variant need evaluation points."
    n_detr, detr_ap = curves["detr"]
    detr_last = max(detr_ap)
    target = detr_ap[detr_last]
    lines, faster = [], []
    for m in fast:
        n, ap = curves[m]
        common = [i for i in sorted(ap) if i in detr_ap]
        if not common:
            continue
        gaps = [ap[i] - detr_ap[i] for i in common]
        above = sum(g > margin for g in gaps)
        below = sum(g < -margin for g in gaps)
        is_faster = gaps[-1] > margin and below == 0
        faster.append(is_faster)
        reach = next((i for i in sorted(ap) if ap[i] >= target), None)
        reach_s = (f"reaches DETR's final AP ({target:.2f} at iteration {detr_last}) at iteration {reach}"
                   + (f", {detr_last / reach:.1f}× fewer iterations" if reach and reach < detr_last else "")
                   if reach else f"never reaches DETR's final AP ({target:.2f})")
        lines.append(f"- {MODELS[m][1]}{f' (mean of {n} seeds)' if n > 1 else ''}: "
                     f"{'faster than' if is_faster else 'not clearly faster than'} DETR — more than {margin:g} AP "
                     f"above it at {above}, within ±{margin:g} at {len(gaps) - above - below}, below at {below} of "
                     f"{len(gaps)} common evaluation points; at iteration {common[-1]} AP {ap[common[-1]]:.2f} vs "
                     f"DETR {detr_ap[common[-1]]:.2f} ({gaps[-1]:+.2f}); {reach_s}.")
    if not lines:
        return "Not assessable: no common evaluation points with DETR."
    best = max((p["AP"] for e in models.values() for p in e["points"] if p["AP"] is not None), default=0.0)
    if best < min_ap:
        head = (f"**Inconclusive**: no model has learned to detect yet (best AP of any model at any point: "
                f"{best:.2f} < {min_ap:g}), so this budget cannot tell convergence speeds apart; the claimed "
                "ordering is neither reproduced nor contradicted.")
    elif all(faster):
        head = "**Reproduced (qualitatively)**: every fast-converging variant run here ends clearly above DETR."
    elif any(faster):
        head = "**Partly reproduced**: only some of the fast-converging variants end clearly above DETR."
    else:
        head = "**Not reproduced** in this budget: no fast-converging variant ends clearly above DETR."
    return "\n".join([head, f"(Criterion, on the mean over seeds{f' (DETR: {n_detr})' if n_detr > 1 else ''}: more "
                             f"than {margin:g} AP above DETR at the last common evaluation point and never more than "
                             f"{margin:g} AP below it.)", ""] + lines)


def seed_spread(models):
    """Lines 'model: final AP of each seed (range)' for models run with more than one seed."""
    runs = {}
    for run, e in models.items():
        if e.get("points"):
            runs.setdefault(parse_run(run, None)[0], []).append((e["settings"]["seed"], e["points"][-1]))
    out = []
    for m in MODELS:
        if len(runs.get(m, [])) > 1:
            finals = sorted(runs[m])
            aps = [p["AP"] for _, p in finals if p["AP"] is not None]
            out.append(f"- {MODELS[m][1]}: " + ", ".join(f"seed {sd} AP {_fmt(p['AP'], 2)} (it {p['iteration']})"
                                                          for sd, p in finals)
                       + (f"; spread {max(aps) - min(aps):.2f} AP" if aps else ""))
    return out


def write_table(path, data, thresholds):
    settings = data.get("settings", {})
    hw = data.get("hardware", {})
    models = {m: e for m, e in data["models"].items() if e.get("points")}
    order = run_order(models)
    iters = sorted({p["iteration"] for m in order for p in models[m]["points"]})
    b = settings.get("budget", {})
    init = f"initialised from `{b['weights']}`" if b.get("weights") else "from scratch"
    out = [f"# Convergence study (synthetic shapes, CPU, small models, backbone {init})", ""]
    out.append("Generated by `tools/convergence.py`; numbers from `curves.json` next to this file, curves in "
               "`curves.png`.")
    out.append("")
    out.append("## Setup")
    out.append("")
    subset = "all" if settings.get("eval_dataset") == settings.get("val_dataset") else "the first"
    out.append(f"- Data: train `{settings.get('train_dataset', '?')}`, evaluation on {subset} "
               f"{settings.get('eval_images', '?')} images (by image id) of `{settings.get('val_dataset', '?')}` "
               "(COCO AP, pure-Python COCOeval).")
    out.append(f"- Budget (identical for every model): {settings.get('max_iter', '?')} iterations × batch "
               f"{settings.get('ims_per_batch', '?')} (≈ {settings.get('epochs', '?')} epochs), evaluation every "
               f"{settings.get('eval_every', '?')} iterations, seeds {sorted({models[m]['settings']['seed'] for m in order})}. "
               f"ResNet-{_backbone_name(b)} {init} ({b.get('norm', '?')}, freeze_at "
               f"{b.get('freeze_at', '?')}), d = {b.get('hidden_dim', '?')}, {b.get('nheads', '?')} heads, "
               f"{b.get('enc_layers', '?')} encoder + {b.get('dec_layers', '?')} decoder layers, FFN "
               f"{b.get('ffn', '?')}, {b.get('queries', '?')} queries, dropout {b.get('dropout', '?')}, shorter "
               f"side {b.get('min_size_train', '?')} (max {b.get('max_size_train', '?')}; test "
               f"{b.get('min_size_test', '?')}/{b.get('max_size_test', '?')}), flips, no crop; AdamW lr "
               f"{b.get('lr', '?')} (Deformable DETR: its config's, in the ratio of the papers' LRs; backbone multiplier "
               f"{b.get('backbone_multiplier', '?')}; Deformable keeps its paper's 0.1 on sampling_offsets / "
               "reference_points), weight decay "
               f"{b.get('weight_decay', '?')}, full-model clipping {b.get('clip', '?')}, "
               f"{b.get('warmup_iters', '?')} warmup iterations, LR steps {b.get('steps', '?')} "
               "(`configs/convergence/`).")
    if settings.get("opts"):
        out.append(f"- Config overrides: `{' '.join(settings['opts'])}`.")
    out.append(f"- Hardware: {hw.get('cpu', '?')}, {hw.get('cpu_count', '?')} CPU cores, "
               f"{hw.get('torch_threads', '?')} torch threads, torch {hw.get('torch', '?')}, no GPU"
               + (f"; {settings['hardware_note']}" if settings.get("hardware_note") else "") + ".")
    out.append("")
    if settings.get("note"):
        out += ["## Run notes", "", settings["note"], ""]
    pieces = data.get("pieces", [])
    if pieces:
        out += ["## Pieces", "", f"{len(pieces)} invocations of the tool (each at most `--max-hours`); per piece: "
                "start, wall hours, chunks trained (run: from -> to iteration).", ""]
        for k, pc in enumerate(pieces, 1):
            chunks = ", ".join(pc.get("chunks", [])) or "none"
            group = f" [{pc['group']}]" if pc.get("group") else ""
            out.append(f"{k}.{group} {pc.get('started', '?')}, {pc.get('seconds', 0) / 3600:.2f} h, "
                       f"{pc.get('stopped', '?')}: {chunks}")
        out.append("")
    out.append("## AP / AP50 at each evaluation point")
    out.append("")
    if order:
        out.append("| model | " + " | ".join(f"it {i}" for i in iters) + " | params | s/iter | complete |")
        out.append("|---|" + "---|" * (len(iters) + 3))
        for m in order:
            e = models[m]
            by_it = {p["iteration"]: p for p in e["points"]}
            cells = [f"{_fmt(by_it[i]['AP'], 2)} / {_fmt(by_it[i]['AP50'], 2)}" if i in by_it else "" for i in iters]
            last = e["points"][-1]
            spi = last["wall_s"] / last["iteration"] if last["iteration"] else None
            params = f"{e['params'] / 1e6:.1f} M" if e.get("params") else "?"
            out.append(f"| {e['label']} | " + " | ".join(cells) +
                       f" | {params} | {_fmt(spi, 2)} | {'yes' if e.get('complete') else 'no (interrupted)'} |")
        out.append("")
        out.append("Cells: AP / AP50 (COCO, ×100). s/iter: training wall time per iteration without evaluation, on a "
                   "machine shared with other jobs (indicative only).")
        out.append("")
        out.append("## First evaluation point reaching AP50 ≥ threshold")
        out.append("")
        out.append("| model | " + " | ".join(f"AP50 ≥ {t:g}" for t in thresholds) + " | best AP / AP50 (iteration) |")
        out.append("|---|" + "---|" * (len(thresholds) + 1))
        for m in order:
            e = models[m]
            cells = []
            for t in thresholds:
                p = first_reach(e["points"], "AP50", t)
                cells.append(f"it {p['iteration']} ({p['wall_s']:.0f} s)" if p else "not reached")
            best = max((p for p in e["points"] if p["AP"] is not None), key=lambda p: p["AP"], default=None)
            best_s = f"{best['AP']:.2f} / {_fmt(best['AP50'], 2)} ({best['iteration']})" if best else "–"
            out.append(f"| {e['label']} | " + " | ".join(cells) + f" | {best_s} |")
        out.append("")
        out.append("Time in parentheses: training wall seconds (evaluation excluded) until that point.")
        spread = seed_spread(models)
        if spread:
            out += ["", "## Spread between seeds (final AP)", ""] + spread
    else:
        out.append("No evaluation point yet.")
    out.append("")
    out.append("## Is the papers' ordering reproduced?")
    out.append("")
    out.append("The papers report that SMCA, Conditional DETR and Deformable DETR converge much faster than "
               "DETR (ImageNet-pretrained ResNet-50, COCO, tens of epochs). On this data and budget:")
    out.append("")
    out.append(convergence_verdict(models))
    out.append("")
    out.append("## Caveats")
    out.append("")
    out.append("- These are tiny models trained for a short schedule (≤ "
               f"{settings.get('epochs', '?')} epochs) of a small synthetic dataset on a "
               "CPU: the absolute numbers say nothing about COCO, and the ordering at this scale need not match "
               f"the papers' (backbone {init}, {b.get('enc_layers', '?')}+{b.get('dec_layers', '?')} layers, "
               f"{b.get('queries', '?')} queries, short schedule).")
    out.append("- Few seeds (see the spread above), evaluation on a subset of the validation split: differences "
               "smaller than the spread between seeds are noise.")
    out.append("- Focal-loss models keep the top-100 of query × class scores, DETR one detection per query (each "
               "paper's own post-processing); this alone can favour the focal models slightly in AP.")
    out.append("- Wall times come from a CPU that may be shared with other jobs: compare them only roughly.")
    incomplete = [models[m]["label"] for m in order if not models[m].get("complete")]
    missing = [run_label(m, settings.get("seed", 0)) for m in settings.get("models", []) if m not in models]
    if incomplete or missing:
        out.append(f"- Incomplete: {', '.join(incomplete) or 'none'}; not run: {', '.join(missing) or 'none'}.")
    out.append("")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(out))
    os.replace(path + ".tmp", path)


def write_plot(path, data):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = {m: e for m, e in data["models"].items() if e.get("points")}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = [("iteration", "AP", "AP vs iteration"), ("iteration", "AP50", "AP50 vs iteration"),
              ("wall_s", "AP", "AP vs training time")]
    for ax, (xkey, ykey, title) in zip(axes, panels):
        for m in run_order(models):
            name = parse_run(m, None)[0]
            pts = [p for p in models[m]["points"] if p.get(ykey) is not None]
            ax.plot([p[xkey] for p in pts], [p[ykey] for p in pts], "--" if "@" in m else "-", marker="o", ms=4,
                    color=f"C{list(MODELS).index(name)}", lw=2.2 if name == "detr" else 1.5,
                    label=models[m]["label"] + ("" if models[m].get("complete") else " (partial)"))
        ax.set_title(title)
        ax.set_xlabel("training wall time (s)" if xkey == "wall_s" else "iteration")
        ax.set_ylabel(ykey)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    s = data.get("settings", {})
    b = s.get("budget", {})
    init = "pretrained" if b.get("weights") else "from scratch"
    fig.suptitle(f"Convergence on {s.get('train_dataset', '?')} (R{_backbone_name(b)} {init}, "
                 f"d={b.get('hidden_dim', '?')}, {b.get('enc_layers', '?')}+{b.get('dec_layers', '?')} layers, "
                 f"batch {s.get('ims_per_batch', '?')}, eval on {s.get('eval_images', '?')} val images, CPU)",
                 fontsize=10)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write_outputs(out_dir, data, thresholds, plot=True):
    """curves.json and table.md (cheap: after every evaluation); curves.png when ``plot``."""
    save_json_atomic(os.path.join(out_dir, "curves.json"), data)
    write_table(os.path.join(out_dir, "table.md"), data, thresholds)
    if plot:
        write_plot(os.path.join(out_dir, "curves.png"), data)


# ----------------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        if args.merge:
            os.makedirs(args.output, exist_ok=True)
            save_json_atomic(os.path.join(args.output, "curves.json"), merge_curves(args.merge))
        data = load_curves(os.path.join(args.output, "curves.json"))
        if args.note is not None:
            data.setdefault("settings", {})["note"] = args.note
        thresholds = data.get("settings", {}).get("thresholds_ap50", args.thresholds)
        write_outputs(args.output, data, thresholds)
        for fname in ("curves.png", "table.md"):
            print(f"wrote {os.path.abspath(os.path.join(args.output, fname))}")
        return 0
    from detectron2.utils.logger import setup_logger
    from tqdm import tqdm

    import smca_detr  # noqa: F401  (registers datasets, transformers, criteria)

    os.makedirs(args.output, exist_ok=True)
    os.makedirs(args.work_dir, exist_ok=True)
    log_file = os.path.join(args.work_dir, "log.txt")
    setup_logger(output=log_file, name="detectron2")
    setup_logger(output=log_file, name="smca_detr")
    setup_logger(output=log_file, name="fvcore")

    curves_path = os.path.join(args.output, "curves.json")
    data = load_curves(curves_path)
    for pc in data.get("pieces", []):
        if pc.get("stopped") == "running":  # a piece that ended without saying so (killed)
            pc["stopped"] = "interrupted"
    settings = run_settings(args)

    # evaluation subset of the (first) test split of the first model's config
    probe = build_cfg(args, args.models[0])
    val_name = probe.DATASETS.TEST[0]
    eval_dataset = register_eval_subset(val_name, args.eval_images, args.work_dir)
    from detectron2.data import DatasetCatalog

    n_train = len(DatasetCatalog.get(probe.DATASETS.TRAIN[0]))
    n_eval = len(DatasetCatalog.get(eval_dataset))
    data["settings"] = dict(settings, models=list(dict.fromkeys(list(data.get("settings", {}).get("models", []))
                                                                + args.models)),
                            train_dataset=probe.DATASETS.TRAIN[0], val_dataset=val_name, eval_dataset=eval_dataset,
                            eval_images=n_eval, ims_per_batch=probe.SOLVER.IMS_PER_BATCH,
                            epochs=round(args.max_iter * probe.SOLVER.IMS_PER_BATCH / max(n_train, 1), 1),
                            thresholds_ap50=args.thresholds, hardware_note=args.hardware_note,
                            budget=budget_of(probe),
                            note=args.note if args.note is not None else data.get("settings", {}).get("note", ""))
    data["hardware"] = hardware_info()
    write_outputs(args.output, data, args.thresholds, plot=False)

    # which models to train, and from where
    chunk_ends = sorted(set(range(args.eval_every, args.max_iter, args.eval_every)) | {args.max_iter})
    todo = []
    for name in args.models:
        entry = data["models"].get(name)
        run_set = run_settings(args, name)
        same = bool(entry) and entry.get("settings") == run_set
        if same and entry.get("complete") and not args.force:
            logger.info(f"{name}: complete in {curves_path} with these settings, skipped (--force re-runs it)")
            continue
        if same and entry.get("points") and not args.force:
            logger.info(f"{name}: interrupted at iteration {entry['points'][-1]['iteration']}; resuming")
        else:
            if entry and entry.get("points"):
                logger.info(f"{name}: {'--force' if same else 'settings changed'}; training from iteration 0")
            model = parse_run(name, args.seed)[0]
            entry = data["models"][name] = {
                "label": run_label(name, args.seed),
                "config": os.path.relpath(os.path.join(args.config_dir, MODELS[model][0]), REPO),
                "settings": run_set, "complete": False, "points": [],
            }
        todo.append(name)
    save_json_atomic(curves_path, data)
    if args.order == "interleaved":  # all models advance together: a stopped run stays a fair comparison
        steps = [(name, end) for end in chunk_ends for name in todo]
    else:
        steps = [(name, end) for name in todo for end in chunk_ends]

    def last_iter(name):
        pts = data["models"][name]["points"]
        return pts[-1]["iteration"] if pts else 0

    steps = [(name, end) for name, end in steps if end > last_iter(name)]
    t_all = time.time()
    piece = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
             "seconds": 0.0, "chunks": [], "stopped": "running"}
    if steps:
        data.setdefault("pieces", []).append(piece)
    longest = 0.0
    bar = tqdm(steps, desc="convergence", unit="chunk")
    for name, end in bar:
        entry = data["models"][name]
        if end <= last_iter(name):
            continue
        if piece["chunks"] and time.time() - t_all + longest > args.max_hours * 3600:  # >= 1 chunk per piece
            piece["stopped"] = "time limit"
            logger.info(f"[convergence] --max-hours {args.max_hours:g} reached: stopping before {name} -> it {end}; "
                        "run the same command again to continue")
            break
        t_chunk, begin = time.time(), last_iter(name)
        bar.set_postfix_str(f"{name}: training to it {end}")
        entry.setdefault("started", datetime.datetime.now().isoformat(timespec="seconds"))

        def on_point(point, entry=entry, name=name):
            entry["points"].append(point)
            entry["complete"] = point["iteration"] == args.max_iter
            if entry["complete"]:
                entry["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
            write_outputs(args.output, data, args.thresholds, plot=False)
            bar.set_postfix_str(f"{name}: it {point['iteration']} AP {_fmt(point['AP'])} AP50 {_fmt(point['AP50'])}")
            logger.info(f"[convergence] {name} it {point['iteration']}: AP {_fmt(point['AP'])} "
                        f"AP50 {_fmt(point['AP50'])} loss {_fmt(point['total_loss'], 3)} train {point['wall_s']:.0f} s")

        def on_built(params, entry=entry):
            entry["params"] = params

        last = entry["points"][-1] if entry["points"] else None
        try:
            train_chunk(args, name, eval_dataset, end, on_point, last, on_built)
        except ResumeError as e:
            logger.warning(f"{e}; training {name} again from iteration 0")
            entry["points"].clear()
            train_chunk(args, name, eval_dataset, end, on_point, None, on_built)
        longest = max(longest, time.time() - t_chunk)
        piece["chunks"].append(f"{name}: {begin} -> {end}")
        piece["seconds"] = round(time.time() - t_all, 1)
        write_outputs(args.output, data, args.thresholds)
    else:
        piece["stopped"] = "done"
    bar.close()
    if steps:
        piece["seconds"] = round(time.time() - t_all, 1)
        write_outputs(args.output, data, args.thresholds)

    print(f"\nconvergence piece {piece['stopped']} after {time.time() - t_all:.0f} s")
    for name in args.models:
        e = data["models"].get(name, {})
        last = e.get("points", [{}])[-1] if e.get("points") else {}
        print(f"  {name:12s} it {last.get('iteration', '-')}: AP {_fmt(last.get('AP'))} AP50 {_fmt(last.get('AP50'))}")
    for fname in ("curves.json", "curves.png", "table.md"):
        print(f"wrote {os.path.abspath(os.path.join(args.output, fname))}")
    print(f"checkpoints / logs: {os.path.abspath(args.work_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
