"""COCO box mAP from the COCO reference code (pycocotools' `COCOeval`), as an `evaluate` metric and a Trainer hook.

`coco_evaluate` is the one place COCOeval runs. `DetectionEvaluator` (the Trainer's `compute_metrics`) scores the
model's detections against each eval split's own COCO ground truth (`data.coco_ground_truth`: crowd regions, annotation
areas, the source's image and category ids), as DETR's `CocoEvaluator` does with `base_ds.coco`; `CocoDetectionMetric`
scores per-image references given with the predictions, for callers outside the Trainer.

Training-side module: never needed at inference and never shipped as remote code.
"""

from __future__ import annotations

import contextlib
import io
import uuid
from collections.abc import Mapping

import datasets
import evaluate
import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# Order of `COCOeval.stats` after `summarize()` for iouType="bbox".
SUMMARY_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large",
                "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large")

_DESCRIPTION = """COCO object-detection metrics (box AP/AR over IoU 0.50:0.95, size buckets, per-class AP), computed by
pycocotools' COCOeval. Every value is -1.0 where COCO has nothing to average (no ground truth at all, or none in that
size bucket / class)."""

_INPUTS = """
Args:
    predictions: one dict per image: "boxes" ([n, 4], x0, y0, x1, y1 absolute pixels), "scores" ([n]), "labels" ([n]).
    references: one dict per image: "boxes" ([m, 4], x0, y0, x1, y1 absolute pixels), "labels" ([m]),
        "image_size" ([height, width] pixels), optional "iscrowd" ([m], 0/1) and "area" ([m], pixels^2; default is
        the box area).
    Lists, NumPy arrays and torch tensors are all accepted.
Returns:
    dict of floats: map, map_50, map_75, map_small, map_medium, map_large, mar_1, mar_10, mar_100, mar_small,
    mar_medium, mar_large, and ap_<class name> (AP at IoU 0.50:0.95 per class, -1.0 for a class without ground truth).
"""


def _to_python(obj):
    """Tensors and arrays -> nested Python lists, so Arrow can encode them (it cannot encode torch tensors)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Mapping):
        return {key: _to_python(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_python(value) for value in obj]
    return obj


def _fill_optional(references):
    """Python references with "iscrowd"/"area" present (None when not given): evaluate wants every feature key."""
    references = _to_python(references)
    return None if references is None else [{"iscrowd": None, "area": None, **r} for r in references]


class CocoDetectionMetric(evaluate.Metric):
    """COCO box mAP as an `evaluate.Metric`; batches go to evaluate's Arrow cache, so memory stays flat over an eval.

    Args:
        id2label (`dict[int, str]`, *optional*): class names for the per-class keys (`ap_<name>`) and the category
            list (every id in it is a category, plus any id seen in the data). Without it, keys are `ap_<id>`.
        **kwargs: `evaluate.Metric` options (`cache_dir`, `experiment_id`, `keep_in_memory`, ...).
    """

    def __init__(self, id2label: Mapping | None = None, **kwargs):
        # Configs loaded from JSON have string keys; categories are ints.
        self.id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
        super().__init__(**kwargs)

    def _info(self) -> evaluate.MetricInfo:
        floats, ints = datasets.List(datasets.Value("float64")), datasets.List(datasets.Value("int64"))
        # float64 so that pixel coordinates and scores reach COCOeval exactly as given.
        boxes = datasets.List(datasets.List(datasets.Value("float64"), length=4))
        features = datasets.Features({
            "predictions": {"boxes": boxes, "scores": floats, "labels": ints},
            "references": {"boxes": boxes, "labels": ints, "iscrowd": ints, "area": floats,
                           "image_size": datasets.List(datasets.Value("int64"), length=2)},
        })
        return evaluate.MetricInfo(description=_DESCRIPTION, citation="", inputs_description=_INPUTS, features=features)

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of per-image predictions and references (see the inputs description)."""
        return super().add_batch(predictions=_to_python(predictions), references=_fill_optional(references), **kwargs)

    def compute(self, *, predictions=None, references=None, **kwargs):
        """Compute the metrics over every batch added so far (plus the given one), then clear the stored batches."""
        return super().compute(predictions=_to_python(predictions), references=_fill_optional(references), **kwargs)

    def _compute(self, predictions, references) -> dict[str, float]:
        images, annotations, detections, seen = [], [], [], set()
        for image_id, (prediction, reference) in enumerate(zip(predictions, references)):
            height, width = reference["image_size"]
            images.append({"id": image_id, "height": height, "width": width})
            count = len(reference["boxes"])
            crowd = reference.get("iscrowd") or [0] * count
            area = reference.get("area") or [None] * count
            for (x0, y0, x1, y1), label, is_crowd, a in zip(reference["boxes"], reference["labels"], crowd, area):
                # Annotation ids start at 1: COCOeval marks "unmatched" with id 0.
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": int(is_crowd),
                                    "area": (x1 - x0) * (y1 - y0) if a is None else a})
                seen.add(int(label))
            for (x0, y0, x1, y1), score, label in zip(prediction["boxes"], prediction["scores"], prediction["labels"]):
                detections.append({"image_id": image_id, "category_id": int(label), "score": score,
                                   "bbox": [x0, y0, x1 - x0, y1 - y0]})
                seen.add(int(label))
        category_ids = sorted(set(self.id2label) | seen)
        categories = [{"id": c, "name": self.id2label.get(c, str(c))} for c in category_ids]
        return coco_evaluate({"images": images, "annotations": annotations, "categories": categories}, detections)


def coco_ground_truth_index(ground_truth: Mapping) -> COCO:
    """pycocotools' `COCO` of a COCO instances dict ({"images", "annotations", "categories"}), built quietly."""
    with contextlib.redirect_stdout(io.StringIO()):  # COCO prints its progress
        coco = COCO()
        coco.dataset = dict(ground_truth)
        coco.createIndex()
    return coco


def coco_evaluate(ground_truth: COCO | Mapping, detections: list[dict], image_ids=None) -> dict[str, float]:
    """
    COCOeval ("bbox") of `detections` against `ground_truth`, summarised.

    Args:
        ground_truth: a COCO instances dict or its `COCO`; crowd annotations are "ignore" regions, `area` decides the
            size bucket, every category counts (one without ground truth is -1, as COCO has nothing to average).
        detections: COCO results: {"image_id", "category_id", "bbox" (x, y, w, h pixels), "score"}, at most 100 per
            image (COCO's largest maxDets).
        image_ids: the images evaluated (COCOeval's `params.imgIds`; DETR's: the images that were predicted);
            default all of the ground truth's.

    Returns:
        floats: `SUMMARY_KEYS` (COCOeval's stats, in order) and `ap_<category name>` (AP at IoU 0.50:0.95, area all,
        100 detections; -1.0 for a category without ground truth, so the keys are the same every evaluation).
    """
    coco = ground_truth if isinstance(ground_truth, COCO) else coco_ground_truth_index(ground_truth)
    names = {c["id"]: str(c.get("name", c["id"])) for c in coco.dataset["categories"]}
    image_ids = sorted(coco.getImgIds()) if image_ids is None else sorted(set(int(i) for i in image_ids))
    if not image_ids:  # nothing evaluated: COCOeval would read an empty image list as "all images"
        return {**{key: -1.0 for key in SUMMARY_KEYS}, **{f"ap_{name}": -1.0 for name in names.values()}}

    # COCOeval prints its progress and summary table; keep the Trainer's log clean.
    with contextlib.redirect_stdout(io.StringIO()):
        if detections:
            results = coco.loadRes([dict(d) for d in detections])  # loadRes adds keys to the dicts it is given
        else:
            # loadRes indexes detections[0] and crashes on an empty list; an empty result set scores 0 AP
            # wherever ground truth exists.
            results = coco_ground_truth_index({**coco.dataset, "annotations": []})
        evaluation = COCOeval(coco, results, iouType="bbox")
        evaluation.params.imgIds = image_ids
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()

    metrics = {key: float(value) for key, value in zip(SUMMARY_KEYS, evaluation.stats)}
    # precision: [iou thresholds, recall thresholds, categories, area ranges, max dets]; -1 = no ground truth.
    # Area "all" (index 0) and 100 detections (last) is what `map` averages over; same per class here.
    precision = evaluation.eval["precision"]
    for k, category in enumerate(evaluation.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        metrics[f"ap_{names.get(category, str(category))}"] = float(values.mean()) if values.size else -1.0
    return metrics


class DetectionEvaluator:
    """`compute_metrics` for transformers' `Trainer` with `batch_eval_metrics=True`: COCO mAP over the eval set.

    Each batch is post-processed right away and only the top-k detections per image are kept, never whole logits
    (transformers#34675). Works with several processes: the Trainer hands every process all processes' per-image
    detections and labels (`eval_use_gather_object=True`), and each image is counted once.

    With `ground_truths` (run_detection.py's way), detections are scored against the active eval split's own COCO
    ground truth (`data.coco_ground_truth` of its records: crowd regions ignored, annotation areas for the size
    buckets, the source's image and category ids), over the images that were predicted, as DETR's `CocoEvaluator`
    does: the numbers are what pycocotools gives on the split's COCO json (where the data check fixed nothing: a
    record it fixed is evaluated as fixed, e.g. a box clipped to its image). The Trainer does not tell
    `compute_metrics` which split it scores: `select(metric_key_prefix)` does (`DetectionTrainer.evaluate` calls it).
    Without them, references are rebuilt from the labels (boxes as the model is trained on them, no crowd regions,
    box areas): an approximation for callers that have no records.

    Args:
        image_processor: a `DiTDetectionImageProcessor` (its `post_process_object_detection` is used).
        id2label (`dict[int, str]`): class names, for the per-class keys.
        threshold (`float`): keep detections with score > threshold (0.0: keep all top-k, as COCO expects).
        top_k (`int`): detections per image (COCO evaluates at most 100).
        ground_truths (`dict[str, dict]`, *optional*): per metric-key prefix ("eval", "test", ...) a COCO instances
            dict; "eval" is active until `select` picks another.
        category_ids (`list[int]`, *optional*): the ground truth's category id of each label (label i is
            `category_ids[i]`); default: labels are the ids.
    """

    def __init__(self, image_processor, id2label: Mapping, threshold: float = 0.0, top_k: int = 100,
                 ground_truths: Mapping[str, Mapping] | None = None, category_ids: list[int] | None = None):
        self.image_processor, self.threshold, self.top_k = image_processor, threshold, top_k
        self.category_ids = None if category_ids is None else [int(c) for c in category_ids]
        self.ground_truths = dict(ground_truths or {})
        self.split = "eval" if "eval" in self.ground_truths else None
        self._indexes: dict[str, COCO] = {}
        self._results: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # image_id -> its detections
        # A unique experiment id keeps the cache files of concurrent processes / evaluators apart.
        self.metric = CocoDetectionMetric(id2label=id2label, experiment_id=uuid.uuid4().hex)
        self._num_images = 0

    def select(self, metric_key_prefix: str) -> None:
        """Score the next evaluation against the ground truth registered under `metric_key_prefix`."""
        if self.ground_truths and metric_key_prefix not in self.ground_truths:
            raise ValueError(f"No ground truth for the evaluation {metric_key_prefix!r}; there is one for "
                             f"{sorted(self.ground_truths)}.")
        self.split = metric_key_prefix if self.ground_truths else None
        self._results = {}

    def preprocess(self, outputs, labels=None) -> list[dict[str, torch.Tensor]]:
        """`preprocess_logits_for_metrics`: model outputs of one batch -> per image the top-k detections
        (`"scores"`, `"labels"`, `"boxes"` x0, y0, x1, y1 normalised), on the CPU.

        Run before the Trainer gathers predictions across processes, so what is gathered is small, and a list of
        per-image dicts, which concatenates across processes as images (with `eval_use_gather_object=True`).
        """
        if isinstance(outputs, Mapping):
            logits, pred_boxes = outputs["logits"], outputs["pred_boxes"]
        else:
            logits, pred_boxes = outputs[0], outputs[1]
        batch = {"logits": _as_tensor(logits).float(), "pred_boxes": _as_tensor(pred_boxes).float()}
        with torch.no_grad():
            results = self.image_processor.post_process_object_detection(
                batch, threshold=self.threshold, target_sizes=None, top_k=self.top_k)
        return [{key: value.cpu() for key, value in result.items()} for result in results]

    def __call__(self, eval_pred, compute_result: bool = False) -> dict[str, float]:
        """Add one batch; on `compute_result=True` (the last batch) return the metrics and reset for the next eval.

        `eval_pred.predictions`: what `preprocess` returns (a list of per-image detections), or raw outputs:
        (logits `[B, Q, C]`, pred_boxes `[B, Q, 4]` cx, cy, w, h normalised, ...extras) or a mapping with those
        keys. `eval_pred.label_ids`: B dicts with "orig_size" ((height, width) pixels) and "image_id" (with ground
        truths) or "boxes" (`[n, 4]` cx, cy, w, h normalised) and "class_labels" (`[n]`, without); one dict of
        batched values is accepted too.
        """
        detections = eval_pred.predictions
        if not (isinstance(detections, list) and all(isinstance(d, Mapping) and "scores" in d for d in detections)):
            detections = self.preprocess(detections)
        targets = _split_targets(eval_pred.label_ids)
        if self.split is None:
            if self.ground_truths:
                raise ValueError(f"Which split is this? Call select() with one of {sorted(self.ground_truths)} first "
                                 "(DetectionTrainer.evaluate does, with its metric_key_prefix).")
            return self._add_with_label_references(detections, targets, compute_result)
        for detection, target in zip(detections, targets):
            self._add_image(detection, target)
        if not compute_result:
            return {}
        return self._compute()

    def _index(self) -> COCO:
        """pycocotools' index of the active split's ground truth, built once per split."""
        if self.split not in self._indexes:
            self._indexes[self.split] = coco_ground_truth_index(self.ground_truths[self.split])
        return self._indexes[self.split]

    def _add_image(self, detection: Mapping, target: Mapping) -> None:
        """Keep one image's detections, boxes in its pixels (x0, y0, x1, y1, float32 as post-processing scales them)."""
        image_id = int(_as_tensor(target["image_id"]).reshape(-1)[0])
        if image_id in self._results:  # a repeat that a distributed sampler padded a process's share with
            return
        image = self._index().imgs.get(image_id)
        if image is None:
            raise ValueError(f"image_id {image_id} is not in the {self.split!r} ground truth: the evaluated data is "
                             "not the data the ground truth was built from.")
        height, width = _as_tensor(target["orig_size"]).reshape(2).tolist()
        if (height, width) != (image["height"], image["width"]):
            raise ValueError(f"image_id {image_id}: the labels' orig_size {(height, width)} is not the ground truth's "
                             f"(height, width) {(image['height'], image['width'])}.")
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        boxes = _as_tensor(detection["boxes"]).float().reshape(-1, 4) * scale
        self._results[image_id] = (boxes, _as_tensor(detection["scores"]).reshape(-1),
                                   _as_tensor(detection["labels"]).reshape(-1))

    def _compute(self) -> dict[str, float]:
        """COCOeval of the kept detections, as COCO results in the ground truth's ids; then reset."""
        results, self._results = self._results, {}
        detections = []
        for image_id, (boxes, scores, labels) in results.items():
            for (x0, y0, x1, y1), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
                category_id = self.category_ids[label] if self.category_ids is not None else int(label)
                detections.append({"image_id": image_id, "category_id": category_id, "score": score,
                                   "bbox": [x0, y0, x1 - x0, y1 - y0]})
        return coco_evaluate(self._index(), detections, image_ids=list(results))

    def _add_with_label_references(self, detections, targets, compute_result: bool) -> dict[str, float]:
        """Without ground truth: references rebuilt from the labels (see the class docstring)."""
        sizes = torch.tensor([_as_tensor(t["orig_size"]).reshape(2).tolist() for t in targets], dtype=torch.float32)
        results = []
        for detection, (height, width) in zip(detections, sizes.tolist()):
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            results.append({**detection, "boxes": _as_tensor(detection["boxes"]).float() * scale})

        references = []
        for target, (height, width) in zip(targets, sizes.tolist()):
            cx, cy, w, h = _as_tensor(target["boxes"]).float().reshape(-1, 4).double().unbind(-1)
            # Normalised centre format -> x0, y0, x1, y1 in pixels of the original image, like the predictions.
            boxes = torch.stack([(cx - w / 2) * width, (cy - h / 2) * height,
                                 (cx + w / 2) * width, (cy + h / 2) * height], dim=-1)
            references.append({"boxes": boxes, "labels": _as_tensor(target["class_labels"]).reshape(-1),
                               "image_size": [int(height), int(width)]})
        self.metric.add_batch(predictions=results, references=references)
        self._num_images += len(references)
        if not compute_result:
            return {}
        if self._num_images == 0:  # an empty eval set: nothing was written, evaluate would refuse to compute
            self.metric.add_batch(predictions=[], references=[])
        self._num_images = 0
        # evaluate drops its cache after compute, so the next evaluation starts empty.
        return self.metric.compute()


def _as_tensor(value) -> torch.Tensor:
    """Tensor (any device) or array-like -> CPU tensor."""
    return value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


def _split_targets(label_ids) -> list[Mapping]:
    """Per-image label dicts from a list/tuple of dicts (the normal case) or one dict per batch."""
    if not isinstance(label_ids, Mapping):
        return list(label_ids)
    if _as_tensor(label_ids["orig_size"]).ndim == 1:  # a single image's dict
        return [label_ids]
    batch = len(label_ids["orig_size"])
    return [{key: value[i] for key, value in label_ids.items()} for i in range(batch)]


__all__ = ["CocoDetectionMetric", "DetectionEvaluator", "SUMMARY_KEYS", "coco_evaluate", "coco_ground_truth_index"]
