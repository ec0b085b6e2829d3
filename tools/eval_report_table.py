#!/usr/bin/env python
"""The ``--eval-only`` evaluation + benchmark report of several models, as one Markdown table.

For every ``LABEL=CONFIG=WEIGHTS`` it runs ``train_net.py --config-file CONFIG --eval-only
MODEL.WEIGHTS WEIGHTS`` (its ``main``, in this process) (COCOEvaluator on cfg.DATASETS.TEST, then the benchmark report of
smca_detr/engine/report.py written to ``<work-dir>/<label>/inference/benchmark_report.json``) and
collects AP / AP50 / AP75, ms per image, images/s, peak memory, parameters and GFLOPs:

    python tools/eval_report_table.py --output docs/convergence/eval_reports.md \\
        "DETR=configs/convergence/detr.yaml=output/convergence/detr/model_final.pth" \\
        "SMCA=configs/convergence/smca.yaml=output/convergence/smca/model_final.pth" \\
        -- DATASETS.TEST "('smca_synthetic_val',)"

``WEIGHTS`` may be a directory holding a detectron2 ``last_checkpoint`` file (its latest checkpoint
is used). Config overrides after ``--`` apply to every model.
"""
import argparse
import json
import os
import platform
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def resolve_weights(weights: str) -> str:
    if os.path.isdir(weights):
        tag = os.path.join(weights, "last_checkpoint")
        if not os.path.isfile(tag):
            raise FileNotFoundError(f"{weights}: a directory without a last_checkpoint file")
        with open(tag) as f:
            return os.path.join(weights, f.read().strip())
    return weights


def parse_run(text: str):
    parts = text.split("=", 2)
    if len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=CONFIG=WEIGHTS")
    return tuple(parts)


def evaluate(label, config, weights, opts, work_dir):
    """``train_net.py --config-file CONFIG --eval-only ... MODEL.WEIGHTS WEIGHTS`` (its ``main``), then
    the AP of its results and the fields of the benchmark report it wrote."""
    from detectron2.engine import default_argument_parser

    import train_net
    from smca_detr.engine.report import REPORT_FILENAME

    weights = resolve_weights(weights)
    out = os.path.join(work_dir, label.replace(" ", "_").replace("/", "_"))
    args = default_argument_parser().parse_args(
        ["--config-file", config, "--eval-only", *map(str, opts), "MODEL.WEIGHTS", weights, "OUTPUT_DIR", out])
    results = train_net.main(args)
    report_path = os.path.join(out, "inference", REPORT_FILENAME)
    if not os.path.isfile(report_path):
        raise RuntimeError(f"{label}: the --eval-only run wrote no {report_path} (see its log for the warning)")
    with open(report_path) as f:
        report = json.load(f)
    bbox = results.get("bbox", {}) if results else {}
    return {"label": label, "config": os.path.relpath(config, REPO), "weights": weights,
            "dataset": report.get("dataset"), "AP": bbox.get("AP"), "AP50": bbox.get("AP50"),
            "AP75": bbox.get("AP75"), **{k: report[k] for k in (
                "ms_per_image", "images_per_s", "peak_memory_mb", "memory_method", "params_m", "gflops",
                "flops_input_hw", "device_name", "torch")}}


def to_markdown(rows):
    lines = ["| model | AP | AP50 | AP75 | ms / image | images / s | peak memory (MB) | params (M) | GFLOPs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['AP']:.2f} | {r['AP50']:.2f} | {r['AP75']:.2f} | {r['ms_per_image']:.1f} "
                     f"| {r['images_per_s']:.1f} | {r['peak_memory_mb']:.0f} | {r['params_m']:.2f} | {r['gflops']:.2f} |")
    r0 = rows[0] if rows else {}
    lines += ["", f"Dataset {r0.get('dataset')}; AP in COCO units (x100). Speed: pure model time after warm-up, "
                  f"batch 1, on {r0.get('device_name')} ({platform.processor() or platform.machine()}, "
                  f"torch {r0.get('torch')}); memory: {r0.get('memory_method')}; GFLOPs (fvcore, with the "
                  f"deformable-attention and SDPA handles) at input {r0.get('flops_input_hw')}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = []
    if "--" in argv:
        i = argv.index("--")
        argv, opts = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=parse_run, help="LABEL=CONFIG=WEIGHTS")
    ap.add_argument("--output", required=True, help="Markdown table; a .json with every field is written next to it")
    ap.add_argument("--work-dir", default=os.path.join("output", "eval_reports"))
    args = ap.parse_args(argv)
    if len(opts) % 2:
        ap.error("config overrides after -- must be KEY VALUE pairs")
    rows = [evaluate(label, config, weights, opts, args.work_dir) for label, config, weights in args.runs]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(to_markdown(rows))
    with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
        json.dump(rows, f, indent=2)
    print(to_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
