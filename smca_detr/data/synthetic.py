"""A small, deterministic synthetic detection dataset in COCO format ("smca_synthetic_*").

Images (192..256 px sides) show 0..6 coloured shapes (circle, square, triangle, star, cross, ring)
of small / medium / large size on textured backgrounds (gradients, stripes, checkers, noise), with
partial occlusion between shapes (each shape keeps >= 45% of its pixels visible). Boxes are the
*visible* extent of each shape (as in COCO); "area" is the box area (no masks are published).

Layout under the root (``$SMCA_DETR_DATASETS``, else ``~/.cache/smca_detr/synthetic``; overridable
with :func:`set_root` / ``cfg.DATASETS.SYNTHETIC.ROOT``)::

    <root>/<split>/000000.jpg ...
    <root>/<split>.json          COCO instances json, written last: it marks a complete split

Generation happens on first use (never at import), is deterministic (one numpy Generator per
split seed and image index), atomic (written into a temporary directory and renamed into place,
under a file lock) and versioned (``info.version`` in the json; a different
:data:`GENERATOR_VERSION` triggers regeneration).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json

__all__ = ["CATEGORIES", "GENERATOR_VERSION", "SPLITS", "SplitSpec", "ensure_synthetic", "generate_split", "get_root",
           "load_synthetic", "register_synthetic_datasets", "render_image", "set_root", "split_paths"]

logger = logging.getLogger(__name__)

# Bump whenever the output of the generator changes: existing caches are then regenerated.
GENERATOR_VERSION = 1

CATEGORIES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")


@dataclass(frozen=True)
class SplitSpec:
    dirname: str  # <root>/<dirname>/ images, <root>/<dirname>.json annotations
    num_images: int
    seed: int
    # every `empty_every`-th image (index % empty_every == empty_every - 1) has no object; 0 = never
    empty_every: int = 0


SPLITS: Dict[str, SplitSpec] = {
    "smca_synthetic_train": SplitSpec("train", 2000, seed=1001, empty_every=32),
    "smca_synthetic_val": SplitSpec("val", 200, seed=2002),
    # same distribution, never trained or reported on: for choosing test-time settings (e.g. the
    # test scale of the demo recipe) without tuning them on the val split that is reported
    "smca_synthetic_holdout": SplitSpec("holdout", 200, seed=5005),
    "smca_synthetic_tiny_train": SplitSpec("tiny_train", 16, seed=3003, empty_every=8),
    "smca_synthetic_tiny_val": SplitSpec("tiny_val", 8, seed=4004),
}

_ENV_VAR = "SMCA_DETR_DATASETS"
_root_override: Optional[str] = None

# ----------------------------------------------------------------------------------------- root


def get_root(root: Optional[str] = None) -> str:
    """The dataset root: ``root`` if given, else the one from :func:`set_root`, else
    ``$SMCA_DETR_DATASETS``, else ``~/.cache/smca_detr/synthetic``."""
    for candidate in (root, _root_override, os.environ.get(_ENV_VAR)):
        if candidate:
            return os.path.abspath(os.path.expanduser(str(candidate)))
    return os.path.join(os.path.expanduser("~"), ".cache", "smca_detr", "synthetic")


def set_root(root: Optional[str]) -> str:
    """Use ``root`` for the synthetic datasets (``None`` / ``""``: back to the environment default,
    so ``set_root(cfg.DATASETS.SYNTHETIC.ROOT)`` is always right) and re-register them so that
    ``MetadataCatalog`` points at the new files. Returns the resolved root."""
    global _root_override
    _root_override = str(root) if root else None
    resolved = get_root()
    register_synthetic_datasets(resolved)
    return resolved


def _spec(name: str) -> SplitSpec:
    if name not in SPLITS:
        raise KeyError(f"Unknown synthetic dataset {name!r}; known: {sorted(SPLITS)}")
    return SPLITS[name]


def split_paths(name: str, root: Optional[str] = None) -> Tuple[str, str]:
    """(json_file, image_root) of a split, whether or not it has been generated."""
    spec = _spec(name)
    base = get_root(root)
    return os.path.join(base, spec.dirname + ".json"), os.path.join(base, spec.dirname)


# ------------------------------------------------------------------------------------ rendering

_SIZE_RANGES = {  # longest side (px) of the shape's full extent per COCO size class
    "small": (10, 26),
    "medium": (36, 84),
    "large": (104, 170),
}
_SIZE_PROBS = (("small", 0.35), ("medium", 0.45), ("large", 0.20))


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """float32 HxWx3 textured background in [0, 255]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0 = rng.uniform(0, 255, 3).astype(np.float32)
    c1 = rng.uniform(0, 255, 3).astype(np.float32)
    kind = rng.integers(0, 4)
    theta = rng.uniform(0, 2 * math.pi)
    proj = xx * math.cos(theta) + yy * math.sin(theta)
    if kind == 0:  # linear gradient
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
    elif kind == 1:  # sinusoidal stripes
        period = rng.uniform(6, 40)
        t = 0.5 + 0.5 * np.sin(proj * (2 * math.pi / period))
    elif kind == 2:  # checkerboard
        cell = int(rng.integers(8, 40))
        t = (((xx // cell) + (yy // cell)) % 2).astype(np.float32)
    else:  # smooth blobs (low-frequency noise upsampled)
        gh, gw = int(rng.integers(2, 6)), int(rng.integers(2, 6))
        coarse = rng.uniform(0, 255, (gh, gw)).astype(np.uint8)
        t = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), np.float32) / 255.0
    img = c0 + t[..., None] * (c1 - c0)
    img += rng.uniform(2, 14) * rng.standard_normal((h, w, 1), dtype=np.float32)  # luminance noise
    return img


def _regular_polygon(cx, cy, r, n, rot):
    return [(cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n)) for k in range(n)]


def _shape_mask(rng: np.random.Generator, cat: int, cx: float, cy: float, size: float, h: int, w: int) -> np.ndarray:
    """Boolean HxW mask of one shape whose full extent is about ``size`` px, centred at (cx, cy)."""
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    r = size / 2.0
    rot = rng.uniform(0, 2 * math.pi)
    name = CATEGORIES[cat]
    if name == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif name == "square":
        d.polygon(_regular_polygon(cx, cy, r, 4, math.pi / 4 + rng.uniform(-0.4, 0.4)), fill=255)
    elif name == "triangle":
        d.polygon(_regular_polygon(cx, cy, r, 3, rot), fill=255)
    elif name == "star":
        inner = r * rng.uniform(0.38, 0.5)
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else inner
            a = rot + math.pi * k / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        d.polygon(pts, fill=255)
    elif name == "cross":
        t = r * rng.uniform(0.28, 0.4)  # half arm thickness
        a = rng.uniform(-0.3, 0.3)
        ca, sa = math.cos(a), math.sin(a)
        local = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t), (-t, -t)]
        d.polygon([(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in local], fill=255)
    elif name == "ring":
        ry = r * rng.uniform(0.7, 1.0)  # ring / ellipse outline
        width = max(2, int(round(r * rng.uniform(0.22, 0.35))))
        d.ellipse([cx - r, cy - ry, cx + r, cy + ry], outline=255, width=width)
    else:  # pragma: no cover
        raise AssertionError(name)
    return np.asarray(m) > 0


def _object_colour(rng: np.random.Generator, bg_mean: np.ndarray) -> np.ndarray:
    for _ in range(20):
        c = rng.uniform(0, 255, 3)
        if np.linalg.norm(c - bg_mean) > 90:
            return c.astype(np.float32)
    return (255.0 - bg_mean).astype(np.float32)


def render_image(seed: int, index: int, empty: bool = False):
    """Render image ``index`` of the split with ``seed``.

    Returns (uint8 HxWx3 RGB array, list of objects ``{"category": int 0-based,
    "bbox": [x, y, w, h] visible extent, "area": w * h}``)."""
    rng = np.random.default_rng([seed, index])
    h, w = int(rng.integers(192, 257)), int(rng.integers(192, 257))
    img = _background(rng, h, w)
    bg_mean = img.reshape(-1, 3).mean(0)
    n_obj = 0 if empty else int(rng.integers(1, 7))

    masks: List[np.ndarray] = []  # full masks of the placed shapes (clipped to the image)
    cats: List[int] = []
    paint = []  # (colour, cx, cy, shading gradient x, y) per placed shape
    visible = np.full((h, w), -1, np.int16)  # index of the top-most shape at each pixel
    size_names = [s for s, _ in _SIZE_PROBS]
    size_p = [p for _, p in _SIZE_PROBS]
    for _ in range(n_obj):
        cat = int(rng.integers(0, len(CATEGORIES)))
        for _attempt in range(10):
            lo, hi = _SIZE_RANGES[size_names[rng.choice(len(size_names), p=size_p)]]
            size = float(min(rng.uniform(lo, hi), 0.9 * min(h, w)))
            margin = size * 0.3  # shapes may stick out of the image by up to ~20% of their size
            cx = rng.uniform(margin, w - margin)
            cy = rng.uniform(margin, h - margin)
            m = _shape_mask(rng, cat, cx, cy, size, h, w)
            if m.sum() < 12:
                continue
            # partial occlusion only: every earlier shape must keep >= 45% of its own pixels visible
            ok = True
            for j, mj in enumerate(masks):
                still = np.count_nonzero((visible == j) & ~m)
                if still < 0.45 * np.count_nonzero(mj) or still < 12:
                    ok = False
                    break
            if ok:
                masks.append(m)
                cats.append(cat)
                visible[m] = len(masks) - 1  # later shapes lie on top
                # shading: a linear ramp across the shape, so objects are not flat colours
                a = rng.uniform(0, 2 * math.pi)
                gain = rng.uniform(0.0, 0.35) / max(size / 2.0, 1.0)
                paint.append((_object_colour(rng, bg_mean), cx, cy, math.cos(a) * gain, math.sin(a) * gain))
                break

    # paint from the final visibility map: pixels and boxes come from the same source
    for j, (colour, cx, cy, gx, gy) in enumerate(paint):
        yy, xx = np.nonzero(visible == j)
        shade = 1.0 + (xx - cx) * gx + (yy - cy) * gy
        img[yy, xx] = colour[None, :] * shade[:, None].astype(np.float32)

    img += rng.uniform(1, 8) * rng.standard_normal((h, w, 3), dtype=np.float32)  # colour noise
    img = np.clip(img + 0.5, 0, 255).astype(np.uint8)

    objects = []
    for j, cat in enumerate(cats):
        ys, xs = np.nonzero(visible == j)  # never empty: the occlusion rule keeps >= 12 pixels visible
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        # no masks are published, so "area" (COCO size classes small/medium/large) is the box area
        objects.append({"category": cat, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
    return img, objects


# ----------------------------------------------------------------------------------- generation


def _is_complete(name: str, root: str) -> bool:
    json_file, image_root = split_paths(name, root)
    if not (os.path.isfile(json_file) and os.path.isdir(image_root)):
        return False
    try:
        with open(json_file) as f:
            info = json.load(f).get("info", {})
    except (OSError, ValueError):
        return False
    spec = _spec(name)
    return (
        info.get("version") == GENERATOR_VERSION
        and info.get("num_images") == spec.num_images
        and info.get("seed") == spec.seed
        and len(os.listdir(image_root)) == spec.num_images
    )


@contextlib.contextmanager
def _lock(path: str):
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_split(name: str, out_dir: str, progress: bool) -> Tuple[str, str]:
    """Write images into ``out_dir/<dirname>/`` and the json to ``out_dir/<dirname>.json``."""
    spec = _spec(name)
    image_dir = os.path.join(out_dir, spec.dirname)
    os.makedirs(image_dir)
    images, annotations = [], []
    indices = range(spec.num_images)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"generating {name}", unit="img", leave=False)
    for i in indices:
        empty = spec.empty_every > 0 and i % spec.empty_every == spec.empty_every - 1
        img, objects = render_image(spec.seed, i, empty=empty)
        file_name = f"{i:06d}.jpg"
        Image.fromarray(img).save(os.path.join(image_dir, file_name), quality=92)
        image_id = i + 1
        images.append({"id": image_id, "file_name": file_name, "height": img.shape[0], "width": img.shape[1]})
        for obj in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": obj["category"] + 1,
                    "bbox": obj["bbox"],
                    "area": obj["area"],
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {
            "description": f"smca_detr synthetic shapes: {name}",
            "version": GENERATOR_VERSION,
            "seed": spec.seed,
            "num_images": spec.num_images,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(CATEGORIES)],
    }
    json_file = os.path.join(out_dir, spec.dirname + ".json")
    with open(json_file, "w") as f:
        json.dump(coco, f, separators=(",", ":"))
    return json_file, image_dir


def generate_split(name: str, root: Optional[str] = None, progress: bool = True) -> str:
    """Generate split ``name`` under ``root`` unless an up-to-date copy exists; return its json path.

    Atomic: everything is written into a temporary directory inside the root and moved into place
    with renames, the json last. A split without its json (interrupted run) counts as missing.
    Safe against concurrent callers (file lock)."""
    base = get_root(root)
    json_file, image_root = split_paths(name, base)
    if _is_complete(name, base):
        return json_file
    os.makedirs(base, exist_ok=True)
    spec = _spec(name)
    with _lock(os.path.join(base, f".{spec.dirname}.lock")):
        if _is_complete(name, base):  # another process finished it meanwhile
            return json_file
        logger.info("Generating synthetic dataset %s (%d images) in %s", name, spec.num_images, base)
        tmp = tempfile.mkdtemp(prefix=f".{spec.dirname}.tmp-", dir=base)
        try:
            tmp_json, tmp_images = _write_split(name, tmp, progress)
            # invalidate the old copy first (json = completeness marker), then swap directories
            if os.path.exists(json_file):
                os.remove(json_file)
            if os.path.exists(image_root):
                stale = tempfile.mkdtemp(prefix=f".{spec.dirname}.stale-", dir=base)
                os.rename(image_root, os.path.join(stale, "old"))
                shutil.rmtree(stale, ignore_errors=True)
            os.rename(tmp_images, image_root)
            os.replace(tmp_json, json_file)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return json_file


def ensure_synthetic(name: str, root: Optional[str] = None, progress: bool = True) -> str:
    """Make sure split ``name`` exists (generating it if needed) and return its json path.

    Without ``root``, the root the dataset was registered with is used (the json_file in
    MetadataCatalog), so the trainer can call this before COCOEvaluator reads ``json_file``."""
    _spec(name)
    if root is None and name in DatasetCatalog.list():
        json_file = MetadataCatalog.get(name).get("json_file", None)
        if json_file:
            root = os.path.dirname(json_file)
    return generate_split(name, root, progress=progress)


def load_synthetic(name: str, root: Optional[str] = None) -> List[dict]:
    """Detectron2 dataset dicts of split ``name`` (generated on first use)."""
    json_file = generate_split(name, root)
    _, image_root = split_paths(name, root)
    return load_coco_json(json_file, image_root, dataset_name=name)


# --------------------------------------------------------------------------------- registration


def register_synthetic_datasets(root: Optional[str] = None) -> None:
    """Register every split in :data:`SPLITS` with DatasetCatalog / MetadataCatalog (cheap: nothing
    is generated here). Re-registering (e.g. with a new root) replaces earlier entries."""
    base = get_root(root)
    for name in SPLITS:
        json_file, image_root = split_paths(name, base)
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda name=name, base=base: load_synthetic(name, base))
        MetadataCatalog.get(name).set(
            thing_classes=list(CATEGORIES),
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
        )
