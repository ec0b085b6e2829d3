"""Hungarian matcher shared by every variant (one-to-one assignment of queries to targets).

Cost = w_class · C_class + w_bbox · L1(cxcywh) + w_giou · (-GIoU). C_class is ``-p[label]`` for
softmax models and the focal-style ``α(1-p)^γ(-log p) - (1-α)p^γ(-log(1-p))`` for sigmoid models.
Costs are computed in float32 with autocast off, and non-finite predictions are reported instead of
being handed to ``linear_sum_assignment`` (which would say "cost matrix is infeasible"). The costs of
all matched layers reach the host in one transfer (``match_many``), checked for finiteness there.
"""
from typing import Dict, List, Tuple

import numpy as np
import torch
from detectron2.utils.events import get_event_storage
from scipy.optimize import linear_sum_assignment
from torch import nn

from .blocks import autocast_off
from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher"]


def _diverged(what: str):
    try:
        where = f"at iteration {get_event_storage().iter}"
    except AssertionError:  # no active EventStorage
        where = "(outside training)"
    raise FloatingPointError(
        f"HungarianMatcher: {what} {where}; training diverged (try a lower SOLVER.BASE_LR, "
        "SOLVER.CLIP_GRADIENTS, or SOLVER.AMP.PRECISION='bfloat16')")


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
    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor,
                    targets: List[Dict[str, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """On the predictions' device, without a host synchronisation: the matching cost ``[B,Q,T]``
        (T = all targets of the batch) and a scalar flag, nonzero if a prediction is non-finite."""
        bs, nq = logits.shape[:2]
        with autocast_off(logits.device.type):
            # half / bfloat16 -> float32; float64 (parity runs) stays float64
            work = torch.float64 if logits.dtype == torch.float64 else torch.float32
            out_logits = logits.flatten(0, 1).to(work)
            out_boxes = boxes.flatten(0, 1).to(work)
            bad_prediction = ~(torch.isfinite(out_logits).all() & torch.isfinite(out_boxes).all())
            tgt_labels = torch.cat([t["labels"] for t in targets]).to(logits.device, non_blocking=True)
            tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(logits.device, work, non_blocking=True)
            cost = (
                self.cost_class * self.class_cost(out_logits, tgt_labels)
                + self.cost_bbox * torch.cdist(out_boxes, tgt_boxes, p=1)
                - self.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(out_boxes),
                                                       box_cxcywh_to_xyxy(tgt_boxes))
            )
        return cost.view(bs, nq, -1), bad_prediction

    @torch.no_grad()
    def match_many(self, layers) -> List[List[Tuple[torch.Tensor, torch.Tensor]]]:
        """``layers``: ``(logits, boxes, targets)`` per matched output (decoder layers, encoder) ->
        their indices as :meth:`forward`. The costs of all of them reach the host in ONE transfer
        (with the finiteness flags), the only device synchronisation of the matching."""
        results = [None] * len(layers)
        pending = []
        for n, (logits, boxes, targets) in enumerate(layers):
            if sum(len(t["boxes"]) for t in targets) == 0:
                empty = torch.empty(0, dtype=torch.int64)
                results[n] = [(empty, empty) for _ in targets]
            else:
                pending.append((n, targets) + self.cost_matrix(logits, boxes, targets))
        if not pending:
            return results
        dtype = torch.float64 if any(c.dtype == torch.float64 for _, _, c, _ in pending) else torch.float32
        flags = torch.stack([bad for _, _, _, bad in pending]).to(dtype)
        host = torch.cat([c.flatten().to(dtype) for _, _, c, _ in pending] + [flags]).cpu()
        shapes = [(tuple(c.shape), [len(t["boxes"]) for t in targets]) for _, targets, c, _ in pending]
        for (n, *_), ind in zip(pending, self.solve(host, shapes)):
            results[n] = ind
        return results

    def solve(self, host: torch.Tensor, shapes) -> List[List[Tuple[torch.Tensor, torch.Tensor]]]:
        """Host side of :meth:`match_many`: ``host`` holds the flattened costs of the layers
        (``shapes``: ``([B,Q,T], target counts per image)`` each) then one finiteness flag per layer."""
        n = len(shapes)
        costs, flags = host[:-n], host[-n:]
        if bool(flags.any()):
            _diverged("the model predicted non-finite class logits or boxes")
        if not bool(torch.isfinite(costs).all()):
            _diverged("the matching cost is non-finite (degenerate predicted boxes)")
        costs = costs.split([int(np.prod(shape)) for shape, _ in shapes])
        return [self.assign(flat.view(shape), sizes) for flat, (shape, sizes) in zip(costs, shapes)]

    @staticmethod
    def assign(cost: torch.Tensor, sizes: List[int]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Host cost ``[B,Q,sum(sizes)]`` -> per image ``(query_idx, target_idx)`` int64 CPU tensors
        (scipy's Hungarian algorithm on the image's own targets)."""
        empty = torch.empty(0, dtype=torch.int64)
        indices = []
        for i, c in enumerate(cost.split(sizes, -1)):
            if sizes[i] == 0:
                indices.append((empty, empty))
                continue
            rows, cols = linear_sum_assignment(c[i].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64),
                            torch.as_tensor(np.asarray(cols), dtype=torch.int64)))
        return indices

    def forward(self, logits: torch.Tensor, boxes: torch.Tensor,
                targets: List[Dict[str, torch.Tensor]]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """logits ``[B,Q,C]``, boxes ``[B,Q,4]`` (cxcywh, normalised), targets with "labels" and
        "boxes" -> per image ``(query_idx, target_idx)`` int64 CPU tensors, sorted by query."""
        return self.match_many([(logits, boxes, targets)])[0]
