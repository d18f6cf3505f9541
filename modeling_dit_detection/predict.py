"""Run a trained detector on image files: annotated PNGs and one COCO-format JSON of the detections.

    python -m modeling_dit_detection.predict --model outputs/synthetic photos/ extra.jpg --output-dir predictions

Writes `<output-dir>/<image name>.png` per image (boxes, class names and scores drawn) and
`<output-dir>/predictions.json`: COCO format, one `images` entry per input image and one `annotations` entry per
detection (`bbox` x, y, w, h in the image's pixels, plus `score`), so pycocotools' `loadRes` reads it. Category ids
are the training data's own (`config.category_ids`, e.g. COCO's 1..90 with gaps) where the model has them, else
the label ids.
Runs on CUDA, then MPS, then CPU, whichever is there first.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import PIL.Image
import torch
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModelForObjectDetection

from .image_processing_dit_detection import load_rgb
from .visualization import draw_detections

IMAGE_SUFFIXES = {".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}


def find_images(inputs: list[str]) -> list[Path]:
    """Image files among `inputs` (files, or folders searched recursively), in a stable order, without duplicates."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            found.extend(sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif item.is_file():
            found.append(item)
        else:
            raise FileNotFoundError(f"{item} is neither an image file nor a folder.")
    return list(dict.fromkeys(path.resolve() for path in found))


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _output_names(paths: list[Path]) -> list[str]:
    """A distinct PNG name per image: its stem, with a counter where two inputs share one."""
    names, used = [], set()
    for path in paths:
        name, counter = f"{path.stem}.png", 1
        while name in used:
            name, counter = f"{path.stem}-{counter}.png", counter + 1
        used.add(name)
        names.append(name)
    return names


@torch.no_grad()
def detect(model, processor, images: list[PIL.Image.Image], threshold: float) -> list[dict[str, torch.Tensor]]:
    """Detections of `model` on RGB `images`, one dict per image on the CPU: `scores` [k], `labels` [k], `boxes`
    [k, 4] x0, y0, x1, y1 in that image's pixels. The model runs on the device its weights are on."""
    device = next(model.parameters()).device
    pixel_values = processor(images, return_tensors="pt")["pixel_values"].to(device)
    results = processor.post_process_object_detection(
        model(pixel_values), threshold=threshold, target_sizes=[(image.height, image.width) for image in images])
    return [{key: value.cpu() for key, value in result.items()} for result in results]


@torch.no_grad()
def predict(model_name_or_path: str, inputs: list[str], output_dir: str, threshold: float = 0.3,
            batch_size: int = 8, device: str | torch.device | None = None, trust_remote_code: bool = False) -> dict:
    """Detect objects in the images of `inputs`, write the annotated PNGs and `predictions.json` to `output_dir`;
    returns the COCO-format dict that was written."""
    paths = find_images(inputs)
    if not paths:
        raise ValueError(f"No images found in {inputs} (suffixes: {sorted(IMAGE_SUFFIXES)}).")
    device = torch.device(device) if device is not None else default_device()
    processor = AutoImageProcessor.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    model = AutoModelForObjectDetection.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    model.to(device).eval()
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    # The training data's id of each label (run_detection.py stores it); without it, labels are the ids.
    category_ids = getattr(model.config, "category_ids", None) or sorted(id2label)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)

    coco = {"images": [], "annotations": [],
            "categories": [{"id": category_ids[i], "name": name} for i, name in sorted(id2label.items())]}
    names = dict(zip(paths, _output_names(paths)))
    with tqdm(total=len(paths), desc="Detecting", unit="image") as progress:
        for batch in _batches(paths, batch_size):
            images = [load_rgb(PIL.Image.open(path)) for path in batch]
            for path, image, result in zip(batch, images, detect(model, processor, images, threshold)):
                image_id = len(coco["images"])
                coco["images"].append({"id": image_id, "file_name": str(path), "width": image.width,
                                       "height": image.height, "annotated": names[path]})
                for score, label, (x0, y0, x1, y1) in zip(result["scores"].tolist(), result["labels"].tolist(),
                                                          result["boxes"].tolist()):
                    coco["annotations"].append({
                        "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": category_ids[label],
                        "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "score": score,
                        "iscrowd": 0})
                draw_detections(image, result, id2label).save(output / names[path])
            progress.update(len(batch))
    (output / "predictions.json").write_text(json.dumps(coco, indent=1))
    return coco


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m modeling_dit_detection.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A trained detector: Hub id or folder.")
    parser.add_argument("inputs", nargs="+", help="Image files and/or folders (searched recursively).")
    parser.add_argument("--threshold", type=float, default=0.3, help="Keep detections with a higher score.")
    parser.add_argument("--output-dir", default="predictions", help="Where the PNGs and predictions.json go.")
    parser.add_argument("--batch-size", type=int, default=8, help="Images per forward pass.")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available).")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="Run the model code stored with the model (needed when this package is not installed "
                             "where the model's code comes from the Hub).")
    args = parser.parse_args(argv)
    coco = predict(args.model, args.inputs, args.output_dir, args.threshold, args.batch_size, args.device,
                   args.trust_remote_code)
    print(f"{len(coco['annotations'])} detections in {len(coco['images'])} images -> {args.output_dir}")


if __name__ == "__main__":
    main()
