"""``train_net.py`` in separate processes on a tiny SMCA-DETR and the tiny synthetic split, for the
resume / distributed / preemption tests (test_resume.py, test_distributed.py), and
:func:`spawn_gloo`, the two-process gloo harness of the in-process distributed tests.

The model is the demo recipe (configs/demo/smca_r18_slim_synthetic.yaml) cut down to an 8-channel
ResNet-18, one encoder and two decoder layers of width 32 and 8 queries at 48-80 px, with dropout,
random flips, crops and multi-scale resizing on, so that every random stream matters.
"""
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_CLI_OPTS = [
    "MODEL.DEVICE", "cpu", "SEED", "7",
    "DATASETS.TRAIN", "('smca_synthetic_tiny_train',)", "DATASETS.TEST", "()",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "8", "MODEL.RESNETS.RES2_OUT_CHANNELS", "8",
    "MODEL.SMCA_DETR.ENC_LAYERS", "1", "MODEL.SMCA_DETR.DEC_LAYERS", "2", "MODEL.SMCA_DETR.HIDDEN_DIM", "32",
    "MODEL.SMCA_DETR.DIM_FEEDFORWARD", "64", "MODEL.SMCA_DETR.NUM_QUERIES", "8", "MODEL.SMCA_DETR.DROPOUT", "0.1",
    "INPUT.MIN_SIZE_TRAIN", "(48, 64)", "INPUT.MAX_SIZE_TRAIN", "80", "INPUT.DETR.CROP_ENABLED", "True",
    "INPUT.DETR.CROP_RESIZE", "(96, 128)", "INPUT.DETR.CROP_MIN", "64", "INPUT.DETR.CROP_MAX", "96",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()", "TEST.EVAL_PERIOD", "0",
]


def train_net_cmd(out_dir, root, *opts, args=()):
    """The command line of a tiny training run writing to ``out_dir`` (``args``: train_net flags
    such as --resume / --num-gpus; ``opts``: more KEY VALUE pairs)."""
    return ([sys.executable, os.path.join(REPO, "train_net.py"), *args,
             "--config-file", os.path.join(REPO, "configs", "demo", "smca_r18_slim_synthetic.yaml")]
            + TINY_CLI_OPTS + ["DATASETS.SYNTHETIC.ROOT", str(root), "OUTPUT_DIR", str(out_dir)] + list(opts))


def cli_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=REPO)
    env.pop("SMCA_DETR_TEST_FAIL_AT", None)
    return env


def run_train_net(out_dir, root, *opts, args=(), timeout=300, env=None):
    """Run to the end; returns (exit status, output)."""
    proc = subprocess.run(train_net_cmd(out_dir, root, *opts, args=args), cwd=REPO, env=env or cli_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return proc.returncode, proc.stdout


def load(path):
    return torch.load(str(path), map_location="cpu", weights_only=False)


def assert_same_training_state(a, b):
    """Two checkpoints (paths) hold bitwise-identical weights, optimizer state, scheduler state and
    iteration."""
    ca, cb = load(a), load(b)
    assert ca["iteration"] == cb["iteration"]
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), f"weights differ: {k}"
    oa, ob = ca["trainer"]["_trainer"]["optimizer"], cb["trainer"]["_trainer"]["optimizer"]
    assert oa["state"].keys() == ob["state"].keys() and oa["state"]
    for idx in oa["state"]:
        for key, value in oa["state"][idx].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(ob["state"][idx][key])), (idx, key)
    assert oa["param_groups"] == ob["param_groups"]
    assert ca["trainer"]["hooks"] == cb["trainer"]["hooks"]  # the LR scheduler


def tiny_synthetic_root(tmp_path_factory, splits=("smca_synthetic_tiny_train",)) -> str:
    """A private dataset root with the tiny synthetic ``splits`` generated (train: 16 images)."""
    from smca_detr.data import synthetic

    root = str(tmp_path_factory.mktemp("synthetic"))
    for split in splits:
        synthetic.generate_split(split, root, progress=False)
    return root


def _gloo_entry(rank, fn, init_file, out_dir, world_size, args):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", world_size=world_size, rank=rank)
    try:
        torch.save(fn(rank, *args), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # all ranks done before rank 0, the store's host, tears the group down
    finally:
        dist.destroy_process_group()


def spawn_gloo(fn, out_dir, *args, world_size=2):
    """``fn(rank, *args)`` in ``world_size`` spawned processes joined in a gloo process group (one
    torch thread each); returns the per-rank results (saved under ``out_dir``), rank order. ``fn``
    must be a module-level function (it is pickled)."""
    import tempfile

    import torch.multiprocessing as mp

    init_file = os.path.join(tempfile.mkdtemp(dir=str(out_dir)), "init")
    mp.spawn(_gloo_entry, args=(fn, init_file, str(out_dir), world_size, args), nprocs=world_size, join=True)
    return [torch.load(os.path.join(str(out_dir), f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
