#!/usr/bin/env python
"""Fine-tune a DiT into an object detector with transformers' Trainer, in two stages, and evaluate COCO mAP.

    python run_detection.py --output_dir outputs/synthetic                      # built-in data, no network
    accelerate launch run_detection.py --model_name_or_path facebook/DiT-XL-2-256 \\
        --dataset_name cppe-5 --output_dir dit-xl-cppe5 --push_to_hub

All options: `python run_detection.py --help`. One JSON or YAML file may hold them all:
`python run_detection.py config.yaml`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
import datasets
from datasets import DatasetDict
from transformers import HfArgumentParser, TrainingArguments, set_seed

from modeling_dit_detection import DiTDetectionImageProcessor
from modeling_dit_detection.training.coco_metric import DetectionEvaluator
from modeling_dit_detection.image_processing_dit_detection import load_rgb
from modeling_dit_detection.training.data import (
    DataReport,
    DetectionTransform,
    _canonicalize,
    check_data_source_options,
    check_object_counts,
    clean_split,
    count_targets,
    coco_ground_truth,
    collate_fn,
    load_detection_dataset,
    make_train_augmentation,
    prepare_detection_dataset,
    processor_size,
    warn_if_most_boxes_dropped,
)
from modeling_dit_detection.hub import push_folder_to_hub
from modeling_dit_detection.training.model_card import TrainingSummary, render_model_card
from modeling_dit_detection.training.recipes import (StagePlan, check_config_overrides, check_weights_files,
                                                     load_detector, plan_stages)
from modeling_dit_detection.predict import detect
from modeling_dit_detection.training.synthetic_data import SYNTHETIC_LAYOUTS, make_synthetic_detection_dataset
from modeling_dit_detection.training.feature_cache import FeatureCaching
from modeling_dit_detection.training.stages import (check_unfreeze_last_blocks, prepare_output_dir,
                                                    remove_stage_one_model, train_in_stages,
                                                    unwrapped_copy, wraps_model_in_place)
from modeling_dit_detection.training.streaming import (
    DEFAULT_MAX_EVAL_SAMPLES,
    STAGE_SEED_OFFSET,
    StreamedTrainSet,
    check_streaming_arguments,
    load_stream,
    read_stream_report,
    shard_stream,
    stream_labels,
    streamed_eval_splits,
)
from modeling_dit_detection.training.trainer import AugmentationEpoch, DetectionTrainer
from modeling_dit_detection.visualization import detection_grid

logger = logging.getLogger("run_detection")
CARD_TEMPLATE = Path(__file__).resolve().parent / "model_cards" / "template.md"

# The built-in job: the "small" preset trained from scratch on the built-in shapes (the scratch recipe follows from
# its random weights); these are its measured training settings.
SYNTHETIC_DEFAULTS = {"num_train_epochs": 14, "learning_rate": 1e-3, "per_device_train_batch_size": 16,
                      "per_device_eval_batch_size": 32, "weight_decay": 1e-4, "warmup_steps": 50,
                      "max_grad_norm": 1.0, "augmentation": "light"}
# Defaults of this script that differ from TrainingArguments'; anything given on the command line wins.
TRAINING_DEFAULTS = {
    "remove_unused_columns": False,  # the transform needs the image and objects columns
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "logging_strategy": "steps",
    "logging_steps": 10,
    "metric_for_best_model": "map",
    "batch_eval_metrics": True,  # metrics per batch: only top-k detections are kept (transformers#34675)
    "eval_use_gather_object": True,  # per-image label dicts of any size gather across processes (#25939)
    "report_to": "tensorboard",
    "learning_rate": 1e-4,
    "weight_decay": 1e-4,
    "max_grad_norm": 0.1,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "seed": 42,
    "dataloader_pin_memory": torch.cuda.is_available(),
}
# The data options of the built-in synthetic data (refused with a dataset, which would ignore them).
BUILT_IN_DATA_OPTIONS = {"synthetic_train_size", "synthetic_eval_size", "synthetic_layout"}
# With --streaming: a stream has no epochs, so evaluation and checkpoints go by steps.
STREAMING_DEFAULTS = {"eval_strategy": "steps", "save_strategy": "steps", "eval_steps": 500, "save_steps": 500}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A diffusers DiT (pipeline such as facebook/DiT-XL-2-256, or a DiTTransformer2DModel), or a saved "
                "DiTForObjectDetection: Hub id or folder; which one is read from its files. Without it, a new DiT "
                "is built from --model_preset (random weights: for smoke tests and the built-in data only)."})
    vae_name_or_path: str | None = field(default=None, metadata={
        "help": "AutoencoderKL (Hub id or folder) for a latent DiT given as a lone transformer."})
    model_preset: str | None = field(default=None, metadata={
        "help": "Without --model_name_or_path: a DiTDetectionConfig preset (tiny, tiny-latent, DiT-S/2, ...). "
                "Default: a small pixel-space DiT sized for the built-in data."})
    image_size: str | None = field(default=None, metadata={
        "help": "Input size: '512' or 'HEIGHT,WIDTH', multiples of the backbone stride. Default: the checkpoint's."})
    feature_timestep: int | None = field(default=None, metadata={
        "help": "Diffusion timestep at which the DiT features are read (0 = clean). Default: the config's (100)."})
    out_indices: str | None = field(default=None, metadata={
        "help": "Comma-separated DiT stages to tap (i = the output of block i, 0 = the embedded patches), "
                "e.g. '14,18,21' of DiT-XL/2's 28. Default: at 1/2, 5/8, 3/4 depth."})
    num_queries: int | None = field(default=None, metadata={"help": "Object queries at inference."})
    fold_conditioning: bool = field(default=False, metadata={
        "help": "Fold the fixed adaLN conditioning into each DiT block: a third fewer backbone weights, same outputs."})
    config_overrides: str | None = field(default=None, metadata={
        "help": "JSON of further DiTDetectionConfig fields, e.g. '{\"decoder_layers\": 6, \"num_query_groups\": 13}'."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={
        "help": "A Hub dataset id (cppe-5 schema, e.g. 'cppe-5'), a folder written by save_to_disk, or an imagefolder "
                "with metadata.jsonl. Without any dataset option, the built-in synthetic shapes are used."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    coco_annotations: str | None = field(default=None, metadata={
        "help": "COCO instances json: 'train=a.json,validation=b.json[,test=c.json]' or one path (train only)."})
    image_dir: str | None = field(default=None, metadata={
        "help": "Folder the COCO json's file_name entries are in: one for all splits, or "
                "'train=train2017,validation=val2017'. Default: each json's folder."})
    bbox_format: str = field(default="coco", metadata={
        "help": "Box format of the data: coco (x, y, w, h pixels), pascal_voc (x0, y0, x1, y1 pixels) or yolo "
                "(cx, cy, w, h normalised).", "choices": ["coco", "pascal_voc", "yolo"]})
    validation_split_percentage: float = field(default=0.15, metadata={
        "help": "Fraction (0..1, e.g. 0.15) of train held out for validation when the data has no validation split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training images."})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "Use at most this many validation and test images (with --streaming: the first N records of each "
                "eval stream, materialised; default 1000)."})
    streaming: bool = field(default=False, metadata={
        "help": "Read the train split of --dataset_name (a Hub dataset, or a folder of parquet / arrow / json shards "
                "or an imagefolder) as a stream, each process its part (split_dataset_by_node), each record checked "
                "and transformed as it is read; validation and test are their first --max_eval_samples records. "
                "Needs --max_steps (a stream has no epochs); evaluation and checkpoints go by steps (default every "
                "500). Not for --coco_annotations, save_to_disk folders or the built-in data."})
    shuffle_buffer_size: int = field(default=1000, metadata={
        "help": "With --streaming: records in the shuffle buffer (IterableDataset.shuffle; shard order is shuffled "
                "too). Each pass over the stream and each stage shuffles with its own seed. 0 or 1: no shuffle."})
    augmentation: str = field(default="strong", metadata={
        "help": "Training augmentation: strong (flip, zoom out, IoU-safe crop, colour jitter), light (flip, colour "
                "jitter), flip (horizontal flip only) or none. Default: strong; light for the built-in data. With "
                "--cache_frozen_features, stage one uses flip only.", "choices": ["strong", "light", "flip", "none"]})
    skip_bad_images: bool = field(default=False, metadata={
        "help": "Skip (and count) images that cannot be decoded or are smaller than 8 pixels on a side, instead of "
                "stopping with an error that names the record."})
    preprocessing_num_workers: int | None = field(default=None, metadata={
        "help": "Processes for the validation pass over the data."})
    synthetic_train_size: int = field(default=2000, metadata={"help": "Built-in data: training images."})
    synthetic_eval_size: int = field(default=150, metadata={"help": "Built-in data: validation and test images each."})
    synthetic_layout: str = field(default="shapes", metadata={
        "help": "Built-in data: 'shapes' (64x64, 0-4 shapes of 15-45%% of the side) or 'dense-small' (256x256, 6-24 "
                "shapes of 10-40 px on cluttered backgrounds; benchmarks/quality_per_compute.py).",
        "choices": sorted(SYNTHETIC_LAYOUTS)})
    preview_images: int = field(default=8, metadata={"help": "Validation images drawn into predictions_preview.png."})
    preview_threshold: float = field(default=0.3, metadata={"help": "Score threshold of the preview's boxes."})


@dataclass
class StageArguments:
    recipe: str | None = field(default=None, metadata={
        "help": "two-stage (stage one: neck and head on a frozen DiT for --freeze_backbone_epochs, default 1; stage "
                "two: the DiT too, at --backbone_learning_rate, default --learning_rate / 10, with --layer_decay, "
                "default 0.9) or scratch (everything trains from step 0 at --learning_rate). Default: two-stage for "
                "a pretrained DiT, scratch for a new one. Options given explicitly win over the recipe's.",
        "choices": ["two-stage", "scratch"]})
    freeze_backbone_epochs: float | None = field(default=None, metadata={
        "help": "Stage one: epochs training neck and head on a frozen DiT (0 skips it); the rest of "
                "--num_train_epochs is stage two. With --max_steps, the steps are split in the same proportion."})
    unfreeze_last_blocks: int | None = field(default=None, metadata={
        "help": "Stage two trains only the last K DiT blocks (default: the whole DiT). The VAE stays frozen."})
    backbone_learning_rate: float | None = field(default=None, metadata={
        "help": "Stage two learning rate of the last DiT block (default: the recipe's)."})
    layer_decay: float | None = field(default=None, metadata={
        "help": "Stage two: each earlier DiT block learns at this factor (0..1] of the next one's rate."})
    cache_frozen_features: bool = field(default=False, metadata={
        "help": "Stage one: compute the frozen backbone's (VAE and DiT) feature maps once per distinct input and reuse "
                "them in later epochs. The rule: stage one's augmentation is then restricted to horizontal flip only "
                "(colour jitter, zoom-out and random crops are dropped in stage one), so each (image, flip) is one "
                "input; stage two uses the full --augmentation again and never the cache (the backbone trains). "
                "Cached in RAM (each process its own), or on disk with --feature_cache_dir."})
    feature_cache_dir: str | None = field(default=None, metadata={
        "help": "With --cache_frozen_features: keep the cached features in this folder (one safetensors file per "
                "input, under a subfolder named by the backbone's fingerprint) instead of RAM, for sets whose features "
                "do not fit in memory. Reused by later runs with the same backbone."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start over in an --output_dir that holds an earlier run's stage1/ and stage2/ folders (they are "
                "deleted). Without it such a folder is an error, unless --resume_from_checkpoint continues it."})


def parse_arguments(argv: list[str]):
    parser = HfArgumentParser((ModelArguments, DataArguments, StageArguments, TrainingArguments))
    config_file = Path(argv[0]) if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")) else None
    if config_file is not None:
        given = json.loads(config_file.read_text()) if config_file.suffix == ".json" else _read_yaml(config_file)
    else:
        given = _given_options(argv)
    # The built-in job (built-in data, new small DiT) has its own measured settings.
    built_in = not any(given.get(key) for key in ("dataset_name", "coco_annotations", "model_name_or_path"))
    streaming = _is_true(given.get("streaming", False))
    defaults = {**TRAINING_DEFAULTS, **(SYNTHETIC_DEFAULTS if built_in else {}),
                **(STREAMING_DEFAULTS if streaming else {}), **cpu_default(given)}
    if config_file is not None:
        return parser.parse_dict({**defaults, **given})
    parser.set_defaults(**defaults)
    return parser.parse_args_into_dataclasses(args=argv)


def cpu_default(given: dict) -> dict:
    """{"use_cpu": True} where bf16 is asked for on a machine without a GPU (or other accelerator) and --use_cpu is
    not given: transformers refuses bf16 there unless use_cpu is set, while without bf16 the same machine trains on
    its CPU anyway. A GPU without bf16 support keeps transformers' error (it names the GPU generation needed)."""
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    wants_bf16 = any(_is_true(given.get(key, False)) for key in ("bf16", "bf16_full_eval"))
    if not wants_bf16 or "use_cpu" in given or torch.cuda.is_available() or is_torch_bf16_gpu_available() or \
            is_torch_xla_available():
        return {}
    logger.warning("--bf16 without a GPU: training on the CPU in bfloat16 autocast (--use_cpu true is set for you; "
                   "give --use_cpu false to get transformers' error instead).")
    return {"use_cpu": True}


def _is_true(value) -> bool:
    """A boolean option's value as given on a command line or in a config file."""
    return str(value).lower() in ("true", "1", "yes")


def _given_options(argv: list[str]) -> dict:
    """The options on a command line with their values as written ("--bf16" alone: True)."""
    given = {}
    for position, arg in enumerate(argv):
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            following = argv[position + 1] if position + 1 < len(argv) else "--"
            given[name.replace("-", "_")] = value or (True if following.startswith("--") else following)
    return given


def _read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


@dataclass
class PreparedData:
    """The data step's result: checked canonical splits (train, validation, maybe test), class names, the source's
    id of each label (`category_ids[i]` is label i's: COCO's category ids, else i), what the check fixed, a name."""

    splits: DatasetDict
    id2label: dict[int, str]
    category_ids: list[int]
    report: DataReport
    name: str
    train_stream: datasets.IterableDataset | None = None  # --streaming: the whole train stream (splits has no train)
    held_out: set[int] = field(default_factory=set)  # --streaming: train image_ids held out as validation
    category_key: str = "category"


def prepare_data(data_args: DataArguments, training_args: TrainingArguments) -> PreparedData:
    """Load the data, then check once the records that will be used (limits applied first). Each step runs on the
    main process first, so downloads, caches and the check's cache files are made once per machine. A limit below 1
    is refused before anything is read; a split that the check leaves empty is an error."""
    check_sample_limits(data_args)
    if data_args.streaming:
        return prepare_streamed_data(data_args, training_args)
    report = DataReport()  # loading counts what it drops (COCO annotations of no image), the check its fixes
    with training_args.main_process_first(desc="loading the data"):
        dataset, id2label, category_ids, name = load_data(data_args, training_args.seed, report)
    if "validation" not in dataset:
        raise ValueError("The data has no validation split: give one, or hold out part of train with "
                         "--validation_split_percentage (e.g. 0.15).")
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples,
              "test": data_args.max_eval_samples}
    with training_args.main_process_first(desc="validating the data"):
        for split in list(dataset):  # only the records that will be used are checked
            dataset[split] = clean_split(select(dataset[split], limits[split]), len(id2label), split, report,
                                         skip_bad_images=data_args.skip_bad_images,
                                         num_proc=data_args.preprocessing_num_workers)
    logger.info("Data check:\n%s", report.summary())
    refuse_empty_splits(dataset, report, "train or evaluate")
    for split in dataset:
        warn_if_most_boxes_dropped(dataset[split], split, report)
    if "train" in dataset and count_targets(dataset["train"]) == 0:
        raise ValueError(f"The 'train' split has no object to learn from after the data check ({len(dataset['train'])} "
                         "images; no box that is not a crowd region): check that the annotations belong to these "
                         f"images (their image_id) and the boxes' --bbox_format.\n{report.summary()}")
    return PreparedData(dataset, id2label, category_ids, report, name)


def refuse_empty_splits(splits, report: DataReport, purpose: str) -> None:
    """A split left empty by the data check (e.g. every image undecodable or too small, and skipped) is an error."""
    for split in splits:
        if len(splits[split]) == 0:
            raise ValueError(f"The {split!r} split is empty after the data check: nothing to {purpose} on.\n"
                             f"{report.summary()}")


def prepare_streamed_data(data_args: DataArguments, training_args: TrainingArguments) -> PreparedData:
    """--streaming: the train split as a stream (checked record by record as training reads it, `StreamedTrainSet`);
    validation and test as the first --max_eval_samples records of their streams (of train, held out, where there is
    no validation split), materialised and then canonicalised and checked as the non-streaming path does."""
    report = DataReport()
    with training_args.main_process_first(desc="opening the stream"):
        streams = load_stream(data_args.dataset_name, data_args.dataset_config_name, token=training_args.hub_token)
        category_key, id2label = stream_labels(streams["train"])
        raw_eval, held_out = streamed_eval_splits(streams, data_args.max_eval_samples or DEFAULT_MAX_EVAL_SAMPLES)
        splits, eval_labels = _canonicalize(raw_eval, data_args.bbox_format)
    if eval_labels != id2label:
        raise ValueError(f"The eval splits' classes {eval_labels} differ from the train stream's {id2label}.")
    with training_args.main_process_first(desc="validating the eval data"):
        for split in list(splits):
            splits[split] = clean_split(splits[split], len(id2label), split, report,
                                        skip_bad_images=data_args.skip_bad_images)
    logger.info("Data check of the eval splits (train records are checked as they stream):\n%s", report.summary())
    refuse_empty_splits(splits, report, "evaluate")
    return PreparedData(splits, id2label, list(range(len(id2label))), report, data_args.dataset_name,
                        train_stream=streams["train"], held_out=held_out, category_key=category_key)


def streamed_train_set(data: PreparedData, data_args: DataArguments, training_args: TrainingArguments, transform,
                       stage: int) -> StreamedTrainSet:
    """This process's part of the train stream for stage `stage` (1 or 2; each stage starts the stream over with its
    own shuffle seed), checked and transformed record by record."""
    seed = training_args.seed + (stage - 1) * STAGE_SEED_OFFSET
    part = shard_stream(data.train_stream, training_args.process_index, training_args.world_size, seed,
                        data_args.shuffle_buffer_size, data_args.max_train_samples)
    return StreamedTrainSet(part, transform, len(data.id2label), data_args.bbox_format, data.category_key,
                            data.held_out, data_args.skip_bad_images, training_args.process_index,
                            training_args.world_size)


def check_optimisation_arguments(training_args: TrainingArguments) -> None:
    """Refuse, before any data is read, Trainer options whose value cannot train: transformers accepts some of them
    and fails later (a zero division, weights turned NaN by the first step) or silently changes the run."""
    def number(flag: str, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False):
        value = getattr(training_args, flag)
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise ValueError(f"--{flag} must be a finite number in {interval}, got {value}.")

    number("weight_decay", 0)
    number("adam_beta1", 0, 1, high_open=True)
    number("adam_beta2", 0, 1, high_open=True)
    number("adam_epsilon", 0, low_open=True)
    number("max_grad_norm", 0)  # 0: no clipping
    if training_args.gradient_accumulation_steps < 1:
        raise ValueError(f"--gradient_accumulation_steps must be >= 1, got {training_args.gradient_accumulation_steps}.")
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        raise ValueError(f"--max_steps must be a positive number of optimiser steps, or -1 (the default) to train "
                         f"for --num_train_epochs; got {training_args.max_steps}.")
    for kind in ("save", "eval", "logging"):
        strategy = getattr(training_args, f"{kind}_strategy")
        steps = getattr(training_args, f"{kind}_steps")
        if str(getattr(strategy, "value", strategy)) == "steps" and not (steps is None or steps > 0):
            raise ValueError(f"--{kind}_steps must be positive with --{kind}_strategy steps, got {steps}"
                             + (": no checkpoint would be saved before the end of the run." if kind == "save" else "."))


def check_sample_limits(data_args: DataArguments) -> None:
    for flag in ("max_train_samples", "max_eval_samples"):
        value = getattr(data_args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be a positive number of images (or left out for all of them); got "
                             f"{value}, which leaves nothing to use.")


def load_data(data_args: DataArguments, seed: int, report: DataReport | None = None):
    """(DatasetDict with train / validation / maybe test, id2label, category_ids, dataset name for the card); what
    loading drops is counted in `report`."""
    if data_args.dataset_name or data_args.coco_annotations:
        coco = _split_paths(data_args.coco_annotations, "--coco_annotations") if data_args.coco_annotations else None
        image_dir = data_args.image_dir
        if image_dir and "=" in image_dir:
            image_dir = _split_paths(image_dir, "--image_dir")
        dataset, id2label, category_ids = load_detection_dataset(
            dataset_name=data_args.dataset_name, dataset_config_name=data_args.dataset_config_name,
            coco_annotations=coco, image_dir=image_dir, bbox_format=data_args.bbox_format,
            validation_split_percentage=data_args.validation_split_percentage, seed=seed, report=report)
        name = data_args.dataset_name or Path(next(iter(coco.values()))).stem
        return dataset, id2label, category_ids, name
    logger.info("No dataset given: using the built-in synthetic %s (%d train, %d validation, %d test images).",
                data_args.synthetic_layout, data_args.synthetic_train_size, data_args.synthetic_eval_size,
                data_args.synthetic_eval_size)
    generated = make_synthetic_detection_dataset(num_train=data_args.synthetic_train_size,
                                                 num_validation=data_args.synthetic_eval_size,
                                                 num_test=data_args.synthetic_eval_size, seed=seed,
                                                 layout=data_args.synthetic_layout)
    dataset, id2label, category_ids = prepare_detection_dataset(generated)
    return dataset, id2label, category_ids, f"synthetic-{data_args.synthetic_layout}"


def _split_paths(value: str, option: str) -> dict[str, str]:
    """'train=a,validation=b' -> {"train": "a", "validation": "b"}; a lone path is the train split's. Spaces around
    the parts are ignored; an empty path, or a split given twice (val is validation), is an error naming `option`."""
    parts = [[piece.strip() for piece in part.split("=", 1)] for part in value.split(",")]
    if len(parts) == 1 and len(parts[0]) == 1 and parts[0][0]:
        return {"train": parts[0][0]}
    if not all(len(part) == 2 and part[0] in ("train", "validation", "val", "test") and part[1] for part in parts):
        raise ValueError(f"{option} {value!r}: give one path, or split=path pairs separated by commas "
                         "(splits: train, validation, test).")
    paths = {}
    for split, path in parts:
        split = "validation" if split == "val" else split
        if split in paths:  # the later path would silently win
            raise ValueError(f"{option} {value!r}: the {split} split is given twice.")
        paths[split] = path
    return paths


def model_overrides(model_args: ModelArguments) -> dict:
    """The config fields the model options set. A malformed or unknown one is an error here, before any data is read."""
    overrides = {}
    if model_args.config_overrides:
        try:
            overrides = json.loads(model_args.config_overrides)
        except json.JSONDecodeError as error:
            raise ValueError(f"--config_overrides is not valid JSON ({error}): {model_args.config_overrides!r}") from None
        if not isinstance(overrides, dict):
            raise ValueError(f"--config_overrides must be a JSON object of config fields, got {overrides!r}.")
    if model_args.image_size:
        try:
            sides = [int(side) for side in model_args.image_size.split(",")]
        except ValueError:
            sides = []
        if len(sides) not in (1, 2) or min(sides) < 1:
            raise ValueError(f"--image_size must be 'SIDE' or 'HEIGHT,WIDTH' in pixels, got {model_args.image_size!r}.")
        overrides["image_size"] = sides * 2 if len(sides) == 1 else sides
    for key in ("feature_timestep", "num_queries"):
        if getattr(model_args, key) is not None:
            overrides[key] = getattr(model_args, key)
    if model_args.out_indices:
        try:
            overrides["out_indices"] = [int(i) for i in model_args.out_indices.split(",")]
        except ValueError:
            raise ValueError(f"--out_indices must be comma-separated stage numbers, got {model_args.out_indices!r}.") \
                from None
    check_config_overrides(overrides)
    return overrides


def check_feature_cache_arguments(stage_args: StageArguments) -> None:
    if stage_args.feature_cache_dir and not stage_args.cache_frozen_features:
        raise ValueError("--feature_cache_dir is where --cache_frozen_features keeps its features: give "
                         "--cache_frozen_features true as well, or leave --feature_cache_dir out.")


def stage_plan(stage_args: StageArguments, training_args: TrainingArguments, pretrained_backbone: bool) -> StagePlan:
    return plan_stages(pretrained_backbone, training_args.learning_rate, training_args.num_train_epochs,
                       training_args.max_steps, stage_args.recipe, stage_args.freeze_backbone_epochs,
                       stage_args.backbone_learning_rate, stage_args.layer_decay, stage_args.unfreeze_last_blocks)


def select(dataset, limit: int | None):
    return dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset


def write_preview(model, processor, dataset, id2label, path: Path, count: int, threshold: float) -> None:
    """A PNG grid of the model's detections on the first `count` images of `dataset`."""
    images = [load_rgb(dataset[i]["image"]) for i in range(min(count, len(dataset)))]
    if images:
        detection_grid(images, detect(model.eval(), processor, images, threshold), id2label).save(path)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
    transformers.utils.logging.set_verbosity_warning()
    return run(*parse_arguments(sys.argv[1:] if argv is None else argv))


def run(model_args: ModelArguments, data_args: DataArguments, stage_args: StageArguments,
        training_args: TrainingArguments, callbacks=()) -> dict:
    """The whole job; returns the metrics also written to all_results.json. `callbacks` go to every stage's Trainer."""
    overrides = model_overrides(model_args)  # argument errors first, before any data or model is loaded
    check_data_source_options(data_args, DataArguments(), BUILT_IN_DATA_OPTIONS)
    check_optimisation_arguments(training_args)
    stage_plan(stage_args, training_args, pretrained_backbone=model_args.model_name_or_path is not None)
    check_feature_cache_arguments(stage_args)
    check_sample_limits(data_args)
    check_weights_files(model_args.model_name_or_path)
    if data_args.streaming:
        check_streaming_arguments(data_args.dataset_name, data_args.coco_annotations, training_args.max_steps,
                                  training_args.eval_strategy, training_args.save_strategy)
    prepare_output_dir(training_args, stage_args.overwrite_output_dir, model_args.model_name_or_path)
    set_seed(training_args.seed)
    started = time.time()

    data = prepare_data(data_args, training_args)
    id2label, splits = data.id2label, data.splits
    train, validation, test = splits.get("train"), splits["validation"], splits.get("test")
    streaming = data.train_stream is not None
    known = validation if streaming else train  # a stream's records are unknown before training reads them

    if model_args.model_name_or_path is None and (data_args.dataset_name or data_args.coco_annotations):
        logger.warning("No --model_name_or_path: training a new, randomly initialised DiT on your data. Give a "
                       "pretrained one (e.g. facebook/DiT-XL-2-256) for a useful detector.")
    overrides["category_ids"] = data.category_ids  # the source's id of each label: COCO output in its ids
    detector = load_detector(model_args.model_name_or_path, id2label, preset=model_args.model_preset or "small",
                             overrides=overrides, vae=model_args.vae_name_or_path,
                             fold_conditioning=model_args.fold_conditioning, token=training_args.hub_token,
                             image_sizes=list(zip(known["height"], known["width"])))
    model, base_model = detector.model, model_args.model_name_or_path
    check_unfreeze_last_blocks(model, stage_args.unfreeze_last_blocks)
    check_object_counts(known, model.config.num_queries, "validation" if streaming else "train")  # objects beyond num_queries are never matched
    processor = DiTDetectionImageProcessor(size=dict(zip(("height", "width"), model.config.image_size)),
                                           size_divisor=model.config.backbone_stride)
    plan = stage_plan(stage_args, training_args, detector.pretrained_backbone)
    logger.info("Training %s on %s input images, %s.", "a pretrained DiT" if detector.pretrained_backbone else
                "a new DiT", "x".join(map(str, model.config.image_size)), plan.describe())
    # The model's input size is the processor's: the training augmentation resizes to it, the eval transform too.
    augmentation = make_train_augmentation(processor_size(processor), data_args.augmentation)
    train_transform = DetectionTransform(processor, augmentation, seed=training_args.seed)
    train_set = None if streaming else train.with_transform(train_transform)
    eval_splits = {"eval": validation} | ({"test": test} if test is not None else {})  # by their metrics' prefix
    eval_sets = {prefix: split.with_transform(DetectionTransform(processor)) for prefix, split in eval_splits.items()}
    # Each eval split is scored against its own records as COCO ground truth (crowd regions, areas, original ids).
    evaluator = DetectionEvaluator(processor, id2label, category_ids=data.category_ids, ground_truths={
        prefix: coco_ground_truth(split, id2label, data.category_ids) for prefix, split in eval_splits.items()})

    def make_trainer(args, model):
        if streaming:  # each stage (its own output folder) starts the stream over with its own shuffle seed
            stage = 2 if Path(args.output_dir).name == "stage2" else 1
            stage_set = streamed_train_set(data, data_args, training_args, train_transform, stage)
        return DetectionTrainer(model=model, args=args, train_dataset=stage_set if streaming else train_set,
                                eval_dataset=eval_sets["eval"],
                                data_collator=collate_fn, processing_class=processor,
                                compute_metrics=evaluator, preprocess_logits_for_metrics=evaluator.preprocess,
                                backbone_learning_rate=plan.backbone_learning_rate, layer_decay=plan.layer_decay,
                                # a stream sets its passes' augmentation epoch itself
                                callbacks=[*([] if streaming else [AugmentationEpoch(train_transform)]), *callbacks])

    caching = None
    if stage_args.cache_frozen_features:
        caching = FeatureCaching(train_transform, data_args.augmentation, stage_args.feature_cache_dir)
        logger.info("--cache_frozen_features: %s%s.", caching.describe(),
                    "" if plan.stage_one > 0 else " (this run has no stage one: nothing is cached)")
    trainer, model, metrics = train_in_stages(model, training_args, plan, make_trainer, feature_caching=caching)
    if trainer is None:  # resumed after both stages had finished
        trainer = make_trainer(training_args, model)
    for prefix, eval_set in eval_sets.items():
        metrics.update(trainer.evaluate(eval_dataset=eval_set, metric_key_prefix=prefix))
    metrics["train_minutes"] = round((time.time() - started) / 60, 2)

    output_dir = Path(training_args.output_dir)
    if streaming:  # what the check found in the streamed records, each once, all processes and both stages
        found = read_stream_report(output_dir, data.report)
        metrics.update({f"stream_data_check_{issue}": count for issue, count in found.items()})
        logger.info("Data check of the streamed train records and the eval splits:\n%s", data.report.summary())
    trainer.save_model(str(output_dir))  # weights, config with auto_map, the code, preprocessor_config.json
    if trainer.is_world_process_zero():
        remove_stage_one_model(output_dir)
        (output_dir / "all_results.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        # A sharded model (FSDP, DeepSpeed) computes on all processes together; the preview runs on this one.
        preview_model = unwrapped_copy(model, output_dir) if wraps_model_in_place(trainer) else model
        write_preview(preview_model, processor, validation, id2label, output_dir / "predictions_preview.png",
                      data_args.preview_images, data_args.preview_threshold)
        summary = TrainingSummary(
            model_name=output_dir.name, dataset_name=data.name, metrics=metrics,
            repo_id=training_args.hub_model_id or output_dir.name, base_model=base_model,
            num_train_images="streamed" if streaming else len(train), num_eval_images=len(validation),
            stage_plan=plan, feature_caching=caching.describe() if caching and plan.stage_one > 0 else "",
            data_report="; ".join(line.strip() for line in data.report.summary().splitlines()[1:]),
            hyperparameters={key: getattr(getattr(training_args, key), "value", getattr(training_args, key))
                             for key in ("learning_rate", "per_device_train_batch_size", "num_train_epochs",
                                         "max_steps", "weight_decay", "lr_scheduler_type", "warmup_steps",
                                         "max_grad_norm", "seed")},
            compute_description=_compute_description(training_args, metrics["train_minutes"]))
        render_model_card(model.config, summary, CARD_TEMPLATE).save(output_dir / "README.md")
        if training_args.push_to_hub:
            push_folder_to_hub(output_dir, training_args.hub_model_id or output_dir.name,
                               token=training_args.hub_token, private=training_args.hub_private_repo)
    if trainer.is_world_process_zero():  # the metrics are every process's; one says them
        shown = "test" if test is not None else "eval"
        print(f"{shown} mAP: {metrics[f'{shown}_map']:.4f}  mAP@50: {metrics[f'{shown}_map_50']:.4f}  "
              f"({metrics['train_minutes']} min; model, metrics, card and preview in {output_dir})")
    return metrics


def _compute_description(training_args, minutes: float) -> str:
    world = training_args.world_size
    if torch.cuda.is_available():
        device = f"{world} x {torch.cuda.get_device_name(0)}"
    else:
        device = f"CPU ({os.cpu_count()} cores)"
    return f"{minutes} minutes of training and evaluation on {device}."


if __name__ == "__main__":
    main()
