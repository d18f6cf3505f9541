"""COCO mAP metric and Trainer evaluator: numbers must be the COCO reference's (pycocotools run directly here)."""

import contextlib
import io

import numpy as np
import pytest
import torch
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
