"""Pictures of detections and of what the decoder's cross-attention looks at.

Detections: :func:`draw_instances` (detectron2 ``Visualizer`` with the dataset's class names).

Attention (:func:`attention_maps`, then :func:`render_attention`), for one object query of one
decoder layer, as the papers show it, overlaid on the image with the query's predicted box, drawn
from what the transformer records (``record_intermediates``; the agreed keys of
``DetrTransformerBase``), whatever the transformer:

* ``dec.{l}.gaussian`` (SMCA-DETR): per head, the spatial prior ``exp(log-Gaussian)`` and the
  modulated co-attention; memory segments are resized to the image, priors combined by maximum,
  attention weights by sum;
* ``dec.{l}.spatial_logits`` / ``content_logits`` (Conditional DETR): per head, the spatial, content
  and combined (the model's) attention;
* ``dec.{l}.sampling_locations`` (Deformable DETR): the sampling points of every head, coloured (and
  sized) by their weight, one panel per level plus one with all levels, and the reference point.

The first column of the heat-map grids is the mean over heads. Pictures are drawn with
matplotlib's Agg canvas (no pyplot, no display needed); every panel is ``panel_width`` pixels wide
and keeps the image's aspect ratio, so a grid of ``R x C`` panels is exactly
``(C * panel_width, R * panel_height)`` pixels (:func:`grid_size`).
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["draw_instances", "draw_boxes", "Panel", "AttentionMaps", "select_query", "attention_maps",
           "render_attention", "grid_size", "panel_size"]


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
    """Predicted boxes (``instances``: ``pred_boxes``, ``scores``, ``pred_classes``) with "class score"
    labels on ``image_rgb`` (matplotlib Agg), the same picture size as detectron2's ``Visualizer``
    (image size times ``scale``). Returns RGB uint8."""
    import matplotlib
    from matplotlib.patches import Rectangle

    h, w = image_rgb.shape[:2]
    W, H = int(round(w * scale)), int(round(h * scale))
    fig = _agg_figure(W, H)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.imshow(image_rgb, extent=(0, w, h, 0), interpolation="bilinear")
    colors = list(matplotlib.colormaps["tab10"].colors)
    font = max(6.0, min(12.0, 0.02 * max(h, w) * scale))
    for (x0, y0, x1, y1), score, c in zip(instances.pred_boxes.tensor.numpy(), instances.scores.numpy(),
                                          instances.pred_classes.tolist()):
        color = colors[c % len(colors)]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.5))
        name = class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)
        ax.text(x0, y0, f"{name} {score * 100:.0f}%", color="white", fontsize=font, va="bottom", ha="left",
                bbox=dict(facecolor=color, alpha=0.7, pad=1.0, linewidth=0))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    return _rendered(fig, W, H, fill=0)


def _agg_figure(width: int, height: int, **kwargs):
    """A matplotlib Figure of ``width x height`` pixels on an Agg canvas (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / 100, height / 100), dpi=100, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _rendered(fig, width: int, height: int, fill: int) -> np.ndarray:
    """``fig`` drawn, as RGB uint8 of exactly ``height x width`` (the canvas may differ from the
    requested size by a pixel: float figure size; cropped, or padded with ``fill``)."""
    fig.canvas.draw()
    picture = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    out = np.full((height, width, 3), fill, dtype=np.uint8)
    hh, ww = min(height, picture.shape[0]), min(width, picture.shape[1])
    out[:hh, :ww] = picture[:hh, :ww]
    return out


# ------------------------------------------------------------------------------------ model pass


def select_query(model, outputs: Dict, query: Union[int, str] = "auto", layer: int = -1) -> Tuple[int, float, int]:
    """``(query index, score, class)``: ``"auto"`` = the highest-scoring query of ``layer``."""
    logits = outputs["pred_logits"][layer][0].float()
    probs = logits.sigmoid() if getattr(model, "focal", True) else logits.softmax(-1)[..., :-1]
    scores, labels = probs.max(-1)
    if query == "auto":
        q = int(scores.argmax())
    else:
        q = int(query)
        if not 0 <= q < scores.shape[0]:
            raise ValueError(f"--query {q} out of range: the model has {scores.shape[0]} queries")
    return q, float(scores[q]), int(labels[q])


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
    transformer: str                  # the transformer's class name
    layer: int
    query: int
    score: float
    label: int
    box_xyxy: np.ndarray              # the query's predicted box, network-input pixels
    input_hw: Tuple[int, int]
    rows: List[List[Panel]] = field(default_factory=list)


def _memory_images(values: torch.Tensor, extras: Dict, input_hw, combine) -> np.ndarray:
    """``[N, S]`` values over the decoder memory -> ``[N, H_in, W_in]``: every memory segment
    (``memory_shapes`` / ``memory_strides``) bilinearly resized to the padded input area it covers,
    padding cropped, segments combined by ``combine`` (``np.maximum`` or ``np.add``)."""
    shapes = extras["memory_shapes"]
    if sum(h * w for h, w in shapes) != values.shape[-1]:
        raise RuntimeError(f"the memory has {values.shape[-1]} keys, its segments {shapes} do not add up")
    out, start = None, 0
    for (h, w), s in zip(shapes, extras["memory_strides"]):
        seg = values[:, start:start + h * w].reshape(-1, 1, h, w)
        up = F.interpolate(seg, size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False)[:, 0]
        img = up[:, : input_hw[0], : input_hw[1]].clamp_min(0).cpu().numpy()
        out = img if out is None else combine(out, img)
        start += h * w
    return out


def _attention_rows(extras: Dict, li: int, query: int, input_hw) -> List[List[Panel]]:
    """Rows of [mean over heads, head 0, head 1, ...] heat maps: SMCA's Gaussian prior and modulated
    co-attention, Conditional DETR's spatial, content and combined attention, else the attention."""
    weights = extras[f"dec.{li}.cross_attn_weights"][0, :, query].float()  # [M, S]
    if f"dec.{li}.gaussian" in extras:
        prior = torch.nan_to_num(extras[f"dec.{li}.gaussian"][0, :, query].float().exp(), nan=0.0, posinf=0.0)
        maps = [(prior.expand(weights.shape[0], -1), "Gaussian prior", np.maximum),
                (weights, "modulated co-attention", np.add)]
    elif f"dec.{li}.spatial_logits" in extras:
        maps = [(extras[f"dec.{li}.{k}_logits"][0, :, query].float().softmax(-1), f"{k} attention", np.add)
                for k in ("spatial", "content")] + [(weights, "combined attention", np.add)]
    else:
        maps = [(weights, "cross-attention", np.add)]
    rows = []
    for values, title, combine in maps:
        stack = _memory_images(values, extras, input_hw, combine)
        rows.append([Panel(f"{title}: mean of heads", heatmap=stack.mean(0))]
                    + [Panel(f"{title}: head {m}", heatmap=stack[m]) for m in range(stack.shape[0])])
    return rows


def _sampling_rows(extras: Dict, li: int, query: int) -> List[List[Panel]]:
    """One row: the sampling points of every head coloured by their weight, all levels together, then
    one panel per level; the reference point marked."""
    loc = extras[f"dec.{li}.sampling_locations"][0, query].float()  # [M, L, P, 2] in [0,1] of each level
    wts = extras[f"dec.{li}.sampling_weights"][0, query].float()    # [M, L, P]
    ref = extras[f"dec.{li}.reference_points"][0, query].float()    # [L, 2|4]
    vmax = max(float(wts.max()) if wts.numel() else 1.0, 1e-12)
    panels = []
    for l, ((h, w), s) in enumerate(zip(extras["memory_shapes"], extras["memory_strides"])):
        size = torch.tensor([float(w * s), float(h * s)])
        panels.append(Panel(f"level {l} (stride {s:g}, {h}x{w})", points=(loc[:, l].reshape(-1, 2) * size).numpy(),
                            point_values=(wts[:, l].reshape(-1) / vmax).numpy(), marks=(ref[l, :2] * size)[None].numpy()))
    every = Panel(f"all {len(panels)} levels: {wts.shape[0]} heads x {wts.shape[2]} points per level",
                  points=np.concatenate([p.points for p in panels]), marks=panels[0].marks,
                  point_values=np.concatenate([p.point_values for p in panels]))
    return [[every] + panels]


# -------------------------------------------------------------------------------------- public


def attention_maps(model, inputs: Dict, query: Union[int, str] = "auto", layer: int = -1) -> AttentionMaps:
    """The attention pictures' data for ``query`` (index or ``"auto"``: the best-scoring query) of
    decoder ``layer`` (negative = from the end) for one model input dict (see
    ``smca_detr.model_zoo.Predictor.inputs``), from the transformer's recorded intermediates (the
    agreed keys of ``DetrTransformerBase``). Raises ValueError for a transformer that records none."""
    model.eval()
    t = model.transformer
    with torch.no_grad(), t.recording():  # the inference pass, stopping before post-processing
        images = model.preprocess_image([inputs])
        features, masks = model.backbone(images.tensor, images.image_sizes)
        outputs = model.forward_features(features, masks, images.image_sizes)
    input_hw = tuple(images.image_sizes[0])
    extras, li = outputs["extras"], layer % outputs["pred_logits"].shape[0]
    q, score, label = select_query(model, outputs, query, layer)
    if f"dec.{li}.sampling_locations" in extras:
        rows = _sampling_rows(extras, li, q)
    elif f"dec.{li}.cross_attn_weights" in extras:
        rows = _attention_rows(extras, li, q, input_hw)
    else:
        raise ValueError(f"no attention visualisation for {type(t).__name__}: it records neither "
                         f"dec.{{l}}.cross_attn_weights nor dec.{{l}}.sampling_locations (SMCA, Conditional and "
                         "Deformable DETR do)")
    cx, cy, w, h = outputs["pred_boxes"][layer][0, q].float().tolist()
    hh, ww = input_hw
    box = np.array([(cx - w / 2) * ww, (cy - h / 2) * hh, (cx + w / 2) * ww, (cy + h / 2) * hh])
    return AttentionMaps(transformer=type(t).__name__, layer=li, query=q, score=score, label=label, box_xyxy=box,
                         input_hw=input_hw, rows=rows)


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

    fig = _agg_figure(width, height, facecolor="white")
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
    fixed = _rendered(fig, width, height, fill=255)
    if out_path:
        Image.fromarray(fixed).save(out_path)
    return fixed
