"""Image processor of DiT-based object detectors: fixed-size resize, [-1, 1] pixels, COCO annotations, post-processing."""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral, Real

import numpy as np
import PIL.Image
import torch
from PIL import ImageOps
from torchvision.ops import box_convert
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_transforms import group_images_by_shape, reorder_images
from transformers.image_utils import PILImageResampling
from transformers.processing_utils import ImagesKwargs


class DiTDetectionImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    size_divisor (`int`, *optional*, defaults to 16):
        Backbone stride in pixels (VAE downsampling x patch size). `size["height"]` and `size["width"]` must be
        multiples of it.
    """

    size_divisor: int | None


class DiTDetectionImageProcessor(TorchvisionBackend):
    r"""
    Image processor of [`DiTForObjectDetection`].

    Images are converted to RGB, resized to the fixed `size` (aspect ratio not kept; boxes are normalised, so they
    stay valid), rescaled by 1/255 and normalised with mean = std = 0.5, giving `pixel_values` in [-1, 1].

    Annotations are COCO detection style, one dict per image:
    `{"image_id": int, "annotations": [{"bbox": [x, y, w, h] (pixels), "category_id": int, ...}, ...]}`.
    They become `labels`, one dict per image: `class_labels` (`LongTensor[n]`), `boxes` (`FloatTensor[n, 4]`, cx, cy, w,
    h normalised to 0..1 by the original image width and height), `image_id` (`LongTensor[1]`), `orig_size` and
    `size` (`LongTensor[2]`, (height, width) before and after resizing). A box that partly overhangs the image is
    clipped to it (COCO practice); crowd annotations (`iscrowd=1`) are dropped, as in DETR; a missing `image_id`
    defaults to the image's index in the batch. Malformed boxes raise a `ValueError` naming the image and annotation.

    Args:
        size_divisor (`int`, *optional*, defaults to 16): the backbone stride; `size` must be a multiple of it.
        **kwargs: the usual image-processor options (`size`, `resample`, `image_mean`, `image_std`, ...).
    """

    valid_kwargs = DiTDetectionImageProcessorKwargs
    model_input_names = ["pixel_values"]
    size = {"height": 256, "width": 256}
    size_divisor = 16
    resample = PILImageResampling.BILINEAR
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        _check_size(self.size, self.size_divisor)

    def preprocess(self, images, annotations=None, **kwargs) -> BatchFeature:
        r"""
        Args:
            images: one image or a list (PIL, NumPy or torch).
            annotations (`dict` or `list[dict]`, *optional*): COCO detection annotations, one dict per image.
            **kwargs: overrides of the processor's options, e.g. `size`, `return_tensors`.

        Returns:
            [`BatchFeature`] with `pixel_values` (`[batch, 3, height, width]`, float32) and, when annotations are given,
            `labels` (list of per-image dicts of torch tensors, see the class docstring).
        """
        return super().preprocess(images, annotations, **kwargs)

    def _validate_preprocess_kwargs(self, size=None, size_divisor=None, **kwargs):
        super()._validate_preprocess_kwargs(size=size, **kwargs)
        _check_size(size, size_divisor)

    def _preprocess(self, images, annotations, do_resize, size, resample, do_rescale, rescale_factor, do_normalize,
                    image_mean, image_std, disable_grouping, return_tensors, **kwargs) -> BatchFeature:
        if annotations is not None:
            annotations = [annotations] if isinstance(annotations, Mapping) else list(annotations)
            if len(annotations) != len(images):
                raise ValueError(f"Got {len(images)} images but {len(annotations)} annotation dicts; "
                                 "pass exactly one annotation dict per image.")
        orig_sizes = [tuple(image.shape[-2:]) for image in images]

        grouped, index = group_images_by_shape(images, disable_grouping=disable_grouping)
        for shape, stacked in grouped.items():
            if do_resize:
                stacked = self.resize(stacked, size=size, resample=resample)
            grouped[shape] = self.rescale_and_normalize(stacked, do_rescale, rescale_factor, do_normalize,
                                                        image_mean, image_std)
        pixel_values = torch.stack(reorder_images(grouped, index), dim=0)
        encoded = BatchFeature({"pixel_values": pixel_values}, tensor_type=return_tensors)

        if annotations is not None:
            new_size = tuple(pixel_values.shape[-2:])
            encoded["labels"] = [self.prepare_annotation(target, orig, new_size, i)
                                 for i, (target, orig) in enumerate(zip(annotations, orig_sizes))]
        return encoded

    def prepare_annotation(self, target: Mapping, orig_size: tuple[int, int], size: tuple[int, int],
                           image_index: int = 0) -> dict[str, torch.Tensor]:
        """Validate one image's COCO annotations and turn them into model labels (see the class docstring)."""
        if not isinstance(target, Mapping) or not isinstance(target.get("annotations"), (list, tuple)):
            raise ValueError(f"Image {image_index}: annotations must be a dict with an 'annotations' list of COCO "
                             f"objects, got {type(target).__name__}.")
        image_id = target.get("image_id", image_index)
        height, width = orig_size
        classes, boxes = [], []
        for j, obj in enumerate(target["annotations"]):
            try:
                category, box = _check_object(obj, width, height)
            except ValueError as error:
                raise ValueError(f"Image {image_index} (image_id={image_id}), annotation {j}: {error}.") from None
            if not obj.get("iscrowd", 0):
                classes.append(category)
                boxes.append([box[0] / width, box[1] / height, box[2] / width, box[3] / height])

        boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        return {
            "class_labels": torch.tensor(classes, dtype=torch.int64),
            "boxes": box_convert(boxes, in_fmt="xyxy", out_fmt="cxcywh"),
            "image_id": torch.tensor([int(image_id)], dtype=torch.int64),
            "orig_size": torch.tensor(orig_size, dtype=torch.int64),
            "size": torch.tensor(size, dtype=torch.int64),
        }

    def post_process_object_detection(self, outputs, threshold: float = 0.5, target_sizes=None, top_k: int = 100):
        """
        Turn raw detector outputs into scored boxes.

        Args:
            outputs: model output (or mapping) with `logits` (`[batch, queries, classes]`, sigmoid classification, no
                background class) and `pred_boxes` (`[batch, queries, 4]`, cx, cy, w, h normalised).
            threshold (`float`): keep detections with score > threshold (a finite number).
            target_sizes (`torch.Tensor` `[batch, 2]` or a list of `batch` (height, width) pairs, *optional*):
                original image sizes in pixels (positive, finite); boxes are scaled to those pixels. `None` leaves
                them normalised.
            top_k (`int`): at most this many (query, class) pairs per image (a positive integer), over all
                `queries x classes`, so one query can give several labels.

        Returns:
            `list[dict]`, one per image: `scores` (`[k]`), `labels` (`[k]`, int64), `boxes` (`[k, 4]`, x0, y0, x1, y1,
            clipped to the image), sorted by decreasing score.
        """
        if isinstance(outputs, Mapping):
            logits, pred_boxes = outputs["logits"], outputs["pred_boxes"]
        else:
            logits, pred_boxes = outputs.logits, outputs.pred_boxes
        batch, num_queries, num_classes = logits.shape
        if isinstance(threshold, bool) or not isinstance(threshold, Real) or not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}.")
        if isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
        # Clipped to the image: a box may overhang it in the model's cx, cy, w, h, never in the result.
        boxes = box_convert(pred_boxes.float(), in_fmt="cxcywh", out_fmt="xyxy").clamp(0.0, 1.0)
        if target_sizes is not None:
            sizes = _check_target_sizes(target_sizes, batch).to(boxes.device)
            height, width = sizes.unbind(-1)
            boxes = boxes * torch.stack([width, height, width, height], dim=-1)[:, None, :]

        scores = logits.float().sigmoid().flatten(1)
        scores, index = scores.topk(min(top_k, num_queries * num_classes), dim=-1)
        labels, queries = index % num_classes, index // num_classes
        boxes = boxes.gather(1, queries[..., None].expand(-1, -1, 4))
        results = []
        for score, label, box in zip(scores, labels, boxes):
            keep = score > threshold
            results.append({"scores": score[keep], "labels": label[keep], "boxes": box[keep]})
        return results


def _check_target_sizes(target_sizes, batch: int) -> torch.Tensor:
    """`target_sizes` as a float32 tensor [batch, 2] of (height, width); a ValueError says what was given otherwise.

    Shapes are checked before anything is reshaped: a flat list of 4 numbers is not 2 sizes, and a (height, width,
    channels) triple is not a size.
    """
    expected = f"a tensor [{batch}, 2] or a list of {batch} (height, width) pairs, one per image"
    if isinstance(target_sizes, (torch.Tensor, np.ndarray)):
        if target_sizes.ndim != 2 or target_sizes.shape[1] != 2:
            raise ValueError(f"target_sizes must be {expected}; got a tensor of shape {list(target_sizes.shape)}.")
    elif not isinstance(target_sizes, (list, tuple)):
        raise ValueError(f"target_sizes must be {expected}; got {type(target_sizes).__name__}.")
    rows = []
    for index, pair in enumerate(target_sizes):
        if isinstance(pair, (torch.Tensor, np.ndarray)):
            values = pair.tolist() if pair.ndim == 1 else None
        elif isinstance(pair, (list, tuple)):  # 0-d tensors count as numbers, e.g. the items of tensor.unbind()
            values = [v.item() if isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim == 0 else v for v in pair]
        else:
            values = None
        if (values is None or len(values) != 2
                or not all(isinstance(v, Real) and not isinstance(v, bool) for v in values)):
            raise ValueError(f"target_sizes must be {expected}; entry {index} is {pair!r}.")
        height, width = float(values[0]), float(values[1])
        if not (math.isfinite(height) and math.isfinite(width) and height > 0 and width > 0):
            raise ValueError(f"target_sizes[{index}] is (height={height}, width={width}): both must be positive, "
                             "finite numbers of pixels.")
        rows.append((height, width))
    if len(rows) != batch:
        raise ValueError(f"Got {len(rows)} target sizes for a batch of {batch} images; target_sizes must be "
                         f"{expected}.")
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 2)


def _check_object(obj, width: int, height: int) -> tuple[int, list[float]]:
    """Validate one COCO object; return its category and its box as x0, y0, x1, y1 pixels clipped to the image."""
    if not isinstance(obj, Mapping) or "bbox" not in obj or "category_id" not in obj:
        raise ValueError("missing 'bbox' or 'category_id'")
    bbox, category = obj["bbox"], obj["category_id"]
    bbox = bbox.tolist() if hasattr(bbox, "tolist") else bbox
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(isinstance(v, Real) and not isinstance(v, bool) for v in bbox)):
        raise ValueError(f"bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
    if not all(math.isfinite(v) for v in bbox):
        raise ValueError(f"bbox has non-finite values {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise ValueError(f"bbox width and height must be > 0, got w={w}, h={h}")
    if isinstance(category, bool) or not isinstance(category, Integral) or category < 0:
        raise ValueError(f"category_id must be a non-negative integer, got {category!r}")
    x0, x1 = min(max(x, 0.0), width), min(max(x + w, 0.0), width)
    y0, y1 = min(max(y, 0.0), height), min(max(y + h, 0.0), height)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"bbox {bbox!r} lies entirely outside the image (width {width}, height {height})")
    return int(category), [x0, y0, x1, y1]


def _check_size(size, size_divisor) -> None:
    """Raise unless `size` is a fixed (height, width) whose sides are multiples of the backbone stride."""
    if size is None:
        return
    height, width = size.get("height"), size.get("width")
    if height is None or width is None:
        raise ValueError(f"size must give a fixed 'height' and 'width', got {dict(size)}.")
    if size_divisor is not None and (height % size_divisor or width % size_divisor):
        raise ValueError(f"size ({height}, {width}) is not a multiple of the backbone stride {size_divisor}.")


def load_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """
    The displayed image as 8-bit RGB: EXIF orientation applied; transparency composited on white (transparent areas
    are background, and their hidden colour is often garbage); 16/32-bit integer images scaled (65535 -> 255, not
    clipped); float images read as 0..1 when they fit, else clipped to 0..255.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        image = PIL.Image.fromarray(_to_uint8(np.asarray(image)))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = PIL.Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Single-channel integer or float pixels -> uint8 (16-bit range scaled by 255/65535)."""
    if array.dtype.kind == "f":
        array = array * 255.0 if array.min() >= 0 and array.max() <= 1 else array
        return np.clip(np.rint(array), 0, 255).astype(np.uint8)
    if array.min() >= 0 and array.max() <= 65535:  # 16-bit data, also when PIL stores it as 32-bit "I"
        return np.rint(array / 257.0).astype(np.uint8)
    low, high = float(array.min()), float(array.max())  # wider integer range: stretch linearly
    return np.rint((array - low) * 255.0 / max(high - low, 1.0)).astype(np.uint8)


__all__ = ["DiTDetectionImageProcessor", "load_rgb"]
