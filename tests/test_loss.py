"""Tests of the set-prediction loss: label checks, Hungarian matching, the criterion, box-count normalisation."""

import itertools
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from modeling_dit_detection.loss_dit_detection import (
    DiTDetectionCriterion,
    HungarianMatcher,
    SetPredictions,
    global_num_boxes,
    validate_labels,
)

ALPHA, GAMMA = 0.25, 2.0


def random_boxes(n, generator):
    """[n, 4] valid normalised cx, cy, w, h."""
    wh = torch.rand(n, 2, generator=generator) * 0.4 + 0.05
    c = wh / 2 + torch.rand(n, 2, generator=generator) * (1 - wh)
    return torch.cat([c, wh], dim=-1)


def random_targets(sizes, num_labels, generator):
    return [{"class_labels": torch.randint(0, num_labels, (n,), generator=generator),
             "boxes": random_boxes(n, generator)} for n in sizes]


def reference_cost(logit_row, box, target_class, target_box, weights=(2.0, 5.0, 2.0)):
    """The matching cost of one (prediction, target) pair, in plain float64 Python."""
    p = 1 / (1 + math.exp(-float(logit_row[target_class])))
    positive = ALPHA * (1 - p) ** GAMMA * -math.log(p + 1e-8)
    negative = (1 - ALPHA) * p**GAMMA * -math.log(1 - p + 1e-8)
    box, target_box = [float(v) for v in box], [float(v) for v in target_box]
    l1 = sum(abs(a - b) for a, b in zip(box, target_box))

    def corners(b):
        return b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2

    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = corners(box), corners(target_box)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    giou = inter / union - (hull - union) / hull
    return weights[0] * (positive - negative) + weights[1] * l1 - weights[2] * giou


def valid_labels():
    return [{"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.2, 0.3, 0.4, 0.6]]),
             "image_id": torch.tensor(7)},
            {"class_labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]


# ---------------------------------------------------------------------------------------------- validate_labels


def test_validate_labels_accepts_valid_and_empty():
    validate_labels(valid_labels(), batch_size=2, num_labels=3)
    validate_labels((), batch_size=0, num_labels=3)
    # corners may overshoot by rounding (< 1e-3)
    validate_labels([{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.1, 0.5, 0.2005, 0.2]])}], 1, 3)


def _with(index, key, value):
    labels = valid_labels()
    if key is None:
        labels[index] = value
    elif value is None:
        del labels[index][key]
    else:
        labels[index][key] = value
    return labels


BAD_LABELS = [
    ({"class_labels": torch.tensor([0])}, r"list of 2 dicts"),
    (valid_labels()[:1], r"1 records but the batch has 2"),
    (_with(1, None, [1, 2]), r"labels\[1\] must be a dict"),
    (_with(0, "boxes", None), r"labels\[0\] is missing key 'boxes'"),
    (_with(1, "class_labels", None), r"labels\[1\] is missing key 'class_labels'"),
    (_with(0, "class_labels", [0, 2]), r"labels\[0\]\['class_labels'\] must be a torch.Tensor"),
    (_with(0, "class_labels", torch.tensor([[0, 2]])), r"labels\[0\]\['class_labels'\] must have shape \[n\]"),
    (_with(0, "boxes", torch.rand(2, 5)), r"labels\[0\]\['boxes'\] must have shape \[n, 4\], got \[2, 5\]"),
    (_with(0, "class_labels", torch.tensor([0])), r"labels\[0\] has 1 class_labels but 2 boxes"),
    (_with(0, "class_labels", torch.tensor([0.0, 2.0])), r"labels\[0\]\['class_labels'\] must be an integer"),
    (_with(0, "boxes", torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1]])), r"labels\[0\]\['boxes'\] must be a float"),
    (_with(0, "class_labels", torch.tensor([0, 3])), r"labels\[0\]\['class_labels'\]\[1\] = 3 is outside \[0, 3\)"),
    (_with(0, "class_labels", torch.tensor([-1, 0])), r"labels\[0\]\['class_labels'\]\[0\] = -1 is outside"),
    (_with(0, "boxes", torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.5, float("nan"), 0.2, 0.4]])),
     r"labels\[0\]\['boxes'\]\[1\] = \[0.5, nan, 0.2, 0.4\] has non-finite"),
    (_with(0, "boxes", torch.tensor([[0.5, 0.5, 0.0, 0.4], [0.5, 0.5, 0.2, 0.4]])),
     r"labels\[0\]\['boxes'\]\[0\] = \[0.5, 0.5, 0.0, 0.4\] has width or height <= 0"),
    (_with(0, "boxes", torch.tensor([[0.5, 0.5, 0.2, 0.4], [50.0, 60.0, 20.0, 30.0]])),
     r"labels\[0\]\['boxes'\]\[1\] = \[50.0, 60.0, 20.0, 30.0\] has cx, cy, w or h outside \[0, 1\].*normalised"),
    (_with(0, "boxes", torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.9, 0.5, 0.4, 0.2]])),
     r"labels\[0\]\['boxes'\]\[1\] = \[0.9, 0.5, 0.4, 0.2\] has corners .* outside \[0, 1\].*normalised \(cx, cy"),
]


@pytest.mark.parametrize("labels, message", BAD_LABELS)
def test_validate_labels_rejects(labels, message):
    with pytest.raises(ValueError, match=message):
        validate_labels(labels, batch_size=2, num_labels=3)


# ---------------------------------------------------------------------------------------------- matcher


@pytest.mark.parametrize("seed", range(10))
def test_matcher_finds_minimum_total_cost(seed):
    generator = torch.Generator().manual_seed(seed)
    batch = 2 + seed % 2
    queries = 3 + seed % 4
    num_labels = 4
    # the first image never has targets; the others between 1 and `queries`
    sizes = [0] + [int(torch.randint(1, queries + 1, (1,), generator=generator)) for _ in range(batch - 1)]
    logits = torch.randn(batch, queries, num_labels, generator=generator) * 2
    pred_boxes = random_boxes(batch * queries, generator).view(batch, queries, 4)
    targets = random_targets(sizes, num_labels, generator)
    indices = HungarianMatcher()(logits, pred_boxes, targets)
    assert len(indices) == batch
    for image, (rows, cols) in enumerate(indices):
        n = sizes[image]
        assert rows.dtype == cols.dtype == torch.int64 and rows.device.type == "cpu"
        assert len(rows) == len(cols) == n
        assert sorted(cols.tolist()) == list(range(n)) and len(set(rows.tolist())) == n
        if n == 0:
            continue
        cost = [[reference_cost(logits[image, q], pred_boxes[image, q], int(targets[image]["class_labels"][j]),
                                targets[image]["boxes"][j]) for j in range(n)] for q in range(queries)]
        matched = sum(cost[q][j] for q, j in zip(rows.tolist(), cols.tolist()))
        best = min(sum(cost[q][j] for j, q in enumerate(perm)) for perm in itertools.permutations(range(queries), n))
        assert matched == pytest.approx(best, rel=1e-6, abs=1e-9)


def test_matcher_groups_match_every_target_once_per_group():
    generator = torch.Generator().manual_seed(0)
    queries, num_groups, sizes = 8, 2, [3, 0, 4]
    logits = torch.randn(3, queries, 5, generator=generator)
    pred_boxes = random_boxes(3 * queries, generator).view(3, queries, 4)
    targets = random_targets(sizes, 5, generator)
    indices = HungarianMatcher()(logits, pred_boxes, targets, num_groups=num_groups)
    for (rows, cols), n in zip(indices, sizes):
        assert len(rows) == len(cols) == num_groups * n
        for group in range(num_groups):
            in_group = (rows >= group * queries // 2) & (rows < (group + 1) * queries // 2)
            assert sorted(cols[in_group].tolist()) == list(range(n))
            assert len(set(rows[in_group].tolist())) == n
    # each group on its own is the same problem as matching that slice alone
    second = HungarianMatcher()(logits[:, 4:], pred_boxes[:, 4:], targets)
    for (rows, cols), (rows2, cols2) in zip(indices, second):
        mask = rows >= 4
        grouped = sorted(zip((rows[mask] - 4).tolist(), cols[mask].tolist()))
        assert grouped == sorted(zip(rows2.tolist(), cols2.tolist()))
    with pytest.raises(ValueError, match="7 queries cannot be split into 2"):
        HungarianMatcher()(logits[:, :7], pred_boxes[:, :7], targets, num_groups=2)


def test_matcher_groups_with_more_targets_than_queries_match_every_query():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 8, 5, generator=generator)
    pred_boxes = random_boxes(8, generator).view(1, 8, 4)
    targets = random_targets([6], 5, generator)
    (rows, cols), = HungarianMatcher()(logits, pred_boxes, targets, num_groups=2)
    assert sorted(rows.tolist()) == list(range(8))  # 4 queries per group, each matched
    for group in (rows < 4, rows >= 4):
        assert len(set(cols[group].tolist())) == 4
    (rows2, cols2), = HungarianMatcher()(logits[:, 4:], pred_boxes[:, 4:], targets)
    assert sorted(zip((rows[rows >= 4] - 4).tolist(), cols[rows >= 4].tolist())) == sorted(zip(rows2.tolist(),
                                                                                            cols2.tolist()))


# ---------------------------------------------------------------------------------------------- criterion


def make_criterion():
    return DiTDetectionCriterion(HungarianMatcher())


def test_perfect_predictions_have_zero_box_losses_and_identity_matching():
    generator = torch.Generator().manual_seed(1)
    targets = random_targets([3, 2], 4, generator)
    queries = 5
    logits = torch.full((2, queries, 4), -12.0)
    pred_boxes = random_boxes(2 * queries, generator).view(2, queries, 4)
    for image, target in enumerate(targets):
        n = len(target["boxes"])
        # scatter the targets into queries in reverse order, so "identity" is a real permutation
        slots = torch.arange(n).flip(0)
        pred_boxes[image, slots] = target["boxes"]
        logits[image, slots, target["class_labels"]] = 12.0
    indices = HungarianMatcher()(logits, pred_boxes, targets)
    for (rows, cols), target in zip(indices, targets):
        n = len(target["boxes"])
        assert dict(zip(cols.tolist(), rows.tolist())) == {j: n - 1 - j for j in range(n)}
    total, loss_dict = make_criterion()([SetPredictions("", logits, pred_boxes)], targets)
    assert set(loss_dict) == {"loss_class", "loss_bbox", "loss_giou"}
    # GIoU loss carries torchvision's eps=1e-7 in its divisions, relative to box areas of ~0.01
    assert loss_dict["loss_bbox"] < 1e-6 and loss_dict["loss_giou"] < 1e-4
    assert loss_dict["loss_class"] < 1e-6


def test_keys_normalisation_and_total():
    generator = torch.Generator().manual_seed(2)
    targets = random_targets([2, 3], 3, generator)
    logits = torch.randn(2, 8, 3, generator=generator, requires_grad=True)
    pred_boxes = random_boxes(16, generator).view(2, 8, 4)
    criterion = make_criterion()
    predictions = [SetPredictions("", logits, pred_boxes, num_groups=2),
                   SetPredictions("dec_0", logits[:, :4], pred_boxes[:, :4])]
    total, loss_dict = criterion(predictions, targets)
    assert set(loss_dict) == {"loss_class", "loss_bbox", "loss_giou",
                              "loss_class_dec_0", "loss_bbox_dec_0", "loss_giou_dec_0"}
    assert all(not v.requires_grad and v.ndim == 0 for v in loss_dict.values())
    expected = sum(w * loss_dict[k + s] for s in ("", "_dec_0")
                   for k, w in (("loss_class", 2.0), ("loss_bbox", 5.0), ("loss_giou", 2.0)))
    assert total.requires_grad and total.item() == pytest.approx(expected.item(), rel=1e-6)
    # groups normalise as num_groups copies of the targets: the first group alone, matched alone, is the same
    # problem as "dec_0", so the grouped loss is the average of two comparable groups, not their sum
    indices = HungarianMatcher()(logits, pred_boxes, targets, num_groups=2)
    l1 = sum((pred_boxes[i, r] - t["boxes"][c]).abs().sum() for i, ((r, c), t) in enumerate(zip(indices, targets)))
    assert loss_dict["loss_bbox"].item() == pytest.approx(l1.item() / (5 * 2), rel=1e-6)


def test_sets_of_equal_shape_are_matched_and_scored_together_as_each_alone():
    """The decoder layers go through the matcher and the losses as one stack: every set's matching and losses are
    those it gets alone, and a set of another shape (the proposals) is scored on its own."""
    generator = torch.Generator().manual_seed(8)
    targets = random_targets([3, 0, 2], 4, generator)
    layers = [(torch.randn(3, 8, 4, generator=generator), random_boxes(24, generator).view(3, 8, 4)) for _ in range(3)]
    proposals = (torch.randn(3, 10, 4, generator=generator), random_boxes(30, generator).view(3, 10, 4))
    stacked = HungarianMatcher()(torch.stack([l for l, _ in layers]), torch.stack([b for _, b in layers]), targets,
                                 num_groups=2)
    alone = [pair for logits, boxes in layers for pair in HungarianMatcher()(logits, boxes, targets, num_groups=2)]
    assert len(stacked) == 9 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                     for a, b in zip(stacked, alone))

    names = ["", "dec_0", "dec_1"]
    predictions = [SetPredictions(name, logits, boxes, 2) for name, (logits, boxes) in zip(names, layers)]
    predictions.append(SetPredictions("proposals", *proposals))
    total, loss_dict = make_criterion()(predictions, targets)
    expected_total = 0.0
    for prediction in predictions:
        single_total, single = make_criterion()([SetPredictions("", prediction.logits, prediction.pred_boxes,
                                                                prediction.num_groups)], targets)
        suffix = f"_{prediction.name}" if prediction.name else ""
        for key, value in single.items():
            torch.testing.assert_close(loss_dict[key + suffix], value, rtol=1e-6, atol=1e-7)
        expected_total += single_total
    torch.testing.assert_close(total, expected_total, rtol=1e-6, atol=1e-6)


def test_image_without_boxes_pushes_all_its_probabilities_down():
    generator = torch.Generator().manual_seed(3)
    targets = random_targets([2, 0], 3, generator)
    logits = torch.randn(2, 4, 3, generator=generator).requires_grad_()
    pred_boxes = random_boxes(8, generator).view(2, 4, 4).requires_grad_()
    total, loss_dict = make_criterion()([SetPredictions("", logits, pred_boxes)], targets)
    assert torch.isfinite(total)
    total.backward()
    assert (logits.grad[1] > 0).all()
    assert (pred_boxes.grad[1] == 0).all()
    # a batch with no boxes at all: pure negatives, normalised by 1, box losses zero
    total, loss_dict = make_criterion()([SetPredictions("", logits, pred_boxes)], random_targets([0, 0], 3, generator))
    assert torch.isfinite(total) and loss_dict["loss_bbox"] == 0 and loss_dict["loss_giou"] == 0
    assert loss_dict["loss_class"] > 0


@pytest.mark.parametrize("class_loss", ["focal", "iou_aware"])
def test_bf16_autocast_with_degenerate_boxes_is_finite(class_loss):
    generator = torch.Generator().manual_seed(4)
    targets = random_targets([3, 1], 5, generator)
    logits = (torch.randn(2, 6, 5, generator=generator) * 30).bfloat16().requires_grad_()
    boxes = random_boxes(12, generator).view(2, 6, 4)
    boxes[:, :3, 2:] = 0  # zero-size boxes
    boxes[0, 0] = 0  # a point at the corner
    boxes = boxes.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        indices = HungarianMatcher()(logits, boxes, targets, num_groups=2)
        criterion = DiTDetectionCriterion(HungarianMatcher(), class_loss=class_loss)
        total, loss_dict = criterion([SetPredictions("", logits, boxes, num_groups=2)], targets)
    for (rows, cols), n in zip(indices, (3, 1)):
        assert len(rows) == 2 * n and rows.min() >= 0 and rows.max() < 6
        assert sorted(cols.tolist()) == sorted(list(range(n)) * 2)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert all(torch.isfinite(v) for v in loss_dict.values())
    total.backward()
    assert torch.isfinite(logits.grad.float()).all() and torch.isfinite(boxes.grad.float()).all()


def test_matcher_survives_nan_predictions():
    generator = torch.Generator().manual_seed(5)
    targets = random_targets([2], 3, generator)
    logits = torch.randn(1, 4, 3, generator=generator)
    boxes = random_boxes(4, generator).view(1, 4, 4)
    boxes[0, 1] = float("nan")
    logits[0, 2] = float("nan")
    rows, cols = HungarianMatcher()(logits, boxes, targets)[0]
    # the two finite queries win over the NaN ones
    assert sorted(rows.tolist()) == [0, 3] and sorted(cols.tolist()) == [0, 1]


def test_training_free_parameters_reduces_loss():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(6)
    targets = random_targets([3, 1, 0], 4, generator)
    logits = torch.nn.Parameter(torch.zeros(3, 6, 4))
    box_logits = torch.nn.Parameter(torch.randn(3, 6, 4) * 0.5)
    optimizer = torch.optim.Adam([logits, box_logits], lr=0.1)
    criterion = make_criterion()
    losses = []
    for _ in range(60):
        predictions = [SetPredictions("", logits, box_logits.sigmoid(), num_groups=2)]
        total, _ = criterion(predictions, targets)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    assert losses[-1] < losses[0] / 10, losses[::10]


# ---------------------------------------------------------------------------------------------- box count


def test_global_num_boxes_single_process():
    assert not dist.is_initialized()
    generator = torch.Generator().manual_seed(7)
    count = global_num_boxes(random_targets([3, 0, 2], 2, generator), torch.device("cpu"))
    assert count.dtype == torch.float32 and count.item() == 5.0
    assert global_num_boxes(random_targets([0, 0], 2, generator), "cpu").item() == 1.0


def _distributed_worker(rank, init_file, result_file):
    torch.set_num_threads(1)  # two workers on a 2-core machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        generator = torch.Generator().manual_seed(rank)
        sizes = [[3], [2, 3]][rank]  # 3 and 5 boxes
        count = global_num_boxes(random_targets(sizes, 2, generator), torch.device("cpu"))
        torch.save(count, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # long: a subprocess or a whole run (the default suite stays short)
def test_global_num_boxes_all_reduce_across_two_processes(tmp_path):
    result_file = tmp_path / "count"
    mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), str(result_file)), nprocs=2, join=True)
    for rank in range(2):
        assert torch.load(f"{result_file}.{rank}").item() == 4.0


def test_batched_generalized_box_iou_equals_torchvision_per_image():
    from torchvision.ops import box_convert, generalized_box_iou

    from modeling_dit_detection.loss_dit_detection import batched_generalized_box_iou

    generator = torch.Generator().manual_seed(3)
    first = box_convert(torch.rand(3, 7, 4, generator=generator) * 0.5 + 0.25, "cxcywh", "xyxy")
    second = box_convert(torch.rand(3, 5, 4, generator=generator) * 0.5 + 0.25, "cxcywh", "xyxy")
    batched = batched_generalized_box_iou(first, second)
    for image in range(3):
        torch.testing.assert_close(batched[image], generalized_box_iou(first[image], second[image]))


def test_paired_box_iou_is_the_diagonal_of_torchvisions_box_iou():
    from torchvision.ops import box_convert, box_iou

    from modeling_dit_detection.loss_dit_detection import paired_box_iou

    generator = torch.Generator().manual_seed(4)
    first = box_convert(random_boxes(9, generator), "cxcywh", "xyxy")
    second = box_convert(random_boxes(9, generator), "cxcywh", "xyxy")
    second[0] = first[0]  # one perfect pair
    torch.testing.assert_close(paired_box_iou(first, second), box_iou(first, second).diagonal())
    assert paired_box_iou(first[:1], second[:1]).item() == pytest.approx(1.0)


def test_iou_aware_class_loss_matches_lw_detrs_formula_per_logit():
    """LW-DETR's IoU-aware BCE written out per logit in float64 Python: a matched (query, class) has the soft target
    t = max(0.01, p^alpha * IoU^(1 - alpha)) with weights t and 1 - t; every other logit is a negative weighted p^gamma."""
    from modeling_dit_detection.loss_dit_detection import paired_box_iou
    from torchvision.ops import box_convert

    generator = torch.Generator().manual_seed(5)
    targets = random_targets([3, 0, 2], 4, generator)
    logits = torch.randn(3, 6, 4, generator=generator)
    pred_boxes = random_boxes(18, generator).view(3, 6, 4)
    criterion = DiTDetectionCriterion(HungarianMatcher(), class_loss="iou_aware")
    _, loss_dict = criterion([SetPredictions("", logits, pred_boxes)], targets)

    indices = HungarianMatcher()(logits, pred_boxes, targets)
    expected = 0.0
    for image, ((rows, cols), target) in enumerate(zip(indices, targets)):
        matched = {int(r): int(c) for r, c in zip(rows, cols)}
        for query in range(6):
            for label in range(4):
                p = 1 / (1 + math.exp(-float(logits[image, query, label])))
                t = None
                if query in matched and int(target["class_labels"][matched[query]]) == label:
                    corners = box_convert(torch.stack([pred_boxes[image, query], target["boxes"][matched[query]]]),
                                          "cxcywh", "xyxy")
                    iou = float(paired_box_iou(corners[:1], corners[1:]))
                    t = max(0.01, p**ALPHA * iou ** (1 - ALPHA))
                if t is None:
                    expected += -(p**GAMMA) * math.log(1 - p)
                else:
                    expected += -t * math.log(p) - (1 - t) * math.log(1 - p)
    assert loss_dict["loss_class"].item() == pytest.approx(expected / 5, rel=1e-5)


def test_iou_aware_targets_rank_the_better_box_higher():
    """Two queries with the same score, matched in two query groups to the same object: the one whose box fits better
    is pushed up more (IoU-aware), while the focal loss pushes both the same."""
    target = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    pred_boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.52, 0.5, 0.3, 0.2]]])
    gradients = {}
    for class_loss in ("focal", "iou_aware"):
        logits = torch.zeros(1, 2, 2, requires_grad=True)
        criterion = DiTDetectionCriterion(HungarianMatcher(), class_loss=class_loss)
        criterion([SetPredictions("", logits, pred_boxes, num_groups=2)], target)[0].backward()
        gradients[class_loss] = logits.grad[0, :, 1]
    assert gradients["focal"][0] == pytest.approx(gradients["focal"][1].item())
    assert gradients["iou_aware"][0] < gradients["iou_aware"][1] < 0  # descent raises both, the perfect box more


def test_criterion_rejects_unknown_class_loss():
    with pytest.raises(ValueError, match="class_loss"):
        DiTDetectionCriterion(HungarianMatcher(), class_loss="softmax")
