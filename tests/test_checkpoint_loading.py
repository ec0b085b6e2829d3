"""Loading weights files (MODEL.WEIGHTS through SmcaDetrCheckpointer, the converters): weights of
another class count skip the class head with one warning, weights that do not match the model are
errors naming the keys, backbone-only weights initialise the backbone, and crafted pickles are
refused by every loader without running their code.

Resume and atomic saves are tested in test_engine.py and test_resume.py, official checkpoints in
test_official_weights.py.
"""
import importlib
import importlib.util
import os
import pickle

import pytest
import torch

from detectron2.utils.env import seed_all_rng

import smca_detr  # noqa: F401
from smca_detr.checkpoint import UnsafeCheckpointError, safe_torch_load
from smca_detr.checkpoint import CheckpointMismatchError, SmcaDetrCheckpointer
from smca_detr.engine import Trainer
from train_step_helpers import build, captured, make_cfg, synthetic_root  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def tiny_detr():
    return build(make_cfg(), seed=0)


def _save(tmp_path, name, state_dict, **extra):
    path = tmp_path / name
    torch.save({"model": state_dict, **extra}, path)
    return str(path)


def test_weights_with_another_class_count_skip_the_class_head_with_one_warning(tmp_path, synthetic_root):
    src = build(make_cfg(), seed=1)  # 3 classes, softmax head: 4 logits
    weights = _save(tmp_path, "three_classes.pth", src.state_dict())
    cfg = make_cfg(["MODEL.WEIGHTS", weights, "DATASETS.TRAIN", "('smca_synthetic_tiny_train',)",
                    "MODEL.SMCA_DETR.NUM_CLASSES", "6"], output_dir=tmp_path / "out")  # the 6 shapes
    seed_all_rng(2)
    trainer = Trainer(cfg)
    model = trainer.model
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("heads.class_embed.")}
    with captured("smca_detr", "fvcore", "detectron2") as warnings:
        trainer.resume_or_load(resume=False)  # MODEL.WEIGHTS through SmcaDetrCheckpointer
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    msg = warnings[0].getMessage()
    for part in ("three_classes.pth", "heads.class_embed.weight", "heads.class_embed.bias",
                 "3 classes (4 logits)", "6 classes (7 logits)"):
        assert part in msg, (part, msg)
    sd_src = src.state_dict()
    for k, v in model.state_dict().items():
        if k in head_before:
            assert torch.equal(v, head_before[k]), k  # kept its initialisation
        else:
            assert torch.equal(v, sd_src[k]), k  # everything else loaded
    assert trainer.start_iter == 0


def test_weights_not_matching_the_model_are_errors_naming_the_keys(tmp_path, tiny_detr):
    sd = tiny_detr.state_dict()
    model = build(make_cfg(), seed=3)
    ckpt = SmcaDetrCheckpointer(model)

    missing = {k: v for k, v in sd.items() if k != "transformer.query_embed.weight"}
    with pytest.raises(CheckpointMismatchError, match=r"missing\.pth.*transformer\.query_embed\.weight"):
        ckpt.load(_save(tmp_path, "missing.pth", missing))
    with pytest.raises(CheckpointMismatchError, match=r"does not have: transformer\.extra\.weight"):
        ckpt.load(_save(tmp_path, "unexpected.pth", {**sd, "transformer.extra.weight": torch.zeros(2)}))
    other = build(make_cfg(["MODEL.SMCA_DETR.NUM_QUERIES", "9"]), seed=3).state_dict()
    with pytest.raises(CheckpointMismatchError, match=r"transformer\.query_embed\.weight: \(9, 32\) vs \(6, 32\)"):
        ckpt.load(_save(tmp_path, "queries.pth", other))
    # a class head that differs in more than the class count is not "another dataset"
    wide = dict(sd, **{"heads.class_embed.weight": torch.zeros(4, 16)})
    with pytest.raises(CheckpointMismatchError, match=r"heads\.class_embed\.weight: \(4, 16\) vs \(4, 32\)"):
        ckpt.load(_save(tmp_path, "wide.pth", wide))
    # the failed loads left the checkpointer usable (detectron2 main keeps per-load state in it)
    ckpt.load(_save(tmp_path, "same.pth", sd))
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())

    # a matching checkpoint loads silently and completely
    fresh = build(make_cfg(), seed=4)
    with captured("smca_detr", "fvcore", "detectron2") as warnings:
        SmcaDetrCheckpointer(fresh).load(_save(tmp_path, "same.pth", sd))
    assert warnings == [] and all(torch.equal(v, sd[k]) for k, v in fresh.state_dict().items())


def test_backbone_only_weights_initialise_the_backbone(tmp_path, tiny_detr):
    sd = tiny_detr.state_dict()
    backbone = {k: v for k, v in sd.items() if k.startswith("backbone.")}
    model = build(make_cfg(), seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    SmcaDetrCheckpointer(model).load(_save(tmp_path, "backbone.pth", backbone))
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k] if k.startswith("backbone.") else before[k]), k
    # a detectron2 model-zoo style .pkl (numpy, backbone names without prefix, name-matching heuristics):
    # read by the restricted unpickler, matched by detectron2's heuristics
    zoo = {k[len("backbone.body."):]: v.numpy() for k, v in backbone.items()}
    pkl = tmp_path / "R-18.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": zoo, "__author__": "test", "matching_heuristics": True}, f)
    model = build(make_cfg(), seed=6)
    SmcaDetrCheckpointer(model).load(str(pkl))
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items() if k.startswith("backbone."))
    # ... but a backbone checkpoint that does not cover the backbone is an error
    partial = {k: v for k, v in backbone.items() if ".res5." not in k}
    with pytest.raises(CheckpointMismatchError, match=r"backbone\.body\.res5\.0\.conv1\.weight"):
        SmcaDetrCheckpointer(build(make_cfg(), seed=7)).load(_save(tmp_path, "partial.pth", partial))


# ------------------------------------------------------------------------------ untrusted files


class _Payload:
    """Unpickling this creates the directory ``marker``: proof that pickled code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _crafted(path, marker, kind):
    payload = {"model": {"transformer.w": torch.zeros(2)}, "args": _Payload(marker)}
    if kind == "torch":
        torch.save(payload, path)
    elif kind == "torch_legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    return str(path)


def _tool_main(script):
    spec = importlib.util.spec_from_file_location(f"rel_{script}", os.path.join(REPO, "tools", f"{script}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_the_payload_is_live(tmp_path):
    """Sanity check of the test itself: plain unpickling does run the payload."""
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(proof)))
    assert proof.is_dir()


def _loaders(tiny_model):
    def checkpointer(path):  # MODEL.WEIGHTS: what Trainer.resume_or_load / train_net --eval-only run
        SmcaDetrCheckpointer(tiny_model).resume_or_load(path, resume=False)

    yield "safe_torch_load", safe_torch_load, ("torch", "torch_legacy", "pickle")
    yield "MODEL.WEIGHTS", checkpointer, ("torch", "torch_legacy", "pickle")
    # the library entry points of the official-checkpoint converters that take a path
    for module, func in (("smca", "split_official_checkpoint"), ("smca_multiscale", "convert_official_smca_multiscale"),
                         ("conditional", "convert_official_conditional_detr")):
        if importlib.util.find_spec(f"smca_detr.checkpoint.{module}") is None:
            continue
        fn = getattr(importlib.import_module(f"smca_detr.checkpoint.{module}"), func, None)
        if fn is not None:
            yield f"checkpoint.{module}.{func}", fn, ("torch",)
    for script in ("convert_smca_detr", "convert_conditional_detr", "convert_deformable_detr",
                   "compact_parity_fixture"):
        if os.path.isfile(os.path.join(REPO, "tools", f"{script}.py")):
            main = _tool_main(script)
            yield f"tools/{script}.py", (lambda p, main=main: main([p, p + ".converted.pth"])), ("torch",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_crafted_pickle_is_refused_and_never_runs(tmp_path, tiny_detr):
    tried = []
    for label, load, kinds in _loaders(tiny_detr):
        for kind in kinds:
            for ext in ((".pth", ".pkl", ".bin", "") if label == "MODEL.WEIGHTS" else (".pth",)):
                marker = tmp_path / f"ran_{len(tried)}"
                path = _crafted(tmp_path / f"evil_{len(tried)}{ext}", marker, kind)
                with pytest.raises((UnsafeCheckpointError, pickle.UnpicklingError)) as info:
                    load(path)
                assert os.path.basename(path) in str(info.value) or "weights_only" in str(info.value), \
                    (label, kind, ext, str(info.value))
                assert not marker.exists(), (label, kind, ext)
                assert not os.path.exists(path + ".converted.pth"), label
                tried.append((label, kind, ext))
    assert len(tried) >= 15, tried
