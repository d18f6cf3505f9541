"""Behaviour of DiTDetectionImageProcessor: pixels, annotations -> labels, validation, post-processing, round trip."""

from dataclasses import dataclass

import pytest
import torch
from PIL import Image
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pipelines import ObjectDetectionPipeline
from transformers.utils import ModelOutput

from modeling_dit_detection.image_processing_dit_detection import DiTDetectionImageProcessor

SMALL = {"height": 32, "width": 48}


def processor(**kwargs):
    return DiTDetectionImageProcessor(**{"size": SMALL, **kwargs})


def target(*objects, image_id=7):
    return {"image_id": image_id, "annotations": list(objects)}


def obj(bbox, category_id=1, **extra):
    return {"bbox": bbox, "category_id": category_id, **extra}


# ----------------------------------------------------------------------------------------------- pixels


def test_defaults():
    p = DiTDetectionImageProcessor()
    assert (p.size.height, p.size.width, p.size_divisor) == (256, 256, 16)
    out = p(Image.new("RGB", (40, 30)))
    assert out["pixel_values"].shape == (1, 3, 256, 256)
    assert out["pixel_values"].dtype == torch.float32


@pytest.mark.parametrize("value, expected", [(0, -1.0), (255, 1.0)])
def test_constant_image_maps_to_minus_one_and_one(value, expected):
    pixels = processor()(Image.new("RGB", (20, 10), (value,) * 3))["pixel_values"]
    torch.testing.assert_close(pixels, torch.full((1, 3, 32, 48), expected))


def test_non_square_batch_of_mixed_sizes_and_modes():
    images = [Image.new("RGB", (20, 10)), Image.new("L", (7, 9), 255), Image.new("RGBA", (64, 64), (0, 0, 0, 255)),
              Image.new("P", (5, 5))]
    pixels = processor().preprocess(images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (4, 3, 32, 48)
    torch.testing.assert_close(pixels[1], torch.ones(3, 32, 48))  # white grayscale -> white RGB
    torch.testing.assert_close(pixels[2], -torch.ones(3, 32, 48))  # opaque black RGBA -> black RGB
    assert pixels.min() >= -1 and pixels.max() <= 1


# ----------------------------------------------------------------------------------------------- annotations


def test_annotation_to_labels_exact_numbers():
    image = Image.new("RGB", (200, 100))  # width 200, height 100
    out = processor()(image, annotations=target(obj([20, 10, 40, 30], category_id=3)))
    labels = out["labels"]
    assert len(labels) == 1
    torch.testing.assert_close(labels[0]["boxes"], torch.tensor([[0.2, 0.25, 0.2, 0.3]]))
    assert labels[0]["boxes"].dtype == torch.float32
    assert labels[0]["class_labels"].tolist() == [3] and labels[0]["class_labels"].dtype == torch.int64
    assert labels[0]["image_id"].tolist() == [7]
    assert labels[0]["orig_size"].tolist() == [100, 200]
    assert labels[0]["size"].tolist() == [32, 48]


def test_batch_with_empty_image_and_clipped_box():
    images = [Image.new("RGB", (200, 100)), Image.new("RGB", (100, 50))]
    annotations = [target(image_id=1),
                   # overhangs left and bottom: x in [-10, 30] -> [0, 30], y in [40, 60] -> [40, 50]
                   target(obj([-10, 40, 40, 20], category_id=0), obj([0, 0, 10, 10], iscrowd=1), image_id=2)]
    labels = processor()(images, annotations=annotations)["labels"]
    assert labels[0]["class_labels"].shape == (0,) and labels[0]["boxes"].shape == (0, 4)
    assert labels[0]["class_labels"].dtype == torch.int64 and labels[0]["boxes"].dtype == torch.float32
    # crowd box dropped; clipped box: cx = 15/100, cy = 45/50, w = 30/100, h = 10/50
    torch.testing.assert_close(labels[1]["boxes"], torch.tensor([[0.15, 0.9, 0.3, 0.2]]))
    assert labels[1]["class_labels"].tolist() == [0]
    assert labels[1]["image_id"].tolist() == [2]


@pytest.mark.parametrize("bad_object, problem", [
    ({"category_id": 1}, "missing 'bbox' or 'category_id'"),
    ({"bbox": [1, 2, 3, 4]}, "missing 'bbox' or 'category_id'"),
    (obj([1, 2, 3]), "bbox must be 4 numbers"),
    (obj([1, 2, "3", 4]), "bbox must be 4 numbers"),
    (obj([1, 2, float("nan"), 4]), "non-finite"),
    (obj([1, 2, float("inf"), 4]), "non-finite"),
    (obj([1, 2, 0, 4]), "width and height must be > 0"),
    (obj([1, 2, 3, -4]), "width and height must be > 0"),
    (obj([250, 10, 20, 20]), "entirely outside"),
    (obj([10, -30, 20, 20]), "entirely outside"),
    (obj([1, 2, 3, 4], category_id=1.5), "category_id must be a non-negative integer"),
])
def test_bad_annotation_names_image_annotation_and_problem(bad_object, problem):
    images = [Image.new("RGB", (200, 100))] * 2
    annotations = [target(obj([1, 1, 5, 5])), target(obj([1, 1, 5, 5]), bad_object, image_id=42)]
    with pytest.raises(ValueError, match=r"Image 1 \(image_id=42\), annotation 1: .*" + problem):
        processor()(images, annotations=annotations)


def test_annotation_count_must_match_images():
    images = [Image.new("RGB", (20, 10))] * 2
    with pytest.raises(ValueError, match="2 images but 1 annotation"):
        processor()(images, annotations=[target()])
    with pytest.raises(ValueError, match="2 images but 1 annotation"):
        processor()(images, annotations=target())
    with pytest.raises(ValueError, match="'annotations' list"):
        processor()(images[:1], annotations=[[obj([1, 1, 2, 2])]])


# ----------------------------------------------------------------------------------------------- size checks


def test_size_not_multiple_of_stride_is_rejected():
    with pytest.raises(ValueError, match=r"size \(250, 256\) is not a multiple of the backbone stride 16"):
        DiTDetectionImageProcessor(size={"height": 250, "width": 256})
    with pytest.raises(ValueError, match=r"size \(64, 64\) is not a multiple of the backbone stride 28"):
        DiTDetectionImageProcessor(size={"height": 64, "width": 64}, size_divisor=28)
    p = processor()
    with pytest.raises(ValueError, match=r"size \(32, 40\) is not a multiple of the backbone stride 16"):
        p(Image.new("RGB", (8, 8)), size={"height": 32, "width": 40})
    with pytest.raises(ValueError, match=r"size \(32, 48\) is not a multiple of the backbone stride 32"):
        p(Image.new("RGB", (8, 8)), size_divisor=32)
    assert processor(size_divisor=8)(Image.new("RGB", (8, 8)), size={"height": 8, "width": 24}).pixel_values.shape \
        == (1, 3, 8, 24)


def test_save_and_load_round_trip(tmp_path):
    p = processor(size_divisor=8, size={"height": 24, "width": 40})
    p.save_pretrained(tmp_path)
    loaded = DiTDetectionImageProcessor.from_pretrained(tmp_path)
    assert (loaded.size.height, loaded.size.width, loaded.size_divisor) == (24, 40, 8)
    noise = torch.randint(0, 256, (11, 13, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    image = Image.fromarray(noise.numpy())
    torch.testing.assert_close(loaded(image).pixel_values, p(image).pixel_values, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- post-processing


@dataclass
class Output(ModelOutput):
    logits: torch.Tensor = None
    pred_boxes: torch.Tensor = None


def hand_made_outputs():
    # Q = 3 queries, C = 2 classes; query 1 scores high for both classes.
    scores = torch.tensor([[[0.90, 0.10], [0.80, 0.70], [0.20, 0.40]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5], [0.05, 0.1, 0.2, 0.2]]])  # query 2 overhangs
    return Output(logits=torch.logit(scores), pred_boxes=boxes)


def test_post_process_exact_boxes_scores_labels_and_order():
    result = processor().post_process_object_detection(hand_made_outputs(), threshold=0.3, target_sizes=[(100, 200)])
    assert len(result) == 1
    torch.testing.assert_close(result[0]["scores"], torch.tensor([0.9, 0.8, 0.7, 0.4]))
    assert result[0]["labels"].tolist() == [0, 0, 1, 1] and result[0]["labels"].dtype == torch.int64
    # height 100, width 200: query 0 -> x 80..120, y 30..70; query 1 -> x 0..100, y 50..100;
    # query 2 -> x -10..30 clipped to 0..30, y 0..20
    expected = torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 50.0, 100.0, 100.0], [0.0, 50.0, 100.0, 100.0],
                             [0.0, 0.0, 30.0, 20.0]])
    torch.testing.assert_close(result[0]["boxes"], expected)


def test_post_process_threshold_top_k_and_normalised_boxes():
    p = processor()
    high = p.post_process_object_detection(hand_made_outputs(), threshold=0.75, target_sizes=torch.tensor([[100, 200]]))
    torch.testing.assert_close(high[0]["scores"], torch.tensor([0.9, 0.8]))
    top2 = p.post_process_object_detection(hand_made_outputs(), threshold=0.0, top_k=2)
    assert top2[0]["labels"].tolist() == [0, 0]
    torch.testing.assert_close(top2[0]["boxes"], torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.0, 0.5, 0.5, 1.0]]))
    everything = p.post_process_object_detection(hand_made_outputs(), threshold=0.0, top_k=1000)
    assert everything[0]["scores"].shape == (6,) and everything[0]["boxes"].shape == (6, 4)
    none = p.post_process_object_detection(hand_made_outputs(), threshold=0.95)
    assert none[0]["scores"].shape == (0,) and none[0]["boxes"].shape == (0, 4)
    with pytest.raises(ValueError, match="2 target sizes for a batch of 1"):
        p.post_process_object_detection(hand_made_outputs(), target_sizes=[(1, 1), (2, 2)])


def test_post_process_accepts_pipeline_style_outputs():
    outputs = hand_made_outputs()
    # What ObjectDetectionPipeline._forward builds and how postprocess calls us: positional IntTensor target size.
    model_outputs = outputs.__class__({"target_size": torch.IntTensor([[100, 200]]), **outputs})
    result = processor().post_process_object_detection(model_outputs, 0.5, model_outputs["target_size"])
    assert result[0]["labels"].tolist() == [0, 0, 1]
    plain = processor().post_process_object_detection(dict(outputs), 0.5, [(100, 200)])
    torch.testing.assert_close(plain[0]["boxes"], result[0]["boxes"])


class FixedDetector(PreTrainedModel):
    """Stand-in detector that always returns `hand_made_outputs()`; only used to drive the real pipeline."""

    config_class = PretrainedConfig
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.post_init()

    def forward(self, pixel_values, **kwargs):
        assert pixel_values.shape[1:] == (3, 32, 48)
        return hand_made_outputs()


def test_object_detection_pipeline_end_to_end():
    model = FixedDetector(PretrainedConfig(id2label={0: "person", 1: "mask"}))
    detector = ObjectDetectionPipeline(model=model, image_processor=processor())
    detections = detector(Image.new("RGB", (200, 100)), threshold=0.5)
    assert [(d["label"], round(d["score"], 3)) for d in detections] == [("person", 0.9), ("person", 0.8),
                                                                         ("mask", 0.7)]
    assert detections[0]["box"] == {"xmin": 80, "ymin": 30, "xmax": 120, "ymax": 70}
