"""Hostile input to the data step: malformed COCO jsons, ambiguous image ids, annotations of no image, images too small
to train on, sample limits that leave nothing, and more objects in an image than the model has queries. Each is a
clear error naming the file, the record and the field, or a fix counted in the data check's report."""

import io
import json
import logging

import datasets
import PIL.Image
import pytest
from helpers import load_run_detection

from modeling_dit_detection.training.data import (
    MIN_IMAGE_SIDE,
    DataReport,
    check_object_counts,
    clean_split,
    load_detection_dataset,
    prepare_detection_dataset,
)

NAMES = ["cat", "dog"]


def _png(size) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", size, (90, 140, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def _coco(tmp_path, edit=None, name="train.json", sizes=((40, 30), (32, 48))):
    """A valid COCO json of two images (ids 11, 12) with one annotation each, after `edit(coco)`; returns its path."""
    images = [{"id": 11 + i, "file_name": f"{i}.png", "width": w, "height": h} for i, (w, h) in enumerate(sizes)]
    for image, size in zip(images, sizes):
        (tmp_path / image["file_name"]).write_bytes(_png(size))
    coco = {"images": images,
            "annotations": [{"id": 1, "image_id": 11, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},
                            {"id": 2, "image_id": 12, "category_id": 5, "bbox": [2, 2, 6, 6]}],
            "categories": [{"id": 3, "name": "cat"}, {"id": 5, "name": "dog"}]}
    if edit is not None:
        edit(coco)
    path = tmp_path / name
    path.write_text(json.dumps(coco))
    return path


def _load(path, report=None):
    return load_detection_dataset(coco_annotations={"train": str(path)}, validation_split_percentage=0, report=report)


# ---------------------------------------------------------------------------------------------------------------
# 1. Image ids and annotations of no image
# ---------------------------------------------------------------------------------------------------------------

def test_coco_images_sharing_an_id_are_an_error_naming_the_file_and_the_id(tmp_path):
    path = _coco(tmp_path, lambda coco: coco["images"][1].update(id=11))
    with pytest.raises(ValueError, match=r"train\.json.*images\[1\].*'id'.*11.*images\[0\]"):
        _load(path)


def test_coco_annotation_of_no_image_is_counted_reported_and_dropped(tmp_path, caplog):
    path = _coco(tmp_path, lambda coco: coco["annotations"].append(
        {"id": 77, "image_id": 999, "category_id": 3, "bbox": [1, 1, 2, 2]}))
    report = DataReport()
    with caplog.at_level(logging.WARNING):
        splits, _, _ = _load(path, report)
    assert report.counts == {("train", "annotation_orphan"): 1}
    assert report.examples[("train", "annotation_orphan")] == [77]
    assert "annotation id 77" in report.summary()
    assert "train.json" in caplog.text and "77" in caplog.text and "999" in caplog.text
    assert [objects["id"] for objects in splits["train"]["objects"]] == [[1], [2]]


def test_coco_optional_fields_absent_or_null_take_their_defaults(tmp_path):
    def nulls(coco):
        coco["annotations"][0].update(area=None, iscrowd=None)
        coco["images"][0].update(width=None, height=None)
    splits, _, _ = _load(_coco(tmp_path, nulls))
    objects = splits["train"][0]["objects"]
    assert objects["area"] == [25.0] and objects["iscrowd"] == [0]  # the box's area; not a crowd region
    report = DataReport()
    checked = clean_split(splits["train"], len(NAMES), "train", report)
    assert (checked[0]["width"], checked[0]["height"]) == (40, 30)


def test_coco_string_image_ids_are_numbered_in_image_order(tmp_path):
    def stringify(coco):
        for image, name in zip(coco["images"], ["img-a", "img-b"]):
            image["id"] = name
        for annotation, name in zip(coco["annotations"], ["img-a", "img-b"]):
            annotation["image_id"] = name
    splits, _, _ = _load(_coco(tmp_path, stringify))
    assert splits["train"]["image_id"] == [0, 1]
    assert [objects["id"] for objects in splits["train"]["objects"]] == [[1], [2]]


# ---------------------------------------------------------------------------------------------------------------
# 2. Malformed COCO json: ValueError naming the file, the record and the field
# ---------------------------------------------------------------------------------------------------------------

def _pop(part, index, key):
    return lambda coco: coco[part][index].pop(key)


def _set(part, index, **values):
    return lambda coco: coco[part][index].update(values)


@pytest.mark.parametrize("edit, message", [
    (_pop("annotations", 1, "id"), r"annotations\[1\].*'id'.*missing"),
    (_pop("annotations", 1, "bbox"), r"annotations\[1\] \(id 2\).*'bbox'.*missing"),
    (_pop("annotations", 0, "category_id"), r"annotations\[0\] \(id 1\).*'category_id'.*missing"),
    (_pop("annotations", 0, "image_id"), r"annotations\[0\] \(id 1\).*'image_id'.*missing"),
    (_set("annotations", 0, bbox=[1, 2, 3]), r"annotations\[0\] \(id 1\).*'bbox'.*4 numbers.*\[1, 2, 3\]"),
    (_set("annotations", 0, bbox=[1, 2, "3", 4]), r"annotations\[0\] \(id 1\).*'bbox'.*4 numbers"),
    (_set("annotations", 0, bbox=None), r"annotations\[0\] \(id 1\).*'bbox'.*4 numbers.*None"),
    (_set("annotations", 0, category_id=8), r"annotations\[0\] \(id 1\).*'category_id'.*8.*\[3, 5\]"),
    (_set("annotations", 0, area="big"), r"annotations\[0\] \(id 1\).*'area'"),
    (_set("annotations", 0, iscrowd="yes"), r"annotations\[0\] \(id 1\).*'iscrowd'"),
    (_set("annotations", 0, id="a"), r"annotations\[0\].*'id'.*'a'"),
    (_set("annotations", 0, id=2 ** 70), r"annotations\[0\].*'id'.*64-bit"),
    (_set("annotations", 0, area=-1), r"annotations\[0\] \(id 1\).*'area'.*-1"),
    (lambda coco: coco["annotations"].__setitem__(0, [1, 2]), r"annotations\[0\].*object"),
    (lambda coco: coco.pop("categories"), r"no 'categories' list"),
    (lambda coco: coco.pop("annotations"), r"no 'annotations' list"),
    (lambda coco: coco.pop("images"), r"no 'images' list"),
    (lambda coco: coco.update(categories={"id": 3}), r"no 'categories' list"),
    (lambda coco: coco.update(categories=[]), r"'categories' is empty"),
    (_pop("categories", 1, "id"), r"categories\[1\].*'id'.*missing"),
    (_pop("categories", 0, "name"), r"categories\[0\] \(id 3\).*'name'.*missing"),
    (_set("categories", 1, id=3), r"categories\[1\].*'id'.*3.*categories\[0\]"),
    (_set("categories", 1, name="cat"), r"categories\[1\] \(id 5\).*'name'.*'cat'.*categories\[0\]"),
    (_set("categories", 0, id="3"), r"categories\[0\].*'id'.*'3'"),
    (_pop("images", 1, "file_name"), r"images\[1\] \(id 12\).*'file_name'.*missing"),
    (_pop("images", 0, "id"), r"images\[0\].*'id'.*missing"),
    (_set("images", 0, id=1.5), r"images\[0\].*'id'.*1\.5"),
    (_set("images", 0, width="wide"), r"images\[0\] \(id 11\).*'width'.*'wide'"),
    (_set("images", 1, height=1e12), r"images\[1\] \(id 12\).*'height'.*1000000000000"),
    (_set("images", 0, id=2 ** 63), r"images\[0\].*'id'.*64-bit"),
    (lambda coco: coco.update(images=[]), r"'images' is empty"),
])
def test_malformed_coco_json_is_an_error_naming_file_record_and_field(tmp_path, edit, message):
    with pytest.raises(ValueError, match=r"train\.json.*" + message):
        _load(_coco(tmp_path, edit))


@pytest.mark.parametrize("text, message", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"),
                                           ("", "not valid JSON"), ("null", "JSON object")])
def test_coco_file_that_is_not_a_json_object_is_an_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"broken\.json.*" + message):
        _load(path)


def test_missing_coco_file_is_a_file_not_found_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.json"):
        _load(tmp_path / "nowhere.json")
    with pytest.raises(ValueError, match=r"folder, not a COCO annotations json"):
        _load(tmp_path)


def test_coco_json_with_a_byte_order_mark_loads(tmp_path):
    path = _coco(tmp_path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    splits, _, _ = _load(path)
    assert splits["train"]["image_id"] == [11, 12]


# ---------------------------------------------------------------------------------------------------------------
# 3. Sample limits and empty splits
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [("max_train_samples", 0), ("max_train_samples", -3),
                                         ("max_eval_samples", 0), ("max_eval_samples", -1)])
def test_sample_limits_below_one_are_refused_naming_the_flag(tmp_path, monkeypatch, flag, value):
    run_detection = load_run_detection()
    monkeypatch.setattr(run_detection, "load_data", lambda *args: pytest.fail("data loaded before the check"))
    _, data_args, _, training_args = run_detection.parse_arguments(
        ["--output_dir", str(tmp_path), f"--{flag}", str(value)])
    with pytest.raises(ValueError, match=f"--{flag} must be"):
        run_detection.prepare_data(data_args, training_args)


@pytest.mark.parametrize("value, message", [("", "split=path pairs"), ("train=", "split=path pairs"),
                                            ("train=a.json,train=b.json", "train split is given twice"),
                                            ("validation=a.json,val=b.json", "validation split is given twice")])
def test_coco_annotations_option_with_an_empty_path_or_a_split_twice_is_refused(value, message):
    with pytest.raises(ValueError, match=f"--coco_annotations '{value}': .*{message}"):
        load_run_detection()._split_paths(value, "--coco_annotations")
    assert load_run_detection()._split_paths(" train = a.json , val=b.json", "--x") == {"train": "a.json",
                                                                                       "validation": "b.json"}


@pytest.mark.parametrize("bad_split", ["train", "validation"])
def test_a_split_left_empty_by_the_check_is_an_error_naming_it(tmp_path, bad_split):
    run_detection = load_run_detection()
    (tmp_path / "good").mkdir(), (tmp_path / "bad").mkdir()  # each json beside its own images
    good = _coco(tmp_path / "good")
    bad = _coco(tmp_path / "bad", sizes=((3, 3), (2, 40)))  # every image too small: all skipped
    paths = {"train": good, "validation": good, bad_split: bad}
    _, data_args, _, training_args = run_detection.parse_arguments(
        ["--output_dir", str(tmp_path / "out"), "--skip_bad_images", "true",
         "--coco_annotations", ",".join(f"{split}={path}" for split, path in paths.items())])
    with pytest.raises(ValueError, match=f"(?s){bad_split!r} split is empty.*{bad_split}: image_too_small: 2"):
        run_detection.prepare_data(data_args, training_args)


@pytest.mark.parametrize("category", [datasets.Value("string"), datasets.Value("int64"),
                                      datasets.ClassLabel(names=NAMES)])
def test_a_null_category_in_a_non_coco_source_is_an_error_naming_the_record(category):
    dataset = datasets.Dataset.from_list(
        [{"image": {"bytes": _png((20, 20)), "path": None}, "objects": {"bbox": [[0, 0, 1, 1]], "category": [c]}}
         for c in [0, None]],
        features=datasets.Features({"image": datasets.Image(), "objects": {
            "bbox": datasets.List(datasets.List(datasets.Value("float32"))), "category": datasets.List(category)}}))
    with pytest.raises(ValueError, match=r"Split 'train', row 1.*object 0.*category"):
        splits, _, _ = prepare_detection_dataset(dataset, validation_split_percentage=0)
        clean_split(splits["train"], len(NAMES), "train", DataReport())


def test_null_object_lists_in_a_non_coco_source_are_an_image_without_objects():
    dataset = datasets.Dataset.from_list(
        [{"image": {"bytes": _png((20, 20)), "path": None}, "objects": objects} for objects in
         [{"bbox": None, "category": None, "id": None}, {"bbox": [[0, 0, 1, 1]], "category": ["cat"], "id": [4]}]])
    splits, _, _ = prepare_detection_dataset(dataset, validation_split_percentage=0)
    report = DataReport()
    checked = clean_split(splits["train"], len(NAMES), "train", report)
    assert [objects["bbox"] for objects in checked["objects"]] == [[], [[0, 0, 1, 1]]]
    assert report.counts == {("train", "no_objects"): 1}


def test_an_empty_split_or_one_too_small_to_hold_out_validation_is_an_error_naming_it():
    one = datasets.Dataset.from_list([{"image": {"bytes": _png((20, 20)), "path": None},
                                       "objects": {"bbox": [[0.0, 0.0, 1.0, 1.0]], "category": ["cat"]}}])
    with pytest.raises(ValueError, match=r"'validation' split has no records"):
        prepare_detection_dataset(datasets.DatasetDict({"train": one, "validation": one.select([])}))
    with pytest.raises(ValueError, match=r"train split has 1 record.*too few.*0\.15"):
        prepare_detection_dataset(one, validation_split_percentage=0.15)


# ---------------------------------------------------------------------------------------------------------------
# 4. Images too small to train on
# ---------------------------------------------------------------------------------------------------------------

def _check(sizes, skip_bad_images=False):
    rows = [{"image_id": 100 + i, "image": {"bytes": _png(size), "path": None},
             "objects": {"bbox": [[0.0, 0.0, 1.0, 1.0]], "category": [0]}} for i, size in enumerate(sizes)]
    dataset = datasets.Dataset.from_list(rows, features=datasets.Features({
        "image_id": datasets.Value("int64"), "image": datasets.Image(),
        "objects": {"bbox": datasets.List(datasets.List(datasets.Value("float32"))),
                    "category": datasets.List(datasets.ClassLabel(names=NAMES))}}))
    splits, _, _ = prepare_detection_dataset(dataset, validation_split_percentage=0)
    report = DataReport()
    return clean_split(splits["train"], len(NAMES), "train", report, skip_bad_images=skip_bad_images), report


def test_image_smaller_than_the_minimum_side_is_an_error_naming_the_record_or_a_counted_skip():
    sizes = [(20, 20), (MIN_IMAGE_SIDE - 1, 40), (40, 3), (MIN_IMAGE_SIDE, MIN_IMAGE_SIDE)]
    with pytest.raises(ValueError, match=rf"row 1, image_id 101: the image is {MIN_IMAGE_SIDE - 1}x40 pixels"):
        _check(sizes)
    split, report = _check(sizes, skip_bad_images=True)
    assert split["image_id"] == [100, 103]
    assert report.counts[("train", "image_too_small")] == 2
    assert report.examples[("train", "image_too_small")] == [101, 102]


# ---------------------------------------------------------------------------------------------------------------
# 5. More objects than queries
# ---------------------------------------------------------------------------------------------------------------

def test_images_with_more_objects_than_queries_are_warned_about_crowd_regions_not_counted(caplog):
    counts = [(2, 0), (5, 0), (3, 4), (7, 1)]  # (targets, crowd regions) per image
    dataset = datasets.Dataset.from_list([
        {"image_id": 50 + i, "objects": {"bbox": [[0, 0, 1, 1]] * (n + c), "iscrowd": [0] * n + [1] * c}}
        for i, (n, c) in enumerate(counts)])
    with caplog.at_level(logging.WARNING):
        assert check_object_counts(dataset, 4, "train") == 2
    assert "2 train images" in caplog.text and "up to 7" in caplog.text and "51, 53" in caplog.text
    assert "--num_queries" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert check_object_counts(dataset, 7, "train") == 0
    assert caplog.text == ""
