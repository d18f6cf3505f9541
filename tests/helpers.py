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


def coco_map(predictions: list[dict], labels: list[dict], image_size: tuple[int, int], num_labels: int) -> dict:
    """COCO box mAP from the reference code (pycocotools) for post-processed `predictions` (x0, y0, x1, y1 pixels)
    against `labels` (cx, cy, w, h normalised); returns {"map", "map_50", "map_75"}."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    height, width = image_size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    ground_truth = {"images": [{"id": i, "height": height, "width": width} for i in range(len(labels))],
                    "categories": [{"id": c} for c in range(num_labels)], "annotations": []}
    for image_id, target in enumerate(labels):
        for category, box in zip(target["class_labels"].tolist(), (target["boxes"] * scale).tolist()):
            cx, cy, w, h = box
            ground_truth["annotations"].append({"id": len(ground_truth["annotations"]) + 1, "image_id": image_id,
                                                "category_id": category, "bbox": [cx - w / 2, cy - h / 2, w, h],
                                                "area": w * h, "iscrowd": 0})
    detections = [{"image_id": image_id, "category_id": label, "score": score, "bbox": [x0, y0, x1 - x0, y1 - y0]}
                  for image_id, result in enumerate(predictions)
                  for score, label, (x0, y0, x1, y1) in zip(result["scores"].tolist(), result["labels"].tolist(),
                                                            result["boxes"].tolist())]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = ground_truth
        coco.createIndex()
        evaluation = COCOeval(coco, coco.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {"map": evaluation.stats[0], "map_50": evaluation.stats[1], "map_75": evaluation.stats[2]}
