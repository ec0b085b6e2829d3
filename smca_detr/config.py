"""Config keys of smca_detr: one function, every key commented with its meaning, the paper symbol
and the default of the official code.

Layout:
  MODEL.SMCA_DETR.*              shared by every variant (sizes, heads, matcher, losses, inference)
  MODEL.SMCA_DETR.SMCA.*         SMCA-DETR only (Gao et al., ICCV 2021)
  (Conditional DETR, Meng et al., ICCV 2021, has no hyper-parameter beyond the shared ones)
  MODEL.SMCA_DETR.DEFORMABLE.*   Deformable DETR only (Zhu et al., ICLR 2021)
  INPUT.DETR.*                   the DETR data recipe (random crop branch, empty images)
  SOLVER.*                       AdamW, LR multipliers by parameter name, full-model clipping, bf16
  DATASETS.SYNTHETIC.*           the embedded synthetic dataset

Only keys that exist in detectron2 v0.6 *and* main are assumed; everything else is added here.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_smca_detr_config", "config_from_args"]


def config_from_args(args):
    """The (unfrozen) config of command-line ``args`` (``default_argument_parser``): detectron2's
    defaults + the smca_detr keys, ``--config-file``, trailing ``KEY VALUE`` opts."""
    from detectron2.config import get_cfg

    cfg = add_smca_detr_config(get_cfg())
    if getattr(args, "config_file", ""):
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(list(getattr(args, "opts", None) or []))
    return cfg


def add_smca_detr_config(cfg):
    """Add every smca_detr key to ``cfg`` (a detectron2 CfgNode) in place and return it."""
    cfg.MODEL.META_ARCHITECTURE = "SmcaDetrDetector"
    # torchvision-style RGB normalisation (the official DETR repos use torchvision's ImageNet weights).
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.280, 103.530]
    cfg.MODEL.PIXEL_STD = [58.395, 57.120, 57.375]
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False  # torchvision ResNet puts the stride in the 3x3 conv

    _C = cfg.MODEL.SMCA_DETR = CN()
    # Registry name (SMCA_DETR_TRANSFORMER) of the transformer: "DETRTransformer", "SMCATransformer",
    # "SMCAMultiScaleTransformer", "SMCAConvMultiScaleTransformer", "ConditionalTransformer",
    # "DeformableTransformer". It owns input projections, position encodings and queries.
    _C.TRANSFORMER = "DETRTransformer"
    # Registry name (SMCA_DETR_CRITERION) of the set criterion.
    _C.CRITERION = "SetCriterion"
    # Number of object classes K of the dataset, the one place it is set (80 for COCO). Heads have
    # K logits (focal) or K + 1 (softmax, the last one is "no object" ∅).
    _C.NUM_CLASSES = 80
    # Backbone levels fed to the transformer, finest first (e.g. ["res5"], ["res3","res4","res5"]).
    _C.IN_FEATURES = ["res5"]
    # CPU execution strategy for a detectron2 ResNet backbone (layers/cpu/fused_resnet.py), not a model
    # change: norms folded into the convolutions, oneDNN fused conv+ReLU / conv+add+ReLU, Winograd
    # 3x3 and GEMM 1x1 convolutions where they measured faster (thresholds: constants in
    # fused_resnet.py). Same maths up to float32 rounding; applies only where exact (float32, no
    # autocast, stock detectron2 blocks, frozen or eval norms), otherwise detectron2's own forward
    # runs. False = always detectron2's forward.
    _C.FUSED_CPU_BACKBONE = True
    # Transformer width d (d_model). Official: 256.
    _C.HIDDEN_DIM = 256
    # Attention heads M (nheads). Official: 8. Must divide HIDDEN_DIM.
    _C.NHEADS = 8
    # Encoder / decoder depth. Official: 6 / 6.
    _C.ENC_LAYERS = 6
    _C.DEC_LAYERS = 6
    # FFN hidden size. Official: DETR/SMCA/Conditional 2048, Deformable 1024.
    _C.DIM_FEEDFORWARD = 2048
    # Dropout inside the transformer. Official: 0.1.
    _C.DROPOUT = 0.1
    # Activation of the FFN: "relu" | "gelu" | "glu". Official: relu.
    _C.ACTIVATION = "relu"
    # Pre-norm (LayerNorm before each sub-layer) instead of DETR's post-norm. Official: False.
    _C.PRE_NORM = False
    # Number of object queries N. Official: DETR 100, SMCA / Conditional / Deformable 300.
    _C.NUM_QUERIES = 100
    # Auxiliary decoding losses on every decoder layer (deep supervision). Official: True.
    _C.DEEP_SUPERVISION = True
    # Classification loss: "softmax" (DETR, CE with no-object weight) | "focal" (sigmoid focal loss;
    # SMCA, Conditional, Deformable).
    _C.CLASS_LOSS = "softmax"
    # Weight of the no-object class ∅ in the softmax CE (eos_coef). Official DETR: 0.1.
    _C.NO_OBJECT_WEIGHT = 0.1
    # Focal loss α and γ (Lin et al.). Official: 0.25, 2.0.
    _C.FOCAL_ALPHA = 0.25
    _C.FOCAL_GAMMA = 2.0
    # Prior probability π of the class-logit bias init for focal heads: b = -log((1-π)/π). Official 0.01.
    _C.FOCAL_PRIOR = 0.01
    # Loss weights λ_cls, λ_L1, λ_giou. Official: DETR 1/5/2; SMCA, Conditional, Deformable 2/5/2.
    _C.CLASS_WEIGHT = 1.0
    _C.L1_WEIGHT = 5.0
    _C.GIOU_WEIGHT = 2.0
    # Hungarian matcher costs (set_cost_class / bbox / giou). Official: DETR 1/5/2; others 2/5/2.
    _C.COST_CLASS = 1.0
    _C.COST_BBOX = 5.0
    _C.COST_GIOU = 2.0
    # Detections kept per image at inference (top-k over query x class scores for focal models;
    # DETR keeps one per query). Official: 100.
    _C.TEST_TOPK = 100
    # Temperature of the sine position encoding. Official: 10000.
    _C.POS_TEMPERATURE = 10000

    # ---------------------------------------------------------------- SMCA-DETR
    _C.SMCA = CN()
    # Gaussian scale parametrisation (official `--dynamic_scale`), paper Table 3 ablation rows. The
    # log-Gaussian added to the cross-attention logits is -D/β with dx, dy the distances (feature
    # pixels) of each key to the head's centre and s = point3 output squared (official default type3):
    #   "type1": D = dx²+dy², no point3                       ("fixed scale")
    #   "type2": D = s·(dx²+dy²), one s per head               ("head-specific single scale")
    #   "type3": D = sx·dx²+sy·dy², (sx, sy) per head          ("independent scales", the default)
    #   "type4": D = sx·dx²+sy·dy²+sxy·dx²·dy² per head        ("full covariance"-like)
    _C.SMCA.DYNAMIC_SCALE = "type3"
    # One Gaussian (centre offset + scales) shared by all heads instead of one per head: the paper's
    # "head-shared" ablation row (not in the official code; default False = official).
    _C.SMCA.HEAD_SHARED = False
    # β, the smoothing divisor of the Gaussian log-weight (official `smooth`). Official: 8.
    _C.SMCA.SMOOTH = 8.0
    # Layers of the MLP (layer-0 `point1`) that predicts the reference centre logit (x, y) from
    # norm4(tgt + query_pos); centre = sigmoid · unpadded (w, h) / feature stride. Official: 3.
    _C.SMCA.CENTER_MLP_LAYERS = 3
    # Multi-scale (paper): encoder layout, one entry per encoder layer (length must equal ENC_LAYERS),
    # "intra" (self-attention within each scale, weights shared across scales) | "multi" (self-attention
    # over all scales together). Paper: 2Intra-Multi-2Intra. A comma-separated string also works.
    _C.SMCA.ENCODER_LAYOUT = ["intra", "intra", "multi", "intra", "intra"]
    # Multi-scale (paper): scale-selection attention α = softmax(FC(O_q)) weighting each scale's
    # co-attention output per query. False = the "w/o SSA" ablation row: one softmax over all scales
    # together, no scale-selection FC (point4).
    _C.SMCA.SCALE_SELECTION = True

    # ---------------------------------------------------------------- Deformable DETR
    _C.DEFORMABLE = CN()
    # Feature levels L fed to the deformable transformer: the IN_FEATURES backbone levels, then
    # NUM_FEATURE_LEVELS - len(IN_FEATURES) extra levels made by 3x3 stride-2 convs (the first on the
    # last backbone map). Official: 4 (res3, res4, res5 and one extra); single-scale: 1 (res5).
    # Must be >= len(IN_FEATURES).
    _C.DEFORMABLE.NUM_FEATURE_LEVELS = 4
    # Sampling points K per head and level in encoder / decoder. Official: 4 / 4.
    _C.DEFORMABLE.ENC_N_POINTS = 4
    _C.DEFORMABLE.DEC_N_POINTS = 4
    # Iterative bounding box refinement: per-layer class/box heads, each layer's box refines the
    # reference of the next (detached). Official flag --with_box_refine.
    _C.DEFORMABLE.WITH_BOX_REFINE = False
    # Two-stage: every encoder position proposes a box; the top NUM_QUERIES by the extra encoder head
    # (head set index DEC_LAYERS) seed the decoder's references and queries (the official code ties
    # the proposal count to --num_queries). Official flag --two_stage. Requires WITH_BOX_REFINE=True
    # (the official code crashes without it; we refuse at build time).
    _C.DEFORMABLE.TWO_STAGE = False
    # Implementation of multi-scale deformable attention: "auto" (Triton on CUDA GPUs of compute
    # capability >= 7.0 when triton can run the kernels, else PyTorch; a CUDA fallback warns once
    # with the reason) | "triton" | "pytorch".
    _C.DEFORMABLE.MSDA_IMPL = "auto"

    # ---------------------------------------------------------------- data
    cfg.INPUT.DETR = CN()
    # DETR random-crop branch (p = 0.5): resize shorter side to one of CROP_RESIZE, then random crop
    # of a size in [CROP_MIN, CROP_MAX], then the multi-scale resize. Official: on, 400/500/600, 384..600.
    cfg.INPUT.DETR.CROP_ENABLED = True
    cfg.INPUT.DETR.CROP_RESIZE = [400, 500, 600]
    cfg.INPUT.DETR.CROP_MIN = 384
    cfg.INPUT.DETR.CROP_MAX = 600
    # Keep training images without (non-crowd) annotations: they teach "no object". Official: kept.
    cfg.INPUT.DETR.KEEP_EMPTY = True
    # DETR multi-scale training resize: shorter side 480..800 step 32, longer side <= 1333.
    cfg.INPUT.MIN_SIZE_TRAIN = tuple(range(480, 801, 32))
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    cfg.INPUT.MAX_SIZE_TRAIN = 1333
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False

    cfg.DATASETS.SYNTHETIC = CN()
    # Root of the generated embedded dataset ("" = $SMCA_DETR_DATASETS or ~/.cache/smca_detr).
    cfg.DATASETS.SYNTHETIC.ROOT = ""

    # ---------------------------------------------------------------- solver
    # Optimizer: "ADAMW" (all DETR papers) | "SGD".
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # LR multiplier of the backbone (lr_backbone / lr). Official: 1e-5 / 1e-4 = 0.1.
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Extra LR multipliers by parameter-name substring, parallel lists (Deformable: sampling_offsets
    # and reference_points at 0.1, official `lr_linear_proj_mult`).
    cfg.SOLVER.LR_MULTIPLIER_NAMES = []
    cfg.SOLVER.LR_MULTIPLIER_VALUES = []
    cfg.SOLVER.BASE_LR = 1e-4
    cfg.SOLVER.WEIGHT_DECAY = 1e-4
    # AdamW as one fused kernel over all parameters (torch's ``fused=True``) where this PyTorch
    # supports it for the parameters' device and dtype; same update rule as the per-tensor loop, about
    # 4x faster on CPU (R50 SMCA: 32 ms vs 121 ms per step on 2 cores). False = per-tensor loop.
    cfg.SOLVER.FUSED_OPTIMIZER = True
    # Gradient clipping over the whole model's gradient norm (official clip_max_norm 0.1).
    # CLIP_TYPE "full_model" is added by smca_detr; "value" / "norm" are detectron2's per-parameter ones.
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.1
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    # Autocast dtype when SOLVER.AMP.ENABLED: "float16" (with GradScaler) | "bfloat16" (no scaler;
    # also works on CPU). Matcher and losses always run in float32. (Newer detectron2 defines it.)
    if "PRECISION" not in cfg.SOLVER.AMP:
        cfg.SOLVER.AMP.PRECISION = "float16"
    return cfg
