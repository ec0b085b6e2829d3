"""ONNX export of every smca_detr variant and an ONNX Runtime predictor (docs/EXPORT.md: the graph's
input, outputs, operators and metadata, how it is recorded, what the predictors accept).

    from smca_detr.export import export_onnx, OnnxPredictor
    export_onnx(model, "model.onnx")                 # model: a built SmcaDetrDetector (eval mode)
    predictor = OnnxPredictor("model.onnx")          # config and class names travel in the file
    instances = predictor(image_rgb)                 # detectron2 Instances in pixels of the image

``onnx`` and ``onnxruntime`` are optional dependencies (``pip install smca_detr[export]``), imported
only when needed.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .modeling.box_ops import box_cxcywh_to_xyxy
from .modeling.meta_arch import topk_detections


__all__ = ["OPSET", "ExportError", "OnnxDetector", "check_exportable", "export_onnx", "OnnxPredictor",
           "OnnxRuntimeModel", "instances_from_outputs", "network_image", "prepare_image", "resize_image",
           "resized_shape"]

# Opset 17: the first with LayerNormalization as a single standard operator (smaller, faster graph
# in ONNX Runtime), supported by every ONNX Runtime since 1.14; nothing newer is needed.
OPSET = 17
_META_KEY = "smca_detr"


class ExportError(RuntimeError):
    """A model or config that cannot be exported to ONNX (the message names the reason)."""


# ----------------------------------------------------------------------------------- image checks
def prepare_image(image, input_format: str = "RGB") -> np.ndarray:
    """Any image array a user may pass (channels in ``input_format`` order) -> ``HxWx3`` RGB, uint8
    or 0..255 float, or one ValueError naming what is wrong.

    * grayscale (``HxW`` or ``HxWx1``) is repeated to three channels; RGBA / BGRA (``HxWx4``) drops
      alpha;
    * a floating-point image whose values all lie in [0, 1] is taken as 0..1 intensities and scaled
      to 0..255 with a warning (detectron2 models read 0..255 pixel values);
    * an empty image (a side of 0 pixels) or another shape raises ValueError naming the shape.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an image of shape HxW, HxWx1, HxWx3 or HxWx4, got shape {tuple(image.shape)}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"empty image: size {image.shape[0]}x{image.shape[1]} (height x width) has no pixels")
    if image.dtype == np.bool_ or not (np.issubdtype(image.dtype, np.integer)
                                       or np.issubdtype(image.dtype, np.floating)):
        raise ValueError(f"expected an image of integer or floating-point pixels, got dtype {image.dtype}")
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ValueError("image has NaN or infinite pixel values")
        if image.max() <= 1.0 and image.min() >= 0.0:
            warnings.warn("floating-point image with values in [0, 1]: read as intensities and scaled to 0..255 "
                          "(the model expects 0..255 pixel values)", stacklevel=3)
            image = image * 255.0
    if input_format == "BGR":
        image = image[:, :, ::-1]
    elif input_format != "RGB":
        raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
    return image


def resized_shape(h: int, w: int, min_size: int, max_size: int) -> Tuple[int, int]:
    """detectron2's ``ResizeShortestEdge`` output size for the test sizes (``min_size`` 0: no
    resize), each side clamped to at least one pixel (a 2x3000 strip would otherwise round its short
    side to 0 once the long side is limited to ``max_size``)."""
    from detectron2.data import transforms as T

    if min_size <= 0:
        return h, w
    nh, nw = T.ResizeShortestEdge.get_output_shape(h, w, min_size, max_size)
    return max(1, nh), max(1, nw)


def resize_image(image: np.ndarray, min_size: int, max_size: int) -> np.ndarray:
    """detectron2's test resize (``ResizeShortestEdge``, PIL bilinear) with each side clamped to at
    least one pixel."""
    from detectron2.data import transforms as T

    h, w = image.shape[:2]
    nh, nw = resized_shape(h, w, min_size, max_size)
    if (nh, nw) == (h, w):
        return image
    return T.ResizeTransform(h, w, nh, nw).apply_image(image)


def network_image(image, input_format: str, model_format: str, min_size: int, max_size: int):
    """``image`` through :func:`prepare_image`, in the model's channel order ``model_format``, test
    resized: ``(HxWx3 array, height, width of the given image)`` (both predictors' input)."""
    image = prepare_image(image, input_format)
    if model_format == "BGR":
        image = image[:, :, ::-1]
    h, w = image.shape[:2]
    return resize_image(np.ascontiguousarray(image), min_size, max_size), h, w


# ----------------------------------------------------------------------------------- the graph
class OnnxDetector(nn.Module):
    """The exported computation: raw ``[B,3,H,W]`` images (0..255, model channel order) ->
    ``(boxes [B,K,4] xyxy in input pixels, scores [B,K], labels [B,K])``.

    Same maths as ``SmcaDetrDetector.forward`` on a batch of equally sized images: normalise, pad to
    the size divisibility with zeros, padding mask, backbone, transformer, heads, top-k."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        m = self.model
        x = (images.float() - m.pixel_mean) / m.pixel_std
        h, w = x.shape[-2], x.shape[-1]
        d = m.backbone.size_divisibility
        if d > 1:
            x = F.pad(x, [0, (d - w % d) % d, 0, (d - h % d) % d])
        # [B,2] (h, w) tensor: graph values under tracing (the transformers accept a tensor)
        image_sizes = torch.stack([torch.as_tensor(h), torch.as_tensor(w)])[None].expand(x.shape[0], 2)
        features, masks = m.backbone(x, image_sizes)  # the fused CPU path steps aside while tracing
        out = m.forward_features(features, masks, image_sizes)
        scores, labels, boxes = topk_detections(out["pred_logits"][-1], out["pred_boxes"][-1], m.test_topk, m.focal)
        scale = torch.stack([w, h, w, h]).to(boxes.dtype) if isinstance(w, torch.Tensor) else \
            torch.tensor([w, h, w, h], dtype=boxes.dtype)
        return box_cxcywh_to_xyxy(boxes) * scale, scores, labels


# ----------------------------------------------------------------------------------- export
def check_exportable(model: nn.Module) -> None:
    """Raise :class:`ExportError` naming the reason when ``model`` cannot be exported."""
    from detectron2.layers import DeformConv, ModulatedDeformConv

    if not all(hasattr(model, a) for a in ("backbone", "transformer", "heads", "pixel_mean", "focal")):
        raise ExportError(f"export_onnx needs an smca_detr SmcaDetrDetector, got {type(model).__name__}")
    for name, mod in model.named_modules():
        if isinstance(mod, (DeformConv, ModulatedDeformConv)):
            raise ExportError(
                f"{name} is a deformable convolution (MODEL.RESNETS.DEFORM_ON_PER_STAGE): detectron2's "
                "DeformConv is a compiled custom operator with no standard ONNX equivalent in the exporter; "
                "export a config without DCN")
    if model.training:
        raise ExportError("export_onnx needs the model in eval mode (model.eval())")


def _metadata(model, cfg) -> Dict[str, str]:
    meta = {"test_topk": int(model.test_topk), "size_divisibility": int(model.backbone.size_divisibility),
            "opset": OPSET}
    if cfg is not None:
        from .model_zoo.model_zoo import dataset_thing_classes

        meta.update(input_format=cfg.INPUT.FORMAT, min_size_test=int(cfg.INPUT.MIN_SIZE_TEST),
                    max_size_test=int(cfg.INPUT.MAX_SIZE_TEST), transformer=cfg.MODEL.SMCA_DETR.TRANSFORMER,
                    thing_classes=dataset_thing_classes(cfg))
    return {_META_KEY: json.dumps(meta)}


def export_onnx(model: nn.Module, path: Union[str, os.PathLike], cfg=None) -> str:
    """Export ``model`` (an eval-mode ``SmcaDetrDetector``) to the ONNX file ``path``; returns it.

    Args:
        cfg: the model's config (default ``model.cfg`` when set): its test resize, channel order and
            class names are stored in the file's metadata for :class:`OnnxPredictor`.
    """
    import onnx

    check_exportable(model)
    cfg = cfg if cfg is not None else getattr(model, "cfg", None)
    d = max(1, int(model.backbone.size_divisibility))
    # the traced dummy image is one pixel more than a multiple of the size divisibility in both
    # sides, so that the recorded graph contains the padding path (height and width are dynamic)
    sample_size = (2 * d + 1 if d > 1 else 65, 3 * d + 1 if d > 1 else 97)
    g = torch.Generator().manual_seed(0)
    dummy = torch.rand((1, 3, *sample_size), generator=g) * 255
    dummy = dummy.to(model.pixel_mean.device)
    wrapper = OnnxDetector(model).eval()
    path = os.fspath(path)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on shape checks and the exporter's deprecation notice
        torch.onnx.export(wrapper, (dummy,), path, dynamo=False, opset_version=OPSET, input_names=["images"],
                          output_names=["boxes", "scores", "labels"], do_constant_folding=True,
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                                        "boxes": {0: "batch"}, "scores": {0: "batch"}, "labels": {0: "batch"}})
    proto = onnx.load(path)
    bad = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if bad:
        raise ExportError(f"the exported graph uses non-standard operator domains {bad}")
    for k, v in _metadata(model, cfg).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, path)
    return path


# ----------------------------------------------------------------------------------- predictor
class OnnxPredictor:
    """Single-image inference with an exported model in ONNX Runtime, the counterpart of
    ``model_zoo.Predictor``: same test resize, same post-processing, same ``Instances``.

    Args:
        path: the ``.onnx`` file written by :func:`export_onnx`.
        cfg: optional config overriding the test resize / channel order stored in the file.
        threads: intra-op threads (default: ONNX Runtime's choice); when given, idle threads sleep
            instead of spin-waiting (fair timing next to other work).
        profile: file prefix of ONNX Runtime's operator profile (``session.end_profiling()``).

    ``predictor(image_or_path, input_format="RGB")`` -> ``Instances`` with ``pred_boxes`` (xyxy in
    pixels of the image), ``scores``, ``pred_classes``. Accepts a file path, ``HxW`` / ``HxWx1``
    grayscale, ``HxWx3`` or ``HxWx4`` arrays (uint8, or float 0..255; float 0..1 is scaled with a
    warning) - see :func:`prepare_image`.
    """

    def __init__(self, path: Union[str, os.PathLike], cfg=None, threads: Optional[int] = None, profile: str = ""):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only (not the shape-inference notes on Identity nodes)
        if threads:  # no busy-waiting threads between runs (they would slow whatever runs next)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.intra_op_num_threads = int(threads)
        if profile:  # ONNX Runtime's per-operator profile, written by session.end_profiling()
            opts.enable_profiling = True
            opts.profile_file_prefix = profile
        self.path = os.fspath(path)
        self.session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
        meta = json.loads(self.session.get_modelmeta().custom_metadata_map.get(_META_KEY, "{}"))
        self.input_format = cfg.INPUT.FORMAT if cfg is not None else meta.get("input_format", "BGR")
        self.min_size = int(cfg.INPUT.MIN_SIZE_TEST) if cfg is not None else int(meta.get("min_size_test", 0))
        self.max_size = int(cfg.INPUT.MAX_SIZE_TEST) if cfg is not None else int(meta.get("max_size_test", 0))
        self.thing_classes = meta.get("thing_classes")
        if cfg is not None:
            from .model_zoo.model_zoo import dataset_metadata

            self.metadata = dataset_metadata(cfg)
        else:  # class names stored in the file
            from detectron2.data.catalog import Metadata

            self.metadata = Metadata(name=os.path.basename(os.fspath(path)), thing_classes=self.thing_classes) \
                if self.thing_classes else None

    def network_input(self, image, input_format: str = "RGB") -> Tuple[np.ndarray, int, int]:
        """``([1,3,h,w] float32 in the model's channel order, resized), original height, width``."""
        if isinstance(image, (str, os.PathLike)):
            from .utils.images import read_image

            image, input_format = read_image(image, format="RGB"), "RGB"
        image, h, w = network_image(image, input_format, self.input_format, self.min_size, self.max_size)
        return np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32), h, w

    def run(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        """Raw graph outputs for a ``[B,3,H,W]`` float32 network input."""
        boxes, scores, labels = self.session.run(None, {"images": images})
        return {"boxes": boxes, "scores": scores, "labels": labels}

    def __call__(self, image, input_format: str = "RGB"):
        x, h, w = self.network_input(image, input_format)
        return instances_from_outputs(self.run(x), 0, x.shape[-2:], h, w)

    def predict_batch(self, images, input_format: str = "RGB"):
        """``Instances`` of several images (one graph run each: their sizes differ)."""
        return [self(im, input_format) for im in images]


def instances_from_outputs(out: Dict[str, np.ndarray], i: int, input_hw, height: int, width: int):
    """Image ``i`` of the graph outputs -> ``Instances`` in pixels of a ``height x width`` image, with
    the PyTorch model's ``detector_postprocess`` (rescale, clip, drop empty boxes)."""
    from detectron2.modeling import detector_postprocess
    from detectron2.structures import Boxes, Instances

    res = Instances(tuple(int(v) for v in input_hw))
    res.pred_boxes = Boxes(torch.from_numpy(np.asarray(out["boxes"][i])))
    res.scores = torch.from_numpy(np.asarray(out["scores"][i]))
    res.pred_classes = torch.from_numpy(np.asarray(out["labels"][i]))
    return detector_postprocess(res, height, width)


class OnnxRuntimeModel(nn.Module):
    """An exported model behind detectron2's model interface (``list[dict]`` of mapped inputs ->
    ``[{"instances": ...}]``), for ``inference_on_dataset`` / ``COCOEvaluator``. ``inputs["image"]``
    is the mapper's resized ``CHW`` tensor in the model's channel order."""

    def __init__(self, predictor: "OnnxPredictor"):
        super().__init__()
        self.predictor = predictor

    def forward(self, batched_inputs: List[dict]):
        results = []
        for inp in batched_inputs:
            x = inp["image"][None].float().cpu().numpy()
            h, w = inp.get("height", x.shape[2]), inp.get("width", x.shape[3])
            results.append({"instances": instances_from_outputs(self.predictor.run(x), 0, x.shape[-2:], h, w)})
        return results
