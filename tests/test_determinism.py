"""Determinism: the same seed and config give exactly the same first iterations (every logged loss,
every weight), with dropout, random flips, crops and multi-scale resizing on.
"""
import argparse
import logging

import pytest
import torch

from smca_detr.engine import Trainer
from train_step_helpers import TINY, synthetic_root  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _seeded_run(output_dir, monkeypatch):
    from detectron2.engine import defaults

    from smca_detr.engine import setup

    monkeypatch.setattr(defaults, "collect_env_info", lambda: "(skipped in tests)")
    args = argparse.Namespace(config_file="", eval_only=False, resume=False, num_gpus=1, opts=TINY + [
        "DATASETS.TRAIN", "('smca_synthetic_tiny_train',)", "MODEL.SMCA_DETR.NUM_CLASSES", "6",
        "SEED", "7", "OUTPUT_DIR", str(output_dir),
        "MODEL.SMCA_DETR.DROPOUT", "0.1", "INPUT.RANDOM_FLIP", "horizontal", "INPUT.MIN_SIZE_TRAIN", "(48, 64)",
        "INPUT.DETR.CROP_ENABLED", "True", "INPUT.DETR.CROP_RESIZE", "[96]", "INPUT.DETR.CROP_MIN", "48",
        "INPUT.DETR.CROP_MAX", "80"])
    loggers = [logging.getLogger(n) for n in ("detectron2", "fvcore")]
    handlers = [list(lg.handlers) for lg in loggers]
    try:
        cfg = setup(args)  # default_setup seeds every RNG from cfg.SEED
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
    finally:  # default_setup adds a log file handler in OUTPUT_DIR: take it off again
        for lg, old in zip(loggers, handlers):
            for h in [h for h in lg.handlers if h not in old]:
                lg.removeHandler(h)
                h.close()
    hist = trainer.storage.histories()
    losses = {k: [v for v, _ in h.values()] for k, h in hist.items() if "loss" in k or k.endswith("_error")}
    return losses, {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_same_seed_same_config_same_first_iterations(tmp_path, monkeypatch, synthetic_root):
    first, w1 = _seeded_run(tmp_path / "a", monkeypatch)
    second, w2 = _seeded_run(tmp_path / "b", monkeypatch)
    assert len(first["total_loss"]) == 3 and "loss_ce" in first
    assert first == second  # exact, every logged loss of every iteration
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
