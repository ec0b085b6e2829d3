"""Exact resume in a NEW process (issue 18, point 1): ``train_net.py`` run to iteration 4 in one go
and run to 2, then ``--resume``d to 4 in another process, end with bitwise-identical weights,
optimizer, scheduler and iteration; the split run uses 2 data-loader workers, the reference none
(the data stream is a function of (seed, rank, position), not of the workers). The 2-process
variant, across a SIGTERM, is in test_distributed.py.

A run SIGKILLed as soon as its second checkpoint file appears leaves only complete checkpoints
(atomic saves), and ``--resume`` continues from the last one to the end."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cli_helpers import REPO, assert_same_training_state, run_train_net, tiny_synthetic_root
from smca_detr.checkpoint import safe_torch_load


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_synthetic_root(tmp_path_factory)


def test_resume_in_a_new_process_is_bitwise_exact(tmp_path, root):
    common = ["SOLVER.CHECKPOINT_PERIOD", "2"]
    rc, log = run_train_net(tmp_path / "one_go", root, *common, "SOLVER.MAX_ITER", "4")
    assert rc == 0, log[-3000:]
    split = tmp_path / "split"
    rc, log = run_train_net(split, root, *common, "SOLVER.MAX_ITER", "2", "DATALOADER.NUM_WORKERS", "2")
    assert rc == 0, log[-3000:]
    rc, log = run_train_net(split, root, *common, "SOLVER.MAX_ITER", "4", "DATALOADER.NUM_WORKERS", "2",
                            args=["--resume"])
    assert rc == 0, log[-3000:]
    assert "Starting training from iteration 2" in log, log[-3000:]
    assert_same_training_state(tmp_path / "one_go" / "model_final.pth", split / "model_final.pth")


# ----------------------------------------------------------- SIGKILL during training, then --resume


SUBPROCESS_OPTS = [
    "MODEL.BACKBONE.FREEZE_AT", "5", "MODEL.RESNETS.NORM", "FrozenBN",  # small optimizer state
    "MODEL.SMCA_DETR.HIDDEN_DIM", "32", "MODEL.SMCA_DETR.NHEADS", "4", "MODEL.SMCA_DETR.ENC_LAYERS", "1",
    "MODEL.SMCA_DETR.DEC_LAYERS", "1", "MODEL.SMCA_DETR.DIM_FEEDFORWARD", "64", "MODEL.SMCA_DETR.NUM_QUERIES", "5",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "DATASETS.TRAIN", "('smca_synthetic_tiny_train',)", "DATASETS.TEST", "()",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "6", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0",
    "SOLVER.CHECKPOINT_PERIOD", "1", "SEED", "3",
]


def _train_net(out_dir, root, log_path, resume=False):
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--num-gpus", "1",
           "--config-file", os.path.join(REPO, "configs", "demo", "detr_r18_synthetic.yaml")]
    cmd += (["--resume"] if resume else []) + SUBPROCESS_OPTS + [
        "DATASETS.SYNTHETIC.ROOT", root, "OUTPUT_DIR", str(out_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log


def test_sigkill_during_training_then_resume_continues_from_the_last_checkpoint(tmp_path, root):
    out = tmp_path / "out"
    proc, log = _train_net(out, root, tmp_path / "killed.log")
    # kill as soon as the SECOND checkpoint name appears: a non-atomic save would be caught mid-write
    second = out / "model_0000001.pth"
    deadline = time.time() + 240
    try:
        while not second.exists():
            assert proc.poll() is None, "training ended before it was killed:\n" + (tmp_path / "killed.log").read_text()
            assert time.time() < deadline, "no second checkpoint in time"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode == -signal.SIGKILL

    # no partially written file under a final checkpoint name
    last = (out / "last_checkpoint").read_text().strip()
    assert last.startswith("model_") and (out / last).is_file()
    iterations = {}
    for name in sorted(os.listdir(out)):
        if name.startswith("model_") and name.endswith(".pth"):
            ckpt = safe_torch_load(str(out / name))  # raises on a truncated file
            assert {"model", "iteration", "trainer"} <= set(ckpt), name
            iterations[name] = ckpt["iteration"]

    proc, log = _train_net(out, root, tmp_path / "resumed.log", resume=True)
    try:
        proc.wait(240)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "resumed.log").read_text()
    assert proc.returncode == 0, text[-3000:]
    assert f"Starting training from iteration {iterations[last] + 1}" in text, text[-3000:]
    final = safe_torch_load(str(out / "model_final.pth"))
    assert final["iteration"] == 5
    with open(out / "metrics.json") as f:
        logged = [json.loads(line)["iteration"] for line in f if line.strip()]
    assert logged[-1] == 5
