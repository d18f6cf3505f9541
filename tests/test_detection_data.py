"""Data side of run_detection.py: every source and box format gives the same labels; bad records are fixed,
counted, or stopped with an error naming the record; transforms keep boxes valid, resize once and re-check nothing;
the records keep what COCO evaluation reads (crowd regions, areas, the source's image and category ids)."""

import io
import json
import logging
import math

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from modeling_dit_detection import DiTDetectionImageProcessor
from modeling_dit_detection.image_processing_dit_detection import load_rgb
from modeling_dit_detection.training.data import (
    DataReport,
    DetectionTransform,
    clean_split,
    coco_ground_truth,
    collate_fn,
    load_detection_dataset,
    make_train_augmentation,
    prepare_detection_dataset,
    warn_if_most_boxes_dropped,
)

NAMES = ["cat", "dog", "fish"]
# Three images (width, height) with their objects: COCO boxes (x, y, w, h pixels) and category indices.
RECORDS = [
    ((40, 30), [[2.0, 3.0, 10.0, 8.0], [20.0, 10.0, 15.0, 12.0]], [0, 2]),
    ((32, 48), [[0.0, 0.0, 32.0, 48.0]], [1]),
    ((36, 36), [], []),
]


def _png(size, colour=(90, 140, 200), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new(mode, size, colour if mode == "RGB" else 128).save(buffer, format="PNG")
    return buffer.getvalue()


def _cppe5(records=RECORDS, boxes_of=lambda box, size: box, categories_as_strings=False) -> datasets.Dataset:
    """A cppe-5-schema `Dataset` of `records`, boxes rewritten by `boxes_of`, categories as ClassLabel or strings."""
    category = datasets.Value("string") if categories_as_strings else datasets.ClassLabel(names=NAMES)
    features = datasets.Features({
        "image_id": datasets.Value("int64"), "image": datasets.Image(), "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
        "objects": datasets.Sequence({"id": datasets.Value("int64"), "area": datasets.Value("int64"),
                                      "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
                                      "category": category}),
    })
    rows, next_id = [], 0
    for image_id, (size, boxes, cats) in enumerate(RECORDS if records is None else records):
        rows.append({"image_id": image_id, "image": {"bytes": _png(size), "path": None}, "width": size[0],
                     "height": size[1],
                     "objects": {"id": list(range(next_id, next_id + len(boxes))),
                                 "area": [int(w * h) for _, _, w, h in boxes],
                                 "bbox": [boxes_of(box, size) for box in boxes],
                                 "category": [NAMES[c] if categories_as_strings else c for c in cats]}})
        next_id += len(boxes)
    return datasets.Dataset.from_list(rows, features=features)


def _labels(splits) -> list[tuple]:
    """(image_id, width, height, boxes, categories) per row of the train split, boxes rounded to 1e-4 px; crowd
    regions left out."""
    split = splits["train"].remove_columns("image")
    rows = []
    for row in split:
        objects = [(box, category) for box, category, crowd in zip(row["objects"]["bbox"], row["objects"]["category"],
                                                                   row["objects"]["iscrowd"]) if not crowd]
        rows.append((row["image_id"], row["width"], row["height"],
                     [[round(v, 4) for v in box] for box, _ in objects], [category for _, category in objects]))
    return rows


def _expected() -> list[tuple]:
    return [(i, size[0], size[1], boxes, cats) for i, (size, boxes, cats) in enumerate(RECORDS)]


def _to_pascal_voc(box, size):
    x, y, w, h = box
    return [x, y, x + w, y + h]


def _to_yolo(box, size):
    x, y, w, h = box
    width, height = size
    return [(x + w / 2) / width, (y + h / 2) / height, w / width, h / height]


# ---------------------------------------------------------------------------------------------------------------
# Sources and formats
# ---------------------------------------------------------------------------------------------------------------

def test_save_to_disk_folder_gives_canonical_labels(tmp_path):
    datasets.DatasetDict({"train": _cppe5(), "val": _cppe5()}).save_to_disk(str(tmp_path / "data"))
    splits, id2label, category_ids = load_detection_dataset(str(tmp_path / "data"))
    assert id2label == dict(enumerate(NAMES)) and category_ids == [0, 1, 2]  # no ids of its own: the labels
    assert set(splits) == {"train", "validation"}  # "val" renamed
    assert _labels(splits) == _expected()
    assert splits["train"].features["objects"]["bbox"] == datasets.List(datasets.List(datasets.Value("float32"), 4))


@pytest.mark.parametrize("bbox_format, convert", [("pascal_voc", _to_pascal_voc), ("yolo", _to_yolo)])
def test_bbox_formats_give_the_same_labels(bbox_format, convert):
    splits, id2label, _ = prepare_detection_dataset(_cppe5(boxes_of=convert), bbox_format=bbox_format,
                                                 validation_split_percentage=0)
    assert id2label == dict(enumerate(NAMES)) and _labels(splits) == _expected()


def test_pixel_boxes_read_as_yolo_are_an_error_naming_the_record():
    with pytest.raises(ValueError, match=r"Split 'train', row 0, image_id 0, object 0: bbox \[2.0, 3.0, 10.0, 8.0\] "
                                         r"is not in YOLO's fractions .* are the boxes pixels\? Give the data's "
                                         "--bbox_format"):
        prepare_detection_dataset(_cppe5(), bbox_format="yolo", validation_split_percentage=0)


def test_coco_boxes_read_as_pascal_voc_are_mostly_dropped_and_warned_about(caplog):
    records = [((40, 30), [[20.0, 10.0, 15.0, 12.0], [30.0, 20.0, 5.0, 5.0], [2.0, 3.0, 10.0, 8.0]], [0, 1, 2])]
    splits, _, _ = prepare_detection_dataset(_cppe5(records), bbox_format="pascal_voc", validation_split_percentage=0)
    report = DataReport()
    checked = clean_split(splits["train"], len(NAMES), "train", report)
    assert report.counts[("train", "box_empty")] == 2 and len(checked[0]["objects"]["bbox"]) == 1
    with caplog.at_level(logging.WARNING):
        assert warn_if_most_boxes_dropped(checked, "train", report)
    assert "dropped 2 of the train split's 3 boxes" in caplog.text and "is --bbox_format the data's" in caplog.text
    as_coco, _, _ = prepare_detection_dataset(_cppe5(records), validation_split_percentage=0)
    report = DataReport()
    assert not warn_if_most_boxes_dropped(clean_split(as_coco["train"], len(NAMES), "train", report), "train", report)


def test_string_categories_give_sorted_names():
    splits, id2label, category_ids = prepare_detection_dataset(_cppe5(categories_as_strings=True),
                                                               validation_split_percentage=0)
    assert id2label == dict(enumerate(sorted(NAMES))) and category_ids == [0, 1, 2]  # here NAMES is already sorted
    assert _labels(splits) == _expected()


def test_imagefolder_with_metadata_gives_the_same_labels(tmp_path):
    folder = tmp_path / "images" / "train"
    folder.mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w") as metadata:
        for image_id, (size, boxes, cats) in enumerate(RECORDS):
            (folder / f"{image_id}.png").write_bytes(_png(size))
            metadata.write(json.dumps({"file_name": f"{image_id}.png", "image_id": image_id,
                                       "objects": {"bbox": boxes, "category": [NAMES[c] for c in cats]}}) + "\n")
    splits, id2label, _ = load_detection_dataset(str(tmp_path / "images"), validation_split_percentage=0)
    assert id2label == dict(enumerate(NAMES))
    assert sorted(_labels(splits)) == _expected()  # sizes read from the image headers


def test_coco_json_gives_the_same_labels(tmp_path):
    # COCO category ids need not be contiguous: 7, 9, 12 become 0, 1, 2 in ascending id order.
    coco_ids = [7, 9, 12]
    images, annotations = [], []
    for image_id, (size, boxes, cats) in enumerate(RECORDS):
        (tmp_path / f"{image_id}.png").write_bytes(_png(size))
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": size[0], "height": size[1]})
        for box, category in zip(boxes, cats):
            annotations.append({"id": len(annotations), "image_id": image_id, "bbox": box,
                                "category_id": coco_ids[category], "area": box[2] * box[3], "iscrowd": 0})
    annotations.append({"id": 99, "image_id": 0, "bbox": [0, 0, 5, 5], "category_id": 12, "area": 12.5,
                        "iscrowd": 1})  # kept, flagged: evaluation ignores detections on it
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": name} for i, name in zip(coco_ids, NAMES)]}
    (tmp_path / "train.json").write_text(json.dumps(coco))
    splits, id2label, category_ids = load_detection_dataset(coco_annotations={"train": str(tmp_path / "train.json")},
                                                            validation_split_percentage=0)
    assert id2label == dict(enumerate(NAMES)) and category_ids == coco_ids and _labels(splits) == _expected()
    crowd = splits["train"][0]["objects"]
    assert crowd["iscrowd"] == [0, 0, 1] and crowd["category"][2] == 2
    assert crowd["bbox"][2] == [0, 0, 5, 5] and crowd["area"][2] == 12.5

    coco["annotations"][0]["category_id"] = 8
    (tmp_path / "bad.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"annotation 0 has category_id 8"):
        load_detection_dataset(coco_annotations={"train": str(tmp_path / "bad.json")})


def test_validation_is_carved_from_train_when_missing():
    splits, _, _ = prepare_detection_dataset(datasets.concatenate_datasets([_cppe5()] * 10),
                                          validation_split_percentage=0.2, seed=0)
    assert (len(splits["train"]), len(splits["validation"])) == (24, 6)


def test_unknown_bbox_format_and_missing_columns_raise():
    with pytest.raises(ValueError, match="bbox_format must be one of"):
        prepare_detection_dataset(_cppe5(), bbox_format="xyxy")
    with pytest.raises(ValueError, match=r"no \['objects'\] column"):
        prepare_detection_dataset(_cppe5().remove_columns("objects"))


# ---------------------------------------------------------------------------------------------------------------
# Bad records
# ---------------------------------------------------------------------------------------------------------------

def _clean(rows: list[dict], skip_bad_images=False):
    """Canonicalise and clean rows of (image bytes, width, height, boxes, categories); returns (split, report)."""
    dataset = datasets.Dataset.from_list(
        [{"image_id": 100 + i, "image": {"bytes": data, "path": None}, "width": w, "height": h,
          "objects": {"id": list(range(len(boxes))), "area": [0.0] * len(boxes), "bbox": boxes, "category": cats}}
         for i, (data, w, h, boxes, cats) in enumerate(rows)],
        features=datasets.Features({
            "image_id": datasets.Value("int64"), "image": datasets.Image(), "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "objects": {"id": datasets.List(datasets.Value("int64")), "area": datasets.List(datasets.Value("float32")),
                        "bbox": datasets.List(datasets.List(datasets.Value("float32"))),
                        "category": datasets.List(datasets.ClassLabel(names=NAMES))}}))
    splits, _, _ = prepare_detection_dataset(dataset, validation_split_percentage=0)
    report = DataReport()
    return clean_split(splits["train"], len(NAMES), "train", report, skip_bad_images=skip_bad_images), report


def test_corrupt_image_is_an_error_naming_the_record_or_a_counted_skip():
    rows = [(_png((20, 20)), 20, 20, [[1, 1, 5, 5]], [0]), (b"\x89PNG\r\n\x1a\nnot really", 20, 20, [], []),
            (_png((20, 20))[:60], 20, 20, [], [])]  # a truncated file: the header reads, the pixels do not
    with pytest.raises(ValueError, match=r"Split 'train', row 1, image_id 101: cannot decode the image"):
        _clean(rows)
    split, report = _clean(rows, skip_bad_images=True)
    assert split["image_id"] == [100]
    assert report.counts[("train", "bad_image")] == 2 and "bad_image: 2 (e.g. image_id 101, 102)" in report.summary()


def test_boxes_partly_outside_are_clipped_degenerate_and_nan_dropped():
    boxes = [[-5, 2, 10, 6], [15, 15, 10, 10],  # clipped on the left / right and bottom
             [3, 3, 0, 4], [3, 3, 4, -1],  # zero and negative size
             [float("nan"), 1, 2, 2], [30, 30, 5, 5],  # NaN, wholly outside
             [2, 2, 6, 6]]  # fine
    split, report = _clean([(_png((20, 20)), 20, 20, boxes, [0, 1, 2, 0, 1, 2, 1])])
    objects = split[0]["objects"]
    assert objects["bbox"] == [[0, 2, 5, 6], [15, 15, 5, 5], [2, 2, 6, 6]]
    assert objects["category"] == [0, 1, 1]  # categories stay aligned with their boxes
    assert {issue: report.total(issue) for issue in ("box_clipped", "box_empty", "box_non_finite", "box_outside")} \
        == {"box_clipped": 2, "box_empty": 2, "box_non_finite": 1, "box_outside": 1}


def test_category_out_of_range_names_the_record():
    with pytest.raises(ValueError, match=r"row 1, image_id 101, object 0: category 3 outside 0..2"):
        split, _, _ = prepare_detection_dataset(datasets.Dataset.from_dict({
            "image_id": [100, 101], "image": [{"bytes": _png((8, 8)), "path": None}] * 2,
            "objects": [{"bbox": [[1, 1, 2, 2]], "category": [0]}, {"bbox": [[1, 1, 2, 2]], "category": [3]}]},
            features=datasets.Features({"image_id": datasets.Value("int64"), "image": datasets.Image(),
                                        "objects": {"bbox": datasets.List(datasets.List(datasets.Value("float32"))),
                                                    "category": datasets.List(datasets.Value("int64"))}})),
            validation_split_percentage=0)
        clean_split(split["train"], num_labels=3, split="train", report=DataReport())


def test_bbox_and_category_lists_of_different_lengths_name_the_record():
    with pytest.raises(ValueError, match=r"row 0, image_id 100: the objects' lists differ in length"):
        _clean([(_png((20, 20)), 20, 20, [[1, 1, 5, 5], [2, 2, 3, 3]], [0])])


def test_box_with_three_numbers_names_the_record():
    with pytest.raises(ValueError, match=r"row 0, image_id 100, object 1: bbox must be 4 numbers"):
        _clean([(_png((20, 20)), 20, 20, [[1, 1, 5, 5], [2, 2, 3]], [0, 1])])


def test_wrong_stored_size_is_replaced_by_the_image_size():
    split, report = _clean([(_png((20, 16)), 64, 64, [[10, 10, 20, 20]], [0])])
    assert (split[0]["width"], split[0]["height"]) == (20, 16) and report.total("size_fixed") == 1
    assert split[0]["objects"]["bbox"] == [[10, 10, 10, 6]]


def test_image_without_objects_is_kept_and_trains_as_a_negative():
    split, report = _clean([(_png((20, 20)), 20, 20, [], [])])
    assert len(split) == 1 and report.total("no_objects") == 1
    processor = DiTDetectionImageProcessor(size={"height": 16, "width": 16}, size_divisor=4)
    batch = collate_fn([split.with_transform(DetectionTransform(processor))[0]])
    assert batch["pixel_values"].shape == (1, 3, 16, 16)
    assert batch["labels"][0]["boxes"].shape == (0, 4) and batch["labels"][0]["class_labels"].shape == (0,)


def _encoded(image: PIL.Image.Image, format="PNG", **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save_kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16"])
def test_image_modes_become_rgb_with_the_right_pixels(mode):
    rgb = PIL.Image.new("RGB", (12, 10), (200, 100, 50))
    if mode == "I;16":
        image = PIL.Image.fromarray(np.full((10, 12), 65535, dtype=np.uint16))
        expected = (255, 255, 255)
    elif mode == "RGBA":
        image = rgb.convert("RGBA")
        image.putpixel((0, 0), (0, 0, 0, 0))  # transparent: composited on white
        expected = (200, 100, 50)
    else:
        image = rgb.convert(mode)
        expected = image.convert("RGB").getpixel((5, 5))
    assert image.mode == mode
    data = _encoded(image, format="TIFF" if mode == "CMYK" else "PNG")
    split, report = _clean([(data, 12, 10, [[1, 1, 4, 4]], [0])])
    assert report.total(f"mode_{mode}") == 1
    loaded = load_rgb(split[0]["image"])
    assert loaded.mode == "RGB" and loaded.size == (12, 10)
    assert loaded.getpixel((5, 5)) == expected
    if mode == "RGBA":
        assert loaded.getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotated_jpeg_is_transposed_before_its_boxes_are_used():
    # Stored 40 wide x 20 high with orientation 6 (rotate 90 degrees clockwise to display): displayed 20 x 40.
    stored = PIL.Image.new("RGB", (40, 20), (0, 0, 0))
    stored.paste((255, 255, 255), (0, 0, 10, 20))  # white band on the stored image's left = displayed top
    exif = PIL.Image.Exif()
    exif[PIL.Image.ExifTags.Base.Orientation] = 6
    data = _encoded(stored, format="JPEG", exif=exif, quality=95)
    # The annotation refers to the displayed image (20 x 40): a box in its lower half, partly below y = 40.
    split, report = _clean([(data, 40, 20, [[2, 30, 10, 15]], [1])])
    row = split[0]
    assert (row["width"], row["height"]) == (20, 40)
    assert row["objects"]["bbox"] == [[2, 30, 10, 10]]  # clipped at the displayed height 40, not the stored 20
    # Stored width/height of the undisplayed file are the usual case, not counted as a wrong size.
    assert report.total("exif_transposed") == 1 and report.total("size_fixed") == 0
    displayed = load_rgb(row["image"])
    assert displayed.size == (20, 40)
    assert displayed.getpixel((10, 3))[0] > 200 and displayed.getpixel((10, 35))[0] < 50


# ---------------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------------

def test_transform_without_augmentation_gives_normalised_labels():
    processor = DiTDetectionImageProcessor(size={"height": 16, "width": 16}, size_divisor=4)
    splits, _, _ = prepare_detection_dataset(_cppe5(), validation_split_percentage=0)
    batch = collate_fn([splits["train"].with_transform(DetectionTransform(processor))[i] for i in range(2)])
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    first = batch["labels"][0]
    # [2, 3, 10, 8] in a 40 x 30 image: centre (7, 7), size (10, 8) -> normalised.
    torch.testing.assert_close(first["boxes"][0], torch.tensor([7 / 40, 7 / 30, 10 / 40, 8 / 30]))
    assert first["class_labels"].tolist() == [0, 2] and first["orig_size"].tolist() == [30, 40]


def test_augmentation_keeps_boxes_valid_and_aligned_with_labels():
    augmentation = make_train_augmentation((32, 32))
    image = PIL.Image.new("RGB", (48, 40), (128, 128, 128))
    transform = DetectionTransform(DiTDetectionImageProcessor(size={"height": 32, "width": 32}, size_divisor=4),
                                   augmentation)
    # Each box has a size unique to its class, so a label that lost its box would show as a mismatch.
    boxes = [[2.0, 2.0, 6.0, 6.0], [20.0, 10.0, 20.0, 24.0]]
    torch.manual_seed(0)
    seen_counts = set()
    for _ in range(60):
        out = transform({"image": [image], "image_id": [0], "objects": [{"bbox": boxes, "category": [0, 2]}]})
        labels = out["labels"][0]
        assert out["pixel_values"][0].shape == (3, 32, 32)
        cx, cy, w, h = labels["boxes"].unbind(-1) if len(labels["boxes"]) else (torch.zeros(0),) * 4
        assert ((w > 0) & (h > 0)).all()
        assert ((cx - w / 2 >= -1e-5) & (cx + w / 2 <= 1 + 1e-5) & (cy - h / 2 >= -1e-5) & (cy + h / 2 <= 1 + 1e-5)).all()
        assert set(labels["class_labels"].tolist()) <= {0, 2}
        for label, box_w, box_h in zip(labels["class_labels"].tolist(), w.tolist(), h.tolist()):
            if label == 2:  # the big box: at least 1/4 of the (cropped) image in some direction unless cropped hard
                assert max(box_w, box_h) > 0.05
        seen_counts.add(len(labels["class_labels"]))
    assert 2 in seen_counts  # most draws keep both objects


def test_flip_augmentation_mirrors_each_image_in_every_other_epoch():
    """"flip": each image alternates between its two inputs from one epoch to the next (so a feature cache holds all
    of them after two epochs), about half of the images are mirrored in any epoch, and the boxes follow the image."""
    transform = DetectionTransform(DiTDetectionImageProcessor(size={"height": 16, "width": 32}, size_divisor=4),
                                   make_train_augmentation((16, 32), "flip"), seed=3)
    image = PIL.Image.new("RGB", (32, 16), (0, 0, 0))
    image.paste((255, 255, 255), (2, 2, 10, 12))  # a white box at the left
    records = {"image": [image] * 40, "image_id": list(range(40)),
               "objects": [{"bbox": [[2.0, 2.0, 8.0, 10.0]], "category": [0]}] * 40}
    mirrored = []
    for epoch in range(4):
        transform.epoch = epoch
        out = transform(records)
        centres = torch.stack([labels["boxes"][0, 0] for labels in out["labels"]])
        is_mirrored = centres > 0.5  # the box's centre moved to the right half
        # the pixels follow: the right half is the bright one exactly where the box was mirrored
        right_brighter = torch.stack([p[:, :, 16:].mean() > p[:, :, :16].mean() for p in out["pixel_values"]])
        assert torch.equal(is_mirrored, right_brighter)
        torch.testing.assert_close(centres[is_mirrored], torch.full_like(centres[is_mirrored], 1 - 6 / 32))
        mirrored.append(is_mirrored)
    assert 10 <= int(mirrored[0].sum()) <= 30
    assert torch.equal(mirrored[1], ~mirrored[0]) and torch.equal(mirrored[2], mirrored[0])
    assert torch.equal(mirrored[3], mirrored[1])


def test_nan_free_collation_of_a_mixed_batch():
    processor = DiTDetectionImageProcessor(size={"height": 16, "width": 16}, size_divisor=4)
    splits, _, _ = prepare_detection_dataset(_cppe5(), validation_split_percentage=0)
    dataset = splits["train"].with_transform(DetectionTransform(processor, make_train_augmentation((16, 16))))
    batch = collate_fn([dataset[i] for i in range(3)])
    assert [len(label["boxes"]) for label in batch["labels"]][2] == 0
    assert all(math.isfinite(v) for label in batch["labels"] for v in label["boxes"].flatten().tolist())


def test_augmentation_strengths():
    image = PIL.Image.new("RGB", (48, 40), (128, 128, 128))
    assert make_train_augmentation((32, 32), "none") is None
    with pytest.raises(ValueError, match="augmentation must be one of"):
        make_train_augmentation((32, 32), "medium")
    transform = DetectionTransform(DiTDetectionImageProcessor(size={"height": 32, "width": 32}, size_divisor=4),
                                   make_train_augmentation((32, 32), "light"))
    torch.manual_seed(0)
    widths = set()
    for _ in range(20):
        out = transform({"image": [image], "image_id": [0], "objects": [{"bbox": [[4.0, 8.0, 12.0, 16.0]],
                                                                          "category": [1]}]})
        boxes = out["labels"][0]["boxes"]
        assert len(boxes) == 1  # light never crops an object away
        widths.add(round(boxes[0, 2].item(), 4))
        assert round(boxes[0, 1].item(), 4) == 0.4  # only horizontal flips: cy = (8 + 8) / 40 stays
    assert widths == {0.25}  # no zoom: w stays 12 / 48


def test_yolo_boxes_use_the_displayed_size_not_a_stale_stored_one():
    # Stored 80 x 40 with EXIF orientation 6: displayed 40 x 80. A centred half-size YOLO box is 20 x 40 pixels.
    exif = PIL.Image.Exif()
    exif[PIL.Image.ExifTags.Base.Orientation] = 6
    data = _encoded(PIL.Image.new("RGB", (80, 40), (10, 200, 30)), format="JPEG", exif=exif)
    dataset = datasets.Dataset.from_list(
        [{"image": {"bytes": data, "path": None}, "width": 80, "height": 40,
          "objects": {"bbox": [[0.5, 0.5, 0.5, 0.5]], "category": [0]}}],
        features=datasets.Features({"image": datasets.Image(), "width": datasets.Value("int32"),
                                    "height": datasets.Value("int32"),
                                    "objects": {"bbox": datasets.List(datasets.List(datasets.Value("float32"))),
                                                "category": datasets.List(datasets.ClassLabel(names=NAMES))}}))
    splits, _, _ = prepare_detection_dataset(dataset, bbox_format="yolo", validation_split_percentage=0)
    row = splits["train"][0]
    assert (row["width"], row["height"]) == (40, 80) and row["objects"]["bbox"] == [[10.0, 20.0, 20.0, 40.0]]


def test_list_of_object_dicts_with_ids_empty_images_and_string_image_ids():
    features = datasets.Features({
        "image_id": datasets.Value("string"), "image": datasets.Image(),
        "objects": datasets.List({"id": datasets.Value("int64"), "bbox": datasets.List(datasets.Value("float32")),
                                  "category": datasets.Value("string")})})
    dataset = datasets.Dataset.from_list([
        {"image_id": "a.png", "image": {"bytes": _png((20, 20)), "path": None},
         "objects": [{"id": 7, "bbox": [1, 2, 3, 4], "category": "dog"}]},
        {"image_id": "b.png", "image": {"bytes": _png((20, 20)), "path": None}, "objects": []},
    ], features=features)
    splits, id2label, _ = prepare_detection_dataset(dataset, validation_split_percentage=0)
    rows = list(splits["train"].remove_columns("image"))
    assert id2label == {0: "dog"} and [row["image_id"] for row in rows] == [0, 1]  # file names -> row index
    assert rows[0]["objects"]["id"] == [7] and rows[0]["objects"]["bbox"] == [[1, 2, 3, 4]]
    assert rows[1]["objects"] == {"id": [], "area": [], "bbox": [], "category": [], "iscrowd": []}


def test_validation_fraction_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"fraction in \[0, 1\), got 15"):
        prepare_detection_dataset(_cppe5(), validation_split_percentage=15)


# ---------------------------------------------------------------------------------------------------------------
# What COCO evaluation reads, and the one data path
# ---------------------------------------------------------------------------------------------------------------

def _write_coco(tmp_path) -> dict:
    """A COCO instances json (and its PNGs) with what evaluation reads: image ids 1000, 5, 17 (not contiguous, not in
    order), category ids 1, 7, 90, polygon areas unlike the box areas, a crowd region, an image without annotations,
    annotations of different images interleaved. Values are exact in float32, the records' type."""
    images = [{"id": 1000, "file_name": "a.png", "width": 40, "height": 30},
              {"id": 5, "file_name": "b.png", "width": 32, "height": 48},
              {"id": 17, "file_name": "c.png", "width": 36, "height": 36}]
    annotations = [
        {"id": 3, "image_id": 1000, "category_id": 90, "bbox": [2.5, 3.0, 10.0, 8.0], "area": 41.25, "iscrowd": 0},
        {"id": 9, "image_id": 5, "category_id": 1, "bbox": [0.0, 0.0, 32.0, 48.0], "area": 900.5, "iscrowd": 0},
        {"id": 4, "image_id": 1000, "category_id": 7, "bbox": [20.0, 10.0, 15.0, 12.0], "area": 120.0, "iscrowd": 1},
        {"id": 5, "image_id": 1000, "category_id": 1, "bbox": [1.0, 12.0, 6.0, 6.0], "area": 30.0, "iscrowd": 0},
    ]
    for image in images:
        (tmp_path / image["file_name"]).write_bytes(_png((image["width"], image["height"])))
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 90, "name": "fish"}, {"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    return coco


def test_coco_records_give_back_the_jsons_ground_truth(tmp_path):
    coco = _write_coco(tmp_path)
    splits, id2label, category_ids = load_detection_dataset(
        coco_annotations={"train": str(tmp_path / "instances.json")}, validation_split_percentage=0)
    report = DataReport()
    checked = clean_split(splits["train"], len(id2label), "train", report)
    assert report.counts == {("train", "no_objects"): 1}  # image 17; the crowd region and areas untouched
    assert category_ids == [1, 7, 90] and id2label == {0: "cat", 1: "dog", 2: "fish"}
    assert checked["image_id"] == [1000, 5, 17]

    truth = coco_ground_truth(checked, id2label, category_ids)
    assert truth["images"] == [{key: image[key] for key in ("id", "width", "height")} for image in coco["images"]]
    assert truth["categories"] == [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 90, "name": "fish"}]
    fields = ("image_id", "category_id", "bbox", "area", "iscrowd")
    expected = [tuple(a[key] for key in fields) for image in coco["images"] for a in coco["annotations"]
                if a["image_id"] == image["id"]]  # COCO lists an image's annotations in json order
    assert [tuple(a[key] for key in fields) for a in truth["annotations"]] == expected
    assert [a["id"] for a in truth["annotations"]] == [1, 2, 3, 4]  # COCOeval reads id 0 as "unmatched"


def test_the_check_keeps_crowd_regions_and_gives_repeated_image_ids_new_ones():
    rows = [(7, [[1, 1, 5, 5], [2, 2, 30, 30]], [0, 1], [False, True]),  # a crowd region overhanging: clipped
            (7, [[1, 1, 5, 5]], [2], [True]),  # crowd only: nothing to train on, still evaluated
            (3, [[1, 1, 5, 5]], [0], [False])]
    dataset = datasets.Dataset.from_list(
        [{"image_id": image_id, "image": {"bytes": _png((20, 20)), "path": None},
          "objects": {"bbox": boxes, "category": cats, "iscrowd": crowd}} for image_id, boxes, cats, crowd in rows],
        features=datasets.Features({"image_id": datasets.Value("int64"), "image": datasets.Image(),
                                    "objects": {"bbox": datasets.List(datasets.List(datasets.Value("float32"))),
                                                "category": datasets.List(datasets.ClassLabel(names=NAMES)),
                                                "iscrowd": datasets.List(datasets.Value("bool"))}}))
    splits, _, _ = prepare_detection_dataset(dataset, validation_split_percentage=0)
    report = DataReport()
    split = clean_split(splits["train"], len(NAMES), "train", report)
    assert split["image_id"] == [7, 8, 3]  # the second 7 gets the split's largest id + 1
    assert [row["iscrowd"] for row in split["objects"]] == [[0, 1], [1], [0]]
    assert split[0]["objects"]["bbox"] == [[1, 1, 5, 5], [2, 2, 18, 18]]
    assert report.counts == {("train", "image_id_duplicate"): 1, ("train", "no_objects"): 1,
                             ("train", "box_clipped"): 1}


def test_crowd_regions_never_become_training_targets():
    processor = DiTDetectionImageProcessor(size={"height": 32, "width": 32}, size_divisor=4)
    image = PIL.Image.new("RGB", (40, 40), (128, 128, 128))
    record = {"image": [image], "image_id": [3], "objects": [
        {"bbox": [[2.0, 2.0, 8.0, 8.0], [10.0, 10.0, 20.0, 20.0], [0.0, 20.0, 12.0, 16.0]], "category": [0, 1, 2],
         "iscrowd": [0, 1, 0]}]}
    for augmentation in (None, make_train_augmentation((32, 32), "light")):
        labels = DetectionTransform(processor, augmentation)(record)["labels"][0]
        assert labels["class_labels"].tolist() == [0, 2]
        torch.testing.assert_close(labels["boxes"][:, 2:], torch.tensor([[0.2, 0.2], [0.3, 0.4]]))
        assert labels["image_id"].tolist() == [3] and labels["orig_size"].tolist() == [40, 40]


def test_eval_inputs_are_what_inference_sees_and_nothing_rechecks_the_records(monkeypatch):
    """Eval images are resized once, by the processor's own resize: pixel_values equal `processor(image)`'s exactly.
    The processor's annotation checks are not on the path (the records were checked once)."""
    processor = DiTDetectionImageProcessor(size={"height": 32, "width": 48}, size_divisor=4)

    def refuse(*args, **kwargs):
        raise AssertionError("the records were checked once; the processor must not check them again")

    monkeypatch.setattr(DiTDetectionImageProcessor, "prepare_annotation", refuse)
    noise = np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    images = [PIL.Image.fromarray(noise), PIL.Image.fromarray(noise[:, :33]).convert("L"),
              PIL.Image.new("RGB", (48, 32))]
    batch = {"image": images, "image_id": [0, 1, 2],
             "objects": [{"bbox": [[7.0, 9.0, 21.0, 30.0]], "category": [1], "iscrowd": [0]},
                         {"bbox": [], "category": [], "iscrowd": []},
                         {"bbox": [[0.0, 0.0, 48.0, 32.0]], "category": [0], "iscrowd": [0]}]}
    for augmentation in (None, make_train_augmentation((32, 48))):
        out = DetectionTransform(processor, augmentation)(batch)
        assert [tuple(p.shape) for p in out["pixel_values"]] == [(3, 32, 48)] * 3
    out = DetectionTransform(processor)(batch)
    for pixels, image in zip(out["pixel_values"], images):
        torch.testing.assert_close(pixels, processor(load_rgb(image), return_tensors="pt")["pixel_values"][0],
                                   rtol=0, atol=0)
    # [7, 9, 21, 30] in a 70 x 45 image: cx, cy, w, h normalised; a whole-image box stays exactly inside [0, 1].
    torch.testing.assert_close(out["labels"][0]["boxes"], torch.tensor([[17.5 / 70, 24 / 45, 21 / 70, 30 / 45]]))
    torch.testing.assert_close(out["labels"][2]["boxes"], torch.tensor([[0.5, 0.5, 1.0, 1.0]]), rtol=0, atol=0)
    assert out["labels"][1]["boxes"].shape == (0, 4) and out["labels"][0]["size"].tolist() == [32, 48]


def test_an_augmentation_of_another_size_than_the_processors_is_an_error():
    processor = DiTDetectionImageProcessor(size={"height": 32, "width": 32}, size_divisor=4)
    transform = DetectionTransform(processor, make_train_augmentation((16, 16), "light"))
    with pytest.raises(ValueError, match=r"image_id 4: the augmentation made a \(16, 16\) image, the processor's size"):
        transform({"image": [PIL.Image.new("RGB", (20, 20))], "image_id": [4],
                   "objects": [{"bbox": [], "category": []}]})
