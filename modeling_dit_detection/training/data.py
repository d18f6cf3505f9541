"""Data side of detection training, one step after the other, each a function with data in and data out:

    load (any source -> canonical records) -> check once (`clean_split`) -> transform (augment, resize once,
    records -> model labels; `DetectionTransform`) -> collate; and for evaluation, the records of an eval split as
    COCO ground truth (`coco_ground_truth`).

The canonical schema is cppe-5's plus what COCO evaluation needs. One record:

    image_id  int64   the source's own integer id (COCO's `images[].id`; the row where ids are absent or strings),
                      unique within a split after the check
    image     datasets.Image()
    width     int32   pixels of the displayed image (after EXIF orientation)
    height    int32
    objects   {"id": [int64], "area": [float32, pixels^2; COCO's annotation area, e.g. of the mask],
               "bbox": [[x, y, w, h] float32, COCO pixels], "category": [int64 0..K-1],
               "iscrowd": [int8 0/1; crowd regions: ignored by COCO evaluation, never training targets]}

Labels 0..K-1 come with `category_ids`: position i holds the source's own id of label i (COCO's category ids, with
their gaps; 0..K-1 for sources without ids), so detections can be written in the source's ids.

Training-side only: nothing here is needed at inference or travels to the Hub.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import datasets
import numpy as np
import PIL.Image
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, List, Value
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2 import query_size
from transformers.image_utils import pil_torch_interpolation_mapping

from ..image_processing_dit_detection import load_rgb

logger = logging.getLogger(__name__)

OBJECT_FEATURES = {
    "id": List(Value("int64")),
    "area": List(Value("float32")),
    "bbox": List(List(Value("float32"), length=4)),
    "category": List(Value("int64")),
    "iscrowd": List(Value("int8")),
}
CANONICAL_FEATURES = Features({"image_id": Value("int64"), "image": Image(), "width": Value("int32"),
                               "height": Value("int32"), "objects": OBJECT_FEATURES})
# Maps run on undecoded images ({"bytes", "path"}) so a corrupt file reaches our code instead of crashing the decoder.
_UNDECODED_FEATURES = Features({**CANONICAL_FEATURES, "image": Image(decode=False)})
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}
SPLITS = ("train", "validation", "test")
BBOX_FORMATS = ("coco", "pascal_voc", "yolo")
# A YOLO value (a fraction of the image size, 0..1) further than this from 0.5 cannot describe a box that touches the
# image: the boxes are in pixels. Boxes a little outside are clipped by the data check, as in the other formats.
YOLO_LIMIT = 1.0
# Images with a side under this many pixels are bad images (an error, or skipped with --skip_bad_images): they hold
# nothing a detector can learn, and torchvision's RandomIoUCrop divides by a crop side that rounds to 0 pixels on them
# (ZeroDivisionError at a random training step; below 4 pixels at its min_scale 0.3). 8 leaves a margin.
MIN_IMAGE_SIDE = 8
# Issues of `check_record` that drop the record (with skip_bad_images; else they are errors).
SKIPPED_ISSUES = ("bad_image", "image_too_small")
# EXIF orientations 5-8 include a 90 degree rotation: `ImageOps.exif_transpose` swaps width and height.
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)


# ----------------------------------------------------------------------------------------------------------------
# 1. Loading
# ----------------------------------------------------------------------------------------------------------------

# The data options each source reads; the built-in synthetic data reads the scripts' own `--synthetic_*` options.
SOURCE_OPTIONS = {"coco_annotations": {"image_dir", "bbox_format", "validation_split_percentage"},
                  "dataset_name": {"dataset_config_name", "bbox_format", "validation_split_percentage"}}


def check_data_source_options(data_args, defaults, built_in_options: set[str],
                              other_sources: dict[str, set[str]] | None = None) -> None:
    """Refuse data options that the chosen source would ignore, e.g. --image_dir without --coco_annotations (the run
    would use the built-in synthetic data instead of the user's images). `data_args`: a script's data arguments,
    `defaults` the same dataclass unchanged (an option differing from its default was given); the source is the first
    of --coco_annotations, --dataset_name and `other_sources` (option -> the options it reads) that is set, else the
    built-in data, which reads `built_in_options`."""
    sources = {**SOURCE_OPTIONS, **(other_sources or {})}
    options = set(built_in_options).union(*sources.values())
    given = {name for name in options if getattr(data_args, name) != getattr(defaults, name)}
    chosen = next((flag for flag in sources if getattr(data_args, flag)), None)
    used = sources[chosen] if chosen else set(built_in_options)
    ignored = sorted(given - used)
    if ignored:
        source = f"--{chosen}" if chosen else "the built-in synthetic data (no data option given)"
        raise ValueError(f"{', '.join(f'--{name}' for name in ignored)} would be ignored with {source}: --image_dir "
                         "goes with --coco_annotations, --dataset_config_name with --dataset_name, --bbox_format and "
                         "--validation_split_percentage with either, --synthetic_* with the built-in data. Leave them "
                         "out, or give the data they describe.")


def load_detection_dataset(dataset_name: str | None = None, dataset_config_name: str | None = None,
                           coco_annotations: dict[str, str] | None = None,
                           image_dir: str | dict[str, str] | None = None,
                           bbox_format: str = "coco", validation_split_percentage: float = 0.15, seed: int = 42,
                           cache_dir: str | None = None, token: str | bool | None = None,
                           report: DataReport | None = None) -> tuple[DatasetDict, dict[int, str], list[int]]:
    """
    Load a detection dataset into the canonical schema (module docstring).

    Sources, told apart by their files: `dataset_name` a folder written by `save_to_disk`; a folder of images with
    `metadata.jsonl` (imagefolder, optionally in train/ validation/ test/ subfolders); otherwise a Hub id (or any
    path `load_dataset` reads). Or `coco_annotations` = {split: COCO instances json}, `file_name`s relative to
    `image_dir` (one folder, or {split: folder} as in COCO's train2017/ val2017/; default: the json's folder).
    COCO category ids are mapped to labels 0..K-1 in ascending id order (`category_ids` keeps the ids); crowd
    annotations are kept with `iscrowd=1` (COCO evaluation ignores detections on them; training never sees them),
    with the annotation `area` and the original image ids (string ids: the image's position in the file). A malformed
    COCO json is a `ValueError` naming the file, the record and the field; annotations of no image are dropped and
    counted in `report`.

    Args:
        bbox_format: how the source's boxes are written: "coco" (x, y, w, h pixels), "pascal_voc" (x0, y0, x1, y1
            pixels) or "yolo" (cx, cy, w, h normalised to 0..1 by the image size). Output is always COCO pixels.
        validation_split_percentage: fraction (0..1) of train carved out, with `seed`, when there is no validation
            split; 0 leaves it absent.
        report: where what loading drops is counted (COCO annotations of no image), as `clean_split` counts its fixes.

    Returns:
        (splits among "train", "validation", "test"; id2label {0..K-1: name}; category_ids, the source's id of
        each label: COCO's category ids, else 0..K-1).
    """
    if bbox_format not in BBOX_FORMATS:
        raise ValueError(f"bbox_format must be one of {BBOX_FORMATS}, got {bbox_format!r}.")
    if (dataset_name is None) == (coco_annotations is None):
        raise ValueError("Give exactly one of dataset_name and coco_annotations.")
    category_ids = None
    if coco_annotations is not None:
        raw, category_ids = _load_coco(coco_annotations, image_dir, report)
    elif os.path.isfile(os.path.join(dataset_name, "dataset_dict.json")) or os.path.isfile(
            os.path.join(dataset_name, "state.json")):
        raw = datasets.load_from_disk(dataset_name)
    elif os.path.isdir(dataset_name) and (os.path.isfile(os.path.join(dataset_name, "metadata.jsonl")) or any(
            os.path.isfile(os.path.join(dataset_name, d, "metadata.jsonl")) for d in os.listdir(dataset_name))):
        raw = datasets.load_dataset("imagefolder", data_dir=dataset_name, cache_dir=cache_dir)
    else:
        raw = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, token=token)

    return prepare_detection_dataset(raw, bbox_format, validation_split_percentage, seed, category_ids)


def prepare_detection_dataset(raw: Dataset | DatasetDict, bbox_format: str = "coco",
                              validation_split_percentage: float = 0.15, seed: int = 42,
                              category_ids: list[int] | None = None,
                              ) -> tuple[DatasetDict, dict[int, str], list[int]]:
    """An already loaded `Dataset` (taken as train) or `DatasetDict` -> (canonical splits, id2label, category_ids),
    as `load_detection_dataset` returns them; split names val / valid / dev become validation. `category_ids`: the
    source's id of each label, if it has its own (default 0..K-1)."""
    if bbox_format not in BBOX_FORMATS:
        raise ValueError(f"bbox_format must be one of {BBOX_FORMATS}, got {bbox_format!r}.")
    if not 0 <= validation_split_percentage < 1:
        raise ValueError(f"validation_split_percentage is a fraction in [0, 1), got {validation_split_percentage}.")
    renamed = _rename_splits(raw)
    for name, split in renamed.items():  # an empty split trains or scores nothing: say so, not an Arrow error later
        if len(split) == 0:
            raise ValueError(f"The {name!r} split has no records.")
    splits, id2label = _canonicalize(renamed, bbox_format)
    category_ids = list(range(len(id2label))) if category_ids is None else [int(c) for c in category_ids]
    if len(category_ids) != len(id2label) or len(set(category_ids)) != len(category_ids):
        raise ValueError(f"category_ids {category_ids} must give one distinct id per label of {id2label}.")
    if "validation" not in splits and validation_split_percentage > 0:
        held_out = math.ceil(validation_split_percentage * len(splits["train"]))  # as `train_test_split` counts
        if held_out >= len(splits["train"]):
            raise ValueError(f"The train split has {len(splits['train'])} record(s): too few to hold out "
                             f"{validation_split_percentage} of them for validation and train on the rest; give a "
                             "validation split.")
        carved = splits["train"].train_test_split(test_size=validation_split_percentage, seed=seed)
        splits["train"], splits["validation"] = carved["train"], carved["test"]
    return splits, id2label, category_ids


def _rename_splits(raw: Dataset | DatasetDict) -> DatasetDict:
    """Map split names to train / validation / test; a lone `Dataset` is train; other splits are dropped."""
    if isinstance(raw, Dataset):
        raw = DatasetDict({"train": raw})
    splits = DatasetDict()
    for name, split in raw.items():
        canonical = SPLIT_ALIASES.get(name, name)
        if canonical not in SPLITS:
            logger.warning("Dropping split %r: only %s (or val/valid/dev) are used.", name, SPLITS)
        elif canonical in splits:
            raise ValueError(f"Two splits map to {canonical!r}: {list(raw)}.")
        else:
            splits[canonical] = split
    if "train" not in splits:
        raise ValueError(f"No train split among {list(raw)}.")
    return splits


def _load_coco(coco_annotations: dict[str, str], image_dir: str | dict[str, str] | None,
               report: DataReport | None = None) -> tuple[DatasetDict, list[int]]:
    """COCO instances jsons -> (one `Dataset` per split, categories as a `ClassLabel` over labels 0..K-1; the COCO
    category id of each label). Everything COCO evaluation reads is kept: image ids, crowd flags, annotation areas.

    Every field read is checked first (`_coco_*`): a malformed file is a `ValueError` naming the file, the record and
    the field, a missing one a `FileNotFoundError`. Two images with one id are an error (their annotations cannot be
    attributed); an annotation whose image_id is no image's is dropped, counted in `report` ("annotation_orphan",
    with annotation ids as examples) and logged."""
    splits, categories = {}, None
    for split, path in coco_annotations.items():
        coco = _read_coco_json(path)
        split_categories = _coco_categories(coco["categories"], path)
        if categories is None:
            categories = split_categories
        elif split_categories != categories:
            raise ValueError(f"{path}: categories differ from the other splits' ({categories}).")
        index = {category_id: i for i, (category_id, _) in enumerate(categories)}
        image_ids = _coco_image_ids(coco["images"], path)
        by_image, orphans = defaultdict(list), []
        for position, ann in enumerate(coco["annotations"]):
            ann = _coco_annotation(ann, position, path, index)
            if ann["image_id"] in image_ids:
                by_image[image_ids[ann["image_id"]]].append(ann)
            else:
                orphans.append(ann)
        _report_orphans(orphans, path, split, report)
        root = image_dir.get(split) if isinstance(image_dir, dict) else image_dir
        root = root if root is not None else os.path.dirname(os.path.abspath(path))
        rows = [{"image_id": image_ids[image["id"]], "image": os.path.join(root, image["file_name"]),
                 "width": _pixels(image.get("width")), "height": _pixels(image.get("height")),
                 "objects": {"id": [a["id"] for a in anns],
                             "area": [_area(a) for a in anns],
                             "bbox": [a["bbox"] for a in anns], "category": [index[a["category_id"]] for a in anns],
                             "iscrowd": [int(bool(a.get("iscrowd", 0))) for a in anns]}}
                for image in coco["images"] for anns in [by_image.get(image_ids[image["id"]], [])]]
        names = [name for _, name in categories]
        features = Features({**CANONICAL_FEATURES,
                             "objects": {**OBJECT_FEATURES, "category": List(ClassLabel(names=names))}})
        splits[split] = Dataset.from_list(rows, features=features)
    return DatasetDict(splits), [category_id for category_id, _ in categories]


# What a COCO json's records must hold. Checked before anything reads them, so a malformed file ends in one error that
# names the file, the record and the field, not in a KeyError from deep inside.
def _is_int(value) -> bool:
    """An id the records can hold (int64); JSON true/false are not ids."""
    return isinstance(value, int) and not isinstance(value, bool) and -2 ** 63 <= value < 2 ** 63


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_side(value) -> bool:
    """A stored image side the records can hold (int32 pixels); NaN fails the comparison."""
    return _is_number(value) and 0 <= value < 2 ** 31


def _is_area(value) -> bool:
    return _is_number(value) and 0 <= value < math.inf  # NaN fails the comparison


def _is_box(value) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(_is_number(v) for v in value)


def _is_name(value) -> bool:
    return isinstance(value, str) and value != ""


def _coco_field(record: dict, key: str, where: str, valid, expected: str, optional: bool = False):
    """`record[key]` if `valid` (absent or null is fine when `optional`: then None); else a ValueError at `where`."""
    value = record.get(key)
    if (optional and value is None) or (key in record and valid(value)):
        return value
    got = "it is missing" if key not in record else f"got {value!r}"
    raise ValueError(f"{where}: field {key!r} must be {expected}; {got}.")


def _coco_record(record, position: int, part: str, path: str) -> tuple[dict, str]:
    """(record, where): `part`[position] of the file, checked to be an object, and the text that names it in errors,
    e.g. "a.json: images[3] (id 7)"."""
    if not isinstance(record, dict):
        raise ValueError(f"{path}: {part}[{position}] must be a JSON object; got {record!r}.")
    label = f" (id {record['id']!r})" if isinstance(record.get("id"), (int, str)) else ""
    return record, f"{path}: {part}[{position}]{label}"


def _read_coco_json(path: str) -> dict:
    """The COCO json at `path`: an object with `images`, `annotations` and `categories` lists, images and categories
    not empty."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: a folder, not a COCO annotations json.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such COCO annotations file.")
    try:
        with open(path, encoding="utf-8-sig") as file:  # -sig: a byte-order mark, as some Windows tools write, is fine
            coco = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error}).") from None
    if not isinstance(coco, dict):
        raise ValueError(f"{path}: a COCO instances file is a JSON object with 'images', 'annotations' and "
                         f"'categories'; got a {type(coco).__name__}.")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise ValueError(f"{path}: no {key!r} list (a COCO instances file has 'images', 'annotations' and "
                             f"'categories'); keys: {sorted(coco)}.")
    for key in ("images", "categories"):  # nothing to train on, or no class to learn
        if not coco[key]:
            raise ValueError(f"{path}: {key!r} is empty.")
    return coco


def _coco_categories(categories: list, path: str) -> list[tuple[int, str]]:
    """[(id, name)] in ascending id order; ids are ints, ids and names unique (each is one class)."""
    seen_ids, seen_names = {}, {}
    for position in range(len(categories)):
        category, where = _coco_record(categories[position], position, "categories", path)
        category_id = _coco_field(category, "id", where, _is_int, "an integer (64-bit)")
        name = _coco_field(category, "name", where, _is_name, "a non-empty string")
        if category_id in seen_ids:
            raise ValueError(f"{where}: field 'id' {category_id} is already categories[{seen_ids[category_id]}]'s.")
        if name in seen_names:
            raise ValueError(f"{where}: field 'name' {name!r} is already categories[{seen_names[name]}]'s "
                             "(one name per class).")
        seen_ids[category_id], seen_names[name] = position, position
    return sorted((category["id"], category["name"]) for category in categories)


def _coco_image_ids(images: list, path: str) -> dict:
    """{the json's image id: the record's int image_id}, once each image is checked. Ids are unique: two images with
    one id would share their annotations. Integer ids are kept; string ids (allowed by some exporters) number the images
    0..N-1 in file order, as for other sources without integer ids, and the change is logged."""
    seen = {}
    for position in range(len(images)):
        image, where = _coco_record(images[position], position, "images", path)
        image_id = _coco_field(image, "id", where, lambda v: _is_int(v) or isinstance(v, str),
                               "an integer (64-bit) or a string")
        _coco_field(image, "file_name", where, _is_name, "a non-empty string (the image's path)")
        for key in ("width", "height"):  # optional: the check reads the size from the image anyway
            _coco_field(image, key, where, _is_side, "a number of pixels", optional=True)
        if image_id in seen:
            raise ValueError(f"{where}: field 'id' {image_id!r} is also images[{seen[image_id]}]'s: the annotations "
                             "of that id cannot be attributed to one image. Give every image its own id.")
        seen[image_id] = position
    if all(_is_int(image_id) for image_id in seen):
        return {image_id: image_id for image_id in seen}
    logger.warning("%s: image ids are not all integers (e.g. %r): the records number the images 0..%d in the "
                   "file's order.", path, next(i for i in seen if not _is_int(i)), len(images) - 1)
    return seen


def _coco_annotation(annotation, position: int, path: str, index: dict[int, int]) -> dict:
    """`annotation` once checked: int id, an image_id, a category_id among the categories, a bbox of 4 numbers,
    optional numeric area and 0/1 iscrowd. Box values themselves (NaN, negative size, outside) are the check's."""
    annotation, where = _coco_record(annotation, position, "annotations", path)
    _coco_field(annotation, "id", where, _is_int, "an integer (64-bit)")
    _coco_field(annotation, "image_id", where, lambda v: _is_int(v) or isinstance(v, str), "an image's id")
    category_id = _coco_field(annotation, "category_id", where, _is_int, "an integer (a category's id)")
    if category_id not in index:
        raise ValueError(f"{where}: field 'category_id': annotation {annotation['id']} has category_id {category_id}, "
                         f"not among the categories {sorted(index)}.")
    _coco_field(annotation, "bbox", where, _is_box, "4 numbers [x, y, width, height]")
    _coco_field(annotation, "area", where, _is_area, "a finite number >= 0 (pixels^2)", optional=True)
    _coco_field(annotation, "iscrowd", where, lambda v: v in (0, 1), "0 or 1", optional=True)
    return annotation


def _pixels(value: float | None) -> int | None:
    """A stored image side as an int (a float one is truncated: the check compares it with the image's own size)."""
    return None if value is None else int(value)


def _area(annotation: dict) -> float:
    """The annotation's area (e.g. of its mask); its box's where it has none (absent or null)."""
    area = annotation.get("area")
    return annotation["bbox"][2] * annotation["bbox"][3] if area is None else area


def _report_orphans(orphans: list[dict], path: str, split: str, report: DataReport | None) -> None:
    """Annotations whose image_id is no image's are dropped: counted in `report` (examples: annotation ids) and
    logged, as the check counts the boxes it drops."""
    if not orphans:
        return
    for annotation in orphans if report is not None else []:
        report.add(split, "annotation_orphan", annotation["id"])
    logger.warning("%s: %d annotation(s) refer to no image of 'images' and are dropped (e.g. annotation id %s with "
                   "image_id %s).", path, len(orphans), ", ".join(str(a["id"]) for a in orphans[:5]),
                   ", ".join(repr(a["image_id"]) for a in orphans[:5]))


def _canonicalize(splits: DatasetDict, bbox_format: str) -> tuple[DatasetDict, dict[int, str]]:
    """Every split to the canonical schema; label names from a `ClassLabel`, from strings, or "0".."K-1"."""
    first = next(iter(splits.values()))
    missing = {"image", "objects"} - set(first.column_names)
    if missing:
        raise ValueError(f"The dataset has no {sorted(missing)} column(s); columns: {first.column_names}.")
    # `objects` is a dict of lists (cppe-5, `Sequence({...})`) or a list of dicts (`List({...})`).
    objects_feature = first.features["objects"]
    inner = objects_feature.feature if isinstance(objects_feature, List) else objects_feature
    key = "category" if "category" in inner else "categories"
    if key not in inner or "bbox" not in inner:
        raise ValueError(f"objects must hold 'bbox' and 'category' (or 'categories'); it holds {list(inner)}.")
    category_feature = inner[key].feature if isinstance(inner[key], List) else inner[key]

    lookup = None
    if isinstance(category_feature, ClassLabel):
        names = category_feature.names
    else:
        values = _category_values(splits, key)
        if category_feature.dtype == "string":
            names = sorted(values)
            lookup = {name: i for i, name in enumerate(names)}
        else:
            names = [str(i) for i in range(max(values, default=-1) + 1)]

    canonical = DatasetDict({name: _canonical_split(split, name, bbox_format, key, lookup, "id" not in inner)
                             for name, split in splits.items()})
    return canonical, dict(enumerate(names))


def _category_values(splits: DatasetDict, key: str) -> set:
    """The categories (names or numbers) the splits' objects use; a null one is an error naming its record (it would
    otherwise fail to sort, deep inside, or become a class of its own)."""
    values = set()
    for name, split in splits.items():
        for row, objects in enumerate(split["objects"]):
            for j, category in enumerate(dict_of_lists(objects).get(key) or []):
                if category is None:
                    raise ValueError(f"Split {name!r}, row {row}, object {j}: field {key!r} is null.")
                values.add(category)
    return values


def _canonical_split(dataset: Dataset, split: str, bbox_format: str, key: str, lookup: dict[str, int] | None,
                     number_objects: bool) -> Dataset:
    """One `map` to the canonical schema: boxes to COCO pixels, categories to ints, missing fields filled."""
    if number_objects:  # no object ids: number the objects of the split 0, 1, ... in row order
        lengths = [len(dict_of_lists(objects).get("bbox") or []) for objects in dataset["objects"]]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()

    def convert(example, index):
        ids = list(range(offsets[index], offsets[index] + len(dict_of_lists(example["objects"]).get("bbox") or []))) \
            if number_objects else None
        return canonical_record(example, index, split, bbox_format, key, lookup, ids)

    undecoded = dataset.cast_column("image", Image(decode=False))
    converted = undecoded.map(convert, with_indices=True, features=_UNDECODED_FEATURES,
                              remove_columns=[c for c in dataset.column_names if c != "image"],
                              desc=f"Converting {split} to the canonical schema")
    return converted.cast_column("image", Image())


def canonical_record(example: dict, index: int, split: str, bbox_format: str, key: str,
                     lookup: dict[str, int] | None, ids: list[int] | None) -> dict:
    """One source record (image undecoded) -> the canonical fields other than the image: boxes to COCO pixels,
    categories to ints (`lookup`: name -> label, for string categories), missing fields filled. `index`: the record's
    position (its image_id where it has no integer one; named in errors); `ids`: the objects' ids where the source has
    none (None: the source's `id` list)."""
    objects = dict_of_lists(example["objects"])
    width, height = example.get("width"), example.get("height")
    if width is None or height is None or bbox_format == "yolo":
        # YOLO boxes are fractions of the displayed image: never scale them by a stored size that may be wrong
        # or refer to the image before its EXIF rotation.
        width, height = _displayed_size_or_zero(example["image"])
    boxes = []
    for j, box in enumerate(objects.get("bbox") or []):  # a null list: no objects
        if box is None or len(box) != 4:
            raise ValueError(f"Split {split!r}, row {index}, image_id {example.get('image_id', index)}, "
                             f"object {j}: bbox must be 4 numbers, got {box!r}.")
        values = [math.nan if v is None else float(v) for v in box]
        if bbox_format == "yolo" and any(abs(v - 0.5) > YOLO_LIMIT for v in values if math.isfinite(v)):
            raise ValueError(f"Split {split!r}, row {index}, image_id {example.get('image_id', index)}, object {j}: "
                             f"bbox {box!r} is not in YOLO's fractions of the image size (0..1): are the boxes "
                             "pixels? Give the data's --bbox_format (coco: x, y, w, h; pascal_voc: x0, y0, x1, y1).")
        boxes.append(_to_coco(values, bbox_format, width, height))
    categories = objects.get(key) or []
    ids = (objects.get("id") or []) if ids is None else ids
    image_id = example.get("image_id", index)
    if not isinstance(image_id, int) or isinstance(image_id, bool):  # e.g. file names: the row index serves
        image_id = index
    crowd = objects.get("iscrowd")  # absent in most sources: then nothing is a crowd region
    return {"image_id": image_id, "width": width, "height": height,
            "objects": {"id": ids, "area": objects.get("area") or [w * h for _, _, w, h in boxes],
                        "bbox": boxes, "category": [lookup[c] for c in categories] if lookup else categories,
                        "iscrowd": [0] * len(boxes) if crowd is None else [int(bool(c)) for c in crowd]}}


def dict_of_lists(objects) -> dict[str, list]:
    """`objects` as a dict of lists, whether stored as one (cppe-5) or as a list of per-object dicts."""
    if isinstance(objects, dict):
        return objects
    return {k: [o[k] for o in objects] for k in (objects[0] if objects else {})}


def _to_coco(box: list[float], bbox_format: str, width: int, height: int) -> list[float]:
    """One box in `bbox_format` -> x, y, w, h pixels (`width`, `height`: the image size, used by yolo only)."""
    a, b, c, d = box
    if bbox_format == "pascal_voc":
        return [a, b, c - a, d - b]
    if bbox_format == "yolo":
        return [(a - c / 2) * width, (b - d / 2) * height, c * width, d * height]
    return [a, b, c, d]


def open_image(value: dict | None) -> PIL.Image.Image:
    """Open an undecoded `datasets.Image` value ({"bytes", "path"}); PIL reads the header only until `.load()`."""
    if value is None or (value.get("bytes") is None and value.get("path") is None):
        raise ValueError("no image bytes or path")
    return PIL.Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"])


def _displayed_size(image: PIL.Image.Image) -> tuple[int, int]:
    """(width, height) of `image` as displayed, i.e. after `ImageOps.exif_transpose`, without transposing it."""
    width, height = image.size
    rotated = image.getexif().get(PIL.Image.ExifTags.Base.Orientation, 1) in _ROTATED_ORIENTATIONS
    return (height, width) if rotated else (width, height)


def _displayed_size_or_zero(value: dict | None) -> tuple[int, int]:
    """Displayed size from the image header; (0, 0) when unreadable, which `clean_split` reports as a bad image."""
    try:
        return _displayed_size(open_image(value))
    except Exception:  # any decoder failure: the cleaning pass names the record
        return 0, 0


# ----------------------------------------------------------------------------------------------------------------
# 2. Validation and cleaning
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class DataReport:
    """What the cleaning pass fixed or skipped: `counts[(split, issue)]`, and the first image_ids per issue.

    Issues: "bad_image" (skipped: undecodable), "image_too_small" (skipped: a side under MIN_IMAGE_SIDE pixels),
    "annotation_orphan" (a COCO annotation whose image_id is no image's: dropped when loading; examples are
    annotation ids), "exif_transposed", "size_fixed" (stored width/height were wrong), "box_clipped",
    "box_outside", "box_empty" (w or h <= 0), "box_non_finite" (dropped), "no_objects" (kept: nothing but crowd
    regions, if anything, to train on), "image_id_duplicate" (given a new id: COCO evaluation needs one id per image
    of a split) and "mode_<MODE>" for images that are not RGB. Box issues count boxes, the others count images.
    """

    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=lambda: defaultdict(list))
    max_examples: int = 5

    def add(self, split: str, issue: str, image_id: int) -> None:
        self.counts[(split, issue)] += 1
        ids = self.examples[(split, issue)]
        if len(ids) < self.max_examples and image_id not in ids:
            ids.append(image_id)

    def total(self, issue: str) -> int:
        """Count of `issue` over all splits."""
        return sum(n for (_, name), n in self.counts.items() if name == issue)

    def summary(self) -> str:
        """One line per (split, issue): count and the first image_ids (annotation ids for annotation issues)."""
        if not self.counts:
            return "Data check: no issues."
        lines = ["Data check:"]
        for (split, issue), n in sorted(self.counts.items()):
            ids = ", ".join(str(i) for i in self.examples[(split, issue)])
            kind = "annotation id" if issue.startswith("annotation_") else "image_id"
            lines.append(f"  {split}: {issue}: {n} (e.g. {kind} {ids})")
        return "\n".join(lines)


def clean_split(dataset: Dataset, num_labels: int, split: str, report: DataReport, skip_bad_images: bool = False,
                num_proc: int | None = None) -> Dataset:
    """
    Check and fix one canonical split in a single `map` pass that decodes every image once.

    Fixes (counted in `report`): width/height set to the displayed (EXIF-transposed) size; boxes clipped to the
    image; boxes outside it, with w or h <= 0 or with non-finite coordinates dropped; an image_id that an earlier
    record of the split already has replaced by a new one (above the split's largest). Images without objects are
    kept. Crowd regions go through the same box checks and keep their flag: they are evaluation's "ignore" regions,
    and only the training transform leaves them out. Clipping a crowd region (the one fix a usable one can get)
    changes no evaluation: COCO's overlap of a detection with it is the part of the detection inside it, detections
    lie in the image, and a crowd region's area is never read (it is ignored in every size bucket). Raises `ValueError` naming split, row and image_id for an
    undecodable image or one with a side under MIN_IMAGE_SIDE pixels (unless `skip_bad_images`: then the record is
    dropped and counted), a category outside
    0..num_labels-1, or object lists of unequal length. This is the one check: nothing downstream re-checks a record.
    """
    undecoded = dataset.cast_column("image", Image(decode=False))
    features = Features({**undecoded.features, "_issues": List(Value("string"))})
    checked = undecoded.map(check_record, with_indices=True, features=features, num_proc=num_proc,
                            fn_kwargs={"num_labels": num_labels, "split": split, "skip_bad_images": skip_bad_images},
                            desc=f"Checking {split}")
    keep = []
    for row, (image_id, issues) in enumerate(zip(checked["image_id"], checked["_issues"])):
        for issue in issues:
            report.add(split, issue, image_id)
        if not any(issue in SKIPPED_ISSUES for issue in issues):
            keep.append(row)
    if len(keep) < len(checked):
        checked = checked.select(keep)
    checked = _unique_image_ids(checked.remove_columns("_issues"), split, report)
    return checked.cast_column("image", Image())


def count_targets(dataset: Dataset) -> int:
    """Training targets (boxes that are not crowd regions) in a checked split; images are not decoded."""
    total = 0
    for objects in dataset.select_columns(["objects"])["objects"]:
        crowd = objects.get("iscrowd") or [0] * len(objects["bbox"])
        total += len(crowd) - sum(bool(c) for c in crowd)
    return total


# What the data check drops of a box (the others fix it or only count it).
DROPPED_BOX_ISSUES = ("box_empty", "box_outside", "box_non_finite")


def warn_if_most_boxes_dropped(dataset: Dataset, split: str, report: DataReport) -> bool:
    """Warn when the data check dropped more boxes of a checked split than it kept: what a wrong `--bbox_format`
    does (pascal_voc corners read as COCO sizes, or COCO sizes as corners, give boxes of negative or zero size).
    Returns whether it warned."""
    dropped = sum(report.counts[(split, issue)] for issue in DROPPED_BOX_ISSUES)
    kept = sum(len(objects["bbox"]) for objects in dataset.select_columns(["objects"])["objects"])
    if dropped <= kept:
        return False
    logger.warning("The data check dropped %d of the %s split's %d boxes (empty, outside the image or not finite; "
                   "kept %d): is --bbox_format the data's (coco: x, y, w, h; pascal_voc: x0, y0, x1, y1; yolo: "
                   "cx, cy, w, h fractions)?", dropped, split, dropped + kept, kept)
    return True


def check_object_counts(dataset: Dataset, num_queries: int, split: str) -> int:
    """Warn if images of a checked split have more training targets than the model has queries (`num_queries`): each
    query matches at most one object, so the surplus is never learned. Crowd regions are not targets and do not count.
    Returns how many images exceed it. Images are not decoded."""
    exceeding, records = [], dataset.select_columns(["image_id", "objects"])
    for image_id, objects in zip(records["image_id"], records["objects"]):
        crowd = objects.get("iscrowd") or [0] * len(objects["bbox"])
        targets = len(crowd) - sum(bool(c) for c in crowd)
        if targets > num_queries:
            exceeding.append((image_id, targets))
    if exceeding:
        largest = max(count for _, count in exceeding)
        logger.warning("%d %s images have more objects than the model's %d queries (up to %d; e.g. image_id %s): the "
                       "objects beyond %d per image can never be matched. Give --num_queries %d or more to learn them "
                       "all.", len(exceeding), split, num_queries, largest,
                       ", ".join(str(image_id) for image_id, _ in exceeding[:5]), num_queries, largest)
    return len(exceeding)


def _unique_image_ids(dataset: Dataset, split: str, report: DataReport) -> Dataset:
    """`dataset` (images undecoded) with every repeated image_id after its first record replaced by a new id."""
    image_ids = dataset["image_id"]
    seen, fresh, renamed = set(), max(image_ids, default=-1) + 1, {}
    for row, image_id in enumerate(image_ids):
        if image_id in seen:
            report.add(split, "image_id_duplicate", image_id)
            renamed[row], fresh = fresh, fresh + 1
        seen.add(image_id)
    if not renamed:
        return dataset
    return dataset.map(lambda example, row: {"image_id": renamed.get(row, example["image_id"])}, with_indices=True,
                       features=dataset.features, desc=f"New ids for repeated image_ids in {split}")


def check_record(example: dict, index: int, num_labels: int, split: str, skip_bad_images: bool) -> dict:
    """The data check of one canonical record (row `index` of `split`): the image decodes and is at least
    `MIN_IMAGE_SIDE` on a side, categories lie in 0..num_labels-1, boxes are finite, non-empty and inside the
    displayed image (clipped to it when they overhang). Returns the fixed fields ("width", "height", "objects") and
    "_issues", the names of what was fixed; an undecodable or too small image raises a `ValueError` naming the
    record, or with `skip_bad_images` returns only "_issues" (["bad_image"] or ["image_too_small"])."""
    where = f"Split {split!r}, row {index}, image_id {example['image_id']}"
    objects = example["objects"]
    lengths = {k: len(v) for k, v in objects.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{where}: the objects' lists differ in length {lengths} (one category per bbox expected).")
    for j, category in enumerate(objects["category"]):
        if not isinstance(category, int) or not 0 <= category < num_labels:  # a null one too
            raise ValueError(f"{where}, object {j}: category {category} outside 0..{num_labels - 1}.")
    try:
        image = open_image(example["image"])
        image.load()  # full decode: a truncated file fails here, not at training step 10k
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... depending on the codec
        if not skip_bad_images:
            raise ValueError(f"{where}: cannot decode the image ({type(error).__name__}: {error}).") from error
        return {"_issues": ["bad_image"]}
    width, height = _displayed_size(image)  # boxes refer to the displayed image
    if min(width, height) < MIN_IMAGE_SIDE:  # the augmentation's crop fails on it at a random step: stop it here
        if not skip_bad_images:
            raise ValueError(f"{where}: the image is {width}x{height} pixels, under the minimum side of "
                             f"{MIN_IMAGE_SIDE} (--skip_bad_images skips such images).")
        return {"_issues": ["image_too_small"]}

    issues = [] if image.mode == "RGB" else [f"mode_{image.mode}"]
    if image.getexif().get(PIL.Image.ExifTags.Base.Orientation, 1) != 1:
        issues.append("exif_transposed")
    if (example["width"], example["height"]) not in ((width, height), image.size):  # image.size: before transpose
        issues.append("size_fixed")

    kept = {k: [] for k in objects}
    for j, (x, y, w, h) in enumerate(objects["bbox"]):
        if not all(v is not None and math.isfinite(v) for v in (x, y, w, h)):
            issues.append("box_non_finite")
            continue
        if w <= 0 or h <= 0:
            issues.append("box_empty")
            continue
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
        if x1 <= x0 or y1 <= y0:
            issues.append("box_outside")
            continue
        for k in objects:
            kept[k].append(objects[k][j])
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            issues.append("box_clipped")
            kept["bbox"][-1] = [x0, y0, x1 - x0, y1 - y0]
            kept["area"][-1] *= (x1 - x0) * (y1 - y0) / (w * h)  # keep a mask area a mask area, scaled
    crowd = kept.get("iscrowd") or [0] * len(kept["bbox"])
    if all(crowd):  # no box, or crowd regions only: nothing to train on, the image trains as a negative
        issues.append("no_objects")
    return {"width": width, "height": height, "objects": kept, "_issues": issues}


# ----------------------------------------------------------------------------------------------------------------
# 3. Transforms and collation
# ----------------------------------------------------------------------------------------------------------------

AUGMENTATIONS = ("strong", "light", "flip", "none")


def make_train_augmentation(image_size: tuple[int, int], strength: str = "strong") -> v2.Transform | None:
    """
    Training augmentation on {"image", "boxes" (`BoundingBoxes`), "labels"}; boxes stay valid and aligned to labels.

    "strong": horizontal flip (p=0.5); zoom out (p=0.3, canvas up to 2x, mid-grey fill = 0 after the processor's
    [-1, 1] normalisation); SSD IoU crop (p=0.5; scale 0.3..1 per side, min IoU drawn from {0, .1, .3, .5, .7, .9,
    no crop}); resize to `image_size` (height, width): the processor's size (`processor_size`), the one resize of a
    training image; SanitizeBoundingBoxes then drops boxes under 1 pixel (as the model sees them) with their labels;
    colour jitter (p=0.8; mild hue so class colours stay themselves).
    "light": flip, resize and colour jitter (object scales unchanged: learns faster on short schedules).
    "flip": mirror and resize only, the mirror alternating: each image is mirrored in every other epoch
    (`AlternatingHorizontalFlip`), so two consecutive epochs show each image once each way. Two possible inputs per
    image, all of them seen by the end of epoch two: what stage one uses with cached frozen features
    (`feature_cache.py`), whose epochs from the third on then only hit.
    "none": None (`DetectionTransform` then only resizes).
    """
    if strength not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {strength!r}.")
    if strength == "none":
        return None
    geometric = [AlternatingHorizontalFlip() if strength == "flip" else v2.RandomHorizontalFlip(p=0.5)]
    if strength == "strong":
        geometric += [v2.RandomZoomOut(fill=128, side_range=(1.0, 2.0), p=0.3),
                      v2.RandomApply([SmallImageSafeIoUCrop(min_scale=0.3)], p=0.5)]
    photometric = [] if strength == "flip" else [
        v2.RandomApply([v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.02)], p=0.8)]
    return v2.Compose([
        *geometric,
        v2.Resize(tuple(image_size)),
        *photometric,
        v2.SanitizeBoundingBoxes(min_size=1.0),
    ])


class AlternatingHorizontalFlip(v2.RandomHorizontalFlip):
    """A horizontal flip that mirrors exactly when `mirror` is set. `DetectionTransform` sets it per record: on in
    the epochs of one parity, which parity being the record's own coin (from the run's seed and the image_id), so
    every epoch mirrors about half of the images and each image alternates."""

    def __init__(self):
        super().__init__(p=0.0)

    @property
    def mirror(self) -> bool:
        return self.p == 1.0

    @mirror.setter
    def mirror(self, value: bool) -> None:
        self.p = 1.0 if value else 0.0  # p = 1 always flips, p = 0 never


def mirrored_in_epoch(seed: int, image_id: int, epoch: int) -> bool:
    """Whether the "flip" augmentation mirrors image `image_id` in `epoch`: a coin from (seed, image_id), flipped
    by the epoch's parity."""
    return (hash((seed, image_id)) + epoch) % 2 == 1


class SmallImageSafeIoUCrop(v2.RandomIoUCrop):
    """`RandomIoUCrop` that leaves images too small to crop as they are: torchvision's divides by a crop side that
    rounds to 0 pixels (ZeroDivisionError) when a side times `min_scale` is under one pixel."""

    def make_params(self, flat_inputs: list) -> dict:
        height, width = query_size(flat_inputs)
        if min(height, width) * self.min_scale < 2:
            return {}  # the "leave as it is" choice
        return super().make_params(flat_inputs)


def processor_size(image_processor) -> tuple[int, int]:
    """(height, width) in pixels of the images `image_processor` makes: the model's input size."""
    size = image_processor.size
    return int(size["height"]), int(size["width"])


def processor_resize(image_processor) -> v2.Resize:
    """The processor's own resize as a v2 transform (size, interpolation, antialiasing): on the same uint8 image it
    gives the same pixels as `image_processor(image)`, so evaluation sees what inference sees."""
    return v2.Resize(processor_size(image_processor), antialias=True,
                     interpolation=pil_torch_interpolation_mapping[image_processor.resample])


class DetectionTransform:
    """
    Batch transform for `dataset.with_transform`: checked canonical records -> model inputs, in one pass.

    Per record: the image through `load_rgb`; crowd regions left out (never training targets; evaluation reads them
    from the records); boxes as XYXY `BoundingBoxes` in pixels, with their labels alongside, through `augmentation`
    (training; it ends with the resize to the processor's size, `make_train_augmentation(processor_size(...))`) or
    through `processor_resize` (evaluation: the resize inference does); then model labels from the resized boxes.
    The image is resized once, here; `image_processor` only makes `pixel_values` (rescale, normalise), and nothing
    re-checks the record: `clean_split` did, once.

    Random augmentation is a function of (`seed`, `epoch`, the record's image_id) alone: each record draws from its
    own generator, never from the process's random state. So a run resumed mid-epoch (which skips batches without
    transforming them) and the run it continues augment every image identically, whatever the number of
    dataloader workers. Set `epoch` at each epoch's start (`AugmentationEpoch` does, as a Trainer callback).
    `set_augmentation` swaps the augmentation for a part of the run (stage one with cached frozen features uses
    flip only); dataloader workers made after the swap see it (they are re-created each epoch).

    Args:
        image_processor: a `DiTDetectionImageProcessor`; its `size` is the output size.
        augmentation: a v2 transform on {"image", "boxes", "labels"} that resizes to that size, or None.
        seed: the run's seed, for the augmentation's draws.
    """

    def __init__(self, image_processor, augmentation: v2.Transform | None = None, seed: int = 0):
        self.image_processor = image_processor
        self.size = processor_size(image_processor)
        self.set_augmentation(augmentation)
        self.seed, self.epoch = seed, 0

    def set_augmentation(self, augmentation: v2.Transform | None) -> None:
        """Use `augmentation` (a v2 transform that ends with the resize to the processor's size, or None: the
        processor's resize only) from the next record on."""
        self.augmentation = augmentation
        self.geometry = augmentation if augmentation is not None else processor_resize(self.image_processor)
        self.random = augmentation is not None
        steps = getattr(augmentation, "transforms", [augmentation])
        self.alternating_flip = next((t for t in steps if isinstance(t, AlternatingHorizontalFlip)), None)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        """
        Returns {"pixel_values": [`[3, H, W]` float tensor per example], "labels": [dict per example]}; labels:
        "class_labels" (`[n]` int64), "boxes" (`[n, 4]` float32, cx, cy, w, h normalised to 0..1), "image_id"
        (`[1]`, the record's), "orig_size" (`[2]`, (height, width) of the image as loaded, pixels), "size" (`[2]`,
        (H, W) of pixel_values).
        """
        images, labels = [], []
        for image, image_id, objects in zip(batch["image"], batch["image_id"], batch["objects"]):
            image = load_rgb(image)
            sample = self._transform(_sample(image, objects), image_id)
            pixels = sample["image"].as_subclass(torch.Tensor)
            if tuple(pixels.shape[-2:]) != self.size:
                raise ValueError(f"image_id {image_id}: the augmentation made a {tuple(pixels.shape[-2:])} image, the "
                                 f"processor's size is {self.size}: build it with make_train_augmentation(size).")
            images.append(pixels)
            labels.append(self._labels(sample["boxes"], sample["labels"], image_id, (image.height, image.width)))
        pixel_values = self.image_processor(images=images, do_resize=False, return_tensors="pt")["pixel_values"]
        return {"pixel_values": list(pixel_values), "labels": labels}

    def _transform(self, sample: dict, image_id: int) -> dict:
        if not self.random:
            return self.geometry(sample)
        if self.alternating_flip is not None:
            self.alternating_flip.mirror = mirrored_in_epoch(self.seed, int(image_id), self.epoch)
        # torchvision's v2 transforms draw from torch's global generator: give them this record's own state, and
        # leave the process's state as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, int(image_id))) & 0xFFFF_FFFF_FFFF_FFFF)
            return self.geometry(sample)

    def _labels(self, boxes: tv_tensors.BoundingBoxes, classes: torch.Tensor, image_id: int,
                orig_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """XYXY pixel boxes on the resized image -> cx, cy, w, h normalised; clamped, as float rounding in the resize
        may put a border box a hair outside [0, 1]."""
        height, width = self.size
        corners = (boxes.as_subclass(torch.Tensor) / torch.tensor([width, height, width, height])).clamp(0.0, 1.0)
        return {"class_labels": classes.to(torch.int64), "boxes": box_convert(corners, "xyxy", "cxcywh"),
                "image_id": torch.tensor([int(image_id)], dtype=torch.int64),
                "orig_size": torch.tensor(orig_size, dtype=torch.int64),
                "size": torch.tensor(self.size, dtype=torch.int64)}


def _sample(image: PIL.Image.Image, objects: dict) -> dict:
    """A record's image and its objects that are training targets (not crowd regions) as a v2 sample: "image"
    (uint8 `[3, H, W]`), "boxes" (XYXY pixels), "labels" (found by SanitizeBoundingBoxes' labels_getter)."""
    crowd = objects.get("iscrowd") or [0] * len(objects["bbox"])
    targets = [j for j, is_crowd in enumerate(crowd) if not is_crowd]
    xywh = torch.tensor([objects["bbox"][j] for j in targets], dtype=torch.float32).reshape(-1, 4)
    boxes = tv_tensors.BoundingBoxes(xywh, format="XYWH", canvas_size=(image.height, image.width))
    return {"image": tv_tensors.Image(F.pil_to_tensor(image)),
            "boxes": F.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.XYXY),
            "labels": torch.tensor([objects["category"][j] for j in targets], dtype=torch.int64)}


def collate_fn(examples: list[dict]) -> dict:
    """[{"pixel_values": `[3, H, W]`, "labels": dict}] -> {"pixel_values": `[B, 3, H, W]`, "labels": list of B dicts}."""
    return {"pixel_values": torch.stack([example["pixel_values"] for example in examples]),
            "labels": [example["labels"] for example in examples]}


# ----------------------------------------------------------------------------------------------------------------
# 4. Evaluation ground truth
# ----------------------------------------------------------------------------------------------------------------

def coco_ground_truth(dataset: Dataset, id2label: dict[int, str], category_ids: list[int]) -> dict:
    """
    A checked canonical split as COCO ground truth: the instances dict (`images`, `annotations`, `categories`) that
    pycocotools' `COCO` reads, as the split's own COCO json would give it (DETR evaluates against `base_ds.coco`).

    images: {"id": the record's image_id, "width", "height" (pixels)}; annotations, in record order: {"id": 1, 2, ...
    (COCOeval reads id 0 as "unmatched"), "image_id", "category_id": `category_ids[label]`, "bbox" (x, y, w, h
    pixels), "area" (the record's: the annotation's, e.g. its mask's; decides the size bucket), "iscrowd" (crowd
    regions: detections on them are ignored, neither true nor false positives)}; categories: one per label,
    {"id": `category_ids[label]`, "name": `id2label[label]`}. Images are not decoded.
    """
    records = dataset.select_columns(["image_id", "width", "height", "objects"])
    images, annotations = [], []
    for image_id, width, height, objects in zip(records["image_id"], records["width"], records["height"],
                                                records["objects"]):
        images.append({"id": int(image_id), "width": int(width), "height": int(height)})
        crowd = objects.get("iscrowd") or [0] * len(objects["bbox"])
        for box, area, label, is_crowd in zip(objects["bbox"], objects["area"], objects["category"], crowd):
            annotations.append({"id": len(annotations) + 1, "image_id": int(image_id),
                                "category_id": int(category_ids[label]), "bbox": [float(v) for v in box],
                                "area": float(area), "iscrowd": int(is_crowd)})
    categories = [{"id": int(category_ids[label]), "name": str(id2label[label])} for label in sorted(id2label)]
    return {"images": images, "annotations": annotations, "categories": categories}


__all__ = ["AUGMENTATIONS", "CANONICAL_FEATURES", "SKIPPED_ISSUES", "AlternatingHorizontalFlip", "DataReport",
           "DetectionTransform", "MIN_IMAGE_SIDE", "canonical_record", "check_object_counts", "check_record",
           "clean_split", "coco_ground_truth", "collate_fn", "dict_of_lists", "load_detection_dataset",
           "make_train_augmentation", "mirrored_in_epoch", "open_image", "prepare_detection_dataset",
           "processor_resize", "processor_size"]
