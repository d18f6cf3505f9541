"""The built-in synthetic detection dataset: cppe-5 schema, determinism, tight boxes, class/colour balance."""

import collections

import datasets
import numpy as np
import pytest

from modeling_dit_detection.training.synthetic_data import (
    SYNTHETIC_CLASS_NAMES,
    _draw_clutter,
    make_synthetic_detection_dataset,
    render_synthetic_example,
)


@pytest.fixture(scope="module")
def dataset():
    return make_synthetic_detection_dataset(num_train=200, num_validation=40, num_test=30, image_size=64, seed=0)


def _image_bytes(split: datasets.Dataset) -> list[bytes]:
    return [image["bytes"] for image in split.cast_column("image", datasets.Image(decode=False))["image"]]


def _annotations(split: datasets.Dataset) -> list:
    return [(row["image_id"], row["width"], row["height"], row["objects"])
            for row in split.remove_columns("image")]


def test_schema_and_splits(dataset):
    assert isinstance(dataset, datasets.DatasetDict)
    assert {name: len(split) for name, split in dataset.items()} == {"train": 200, "validation": 40, "test": 30}
    features = dataset["train"].features
    expected = datasets.Features({
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
    assert features == expected
    assert features["objects"]["category"].feature.names == SYNTHETIC_CLASS_NAMES
    assert 4 <= len(SYNTHETIC_CLASS_NAMES) <= 5 and len(set(SYNTHETIC_CLASS_NAMES)) == len(SYNTHETIC_CLASS_NAMES)
    row = dataset["train"][0]
    assert row["image"].mode == "RGB" and row["image"].size == (64, 64) and row["image"].format == "PNG"
    assert (row["width"], row["height"]) == (64, 64)
    objects = row["objects"]  # cppe-5 style: a dict of lists
    assert set(objects) == {"id", "area", "bbox", "category"}
    assert all(isinstance(v, list) and len(v) == len(objects["id"]) for v in objects.values())


def test_non_square_size():
    split = make_synthetic_detection_dataset(num_train=8, num_validation=1, num_test=1, image_size=(48, 80))["train"]
    for row in split:
        assert row["image"].size == (80, 48) and (row["width"], row["height"]) == (80, 48)
        for x, y, w, h in row["objects"]["bbox"]:
            assert x >= 0 and y >= 0 and x + w <= 80 and y + h <= 48


def test_deterministic_and_seeded(dataset):
    again = make_synthetic_detection_dataset(num_train=200, num_validation=40, num_test=30, image_size=64, seed=0)
    for name in ("train", "validation", "test"):
        assert _image_bytes(again[name]) == _image_bytes(dataset[name])
        assert _annotations(again[name]) == _annotations(dataset[name])
    other = make_synthetic_detection_dataset(num_train=20, num_validation=1, num_test=1, image_size=64, seed=1)
    assert not set(_image_bytes(other["train"])) & set(_image_bytes(dataset["train"])[:20])
    assert _annotations(other["train"]) != _annotations(dataset["train"].select(range(20)))
    train, validation = _image_bytes(dataset["train"]), _image_bytes(dataset["validation"])
    assert not set(train) & set(validation)
    assert [r["objects"] for r in dataset["train"].select(range(40))] != list(dataset["validation"]["objects"])


def test_boxes_inside_and_positive(dataset):
    ids = []
    for split in dataset.values():
        for row in split.remove_columns("image"):
            objects = row["objects"]
            ids += objects["id"]
            for (x, y, w, h), area in zip(objects["bbox"], objects["area"]):
                assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
                assert 0 < area <= w * h
            assert all(0 <= c < len(SYNTHETIC_CLASS_NAMES) for c in objects["category"])
        assert len(set(ids)) == len(ids)
        ids = []


def test_boxes_are_tight_boxes_of_the_drawn_masks(dataset):
    split = dataset["train"]
    for index in range(30):
        row = split[index]
        pixels, categories, masks = render_synthetic_example(0, "train", index, 64)
        np.testing.assert_array_equal(np.asarray(row["image"]), pixels)  # PNG is lossless
        assert row["objects"]["category"] == categories
        for mask, bbox, area in zip(masks, row["objects"]["bbox"], row["objects"]["area"]):
            ys, xs = np.nonzero(mask)
            assert bbox == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert area == mask.sum()
            # the mask is what was painted: one flat colour (plus the image noise), unlike the background
            inside = pixels[mask].astype(float)
            assert inside.std(0).max() < 12
            x, y, w, h = map(int, bbox)
            border = np.zeros_like(mask)
            border[y, x:x + w] = border[y + h - 1, x:x + w] = border[y:y + h, x] = border[y:y + h, x + w - 1] = True
            assert (mask & border)[y].any() and (mask & border)[y + h - 1].any()
            assert (mask & border)[:, x].any() and (mask & border)[:, x + w - 1].any()
        for a in range(len(masks)):  # visible masks are disjoint
            for b in range(a + 1, len(masks)):
                assert not (masks[a] & masks[b]).any()


def test_negatives_classes_and_colours(dataset):
    split = dataset["train"]
    counts = [len(o["id"]) for o in split["objects"]]
    assert min(counts) == 0 and max(counts) <= 4
    assert 0.03 <= counts.count(0) / len(counts) <= 0.25
    assert 1.5 <= np.mean(counts) <= 2.5
    per_class = collections.Counter(c for o in split["objects"] for c in o["category"])
    assert set(per_class) == set(range(len(SYNTHETIC_CLASS_NAMES)))
    assert min(per_class.values()) >= 0.5 * max(per_class.values())
    # colour does not identify the class: every class shows many coarse colours, spread over the cube
    colours = collections.defaultdict(list)
    for index in range(100):
        pixels, categories, masks = render_synthetic_example(0, "train", index, 64)
        for category, mask in zip(categories, masks):
            colours[category].append(pixels[mask].astype(float).mean(0))
    for category in range(len(SYNTHETIC_CLASS_NAMES)):
        values = np.array(colours[category])
        assert len({tuple(v) for v in (values // 64).astype(int)}) >= 8
        assert (values.max(0) - values.min(0)).min() > 120
    sides = np.array([bbox[2:] for o in split["objects"] for bbox in o["bbox"]])
    assert sides.min() >= 6 and sides.max() <= 64


def test_dense_small_layout_has_many_small_objects_and_unannotated_clutter():
    dense = make_synthetic_detection_dataset(num_train=6, num_validation=1, num_test=1, seed=5, layout="dense-small")
    counts, sides = [], []
    for record in dense["train"]:
        assert (record["width"], record["height"]) == (256, 256)
        counts.append(len(record["objects"]["bbox"]))
        sides += [max(w, h) for _, _, w, h in record["objects"]["bbox"]]
    assert all(1 <= count <= 24 for count in counts) and sum(counts) / len(counts) >= 8
    # 10-40 px shapes (a triangle or a stretched shape reaches a little past its nominal side), partly hidden ones less
    assert max(sides) <= 52 and sum(sides) / len(sides) < 40

    image, categories, masks = render_synthetic_example(5, "train", 0, layout="dense-small")
    assert len(categories) == counts[0] and all(mask.any() for mask in masks)


def test_clutter_is_thinner_than_any_object():
    """Distractor strokes and specks vanish under a 5x5 erosion; the smallest object (a 10 px square) does not."""
    from scipy.ndimage import binary_erosion

    image = np.zeros((128, 128, 3))
    _draw_clutter(np.random.default_rng(0), image, 30)
    clutter = image.any(axis=-1)
    assert clutter.sum() > 100
    assert not binary_erosion(clutter, np.ones((5, 5))).any()
    square = np.zeros((128, 128), dtype=bool)
    square[20:30, 20:30] = True
    assert binary_erosion(square, np.ones((5, 5))).any()


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="Unknown synthetic layout 'sparse'"):
        make_synthetic_detection_dataset(num_train=1, num_validation=1, num_test=1, layout="sparse")
