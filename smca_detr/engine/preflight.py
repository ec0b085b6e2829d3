"""Checks ``train_net.py`` runs before it launches anything, so that the two things a first run on a
new machine usually lacks stop it with one line each instead of a traceback from deep inside torch
or pycocotools:

* a CUDA ``MODEL.DEVICE`` (the default of every COCO config) on a machine without a usable CUDA
  GPU -> add ``MODEL.DEVICE cpu``;
* a dataset whose annotation file does not exist (COCO not downloaded, or ``DETECTRON2_DATASETS``
  not pointing at it) -> set ``DETECTRON2_DATASETS`` or use the embedded dataset's config.

``problems(cfg, eval_only)`` returns the messages (empty: nothing found); ``check_or_exit(args)``
reads the config of the command line and exits with them (status 2) when there are any.
"""
import os
import sys
from typing import List

import torch

__all__ = ["problems", "check_or_exit", "DEMO_CONFIG"]

# the embedded (generated on first use) dataset: needs no download and trains on a CPU
DEMO_CONFIG = "configs/demo/smca_r18_slim_synthetic.yaml"


def _device_problem(device: str) -> List[str]:
    try:
        dev = torch.device(device)
    except RuntimeError:
        return [f"MODEL.DEVICE {device!r} is not a torch device; use e.g. MODEL.DEVICE cuda or MODEL.DEVICE cpu"]
    if dev.type != "cuda":
        return []
    if not torch.cuda.is_available():
        return [f"MODEL.DEVICE is {device!r} but this machine has no usable CUDA GPU "
                "(torch.cuda.is_available() is False); add 'MODEL.DEVICE cpu' to the command line to run on the CPU"]
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        return [f"MODEL.DEVICE is {device!r} but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"]
    return []


def _dataset_problems(cfg, eval_only: bool) -> List[str]:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from ..data.synthetic import SPLITS as generated  # written on first use, never missing

    root = os.getenv("DETECTRON2_DATASETS", "datasets")
    under_root, elsewhere, seen = [], [], set()
    for key in (() if eval_only else ("TRAIN",)) + ("TEST",):
        for name in cfg.DATASETS.get(key, ()):
            if name in seen or name in generated or name not in DatasetCatalog.list():
                continue  # unregistered names are reported (with suggestions) by data.validation
            seen.add(name)
            json_file = MetadataCatalog.get(name).get("json_file", None)
            if not json_file or "://" in json_file or os.path.exists(json_file):
                continue
            rel = os.path.relpath(os.path.abspath(json_file), os.path.abspath(root))
            if rel.startswith(os.pardir):  # registered by the user with its own path
                elsewhere.append(f"DATASETS.{key} {name!r} needs {json_file}, which does not exist: register "
                                 "the dataset with the path of its annotation file")
            else:  # detectron2's builtin datasets (COCO, LVIS, ...) under $DETECTRON2_DATASETS
                under_root.append((key, name, rel))
    if not under_root:
        return elsewhere
    names = ", ".join(f"DATASETS.{key} {name!r}" for key, name, _ in under_root)
    files = ", ".join(rel for _, _, rel in under_root)
    return [f"{names}: no {files} under DETECTRON2_DATASETS={root!r}; set DETECTRON2_DATASETS to the folder "
            f"that contains them (see detectron2's datasets/README.md), or train on the embedded dataset: "
            f"--config-file {DEMO_CONFIG}"] + elsewhere


def problems(cfg, eval_only: bool = False) -> List[str]:
    """One message per problem found in ``cfg`` (a detectron2 config with the smca_detr keys)."""
    return _device_problem(str(cfg.MODEL.DEVICE)) + _dataset_problems(cfg, eval_only)


def check_or_exit(args) -> None:
    """``problems`` of the config named by ``args`` (``default_argument_parser``); print each as one
    line on stderr and exit with status 2 when there are any."""
    from ..config import config_from_args

    found = problems(config_from_args(args), eval_only=bool(getattr(args, "eval_only", False)))
    if found:
        for message in found:
            print(f"train_net.py: {message}", file=sys.stderr)
        sys.exit(2)
