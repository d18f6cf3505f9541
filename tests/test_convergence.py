"""The detector learns: a tiny model, trained from scratch, fits a handful of generated images."""

import pytest
import torch
from helpers import coco_map, tiny_config

from modeling_dit_detection import DiTDetectionImageProcessor, DiTForObjectDetection

COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])  # class 0 red, 1 green, 2 blue


def coloured_rectangles(num_images: int, size: int = 64, seed: int = 0):
    """Images in [-1, 1] with 1-3 solid rectangles each on a noisy background, and their labels."""
    generator = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for i in range(num_images):
        image = torch.rand(3, size, size, generator=generator) * 0.4 - 0.2
        boxes, classes = [], []
        for j in range(1 + i % 3):
            w, h = torch.randint(12, 28, (2,), generator=generator).tolist()
            x = torch.randint(0, size - w, (1,), generator=generator).item()
            y = torch.randint(0, size - h, (1,), generator=generator).item()
            category = (i + j) % 3
            image[:, y:y + h, x:x + w] = COLOURS[category][:, None, None]
            boxes.append([(x + w / 2) / size, (y + h / 2) / size, w / size, h / size])
            classes.append(category)
        images.append(image)
        labels.append({"class_labels": torch.tensor(classes), "boxes": torch.tensor(boxes)})
    return torch.stack(images), labels


@pytest.mark.slow  # long: a subprocess or a whole run (the default suite stays short)
def test_tiny_detector_fits_a_handful_of_images():
    torch.manual_seed(0)
    images, labels = coloured_rectangles(6)
    config = tiny_config()
    model = DiTForObjectDetection(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    first_loss = None
    for _ in range(300):
        loss = model(images, labels=labels).loss
        first_loss = first_loss if first_loss is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    model.eval()
    processor = DiTDetectionImageProcessor(size={"height": 64, "width": 64}, size_divisor=config.backbone_stride)
    with torch.no_grad():
        outputs = model(images)
    predictions = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(64, 64)] * 6)
    metrics = coco_map(predictions, labels, (64, 64), config.num_labels)
    assert loss.item() < first_loss / 4
    assert metrics["map_50"] > 0.95, metrics
    assert metrics["map"] > 0.6, metrics
