"""Exact resume in a NEW process (issue 18, point 1): ``train_net.py`` run to iteration 4 in one go
and run to 2, then ``--resume``d to 4 in another process, end with bitwise-identical weights,
optimizer, scheduler and iteration; the split run uses 2 data-loader workers, the reference none
(the data stream is a function of (seed, rank, position), not of the workers). The 2-process
variant, across a SIGTERM, is in test_distributed.py."""
import pytest

from cli_helpers import assert_same_training_state, run_train_net, tiny_synthetic_root


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
