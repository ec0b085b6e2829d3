"""Pictures of detections and of what the decoder's cross-attention looks at.

Detections: :func:`draw_instances` (detectron2 ``Visualizer`` with the dataset's class names).

Attention (:func:`attention_maps`, then :func:`render_attention`), for one object query of one
decoder layer, as the papers show it, overlaid on the image with the query's predicted box:

* SMCA-DETR (single scale and both multi-scale transformers): per head, the Gaussian spatial prior
  ``exp(log-Gaussian)`` and the modulated co-attention (the softmax weights after the Gaussian was
  added), read from the transformer's ``record_intermediates`` extras. Multi-scale: each memory
  segment is resized to the image; priors are combined by maximum, attention weights by sum.
* Conditional DETR: per head, the spatial attention ``softmax(p_q·p_k)``, the content attention
  ``softmax(c_q·c_k)`` and the combined attention ``softmax(c_q·c_k + p_q·p_k)`` (the one the model
  uses), from the concatenated queries / keys the cross-attention receives (a forward pre-hook; the
  model's forward is unchanged).
* Deformable DETR: the sampling points of every head, coloured (and sized) by their attention
  weight, one panel per feature level plus one with all levels, and the reference point
  (``MSDeformAttn`` sampling record through the transformer's ``record_sampling``).

The first column of the SMCA / Conditional grids is the mean over heads. Pictures are drawn with
matplotlib's Agg canvas (no pyplot, no display needed); every panel is ``panel_width`` pixels wide
and keeps the image's aspect ratio, so a grid of ``R x C`` panels is exactly
``(C * panel_width, R * panel_height)`` pixels (:func:`grid_size`).
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["draw_instances", "draw_boxes", "Panel", "AttentionMaps", "forward_with_internals", "select_query",
           "attention_maps", "render_attention", "grid_size", "panel_size", "transformer_family"]


# --------------------------------------------------------------------------------------- detections


_WARNED_NO_CV2 = False


def draw_instances(image_rgb: np.ndarray, instances, metadata=None, threshold: float = 0.5,
                   scale: float = 1.0) -> np.ndarray:
    """``image_rgb`` (HxWx3 uint8) with the detections scoring >= ``threshold`` drawn by detectron2's
    ``Visualizer`` (class names from ``metadata.thing_classes`` when given). Returns RGB uint8.

    detectron2's visualizer module imports OpenCV (``cv2``); without it the boxes and labels are
    drawn by :func:`draw_boxes` (matplotlib) instead, and one info line says so."""
    global _WARNED_NO_CV2
    instances = instances.to("cpu")
    if instances.has("scores"):
        instances = instances[instances.scores >= threshold]
    try:
        from detectron2.utils.visualizer import Visualizer
    except ImportError as e:
        if not _WARNED_NO_CV2:
            import logging

            logging.getLogger(__name__).info(
                f"detectron2's Visualizer is unavailable ({e}; pip install opencv-python-headless): "
                "drawing boxes with matplotlib instead")
            _WARNED_NO_CV2 = True
        names = metadata.get("thing_classes", None) if metadata is not None else None
        return draw_boxes(image_rgb, instances, names, scale)
    vis = Visualizer(image_rgb, metadata, scale=scale)
    return vis.draw_instance_predictions(instances).get_image()


def draw_boxes(image_rgb: np.ndarray, instances, class_names: Optional[Sequence[str]] = None,
               scale: float = 1.0) -> np.ndarray:
    """Boxes with "class score" labels on ``image_rgb`` (matplotlib Agg), the same picture size as
    detectron2's ``Visualizer`` (image size times ``scale``). Returns RGB uint8."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    h, w = image_rgb.shape[:2]
    W, H = int(round(w * scale)), int(round(h * scale))
    dpi = 100
    fig = Figure(figsize=(W / dpi, H / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.imshow(image_rgb, extent=(0, w, h, 0), interpolation="bilinear")
    boxes = instances.pred_boxes.tensor.numpy() if instances.has("pred_boxes") else np.zeros((0, 4))
    scores = instances.scores.numpy() if instances.has("scores") else None
    classes = instances.pred_classes.numpy() if instances.has("pred_classes") else None
    colors = list(matplotlib.colormaps["tab10"].colors)
    font = max(6.0, min(12.0, 0.02 * max(h, w) * scale))
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        c = int(classes[i]) if classes is not None else 0
        color = colors[c % len(colors)]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.5))
        if class_names is not None and 0 <= c < len(class_names):
            name = class_names[c]
        else:
            name = str(c) if classes is not None else ""
        text = f"{name} {scores[i] * 100:.0f}%" if scores is not None else name
        ax.text(x0, y0, text, color="white", fontsize=font, va="bottom", ha="left",
                bbox=dict(facecolor=color, alpha=0.7, pad=1.0, linewidth=0))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    canvas.draw()
    picture = np.asarray(canvas.buffer_rgba())[..., :3]
    out = np.zeros((H, W, 3), dtype=np.uint8)
    hh, ww = min(H, picture.shape[0]), min(W, picture.shape[1])
    out[:hh, :ww] = picture[:hh, :ww]
    return out


# ------------------------------------------------------------------------------------ model pass


@dataclass
class ForwardResult:
    outputs: Dict                # forward_features output: pred_logits/pred_boxes [L,B,Q,.], extras
    input_hw: Tuple[int, int]    # unpadded network input size
    padded_hw: Tuple[int, int]   # padded batch size (ImageList)
    feature_hw: List[Tuple[int, int]]  # backbone levels fed to the transformer


@torch.no_grad()
def forward_with_internals(model, inputs: Dict) -> ForwardResult:
    """The meta-architecture's inference pass on one input dict, stopping before post-processing
    (so the per-query outputs and the transformer's extras are available)."""
    images = model.preprocess_image([inputs])
    features, masks = model.backbone(images.tensor, images.image_sizes)
    outputs = model.forward_features(features, masks, images.image_sizes)
    return ForwardResult(outputs, tuple(images.image_sizes[0]), tuple(images.tensor.shape[-2:]),
                         [tuple(f.shape[-2:]) for f in features])


def _query_scores(model, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best score and class of every query (``logits [Q, C]``)."""
    logits = logits.float()
    if getattr(model, "focal", True):
        return logits.sigmoid().max(-1)
    return logits.softmax(-1)[..., :-1].max(-1)


def select_query(model, outputs: Dict, query: Union[int, str] = "auto", layer: int = -1) -> Tuple[int, float, int]:
    """``(query index, score, class)``: ``"auto"`` = the highest-scoring query of ``layer``."""
    scores, labels = _query_scores(model, outputs["pred_logits"][layer][0])
    if query == "auto":
        q = int(scores.argmax())
    else:
        q = int(query)
        if not 0 <= q < scores.shape[0]:
            raise ValueError(f"--query {q} out of range: the model has {scores.shape[0]} queries")
    return q, float(scores[q]), int(labels[q])


def transformer_family(model) -> str:
    """``"smca"``, ``"conditional"``, ``"deformable"`` or ``"other"`` from the transformer class."""
    name = type(model.transformer).__name__
    if name.startswith("SMCA"):
        return "smca"
    if name.startswith("Conditional"):
        return "conditional"
    if name.startswith("Deformable"):
        return "deformable"
    return "other"


# ------------------------------------------------------------------------------------- panels


@dataclass
class Panel:
    """One picture of the grid: the image, optionally a heat map and / or points, and the box.

    heatmap: ``[H_in, W_in]`` on the unpadded network input (any non-negative scale; shown
        normalised by its maximum).
    points: ``[N, 2]`` (x, y) in network-input pixels, ``point_values [N]`` their weights.
    marks: ``[K, 2]`` extra (x, y) markers (reference points).
    """

    title: str
    heatmap: Optional[np.ndarray] = None
    points: Optional[np.ndarray] = None
    point_values: Optional[np.ndarray] = None
    marks: Optional[np.ndarray] = None


@dataclass
class AttentionMaps:
    family: str
    layer: int
    query: int
    score: float
    label: int
    box_xyxy: np.ndarray              # the query's predicted box, network-input pixels
    input_hw: Tuple[int, int]
    rows: List[List[Panel]] = field(default_factory=list)
    row_titles: List[str] = field(default_factory=list)


def _to_input_grid(maps: torch.Tensor, padded_hw, input_hw) -> np.ndarray:
    """``[N, h, w]`` maps on the padded feature grid -> ``[N, H_in, W_in]`` (bilinear to the padded
    input size, padding cropped)."""
    up = F.interpolate(maps[:, None].float(), size=tuple(padded_hw), mode="bilinear", align_corners=False)[:, 0]
    return up[:, : input_hw[0], : input_hw[1]].clamp_min(0).cpu().numpy()


def _box_xyxy(outputs: Dict, layer: int, query: int, input_hw) -> np.ndarray:
    cx, cy, w, h = outputs["pred_boxes"][layer][0, query].float().tolist()
    hh, ww = input_hw
    return np.array([(cx - w / 2) * ww, (cy - h / 2) * hh, (cx + w / 2) * ww, (cy + h / 2) * hh])


def _head_rows(per_head: List[np.ndarray], titles: Sequence[str]) -> List[List[Panel]]:
    """Rows of [mean over heads, head 0, head 1, ...] panels from ``[M, H, W]`` stacks."""
    rows = []
    for stack, title in zip(per_head, titles):
        row = [Panel(f"{title}: mean of heads", heatmap=stack.mean(0))]
        row += [Panel(f"{title}: head {m}", heatmap=stack[m]) for m in range(stack.shape[0])]
        rows.append(row)
    return rows


# SMCA ---------------------------------------------------------------------------------------------
def _smca_segments(model, extras: Dict, feature_hw) -> List[Tuple[int, int]]:
    t = model.transformer
    if hasattr(t, "segments") and isinstance(extras.get("src"), (list, tuple)):
        shapes = [tuple(int(v) for v in s.shape[-2:]) for s in extras["src"]]
        return [(seg.height, seg.width) for seg in t.segments(shapes)]
    src = extras.get("src")
    if torch.is_tensor(src) and src.dim() == 4:
        return [tuple(int(v) for v in src.shape[-2:])]
    return [tuple(feature_hw[0])]


def _smca_maps(model, res: ForwardResult, layer: int, query: int):
    extras = res.outputs["extras"]
    n_layers = res.outputs["pred_logits"].shape[0]
    li = layer % n_layers
    gauss = extras[f"dec.{li}.gaussian"][0, :, query].float()          # [G, S]
    weights = extras[f"dec.{li}.cross_attn_weights"][0, :, query].float()  # [M, S]
    m = weights.shape[0]
    prior = torch.nan_to_num(gauss.exp(), nan=0.0, posinf=0.0).expand(m, -1) if gauss.shape[0] == 1 else \
        torch.nan_to_num(gauss.exp(), nan=0.0, posinf=0.0)
    segs = _smca_segments(model, extras, res.feature_hw)
    if sum(h * w for h, w in segs) != weights.shape[-1]:
        raise RuntimeError(f"SMCA memory has {weights.shape[-1]} keys, segments {segs} do not add up")
    prior_img, attn_img, start = None, None, 0
    for h, w in segs:
        p = _to_input_grid(prior[:, start:start + h * w].reshape(m, h, w), _seg_padded(res, h, w), res.input_hw)
        a = _to_input_grid(weights[:, start:start + h * w].reshape(m, h, w), _seg_padded(res, h, w), res.input_hw)
        prior_img = p if prior_img is None else np.maximum(prior_img, p)
        attn_img = a if attn_img is None else attn_img + a
        start += h * w
    return [prior_img, attn_img], ["Gaussian prior", "modulated co-attention"]


def _seg_padded(res: ForwardResult, h: int, w: int) -> Tuple[int, int]:
    """The padded input area a ``h x w`` feature grid covers (its stride times its size, from the
    finest backbone level's stride)."""
    fh, fw = res.feature_hw[0]
    ph, pw = res.padded_hw
    sy, sx = ph / fh, pw / fw  # stride of the finest backbone level
    # coarser grids: the stride ratio is the size ratio rounded to a power of two
    ry = 2 ** round(math.log2(max(fh / h, 1e-6)))
    rx = 2 ** round(math.log2(max(fw / w, 1e-6)))
    return int(round(h * sy * ry)), int(round(w * sx * rx))


# Conditional --------------------------------------------------------------------------------------
def _conditional_maps(model, inputs: Dict, layer: int, query_sel):
    layers = model.transformer.decoder.layers
    li = layer % len(layers)
    captured = {}

    def hook(module, args):
        captured["q"], captured["k"] = args[0].detach(), args[1].detach()
        captured["mask"] = args[3].detach() if len(args) > 3 and args[3] is not None else None

    handle = layers[li].cross_attn.register_forward_pre_hook(hook)
    try:
        res = forward_with_internals(model, inputs)
    finally:
        handle.remove()
    query, score, label = query_sel(res)
    q, k, mask = captured["q"][0, :, query].float(), captured["k"][0].float(), captured["mask"]  # [M,2e], [M,S,2e]
    e = q.shape[-1] // 2
    scale = 1.0 / math.sqrt(q.shape[-1])
    content = torch.einsum("me,mse->ms", q[:, :e], k[..., :e]) * scale
    spatial = torch.einsum("me,mse->ms", q[:, e:], k[..., e:]) * scale
    if mask is not None:
        add = mask[0].reshape(1, -1).float()
        content, spatial = content + add, spatial + add
    maps = [spatial.softmax(-1), content.softmax(-1), (content + spatial).softmax(-1)]
    h, w = res.feature_hw[0]
    imgs = [_to_input_grid(x.reshape(-1, h, w), res.padded_hw, res.input_hw) for x in maps]
    return res, (query, score, label), imgs, ["spatial attention", "content attention", "combined attention"]


# Deformable ---------------------------------------------------------------------------------------
def _deformable_rows(model, res: ForwardResult, layer: int, query: int) -> List[List[Panel]]:
    extras = res.outputs["extras"]
    n_layers = len(extras["dec_sampling_locations"])
    li = layer % n_layers
    loc = extras["dec_sampling_locations"][li][0, query].float()   # [M, L, P, 2] in [0,1] of each level map
    wts = extras["dec_attention_weights"][li][0, query].float()    # [M, L, P]
    shapes = [tuple(int(v) for v in s) for s in extras["spatial_shapes"].tolist()]
    strides = _level_strides(model, res, shapes)
    ref = extras.get("dec_reference_points_input")
    ref = ref[li][0, query].float() if ref is not None else None  # [L, 2|4]
    hi, wi = res.input_hw
    vmax = float(wts.max()) if wts.numel() else 1.0
    level_panels, all_pts, all_w = [], [], []
    for l, ((h, w), s) in enumerate(zip(shapes, strides)):
        pts = loc[:, l].reshape(-1, 2).clone()
        pts[:, 0] *= w * s
        pts[:, 1] *= h * s
        vals = wts[:, l].reshape(-1)
        marks = None
        if ref is not None:
            marks = np.array([[float(ref[l, 0]) * w * s, float(ref[l, 1]) * h * s]])
        level_panels.append(Panel(f"level {l} (stride {s:g}, {h}x{w})", points=pts.numpy(),
                                  point_values=vals.numpy() / max(vmax, 1e-12), marks=marks))
        all_pts.append(pts)
        all_w.append(vals)
    allp = Panel(f"all {len(shapes)} levels: {wts.shape[0]} heads x {wts.shape[2]} points per level",
                 points=torch.cat(all_pts).numpy(), point_values=(torch.cat(all_w) / max(vmax, 1e-12)).numpy(),
                 marks=level_panels[0].marks)
    return [[allp] + level_panels]


def _level_strides(model, res: ForwardResult, shapes) -> List[float]:
    t = model.transformer
    strides = [float(s) for s in getattr(t, "strides", [])]
    if not strides:
        strides = [res.padded_hw[1] / shapes[0][1]]
    while len(strides) < len(shapes):
        strides.append(strides[-1] * 2)
    return strides[: len(shapes)]


# -------------------------------------------------------------------------------------- public


def attention_maps(model, inputs: Dict, query: Union[int, str] = "auto", layer: int = -1) -> AttentionMaps:
    """The attention pictures' data for ``query`` (index or ``"auto"``: the best-scoring query) of
    decoder ``layer`` (negative = from the end) for one model input dict (see
    ``smca_detr.model_zoo.Predictor.inputs``). Raises ValueError for other transformers."""
    family = transformer_family(model)
    model.eval()
    t = model.transformer

    def sel(res):
        return select_query(model, res.outputs, query, layer)

    with torch.no_grad():
        if family == "smca":
            prev = t.record_intermediates
            t.record_intermediates = True
            try:
                res = forward_with_internals(model, inputs)
            finally:
                t.record_intermediates = prev
            q, score, label = sel(res)
            stacks, titles = _smca_maps(model, res, layer, q)
            rows = _head_rows(stacks, titles)
        elif family == "conditional":
            res, (q, score, label), stacks, titles = _conditional_maps(model, inputs, layer, sel)
            rows = _head_rows(stacks, titles)
        elif family == "deformable":
            prev = t.record_sampling
            t.record_sampling = True
            try:
                res = forward_with_internals(model, inputs)
            finally:
                t.record_sampling = prev
            q, score, label = sel(res)
            rows = _deformable_rows(model, res, layer, q)
            titles = ["sampling points coloured by attention weight"]
        else:
            raise ValueError(f"no attention visualisation for {type(t).__name__} (SMCA, Conditional and "
                             "Deformable DETR transformers are supported)")
    n_layers = res.outputs["pred_logits"].shape[0]
    return AttentionMaps(family=family, layer=layer % n_layers, query=q, score=score, label=label,
                         box_xyxy=_box_xyxy(res.outputs, layer, q, res.input_hw), input_hw=res.input_hw,
                         rows=rows, row_titles=titles)


def panel_size(image_hw: Tuple[int, int], panel_width: int) -> Tuple[int, int]:
    """(width, height) in pixels of one panel for an image of size ``image_hw``."""
    h, w = image_hw
    return int(panel_width), max(1, int(round(panel_width * h / w)))


def grid_size(rows: int, cols: int, image_hw: Tuple[int, int], panel_width: int) -> Tuple[int, int]:
    """(width, height) in pixels of a picture of ``rows x cols`` panels."""
    pw, ph = panel_size(image_hw, panel_width)
    return cols * pw, rows * ph


def render_attention(image_rgb: np.ndarray, maps: AttentionMaps, out_path: Optional[str] = None,
                     panel_width: int = 256, class_names: Optional[Sequence[str]] = None,
                     cmap: str = "jet", alpha: float = 0.55) -> np.ndarray:
    """Draw ``maps`` over ``image_rgb`` (the ORIGINAL image, HxWx3 uint8; maps are on the network
    input, which is the image resized) as a grid of panels; write a PNG to ``out_path`` when given.
    Returns the picture (RGB uint8, :func:`grid_size` pixels)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from PIL import Image

    nrows = len(maps.rows)
    ncols = max(len(r) for r in maps.rows)
    pw, ph = panel_size(image_rgb.shape[:2], panel_width)
    width, height = grid_size(nrows, ncols, image_rgb.shape[:2], panel_width)
    background = np.asarray(Image.fromarray(image_rgb).resize((pw, ph), Image.BILINEAR))
    hi, wi = maps.input_hw
    sx, sy = pw / wi, ph / hi
    box = maps.box_xyxy * np.array([sx, sy, sx, sy])
    known = class_names is not None and 0 <= maps.label < len(class_names)
    label = class_names[maps.label] if known else str(maps.label)
    font = max(5.0, min(9.0, pw / 32))

    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    for r, row in enumerate(maps.rows):
        for c, panel in enumerate(row):
            ax = fig.add_axes((c / ncols, 1 - (r + 1) / nrows, 1 / ncols, 1 / nrows))
            ax.set_axis_off()
            ax.imshow(background, extent=(0, pw, ph, 0), interpolation="bilinear")
            if panel.heatmap is not None:
                heat = torch.as_tensor(panel.heatmap, dtype=torch.float32)[None, None]
                heat = F.interpolate(heat, size=(ph, pw), mode="bilinear", align_corners=False)[0, 0].numpy()
                top = float(heat.max())
                ax.imshow(heat / top if top > 0 else heat, extent=(0, pw, ph, 0), cmap=cmap, alpha=alpha,
                          vmin=0.0, vmax=1.0, interpolation="bilinear")
            if panel.points is not None and len(panel.points):
                pts = panel.points * np.array([sx, sy])
                vals = panel.point_values if panel.point_values is not None else np.ones(len(pts))
                order = np.argsort(vals)  # strongest on top
                ax.scatter(pts[order, 0], pts[order, 1], c=vals[order], cmap=cmap, vmin=0.0, vmax=1.0,
                           s=4 + 36 * vals[order], edgecolors="white", linewidths=0.3)
            if panel.marks is not None:
                m = panel.marks * np.array([sx, sy])
                ax.scatter(m[:, 0], m[:, 1], marker="x", c="white", s=30, linewidths=1.5)
            ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False,
                                   edgecolor="lime", linewidth=1.2))
            ax.set_xlim(0, pw)
            ax.set_ylim(ph, 0)
            title = panel.title
            if r == 0 and c == 0:
                title += f"\nquery {maps.query} ({label} {maps.score:.2f}), layer {maps.layer}"
            ax.text(2, 2, title, color="white", fontsize=font, va="top", ha="left",
                    bbox=dict(facecolor="black", alpha=0.5, pad=1.0, linewidth=0))
    canvas.draw()
    picture = np.asarray(canvas.buffer_rgba())[..., :3]
    # the canvas may differ from the requested size by a pixel (float figure size): fix it
    fixed = np.full((height, width, 3), 255, dtype=np.uint8)
    hh, ww = min(height, picture.shape[0]), min(width, picture.shape[1])
    fixed[:hh, :ww] = picture[:hh, :ww]
    if out_path:
        Image.fromarray(fixed).save(out_path)
    return fixed
