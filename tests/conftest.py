import os
import sys
import warnings

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))

sys.path.insert(0, os.path.dirname(__file__))  # parity_common and other test helpers
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tests on tiny tensors (``pytestmark =
    pytest.mark.usefixtures("one_torch_thread")``): deterministic, as fast, and immune to OpenMP
    spin-waits when other processes share the cores (2 threads made such tests ~10x slower on a busy
    2-core machine)."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def tools_on_path():
    """``tools/`` importable (``import convert_deformable_detr``) for a module of tests."""
    path = os.path.join(REPO, "tools")
    sys.path.insert(0, path)
    yield
    sys.path.remove(path)


@pytest.fixture
def propagate_logs(monkeypatch):
    """Log records of fvcore / detectron2 / smca_detr reach ``caplog`` (detectron2's setup_logger,
    run by an earlier test of the session, turns their propagation off)."""
    import logging

    for name in ("fvcore", "detectron2", "smca_detr"):
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
