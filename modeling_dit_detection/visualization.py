"""Pictures of detections for a person to look at: boxes, class names and scores drawn on images."""

from __future__ import annotations

import colorsys

import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes, make_grid


def class_colour(label: int) -> tuple[int, int, int]:
    """A distinct, stable colour per class id (golden-ratio hues)."""
    red, green, blue = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(red * 255), int(green * 255), int(blue * 255)


def draw_detections(image: Image.Image, detections: dict, id2label: dict[int, str]) -> Image.Image:
    """`image` with `detections` (`"scores"` [k], `"labels"` [k], `"boxes"` [k, 4] x0, y0, x1, y1 pixels) drawn."""
    labels = [int(label) for label in detections["labels"]]
    if not labels:  # torchvision warns on an empty box set; there is nothing to draw anyway
        return image.convert("RGB")
    captions = [f"{id2label.get(label, label)} {float(score):.2f}" for label, score in zip(labels, detections["scores"])]
    drawn = draw_bounding_boxes(pil_to_tensor(image.convert("RGB")), torch.as_tensor(detections["boxes"]).reshape(-1, 4),
                                labels=captions, colors=[class_colour(label) for label in labels], width=2,
                                label_colors="black", fill_labels=True)  # captions on their class colour
    return to_pil_image(drawn)


def detection_grid(images: list[Image.Image], detections: list[dict], id2label: dict[int, str], columns: int = 4,
                   tile_size: tuple[int, int] = (256, 256)) -> Image.Image:
    """Images resized to `tile_size` (height, width), their detections (boxes in the original image's pixels)
    drawn on the resized image so captions stay legible, tiled `columns` wide."""
    height, width = tile_size
    tiles = []
    for image, found in zip(images, detections):
        scale = torch.tensor([width / image.width, height / image.height] * 2)
        scaled = {**found, "boxes": torch.as_tensor(found["boxes"]).reshape(-1, 4).float() * scale}
        tiles.append(pil_to_tensor(draw_detections(image.convert("RGB").resize((width, height)), scaled, id2label)))
    return to_pil_image(make_grid(tiles, nrow=columns, padding=4, pad_value=255))
