"""COCO mAP metric and Trainer evaluator: numbers must be the COCO reference's (pycocotools run directly here)."""

import contextlib
import io

import numpy as np
import pytest
import torch
from helpers import cocoeval_stats
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from transformers import EvalPrediction

from modeling_dit_detection import DiTDetectionImageProcessor
from modeling_dit_detection.training.coco_metric import SUMMARY_KEYS, CocoDetectionMetric, DetectionEvaluator

ID2LABEL = {0: "circle", 1: "square", 2: "triangle"}


def random_scene(seed=0, gt_per_image=(3, 0, 5, 2, 0, 4), fp_per_image=(2, 3, 1, 0, 0, 2)):
    """COCO-native data (xywh pixels): images, ground truth, and detections with jitter, wrong labels and false
    positives. Image 4 has neither ground truth nor detections; image 1 only false positives."""
    rng = np.random.default_rng(seed)
    images, gts, dets = [], [], []
    for image_id, (n_gt, n_fp) in enumerate(zip(gt_per_image, fp_per_image)):
        height, width = int(rng.integers(200, 640)), int(rng.integers(200, 640))
        images.append({"id": image_id, "height": height, "width": width})

        def random_box():
            w, h = rng.uniform(8, 190, size=2)  # spans the small / medium / large buckets
            return [float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h)), float(w), float(h)]

        for _ in range(n_gt):
            box, label = random_box(), int(rng.integers(0, 3))
            gts.append({"id": len(gts) + 1, "image_id": image_id, "category_id": label, "bbox": box,
                        "area": box[2] * box[3], "iscrowd": 0})
            for _ in range(int(rng.integers(0, 3))):  # 0, 1 or 2 (duplicate) detections per object
                x, y, w, h = box
                jitter = rng.normal(0, 0.08, size=4) * [w, h, w, h]
                wrong = rng.random() < 0.15
                dets.append({"image_id": image_id, "category_id": int(rng.integers(0, 3)) if wrong else label,
                             "bbox": [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]],
                             "score": float(rng.random())})
        for _ in range(n_fp):
            dets.append({"image_id": image_id, "category_id": int(rng.integers(0, 3)), "bbox": random_box(),
                         "score": float(rng.random())})
    return images, gts, dets


def to_metric_inputs(images, gts, dets):
    """The same data as the metric's inputs: per-image dicts, boxes x0, y0, x1, y1 pixels."""
    predictions = [{"boxes": [], "scores": [], "labels": []} for _ in images]
    references = [{"boxes": [], "labels": [], "image_size": [im["height"], im["width"]]} for im in images]
    for det in dets:
        x, y, w, h = det["bbox"]
        predictions[det["image_id"]]["boxes"].append([x, y, x + w, y + h])
        predictions[det["image_id"]]["scores"].append(det["score"])
        predictions[det["image_id"]]["labels"].append(det["category_id"])
    for gt in gts:
        x, y, w, h = gt["bbox"]
        references[gt["image_id"]]["boxes"].append([x, y, x + w, y + h])
        references[gt["image_id"]]["labels"].append(gt["category_id"])
    return predictions, references


def reference_stats(images, gts, dets, cat_ids=None):
    """COCOeval's 12 summary stats, straight from pycocotools."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {"images": images, "annotations": gts, "categories": [{"id": c} for c in ID2LABEL]}
        coco.createIndex()
        evaluation = COCOeval(coco, coco.loadRes([dict(d) for d in dets]), "bbox")
        if cat_ids is not None:
            evaluation.params.catIds = cat_ids
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation.stats


def test_matches_pycocotools():
    images, gts, dets = random_scene()
    predictions, references = to_metric_inputs(images, gts, dets)
    metrics = CocoDetectionMetric(id2label=ID2LABEL).compute(predictions=predictions, references=references)

    expected = reference_stats(images, gts, dets)
    assert 0.05 < metrics["map"] < 0.95  # a non-trivial case
    assert all(expected[i] > -1 for i in range(len(SUMMARY_KEYS)))  # every size bucket has ground truth
    for key, value in zip(SUMMARY_KEYS, expected):
        assert metrics[key] == pytest.approx(value, abs=1e-9), key
    assert set(metrics) == set(SUMMARY_KEYS) | {f"ap_{name}" for name in ID2LABEL.values()}
    assert all(isinstance(v, float) for v in metrics.values())
    for category in (0, 2):
        assert metrics[f"ap_{ID2LABEL[category]}"] == pytest.approx(
            reference_stats(images, gts, dets, cat_ids=[category])[0], abs=1e-9)


def test_perfect_and_no_detections():
    images, gts, _ = random_scene(seed=1)
    predictions, references = to_metric_inputs(images, gts, [])
    perfect = [{"boxes": r["boxes"], "scores": [1.0] * len(r["labels"]), "labels": r["labels"]} for r in references]
    metric = CocoDetectionMetric(id2label=ID2LABEL)

    metrics = metric.compute(predictions=perfect, references=references)
    for key in SUMMARY_KEYS:
        if key == "mar_1":  # one detection per image cannot recall several objects
            continue
        assert metrics[key] == -1.0 or metrics[key] == pytest.approx(1.0), key
    assert metrics["map"] == pytest.approx(1.0) and metrics["mar_100"] == pytest.approx(1.0)

    metrics = metric.compute(predictions=predictions, references=references)  # no detections at all
    assert metrics["map"] == 0.0 and metrics["map_50"] == 0.0 and metrics["mar_100"] == 0.0

    # No ground truth anywhere: COCO has nothing to average, every value is -1.
    empty = [{"boxes": [], "labels": [], "image_size": [100, 100]}] * len(perfect)
    metrics = CocoDetectionMetric().compute(predictions=perfect, references=empty)
    assert all(value == -1.0 for value in metrics.values())


def test_batches_equal_one_call():
    predictions, references = to_metric_inputs(*random_scene(seed=2))
    metric = CocoDetectionMetric(id2label=ID2LABEL)
    whole = metric.compute(predictions=predictions, references=references)
    for start, stop in ((0, 2), (2, 3), (3, 6)):
        metric.add_batch(predictions=predictions[start:stop], references=references[start:stop])
    assert metric.compute() == whole
    # Tensors (as post-processing gives them) are accepted like lists.
    tensors = [{k: torch.tensor(v, dtype=torch.float64) for k, v in p.items()} for p in predictions]
    for p in tensors:
        p["boxes"], p["labels"] = p["boxes"].reshape(-1, 4), p["labels"].long()
    assert metric.compute(predictions=tensors, references=references) == whole


def test_crowd_regions_and_given_area():
    reference = {"boxes": [[10, 10, 60, 60], [100, 100, 300, 300]], "labels": [0, 0], "image_size": [400, 400],
                 "iscrowd": [0, 1]}
    # The second detection lies inside the crowd region, with a low IoU (small box) and a higher score.
    prediction = {"boxes": [[10, 10, 60, 60], [150, 150, 190, 190]], "scores": [0.5, 0.9], "labels": [0, 0]}
    metric = CocoDetectionMetric(id2label=ID2LABEL)
    metrics = metric.compute(predictions=[prediction], references=[reference])
    assert metrics["map"] == pytest.approx(1.0) and metrics["mar_100"] == pytest.approx(1.0)

    not_crowd = dict(reference, iscrowd=[0, 0])
    assert metric.compute(predictions=[prediction], references=[not_crowd])["map"] < 0.9

    # A given area decides the size bucket (50 x 50 box, area given as 100 px^2 -> small).
    with_area = {"boxes": [[10, 10, 60, 60]], "labels": [0], "image_size": [400, 400], "area": [100.0]}
    one = {"boxes": [[10, 10, 60, 60]], "scores": [0.5], "labels": [0]}
    metrics = metric.compute(predictions=[one], references=[with_area])
    assert metrics["map_small"] == pytest.approx(1.0) and metrics["map_medium"] == -1.0


def test_detection_evaluator_matches_metric():
    processor = DiTDetectionImageProcessor()
    generator = torch.Generator().manual_seed(0)
    batches = []
    for b, counts in enumerate(((2, 0), (3, 1))):
        num_queries, num_classes = 6, 3
        logits = torch.randn(len(counts), num_queries, num_classes, generator=generator) - 2
        pred_boxes = torch.rand(len(counts), num_queries, 4, generator=generator) * 0.3 + 0.2
        labels = []
        for i, n in enumerate(counts):
            boxes = torch.cat([0.3 + 0.4 * torch.rand(n, 2, generator=generator),
                               0.1 + 0.2 * torch.rand(n, 2, generator=generator)], dim=1)
            classes = torch.randint(0, num_classes, (n,), generator=generator)
            # Queries near the objects, confident in their class: a non-trivial mAP.
            pred_boxes[i, :n] = boxes + 0.01 * torch.randn(n, 4, generator=generator)
            logits[i, torch.arange(n), classes] = 3.0
            labels.append({"boxes": boxes, "class_labels": classes, "orig_size": torch.tensor([240 + 40 * b, 320]),
                           "iscrowd": torch.zeros(n, dtype=torch.long)})
        batches.append((logits, pred_boxes, labels))

    # What the evaluator should amount to: post-processing, then the metric on pixel boxes.
    metric = CocoDetectionMetric(id2label=ID2LABEL)
    for logits, pred_boxes, labels in batches:
        sizes = torch.stack([t["orig_size"] for t in labels])
        results = processor.post_process_object_detection(
            {"logits": logits, "pred_boxes": pred_boxes}, threshold=0.0, target_sizes=sizes, top_k=10)
        references = []
        for t in labels:
            height, width = t["orig_size"].tolist()
            cx, cy, w, h = t["boxes"].double().unbind(-1)
            boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * torch.tensor(
                [width, height, width, height], dtype=torch.float64)
            references.append({"boxes": boxes.reshape(-1, 4), "labels": t["class_labels"],
                               "image_size": [height, width]})
        metric.add_batch(predictions=results, references=references)
    expected = metric.compute()
    assert 0.1 < expected["map"] < 1.0

    evaluator = DetectionEvaluator(processor, ID2LABEL, threshold=0.0, top_k=10)
    rounds = []
    for _ in range(2):  # two evaluations: the second must not see the first's batches
        (l0, b0, t0), (l1, b1, t1) = batches
        # First batch as NumPy with an extra trailing output, second as tensors.
        assert evaluator(EvalPrediction(predictions=(l0.numpy(), b0.numpy(), np.zeros(1)),
                                        label_ids=[{k: v.numpy() for k, v in t.items()} for t in t0]),
                         compute_result=False) == {}
        rounds.append(evaluator(EvalPrediction(predictions=(l1, b1), label_ids=t1), compute_result=True))
    assert rounds[0] == rounds[1]
    for key, value in expected.items():
        assert rounds[0][key] == pytest.approx(value, abs=1e-9), key

    # Labels as one dict of batched values (per-image lists) give the same numbers.
    (l0, b0, t0), (l1, b1, t1) = batches
    for logits, pred_boxes, targets, last in ((l0, b0, t0, False), (l1, b1, t1, True)):
        batched = {key: [t[key] for t in targets] for key in targets[0]}
        batched["orig_size"] = torch.stack(batched["orig_size"])
        result = evaluator(EvalPrediction(predictions=(logits, pred_boxes), label_ids=batched), compute_result=last)
    assert result == rounds[0]

    # The Trainer path: preprocess_logits_for_metrics first (top-k per image), then compute_metrics on the
    # concatenated per-image lists, as gathered across processes, gives the same numbers.
    for logits, pred_boxes, targets, last in ((l0, b0, t0, False), (l1, b1, t1, True)):
        detections = evaluator.preprocess((logits, pred_boxes), targets)
        assert isinstance(detections, list) and len(detections) == len(targets)
        assert all(len(d["scores"]) <= 10 and d["boxes"].max() <= 1 for d in detections)
        result = evaluator(EvalPrediction(predictions=detections, label_ids=targets), compute_result=last)
    assert result == rounds[0]


def test_class_names_cannot_overwrite_summary_metrics():
    # Integer datasets name their classes "0", "1", ...: class "50" must not replace map_50.
    id2label = {i: str(i) for i in range(60)} | {60: "small"}
    metric = CocoDetectionMetric(id2label=id2label)
    box = [[10.0, 10.0, 30.0, 30.0]]
    metrics = metric.compute(
        predictions=[{"boxes": box, "scores": [0.9], "labels": [50]}],
        references=[{"boxes": box, "labels": [50], "image_size": [64, 64]}])
    assert metrics["map_50"] == pytest.approx(1.0) and metrics["ap_50"] == pytest.approx(1.0)
    assert metrics["ap_small"] == -1.0 and metrics["map_small"] == pytest.approx(1.0)  # a 20 x 20 box is small


# ---------------------------------------------------------------------------------------------------------------
# DetectionEvaluator against a split's own COCO ground truth (what run_detection.py does)
# ---------------------------------------------------------------------------------------------------------------

# Image 5 (400 x 400): an object of category 1 whose box is 50 x 50 (2500 px^2, "medium") but whose annotation area
# (its mask) is 100 px^2 ("small"), and a crowd region of category 1. Image 17 (200 x 300): a category 90 object,
# area 2000 ("medium"). Labels 0, 1, 2 are categories 1, 7, 90.
GROUND_TRUTH = {
    "images": [{"id": 5, "width": 400, "height": 400}, {"id": 17, "width": 300, "height": 200}],
    "annotations": [
        {"id": 1, "image_id": 5, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 100.0, "iscrowd": 0},
        {"id": 2, "image_id": 5, "category_id": 1, "bbox": [100, 100, 200, 200], "area": 30000.0, "iscrowd": 1},
        {"id": 3, "image_id": 17, "category_id": 90, "bbox": [30, 20, 60, 40], "area": 2000.0, "iscrowd": 0}],
    "categories": [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 90, "name": "fish"}],
}
CATEGORY_IDS = [1, 7, 90]


def _image(image_id, size, boxes, scores, labels):
    """(detections as `DetectionEvaluator.preprocess` gives them: x0, y0, x1, y1 normalised; the image's labels)."""
    height, width = size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    detection = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) / scale,
                 "scores": torch.tensor(scores), "labels": torch.tensor(labels)}
    return detection, {"image_id": torch.tensor([image_id]), "orig_size": torch.tensor(size),
                       "class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}


# A perfect detection of the small object, a confident one inside the crowd region (a low IoU with it: a false
# positive if the region were an object), a perfect one of the fish.
IMAGES = [_image(5, (400, 400), [[10, 10, 60, 60], [150, 150, 190, 190]], [0.5, 0.9], [0, 0]),
          _image(17, (200, 300), [[30, 20, 90, 60]], [0.8], [2])]


def _evaluate(evaluator, images, batches=((0, 1), (1, 2))):
    for start, stop in batches:
        detections, labels = zip(*images[start:stop])
        metrics = evaluator(EvalPrediction(predictions=list(detections), label_ids=list(labels)),
                            compute_result=stop == len(images))
    return metrics


def _pycocotools(ground_truth, images) -> dict:
    """COCOeval straight on the ground truth and the detections as COCO results in the ground truth's ids."""
    results = []
    for detection, labels in images:
        height, width = labels["orig_size"].tolist()
        boxes = detection["boxes"] * torch.tensor([width, height, width, height], dtype=torch.float32)
        for (x0, y0, x1, y1), score, label in zip(boxes.tolist(), detection["scores"].tolist(),
                                                   detection["labels"].tolist()):
            results.append({"image_id": int(labels["image_id"]), "category_id": CATEGORY_IDS[label], "score": score,
                            "bbox": [x0, y0, x1 - x0, y1 - y0]})
    return dict(zip(SUMMARY_KEYS, cocoeval_stats(ground_truth, results)))


def test_evaluator_ignores_crowd_regions_and_buckets_by_annotation_area():
    evaluator = DetectionEvaluator(DiTDetectionImageProcessor(), {0: "cat", 1: "dog", 2: "fish"},
                                   ground_truths={"eval": GROUND_TRUTH}, category_ids=CATEGORY_IDS)
    metrics = _evaluate(evaluator, IMAGES)
    # The detection on the crowd region is neither true nor false positive: everything is found, nothing is wrong.
    assert metrics["map"] == pytest.approx(1.0) and metrics["ap_cat"] == pytest.approx(1.0)
    # Size buckets follow the annotation area: the 50 x 50 box of area 100 is small, the fish (2000) medium.
    assert metrics["map_small"] == pytest.approx(1.0) and metrics["map_medium"] == pytest.approx(1.0)
    assert metrics["map_large"] == -1.0 and metrics["ap_dog"] == -1.0
    for key, value in _pycocotools(GROUND_TRUTH, IMAGES).items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key

    # The same detections scored the old way, references rebuilt from labels without the crowd region and with box
    # areas, differ: the crowd detection is a false positive and the object counts as medium.
    no_crowd = {**GROUND_TRUTH, "annotations": [dict(a, area=a["bbox"][2] * a["bbox"][3])
                                                for a in GROUND_TRUTH["annotations"] if not a["iscrowd"]]}
    old_way = _pycocotools(no_crowd, IMAGES)
    assert old_way["map"] < 0.9 and old_way["map_small"] == -1.0


def test_evaluator_scores_the_selected_split_and_counts_each_image_once():
    test_truth = {**GROUND_TRUTH, "annotations": [dict(a, category_id=7) for a in GROUND_TRUTH["annotations"]]}
    evaluator = DetectionEvaluator(DiTDetectionImageProcessor(), {0: "cat", 1: "dog", 2: "fish"},
                                   ground_truths={"eval": GROUND_TRUTH, "test": test_truth}, category_ids=CATEGORY_IDS)
    validation = _evaluate(evaluator, IMAGES)
    evaluator.select("test")
    assert _evaluate(evaluator, IMAGES)["map"] == pytest.approx(0.0)  # the test split's objects are all dogs
    evaluator.select("eval")
    # A repeat of an image (a distributed sampler pads a process's share with one) is counted once.
    assert _evaluate(evaluator, [*IMAGES, IMAGES[0]], batches=((0, 2), (2, 3))) == validation

    with pytest.raises(ValueError, match=r"No ground truth for the evaluation 'eval_extra'; there is one for"):
        evaluator.select("eval_extra")
    only_test = DetectionEvaluator(DiTDetectionImageProcessor(), {0: "cat", 1: "dog", 2: "fish"},
                                   ground_truths={"test": test_truth}, category_ids=CATEGORY_IDS)
    with pytest.raises(ValueError, match=r"Which split is this\? Call select\(\) with one of \['test'\] first"):
        _evaluate(only_test, IMAGES)
    with pytest.raises(ValueError, match=r"image_id 6 is not in the 'eval' ground truth"):
        _evaluate(evaluator, [_image(6, (400, 400), [[1, 1, 2, 2]], [0.5], [0])], batches=((0, 1),))
    evaluator.select("eval")
    with pytest.raises(ValueError, match=r"image_id 5: the labels' orig_size \(400, 300\) is not the ground truth"):
        _evaluate(evaluator, [_image(5, (400, 300), [[1, 1, 2, 2]], [0.5], [0])], batches=((0, 1),))


def test_evaluator_on_no_images_and_no_detections():
    evaluator = DetectionEvaluator(DiTDetectionImageProcessor(), {0: "cat", 1: "dog", 2: "fish"},
                                   ground_truths={"eval": GROUND_TRUTH}, category_ids=CATEGORY_IDS)
    nothing = evaluator(EvalPrediction(predictions=[], label_ids=[]), compute_result=True)
    assert set(nothing) == set(SUMMARY_KEYS) | {"ap_cat", "ap_dog", "ap_fish"}
    assert all(value == -1.0 for value in nothing.values())
    empty = [_image(5, (400, 400), [], [], []), _image(17, (200, 300), [], [], [])]
    metrics = _evaluate(evaluator, empty)
    assert metrics["map"] == 0.0 and metrics["mar_100"] == 0.0 and metrics["map_large"] == -1.0
