"""Shipped configs by name, models built from them (optionally with official or our weights), and a
small predictor for single images.

    from smca_detr import model_zoo
    model_zoo.list_configs()                       # ["conditional_detr_r101", ..., "smca_r50", ...]
    cfg = model_zoo.get_config("smca_r50")         # CfgNode with every smca_detr key
    model = model_zoo.build_model_from_config("deformable_detr_r50", weights="r50_deformable_detr-checkpoint.pth")
    predictor = model_zoo.Predictor(cfg)           # cfg.MODEL.WEIGHTS is loaded
    instances = predictor(image_rgb)               # detectron2 Instances in image pixels

Configs are found in the package (``smca_detr/model_zoo/configs``, a link to the repository's
``configs/`` that setup.py ships as package data) or, failing that, in the ``configs/`` directory
next to the package (a source checkout).
"""
import os
import re
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["list_configs", "get_config_file", "get_config", "inference_config", "build_model_from_config",
           "dataset_thing_classes", "dataset_metadata", "is_imagenet_backbone", "load_weights", "Predictor"]

_MARKER = "Base-DETR.yaml"  # a configs/ directory is ours when it has this file


def _config_roots() -> List[Path]:
    here = Path(__file__).resolve().parent
    candidates = [here / "configs", here.parent.parent / "configs"]
    roots = []
    for c in candidates:
        if (c / _MARKER).is_file() and c.resolve() not in [r.resolve() for r in roots]:
            roots.append(c)
    return roots


def list_configs() -> List[str]:
    """Names of the shipped configs (``configs/<name>.yaml`` without ``Base-*``), sorted; names of
    configs in sub-directories use ``/`` (``demo/detr_r18_synthetic``)."""
    names = set()
    for root in _config_roots():
        for p in root.rglob("*.yaml"):
            if p.name.startswith("Base-"):
                continue
            names.add(p.relative_to(root).with_suffix("").as_posix())
    return sorted(names)


def get_config_file(name: str) -> str:
    """Path of ``configs/<name>.yaml`` (``name`` with or without ``.yaml``; an existing file path is
    returned as is). Raises FileNotFoundError naming the available configs."""
    if os.path.isfile(name):
        return os.path.abspath(name)
    rel = name if name.endswith(".yaml") else name + ".yaml"
    roots = _config_roots()
    for root in roots:
        p = root / rel
        if p.is_file():
            return str(p)
    where = ", ".join(str(r) for r in roots) or "no configs directory found"
    raise FileNotFoundError(f"no config {name!r} in {where}; available: {list_configs()}")


def get_config(name: str, opts: Sequence = ()):
    """detectron2 CfgNode: defaults + smca_detr keys + ``configs/<name>.yaml`` + ``opts``
    (``[KEY, VALUE, ...]``); not frozen."""
    from argparse import Namespace

    from ..config import config_from_args

    return config_from_args(Namespace(config_file=get_config_file(name), opts=[str(o) for o in opts]))


def inference_config(name: str, opts: Sequence = ()):
    """Frozen config for inference tools: like :func:`get_config`, but ``MODEL.DEVICE`` falls back
    to ``cpu`` when CUDA is not available, and a warning says when ``MODEL.WEIGHTS`` is only the
    ImageNet backbone of a training recipe (the detector itself would be untrained)."""
    import logging

    log = logging.getLogger(__name__)
    cfg = get_config(name, opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        log.info("CUDA is not available: running on CPU (MODEL.DEVICE cpu)")
        cfg.MODEL.DEVICE = "cpu"
    if is_imagenet_backbone(cfg.MODEL.WEIGHTS):
        log.warning(f"MODEL.WEIGHTS={cfg.MODEL.WEIGHTS} is the ImageNet backbone of the training recipe: the "
                    "detector itself is untrained. Pass MODEL.WEIGHTS <checkpoint> (e.g. --opts MODEL.WEIGHTS ...).")
    cfg.freeze()
    return cfg


def is_imagenet_backbone(weights: str) -> bool:
    """Whether ``weights`` names an ImageNet backbone of the training recipes: detectron2's
    ``ImageNetPretrained/...`` or a torchvision ``resnet<depth>-<hash>.pth`` (path or URL)."""
    return "ImageNetPretrained" in weights or bool(re.search(r"(^|/)resnet\d+-[0-9a-f]+\.pth$", weights))


def dataset_metadata(cfg):
    """detectron2 Metadata of the first test dataset (else the first training dataset), or None."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for name in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        if name in MetadataCatalog.list() or name in DatasetCatalog.list():
            return MetadataCatalog.get(name)
    return None


def dataset_thing_classes(cfg) -> Optional[List[str]]:
    """Class names of the config's dataset (test first, then train), or None when unknown."""
    meta = dataset_metadata(cfg)
    classes = meta.get("thing_classes", None) if meta is not None else None
    return list(classes) if classes else None


def load_weights(model: torch.nn.Module, weights: str, cfg=None) -> dict:
    """Load ``weights`` (our checkpoint, a detectron2 one, an official SMCA / Conditional /
    Deformable DETR checkpoint or a torchvision ResNet; local path or URL) into ``model`` with
    ``SmcaDetrCheckpointer``.
    Returns what the checkpointer returns (``"__official_format__"`` names a converted format)."""
    from ..checkpoint import SmcaDetrCheckpointer

    ckpt = SmcaDetrCheckpointer(model)
    if cfg is not None:
        ckpt.thing_classes = dataset_thing_classes(cfg)
    return ckpt.load(weights)


def build_model_from_config(name: str, weights: Optional[str] = None, device: str = "cpu",
                            opts: Iterable = ()) -> torch.nn.Module:
    """Build the model of ``configs/<name>.yaml`` (+ ``opts``) on ``device``, in eval mode.

    ``weights``: None builds a randomly initialised model (the configs' ``MODEL.WEIGHTS`` is the
    ImageNet backbone used for training and is *not* loaded); otherwise a path or URL of our
    checkpoint or an official checkpoint, converted on load. The config is attached as
    ``model.cfg``.
    """
    from detectron2.modeling import build_model

    cfg = get_config(name, list(opts) + ["MODEL.DEVICE", device, "MODEL.WEIGHTS", weights or ""])
    model = build_model(cfg)
    if weights:
        load_weights(model, weights, cfg)
    model.eval()
    model.cfg = cfg
    return model


class Predictor:
    """Single-image inference with a smca_detr model.

    Args:
        cfg: the model's config. Test resize: ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` (0 = keep
            the image size); the model's channel order is ``INPUT.FORMAT``.
        model: an already built model (used as is); otherwise one is built from ``cfg`` and
            ``cfg.MODEL.WEIGHTS`` is loaded when set.

    ``predictor(image, input_format="RGB")`` -> ``Instances`` (CPU) in pixels of ``image``.
    ``image``: ``HxWx3`` uint8 (or float 0..255); grayscale ``HxW`` / ``HxWx1`` and RGBA ``HxWx4``
    arrays are converted, a float image in [0, 1] is scaled to 0..255 with a warning, an empty image
    raises ValueError (``smca_detr.export.prepare_image``). Very elongated images (a 2x3000 strip)
    are resized with each side at least one pixel. ``predictor.inputs(image)`` gives the model
    input dict.
    """

    def __init__(self, cfg, model: Optional[torch.nn.Module] = None):
        from detectron2.modeling import build_model

        self.cfg = cfg.clone()
        if model is None:
            model = build_model(self.cfg)
            if self.cfg.MODEL.WEIGHTS:
                load_weights(model, self.cfg.MODEL.WEIGHTS, self.cfg)
        self.model = model.eval()
        self.metadata = dataset_metadata(self.cfg)
        self.input_format = self.cfg.INPUT.FORMAT
        self.min_size, self.max_size = self.cfg.INPUT.MIN_SIZE_TEST, self.cfg.INPUT.MAX_SIZE_TEST

    @property
    def device(self):
        return next(self.model.parameters()).device

    def inputs(self, image, input_format: str = "RGB") -> dict:
        """The model input dict (``image`` CHW float tensor in the model's format, resized;
        ``height``/``width`` of the given image) for an image array (see ``__call__``)."""
        from ..export import network_image

        # (a ValueError names what is wrong with the image)
        image, h, w = network_image(image, input_format, self.input_format, self.min_size, self.max_size)
        tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
        return {"image": tensor, "height": h, "width": w}

    @torch.no_grad()
    def __call__(self, image: np.ndarray, input_format: str = "RGB"):
        return self.predict_batch([image], input_format)[0]

    @torch.no_grad()
    def predict_batch(self, images: Sequence[np.ndarray], input_format: str = "RGB"):
        """Instances (CPU) of several images in one forward pass."""
        outputs = self.model([self.inputs(im, input_format) for im in images])
        return [o["instances"].to("cpu") for o in outputs]
