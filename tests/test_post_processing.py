"""post_process_object_detection checks its arguments: shapes of target_sizes, threshold, top_k."""

import math

import numpy as np
import pytest
import torch

from modeling_dit_detection import DiTDetectionImageProcessor


def outputs(batch: int = 2) -> dict:
    """Raw outputs of 3 queries x 2 classes per image, the same for every image."""
    scores = torch.tensor([[0.90, 0.10], [0.80, 0.70], [0.20, 0.40]]).expand(batch, 3, 2)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]).expand(batch, 3, 4)
    return {"logits": torch.logit(scores), "pred_boxes": boxes}


def post_process(batch: int = 2, **kwargs):
    return DiTDetectionImageProcessor().post_process_object_detection(outputs(batch), **kwargs)


@pytest.mark.parametrize("target_sizes", [
    [(100, 200), (50, 60)],
    ((100, 200), (50, 60)),
    [[100, 200], [50, 60]],
    torch.tensor([[100, 200], [50, 60]]),
    torch.tensor([[100.0, 200.0], [50.0, 60.0]]),
    np.array([[100, 200], [50, 60]]),
    [torch.tensor([100, 200]), np.array([50, 60])],
    [(torch.tensor(100), torch.tensor(200)), (np.int64(50), np.float32(60))],
])
def test_target_sizes_of_every_accepted_form_scale_each_image_by_its_own_size(target_sizes):
    first, second = post_process(threshold=0.85, target_sizes=target_sizes)
    torch.testing.assert_close(first["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0]]))
    torch.testing.assert_close(second["boxes"], torch.tensor([[24.0, 15.0, 36.0, 35.0]]))


@pytest.mark.parametrize(("target_sizes", "message"), [
    ([100, 200, 50, 60], r"list of 2 \(height, width\) pairs.*entry 0 is 100"),  # flat: not 2 sizes
    ((100, 200), r"entry 0 is 100"),  # one pair for a batch of 2 is not a list of pairs
    ([(100, 200, 3), (50, 60, 3)], r"entry 0 is \(100, 200, 3\)"),  # (height, width, channels)
    ([(100,), (50,)], r"entry 0 is \(100,\)"),
    ([(100, 200)], r"Got 1 target sizes for a batch of 2 images"),
    ([(100, 200)] * 3, r"Got 3 target sizes for a batch of 2 images"),
    ([], r"Got 0 target sizes for a batch of 2 images"),
    (torch.tensor([100, 200, 50, 60]), r"tensor \[2, 2\].*got a tensor of shape \[4\]"),
    (torch.zeros(2, 3), r"got a tensor of shape \[2, 3\]"),
    (torch.zeros(1, 2, 2), r"got a tensor of shape \[1, 2, 2\]"),
    (torch.tensor([[100, 200]]), r"Got 1 target sizes for a batch of 2"),
    ([("100", "200"), (50, 60)], r"entry 0 is \('100', '200'\)"),
    ([(True, 200), (50, 60)], r"entry 0 is \(True, 200\)"),
    ([None, (50, 60)], r"entry 0 is None"),
    ({"height": 100, "width": 200}, r"got dict"),
    ("100x200", r"got str"),
    (torch.tensor([[True, True], [True, True]]), r"entry 0 is tensor\(\[True, True\]\)"),
    ([(100, 200), (0, 60)], r"target_sizes\[1\] is \(height=0.0, width=60.0\).*positive, finite"),
    ([(100, -200), (50, 60)], r"target_sizes\[0\] is \(height=100.0, width=-200.0\)"),
    ([(100, 200), (math.nan, 60)], r"target_sizes\[1\] is \(height=nan"),
    (torch.tensor([[100, 200], [50, math.inf]]), r"target_sizes\[1\] is \(height=50.0, width=inf\)"),
])
def test_malformed_target_sizes_are_a_value_error_saying_what_was_given_and_what_is_expected(target_sizes, message):
    with pytest.raises(ValueError, match=message):
        post_process(target_sizes=target_sizes)


@pytest.mark.parametrize("threshold", [math.nan, math.inf, -math.inf, "0.5", None, True, torch.tensor([0.5, 0.6])])
def test_threshold_must_be_a_finite_number(threshold):
    with pytest.raises(ValueError, match=r"threshold must be a finite number, got"):
        post_process(threshold=threshold)


@pytest.mark.parametrize("top_k", [0, -1, 2.5, 2.0, "10", None, True])
def test_top_k_must_be_a_positive_integer(top_k):
    with pytest.raises(ValueError, match=r"top_k must be a positive integer, got"):
        post_process(top_k=top_k)


def test_numpy_numbers_and_out_of_range_thresholds_are_accepted():
    # A threshold outside [0, 1] is meaningful here (every score passes, or none does); numpy numbers are numbers.
    assert [len(r["scores"]) for r in post_process(threshold=-1.0, top_k=np.int64(4))] == [4, 4]
    assert [len(r["scores"]) for r in post_process(threshold=np.float32(1.5))] == [0, 0]
