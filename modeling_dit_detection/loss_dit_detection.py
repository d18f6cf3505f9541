"""Set-prediction loss of DETR-style detectors with sigmoid classification: label checks, Hungarian matching (with
Group DETR query groups) and the criterion (focal or IoU-aware classification + L1 + GIoU on every output).

Boxes are `(cx, cy, w, h)` normalised to 0..1 by the image size everywhere; logits are raw, one per class, with no
background class (sigmoid, not softmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

# Replaces NaN/inf matching costs (degenerate boxes, overflow under mixed precision, transformers#42202): large
# enough that such a pair is never preferred, small enough that scipy's sums stay exact in float64.
_INVALID_COST = 1e8
_BOX_HINT = "boxes must be normalised (cx, cy, w, h) relative to the image size"


def validate_labels(labels, batch_size: int, num_labels: int) -> None:
    """Checks training labels; raises `ValueError` naming the record, row and value of the first problem.

    Args:
        labels: list of `batch_size` dicts with `"class_labels"` (integer tensor `[n]`, ids in `[0, num_labels)`)
            and `"boxes"` (float tensor `[n, 4]`, cx, cy, w, h normalised to 0..1). Other keys are ignored; n = 0 is
            an image without objects.
    """
    if not isinstance(labels, (list, tuple)):
        raise ValueError(f"labels must be a list of {batch_size} dicts (one per image), got {type(labels).__name__}.")
    if len(labels) != batch_size:
        raise ValueError(f"labels has {len(labels)} records but the batch has {batch_size} images.")
    for i, record in enumerate(labels):
        name = f"labels[{i}]"
        if not isinstance(record, dict):
            raise ValueError(f"{name} must be a dict with 'class_labels' and 'boxes', got {type(record).__name__}.")
        for key in ("class_labels", "boxes"):
            if key not in record:
                raise ValueError(f"{name} is missing key {key!r}.")
            if not isinstance(record[key], torch.Tensor):
                raise ValueError(f"{name}[{key!r}] must be a torch.Tensor, got {type(record[key]).__name__}.")
        classes, boxes = record["class_labels"], record["boxes"]
        if classes.ndim != 1:
            raise ValueError(f"{name}['class_labels'] must have shape [n], got {list(classes.shape)}.")
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"{name}['boxes'] must have shape [n, 4], got {list(boxes.shape)}.")
        if len(classes) != len(boxes):
            raise ValueError(f"{name} has {len(classes)} class_labels but {len(boxes)} boxes.")
        if classes.dtype.is_floating_point or classes.dtype.is_complex or classes.dtype == torch.bool:
            raise ValueError(f"{name}['class_labels'] must be an integer tensor, got dtype {classes.dtype}.")
        if not boxes.dtype.is_floating_point:
            raise ValueError(f"{name}['boxes'] must be a float tensor, got dtype {boxes.dtype}; {_BOX_HINT}.")
        bad = ((classes < 0) | (classes >= num_labels)).nonzero()
        if len(bad):
            row = int(bad[0])
            raise ValueError(f"{name}['class_labels'][{row}] = {int(classes[row])} is outside [0, {num_labels}).")
        boxes = boxes.detach().double()
        corners = box_convert(boxes, "cxcywh", "xyxy")
        checks = (
            (~boxes.isfinite()).any(-1), "has non-finite values",
            (boxes[:, 2:] <= 0).any(-1), "has width or height <= 0",
            ((boxes < 0) | (boxes > 1)).any(-1), "has cx, cy, w or h outside [0, 1]",
            ((corners < -1e-3) | (corners > 1 + 1e-3)).any(-1), "has corners (cx -+ w/2, cy -+ h/2) outside [0, 1]",
        )
        for mask, problem in zip(checks[::2], checks[1::2]):
            if mask.any():
                row = int(mask.nonzero()[0])
                value = [round(v, 4) for v in boxes[row].tolist()]
                raise ValueError(f"{name}['boxes'][{row}] = {value} {problem}; {_BOX_HINT}.")


class HungarianMatcher:
    """One-to-one matching of predictions to targets, minimising
    `class_cost * focal + bbox_cost * L1(cxcywh) - giou_cost * GIoU(xyxy)` per image (and per query group).

    Costs are computed per image (padded to the batch's largest target count, never against the other images'
    targets), in float32 on the logits' device, and reach the CPU in one copy; scipy then solves each image's and
    group's assignment."""

    def __init__(self, class_cost=2.0, bbox_cost=5.0, giou_cost=2.0, focal_alpha=0.25, focal_gamma=2.0):
        self.class_cost, self.bbox_cost, self.giou_cost = class_cost, bbox_cost, giou_cost
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def __call__(self, logits, pred_boxes, targets, num_groups: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            logits: `[batch, queries, num_labels]` raw class logits, or `[sets, batch, queries, num_labels]`: several
                sets of predictions for the same images (e.g. decoder layers), matched each on its own in one pass.
            pred_boxes: `[batch, queries, 4]` (or `[sets, batch, queries, 4]`) cx, cy, w, h normalised to 0..1.
            targets: list of `batch` dicts with `"class_labels"` `[n]` and `"boxes"` `[n, 4]` (cx, cy, w, h, 0..1).
            num_groups: the query axis is `num_groups` contiguous equal groups, each matched one-to-one on its own.

        Returns:
            Per image (per set, then image, with a set axis) `(query_indices, target_indices)`, int64 CPU tensors of
            length `num_groups * min(n, queries / num_groups)`; query indices index the full query axis.
        """
        queries = logits.shape[-2]
        if queries % num_groups:
            raise ValueError(f"{queries} queries cannot be split into {num_groups} equal groups.")
        sizes = [len(t["boxes"]) for t in targets]
        sets = logits.shape[0] if logits.ndim == 4 else 1
        empty = torch.empty(0, dtype=torch.int64)
        if max(sizes, default=0) == 0:
            return [(empty, empty) for _ in range(sets * len(targets))]
        cost = self.cost_matrices(logits, pred_boxes, targets).cpu().numpy().reshape(sets, len(targets), queries, -1)
        group_size = queries // num_groups
        # The bookkeeping stays in numpy, one tensor per image at the end: on a GPU the step is short enough that
        # per-group tensor ops here were a visible share of it.
        group_starts = np.arange(0, queries, group_size)
        indices = []
        for set_costs in cost:
            for image, size in enumerate(sizes):
                if size == 0:
                    indices.append((empty, empty))
                    continue
                groups = set_costs[image, :, :size].reshape(num_groups, group_size, size)
                rows, cols = zip(*(linear_sum_assignment(group) for group in groups))
                offsets = np.repeat(group_starts, min(size, group_size))
                indices.append((torch.from_numpy(np.concatenate(rows).astype(np.int64) + offsets),
                                torch.from_numpy(np.concatenate(cols).astype(np.int64))))
        return indices

    def cost_matrices(self, logits, pred_boxes, targets) -> torch.Tensor:
        """`[..., batch, queries, max n]` float32 matching costs of each image's queries against its own targets
        (columns past an image's target count are padding), for logits `[..., batch, queries, C]`. NaN / inf costs
        (degenerate boxes, overflow) become a large finite cost, so such a pair is never preferred and scipy never
        sees a non-finite number."""
        device = logits.device
        max_targets = max(len(t["boxes"]) for t in targets)
        # Padded per image, filled with one copy each (not one per image: each is a kernel launch on a GPU) at slots
        # computed on the CPU (a boolean mask on the GPU would wait for the device).
        slots = torch.arange(len(targets) * max_targets).view(len(targets), max_targets)
        slots = slots[slots % max_targets < torch.tensor([len(t["boxes"]) for t in targets])[:, None]]
        slots = slots.to(device, non_blocking=True)
        target_ids = torch.zeros(len(targets) * max_targets, dtype=torch.int64, device=device)
        target_ids[slots] = torch.cat([t["class_labels"] for t in targets]).to(device, torch.int64)
        target_boxes = torch.full((len(targets) * max_targets, 4), 0.5, device=device)  # padding: any valid box
        target_boxes[slots] = torch.cat([t["boxes"] for t in targets]).to(device, torch.float32)
        target_ids = target_ids.view(len(targets), max_targets)
        target_boxes = target_boxes.view(len(targets), max_targets, 4).expand(*pred_boxes.shape[:-2], -1, -1)
        # float32 without autocast: bf16/fp16 focal logs and GIoU divisions are what produce NaN costs.
        with torch.autocast(device_type=device.type, enabled=False):
            prob = logits.float().sigmoid()  # [..., B, Q, C]
            boxes = pred_boxes.float()
            # Deformable-DETR focal cost: what a positive costs minus what the same logit costs as a negative.
            alpha, gamma = self.focal_alpha, self.focal_gamma
            positive = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
            negative = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
            class_cost = (positive - negative).gather(-1, target_ids[:, None, :].expand(*boxes.shape[:-1], -1))
            bbox_cost = torch.cdist(boxes, target_boxes, p=1)
            giou = batched_generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                               box_convert(target_boxes, "cxcywh", "xyxy"))
            cost = self.class_cost * class_cost + self.bbox_cost * bbox_cost - self.giou_cost * giou
            return torch.nan_to_num(cost, nan=_INVALID_COST, posinf=_INVALID_COST, neginf=_INVALID_COST)


def paired_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of each box with its partner: `[N, 4]` and `[N, 4]` (x0, y0, x1, y1) -> `[N]` (the diagonal of
    `torchvision.ops.box_iou`, without its `N x N` matrix)."""
    top_left = torch.max(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(-1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).prod(-1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).prod(-1)
    return intersection / (area1 + area2 - intersection).clamp(min=1e-12)


def batched_generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalised IoU per batch element: `[..., N, 4]` x `[..., M, 4]` (x0, y0, x1, y1) -> `[..., N, M]`;
    the batched form of `torchvision.ops.generalized_box_iou`, which takes one image's boxes at a time."""
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    first, second = boxes1[..., :, None, :], boxes2[..., None, :, :]
    top_left = torch.max(first[..., :2], second[..., :2])
    bottom_right = torch.min(first[..., 2:], second[..., 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(-1)
    union = area1[..., :, None] + area2[..., None, :] - intersection
    hull = (torch.max(first[..., 2:], second[..., 2:]) - torch.min(first[..., :2], second[..., :2])).clamp(min=0).prod(-1)
    return intersection / union - (hull - union) / hull


@dataclass
class SetPredictions:
    """One set of predictions to supervise: the final decoder layer (`name=""`), an auxiliary layer (`"dec_0"`), or
    the encoder proposals (`"proposals"`). `logits`: `[batch, groups * queries, num_labels]`; `pred_boxes`:
    `[batch, groups * queries, 4]` cx, cy, w, h normalised."""

    name: str
    logits: torch.Tensor
    pred_boxes: torch.Tensor
    num_groups: int = 1


def global_num_boxes(targets, device) -> torch.Tensor:
    """Target boxes per process averaged over all processes (at least 1): a float scalar on `device`.

    Dividing each process's loss sum by this, then averaging gradients over processes (DDP), gives
    (sum over all processes) / (total box count), however boxes are spread across processes.
    """
    num_boxes = torch.tensor(float(sum(len(t["boxes"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_boxes, op=dist.ReduceOp.SUM)
        num_boxes = num_boxes / dist.get_world_size()
    return num_boxes.clamp(min=1)


class DiTDetectionCriterion(torch.nn.Module):
    """Classification (`class_loss`: "focal", the sigmoid focal loss, or "iou_aware", LW-DETR's IoU-aware BCE) + L1 +
    GIoU losses, after Hungarian matching, on every set of predictions."""

    def __init__(self, matcher: HungarianMatcher, class_loss_coefficient=2.0, bbox_loss_coefficient=5.0,
                 giou_loss_coefficient=2.0, focal_alpha=0.25, focal_gamma=2.0, class_loss="focal"):
        super().__init__()
        if class_loss not in ("focal", "iou_aware"):
            raise ValueError(f"class_loss must be 'focal' or 'iou_aware', got {class_loss!r}.")
        self.matcher = matcher
        self.class_loss = class_loss
        self.coefficients = {"loss_class": class_loss_coefficient, "loss_bbox": bbox_loss_coefficient,
                             "loss_giou": giou_loss_coefficient}
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def forward(self, predictions: list[SetPredictions], targets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            predictions: the sets to supervise; each is matched on its own (with its `num_groups`).
            targets: list of `batch` dicts with `"class_labels"` `[n]` and `"boxes"` `[n, 4]` (cx, cy, w, h, 0..1).

        Returns:
            `(total, loss_dict)`: the weighted sum over all sets (a float32 scalar with graph) and the detached
            unweighted losses `loss_class`, `loss_bbox`, `loss_giou`, suffixed `_{name}` for non-final sets.
        """
        num_boxes = global_num_boxes(targets, predictions[0].logits.device)
        total, loss_dict = 0.0, {}
        for stack in _stackable(predictions):
            # Each group sees every box once, so it is normalised as a full copy of the targets.
            losses = self._losses(stack, targets, num_boxes * stack[0].num_groups)
            for position, prediction in enumerate(stack):
                suffix = f"_{prediction.name}" if prediction.name else ""
                for key, values in losses.items():
                    total = total + self.coefficients[key] * values[position]
                    loss_dict[key + suffix] = values[position].detach()
        return total, loss_dict

    def _losses(self, stack: list[SetPredictions], targets, normaliser) -> dict[str, torch.Tensor]:
        """The losses of sets of equal shape (e.g. the decoder layers), matched and scored in one pass: per key a
        `[sets]` tensor."""
        device = stack[0].logits.device
        # float32 without autocast: half-precision focal/GIoU maths is where mixed-precision training gets NaN.
        with torch.autocast(device_type=device.type, enabled=False):
            logits = torch.stack([prediction.logits for prediction in stack]).float()  # [S, B, Q, C]
            pred_boxes = torch.stack([prediction.pred_boxes for prediction in stack]).float()
            sets, batch = logits.shape[:2]
            indices = self.matcher(logits, pred_boxes, targets, stack[0].num_groups)  # per (set, image)
            matched = torch.tensor([len(q) for q, _ in indices])  # per (set, image), in that order
            pair = torch.arange(len(indices))
            set_idx = (pair // batch).repeat_interleave(matched).to(device)
            image_idx = (pair % batch).repeat_interleave(matched).to(device)
            query_idx = torch.cat([q for q, _ in indices]).to(device)
            target_idx = torch.cat([j for _, j in indices]).to(device)
            # The targets of all images in one row each: offsets turn (image, target) into a row.
            sizes = torch.tensor([len(t["boxes"]) for t in targets], device=device)
            offsets = torch.cumsum(sizes, 0) - sizes
            all_classes = torch.cat([t["class_labels"].to(device) for t in targets]).long()
            all_boxes = torch.cat([t["boxes"].to(device) for t in targets]).float().reshape(-1, 4)
            rows = offsets[image_idx] + target_idx
            target_classes, target_boxes = all_classes[rows], all_boxes[rows]
            matched_boxes = pred_boxes[set_idx, image_idx, query_idx]
            matched_corners = box_convert(matched_boxes, "cxcywh", "xyxy")
            target_corners = box_convert(target_boxes, "cxcywh", "xyxy")
            positives = (set_idx, image_idx, query_idx, target_classes)
            if self.class_loss == "focal":
                loss_class = self._focal_loss(logits, positives)
            else:
                loss_class = self._iou_aware_loss(logits, positives, paired_box_iou(matched_corners.detach(),
                                                                                    target_corners))
            l1 = (matched_boxes - target_boxes).abs().sum(-1)
            giou = generalized_box_iou_loss(matched_corners, target_corners, reduction="none")
            loss_bbox = torch.zeros(sets, device=device).index_add(0, set_idx, l1)
            loss_giou = torch.zeros(sets, device=device).index_add(0, set_idx, giou)
        return {"loss_class": loss_class / normaliser, "loss_bbox": loss_bbox / normaliser,
                "loss_giou": loss_giou / normaliser}

    def _focal_loss(self, logits, positives) -> torch.Tensor:
        """Sigmoid focal loss summed per set `[S]`; `positives` indexes (set, image, query, class) of the matches.
        Unmatched queries (and all queries of images without boxes) are negatives for every class."""
        one_hot = torch.zeros_like(logits)
        one_hot[positives] = 1.0
        loss = sigmoid_focal_loss(logits, one_hot, self.focal_alpha, self.focal_gamma, reduction="none")
        return loss.flatten(1).sum(1)

    def _iou_aware_loss(self, logits, positives, iou) -> torch.Tensor:
        """LW-DETR's IoU-aware BCE summed per set `[S]`: a matched (query, class) aims at the soft target
        `t = prob**alpha * IoU**(1 - alpha)` (detached, at least 0.01) with weights `t` and `1 - t`; every other logit
        is a negative weighted by `prob**gamma`, as in the focal loss. `iou`: `[matches]` IoU of each matched box."""
        prob = logits.sigmoid()
        target = (prob[positives].detach() ** self.focal_alpha * iou ** (1 - self.focal_alpha)).clamp(min=0.01)
        positive_weight = torch.zeros_like(logits)
        positive_weight[positives] = target
        negative_weight = prob**self.focal_gamma
        negative_weight = negative_weight.index_put(positives, 1 - target)
        loss = -positive_weight * F.logsigmoid(logits) - negative_weight * F.logsigmoid(-logits)
        return loss.flatten(1).sum(1)


def _stackable(predictions: list[SetPredictions]) -> list[list[SetPredictions]]:
    """`predictions` in runs of sets that can be matched and scored together: the same shapes, groups and dtype,
    in their order (the decoder layers form one run, the proposals another)."""
    runs: list[list[SetPredictions]] = []
    for prediction in predictions:
        if runs and _stack_key(runs[-1][0]) == _stack_key(prediction):
            runs[-1].append(prediction)
        else:
            runs.append([prediction])
    return runs


def _stack_key(prediction: SetPredictions) -> tuple:
    return (prediction.logits.shape, prediction.pred_boxes.shape, prediction.num_groups, prediction.logits.dtype)
