"""Two processes (gloo on CPU, spawned from the test) give what one process gives: the losses,
normalised over the processes, and their gradients for the softmax and the focal loss, and the COCO
evaluation with the test images sharded over the ranks.

The same through ``train_net.py`` (preemption, a failing process, a DDP step) is test_distributed.py.
"""
import json
import os

import numpy as np
import pytest
import torch

from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances

import smca_detr  # noqa: F401
from smca_detr.checkpoint import SmcaDetrCheckpointer
from smca_detr.engine import Trainer
from smca_detr.modeling.criterion import SetCriterion
from smca_detr.modeling.matcher import HungarianMatcher
from cli_helpers import spawn_gloo
from train_step_helpers import NUM_CLASSES, _assert_same_detections, _png, build, make_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _criterion(focal):
    return SetCriterion(matcher=HungarianMatcher(cost_class=2 if focal else 1, focal=focal),
                        num_logits=NUM_CLASSES if focal else NUM_CLASSES + 1,
                        class_loss="focal" if focal else "softmax", class_weight=2.0 if focal else 1.0)


BOXES_PER_IMAGE = [3, 0, 1, 0]  # rank 0 gets 3 boxes, rank 1 gets 1: the normalisation matters


def _criterion_inputs(focal):
    g = torch.Generator().manual_seed(11)
    nl = NUM_CLASSES if focal else NUM_CLASSES + 1
    out = {"pred_logits": torch.randn(2, 4, 5, nl, generator=g, dtype=torch.float64),
           "pred_boxes": torch.rand(2, 4, 5, 4, generator=g, dtype=torch.float64) * 0.4 + 0.3}
    if focal:
        out["enc_outputs"] = {"pred_logits": torch.randn(4, 6, nl, generator=g, dtype=torch.float64),
                              "pred_boxes": torch.rand(4, 6, 4, generator=g, dtype=torch.float64) * 0.4 + 0.3}
    targets = []
    for n in BOXES_PER_IMAGE:
        cxcy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.5 + 0.25
        wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.2 + 0.05
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (n,), generator=g), "boxes": torch.cat([cxcy, wh], 1)})
    return out, targets


def _losses_and_grads(focal, images):
    """Weighted losses of ``images`` (indices into the batch of 4) and the gradient of their sum
    w.r.t. the predictions of those images."""
    out, targets = _criterion_inputs(focal)
    leaves = {"logits": out["pred_logits"][:, images].clone().requires_grad_(),
              "boxes": out["pred_boxes"][:, images].clone().requires_grad_()}
    sub = {"pred_logits": leaves["logits"], "pred_boxes": leaves["boxes"]}
    if "enc_outputs" in out:
        sub["enc_outputs"] = {k: v[images] for k, v in out["enc_outputs"].items()}
    losses = _criterion(focal)(sub, [targets[i] for i in images])
    sum(losses.values()).backward()
    return {k: v.item() for k, v in losses.items()}, {k: v.grad for k, v in leaves.items()}


def _eval_cfg(dataset, output_dir):
    return make_cfg(["DATASETS.TEST", f"('{dataset}',)", "MODEL.SMCA_DETR.TEST_TOPK", "100"],
                    output_dir=output_dir)


def _register_eval_dataset(name, json_file, image_root):
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, json_file, image_root)


def _dist_worker(rank, out_dir, eval_args):
    from detectron2.utils import comm

    assert comm.get_world_size() == 2 and comm.get_rank() == rank
    assert comm.all_gather(rank) == [0, 1]
    result = {}
    for focal in (False, True):
        result[focal] = _losses_and_grads(focal, [2 * rank, 2 * rank + 1])
    # evaluation through the trainer's test path: the test loader shards images over the ranks,
    # COCOEvaluator gathers the detections on rank 0
    name, json_file, image_root, weights = eval_args
    _register_eval_dataset(name, json_file, image_root)
    cfg = _eval_cfg(name, os.path.join(out_dir, "eval"))
    model = Trainer.build_model(cfg)
    SmcaDetrCheckpointer(model).load(weights)
    result["metrics"] = Trainer.test(cfg, model)
    return result


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    """4 images of different sizes as a COCO json dataset, and the weights of a tiny DETR."""
    d = tmp_path_factory.mktemp("eval_data")
    sizes = [(64, 64), (48, 80), (80, 56), (40, 40)]
    images, annotations = [], []
    for i, hw in enumerate(sizes):
        _png(d / f"im{i}.png", hw, seed=i)
        images.append({"id": i + 1, "file_name": f"im{i}.png", "height": hw[0], "width": hw[1]})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1 + i % NUM_CLASSES,
                            "bbox": [12, 10, 30, 28], "area": 840, "iscrowd": 0})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate("abc")]}
    (d / "eval.json").write_text(json.dumps(coco))
    weights = str(d / "detr.pth")
    torch.save({"model": build(make_cfg(), seed=8).state_dict()}, weights)
    return "rel_eval", str(d / "eval.json"), str(d), weights


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory, eval_setup):
    out = tmp_path_factory.mktemp("gloo")
    return out, spawn_gloo(_dist_worker, out, str(out), eval_setup)


@pytest.mark.parametrize("focal", [False, True], ids=["softmax", "focal"])
def test_two_process_losses_and_gradients_equal_one_process_on_the_whole_batch(two_process_results, focal):
    """DETR normalises the summed box / focal losses by the number of target boxes averaged over the
    processes, N̄ = (n_0 + n_1) / 2. detectron2 logs the mean of the per-rank losses and DDP
    averages the gradients, so ½ Σ_r loss_r = Σ_r S_r / (2 N̄) = (S_0 + S_1) / (n_0 + n_1) must equal
    the one-process loss on all 4 images, and ½ ∂loss_r / ∂(predictions of rank r) its gradient."""
    _, ranks = two_process_results
    single, grads = _losses_and_grads(focal, [0, 1, 2, 3])
    per_rank = [r[focal][0] for r in ranks]
    assert set(per_rank[0]) == set(single)
    for name, value in single.items():
        # softmax CE on several processes: weighted sum over the processes' mean weight sum
        # (SetCriterion.ce_norm), the analogue of N̄, so it matches too
        mean = (per_rank[0][name] + per_rank[1][name]) / 2
        assert mean == pytest.approx(value, rel=1e-6, abs=1e-6), name
    for key in ("logits", "boxes"):  # the DDP gradient is exactly the one-process gradient
        ddp = torch.cat([ranks[0][focal][1][key], ranks[1][focal][1][key]], dim=1) / 2
        torch.testing.assert_close(ddp, grads[key], rtol=1e-6, atol=1e-9)


def _detections(results_json):
    with open(results_json) as f:
        dets = json.load(f)
    by_image = {}
    for d in dets:
        by_image.setdefault(d["image_id"], []).append([d["category_id"], *d["bbox"], d["score"]])
    return by_image


def test_evaluation_does_not_depend_on_the_number_of_processes(two_process_results, eval_setup, tmp_path):
    out, ranks = two_process_results
    name, json_file, image_root, weights = eval_setup
    _register_eval_dataset(name, json_file, image_root)
    cfg = _eval_cfg(name, tmp_path / "eval1")
    model = Trainer.build_model(cfg)
    SmcaDetrCheckpointer(model).load(weights)
    metrics = Trainer.test(cfg, model)
    one = _detections(tmp_path / "eval1" / "inference" / "coco_instances_results.json")
    two = _detections(out / "eval" / "inference" / "coco_instances_results.json")
    assert sorted(one) == [1, 2, 3, 4] and sum(len(v) for v in one.values()) == 4 * 6  # softmax: one per query
    _assert_same_detections(one, two)
    ap1, ap2 = metrics["bbox"], ranks[0]["metrics"]["bbox"]  # Trainer.test unnests a single dataset
    assert ap1.keys() == ap2.keys()
    for k in ap1:
        assert (np.isnan(ap1[k]) and np.isnan(ap2[k])) or ap1[k] == pytest.approx(ap2[k], abs=1e-9), k
