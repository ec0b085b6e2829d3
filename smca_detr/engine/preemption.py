"""Preemption: stop at an iteration boundary on SIGTERM / SIGUSR1 with a checkpoint.

Clusters announce the end of a job with a signal: SIGTERM (Slurm's ``scancel``, the end of the
time limit, Kubernetes), SIGUSR1 (Slurm ``--signal=USR1@<seconds>``). While it trains, each
process records the signal instead of dying (:func:`install_handlers`); :class:`PreemptionHook`
all-reduces the flag after every iteration (one 1-element all-reduce), so every rank stops after
the SAME iteration; rank 0
writes ``model_<iteration>.pth`` (atomic, and ``last_checkpoint`` names it), all ranks wait for it,
and the job exits with :data:`PREEMPTED_EXIT_CODE` (75, ``EX_TEMPFAIL``: "try again"), which
``--resume`` continues exactly. ``launch`` forwards the signals from the launcher process to the
workers it spawned and turns the workers' status into its own.
"""
import logging
import multiprocessing
import os
import signal
import threading

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["PREEMPTED_EXIT_CODE", "Preempted", "PreemptionHook", "forward_signals_to_children",
           "install_handlers", "preemption_requested", "restore_handlers"]

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # os.EX_TEMPFAIL; not 128 + 15, which a shell reports for a killed process
SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))
_received = []
_previous = {}  # the handlers install_handlers replaced


class Preempted(SystemExit):
    """Raised by every rank after the preemption checkpoint; exits with PREEMPTED_EXIT_CODE."""

    def __init__(self, message: str = ""):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message

    def __str__(self):
        return self.message or f"preempted (exit status {PREEMPTED_EXIT_CODE})"


def _record(signum, frame):
    _received.append(signum)


def install_handlers() -> bool:
    """Record SIGTERM / SIGUSR1 in this process instead of dying (main thread only; returns whether
    the handlers are installed)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    _received.clear()
    for sig in SIGNALS:
        previous = signal.signal(sig, _record)
        if previous is not _record:
            _previous[sig] = previous
    return True


def restore_handlers() -> None:
    """Put back the handlers that :func:`install_handlers` replaced."""
    if threading.current_thread() is threading.main_thread():
        for sig, handler in list(_previous.items()):
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            del _previous[sig]


def preemption_requested() -> bool:
    return bool(_received)


def forward_signals_to_children():
    """In a launcher process: pass SIGTERM / SIGUSR1 on to its child processes (the training
    workers). Returns a function that restores the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def forward(signum, frame):
        for child in multiprocessing.active_children():
            try:
                os.kill(child.pid, signum)
            except OSError:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in SIGNALS}

    def restore():
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _agree(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank."""
    if comm.get_world_size() == 1:
        return flag
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class PreemptionHook(HookBase):
    """Records SIGTERM / SIGUSR1 during training; after each iteration, stops all ranks with a
    checkpoint if any rank received one. Before and after training (and during the final
    checkpoint and evaluation) the signals act as before (e.g. kill)."""

    def before_train(self):
        install_handlers()

    def after_train(self):
        restore_handlers()

    def after_step(self):
        if not _agree(preemption_requested()):
            if self.trainer.iter + 1 >= self.trainer.max_iter:
                # no iteration left to stop after: the final checkpoint / evaluation may be killed
                restore_handlers()
            return
        it = self.trainer.iter
        self.trainer.checkpointer.save(f"model_{it:07d}", iteration=it)  # rank 0 writes
        comm.synchronize()  # nobody exits (and gets the others killed) before the file is complete
        message = (f"Preempted: stopped after iteration {it} with a checkpoint; continue with --resume "
                   f"(exit status {PREEMPTED_EXIT_CODE})")
        logger.warning(message)
        raise Preempted(message)
