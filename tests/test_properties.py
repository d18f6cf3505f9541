"""Property-based: any annotation record and image size, through the one data path (check -> augmentation ->
processor -> model loss), ends in a documented `ValueError` or a finite loss; never a crash, never a NaN."""

import io
import math

import datasets
import numpy as np
import PIL.Image
import torch
from helpers import tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeling_dit_detection import DiTDetectionImageProcessor, DiTForObjectDetection
from modeling_dit_detection.training.data import (
    CANONICAL_FEATURES,
    DataReport,
    DetectionTransform,
    clean_split,
    collate_fn,
    make_train_augmentation,
)

NUM_LABELS = 3
coordinate = st.one_of(st.floats(-50, 150, allow_nan=False), st.sampled_from([math.nan, math.inf, -math.inf, 0.0]))
objects = st.lists(st.tuples(st.tuples(coordinate, coordinate, coordinate, coordinate),
                             st.integers(0, NUM_LABELS - 1), st.sampled_from([0, 0, 0, 1])), max_size=6)
records = st.tuples(st.integers(1, 90), st.integers(1, 90), objects, st.sampled_from(["RGB", "L", "RGBA", "P"]),
                    st.sampled_from(["strong", "light", "none"]), st.integers(0, 2**16))

_MODEL = DiTForObjectDetection(tiny_config(id2label={i: str(i) for i in range(NUM_LABELS)})).train()
_PROCESSOR = DiTDetectionImageProcessor(size={"height": 64, "width": 64}, size_divisor=4)


def _png(width: int, height: int, mode: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records)
def test_any_record_gives_a_documented_error_or_a_finite_loss(record):
    width, height, boxes, mode, augmentation, seed = record
    row = {"image_id": seed, "image": {"bytes": _png(width, height, mode, seed), "path": None}, "width": width,
           "height": height, "objects": {"id": list(range(len(boxes))), "area": [10.0] * len(boxes),
                                         "bbox": [list(box) for box, _, _ in boxes],
                                         "category": [label for _, label, _ in boxes],
                                         "iscrowd": [crowd for _, _, crowd in boxes]}}
    split = datasets.Dataset.from_list([row], features=CANONICAL_FEATURES)
    try:
        checked = clean_split(split, NUM_LABELS, "train", DataReport(), skip_bad_images=True)
    except ValueError:
        return  # a documented refusal, naming the record
    if len(checked) == 0:
        return  # skipped and counted (e.g. an image too small to use)
    transform = DetectionTransform(_PROCESSOR, make_train_augmentation((64, 64), augmentation), seed=seed)
    batch = collate_fn([checked.with_transform(transform)[0]])
    labels = batch["labels"][0]
    assert batch["pixel_values"].shape == (1, 3, 64, 64) and torch.isfinite(batch["pixel_values"]).all()
    assert ((labels["boxes"] >= 0) & (labels["boxes"] <= 1)).all() and (labels["boxes"][:, 2:] > 0).all()
    loss = _MODEL(batch["pixel_values"], labels=batch["labels"]).loss
    assert torch.isfinite(loss), record
