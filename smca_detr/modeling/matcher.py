"""Hungarian matcher shared by every variant (one-to-one assignment of queries to targets).

Cost = w_class · C_class + w_bbox · L1(cxcywh) + w_giou · (-GIoU). C_class is ``-p[label]`` for
softmax models and the focal-style ``α(1-p)^γ(-log p) - (1-α)p^γ(-log(1-p))`` for sigmoid models.
Costs are computed in float32 with autocast off, and non-finite predictions are reported instead of
being handed to ``linear_sum_assignment`` (which would say "cost matrix is infeasible").
"""
from typing import Dict, List, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher", "current_iteration"]


def current_iteration():
    """The detectron2 training iteration if an EventStorage is active, else None."""
    try:
        from detectron2.utils.events import get_event_storage

        return get_event_storage().iter
    except (AssertionError, ImportError):
        return None


def _diverged(what: str):
    it = current_iteration()
    where = f"at iteration {it}" if it is not None else "(outside training)"
    raise FloatingPointError(
        f"HungarianMatcher: {what} {where}; training diverged (try a lower SOLVER.BASE_LR, "
        "SOLVER.CLIP_GRADIENTS, or SOLVER.AMP.PRECISION='bfloat16')")


def _autocast_off(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


class HungarianMatcher(nn.Module):
    def __init__(self, *, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal: bool = False, focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("MODEL.SMCA_DETR.COST_CLASS/COST_BBOX/COST_GIOU cannot all be 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal = focal
        self.alpha = focal_alpha
        self.gamma = focal_gamma

    def class_cost(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.focal:
            p = logits.sigmoid()
            neg = (1 - self.alpha) * p.pow(self.gamma) * -(1 - p + 1e-8).log()
            pos = self.alpha * (1 - p).pow(self.gamma) * -(p + 1e-8).log()
            return pos[:, labels] - neg[:, labels]
        return -logits.softmax(-1)[:, labels]

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, boxes: torch.Tensor,
                targets: List[Dict[str, torch.Tensor]]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """logits ``[B,Q,C]``, boxes ``[B,Q,4]`` (cxcywh, normalised), targets with "labels" and
        "boxes" -> per image ``(query_idx, target_idx)`` int64 tensors, sorted by query."""
        bs, nq = logits.shape[:2]
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in targets]
        with _autocast_off(logits.device.type):
            # half / bfloat16 -> float32; float64 (parity runs) stays float64
            work = torch.float64 if logits.dtype == torch.float64 else torch.float32
            out_logits = logits.flatten(0, 1).to(work)
            out_boxes = boxes.flatten(0, 1).to(work)
            if not (torch.isfinite(out_logits).all() and torch.isfinite(out_boxes).all()):
                _diverged("the model predicted non-finite class logits or boxes")
            tgt_labels = torch.cat([t["labels"] for t in targets]).to(logits.device)
            tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(logits.device, work)
            cost = (
                self.cost_class * self.class_cost(out_logits, tgt_labels)
                + self.cost_bbox * torch.cdist(out_boxes, tgt_boxes, p=1)
                - self.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(out_boxes),
                                                       box_cxcywh_to_xyxy(tgt_boxes))
            )
            if not torch.isfinite(cost).all():
                _diverged("the matching cost is non-finite (degenerate predicted boxes)")
        cost = cost.view(bs, nq, -1).cpu()
        indices = []
        for i, c in enumerate(cost.split(sizes, -1)):
            if sizes[i] == 0:
                indices.append((empty, empty))
                continue
            rows, cols = linear_sum_assignment(c[i].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64),
                            torch.as_tensor(np.asarray(cols), dtype=torch.int64)))
        return indices
