"""The command line of the official-checkpoint converters (``tools/convert_*.py`` are thin wrappers).

    run_converter("conditional", convert_official_conditional_detr, argv, description=__doc__)

Every family: ``input output [--keep-all-classes]``. The input is loaded once with
:func:`~smca_detr.checkpoint.safe_load.safe_torch_load` (``torch.load(weights_only=True)`` with the
allow-list: tensors and ``argparse.Namespace`` only) and split into the official state dict and its
``args``; the converted state dict is saved as a detectron2 checkpoint ``{"model": ...,
"__author__": ..., "matching_heuristics": False}`` (parent folders created) for ``MODEL.WEIGHTS``.
Per family (:data:`FAMILIES`):

* ``conditional`` / ``deformable``: ``--config FILE [--opts KEY VALUE ...]`` also builds the model of
  that config on CPU and loads the converted weights strictly into it before writing;
* ``smca``: ``--kind KIND`` (detected from the keys by default); the config overrides implied by the
  official ``args`` are printed after the summary.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch

from .safe_load import safe_torch_load
from .smca import SMCA_CONVERSION_RULES, detect_smca_kind, official_args_summary, split_official_checkpoint

__all__ = ["ConverterFamily", "FAMILIES", "build_parser", "run_converter", "num_class_logits", "verify_with_config"]


def num_class_logits(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Rows of the converted class head (one shared head, or per decoder layer: ``class_embed.0``)."""
    key = "heads.class_embed.weight" if "heads.class_embed.weight" in state_dict else "heads.class_embed.0.weight"
    return state_dict[key].shape[0]


def verify_with_config(state_dict, config: str, opts: Sequence[str] = (), keep_all_classes: bool = False):
    """Build the model of ``config`` (+ ``opts``) on CPU and load ``state_dict`` strictly into it
    (``NUM_CLASSES`` follows the head when ``keep_all_classes``). Returns the config."""
    from detectron2.modeling import build_model

    from ..model_zoo import get_config

    cfg = get_config(config, list(opts))
    if keep_all_classes:
        cfg.MODEL.SMCA_DETR.NUM_CLASSES = num_class_logits(state_dict)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    model.load_state_dict(state_dict, strict=True)
    return cfg


# ------------------------------------------------------------------------------------ families
def _summary_tensors(args, official, converted, kind) -> str:
    return f"wrote {args.output}: {len(converted)} tensors, {num_class_logits(converted)} class logits"


def _summary_deformable(args, official, converted, kind) -> str:
    from .deformable import variant_name

    return f"{_summary_tensors(args, official, converted, kind)}, variant: {variant_name(official)}"


def _summary_smca(args, official, converted, kind) -> str:
    n = sum(v.numel() for v in converted.values())
    return (f"{args.input}: {len(official)} official keys ({kind}) -> {args.output}: {len(converted)} keys, "
            f"{n:,} values{'' if args.keep_all_classes else ', class head 92 -> 80 COCO rows'}")


@dataclass(frozen=True)
class ConverterFamily:
    """What differs between the converters of the model families."""

    author: str  # "__author__" of the written checkpoint
    keep_all_classes_help: str
    summary: Callable  # (args, official state dict, converted state dict, kind) -> the last line printed
    verify: bool = False  # --config / --opts: strict load into a model built from a config
    kinds: Optional[Callable[[], str]] = None  # --kind (its help); the converter then takes kind=
    detect_kind: Optional[Callable] = None  # official state dict -> kind, when --kind is not given
    implied_config: Optional[Callable] = None  # official args -> {config key: value}, printed


FAMILIES: Dict[str, ConverterFamily] = {
    "smca": ConverterFamily(
        author="official SMCA-DETR (converted by smca_detr)",
        keep_all_classes_help="keep all 92 official class rows instead of the 80 COCO classes",
        summary=_summary_smca, detect_kind=detect_smca_kind, implied_config=official_args_summary,
        kinds=lambda: f"one of {sorted(SMCA_CONVERSION_RULES)}"),
    "conditional": ConverterFamily(
        author="smca_detr convert_conditional_detr",
        keep_all_classes_help="keep all official class logits instead of the 80 COCO classes",
        summary=_summary_tensors, verify=True),
    "deformable": ConverterFamily(
        author="smca_detr convert_deformable_detr",
        keep_all_classes_help="keep all official class logits instead of the 80 COCO classes",
        summary=_summary_deformable, verify=True),
}


# ------------------------------------------------------------------------------------ command line
def build_parser(family: str, description: Optional[str] = None) -> argparse.ArgumentParser:
    fam = FAMILIES[family]
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="official checkpoint (.pth: {'model': state_dict, ...} or a state dict)")
    ap.add_argument("output", help="converted checkpoint (.pth, {'model': state_dict})")
    ap.add_argument("--keep-all-classes", action="store_true", help=fam.keep_all_classes_help)
    if fam.verify:
        ap.add_argument("--config", default=None,
                        help="optional config to verify the result: builds the model and loads strictly")
        ap.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides (KEY VALUE ...) for --config")
    if fam.kinds is not None:
        ap.add_argument("--kind", default=None, help=f"model kind (default: detected); {fam.kinds()}")
    return ap


def run_converter(family: str, convert_fn: Callable, argv: Optional[Sequence[str]] = None,
                  description: Optional[str] = None) -> int:
    """Parse ``argv`` (``sys.argv[1:]`` when None), convert, optionally verify, write, print a summary.

    ``convert_fn(official_state_dict, keep_all_classes=..., [kind=...])`` is the family's library
    converter. Returns 0 (errors raise: an unsafe file, unknown keys, a failed strict load)."""
    if family not in FAMILIES:
        raise KeyError(f"unknown converter family {family!r}; known: {sorted(FAMILIES)}")
    fam = FAMILIES[family]
    args = build_parser(family, description).parse_args(argv)
    official, official_args = split_official_checkpoint(safe_torch_load(args.input))
    kwargs, kind = {}, None
    if fam.kinds is not None:
        kind = args.kind or fam.detect_kind(official)
        kwargs["kind"] = kind
    converted = convert_fn(official, keep_all_classes=args.keep_all_classes, **kwargs)
    if getattr(args, "config", None):
        verify_with_config(converted, args.config, args.opts, args.keep_all_classes)
        print(f"verified: loads strictly into {args.config}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save({"model": converted, "__author__": fam.author, "matching_heuristics": False}, args.output)
    print(fam.summary(args, official, converted, kind))
    implied = fam.implied_config(official_args) if fam.implied_config is not None else {}
    if implied:
        print("official args imply:")
        for k, v in implied.items():
            print(f"  {k}: {v!r}")
    return 0
