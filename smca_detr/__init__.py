"""smca_detr: SMCA-DETR, Conditional DETR, Deformable DETR and DETR as a detectron2 plugin.

``import smca_detr`` registers the meta-architecture, transformers, criterion and the embedded
synthetic datasets; heavy optional pieces (Triton kernels, tools) are imported only when used.
"""
from .config import add_smca_detr_config
from . import modeling  # noqa: F401  (registers SmcaDetrDetector and the transformers)

__version__ = "0.1.0"


from . import data  # noqa: F401,E402  (registers the embedded synthetic datasets; nothing generated)

__all__ = ["add_smca_detr_config", "__version__"]
