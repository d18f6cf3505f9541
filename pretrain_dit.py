#!/usr/bin/env python
"""Diffusion-pretrain a DiT (diffusers' `DiTTransformer2DModel`) on unlabeled images, for detection fine-tuning.

    python pretrain_dit.py --output_dir outputs/dit-pretrained          # built-in shapes, small pixel-space DiT
    python run_detection.py --model_name_or_path outputs/dit-pretrained --output_dir outputs/dit-pretrained-det
    accelerate launch pretrain_dit.py --dataset_name cppe-5 --model_preset DiT-S/2 \\
        --vae_name_or_path stabilityai/sd-vae-ft-ema --max_train_steps 100000 --output_dir dit-s-cppe5

What it trains: denoising diffusion as in the DiT paper (Peebles & Xie 2023): diffusers' `DDPMScheduler` with linear
betas 1e-4 .. 0.02 over 1000 steps, epsilon prediction, uniform timesteps; the loss is the paper's: the epsilon MSE
plus, since the DiT also predicts its variance (`out_channels = 2 * in_channels`, `--learn_sigma true`, the default),
the variational-bound term that trains the variance only (improved DDPM's hybrid loss, weight 1 as in DiT's code).
`--learn_sigma false` trains a plain epsilon MSE with `out_channels = in_channels`. Every image is unlabeled: the
class is always the null class (`num_embeds_ada_norm`), which is also the class the detector reads its features at.
Pixel space (the DiT patchifies RGB in [-1, 1]) or latent: a frozen SD-style `AutoencoderKL`
(`--vae_name_or_path`); latents are posterior samples x `scaling_factor`, as in DiT's training code.

Model: from scratch at a size preset (`--model_preset`: "small", the default, is the geometry of run_detection.py's
built-in scratch detector: hidden 64, depth 4, 4 heads, patch 4, pixel space, 64 x 64; "tiny", "tiny-latent",
"DiT-S/2" ... "DiT-XL/2"), initialised as the DiT paper does (adaLN-Zero), or continuing a pretrained diffusers DiT
(`--model_name_or_path`: a DiT pipeline or transformer folder or Hub id, e.g. facebook/DiT-XL-2-256). The blocks
share one timestep and class embedder, as the original DiT does (diffusers keeps a copy per block, and the detector's
converter requires the copies to be equal).

Data: any dataset run_detection.py accepts (same options; labels ignored; only its train split, which is the
detection run's train split at the same --seed and --validation_split_percentage, so no validation or test image is
seen), the built-in synthetic shapes when none is given (the same 2000 training images as run_detection.py's
built-in job), or `--image_folder` (every image under a folder). Images are resized to the model's square input size
as the detector's image processor resizes them (aspect ratio not kept), pixels in [-1, 1], random horizontal flips.

Loop: plain Accelerate, not transformers' Trainer: the model is a diffusers `ModelMixin` (the Trainer saves and
reloads transformers models), the loss lives outside the model (noise and timesteps drawn per step, a scheduler to
noise with), and the EMA update after every optimiser step and its saving are two lines here but a callback with its
own checkpoint hooks there; diffusers' own training scripts are written the same way. So `accelerate launch` gives
DDP / multi-node, `--mixed_precision fp16|bf16` (or accelerate's own flag) mixed precision. AdamW at a constant
learning rate (DiT: 1e-4, no weight decay) after `--lr_warmup_steps` of linear warmup, gradient clipping at
`--max_grad_norm`. EMA of the weights with diffusers' `EMAModel`, `--ema_decay` (default 0.9999, DiT's), whose decay
at step s is min(ema_decay, (1 + s) / (10 + s)) (diffusers' warmup; DiT's code uses 0.9999 from the first step, which
leaves a short run's EMA at its random initialisation). Checkpoints (`accelerator.save_state`: raw weights, optimiser,
learning-rate schedule, random states, EMA, the data position and the loss history) every `--checkpointing_steps`
and at the end, in output_dir/checkpoints/checkpoint-N; `--resume_from_checkpoint latest` (or a checkpoint folder)
continues a run, also with a larger --max_train_steps.

Outputs in --output_dir: a diffusers pipeline folder (model_index.json, transformer/ with the **EMA weights**,
vae/ for a latent DiT, scheduler/: the training schedule as a `DDPMScheduler` with the fixed posterior variance,
which `DiTPipeline` can run: it drops a DiT's variance output) that `run_detection.py --model_name_or_path` and
`DiTForObjectDetection.from_diffusers` take as it is, and `DiTPipeline.from_pretrained` (add `vae=None` for a
pixel-space one); `loss_curve.png`; `samples.png` (16 samples of the EMA model: ancestral DDPM, 100 steps, through
`DiTPipeline` for a latent DiT, the same loop written out in pixel space; DDIM gave the small built-in model's samples
as speckle); `pretrain_results.json` (steps, first and final loss, minutes, the loss of every step). The raw
(non-EMA) weights are in the last checkpoint.

All options: `python pretrain_dit.py --help`; one JSON or YAML file may hold them all: `python pretrain_dit.py job.yaml`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

logger = logging.getLogger("pretrain_dit")

# The built-in job (built-in shapes, a new DiT, "small" by default): settings measured to learn in a few minutes on 2
# CPU cores. Anything given explicitly wins.
BUILT_IN_DEFAULTS = {"max_train_steps": 1000, "learning_rate": 1e-3, "lr_warmup_steps": 100}
# What this script writes into --output_dir (removed by --overwrite_output_dir; other files there are left alone).
OUTPUT_ENTRIES = ("checkpoints", "transformer", "vae", "scheduler", "model_index.json", "loss_curve.png",
                  "samples.png", "pretrain_results.json", "logs")
STATE_FILE = "pretrain_state.json"  # written last into a checkpoint: its presence marks a complete save


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Continue pretraining this diffusers DiT: a pipeline (e.g. facebook/DiT-XL-2-256, or a folder this "
                "script wrote) or a DiTTransformer2DModel folder. Without it, a new DiT of --model_preset."})
    model_preset: str | None = field(default=None, metadata={
        "help": "Size of a new DiT: small (default; run_detection.py's built-in detector geometry: hidden 64, depth 4, "
                "4 heads, patch 4, pixel space, 64 px), tiny, tiny-latent, DiT-S/2, DiT-B/2, DiT-L/2, DiT-XL/2 (the "
                "latent ones need --vae_name_or_path)."})
    vae_name_or_path: str | None = field(default=None, metadata={
        "help": "A pretrained AutoencoderKL (frozen), e.g. stabilityai/sd-vae-ft-ema: the DiT then works on its "
                "latents. Replaces a pretrained pipeline's VAE."})
    image_size: int | None = field(default=None, metadata={
        "help": "Side of the square training images in pixels (new DiT only; a multiple of patch size x VAE "
                "downsampling). Default: the preset's (small: 64). A pretrained DiT trains at its own size."})
    learn_sigma: bool | None = field(default=None, metadata={
        "help": "Whether the DiT also predicts its variance, trained by the variational bound (the DiT paper's hybrid "
                "loss); false: a plain epsilon MSE. Default: true for a new DiT, the checkpoint's otherwise."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in the backward."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={
        "help": "As in run_detection.py: a Hub dataset id (cppe-5 schema), a save_to_disk folder, or an imagefolder "
                "with metadata.jsonl. Only the train split's images are used; labels are ignored. Without any data "
                "option, the built-in synthetic shapes."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    coco_annotations: str | None = field(default=None, metadata={
        "help": "As in run_detection.py: COCO json(s), 'train=a.json[,validation=b.json]' or one path; the train "
                "split's images are used."})
    image_dir: str | None = field(default=None, metadata={"help": "As in run_detection.py: the COCO images' folder."})
    bbox_format: str = field(default="coco", metadata={
        "help": "As in run_detection.py (boxes are read, then ignored).", "choices": ["coco", "pascal_voc", "yolo"]})
    validation_split_percentage: float = field(default=0.15, metadata={
        "help": "As in run_detection.py: the fraction of train held out (and not pretrained on) when the data has no "
                "validation split; keep it equal to the detection run's so that its validation images stay unseen."})
    image_folder: str | None = field(default=None, metadata={
        "help": "A folder of unlabeled images (searched recursively) instead of a detection dataset."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many images."})
    skip_bad_images: bool = field(default=False, metadata={
        "help": "Skip (and count) images that cannot be decoded instead of stopping with an error naming them."})
    synthetic_train_size: int = field(default=2000, metadata={
        "help": "Built-in data: training images (the same ones as run_detection.py's at the same --seed)."})
    random_flip: bool = field(default=True, metadata={"help": "Flip half of the images horizontally."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Processes loading and resizing the images."})


@dataclass
class PretrainingArguments:
    output_dir: str = field(metadata={"help": "Where the pipeline folder, PNGs and checkpoints go."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start over in an --output_dir that is not empty (this script's earlier outputs there are deleted)."})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "'latest' (or 'true'): continue from the newest complete checkpoint in --output_dir; or the path of "
                "one output_dir/checkpoints/checkpoint-N folder."})
    max_train_steps: int = field(default=10000, metadata={
        "help": "Optimiser steps in all (a resumed run continues to this many). Built-in job: 1000."})
    train_batch_size: int = field(default=32, metadata={"help": "Images per device and step (DiT: 256 in all)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimiser step."})
    learning_rate: float = field(default=1e-4, metadata={
        "help": "AdamW learning rate, constant after the warmup (DiT: 1e-4). Built-in job: 1e-3."})
    lr_warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps. Built-in job: 100."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (DiT: 0)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    ema_decay: float = field(default=0.9999, metadata={
        "help": "EMA decay (DiT: 0.9999); at step s the decay used is min(ema_decay, (1 + s) / (10 + s))."})
    mixed_precision: str | None = field(default=None, metadata={
        "help": "no, fp16 or bf16. Default: accelerate's configuration (e.g. accelerate launch --mixed_precision).",
        "choices": ["no", "fp16", "bf16"]})
    seed: int = field(default=42, metadata={"help": "Seed of the weights, the data order, noise and timesteps."})
    logging_steps: int = field(default=50, metadata={"help": "Log the mean loss every this many steps."})
    checkpointing_steps: int = field(default=500, metadata={"help": "Save a checkpoint every this many steps."})
    checkpoints_total_limit: int | None = field(default=2, metadata={
        "help": "Keep at most this many checkpoints (the newest)."})
    num_samples: int = field(default=16, metadata={"help": "Images in samples.png (0: none)."})
    sample_inference_steps: int = field(default=100, metadata={"help": "DDPM steps per sample."})
    report_to: str | None = field(default=None, metadata={
        "help": "Also log to this tracker (tensorboard, wandb, ...; accelerate's log_with), in output_dir/logs."})


def parse_arguments(argv: list[str]):
    """(ModelArguments, DataArguments, PretrainingArguments) from the command line or from one JSON / YAML file, with
    the built-in job's defaults (`BUILT_IN_DEFAULTS`) when no data, image folder or pretrained model is given."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ModelArguments, DataArguments, PretrainingArguments))
    config_file = Path(argv[0]) if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")) else None
    if config_file is not None:
        if config_file.suffix == ".json":
            given = json.loads(config_file.read_text())
        else:
            import yaml

            given = yaml.safe_load(config_file.read_text())
    else:
        given = {arg[2:].split("=", 1)[0].replace("-", "_"): True for arg in argv if arg.startswith("--")}
    built_in = not any(given.get(key) for key in ("dataset_name", "coco_annotations", "image_folder",
                                                  "model_name_or_path"))  # as run_detection.py decides it
    defaults = BUILT_IN_DEFAULTS if built_in else {}
    if config_file is not None:
        return parser.parse_dict({**defaults, **given})
    parser.set_defaults(**defaults)
    return parser.parse_args_into_dataclasses(args=argv)


# ----------------------------------------------------------------------------------------------------------------
# Arguments and the output folder
# ----------------------------------------------------------------------------------------------------------------

def check_arguments(model_args: ModelArguments, data_args: DataArguments, args: PretrainingArguments) -> None:
    """Refuse values that make no sense, naming the option, before any model or data is loaded."""
    from modeling_dit_detection.training.data import check_data_source_options
    from modeling_dit_detection.training.diffusion import preset_backbone

    if model_args.model_name_or_path and model_args.model_preset:
        raise ValueError("Give --model_name_or_path (continue a pretrained DiT) or --model_preset (a new one), "
                         "not both.")
    if model_args.model_preset:
        preset_backbone(model_args.model_preset)  # an unknown name is an error listing the presets
    if model_args.model_name_or_path and model_args.image_size:
        raise ValueError("--image_size is for a new DiT: a pretrained one trains at the size it was built for "
                         "(its sample_size x the VAE's downsampling).")
    if data_args.image_folder and (data_args.dataset_name or data_args.coco_annotations):
        raise ValueError("Give --image_folder or a detection dataset (--dataset_name / --coco_annotations), not both.")
    # --image_folder reads none of the detection data options; the built-in shapes read --synthetic_train_size
    check_data_source_options(data_args, DataArguments(), {"synthetic_train_size"}, {"image_folder": set()})
    for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "logging_steps",
                 "checkpointing_steps", "sample_inference_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    for name, value in (("image_size", model_args.image_size), ("max_train_samples", data_args.max_train_samples),
                        ("checkpoints_total_limit", args.checkpoints_total_limit)):
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive integer (or left out), got {value}.")
    for name, value in (("num_samples", args.num_samples), ("lr_warmup_steps", args.lr_warmup_steps),
                        ("dataloader_num_workers", data_args.dataloader_num_workers)):
        if value < 0:
            raise ValueError(f"--{name} must be >= 0, got {value}.")
    if not (args.learning_rate > 0 and math.isfinite(args.learning_rate)):
        raise ValueError(f"--learning_rate must be a positive number, got {args.learning_rate}.")
    if not 0 <= args.ema_decay <= 1:
        raise ValueError(f"--ema_decay must lie in [0, 1], got {args.ema_decay}.")
    if not (args.max_grad_norm > 0 and math.isfinite(args.max_grad_norm)):
        raise ValueError(f"--max_grad_norm must be a positive number, got {args.max_grad_norm}.")
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        raise ValueError(f"--weight_decay must be a finite number >= 0, got {args.weight_decay}.")


def resume_checkpoint(args: PretrainingArguments) -> Path | None:
    """The checkpoint folder to resume from (None: a new run). 'latest' / 'true': the newest complete one in
    output_dir/checkpoints (an error if there is none); else the folder given, which must be complete."""
    value = args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    root = Path(args.output_dir) / "checkpoints"
    if str(value).lower() in ("latest", "true"):
        found = complete_checkpoints(root)
        if not found:
            raise ValueError(f"--resume_from_checkpoint {value}: no complete checkpoint in {root}: nothing to resume. "
                             "Check --output_dir, or leave the flag out to start a new run.")
        return found[0]
    checkpoint = Path(value)
    if not (checkpoint / STATE_FILE).is_file():
        raise ValueError(f"--resume_from_checkpoint {value}: not a complete checkpoint of this script (no "
                         f"{STATE_FILE}; a save that was interrupted, or another folder). Give 'latest' for the newest "
                         "complete one.")
    return checkpoint


def complete_checkpoints(root: Path) -> list[Path]:
    """checkpoint-N folders under `root` whose save finished (`STATE_FILE` is written last), newest first."""
    if not root.is_dir():
        return []
    found = [(int(path.name.split("-")[1]), path) for path in root.glob("checkpoint-*")
             if path.name.split("-")[1].isdigit() and (path / STATE_FILE).is_file()]
    return [path for _, path in sorted(found, reverse=True)]


def check_output_dir(args: PretrainingArguments, model_source: str | None, resuming: bool) -> None:
    """A new run needs an empty or new --output_dir, or --overwrite_output_dir (which deletes this script's earlier
    outputs there). The folder of the model being continued is never the output folder."""
    output_dir = Path(args.output_dir)
    if model_source is not None and Path(model_source).exists() and \
            Path(model_source).resolve() == output_dir.resolve():
        raise ValueError(f"--output_dir {output_dir} is the folder of the model it continues (--model_name_or_path): "
                         "choose another --output_dir.")
    if resuming or not output_dir.exists():
        return
    if output_dir.is_file():
        raise ValueError(f"--output_dir {output_dir} is a file.")
    contents = sorted(path.name for path in output_dir.iterdir())
    if contents and not args.overwrite_output_dir:
        raise ValueError(f"--output_dir {output_dir} exists and is not empty ({', '.join(contents[:5])}"
                         f"{' ...' if len(contents) > 5 else ''}): start over with --overwrite_output_dir true "
                         "(replaces this script's outputs there), continue with --resume_from_checkpoint latest, or "
                         "choose another --output_dir.")


def clear_output_dir(output_dir: Path) -> None:
    for name in OUTPUT_ENTRIES:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class LoadedDiT:
    transformer: torch.nn.Module  # diffusers DiTTransformer2DModel, one embedder shared by its blocks
    vae: torch.nn.Module | None  # frozen AutoencoderKL, or None in pixel space
    image_size: int  # pixels per side of the training images
    source: str  # "preset <name>" or the checkpoint continued


def load_dit(model_args: ModelArguments) -> LoadedDiT:
    """The DiT to train and its VAE: continued from `model_name_or_path`, or new at `model_preset` (default
    "small"). Raises a `ValueError` for a geometry that cannot work (size not a multiple of the stride, a latent
    preset without VAE, a VAE whose latents the DiT cannot read)."""
    from diffusers import AutoencoderKL

    from modeling_dit_detection.convert_diffusers_dit import load_diffusers_components
    from modeling_dit_detection.training.diffusion import learns_sigma, new_dit_transformer, preset_backbone, \
        tie_conditioning_embedders

    vae = AutoencoderKL.from_pretrained(model_args.vae_name_or_path) if model_args.vae_name_or_path else None
    if model_args.model_name_or_path:
        transformer, vae = load_diffusers_components(model_args.model_name_or_path, vae=vae)
        tie_conditioning_embedders(transformer)
        if model_args.learn_sigma is not None and model_args.learn_sigma != learns_sigma(transformer):
            raise ValueError(f"--learn_sigma {model_args.learn_sigma}: {model_args.model_name_or_path} "
                             f"{'predicts' if learns_sigma(transformer) else 'does not predict'} its variance "
                             f"(out_channels {transformer.config.out_channels}); leave the flag out.")
        source = model_args.model_name_or_path
        image_size = transformer.config.sample_size * _vae_factor(vae)
    else:
        preset = model_args.model_preset or "small"
        backbone = preset_backbone(preset)
        if backbone.vae_config is not None and vae is None:
            raise ValueError(f"--model_preset {preset} is a latent DiT: give a pretrained VAE with --vae_name_or_path "
                             "(e.g. stabilityai/sd-vae-ft-ema; it is never trained here), or choose a pixel-space "
                             "preset (small, tiny).")
        factor = _vae_factor(vae)
        stride = backbone.patch_size * factor
        image_size = model_args.image_size or backbone.image_size[0]
        if image_size % stride:
            raise ValueError(f"--image_size {image_size} is not a multiple of the DiT's stride {stride} (patch "
                             f"{backbone.patch_size} x VAE downsampling {factor}); e.g. {max(stride, image_size // stride * stride)}.")
        in_channels = vae.config.latent_channels if vae is not None else 3
        learn_sigma = True if model_args.learn_sigma is None else model_args.learn_sigma
        transformer = new_dit_transformer(backbone, image_size // factor, in_channels, learn_sigma)
        source = f"preset {preset}"
    if vae is not None:
        if vae.config.get("shift_factor"):
            raise ValueError("The VAE has a shift_factor: diffusers' DiTPipeline decodes latents without it, so its "
                             "samples would be wrong. Use an SD-style VAE (scaling_factor only).")
        vae.requires_grad_(False).eval()
    if model_args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return LoadedDiT(transformer, vae, image_size, source)


def _vae_factor(vae) -> int:
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


def describe(model: LoadedDiT) -> str:
    from modeling_dit_detection.training.diffusion import learns_sigma

    config = model.transformer.config
    parameters = sum(p.numel() for p in model.transformer.parameters())  # the shared embedder counted once
    space = "pixel space" if model.vae is None else f"latents of a frozen VAE ({config.in_channels} channels)"
    return (f"DiT from {model.source}: {parameters / 1e6:.2f} M parameters, hidden "
            f"{config.num_attention_heads * config.attention_head_dim}, depth {config.num_layers}, "
            f"{config.num_attention_heads} heads, patch {config.patch_size}, {space}, {model.image_size} x "
            f"{model.image_size} px images, {'epsilon MSE + variational bound (learned sigma)' if learns_sigma(model.transformer) else 'epsilon MSE'}, "
            f"null class {config.num_embeds_ada_norm}")


# ----------------------------------------------------------------------------------------------------------------
# The data
# ----------------------------------------------------------------------------------------------------------------

def load_images(data_args: DataArguments, seed: int):
    """(a `datasets.Dataset` with an `image` column, a name for the log): the train split of the detection data
    (run_detection.py's loading), the built-in shapes' train split, or the images of `--image_folder`. Images are
    checked once (decoded); an undecodable one is an error naming it, or skipped and counted with
    --skip_bad_images. No image left is an error."""
    if data_args.image_folder:
        dataset, name = _image_folder(data_args.image_folder), data_args.image_folder
    elif data_args.dataset_name or data_args.coco_annotations:
        from run_detection import load_data  # the detection script's loading: same sources, same train split

        splits, _, _, name = load_data(SimpleNamespace(
            dataset_name=data_args.dataset_name, dataset_config_name=data_args.dataset_config_name,
            coco_annotations=data_args.coco_annotations, image_dir=data_args.image_dir,
            bbox_format=data_args.bbox_format, validation_split_percentage=data_args.validation_split_percentage),
            seed)
        dataset = splits["train"]
    else:
        from modeling_dit_detection.training.synthetic_data import make_synthetic_detection_dataset

        logger.info("No data given: pretraining on the built-in synthetic shapes (%d training images).",
                    data_args.synthetic_train_size)
        # Images come from generators seeded per (seed, split, index): the same train images as run_detection.py's.
        dataset = make_synthetic_detection_dataset(num_train=data_args.synthetic_train_size, num_validation=1,
                                                   num_test=1, image_size=64, seed=seed)["train"]
        name = "synthetic-shapes"
    if data_args.max_train_samples is not None:
        dataset = dataset.select(range(min(data_args.max_train_samples, len(dataset))))
    dataset = check_images(dataset.select_columns(["image"]), name, data_args.skip_bad_images)
    if len(dataset) == 0:
        raise ValueError(f"No images to pretrain on in {name}" + (" (every one was undecodable and skipped)."
                                                                   if data_args.skip_bad_images else "."))
    return dataset, name


def _image_folder(folder: str):
    import datasets
    import PIL.Image

    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"--image_folder {folder} is not a folder.")
    extensions = {extension.lower() for extension in PIL.Image.registered_extensions()}
    paths = sorted(str(path) for path in root.rglob("*") if path.is_file() and path.suffix.lower() in extensions)
    if not paths:
        raise ValueError(f"--image_folder {folder} holds no image files (searched recursively for "
                         f"{', '.join(sorted(extensions)[:8])} ...).")
    return datasets.Dataset.from_dict({"image": paths}, features=datasets.Features({"image": datasets.Image()}))


def check_images(dataset, name: str, skip_bad_images: bool):
    """`dataset` without the images that cannot be decoded (with `skip_bad_images`; else the first one is a
    `ValueError` naming its row and file)."""
    import io

    import datasets
    import PIL.Image

    undecoded = dataset.cast_column("image", datasets.Image(decode=False))
    keep, skipped = [], []
    for row, example in enumerate(undecoded):
        value = example["image"] or {}
        try:
            source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
            PIL.Image.open(source).load()
            keep.append(row)
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... depending on the codec
            where = f"{name}: train row {row}" + (f" ({value.get('path')})" if value.get("path") else "")
            if not skip_bad_images:
                raise ValueError(f"{where}: cannot decode the image ({type(error).__name__}: {error}). "
                                 "--skip_bad_images skips such images.") from error
            skipped.append(where)
    if skipped:
        logger.warning("Skipped %d undecodable image(s), e.g. %s.", len(skipped), "; ".join(skipped[:3]))
    return dataset.select(keep) if len(keep) < len(dataset) else dataset


class ImageTransform:
    """Batch transform for `dataset.with_transform`: images -> {"pixel_values": `[3, size, size]` in [-1, 1] each},
    resized exactly as the detector's `DiTDetectionImageProcessor` resizes (bilinear, aspect ratio not kept)."""

    def __init__(self, image_size: int, stride: int):
        from modeling_dit_detection import DiTDetectionImageProcessor

        self.processor = DiTDetectionImageProcessor(size={"height": image_size, "width": image_size},
                                                    size_divisor=stride)

    def __call__(self, batch: dict) -> dict:
        from modeling_dit_detection.image_processing_dit_detection import load_rgb

        images = [load_rgb(image) for image in batch["image"]]
        return {"pixel_values": list(self.processor(images=images, return_tensors="pt")["pixel_values"])}


def collate(examples: list[dict]) -> torch.Tensor:
    return torch.stack([example["pixel_values"] for example in examples])


class EpochShuffle(torch.utils.data.Sampler):
    """A permutation of the dataset per epoch that depends only on (seed, epoch), so a resumed run reads the batches
    the uninterrupted run reads. accelerate's prepared loader calls `set_epoch`."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per checkpoint file otherwise
    return run(*parse_arguments(sys.argv[1:] if argv is None else argv))


def run(model_args: ModelArguments, data_args: DataArguments, args: PretrainingArguments) -> dict:
    """The whole job; returns what pretrain_results.json holds (without the per-step losses): steps, final_loss,
    minutes, output_dir."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import DiTPipeline
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from modeling_dit_detection.training.diffusion import DiffusionLoss, draw_loss_curve, image_grid, \
        noise_scheduler, sample_images, untied_copy

    started = time.time()
    if args.report_to is not None and args.report_to.lower() == "none":  # as in the Trainer: no tracker
        args.report_to = None
    check_arguments(model_args, data_args, args)
    output_dir = Path(args.output_dir)
    checkpoint = resume_checkpoint(args)
    check_output_dir(args, model_args.model_name_or_path, resuming=checkpoint is not None)

    accelerator = Accelerator(mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.gradient_accumulation_steps, log_with=args.report_to,
                              project_config=ProjectConfiguration(project_dir=str(output_dir),
                                                                  logging_dir=str(output_dir / "logs")))
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)  # one log, not one per process
    set_seed(args.seed)
    model = load_dit(model_args)  # geometry errors come before any data is read
    logger.info("%s.", describe(model))
    with accelerator.main_process_first():  # downloads and dataset caches are made once per machine
        dataset, data_name = load_images(data_args, args.seed)
    logger.info("%d training images from %s.", len(dataset), data_name)
    if accelerator.is_main_process:  # the output folder is touched only once the model and the data are good
        if checkpoint is None and output_dir.exists():
            clear_output_dir(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    # From here on each process draws its own noise, timesteps and flips (the weights are rank 0's once DDP wraps
    # them); the data order is the same on all of them, each reading its own shard of it.
    set_seed(args.seed, device_specific=True)
    transformer, vae = model.transformer, model.vae
    stride = transformer.config.patch_size * _vae_factor(vae)
    dataset = dataset.with_transform(ImageTransform(model.image_size, stride))
    # The loader's own generator: each epoch's iterator draws its workers' base seed from it, not from the global
    # generator, which then only draws noise, timesteps and flips (so a resumed run draws what the whole run draws).
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size,
                                         sampler=EpochShuffle(len(dataset), args.seed), collate_fn=collate,
                                         num_workers=data_args.dataloader_num_workers,
                                         generator=torch.Generator().manual_seed(args.seed))

    scheduler = noise_scheduler(pixel_space=vae is None)
    loss_function = DiffusionLoss(scheduler)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    lr_schedule = get_scheduler("constant_with_warmup", optimizer,
                                num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes)
    transformer.train()
    transformer, optimizer, loader, lr_schedule = accelerator.prepare(transformer, optimizer, loader, lr_schedule)
    unwrapped = accelerator.unwrap_model(transformer)
    ema = EMAModel(unwrapped.parameters(), decay=args.ema_decay)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    if vae is not None:
        vae.to(accelerator.device)
    loss_function.to(accelerator.device)
    null_class = unwrapped.config.num_embeds_ada_norm

    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "losses": []}
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / STATE_FILE).read_text())
        logger.info("Resumed from %s at step %d.", checkpoint, state["step"])
    if args.report_to:
        accelerator.init_trackers("pretrain_dit")
    logger.info("Training to step %d: %d image(s) per step (%d per device x %d device(s) x %d accumulation), lr %g "
                "(warmup %d), EMA decay %g.", args.max_train_steps,
                args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
                args.train_batch_size, accelerator.num_processes, args.gradient_accumulation_steps,
                args.learning_rate, args.lr_warmup_steps, args.ema_decay)

    def save_checkpoint() -> None:
        folder = output_dir / "checkpoints" / f"checkpoint-{state['step']}"
        # Raw weights, optimiser, lr schedule, random states and the EMA. Not safetensors: the blocks share one
        # embedder, and accelerate would drop the aliases from a safetensors file.
        accelerator.save_state(str(folder), safe_serialization=False)
        if accelerator.is_main_process:
            (folder / STATE_FILE).write_text(json.dumps(state) + "\n")  # last: marks the save complete
            logger.info("Saved checkpoint %s.", folder)
            for old in complete_checkpoints(output_dir / "checkpoints")[args.checkpoints_total_limit or 10 ** 9:]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    window, window_start, last_saved = [], time.time(), state["step"]
    step_loss, micro_batches = 0.0, 0
    while state["step"] < args.max_train_steps:
        loader.set_epoch(state["epoch"])
        batches = accelerator.skip_first_batches(loader, state["batches_in_epoch"]) if state["batches_in_epoch"] \
            else loader
        for pixels in batches:
            state["batches_in_epoch"] += 1
            with accelerator.accumulate(transformer):
                loss = training_loss(transformer, vae, scheduler, loss_function, pixels, null_class,
                                     data_args.random_flip, accelerator)
                reduced = accelerator.reduce(loss.detach(), "mean").item()  # every process sees the same value
                if not math.isfinite(reduced):  # stop before the optimiser step, on every process
                    raise RuntimeError(f"The loss is {reduced} at step {state['step'] + 1}: stopping before the "
                                       "optimiser step. Lower --learning_rate, or use bf16 rather than fp16.")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(transformer.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_schedule.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += reduced
            micro_batches += 1
            if not accelerator.sync_gradients:
                continue
            ema.step(unwrapped.parameters())
            state["step"] += 1
            value = step_loss / micro_batches
            step_loss, micro_batches = 0.0, 0
            state["losses"].append(value)
            window.append(value)
            if args.report_to:
                accelerator.log({"loss": value, "lr": lr_schedule.get_last_lr()[0]}, step=state["step"])
            if state["step"] % args.logging_steps == 0 or state["step"] == args.max_train_steps:
                logger.info("step %d/%d  loss %.4f  lr %.2e  %.2f steps/s", state["step"], args.max_train_steps,
                            sum(window) / len(window), lr_schedule.get_last_lr()[0],
                            len(window) / max(time.time() - window_start, 1e-9))
                window, window_start = [], time.time()
            if state["step"] % args.checkpointing_steps == 0:
                save_checkpoint()
                last_saved = state["step"]
            if state["step"] >= args.max_train_steps:
                break
        else:  # the epoch is done
            state["epoch"] += 1
            state["batches_in_epoch"] = 0
    if state["step"] != last_saved:
        save_checkpoint()  # the raw weights of the end, and a point to continue from with a larger --max_train_steps

    results = {}
    if accelerator.is_main_process:
        # The pipeline gets the EMA weights (what the DiT paper samples and evaluates with).
        ema.store(unwrapped.parameters())
        ema.copy_to(unwrapped.parameters())
        exported = untied_copy(unwrapped)
        ema.restore(unwrapped.parameters())
        pipeline_vae = vae.to("cpu", torch.float32) if vae is not None else None
        with quiet_diffusers():  # in pixel space it warns that the pipeline's vae=None "cannot be saved": as meant
            DiTPipeline(transformer=exported, vae=pipeline_vae, scheduler=scheduler).save_pretrained(str(output_dir))
        losses = state["losses"]
        tail = losses[-min(len(losses), 50):]
        results = {"steps": state["step"], "final_loss": sum(tail) / len(tail) if tail else None,
                   "first_loss": losses[0] if losses else None,
                   "minutes": round((time.time() - started) / 60, 2), "images": len(dataset), "data": data_name,
                   "model": describe(model), "output_dir": str(output_dir), "saved_weights": "ema",
                   "ema_decay": args.ema_decay}
        if losses:
            draw_loss_curve(list(range(1, len(losses) + 1)), losses,
                            title=f"diffusion loss, {data_name}").save(output_dir / "loss_curve.png")
        if args.num_samples:
            exported.to(accelerator.device)
            samples = sample_images(exported, pipeline_vae.to(accelerator.device) if pipeline_vae is not None else None,
                                    scheduler.config, args.num_samples, args.sample_inference_steps, seed=args.seed)
            image_grid(samples, columns=math.ceil(math.sqrt(args.num_samples))).save(output_dir / "samples.png")
        results["minutes"] = round((time.time() - started) / 60, 2)
        (output_dir / "pretrain_results.json").write_text(json.dumps({**results, "losses": losses}, indent=1) + "\n")
        print(f"pretrained {results['steps']} steps in {results['minutes']} min; loss {results['first_loss']:.4f} "
              f"at step 1, {results['final_loss']:.4f} (mean of the last {len(tail)} steps); pipeline (EMA weights), "
              f"loss_curve.png and samples.png in {output_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


@contextlib.contextmanager
def quiet_diffusers():
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def training_loss(transformer, vae, scheduler, loss_function, pixels: torch.Tensor, null_class: int,
                  random_flip: bool, accelerator) -> torch.Tensor:
    """The mean loss of one batch of pixels `[B, 3, H, W]` in [-1, 1]: flip half of them (if `random_flip`), encode
    (VAE posterior sample x scaling_factor, or the pixels), noise to uniform timesteps, predict, `loss_function`."""
    if random_flip:
        flip = torch.rand(pixels.shape[0], device=pixels.device) < 0.5
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    if vae is not None:
        with torch.no_grad(), accelerator.autocast():
            latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
        x0 = latents.float()
    else:
        x0 = pixels
    noise = torch.randn_like(x0)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
    noisy = scheduler.add_noise(x0, noise, timesteps)
    labels = torch.full((x0.shape[0],), null_class, device=x0.device, dtype=torch.long)
    output = transformer(noisy, timestep=timesteps, class_labels=labels).sample
    return loss_function(output, x0, noisy, noise, timesteps).mean()


if __name__ == "__main__":
    main()
