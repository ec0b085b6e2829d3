"""The one meta-architecture of smca_detr: backbone adapter -> registered transformer -> shared
heads -> registered set criterion (training) or top-k post-processing (inference).

Every variant (DETR, SMCA-DETR, Conditional DETR, Deformable DETR) is this class with another
``MODEL.SMCA_DETR.TRANSFORMER``; the variants differ only inside their transformer.
"""
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

from .backbone import DetrBackbone, resize_mask
from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from .criterion import build_criterion
from .heads import PredictionHeads
from .registry import TRANSFORMER_REGISTRY
from .transformers.common import DetrTransformerBase

__all__ = ["SmcaDetrDetector", "build_transformer", "topk_detections"]


def build_transformer(cfg, input_shapes):
    name = cfg.MODEL.SMCA_DETR.TRANSFORMER
    if name not in TRANSFORMER_REGISTRY:
        raise KeyError(
            f"MODEL.SMCA_DETR.TRANSFORMER={name!r} is not registered; available: "
            f"{sorted(n for n, _ in TRANSFORMER_REGISTRY)}")
    return TRANSFORMER_REGISTRY.get(name)(cfg, input_shapes)


@META_ARCH_REGISTRY.register()
class SmcaDetrDetector(nn.Module):
    @configurable
    def __init__(self, *, backbone: DetrBackbone, transformer: DetrTransformerBase, heads: PredictionHeads,
                 criterion: nn.Module, focal: bool, test_topk: int, pixel_mean, pixel_std):
        """
        Args:
            backbone: adapter returning feature levels and their padding masks.
            transformer: a TRANSFORMER_REGISTRY module (the contract: ``DetrTransformerBase``).
            heads: class / box heads.
            criterion: a CRITERION_REGISTRY module (matcher + losses).
            focal: sigmoid scores (focal-loss variants) instead of softmax with "no object".
            test_topk: detections kept per image.
            pixel_mean, pixel_std: input normalisation (RGB, 0..255 scale).
        """
        super().__init__()
        self.backbone = backbone
        self.transformer = transformer
        self.heads = heads
        self.criterion = criterion
        self.focal = focal
        self.test_topk = test_topk
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)
        transformer.init_heads(heads)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.SMCA_DETR
        if c.CLASS_LOSS not in ("softmax", "focal"):
            raise ValueError(f"MODEL.SMCA_DETR.CLASS_LOSS must be 'softmax' or 'focal', got {c.CLASS_LOSS!r}")
        if c.HIDDEN_DIM % c.NHEADS != 0:
            raise ValueError(
                f"MODEL.SMCA_DETR.NHEADS={c.NHEADS} must divide MODEL.SMCA_DETR.HIDDEN_DIM={c.HIDDEN_DIM}")
        if c.NUM_CLASSES < 1:
            raise ValueError(f"MODEL.SMCA_DETR.NUM_CLASSES must be >= 1, got {c.NUM_CLASSES}")
        backbone = DetrBackbone(cfg, c.IN_FEATURES)
        transformer = build_transformer(cfg, backbone.output_shapes)
        focal = c.CLASS_LOSS == "focal"
        heads = PredictionHeads(hidden_dim=c.HIDDEN_DIM, num_logits=c.NUM_CLASSES if focal else c.NUM_CLASSES + 1,
                                num_sets=transformer.num_head_sets, per_layer=transformer.per_layer_heads,
                                focal_prior=c.FOCAL_PRIOR if focal else None, zero_init_box=transformer.zero_init_box)
        return {
            "backbone": backbone,
            "transformer": transformer,
            "heads": heads,
            "criterion": build_criterion(cfg),
            "focal": focal,
            "test_topk": cfg.MODEL.SMCA_DETR.TEST_TOPK,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    # ------------------------------------------------------------------ core
    def forward_features(self, features: List[torch.Tensor], masks: List[torch.Tensor],
                         image_sizes) -> Dict:
        """Backbone levels and their masks -> ``{"pred_logits" [L,B,Q,C], "pred_boxes" [L,B,Q,4],
        "enc_outputs" (two-stage), "extras"}``. ``image_sizes``: unpadded (h, w) per image."""
        out = self.transformer(features, masks, image_sizes, self.heads)
        logits, boxes = self.heads(out.hs, out.references)
        result = {"pred_logits": logits, "pred_boxes": boxes, "extras": out.extras}
        if out.enc_outputs is not None:
            result["enc_outputs"] = out.enc_outputs
        return result

    def forward_from_features(self, features: List[torch.Tensor], image_mask: torch.Tensor,
                              image_sizes=None) -> Dict:
        """Entry point without the backbone (parity tests): masks are the image mask resized to each
        level, unpadded sizes are read off the mask when not given."""
        if image_sizes is None:
            valid = ~image_mask
            image_sizes = [(int(v.any(1).sum()), int(v.any(0).sum())) for v in valid]
        masks = [resize_mask(image_mask, f.shape[-2:]) for f in features]
        return self.forward_features(features, masks, image_sizes)

    def preprocess_image(self, batched_inputs) -> ImageList:
        """Normalised images, zero-padded to a common size divisible by the backbone's largest
        stride (as ``ImageList.from_tensors``, whose size arithmetic on tensors would read values
        back from them; here it is done on the host)."""
        images = [(x["image"].to(self.device, non_blocking=True) - self.pixel_mean) / self.pixel_std
                  for x in batched_inputs]
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        div = max(int(self.backbone.size_divisibility), 1)
        padded_hw = [-(-max(size[d] for size in sizes) // div) * div for d in (0, 1)]
        batch = images[0].new_zeros((len(images), images[0].shape[0], *padded_hw))
        for img, pad, (h, w) in zip(images, batch, sizes):
            pad[:, :h, :w].copy_(img)
        return ImageList(batch, sizes)

    def forward(self, batched_inputs: List[Dict]):
        images = self.preprocess_image(batched_inputs)
        features, masks = self.backbone(images.tensor, images.image_sizes)
        out = self.forward_features(features, masks, images.image_sizes)
        if self.training:
            targets = self.prepare_targets(batched_inputs, images.image_sizes)
            return self.criterion(out, targets)
        results = self.inference(out["pred_logits"][-1], out["pred_boxes"][-1], images.image_sizes)
        processed = []
        for res, inp, size in zip(results, batched_inputs, images.image_sizes):
            h = inp.get("height", size[0])
            w = inp.get("width", size[1])
            processed.append({"instances": detector_postprocess(res, h, w)})
        return processed

    # ------------------------------------------------------------------ helpers
    def prepare_targets(self, batched_inputs, image_sizes) -> List[Dict[str, torch.Tensor]]:
        """detectron2 ``Instances`` -> ``{"labels", "boxes"}`` with cxcywh boxes normalised by the
        unpadded image size."""
        targets = []
        for x, (h, w) in zip(batched_inputs, image_sizes):
            inst = x["instances"]
            boxes = inst.gt_boxes.tensor.to(self.device, torch.float32, non_blocking=True)
            labels = inst.gt_classes.to(self.device, torch.int64, non_blocking=True)
            boxes = boxes / _xyxy_scale(w, h, boxes)
            targets.append({"labels": labels, "boxes": box_xyxy_to_cxcywh(boxes)})
        return targets

    @torch.no_grad()
    def inference(self, logits: torch.Tensor, boxes: torch.Tensor, image_sizes) -> List[Instances]:
        """Top-k detections per image, boxes in absolute xyxy of the network input."""
        scores, labels, sel_boxes = topk_detections(logits, boxes, self.test_topk, self.focal)
        results = []
        for i, (h, w) in enumerate(image_sizes):
            res = Instances((h, w))
            xyxy = box_cxcywh_to_xyxy(sel_boxes[i]) * _xyxy_scale(w, h, boxes)
            res.pred_boxes = Boxes(xyxy)
            res.scores = scores[i]
            res.pred_classes = labels[i]
            results.append(res)
        return results



def topk_detections(logits: torch.Tensor, boxes: torch.Tensor, topk: int, focal: bool):
    """``(scores, labels, cxcywh boxes)`` ``[B,K]`` of the top ``topk`` detections per image of
    ``logits [B,Q,C]`` / ``boxes [B,Q,4]``: over all (query, class) pairs (focal), or of the queries'
    best class without "no object" (softmax). Shared with the ONNX graph (``smca_detr.export``)."""
    logits, boxes = logits.float(), boxes.float()
    nq, nc = int(logits.shape[1]), int(logits.shape[2])
    if focal:
        scores, idx = logits.sigmoid().flatten(1).topk(min(topk, nq * nc), dim=1)
        query = torch.div(idx, nc, rounding_mode="floor")
        labels = idx % nc
    else:
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)
        scores, query = scores.topk(min(topk, nq), dim=1)
        labels = labels.gather(1, query)
    return scores, labels, boxes.gather(1, query[..., None].expand(-1, -1, 4))


def _xyxy_scale(w, h, like: torch.Tensor) -> torch.Tensor:
    """``[w, h, w, h]`` on ``like``'s device and dtype, filled there (no host-to-device copy)."""
    scale = like.new_full((4,), float(w))
    scale[1::2] = float(h)
    return scale
