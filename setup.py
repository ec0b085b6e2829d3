#!/usr/bin/env python
"""smca_detr: SMCA-DETR, Conditional DETR and Deformable DETR for detectron2.

detectron2 is not on PyPI: install it first (``python tools/install_detectron2.py`` or from source).
"""
from setuptools import find_packages, setup

setup(
    name="smca_detr",
    version="0.1.0",
    description="Fast-converging DETR detectors (SMCA-DETR, Conditional DETR, Deformable DETR) for detectron2",
    packages=find_packages(include=["smca_detr", "smca_detr.*"]),
    package_data={"smca_detr": ["model_zoo/configs/*.yaml", "model_zoo/configs/demo/*.yaml", "checkpoints/*.pth"]},
    python_requires=">=3.8",
    # torch >= 2.5: torch.library.custom_op / register_fake / register_autograd (2.4, the MSDA op),
    # torch.is_autocast_enabled(device_type) (2.4), torch.serialization.safe_globals (2.5, safe loading).
    # triton >= 3.0 (the release paired with torch 2.4; torch 2.5 wheels pin 3.1): the kernels use
    # tl.static_range, tl.reduce, tl.full, atomic_add(sem=), checked at run time by
    # smca_detr.layers.msda.triton_available(); triton.knobs (3.4+) is optional.
    install_requires=["torch>=2.5", "scipy", "fvcore", "pycocotools", "tqdm"],
    extras_require={"triton": ["triton>=3.0"], "test": ["pytest"],
                    # ONNX export + ONNX Runtime predictor (smca_detr.export); pinned as in requirements.txt
                    "export": ["onnx==1.23.2", "onnxruntime==1.32.0"]},
)
