"""A built-in, deterministic synthetic object-detection dataset in the cppe-5 schema.

Why it exists: `run_detection.py` must train and evaluate end to end on a machine without network
access (CI, air-gapped clusters, the tests), so when no `--dataset_name` is given it falls back to
this data. It is meant to be a *real* (if small) detection problem, not a smoke signal:

* five shape classes (`SYNTHETIC_CLASS_NAMES`): circle, square, triangle, cross, ring. The shape
  alone defines the class; every object's colour is drawn uniformly at random, independently of
  its class, so a detector cannot shortcut through colour;
* 0-4 objects per image (about 10% of images have none and are kept as negatives), sizes 15%-45%
  of the shorter image side, mild random rotation / aspect jitter, overlaps allowed but bounded
  (box IoU <= 0.3 and every object keeps >= 70% of its pixels visible);
* textured backgrounds that differ per image: a random two-colour gradient, soft colour blobs,
  optional sinusoidal stripes and pixel noise (the noise also covers the objects);
* boxes are the tight bounding boxes of each object's *visible* pixel mask, COCO `x, y, w, h` in
  float pixels (pixel `x` covers `[x, x + 1)`), `area` is the visible pixel count.

That is the "shapes" layout (64x64, the built-in job's). `SYNTHETIC_LAYOUTS["dense-small"]` is a harder one for
benchmarks of what training compute buys: 256x256 images with 6-24 objects of 10-40 pixels each (small and dense),
and clutter under them that is no object (thin line strokes and specks in random colours).

Everything comes from `numpy.random.Generator`s seeded by `(seed, split, index)` and PIL drawing,
never from global RNG state, so the same arguments give the same bytes; each split (and image)
has its own stream. Features are those of `cppe-5`: `image_id, image, width, height, objects`
where `objects` is a `Sequence` of a dict, i.e. `ds[i]["objects"]` is a dict of lists.
"""

import io
from dataclasses import dataclass

import datasets
import numpy as np
from PIL import Image, ImageDraw

SYNTHETIC_CLASS_NAMES = ["circle", "square", "triangle", "cross", "ring"]
SPLITS = ("train", "validation", "test")
_MAX_BOX_IOU, _MIN_VISIBLE = 0.3, 0.7


@dataclass(frozen=True)
class SyntheticLayout:
    """How a built-in image is composed.

    image_size: (height, width) in pixels. object_count_p: probabilities of asking for 0, 1, 2, ... objects (fewer
    are placed when a shape finds no free spot in 20 tries). Object sides: a `relative` layout draws them as a
    fraction of the shorter image side in [min_size, max_size], otherwise in pixels. clutter: the range of
    distractor strokes and specks drawn on the background (not objects, never annotated).
    """

    image_size: tuple[int, int]
    object_count_p: tuple[float, ...]
    min_size: float
    max_size: float
    relative: bool = True
    clutter: tuple[int, int] = (0, 0)


SYNTHETIC_LAYOUTS = {
    "shapes": SyntheticLayout((64, 64), object_count_p=(0.1, 0.3, 0.3, 0.2, 0.1), min_size=0.15, max_size=0.45),
    "dense-small": SyntheticLayout((256, 256), object_count_p=(0.0,) * 6 + (1 / 19,) * 19, min_size=10.0,
                                   max_size=40.0, relative=False, clutter=(10, 30)),
}


def synthetic_features() -> datasets.Features:
    """The cppe-5 feature schema with `SYNTHETIC_CLASS_NAMES` as categories."""
    return datasets.Features({
        "image_id": datasets.Value("int64"),
        "image": datasets.Image(),
        "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
        "objects": datasets.Sequence({
            "id": datasets.Value("int64"),
            "area": datasets.Value("int64"),
            "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
            "category": datasets.ClassLabel(names=SYNTHETIC_CLASS_NAMES),
        }),
    })


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """[height, width, 3] float RGB: gradient + blobs + optional stripes (noise is added at the end)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    y, x = y / max(height - 1, 1), x / max(width - 1, 1)
    angle = rng.uniform(0, 2 * np.pi)
    t = x * np.cos(angle) + y * np.sin(angle)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    c0, c1 = rng.uniform(30, 225, size=(2, 3))
    image = c0 + (c1 - c0) * t[..., None]
    for _ in range(rng.integers(1, 4)):  # soft blobs
        cy, cx, sigma = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.35)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma ** 2))
        image += blob[..., None] * rng.uniform(-45, 45, size=3)
    if rng.random() < 0.5:  # stripes
        freq, phi, phase = rng.uniform(2, 8), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * freq * (x * np.cos(phi) + y * np.sin(phi)) + phase)
        image += wave[..., None] * rng.uniform(5, 18) * rng.choice([-1.0, 1.0], size=3)
    return image


def _draw_clutter(rng: np.random.Generator, image: np.ndarray, count: int) -> None:
    """Draw `count` distractors on `image` (in place): thin straight strokes (1-2 px wide, 8-60 px long) and specks
    (2-5 px across), in random colours. Thinner and smaller than any object, so no shape class looks like one."""
    height, width = image.shape[:2]
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    colours = []
    for index in range(1, count + 1):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        if rng.random() < 0.6:
            length, angle = rng.uniform(8, 60), rng.uniform(0, np.pi)
            end = (x + length * np.cos(angle), y + length * np.sin(angle))
            draw.line([(x, y), end], fill=index, width=int(rng.integers(1, 3)))
        else:
            r = rng.uniform(1, 2.5)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=index)
        colours.append(rng.uniform(0, 255, size=3))
    labels = np.asarray(canvas)
    for index, colour in enumerate(colours, start=1):
        image[labels == index] = colour


def _shape_mask(rng: np.random.Generator, category: int, height: int, width: int, side: float) -> np.ndarray:
    """Boolean [height, width] mask of one shape of class `category`, about `side` pixels across, placed
    uniformly at random where it lies wholly inside the image."""
    rotation = rng.uniform(0, 2 * np.pi) if category in (0, 2, 4) else rng.uniform(-0.4, 0.4)
    aspect = rng.uniform(0.85, 1.15)
    r = side / 2
    if category in (0, 4):  # circle / ring: ellipse outline as a polygon
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        points = np.stack([r * aspect * np.cos(angles), r / aspect * np.sin(angles)], 1)
    elif category == 1:  # square
        points = np.array([[-r, -r], [r, -r], [r, r], [-r, r]]) * [aspect, 1 / aspect]
    elif category == 2:  # triangle (equilateral-ish, fits a circle of radius ~r)
        angles = np.deg2rad([-90, 30, 150])
        points = np.stack([r * 1.1 * aspect * np.cos(angles), r * 1.1 * np.sin(angles) + 0.25 * r], 1)
    else:  # cross (plus sign), arm half-thickness a
        a = r * rng.uniform(0.28, 0.38)
        points = np.array([[-a, -r], [a, -r], [a, -a], [r, -a], [r, a], [a, a], [a, r], [-a, r], [-a, a],
                           [-r, a], [-r, -a], [-a, -a]]) * [aspect, 1 / aspect]
    rot = np.array([[np.cos(rotation), -np.sin(rotation)], [np.sin(rotation), np.cos(rotation)]])
    points = points @ rot.T
    low, high = -points.min(0), [width - 1, height - 1] - points.max(0)
    cx, cy = rng.uniform(low, np.maximum(high, low))
    points = points + [cx, cy]
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    draw.polygon([tuple(p) for p in points.round(2).tolist()], fill=255)
    if category == 4:  # ring: punch a concentric hole
        draw.polygon([tuple(p) for p in ([cx, cy] + (points - [cx, cy]) * rng.uniform(0.5, 0.6)).round(2).tolist()],
                     fill=0)
    return np.asarray(canvas) > 0


def _box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight inclusive pixel bounds (x0, y0, x1, y1) of a non-empty mask."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _box_iou(a, b) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(iw, 0) * max(ih, 0)
    area = lambda box: (box[2] - box[0] + 1) * (box[3] - box[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def render_synthetic_example(seed: int, split: str, index: int, image_size=None, layout: str = "shapes"):
    """Render image `index` of `split` in `layout` (`SYNTHETIC_LAYOUTS`): returns (uint8 [H, W, 3] image,
    categories list[int], visible boolean masks list[[H, W]]), objects in drawing order. `image_size` (an int or
    (height, width); default: the layout's) replaces the layout's size; relative object sizes follow it."""
    spec = SYNTHETIC_LAYOUTS[layout]
    if image_size is None:
        image_size = spec.image_size
    height, width = (image_size, image_size) if isinstance(image_size, int) else map(int, image_size)
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    image = _background(rng, height, width)
    if spec.clutter[1] > 0:
        _draw_clutter(rng, image, int(rng.integers(spec.clutter[0], spec.clutter[1] + 1)))
    size_unit = min(height, width) if spec.relative else 1.0
    owner = np.full((height, width), -1, dtype=np.int64)  # which object each pixel shows
    categories, full_areas, visible_boxes = [], [], []
    for _ in range(rng.choice(len(spec.object_count_p), p=spec.object_count_p)):
        for _attempt in range(20):
            category = int(rng.integers(len(SYNTHETIC_CLASS_NAMES)))
            side = rng.uniform(spec.min_size, spec.max_size) * size_unit
            mask = _shape_mask(rng, category, height, width, side)
            if mask.sum() < 4:
                continue
            box = _box_of(mask)
            # Only objects whose visible box meets the new box can lose pixels to it or overlap it.
            touched = [k for k, other in enumerate(visible_boxes) if _box_iou(box, other) > 0]
            after = np.where(mask, len(categories), owner)
            if all(_box_iou(box, visible_boxes[k]) <= _MAX_BOX_IOU
                   and (after == k).sum() >= _MIN_VISIBLE * full_areas[k] for k in touched):
                break
        else:
            continue
        x0, y0, x1, y1 = box
        local = image[y0:y1 + 1, x0:x1 + 1].reshape(-1, 3).mean(0)
        colours = rng.uniform(0, 255, size=(16, 3))  # contrast with the local background, any hue
        distance = np.linalg.norm(colours - local, axis=1)
        colour = colours[np.argmax(distance >= 90) if (distance >= 90).any() else np.argmax(distance)]
        image[mask] = colour
        owner = after
        for k in touched:
            visible_boxes[k] = _box_of(owner == k)
        categories.append(category)
        full_areas.append(int(mask.sum()))
        visible_boxes.append(box)
    image += rng.normal(0, rng.uniform(2, 6), size=image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image, categories, [owner == k for k in range(len(categories))]


def _generate_split(num_images: int, image_size, seed: int, split: str, layout: str) -> dict:
    columns = {"image_id": [], "image": [], "width": [], "height": [], "objects": []}
    next_id = 0
    for index in range(num_images):
        pixels, categories, masks = render_synthetic_example(seed, split, index, image_size, layout)
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
        objects = {"id": [], "area": [], "bbox": [], "category": []}
        for category, mask in zip(categories, masks):
            x0, y0, x1, y1 = _box_of(mask)
            objects["id"].append(next_id)
            objects["area"].append(int(mask.sum()))
            objects["bbox"].append([float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)])
            objects["category"].append(category)
            next_id += 1
        columns["image_id"].append(index)
        columns["image"].append({"bytes": buffer.getvalue(), "path": None})
        columns["width"].append(pixels.shape[1])
        columns["height"].append(pixels.shape[0])
        columns["objects"].append(objects)
    return columns


def make_synthetic_detection_dataset(num_train: int = 500, num_validation: int = 100, num_test: int = 100,
                                     image_size=None, seed: int = 0, layout: str = "shapes") -> datasets.DatasetDict:
    """Deterministic synthetic detection data with splits "train", "validation", "test" in the cppe-5
    schema (`synthetic_features()`), composed as `layout` (`SYNTHETIC_LAYOUTS`); `image_size` (an int or
    (height, width) in pixels) replaces the layout's."""
    if layout not in SYNTHETIC_LAYOUTS:
        raise ValueError(f"Unknown synthetic layout {layout!r}; choose one of {sorted(SYNTHETIC_LAYOUTS)}.")
    features = synthetic_features()
    sizes = {"train": num_train, "validation": num_validation, "test": num_test}
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict(_generate_split(n, image_size, seed, split, layout), features=features)
        for split, n in sizes.items()
    })
