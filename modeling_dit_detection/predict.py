"""Run a trained detector on image files: annotated PNGs and one COCO-format JSON of the detections.

    python -m modeling_dit_detection.predict --model outputs/synthetic photos/ extra.jpg --output-dir predictions

Writes `<output-dir>/<image name>.png` per image (boxes, class names and scores drawn) and
`<output-dir>/predictions.json`: COCO format, one `images` entry per image read and one `annotations` entry per
detection (`bbox` x, y, w, h in the image's pixels, plus `score`), so pycocotools' `loadRes` reads it. Category ids
are the training dataset's own (the model config's `category_ids`, else the label ids), so the file scores
against the dataset's ground truth as it is.

Inputs are never overwritten, and neither are earlier outputs unless `--overwrite` is given (and then only files
this tool wrote). Folders are searched recursively, but never the output folder nor annotated images of earlier
runs. A file that cannot be read as an image is skipped with a warning naming it; the run fails only if no image
could be read. Runs on CUDA, then MPS, then CPU, whichever is there first.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import secrets
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from numbers import Integral, Real
from pathlib import Path

import PIL.Image
import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from PIL.PngImagePlugin import PngInfo
from safetensors import SafetensorError
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import AutoConfig, AutoImageProcessor, AutoModelForObjectDetection

from .hub import check_model_folder
from .image_processing_dit_detection import load_rgb
from .visualization import draw_detections

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}
PREDICTIONS_NAME = "predictions.json"
# Stamped into every annotated PNG (its "Software" text chunk) and into predictions.json ("info"/"tool"): how a later
# run tells this tool's outputs from the user's own files, wherever they lie.
TOOL = "modeling_dit_detection.predict"
LISTED = 10  # file names spelled out per message; the rest are counted


class PredictError(Exception):
    """A problem with the arguments, inputs or outputs of a prediction run, said so that a user can act on it."""


class InputNotFoundError(PredictError, FileNotFoundError):
    """An input path that is neither an image file nor a folder."""


# ------------------------------------------------------------------------------------------------------- inputs


def find_images(inputs: list[str], exclude: str | Path | None = None) -> list[Path]:
    """Image files among `inputs` (files, or folders searched recursively), in a stable order, without duplicates.

    A file named in `inputs` is taken as it is. Folder searches keep the files with an image suffix, following
    folder links once, and leave out the folder `exclude` (the output folder: its images are this tool's outputs)
    and annotated images of earlier runs; a run must not read its own or an earlier run's outputs as inputs.
    """
    found, earlier_outputs = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            for path in _search_folder(item, exclude):
                ours = path.suffix.lower() == ".png" and _written_by_this_tool(path)
                (earlier_outputs if ours else found).append(path)
        elif item.is_file():
            found.append(item)
        else:
            raise InputNotFoundError(f"{item} is neither an image file nor a folder.")
    if earlier_outputs:
        logger.info("Left out %d annotated images of earlier runs (%s); name them as files to read them anyway.",
                    len(earlier_outputs), _listing(earlier_outputs))
    unique = {}
    for path in found:  # the same file reached twice (two arguments, a link) is read once
        unique.setdefault(path.resolve(), Path(os.path.abspath(path)))
    if not unique:
        left_out = f"; {len(earlier_outputs)} annotated images of earlier runs were left out" if earlier_outputs else ""
        raise PredictError(f"No images found in {inputs} (suffixes: {' '.join(sorted(IMAGE_SUFFIXES))}){left_out}.")
    return list(unique.values())


def _search_folder(folder: Path, exclude: str | Path | None) -> list[Path]:
    """The files with an image suffix under `folder`, sorted; links to folders are followed, each folder once."""
    skip = Path(exclude).resolve() if exclude is not None else None
    seen, found = set(), []
    for root, folders, files in os.walk(folder, followlinks=True, onerror=_unsearchable):
        real = Path(root).resolve()
        if real == skip:
            logger.info("Not searching %s for images: it is the output folder.", root)
            folders.clear()
            continue
        if real in seen:  # a link back to a folder already searched: a loop or a second way in
            folders.clear()
            continue
        seen.add(real)
        # Broken links and other non-regular files are kept, so that reading them fails with a warning naming them.
        found.extend(Path(root, name) for name in files if Path(name).suffix.lower() in IMAGE_SUFFIXES)
    return sorted(found)


def _unsearchable(error: OSError) -> None:
    logger.warning("Cannot search %s for images (%s); its images are left out.", error.filename, error.strerror)


def read_image(path: Path) -> PIL.Image.Image:
    """The image at `path` as RGB (see `load_rgb`), decoded now, so that a bad file fails here and not in a batch.
    PIL's warnings about it (e.g. a size near the decompression-bomb limit) are logged with the path."""
    if not path.is_file():  # opening a FIFO would block; a broken link has nothing to read
        raise OSError("not a regular file" if path.exists() else "no such file (a broken link?)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with PIL.Image.open(path) as image:
            image.load()
            rgb = load_rgb(image)
    for warning in caught:
        logger.warning("%s: %s", path, warning.message)
    return rgb


def _readable_images(paths: Iterable[Path], skipped: list[dict], progress) -> Iterator[tuple[Path, PIL.Image.Image]]:
    """(path, RGB image) for each of `paths` that reads, one at a time; each that does not is logged and added to
    `skipped` as {"file_name", "error"}."""
    for path in paths:
        try:
            image = read_image(path)
        # Any failure to decode one file skips that file: depending on the format, PIL raises OSError, ValueError,
        # SyntaxError, struct.error, DecompressionBombError, MemoryError, ...
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
            logger.warning("Skipping %s: it cannot be read as an image (%s).", path, reason)
            skipped.append({"file_name": str(path), "error": reason})
        else:
            yield path, image
        progress.update(1)


# ------------------------------------------------------------------------------------------------------ outputs


def _output_names(paths: list[Path]) -> list[str]:
    """A distinct PNG name per image: its stem, with a counter where two inputs share one (compared ignoring case,
    as a case-insensitive file system would)."""
    names, used = [], set()
    for path in paths:
        name, counter = f"{path.stem}.png", 1
        while name.casefold() in used:
            name, counter = f"{path.stem}-{counter}.png", counter + 1
        used.add(name.casefold())
        names.append(name)
    return names


def _check_output_dir(inputs: list[str], output: Path) -> None:
    """Refuse an output folder that is a file, or that is an input folder: its annotated PNGs would sit among the
    images and be read as inputs by the next run."""
    existing = next(folder for folder in (output, *output.absolute().parents) if folder.exists())
    if not existing.is_dir():  # the folder itself, or where it would be created, is a file
        raise PredictError(f"--output-dir {output}: {existing} is a file; give a folder (it is created if missing).")
    for item in map(Path, inputs):
        if item.is_dir() and item.resolve() == output.resolve():
            raise PredictError(f"--output-dir {output} is the input folder {item}: the annotated images would be "
                               "written among the inputs. Choose another --output-dir, e.g. "
                               f"{Path(item, 'predictions')} (an output folder inside an input folder is never "
                               "searched).")


def plan_outputs(paths: list[Path], output: Path, overwrite: bool = False) -> dict[Path, str]:
    """The annotated PNG name of each of `paths` in `output`, after checking that writing them and predictions.json
    replaces no input, and no existing file unless `overwrite` (and then only files this tool wrote).

    Checked before the model loads and before anything is written, so a refused run leaves no trace.
    """
    names = dict(zip(paths, _output_names(paths)))
    targets = [output / name for name in names.values()] + [output / PREDICTIONS_NAME]
    existing = [target for target in targets if os.path.lexists(target)]
    inputs = {key: path for path in paths if (key := _file_key(path)) is not None}
    for target in existing:  # the same file also through a link, a hard link or a case-insensitive file system
        if (key := _file_key(target)) is not None and key in inputs:
            raise PredictError(f"Writing {target} would replace the input {inputs[key]}; inputs are never "
                               f"overwritten. Choose an --output-dir without inputs in it, e.g. "
                               f"{output / 'predictions'}.")
    foreign = [target for target in existing if not _written_by_this_tool(target)]
    if foreign:
        raise PredictError(f"{_listing(foreign)} in {output} {'is' if len(foreign) == 1 else 'are'} in the way and "
                           f"not written by {TOOL}, so not even --overwrite replaces "
                           f"{'it' if len(foreign) == 1 else 'them'}. Move {'it' if len(foreign) == 1 else 'them'} "
                           "away or choose another --output-dir.")
    if existing and not overwrite:
        raise PredictError(f"{len(existing)} output files of an earlier run exist in {output} "
                           f"({_listing(existing)}). Pass --overwrite to replace them, or choose another --output-dir.")
    return names


def _file_key(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file `path` leads to, or None where there is none: equal keys are the same file."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _written_by_this_tool(path: Path) -> bool:
    """Whether `path` is an annotated PNG or a predictions.json that this tool wrote (it carries the TOOL stamp)."""
    if not path.is_file():  # reading a FIFO would block; what is no regular file is not ours
        return False
    try:
        if path.suffix.lower() == ".json":
            info = json.loads(path.read_text()).get("info", {})
            return isinstance(info, dict) and info.get("tool") == TOOL
        with warnings.catch_warnings():  # a warning about the image is for when it is read as an input
            warnings.simplefilter("ignore")
            with PIL.Image.open(path) as image:
                return image.info.get("Software") == TOOL
    except Exception:  # unreadable, not an image, not JSON: in any case not ours
        return False


def _write_atomically(path: Path, write: Callable) -> None:
    """Write `path` through a temporary file in its folder, then rename: a link at `path` is replaced, not
    written through, and an interrupted run leaves no half-written file."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")  # not mkstemp: its files are 0600
    try:
        with open(temporary, "xb") as file:
            write(file)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _save_annotated(image: PIL.Image.Image, path: Path) -> None:
    stamp = PngInfo()
    stamp.add_text("Software", TOOL)
    _write_atomically(path, lambda file: image.save(file, format="PNG", pnginfo=stamp))


def _listing(paths: list) -> str:
    shown = ", ".join(str(path) for path in paths[:LISTED])
    return shown + (f" and {len(paths) - LISTED} more" if len(paths) > LISTED else "")


# -------------------------------------------------------------------------------------------------------- model


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _check_model_reference(model_name_or_path: str) -> None:
    """Fail fast on a --model that is neither a saved detector folder nor possibly a Hub model id."""
    if os.path.exists(model_name_or_path):
        try:
            check_model_folder(model_name_or_path, need_processor=True)
        except (FileNotFoundError, ValueError) as error:
            raise PredictError(f"--model: {error}") from None
        return
    try:
        validate_repo_id(model_name_or_path)
    except HFValidationError:
        raise PredictError(f"--model {model_name_or_path}: no such folder (and not a Hub model id).") from None


def _load(loader: Callable, model_name_or_path: str, what: str, **kwargs):
    """`loader(model_name_or_path, **kwargs)`, its failure said in terms of --model."""
    try:
        return loader(model_name_or_path, **kwargs)
    except (OSError, ValueError, SafetensorError) as error:
        where = ("" if os.path.exists(model_name_or_path) else
                 f" There is no folder {model_name_or_path} here ({os.getcwd()}), so it was looked up on the Hub.")
        if isinstance(error, SafetensorError):
            where = " (a weights file is truncated or corrupt: save or download it again)"
        raise PredictError(f"Could not load the {what} of --model {model_name_or_path}: {error}{where}") from error


def category_ids(config) -> list[int]:
    """The dataset's category id of each label id 0..K-1: the config's `category_ids` (set by training on data with
    its own ids, e.g. COCO's 1..90), or the label ids themselves."""
    num_labels = config.num_labels
    ids = getattr(config, "category_ids", None)
    if ids is None:
        return list(range(num_labels))
    if (not isinstance(ids, (list, tuple)) or len(ids) != num_labels
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids) or len(set(ids)) != len(ids)):
        raise PredictError(f"The model config's category_ids {ids!r} must be {num_labels} distinct integers, the "
                           f"dataset's category id of each label 0..{num_labels - 1}.")
    return list(ids)


def _load_weights(model_name_or_path: str, config, device: str | torch.device | None, trust_remote_code: bool):
    """The detector of `model_name_or_path` with `config`, in eval mode on `device` (default: the first available),
    its conditioning folded: for inference only, each DiT block holds the constant modulation its adaLN MLP computes
    (the same outputs; a third fewer weights in DiT-XL/2; README "Performance")."""
    model = _load(AutoModelForObjectDetection.from_pretrained, model_name_or_path, "weights", config=config,
                  trust_remote_code=trust_remote_code)
    if hasattr(model, "fold_conditioning"):
        model.fold_conditioning()
    return model.to(torch.device(device) if device is not None else default_device()).eval()


def load_model(model_name_or_path: str, device: str | torch.device | None = None, trust_remote_code: bool = False):
    """(model, image processor) of a trained detector (Hub id or folder), loaded as `predict` loads them, ready for
    `detect`; a problem is a PredictError that says it in terms of --model. For callers that keep the model, e.g.
    the demo app (app.py)."""
    _check_model_reference(model_name_or_path)
    config = _load(AutoConfig.from_pretrained, model_name_or_path, "config", trust_remote_code=trust_remote_code)
    processor = _load(AutoImageProcessor.from_pretrained, model_name_or_path, "image processor",
                      trust_remote_code=trust_remote_code)
    return _load_weights(model_name_or_path, config, device, trust_remote_code), processor


@torch.no_grad()
def detect(model, processor, images: list[PIL.Image.Image], threshold: float) -> list[dict[str, torch.Tensor]]:
    """Detections of `model` on RGB `images`, one dict per image on the CPU: `scores` [k], `labels` [k], `boxes`
    [k, 4] x0, y0, x1, y1 in that image's pixels. The model runs on the device its weights are on."""
    device = next(model.parameters()).device
    pixel_values = processor(images, return_tensors="pt")["pixel_values"].to(device)
    results = processor.post_process_object_detection(
        model(pixel_values), threshold=threshold, target_sizes=[(image.height, image.width) for image in images])
    return [{key: value.cpu() for key, value in result.items()} for result in results]


# ----------------------------------------------------------------------------------------------------- the run


def _batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _coco_entries(coco: dict, path: Path, image: PIL.Image.Image, result: dict, name: str, ids: list[int]) -> None:
    """Append `image` and its detections to `coco` (bbox x, y, w, h pixels; category ids of the dataset)."""
    image_id = len(coco["images"])
    coco["images"].append({"id": image_id, "file_name": str(path), "width": image.width, "height": image.height,
                           "annotated": name})
    for score, label, (x0, y0, x1, y1) in zip(result["scores"].tolist(), result["labels"].tolist(),
                                              result["boxes"].tolist()):
        coco["annotations"].append({
            "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": ids[label],
            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "score": score, "iscrowd": 0})


def _check_settings(threshold, batch_size) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, Real) or not 0 <= threshold <= 1:
        raise PredictError(f"threshold must be a number from 0 to 1, got {threshold!r}.")  # NaN fails 0 <= nan
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
        raise PredictError(f"batch_size must be a positive integer, got {batch_size!r}.")


@torch.no_grad()
def predict(model_name_or_path: str, inputs: list[str] | str | os.PathLike, output_dir: str | os.PathLike,
            threshold: float = 0.3, batch_size: int = 8, device: str | torch.device | None = None,
            trust_remote_code: bool = False, overwrite: bool = False) -> dict:
    """Detect objects in the images of `inputs`, write the annotated PNGs and `predictions.json` to `output_dir`;
    returns the COCO-format dict that was written (`info["skipped"]` lists the files that could not be read).

    Everything that can be checked is checked before the weights load and before anything is written: the model
    folder, its config and processor, the inputs, and the output paths (see `plan_outputs`). Images are then read,
    detected and written one batch at a time. Raises PredictError (InputNotFoundError for a missing input) with a
    message for the user, also when no image could be read.
    """
    _check_settings(threshold, batch_size)
    _check_model_reference(model_name_or_path)
    if isinstance(inputs, (str, os.PathLike)):  # one path, not a sequence of one-letter paths
        inputs = [inputs]
    config = _load(AutoConfig.from_pretrained, model_name_or_path, "config", trust_remote_code=trust_remote_code)
    processor = _load(AutoImageProcessor.from_pretrained, model_name_or_path, "image processor",
                      trust_remote_code=trust_remote_code)
    ids = category_ids(config)
    output = Path(output_dir)
    _check_output_dir(inputs, output)
    paths = find_images(inputs, exclude=output)
    names = plan_outputs(paths, output, overwrite)

    model = _load_weights(model_name_or_path, config, device, trust_remote_code)
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    skipped = []
    coco = {"info": {"description": f"Detections of {model_name_or_path}", "tool": TOOL, "threshold": threshold,
                     "skipped": skipped},
            "images": [], "annotations": [],
            "categories": [{"id": ids[label], "name": id2label.get(label, str(label))} for label in range(len(ids))]}
    # logging_redirect_tqdm: a warning about one file is printed on its own line, not into the progress bar.
    with logging_redirect_tqdm(), tqdm(total=len(paths), desc="Detecting", unit="image") as progress:
        for batch in _batched(_readable_images(paths, skipped, progress), batch_size):
            output.mkdir(parents=True, exist_ok=True)  # only once an image has been read: a failed run writes nothing
            images = [image for _, image in batch]
            for (path, image), result in zip(batch, detect(model, processor, images, threshold)):
                _coco_entries(coco, path, image, result, names[path], ids)
                _save_annotated(draw_detections(image, result, id2label), output / names[path])
    if not coco["images"]:
        unread = _listing([entry["file_name"] for entry in skipped])
        raise PredictError(f"None of the {len(paths)} image files could be read ({unread}; see the warnings "
                           "above); nothing was written.")
    _write_atomically(output / PREDICTIONS_NAME, lambda file: file.write(json.dumps(coco, indent=1).encode()))
    return coco


# ------------------------------------------------------------------------------------------------ command line


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # also false for NaN
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text!r}")
    return value


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cuda, cuda:N, mps or cpu") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise argparse.ArgumentTypeError(f"{text!r} is not available here; use one of "
                                         f"{', '.join(kind for kind, there in available.items() if there)}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m modeling_dit_detection.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A trained detector: Hub id or folder.")
    parser.add_argument("inputs", nargs="+", help="Image files and/or folders (searched recursively).")
    parser.add_argument("--threshold", type=_probability, default=0.3,
                        help="Keep detections with a higher score (0 to 1).")
    parser.add_argument("--output-dir", default="predictions", help="Where the PNGs and predictions.json go.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace the outputs of an earlier run in --output-dir (never inputs, never files "
                             "this tool did not write).")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="Images per forward pass.")
    parser.add_argument("--device", type=_device, default=None,
                        help="cuda, mps or cpu (default: the first available).")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="Run the model code stored with the model (needed when this package is not installed "
                             "where the model's code comes from the Hub).")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """The command line: parse `argv`, run `predict`, print a summary; returns the COCO dict. A problem with the
    run raises PredictError (see `cli` for the exit status)."""
    args = build_parser().parse_args(argv)
    coco = predict(args.model, args.inputs, args.output_dir, args.threshold, args.batch_size, args.device,
                   args.trust_remote_code, args.overwrite)
    skipped = coco["info"]["skipped"]
    summary = f"{len(coco['annotations'])} detections in {len(coco['images'])} images -> {args.output_dir}"
    if skipped:
        summary += (f"; skipped {len(skipped)} files that could not be read as images: "
                    f"{_listing([entry['file_name'] for entry in skipped])}")
    print(summary)
    return coco


def cli(argv: list[str] | None = None) -> int:
    """`main` for a shell: warnings on stderr, a PredictError as one line and exit status 1 (argument errors: 2)."""
    logging.basicConfig(format="%(levelname)s: %(message)s")
    logger.setLevel(logging.INFO)  # this tool's notes; other libraries' INFO (e.g. HTTP requests) stay hidden
    try:
        main(argv)
    except PredictError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
