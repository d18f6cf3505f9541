"""Training on a streamed dataset (`--streaming`): the train split read as a `datasets.IterableDataset`, one part per
process, each record checked and transformed as it arrives; the eval splits taken from the stream up to a bound and
materialised, so evaluation runs unchanged.

    source -> IterableDataset (load_dataset(..., streaming=True))
      train: images undecoded -> [held-out records left out] -> [take(max_train_samples)] -> shuffle(seed of the
             stage, buffer) -> split_dataset_by_node(rank, world size) -> per record: canonical fields, the data check
             (`check_record`, the one the non-streaming path runs once), the training transform -> batches
      validation / test: the first `max_eval_samples` records -> a regular `Dataset` (the non-streaming path's
             canonicalisation and check from there on)

Rules (each a clear error before anything trains where it is broken):
- `--max_steps` is required: a stream has no length, so an epoch is undefined; for the same reason evaluation and
  checkpoints go by steps (`--eval_strategy epoch` / `--save_strategy epoch` are refused).
- The stream is endless for the Trainer: each process reads its part of the stream pass after pass (pass p shuffles
  with seed + p, `IterableDataset.set_epoch`, and augments with epoch p), so every process runs exactly the steps it is
  told, whatever the size of its part, and processes never reach an epoch end at different steps. Each stage starts the
  stream over with its own shuffle seed (stage two: seed + 1_000_003).
- Sharding happens once, here (`split_dataset_by_node`); the Trainer's dataloader is built per process without
  Accelerate's dispatching or re-sharding (`DetectionTrainer.get_train_dataloader`).
- Bad records: the data check's errors name the record (its position in this process's stream and its image_id);
  with `--skip_bad_images` they are skipped and counted. The fixes and skips of the records read are counted once per
  record (by image_id), summed over processes and stages, and reported as the non-streaming path's are.

Training-side only.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import datasets
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Image, IterableDataset, List
from datasets.distributed import split_dataset_by_node
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .data import (
    SKIPPED_ISSUES,
    SPLIT_ALIASES,
    SPLITS,
    DataReport,
    canonical_record,
    check_record,
    collate_fn,
    dict_of_lists,
    open_image,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_EVAL_SAMPLES = 1000
DEFAULT_SHUFFLE_BUFFER_SIZE = 1000
STAGE_SEED_OFFSET = 1_000_003  # stage two's shuffle seed: far from stage one's seed + pass
DATA_CHECK_FILE = "stream_data_check.json"


# ----------------------------------------------------------------------------------------------------------------
# Arguments and sources
# ----------------------------------------------------------------------------------------------------------------

def check_streaming_arguments(dataset_name: str | None, coco_annotations: str | None, max_steps: int,
                              eval_strategy: str, save_strategy: str) -> None:
    """Refuse, before anything is read, what cannot stream or is undefined on a stream; each error says why."""
    if coco_annotations:
        raise ValueError("--streaming cannot read --coco_annotations: the COCO json loader reads the whole json to join "
                         "images and annotations, then holds the records in memory. Convert the data to parquet shards "
                         "in the cppe-5 schema (image, image_id, width, height, objects) to stream it, or leave "
                         "--streaming out.")
    if not dataset_name:
        raise ValueError("--streaming needs --dataset_name (a Hub dataset, or a folder of parquet / arrow / json "
                         "shards or an imagefolder): the built-in synthetic set is generated in memory and cannot "
                         "stream.")
    if os.path.isfile(os.path.join(dataset_name, "dataset_dict.json")) or os.path.isfile(
            os.path.join(dataset_name, "state.json")):
        raise ValueError(f"--streaming cannot read {dataset_name}: a folder written by save_to_disk is read with "
                         "load_from_disk, which does not stream (it memory-maps the files: no need to stream). Leave "
                         "--streaming out.")
    if max_steps is None or max_steps <= 0:
        raise ValueError("--streaming needs --max_steps N: a streamed dataset has no length, so an epoch (and with it "
                         "--num_train_epochs) is undefined; the run is N optimiser steps, split between the stages in "
                         "the proportion of --freeze_backbone_epochs to --num_train_epochs.")
    for flag, value in (("eval_strategy", eval_strategy), ("save_strategy", save_strategy)):
        if str(getattr(value, "value", value)) == "epoch":
            raise ValueError(f"--{flag} epoch with --streaming: a stream has no epochs. Give --{flag} steps (with "
                             f"--{flag.split('_')[0]}_steps N) or no.")


def load_stream(dataset_name: str, dataset_config_name: str | None = None, token: str | bool | None = None,
                cache_dir: str | None = None) -> datasets.IterableDatasetDict:
    """The source as `IterableDataset`s by split (names val / valid / dev become validation; others dropped): an
    imagefolder with metadata.jsonl, else any id or folder `load_dataset` streams (Hub ids; folders of parquet, arrow,
    json shards)."""
    if os.path.isdir(dataset_name) and (os.path.isfile(os.path.join(dataset_name, "metadata.jsonl")) or any(
            os.path.isfile(os.path.join(dataset_name, d, "metadata.jsonl")) for d in os.listdir(dataset_name))):
        raw = datasets.load_dataset("imagefolder", data_dir=dataset_name, streaming=True, cache_dir=cache_dir)
    else:
        raw = datasets.load_dataset(dataset_name, dataset_config_name, streaming=True, cache_dir=cache_dir,
                                    token=token)
    if isinstance(raw, IterableDataset):
        raw = datasets.IterableDatasetDict({"train": raw})
    splits = datasets.IterableDatasetDict()
    for name, split in raw.items():
        canonical = SPLIT_ALIASES.get(name, name)
        if canonical in SPLITS and canonical not in splits:
            splits[canonical] = split
        else:
            logger.warning("Dropping split %r of the stream: only %s (or val/valid/dev) are used.", name, SPLITS)
    if "train" not in splits:
        raise ValueError(f"No train split among {list(raw)} of {dataset_name}.")
    return splits


def stream_labels(stream: IterableDataset) -> tuple[str, dict[int, str]]:
    """(the objects' category key, id2label) from the stream's features. A stream cannot be scanned up front for its
    class names, so the categories must be a `ClassLabel` (as cppe-5's are; parquet written by `datasets` keeps it)."""
    features = stream.features
    if features is None or "objects" not in features or "image" not in features:
        raise ValueError(f"The stream has no 'image' and 'objects' features (features: {features}); --streaming needs "
                         "a source whose features are known (parquet / arrow written by datasets, a Hub dataset with "
                         "features).")
    objects = features["objects"]
    inner = objects.feature if isinstance(objects, List) else objects
    key = "category" if "category" in inner else "categories"
    if key not in inner or "bbox" not in inner:
        raise ValueError(f"objects must hold 'bbox' and 'category' (or 'categories'); it holds {list(inner)}.")
    category = inner[key].feature if isinstance(inner[key], List) else inner[key]
    if not isinstance(category, ClassLabel):
        raise ValueError(f"--streaming needs the objects' {key!r} to be a ClassLabel (class names known up front); "
                         f"it is {category}. A stream cannot be scanned for its class names before training: cast the "
                         "column to ClassLabel(names=[...]) when writing the shards, or leave --streaming out.")
    return key, dict(enumerate(category.names))


def materialise(stream: IterableDataset, limit: int) -> Dataset:
    """The first `limit` records of `stream` as a regular `Dataset`, images undecoded on the way (a corrupt image
    reaches the data check instead of failing in the decoder) and decoded again after."""
    undecoded = stream.cast_column("image", Image(decode=False))
    dataset = Dataset.from_list(list(undecoded.take(limit)), features=undecoded.features)
    return dataset.cast_column("image", Image())


def streamed_eval_splits(splits: datasets.IterableDatasetDict, max_eval_samples: int,
                         ) -> tuple[DatasetDict, set[int]]:
    """(validation and test as regular Datasets, each the first `max_eval_samples` records of its stream; the
    image_ids held out of train). Without a validation split, the first `max_eval_samples` records of train are the
    validation split and training leaves those image_ids out (a stream has no length, so no percentage of it can be
    held out; the records need integer image_ids for that)."""
    materialised, held_out = DatasetDict(), set()
    for name in ("validation", "test"):
        if name in splits:
            materialised[name] = materialise(splits[name], max_eval_samples)
    if "validation" not in materialised:
        train = splits["train"]
        if "image_id" not in (train.features or {}):
            raise ValueError("The stream has no validation split and its records have no image_id to hold some out "
                             "of training by: give a validation split.")
        materialised["validation"] = materialise(train, max_eval_samples)
        held_out = set(materialised["validation"]["image_id"])
        logger.info("No validation split: the first %d train records (image_ids) are held out for validation.",
                    len(held_out))
    for name, split in materialised.items():
        if len(split) == 0:
            raise ValueError(f"The streamed {name!r} split has no records.")
    return materialised, held_out


# ----------------------------------------------------------------------------------------------------------------
# The training stream
# ----------------------------------------------------------------------------------------------------------------

def shard_stream(stream: IterableDataset, rank: int, world_size: int, seed: int, buffer_size: int,
                 max_samples: int | None = None) -> IterableDataset:
    """This process's part of `stream` (its first `max_samples` records, if given), images undecoded (a corrupt image
    reaches the data check instead of failing in the decoder), shuffled: the same shuffle (fixed `seed`, shard order and buffer) on every
    process, then `split_dataset_by_node`: whole shards per process where their number divides evenly, else every
    `world_size`-th record. The parts are disjoint and together the whole stream. `buffer_size` 0 or 1: no shuffle."""
    stream = stream.cast_column("image", Image(decode=False))
    if max_samples is not None:
        stream = stream.take(max_samples)
    if buffer_size > 1:
        stream = stream.shuffle(seed=seed, buffer_size=buffer_size)
    return split_dataset_by_node(stream, rank=rank, world_size=world_size)


class StreamedTrainSet(torch.utils.data.IterableDataset):
    """
    One process's endless training stream: records of `stream` (images undecoded, this process's part) through the
    canonical conversion, the data check and `transform` (a `DetectionTransform`), one at a time.

    Yields {"pixel_values": `[3, H, W]`, "labels": dict, "data_issues": [(image_id, [issue, ...]), ...]}: the issues
    of this record and of the records skipped just before it (`--skip_bad_images`), so they reach the training process
    whichever dataloader worker read them (`StreamDataCheck` counts them). A bad record without `skip_bad_images` is
    the data check's `ValueError`, naming the record's position in this process's stream and its image_id.

    Pass p over the stream sets `stream.set_epoch(p)` (the shuffle's seed + p) and the transform's epoch p. A pass
    that yields no usable record on a process is an error (it would never end); DataLoader workers with no shard of
    their own end instead.

    `split_by_node` tells `DetectionTrainer` that the stream is already this process's part.
    """

    split_by_node = True

    def __init__(self, stream: IterableDataset, transform, num_labels: int, bbox_format: str, category_key: str,
                 held_out: set[int], skip_bad_images: bool, rank: int, world_size: int):
        self.stream, self.transform = stream, transform
        self.num_labels, self.bbox_format, self.category_key = num_labels, bbox_format, category_key
        self.held_out, self.skip_bad_images = held_out, skip_bad_images
        self.rank, self.world_size = rank, world_size

    def records(self, epoch: int = 0):
        """One pass: (checked canonical record or None if skipped, its issues, its image_id) per record read."""
        self.stream.set_epoch(epoch)
        where = f"train stream of process {self.rank} of {self.world_size}" + _worker_text()
        for position, example in enumerate(self.stream):
            objects = dict_of_lists(example["objects"])
            own_ids = None if "id" in objects else list(range(len(objects.get("bbox") or [])))  # numbered per record
            record = canonical_record(example, position, where, self.bbox_format, self.category_key, None, own_ids)
            if record["image_id"] in self.held_out:
                continue
            record["image"] = example["image"]
            checked = check_record(record, position, num_labels=self.num_labels, split=where,
                                    skip_bad_images=self.skip_bad_images)
            issues = checked.pop("_issues")
            if any(issue in SKIPPED_ISSUES for issue in issues):
                yield None, issues, record["image_id"]
            else:
                yield {**record, **checked}, issues, record["image_id"]

    def __iter__(self):
        epoch = 0
        while True:
            self.transform.epoch = epoch  # each pass augments anew, reproducibly (seed, pass, image_id)
            pending, used = [], 0
            for record, issues, image_id in self.records(epoch):
                if issues:
                    pending.append((int(image_id), list(issues)))
                if record is None:
                    continue
                batch = self.transform({"image": [open_image(record["image"])], "image_id": [record["image_id"]],
                                        "objects": [record["objects"]]})
                yield {"pixel_values": batch["pixel_values"][0], "labels": batch["labels"][0],
                       "data_issues": pending}
                pending, used = [], used + 1
            if used == 0:
                if torch.utils.data.get_worker_info() is not None:
                    return  # a worker without records of its own: the other workers serve this process
                raise ValueError(f"The train stream of process {self.rank} of {self.world_size} yielded no usable "
                                 "record in a whole pass: nothing to train on (too few records or shards for the "
                                 "processes, or every record skipped as bad).")
            epoch += 1


def _worker_text() -> str:
    info = torch.utils.data.get_worker_info()
    return f", dataloader worker {info.id}" if info is not None else ""


def streaming_collate_fn(examples: list[dict]) -> dict:
    """`collate_fn` plus "data_issues": the examples' issue lists, concatenated (popped by the trainer)."""
    batch = collate_fn(examples)
    batch["data_issues"] = [item for example in examples for item in example.get("data_issues", [])]
    return batch


class StreamDataCheck(TrainerCallback, ExportableState):
    """The data check's findings on the streamed records a stage trained on: {image_id: [issue, ...]}, each record
    once (a record read again in a later pass is not counted again). Saved in every checkpoint and restored on resume
    (the batches a resume skips do not reach training), gathered over the processes at the end of the stage and written
    to the stage's folder (`DATA_CHECK_FILE`)."""

    def __init__(self, issues: dict | None = None):
        self.issues = {int(k): list(v) for k, v in (issues or {}).items()}

    def add(self, items: list) -> None:
        for image_id, issues in items:
            self.issues.setdefault(int(image_id), list(issues))

    def state(self) -> dict:
        return {"args": {"issues": {str(k): v for k, v in self.issues.items()}}, "attributes": {}}


def gather_issues(issues: dict[int, list[str]]) -> dict[int, list[str]]:
    """The union of every process's {image_id: issues} (processes read disjoint records)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return dict(issues)
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, issues)
    merged = {}
    for part in everyone:
        for image_id, found in part.items():
            merged.setdefault(image_id, found)
    return merged


def write_stage_issues(stage_dir: Path, issues: dict[int, list[str]]) -> None:
    (stage_dir / DATA_CHECK_FILE).write_text(json.dumps({str(k): v for k, v in sorted(issues.items())}) + "\n")


def read_stream_report(output_dir: Path, report: DataReport) -> dict[str, int]:
    """Add the streamed train records' issues of both stages (each record once) to `report` as split "train"; returns
    the counts by issue (for all_results.json)."""
    merged = {}
    for stage in ("stage1", "stage2"):
        path = output_dir / stage / DATA_CHECK_FILE
        if path.is_file():
            for image_id, issues in json.loads(path.read_text()).items():
                merged.setdefault(int(image_id), issues)
    counts = {}
    for image_id, issues in sorted(merged.items()):
        for issue in issues:
            report.add("train", issue, image_id)
            counts[issue] = counts.get(issue, 0) + 1
    return counts


__all__ = ["DEFAULT_MAX_EVAL_SAMPLES", "DEFAULT_SHUFFLE_BUFFER_SIZE", "StreamDataCheck", "StreamedTrainSet",
           "check_streaming_arguments", "load_stream", "materialise", "read_stream_report", "shard_stream",
           "stream_labels", "streamed_eval_splits", "streaming_collate_fn"]
