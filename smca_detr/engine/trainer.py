"""Training / evaluation engine of smca_detr on top of detectron2's ``DefaultTrainer``.

Works with detectron2 v0.6 and current main (features are detected, versions never compared):

* ``TrainLoop`` replaces SimpleTrainer / AMPTrainer: autocast in SOLVER.AMP.PRECISION ("float16"
  with a GradScaler, "bfloat16" without) on the model's device type, so bf16 also trains on CPU
  (v0.6's AMPTrainer asserts CUDA and has no dtype argument).
* Exact resume, also in a new process (``resume_or_load(resume=True)``): the checkpoint holds the
  model, the optimizer, the LR scheduler, the iteration, the GradScaler and the run's seed, saved as
  ``{"iteration", "hooks", "seed", "_trainer": {"optimizer", "grad_scaler"?}}`` (main's layout; v0.6's
  DefaultTrainer saves no optimizer state at all). Nothing else is needed because every random
  stream restarts from the position: the data stream (images, order, augmentations) is a function
  of (seed, rank, iteration) (``smca_detr.data.train_loader``), and each iteration seeds Python,
  numpy and torch (CPU, CUDA; this also decides the dropout masks) from (seed, rank, iteration)
  before its forward pass. SEED < 0 draws a seed once and saves it.
* Checkpoints are written atomically (``SmcaDetrCheckpointer``).
* Preemption (SIGTERM / SIGUSR1): checkpoint after the current iteration on all ranks, exit status
  75 (``smca_detr.engine.preemption``).
* ``launch`` runs ``--num-gpus 1`` in-process (also on CPU) and spawns gloo workers on machines
  without CUDA (v0.6's launch requires CUDA/NCCL for more than one process).
"""
import contextlib
import logging
import os
import time
import weakref
from datetime import timedelta
from typing import Optional

import torch
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase, default_setup
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter, get_event_storage
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from ..checkpoint import SmcaDetrCheckpointer
from ..config import config_from_args
from ..data import synthetic
from ..data.train_loader import ITERATION_DOMAIN, build_positioned_train_loader, derive_seed, seed_all
from .optimizer import build_optimizer as _build_optimizer
from .preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionHook, forward_signals_to_children

__all__ = ["Trainer", "TrainLoop", "amp_dtype", "has_fast_coco_eval", "launch", "setup"]

logger = logging.getLogger(__name__)

_PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def amp_dtype(cfg) -> Optional[torch.dtype]:
    """The autocast dtype of ``cfg.SOLVER.AMP`` (None when AMP is disabled)."""
    if not cfg.SOLVER.AMP.ENABLED:
        return None
    precision = str(cfg.SOLVER.AMP.get("PRECISION", "float16"))
    if precision not in _PRECISIONS:
        raise ValueError(f"SOLVER.AMP.PRECISION must be one of {sorted(_PRECISIONS)}, got {precision!r}")
    return _PRECISIONS[precision]


def has_fast_coco_eval() -> bool:
    """Whether detectron2's compiled COCOeval (``use_fast_impl``) is available (False with the
    placeholder ``detectron2._C`` that smca_detr installs when detectron2 has no compiled ops)."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    if getattr(_C, "__smca_detr_placeholder__", False):
        return False
    return hasattr(_C, "COCOevalEvaluateImages")


# ------------------------------------------------------------------------------------- train loop


class TrainLoop(SimpleTrainer):
    """One training iteration: forward (under autocast when ``precision`` is given), backward (scaled
    when a GradScaler is used), metrics, optimizer step. Used for fp32, bf16 and fp16 alike.

    Args:
        model, data_loader, optimizer: as for detectron2's ``SimpleTrainer``.
        precision: None (float32) | torch.bfloat16 | torch.float16 (autocast dtype).
        grad_scaler: a GradScaler (float16) or None; created for float16 when not given.
        seed: when given, each iteration seeds Python, numpy and torch with a seed derived from
            (seed, rank, iteration) after reading its batch, so that a resumed run continues the
            random streams (e.g. dropout) exactly.
    """

    def __init__(self, model, data_loader, optimizer, *, precision: Optional[torch.dtype] = None,
                 grad_scaler=None, seed: Optional[int] = None):
        # SimpleTrainer of v0.6 calls iter(data_loader) right away, which would start data-loader
        # workers before ``resume_or_load`` has told the sampler where to continue: give it an empty
        # iterable and create our own iterator lazily on the first step.
        super().__init__(model, [], optimizer)
        self.data_loader = data_loader
        self._smca_data_iter = None
        param = next(iter(model.parameters()), None)
        self.device_type = param.device.type if param is not None else "cpu"
        if precision not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"precision must be None, torch.float16 or torch.bfloat16, got {precision}")
        self.precision = precision
        if precision == torch.float16 and grad_scaler is None:
            grad_scaler = torch.amp.GradScaler(self.device_type)  # any device (torch >= 2.5)
        self.grad_scaler = grad_scaler
        self.seed = seed

    def reset_data_iter(self):
        """Forget the current data iterator; the next step starts a new one (e.g. after the sampler
        was told to skip the data of finished iterations)."""
        self._smca_data_iter = None

    def run_step(self):
        assert self.model.training, "[smca_detr TrainLoop] model was changed to eval mode!"
        start = time.perf_counter()
        _injected_failure(self.iter)
        if self._smca_data_iter is None:
            self._smca_data_iter = iter(self.data_loader)
        data = next(self._smca_data_iter)
        data_time = time.perf_counter() - start
        if self.seed is not None:
            seed_all(derive_seed(self.seed, ITERATION_DOMAIN, comm.get_rank(), self.iter))

        with (contextlib.nullcontext() if self.precision is None
              else torch.autocast(device_type=self.device_type, dtype=self.precision)):
            loss_dict = self.model(data)
        losses = sum(loss_dict.values())

        self.optimizer.zero_grad()
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
        else:
            losses.backward()
        if hasattr(self, "after_backward"):  # detectron2 main's after_backward hooks; not in v0.6
            self.after_backward()

        self._write_metrics(loss_dict, data_time)

        if hasattr(self.optimizer, "last_grad_norm"):
            self.optimizer.last_grad_norm = None
        if self.grad_scaler is not None:
            # scaler.step unscales the gradients, then calls optimizer.step() (which clips them
            # when full-model clipping is on) unless they contain inf/NaN
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        grad_norm = getattr(self.optimizer, "last_grad_norm", None)
        if grad_norm is not None and comm.is_main_process():
            get_event_storage().put_scalar("grad_norm", float(grad_norm))

    # state --------------------------------------------------------------------------------------
    def state_dict(self):
        ret = super().state_dict()  # iteration, optimizer
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None:
            if "grad_scaler" in state_dict:
                self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
            else:
                logger.warning("The checkpoint has no GradScaler state; the scaler starts afresh.")


def _injected_failure(iteration: int) -> None:
    """Test hook (tests/test_distributed.py): ``SMCA_DETR_TEST_FAIL_AT=RANK:ITER`` makes that rank
    raise at the start of that iteration, as a bad batch or an out-of-memory error would."""
    spec = os.environ.get("SMCA_DETR_TEST_FAIL_AT")
    if spec and spec == f"{comm.get_rank()}:{iteration}":
        raise RuntimeError(f"SMCA_DETR_TEST_FAIL_AT={spec}: injected failure")


# ---------------------------------------------------------------------------------------- trainer


class Trainer(DefaultTrainer):
    """detectron2 ``DefaultTrainer`` for smca_detr models (see the module docstring)."""

    def __init__(self, cfg):
        # Same construction order as DefaultTrainer.__init__, with TrainLoop instead of
        # SimpleTrainer / AMPTrainer and the atomic checkpointer.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        self._random_seed = cfg.SEED < 0
        if self._random_seed:  # one seed for all ranks, saved in the checkpoints
            cfg = cfg.clone()
            cfg.defrost()
            cfg.SEED = comm.shared_random_seed()
            cfg.freeze()
        precision = amp_dtype(cfg)

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)

        param = next(iter(model.parameters()), None)
        ddp_kwargs = {"broadcast_buffers": False}
        if param is not None and param.device.type == "cpu":
            ddp_kwargs["device_ids"] = None  # CPU (gloo) DDP takes no device ids
        model = create_ddp_model(model, **ddp_kwargs)
        self._trainer = TrainLoop(model, data_loader, optimizer, precision=precision, seed=cfg.SEED)

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SmcaDetrCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    # ------------------------------------------------------------------ resume
    def resume_or_load(self, resume=True):
        """Resume from the last checkpoint in OUTPUT_DIR (model, optimizer, scheduler, iteration,
        GradScaler, seed; data and random streams continue after the last finished iteration) when
        ``resume`` and one exists; otherwise load ``cfg.MODEL.WEIGHTS`` only and start at 0."""
        super().resume_or_load(resume=resume)
        self._continue_data_stream(self.start_iter)

    def _continue_data_stream(self, start_iter: int):
        batches = getattr(self.data_loader, "positioned_batch_sampler", None)
        if batches is None:
            if start_iter > 0:
                logger.warning("The training data loader cannot skip finished iterations "
                               f"(DATALOADER.SAMPLER_TRAIN={self.cfg.DATALOADER.SAMPLER_TRAIN}); the "
                               "resumed run restarts its data stream from the beginning.")
            return
        batches.start = start_iter
        self._trainer.reset_data_iter()

    def state_dict(self):
        # TrainerBase's (iteration + hook states, e.g. the LR scheduler) plus the train loop's
        # (optimizer, GradScaler) under "_trainer": the layout of detectron2 main, on every version
        ret = TrainerBase.state_dict(self)
        ret["_trainer"] = self._trainer.state_dict()
        ret["seed"] = int(self.cfg.SEED)
        return ret

    def load_state_dict(self, state_dict):
        TrainerBase.load_state_dict(self, state_dict)
        seed = state_dict.get("seed")
        if seed is not None and int(seed) != self.cfg.SEED:
            if self._random_seed:  # SEED < 0: continue the run's drawn seed
                cfg = self.cfg.clone()
                cfg.defrost()
                cfg.SEED = int(seed)
                cfg.freeze()
                self.cfg = cfg
                self._trainer.seed = cfg.SEED
                self._trainer.data_loader = self.build_train_loader(cfg)
                self._trainer.reset_data_iter()
            else:
                logger.warning(f"The checkpoint was trained with SEED {seed}, this run has SEED {self.cfg.SEED}: "
                               "the resumed run continues with other random streams.")
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("The checkpoint has no optimizer state (saved by detectron2 v0.6's "
                           "DefaultTrainer?); the optimizer starts afresh.")

    # ------------------------------------------------------------------ builders
    @classmethod
    def build_optimizer(cls, cfg, model):
        return _build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        from ..data.mapper import DetrDatasetMapper

        mapper = DetrDatasetMapper(cfg, True)
        from ..data.validation import build_train_dataset_dicts

        # get_detection_dataset_dicts + checks: names registered, category ids, degenerate boxes
        dataset = build_train_dataset_dicts(cfg)
        name = cfg.DATALOADER.SAMPLER_TRAIN
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()  # Trainer sets SEED >= 0
        if name == "TrainingSampler":
            sampler = TrainingSampler(len(dataset), seed=seed)
        elif name == "RepeatFactorTrainingSampler":
            factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
                dataset, cfg.DATALOADER.REPEAT_THRESHOLD)
            sampler = RepeatFactorTrainingSampler(factors, seed=seed)
        else:
            return build_detection_train_loader(cfg, mapper=mapper, dataset=dataset)
        world_size = comm.get_world_size()
        total = cfg.SOLVER.IMS_PER_BATCH
        if total % world_size:
            raise ValueError(f"SOLVER.IMS_PER_BATCH ({total}) must be divisible by the number of processes "
                             f"({world_size})")
        return build_positioned_train_loader(
            dataset, mapper, sampler, batch_size=total // world_size, seed=seed, rank=comm.get_rank(),
            world_size=world_size, aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
            num_workers=cfg.DATALOADER.NUM_WORKERS)

    def build_hooks(self):
        return super().build_hooks() + [PreemptionHook()]

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        from ..data.mapper import DetrDatasetMapper
        from ..data.validation import check_dataset_names

        check_dataset_names([dataset_name], "DATASETS.TEST")
        return build_detection_test_loader(cfg, dataset_name, mapper=DetrDatasetMapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        if dataset_name in synthetic.SPLITS:  # generate an embedded split before the evaluator reads its json
            synthetic.ensure_synthetic(dataset_name)
        return COCOEvaluator(dataset_name, tasks=("bbox",), distributed=True, output_dir=output_folder,
                             use_fast_impl=has_fast_coco_eval())

    def build_writers(self):
        """Console + metrics.json writers, and TensorBoard when it is installed."""
        PathManager.mkdirs(self.cfg.OUTPUT_DIR)
        writers = [CommonMetricPrinter(self.max_iter),
                   JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"))]
        try:
            writers.append(TensorboardXWriter(self.cfg.OUTPUT_DIR))
        except ImportError:
            logger.info("tensorboard is not installed: no TensorBoard event files are written.")
        return writers


# ------------------------------------------------------------------------------------------ setup


def setup(args):
    """Config from the command line (``default_argument_parser`` args): detectron2 defaults + the
    smca_detr keys, ``--config-file``, trailing ``KEY VALUE`` opts; frozen; ``default_setup``."""
    cfg = config_from_args(args)
    cfg.freeze()
    if cfg.DATASETS.SYNTHETIC.ROOT:
        synthetic.set_root(cfg.DATASETS.SYNTHETIC.ROOT)
    default_setup(cfg, args)
    return cfg


# ----------------------------------------------------------------------------------------- launch


def _cpu_worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args, timeout):
    import torch.distributed as dist

    global_rank = machine_rank * num_per_machine + local_rank
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size, rank=global_rank,
                            timeout=timeout)
    if hasattr(comm, "create_local_process_group"):
        comm.create_local_process_group(num_per_machine)
    else:  # detectron2 v0.6: set the per-machine group comm.get_local_rank() reads
        for i in range(world_size // num_per_machine):
            group = dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
            if i == machine_rank:
                comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    try:
        result = main_func(*args)
        # every rank is done before any tears the group down: rank 0 hosts the TCP store, and a rank
        # still inside destroy_process_group when it disappears aborts ("terminate called without an
        # active exception", SIGABRT). Not on an error: the others may never arrive.
        comm.synchronize()
        return result
    finally:
        dist.destroy_process_group()
        # drop detectron2's cached groups now, not in the interpreter's teardown (where freeing a gloo
        # group can abort the process: "terminate called without an active exception")
        comm._LOCAL_PROCESS_GROUP = None
        if hasattr(comm, "_get_global_gloo_group"):
            comm._get_global_gloo_group.cache_clear()


def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None, args=(),
           timeout=timedelta(minutes=30)):
    """detectron2's ``launch`` with these additions: a single process runs ``main_func`` in place
    and returns its result (any device, CPU included); several processes on a machine without CUDA
    use the gloo backend (detectron2 v0.6 only knows NCCL), one per machine running in place;
    SIGTERM / SIGUSR1 received by this process are forwarded to the spawned workers; workers that
    stopped for preemption make this process exit with PREEMPTED_EXIT_CODE too (``Preempted``).
    When one worker fails, the others are terminated (torch's ``spawn``) and the error is raised."""
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        return main_func(*args)
    restore = forward_signals_to_children()
    try:
        return _launch_workers(main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args,
                               timeout)
    except Exception as e:
        if getattr(e, "exit_code", None) == PREEMPTED_EXIT_CODE:  # torch's ProcessExitedException
            raise Preempted(f"workers stopped for preemption ({e})") from None
        raise
    finally:
        restore()


def _launch_workers(main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args, timeout):
    world_size = num_machines * num_gpus_per_machine
    if torch.cuda.is_available():
        from detectron2.engine.launch import launch as d2_launch

        return d2_launch(main_func, num_gpus_per_machine, num_machines=num_machines,
                         machine_rank=machine_rank, dist_url=dist_url, args=args, timeout=timeout)
    import torch.multiprocessing as mp

    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url='auto' only works on one machine; pass --dist-url tcp://HOST:PORT")
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            dist_url = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    if num_gpus_per_machine == 1:  # one process on this machine: this one
        return _cpu_worker(0, main_func, world_size, 1, machine_rank, dist_url, args, timeout)
    mp.spawn(_cpu_worker, nprocs=num_gpus_per_machine,
             args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
             daemon=False)
