"""Set criterion shared by every variant: Hungarian matching per decoder layer, then
classification (softmax CE with a no-object weight, or sigmoid focal loss), L1 and GIoU box losses.

Model outputs are stacked over decoder layers: ``pred_logits [L,B,Q,C]``, ``pred_boxes [L,B,Q,4]``;
layer L-1 is the final prediction (no suffix), layers 0..L-2 are auxiliary (suffix ``_i``). A
two-stage model adds ``enc_outputs`` (suffix ``_enc``, matched class-agnostically: all labels 0).
"""
from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils import comm
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .blocks import at_least_float32, autocast_off
from .matcher import HungarianMatcher
from .registry import CRITERION_REGISTRY

__all__ = ["SetCriterion", "sigmoid_focal_loss", "build_criterion"]


def sigmoid_focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
    """Element-wise focal loss (Lin et al.): α_t (1 - p_t)^γ · BCE(logits, targets)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


@CRITERION_REGISTRY.register()
class SetCriterion(nn.Module):
    @configurable
    def __init__(self, *, matcher: HungarianMatcher, num_logits: int, class_loss: str = "softmax",
                 no_object_weight: float = 0.1, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 class_weight: float = 1.0, l1_weight: float = 5.0, giou_weight: float = 2.0,
                 deep_supervision: bool = True):
        super().__init__()
        if class_loss not in ("softmax", "focal"):
            raise ValueError(f"MODEL.SMCA_DETR.CLASS_LOSS must be 'softmax' or 'focal', got {class_loss!r}")
        self.matcher = matcher
        self.num_logits = num_logits
        self.focal = class_loss == "focal"
        self.alpha = focal_alpha
        self.gamma = focal_gamma
        self.weights = {"loss_ce": class_weight, "loss_bbox": l1_weight, "loss_giou": giou_weight}
        self.deep_supervision = deep_supervision
        if not self.focal:
            empty_weight = torch.ones(num_logits)
            empty_weight[-1] = no_object_weight
            self.register_buffer("empty_weight", empty_weight, persistent=False)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.SMCA_DETR
        focal = c.CLASS_LOSS == "focal"
        matcher = HungarianMatcher(cost_class=c.COST_CLASS, cost_bbox=c.COST_BBOX, cost_giou=c.COST_GIOU,
                                   focal=focal, focal_alpha=c.FOCAL_ALPHA, focal_gamma=c.FOCAL_GAMMA)
        return {
            "matcher": matcher,
            "num_logits": c.NUM_CLASSES if focal else c.NUM_CLASSES + 1,
            "class_loss": c.CLASS_LOSS,
            "no_object_weight": c.NO_OBJECT_WEIGHT,
            "focal_alpha": c.FOCAL_ALPHA,
            "focal_gamma": c.FOCAL_GAMMA,
            "class_weight": c.CLASS_WEIGHT,
            "l1_weight": c.L1_WEIGHT,
            "giou_weight": c.GIOU_WEIGHT,
            "deep_supervision": c.DEEP_SUPERVISION,
        }

    # ------------------------------------------------------------------ single-layer losses
    def _class_losses(self, logits, targets, indices, num_boxes, ce_norm=None):
        bs, nq, nc = logits.shape
        batch_idx, src_idx = _permutation(indices)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        if self.focal:
            onehot = torch.zeros_like(logits)
            onehot[batch_idx, src_idx, matched_labels] = 1
            loss_ce = sigmoid_focal_loss(logits, onehot, self.alpha, self.gamma).sum() / num_boxes
        else:
            target_classes = torch.full((bs, nq), nc - 1, dtype=torch.int64, device=logits.device)
            target_classes[batch_idx, src_idx] = matched_labels
            weight = self.empty_weight.to(logits.dtype)
            if ce_norm is None:  # one process: the weighted mean over the queries (official DETR)
                loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, weight)
            else:  # several: the weighted sum over the global mean of the weight sums (see ce_norm)
                loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, weight, reduction="sum") / ce_norm
        with torch.no_grad():
            if len(matched_labels):
                acc = (logits[batch_idx, src_idx].argmax(-1) == matched_labels).to(logits.dtype).mean() * 100
                class_error = 100 - acc
            else:
                class_error = logits.new_zeros(())
            n_pred = (logits.argmax(-1) != nc - 1).sum(1).to(logits.dtype)
            n_tgt = torch.tensor([float(len(t["labels"])) for t in targets]).to(n_pred, non_blocking=True)
            card_error = F.l1_loss(n_pred, n_tgt)
        return {"loss_ce": loss_ce, "class_error": class_error, "cardinality_error": card_error}

    def _box_losses(self, boxes, targets, indices, num_boxes):
        batch_idx, src_idx = _permutation(indices)
        src = boxes[batch_idx, src_idx]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src)
        loss_bbox = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        if len(src):
            giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
        else:
            giou = src.new_ones(0)
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def _layer_losses(self, logits, boxes, targets, indices, num_boxes, suffix, losses, ce_norm=None):
        for name, value in {**self._class_losses(logits, targets, indices, num_boxes, ce_norm),
                            **self._box_losses(boxes, targets, indices, num_boxes)}.items():
            if name == "class_error" and suffix:
                continue  # official convention: class_error is logged for the final layer only
            losses[name + suffix] = value

    # ------------------------------------------------------------------ public API
    def num_boxes(self, targets, device) -> float:
        """Number of target boxes averaged over all processes (at least 1). One process: counted on
        the host (no device synchronisation); several: one all-reduce and one transfer."""
        n = float(sum(len(t["labels"]) for t in targets))
        if comm.get_world_size() == 1:
            return max(n, 1.0)
        n = torch.as_tensor([n], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(n)
        return torch.clamp(n / comm.get_world_size(), min=1).item()

    def ce_norm(self, targets, num_queries: int, device):
        """Softmax CE on several processes: the weight sum of the official weighted mean (no-object
        weight for the unmatched queries, 1 for the min(Q, n_i) matched ones) averaged over the
        processes, so that DDP's mean of the per-process gradients is the gradient of the
        one-process loss on all images. None on one process (F.cross_entropy's mean, unchanged)."""
        if self.focal or comm.get_world_size() == 1:
            return None
        eos = float(self.empty_weight[-1])
        matched = sum(min(num_queries, len(t["labels"])) for t in targets)
        w = torch.as_tensor([matched + (num_queries * len(targets) - matched) * eos], dtype=torch.float64,
                            device=device)
        torch.distributed.all_reduce(w)
        return (w / comm.get_world_size()).item()

    def compute(self, outputs: Dict, targets: List[Dict]):
        """Unweighted losses (incl. logging-only ``class_error`` / ``cardinality_error``) and the
        matcher indices per layer (``final``, ``aux_i``, ``enc``; CPU tensors). Runs in float32. All
        layers are matched together: one device-to-host transfer of their costs, one non-blocking
        host-to-device transfer of their indices."""
        logits_all = outputs["pred_logits"]
        with autocast_off(logits_all.device.type):
            logits_all = at_least_float32(logits_all)
            boxes_all = at_least_float32(outputs["pred_boxes"])
            num_boxes = self.num_boxes(targets, logits_all.device)
            ce_norm = self.ce_norm(targets, logits_all.shape[2], logits_all.device)
            n_layers = logits_all.shape[0]
            # (key, suffix, logits, boxes, targets) of every matched output: final, aux_i, enc
            layers = [("final", "", logits_all[-1], boxes_all[-1], targets)]
            if self.deep_supervision:
                layers += [(f"aux_{i}", f"_{i}", logits_all[i], boxes_all[i], targets) for i in range(n_layers - 1)]
            enc = outputs.get("enc_outputs")
            if enc is not None:
                bin_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
                layers.append(("enc", "_enc", at_least_float32(enc["pred_logits"]),
                               at_least_float32(enc["pred_boxes"]), bin_targets))
            matched = self.matcher.match_many([(lg, bx, tg) for _, _, lg, bx, tg in layers])
            indices = {key: ind for (key, *_), ind in zip(layers, matched)}
            on_device = _indices_to(matched, logits_all.device)
            losses = {}
            for (key, suffix, lg, bx, tg), ind in zip(layers, on_device):
                # the class-agnostic encoder loss (two-stage, focal) never takes the softmax norm
                self._layer_losses(lg, bx, tg, ind, num_boxes, suffix, losses, None if key == "enc" else ce_norm)
        return losses, indices

    def weighted(self, losses: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Only the terms that are summed into the total loss, each multiplied by its weight."""
        out = {}
        for name, value in losses.items():
            base = name.split("_")[0] + "_" + name.split("_")[1]
            if base in self.weights and self.weights[base] != 0:
                out[name] = value * self.weights[base]
        return out

    def forward(self, outputs: Dict, targets: List[Dict]) -> Dict[str, torch.Tensor]:
        losses, _ = self.compute(outputs, targets)
        _log_metrics({k: v for k, v in losses.items() if not k.startswith("loss_")})
        return self.weighted(losses)


def _permutation(indices):
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx, src_idx


def _indices_to(matched, device):
    """The matcher's CPU indices (per layer, per image) on ``device`` in one non-blocking copy."""
    flat = [t for layer in matched for pair in layer for t in pair]
    if device.type == "cpu" or not flat:
        return matched
    moved = iter(torch.cat(flat).to(device, non_blocking=True).split([len(t) for t in flat]))
    return [[(next(moved), next(moved)) for _ in layer] for layer in matched]


def _log_metrics(metrics):
    """Logging-only values go to detectron2's EventStorage, never into the total loss: stacked and
    transferred to the host once (one synchronisation per step, only when a storage is active)."""
    try:
        from detectron2.utils.events import get_event_storage

        storage = get_event_storage()
    except AssertionError:
        return
    if not metrics:
        return
    values = torch.stack([v.detach().double() for v in metrics.values()]).cpu().tolist()
    storage.put_scalars(**dict(zip(metrics, values)), smoothing_hint=True)


def build_criterion(cfg):
    return CRITERION_REGISTRY.get(cfg.MODEL.SMCA_DETR.CRITERION)(cfg)
