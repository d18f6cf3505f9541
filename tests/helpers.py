"""Shared builders for the tests: tiny configs and valid targets."""

import torch

from modeling_dit_detection import DiTDetectionConfig


def tiny_config(preset: str = "tiny", **overrides) -> DiTDetectionConfig:
    """A detector of a few ten thousand parameters: pixel-space ("tiny") or with a tiny VAE ("tiny-latent")."""
    overrides.setdefault("id2label", {0: "circle", 1: "square", 2: "triangle"})
    return DiTDetectionConfig.from_preset(preset, **overrides)


def random_labels(batch_size: int, num_labels: int, boxes_per_image=(2, 0), seed: int = 0) -> list[dict]:
    """Valid targets: `boxes_per_image[i]` boxes for image i (0 = no objects), cx, cy, w, h inside the image."""
    generator = torch.Generator().manual_seed(seed)
    labels = []
    for i in range(batch_size):
        n = boxes_per_image[i % len(boxes_per_image)]
        size = 0.1 + 0.3 * torch.rand(n, 2, generator=generator)
        center = size / 2 + (1 - size) * torch.rand(n, 2, generator=generator)
        labels.append({"class_labels": torch.randint(0, num_labels, (n,), generator=generator),
                       "boxes": torch.cat([center, size], dim=1)})
    return labels
